"""Bad input to the data path and the tools, second round (issue 27): a paper dataset without its statistics and a
train.npz normalised already (never trained on as if raw), scripts/plot_runs.py on broken, binary, empty or missing
eval.csv files, the Minari hint of tasks Minari has no dataset for, a typo in MUJOCO_GL, and torchrun with a run
folder that cannot be made (every rank ends with the same one line).

Each refusal is one line naming the file or value to fix; nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_pretrain as pt
from common.envs import make_vec_env
from common.tasks import MUJOCO_GL_VALUES, check_mujoco_gl
from common.errors import DatasetError, TaskError, UsageError
from common.normalizer import Normalizer
from common.tasks import TASKS, get_task, missing_packages
from loaders import convert
from loaders.datasets import MINARI_DATASETS, load_task_dataset, looks_normalised, minari_fix, save_train_npz
from scripts import plot_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVOID = get_task("avoid-m2")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Datasets under tmp_path/data, no download (DPPO_OFFLINE), gdown never called, the cwd an empty folder."""
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))

    def no_listing(**kw):
        raise AssertionError("the Drive folder was listed")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download_folder=no_listing))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def raw_avoid_trajs(n: int = 3, length: int = 30, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Avoid-like demonstrations in env units (positions ~0.2..0.8, actions ±0.0125)."""
    rng = np.random.default_rng(seed)
    return [{"obs": rng.uniform([0.2, -0.3, 0.2, -0.3], [0.8, 0.5, 0.8, 0.5], (length, 4)).astype(np.float32),
             "actions": rng.uniform(-0.0125, 0.0125, (length, 2)).astype(np.float32)} for _ in range(n)]


def normalised(trajs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The reference's train.npz content: each dimension min-max normalised with the data's own statistics."""
    norm = Normalizer.from_trajectories(trajs)
    return [{"obs": norm.normalize_obs(t["obs"]), "actions": norm.normalize_action(t["actions"])} for t in trajs]


# ---- data provenance ----

@pytest.mark.parametrize("task_id, stats", [("avoid-m2", "normalization.npz"), ("one-leg-low", "normalization.pth")])
def test_a_cached_paper_dataset_without_its_statistics_is_refused(task_id, stats, offline):
    """`--dataset paper` with the reference's train.npz cached but its statistics gone: refused naming the file it needs
    (it used to be trained on as if raw), before anything is downloaded or written."""
    task = get_task(task_id)
    folder = Path(convert.paper_dir(task))
    rng = np.random.default_rng(0)
    save_train_npz(str(folder / "train.npz"), [{"obs": rng.uniform(-1, 1, (20, task.obs_dim)).astype(np.float32),
                                                 "actions": rng.uniform(-1, 1, (20, task.action_dim)).astype(np.float32)}])
    with pytest.raises(DatasetError) as e:
        load_task_dataset(task, "paper")
    msg = str(e.value)
    assert f"needs its statistics {folder / stats} beside it" in msg and "\n" not in msg
    assert sorted(os.listdir(folder)) == ["train.npz"]
    if task.suite == "avoid":  # the script: exit through runs.cli, no run folder
        with pytest.raises(DatasetError, match=stats):
            pt.main(pt.Args(env_id=task_id, dataset="paper", n_epochs=1, eval_every=0, cuda=False))
        assert os.listdir(".") == []


def test_a_train_npz_normalised_already_is_refused_without_its_statistics(offline):
    """A train.npz whose every observation and action dimension spans exactly [-1, 1] (the reference's layout) with no
    statistics beside it is refused, not normalised a second time; raw data, or the same file with its
    normalization.npz beside it, is read."""
    raw = raw_avoid_trajs()
    path = offline / "copied" / "train.npz"
    save_train_npz(str(path), normalised(raw))
    with pytest.raises(DatasetError) as e:
        load_task_dataset(AVOID, str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: every observation and action dimension spans exactly [-1, 1]") and "\n" not in msg
    assert "normalization.npz" in msg and "--dataset paper" in msg
    renamed = offline / "copied" / "avoid.npz"  # any name: it is the data that tells
    os.rename(path, renamed)
    with pytest.raises(DatasetError, match="normalised twice"):
        pt.main(pt.Args(env_id="avoid-m2", dataset=str(renamed), n_epochs=1, eval_every=0, cuda=False))
    assert os.listdir(".") == []
    # with its statistics beside it: back to env units, trained with those statistics
    os.rename(renamed, path)
    norm = Normalizer.from_trajectories(raw)
    np.savez(path.parent / "normalization.npz", **{k: v.numpy() for k, v in norm.state_dict().items()})
    trajs, used = load_task_dataset(AVOID, str(path))
    np.testing.assert_allclose(trajs[0]["obs"], raw[0]["obs"], atol=1e-5)
    # the raw demonstrations themselves
    save_train_npz(str(offline / "raw" / "train.npz"), raw)
    trajs, used = load_task_dataset(AVOID, str(offline / "raw" / "train.npz"))
    assert torch.equal(used.obs_min, norm.obs_min)


def test_the_rule_for_normalised_data():
    """`looks_normalised`: every dimension of both spans [-1, 1] (a constant one sits at -1, the reference's 1e-6 leaves a
    maximum just below 1); raw observations never do, raw actions often do (robomimic, D4RL: clipped to ±1)."""
    raw = raw_avoid_trajs()
    data = normalised(raw)
    assert looks_normalised(Normalizer.from_trajectories(data))  # Avoid actions span 0.025: the max is 1 - 8e-5
    for t in data:
        t["obs"][:, 1] = -1.0  # a dimension constant in the demonstrations
    assert looks_normalised(Normalizer.from_trajectories(data))
    assert not looks_normalised(Normalizer.from_trajectories(raw))
    actions_span = [{"obs": t["obs"], "actions": n["actions"]} for t, n in zip(raw, normalised(raw))]
    assert not looks_normalised(Normalizer.from_trajectories(actions_span))  # raw observations, ±1 actions
    obs_span = [{"obs": n["obs"], "actions": t["actions"]} for t, n in zip(raw, normalised(raw))]
    assert not looks_normalised(Normalizer.from_trajectories(obs_span))
    inside = [{"obs": t["obs"] * 0.9, "actions": t["actions"]} for t in normalised(raw)]  # within, not spanning
    assert not looks_normalised(Normalizer.from_trajectories(inside))
    constant = [{"obs": np.full_like(t["obs"], -1.0), "actions": t["actions"]} for t in normalised(raw)]
    assert not looks_normalised(Normalizer.from_trajectories(constant))


def test_the_shipped_avoid_demos_are_raw():
    for m in (1, 2, 3):
        _, norm = load_task_dataset(get_task(f"avoid-m{m}"))
        assert not looks_normalised(norm)


# ---- scripts/plot_runs.py ----

def _run_folder(root: Path, name: str = "avoid-m2__dppo_finetune__1__1795000000", csv_text: str | bytes | None = None
                ) -> Path:
    path = root / name
    path.mkdir()
    (path / "args.json").write_text('{"env_id": "avoid-m2", "exp_name": "dppo_finetune", "seed": 1}')
    if csv_text is not None:
        data = csv_text if isinstance(csv_text, bytes) else csv_text.encode()
        (path / "eval.csv").write_bytes(data)
    return path


HEADER = "iteration,env_steps,mode,return_mean,return_std,success_rate,n_episodes\n"
GOOD = HEADER + "0,0,stochastic,10.0,1.0,0.2,10\n1,500,stochastic,20.0,1.0,0.5,10\n"


@pytest.mark.parametrize("steps", ["nan", "inf", "-500", "12.5"])
def test_eval_csv_with_env_steps_that_are_not_a_count(steps, tmp_path):
    path = _run_folder(tmp_path, csv_text=GOOD + f"2,{steps},stochastic,30.0,1.0,0.7,10\n")
    with pytest.raises(plot_runs.PlotError) as e:
        plot_runs.main(plot_runs.Args(paths=[str(path)], out=str(tmp_path / "c.png")))
    assert str(e.value).startswith(f"{path / 'eval.csv'} line 4: env_steps is '{steps}', not a whole number >= 0")
    assert not (tmp_path / "c.png").exists()


def test_eval_csv_with_an_infinite_return_or_an_unknown_mode(tmp_path):
    path = _run_folder(tmp_path, csv_text=GOOD + "2,900,stochastic,inf,1.0,0.7,10\n")
    with pytest.raises(plot_runs.PlotError, match="line 4: return_mean and success_rate must be finite"):
        plot_runs.read_run(str(path))
    (path / "eval.csv").write_text(GOOD + "2,900,greedy,1.0,1.0,0.7,10\n")
    with pytest.raises(plot_runs.PlotError, match="line 4: mode is 'greedy'"):
        plot_runs.read_run(str(path))


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"PK\x03\x04\x00\x00binary\x00zip",
                                     "iteration,env_steps\x00,mode\n".encode()])
