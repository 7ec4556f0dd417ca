"""scripts/plot_runs.py on small synthetic run folders: grouping by task and method, mean and band over
seeds, the metric per task, skipped and refused paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common.runs import EvalLog
from scripts import plot_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(root, env_id, exp_name, seed, rows, t=1795000000):
    """A run folder as the scripts write it: args.json and eval.csv (through the project's own EvalLog)."""
    path = os.path.join(root, f"{env_id}__{exp_name}__{seed}__{t}")
    os.makedirs(path)
    with open(os.path.join(path, "args.json"), "w") as f:
        json.dump({"env_id": env_id, "exp_name": exp_name, "seed": seed}, f)
    log = EvalLog(path)
    for itr, steps, mode, ret, success in rows:
        log.write(itr, steps, mode, {"return_mean": ret, "return_std": 1.0, "success_rate": success, "n_episodes": 10})
    return path


@pytest.fixture
def runs(tmp_path):
    """avoid-m2 (success, stochastic rows only) and hopper (no success rule: return; deterministic and
    stochastic rows), 3 seeds x 2 methods each; values depend on task, method and seed."""
    paths = []
    for method, offset in (("dppo_finetune", 0.0), ("drwr", 0.3)):
        for seed in (1, 2, 3):
            rows = [(i, 1000 * i, "stochastic", 10 * i, min(1.0, 0.1 * i * seed / 3 + offset)) for i in range(4)]
            paths.append(_run(tmp_path, "avoid-m2", method, seed, rows))
            rows = []
            for i in range(3):
                rows.append((5 * i, 2000 * i, "deterministic", 100 * i + 10 * seed + 1000 * offset, float("nan")))
                rows.append((5 * i, 2000 * i, "stochastic", -1e6, float("nan")))  # must not be plotted: deterministic exist
            paths.append(_run(tmp_path, "hopper", method, seed, rows, t=1795000001))
    return paths


def test_groups_metric_mean_and_band(runs, tmp_path, capsys):
    out = str(tmp_path / "fig" / "curves.png")
    summary = plot_runs.main(plot_runs.Args(paths=runs, out=out, label=["drwr=DRWR"]))
    assert os.path.getsize(out) > 10_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    by = {(s["task"], s["method"]): s for s in summary}
    assert set(by) == {(t, m) for t in ("avoid-m2", "hopper") for m in ("dppo_finetune", "drwr")}
    assert all(by[k]["seeds"] == [1, 2, 3] for k in by)
    assert by["avoid-m2", "drwr"]["metric"] == "success_rate" and by["avoid-m2", "drwr"]["mode"] == "stochastic"
    assert by["hopper", "drwr"]["metric"] == "return_mean" and by["hopper", "drwr"]["mode"] == "deterministic"
    # last points, computed by hand: avoid iteration 3, success min(1, 0.1·3·seed/3 + offset) averaged over seeds 1..3
    assert by["avoid-m2", "dppo_finetune"]["last_mean"] == pytest.approx(np.mean([0.1, 0.2, 0.3]))
    assert by["avoid-m2", "drwr"]["last_mean"] == pytest.approx(np.mean([0.4, 0.5, 0.6]))
    assert by["hopper", "drwr"]["last_mean"] == pytest.approx(200 + 20 + 300)  # 100·2 + mean(10·seed) + 1000·0.3
    assert by["hopper", "drwr"]["env_steps"] == 4000
    assert "DRWR" in capsys.readouterr().out


def test_mean_and_band_interpolates_inside_the_common_range():
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 2.0]))
    b = (np.array([0.0, 5.0, 15.0]), np.array([1.0, 1.0, 1.0]))  # ends at 15: the curve stops there
    x, mean, low, high = plot_runs.mean_and_band([a, b])
    assert list(x) == [0, 5, 10, 15]
    np.testing.assert_allclose(mean, [0.5, 0.75, 1.0, 1.25])
    np.testing.assert_allclose(low, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(high, [1.0, 1.0, 1.0, 1.5])
    _, mean, low, high = plot_runs.mean_and_band([a, b], band="std")
    np.testing.assert_allclose(high - mean, [0.5, 0.25, 0.0, 0.25])
    np.testing.assert_allclose(mean - low, high - mean)


def test_the_last_row_of_repeated_env_steps_wins(tmp_path):
    """A run's last training row and its final evaluation share env steps: the final evaluation is plotted."""
    path = _run(tmp_path, "avoid-m2", "x", 1, [(0, 0, "stochastic", 0, 0.2), (1, 500, "stochastic", 0, 0.4),
                                               (2, 500, "stochastic", 0, 0.9)])
    x, y = plot_runs.seed_curve(plot_runs.read_run(path), "success_rate", "stochastic")
    assert list(x) == [0, 500] and list(y) == [0.2, 0.9]


def test_folder_without_evaluations_is_skipped_with_a_warning(runs, tmp_path, capsys):
    empty = os.path.join(tmp_path, "hopper__pending__7__1795000002")
    os.makedirs(empty)  # e.g. an --eval-only --capture-video folder: videos only
    summary = plot_runs.main(plot_runs.Args(paths=[*runs, empty], out=str(tmp_path / "c.png")))
    err = capsys.readouterr().err
    assert "warning: " in err and "pending" in err and len(summary) == 4
    assert all(s["method"] != "pending" for s in summary)


def test_not_a_run_folder_is_one_line_and_exit_2(runs, tmp_path):
    other = tmp_path / "baselines_comparison"
    other.mkdir()
    for bad in (str(other), str(tmp_path / "missing")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_runs.py"), *runs[:2], bad,
                               "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        assert "not a run folder" in proc.stderr and not os.path.exists(tmp_path / "x.png")


def test_a_broken_eval_csv_names_its_line(tmp_path):
    path = _run(tmp_path, "avoid-m2", "x", 1, [(0, 0, "stochastic", 0, 0.2)])
    with open(os.path.join(path, "eval.csv"), "a") as f:
        f.write("1,500,stochastic,oops,1.0,0.5,10\n")
    with pytest.raises(plot_runs.PlotError, match="eval.csv line 3"):
        plot_runs.read_run(path)


def test_eval_csv_columns_are_the_ones_the_scripts_write():
    """The columns plot_runs reads are in EvalLog.FIELDS (a renamed column would silently break the plots)."""
    assert {"env_steps", "mode", "return_mean", "success_rate"} <= set(EvalLog.FIELDS)


@pytest.mark.parametrize("out, why", [("curves", "has no extension"), ("curves.pgn", "has the format .pgn"),
                                      (".", "has no extension")])
def test_a_bad_out_is_refused_before_any_run_is_read(out, why, tmp_path, monkeypatch):
    """--out without a format extension (matplotlib would write curves.png while the script printed `curves`), or with
    one matplotlib does not write, is one line before the run folders are read; a good name goes on to read them."""
    read = []
    monkeypatch.setattr(plot_runs, "read_run", lambda path: read.append(path))
    with pytest.raises(plot_runs.PlotError, match=why + ".*give a file name ending in one of .*[.]png"):
        plot_runs.main(plot_runs.Args(paths=[str(tmp_path / "run")], out=str(tmp_path / out) if out != "." else out))
    assert read == [] and os.listdir(tmp_path) == []
    with pytest.raises(plot_runs.PlotError, match="none of the run folders"):
        plot_runs.main(plot_runs.Args(paths=[str(tmp_path / "run")], out=str(tmp_path / "curves.svg")))
    assert read == [str(tmp_path / "run")]


def test_an_out_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "figs.png").mkdir()
    with pytest.raises(plot_runs.PlotError, match="is a folder"):
        plot_runs.main(plot_runs.Args(paths=["runs/x"], out=str(tmp_path / "figs.png")))
