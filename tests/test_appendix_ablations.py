"""scripts/appendix_ablations.py (issue 28: the paper's App. B ablations in small): every command it plans parses with
its script's flags, finished cells are read back (nothing re-run) into results.csv / table.md / figure.png, and bad
input or a failing script ends in one line."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys

import pytest
import tyro

from common.errors import UsageError
from scripts import appendix_ablations as aa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _planned(experiment: str, tmp_path, **kw) -> list[aa.Cell]:
    args = aa.Args(experiment, out=str(tmp_path / "out"), dry_run=True, **kw)
    aa.main(args)  # fills the defaults
    return aa.cells(args)


@pytest.mark.parametrize("experiment", ["scratch", "expert-data", "critic"])
def test_every_planned_command_parses_with_its_scripts_flags(experiment, tmp_path, capsys):
    """A flag a script does not have (or a value it refuses to parse) would fail here, not after an hour of runs."""
    plan = _planned(experiment, tmp_path, seeds=[1, 2])
    printed = capsys.readouterr().out.splitlines()
    argvs = [argv for cell in plan for argv, _ in cell.steps]
    assert len(printed) == len(argvs) == {"scratch": 4, "expert-data": 24, "critic": 6}[experiment]
    for argv in argvs:
        module = importlib.import_module(os.path.splitext(argv[1])[0])
        parsed = tyro.cli(module.Args, args=argv[2:])
        assert parsed.torch_threads == 1 and parsed.seed in (1, 2)
    if experiment == "expert-data":  # the pre-trained checkpoint is what the fine-tuning run reads
        pre, tune = plan[0].steps
        assert pre[1] == tune[0][tune[0].index("--checkpoint") + 1] and "--max-n-episodes" in pre[0]
        assert {c.group for c in plan} == {"10 demonstrations", "30 demonstrations", "96 demonstrations"}
    if experiment == "scratch":  # 36 iterations, an evaluation every 6th: 30 training iterations of 10k env steps
        assert all({"--from-scratch", "36", "6"} <= set(argv) for argv in argvs)


def _fake_run(path, rows: list[tuple[int, int, str, float, float]], tensorboard: bool) -> str:
    """A run folder with eval.csv rows (iteration, env_steps, mode, return, success) and, for the scratch experiment,
    TensorBoard's eval/episodic_return of the deterministic ones."""
    os.makedirs(path)
    with open(os.path.join(path, "eval.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "env_steps", "mode", "return_mean", "return_std", "success_rate", "n_episodes"])
        w.writerows([(i, s, m, r, 0.0, sr, 10) for i, s, m, r, sr in rows])
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(path))
        for i, _, m, r, _ in rows:
            if m == "deterministic":
                writer.add_scalar("eval/episodic_return", r, i)
        writer.close()
    return str(path)


@pytest.mark.parametrize("experiment", ["scratch", "critic"])
def test_finished_cells_are_read_back_into_the_table_and_figure(experiment, tmp_path, monkeypatch):
    """cells/<name>_s<seed>.json present: no process starts; every evaluation row lands in results.csv, the table has
    first -> last (best) and the CPU seconds recorded, the figure is written."""
    out = tmp_path / "out"
    plan = _planned(experiment, tmp_path)
    os.makedirs(out / "cells")
    for k, cell in enumerate(plan):
        det = experiment == "scratch"
        rows = ([(0, 0, "deterministic", 10.0 + k, float("nan")), (6, 50000, "deterministic", 200.0 + k, float("nan")),
                 (6, 50000, "stochastic", 150.0, float("nan")), (36, 300000, "deterministic", 300.0 + k, float("nan"))]
                if det else [(0, 5000, "stochastic", 40.0, 0.5), (1, 10000, "stochastic", 60.0, 0.9 - k / 10),
                             (2, 10000, "stochastic", 70.0, 0.8 - k / 10)])
        run_dir = _fake_run(tmp_path / f"run{k}", rows, tensorboard=det)
        with open(out / "cells" / f"{cell.name}_s{cell.seed}.json", "w") as f:
            json.dump({"run_dir": run_dir, "cpu_s": 100.0 + k, "wall_s": 200.0 + k}, f)
    monkeypatch.setattr(aa.subprocess, "Popen", lambda *a, **kw: pytest.fail("a finished cell was run again"))
    assert len(aa.main(aa.Args(experiment, out=str(out)))) == len(plan)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan) * (4 if experiment == "scratch" else 3)
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(plan) and os.path.getsize(out / "figure.png") > 1000
    if experiment == "scratch":  # wall seconds from TensorBoard on the deterministic rows only
        assert all((r["wall_s"] != "") == (r["mode"] == "deterministic") for r in rows)
        assert "| hopper | DPPO | 1 | 10.00 → **300.00** (300.00) | 300000 | 100 | 200 |" in table
    else:  # Avoid: success of the training rollouts; first cell q, then denoising-value, value
        assert "| avoid-m2 | q | 1 | 0.50 → **0.80** (0.90) | 10000 | 100 | 200 |" in table


@pytest.mark.parametrize("kw, words", [
    (dict(experiment="critic", episodes=[10]), "--episodes is for expert-data"),
    (dict(experiment="expert-data", episodes=[10, 10]), "a value given twice"),
    (dict(experiment="scratch", seeds=[1, 1]), "a value given twice"),
    (dict(experiment="critic", jobs=0), "jobs"),
    (dict(experiment="expert-data", episodes=[0]), "episodes"),
])
def test_bad_flags_are_refused_before_anything_runs(kw, words, tmp_path):
    with pytest.raises(UsageError, match=words):
        aa.main(aa.Args(out=str(tmp_path / "out"), **kw))
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("mine")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "appendix_ablations.py"), "critic", "--out",
                        str(tmp_path / "f")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is a file; give a folder" in p.stderr
    assert (tmp_path / "f").read_text() == "mine"


def test_a_failing_script_ends_in_its_own_line_and_no_result(tmp_path):
    """More demonstrations than the dataset holds: the pre-training script's refusal is the tool's one line, naming
    the log; no other cell starts (--jobs 1), no cell is recorded as finished, no results are written."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "appendix_ablations.py"), "expert-data",
                        "--episodes", "500", "--jobs", "1", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "a5_dppo_n500_s1: dppo_pretrain.py exited 2: error:" in p.stderr and "500" in p.stderr
    assert str(out / "logs" / "a5_dppo_n500_s1.log") in p.stderr
    assert os.listdir(out / "logs") == ["a5_dppo_n500_s1.log"] and not os.listdir(out / "cells")
    assert not (out / "results.csv").exists()