def test_a_binary_file_as_eval_csv(content, tmp_path):
    path = _run_folder(tmp_path, csv_text=content)
    with pytest.raises(plot_runs.PlotError) as e:
        plot_runs.read_run(str(path))
    assert str(e.value).startswith(f"{path / 'eval.csv'}: not a text file") and "\n" not in str(e.value)


def test_a_folder_as_eval_csv(tmp_path):
    path = _run_folder(tmp_path)
    (path / "eval.csv").mkdir()
    with pytest.raises(plot_runs.PlotError, match="eval.csv is a folder"):
        plot_runs.read_run(str(path))


def test_runs_without_evaluations_name_their_file(tmp_path, capsys):
    """No eval.csv, an empty one (0 bytes) or its header only: alone, one line naming the file; beside a run with
    evaluations, a warning naming the file and the others are plotted."""
    missing = _run_folder(tmp_path, "avoid-m2__a__1__1795000000")
    empty = _run_folder(tmp_path, "avoid-m2__b__1__1795000000", csv_text="")
    header = _run_folder(tmp_path, "avoid-m2__c__1__1795000000", csv_text=HEADER)
    for path, why in ((missing, "does not exist"), (empty, "is empty (0 bytes"), (header, "has its header but no")):
        with pytest.raises(plot_runs.PlotError) as e:
            plot_runs.main(plot_runs.Args(paths=[str(path)], out=str(tmp_path / "c.png")))
        assert str(e.value).startswith(f"none of the run folders has evaluations: {path / 'eval.csv'} {why}")
    with pytest.raises(plot_runs.PlotError, match=r"\(and 2 more folders without evaluations\)"):
        plot_runs.main(plot_runs.Args(paths=[str(missing), str(empty), str(header)], out=str(tmp_path / "c.png")))
    assert not (tmp_path / "c.png").exists()
    good = _run_folder(tmp_path, "avoid-m2__d__1__1795000000", csv_text=GOOD)
    capsys.readouterr()
    summary = plot_runs.main(plot_runs.Args(paths=[str(good), str(empty)], out=str(tmp_path / "c.png")))
    assert [s["method"] for s in summary] == ["dppo_finetune"] and (tmp_path / "c.png").exists()
    assert f"warning: {empty / 'eval.csv'} is empty" in capsys.readouterr().err


def test_plot_runs_command_line_is_one_line_naming_the_file(tmp_path):
    """Through the command: exit 2 and one line, for a NaN env step, a binary eval.csv and a run without eval.csv."""
    cases = {"nan": _run_folder(tmp_path, "avoid-m2__nan__1__1795000000", GOOD + "2,nan,stochastic,1,1,0.5,10\n"),
             "binary": _run_folder(tmp_path, "avoid-m2__bin__1__1795000000", b"\x00\x01\x02\xff" * 64),
             "missing": _run_folder(tmp_path, "avoid-m2__none__1__1795000000")}
    procs = {k: subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "plot_runs.py"), str(p), "--out",
                                  str(tmp_path / f"{k}.png")], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
             for k, p in cases.items()}
    for k, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert str(cases[k] / "eval.csv") in err and not (tmp_path / f"{k}.png").exists()


# ---- hints name things that exist ----

def test_minari_hints_name_real_datasets_or_the_tasks_own_data():
    """Minari's `mujoco` namespace holds the gym tasks' datasets, its `D4RL/kitchen` the kitchen tasks'; Avoid's
    demonstrations are the project's own (built in, written by scripts/generate_avoid_demos.py), and no other task has a
    Minari dataset."""
    for task in TASKS.values():
        fix = minari_fix(task.env_name)
        if task.suite == "gym":
            assert f"minari:mujoco/{task.id}/medium-v0" in fix
        elif task.suite == "kitchen":
            assert "minari:D4RL/kitchen/<complete|partial|mixed>-v2" in fix and task.data.startswith("minari:D4RL/kitchen/")
        else:
            assert "minari:" not in fix and "Minari has no" in fix
    assert "scripts/generate_avoid_demos.py" in minari_fix("avoid") and os.path.exists(
        os.path.join(ROOT, "scripts", "generate_avoid_demos.py"))
    assert set(MINARI_DATASETS.values()) == {f"mujoco/{t}/medium-v0" for t in ("hopper", "walker2d", "halfcheetah")}


def test_a_minari_dataset_given_for_avoid_points_to_the_built_in_demos(tmp_path, monkeypatch):
    pytest.importorskip("minari")
    from tests.test_minari import write_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    rng = np.random.default_rng(0)
    walker = [{"observations": rng.normal(size=(6, 17)), "actions": rng.uniform(-1, 1, (5, 6)).astype(np.float32),
               "rewards": np.ones(5), "terminations": np.zeros(5, bool), "truncations": np.eye(5, dtype=bool)[-1]}]
    write_minari("test/walker2d/tiny-v0", walker, "Walker2d-v5")
    with pytest.raises(DatasetError) as e:
        load_task_dataset(AVOID, "minari:test/walker2d/tiny-v0")
    msg = str(e.value)
    assert "Minari has no D3IL Avoid dataset" in msg and "generate_avoid_demos.py" in msg and "mujoco/avoid" not in msg
    with pytest.raises(DatasetError, match="e.g. minari:mujoco/hopper/medium-v0"):
        load_task_dataset(get_task("hopper"), "minari:test/walker2d/tiny-v0")


# ---- MUJOCO_GL ----

def test_a_typo_in_mujoco_gl_is_one_line_naming_the_allowed_values(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "eggl")
    hopper = get_task("hopper")
    for call in (lambda: make_vec_env(hopper, 1, backend="gymnasium"), lambda: check_mujoco_gl(get_task("lift-img"))):
        with pytest.raises(TaskError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith("MUJOCO_GL='eggl' is not a MuJoCo rendering backend") and "\n" not in msg
        assert all(f"MUJOCO_GL={v}" in msg or f" {v} " in msg for v in ("egl", "osmesa", "glfw"))
    from sims import robomimic  # pixel envs are made here, not through common.envs (robosuite would use egl)
    assert robomimic.check_mujoco_gl is check_mujoco_gl  # the one list and check, shared
    with pytest.raises(TaskError, match="MUJOCO_GL='eggl' is not a MuJoCo rendering backend"):
        robomimic.env_args("lift")
    if not missing_packages(get_task("lift-img")):
        with pytest.raises(TaskError, match="MUJOCO_GL='eggl'"):
            robomimic.PixelChunkVecEnv("lift-img", 1)
    make_vec_env(AVOID, 1).reset(seed=0)  # Avoid renders without MuJoCo: the variable does not matter
    for value in ("egl", "OSMesa", " glfw", "0", ""):  # what MuJoCo itself accepts (case and spaces ignored)
        monkeypatch.setenv("MUJOCO_GL", value)
        check_mujoco_gl(hopper)
    assert {"egl", "osmesa", "glfw"} <= set(MUJOCO_GL_VALUES)


# ---- torchrun ----

def test_torchrun_with_a_run_folder_that_cannot_be_made_ends_every_rank_in_one_line(tmp_path):
    """Only rank 0 opens the run folder; its failure reaches rank 1, so both end with the same line (rank 1 used to die
    with gloo's "Connection closed by peer" traceback). `runs` is a file here, so the folder cannot be made."""
    (tmp_path / "runs").write_text("not a folder")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "dppo_pretrain.py"), "--env-id", "avoid-m2", "--n-epochs", "1", "--batch-size", "256",
           "--mlp-dims", "32", "32", "--eval-every", "0", "--no-cuda"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]
    assert "'runs' is a file" in lines[0]
    assert "[rank1]" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_all_ranks_fail_together_in_one_process():
    """world 1: the block's error is raised unchanged, and a block that succeeds does nothing."""
    with pytest.raises(UsageError, match="boom"):
        with pt.all_ranks_fail_together(1):
            raise UsageError("boom")
    with pt.all_ranks_fail_together(1):
        pass
