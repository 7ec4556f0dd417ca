"""Bad input files, third round (issue 27): for every file a script or tool reads, a truncated, a wrong-kind and a
wrong-shape version; for every tool, an empty, a wrong-typed and an unwritable input. Each ends in one line naming the
file (exit code 2 through `common.runs.cli`, non-zero for the argparse/tyro tools) and changes nothing.

Inventory: every file a script or tool reads, and where each kind of bad version is tested. Legend: F this file;
B test_bad_input.py, D ..._data, C ..._checkpoints, T ..._tools, R ..._resume, S ..._scripts, L ..._flags; P test_plot_runs,
M test_minari, X test_convert, Y test_deploy_franka, Z test_pixel, Q test_baselines_comparison.

file (read by)                          truncated                wrong kind                      wrong shape
--------------------------------------  -----------------------  ------------------------------  -------------------------
pre-training checkpoint.pt: diffusion,  F half/text/.npz/folder  B gaussian<->diffusion,         B other task, other arch
  gaussian, gmm (runs.load_checkpoint:    for every policy kind;   gmm<-gaussian, DPPO-ft to     F statistics of another
  fine-tuning scripts, collect_dataset,   B empty, pickle          baselines; C/X reference      task's dims (was a torch
  deploy_franka, --eval-only)                                      file, 0 steps                 traceback mid-run)
pixel checkpoint.pt (..._pixel.py)      F (same load)            Z state ckpt to pixel script;   B other task
                                                                   B pixel task to state scripts
fine-tuning run checkpoint (--resume)   F half file in a run     B DPPO run to baselines,        B other arch
                                          (load_resume)            pre-training run; F baseline
                                                                   run to dppo_finetune.py and
                                                                   dppo_pretrain.py, pixel args
pre-training run (dppo_pretrain.py      F                        B fine-tuning, gaussian run     B other arch
  --resume)
deploy_franka.py --checkpoint           F through runs.cli       S reference file, `paper`       Y action 7 (lift)
object poses JSON (file:)               F empty, cut             F binary                        F, Y count of poses
AprilTag calibration JSON               F cut (was traceback)    F binary (was traceback)        F keys, 4x4 (was traceback)
train.npz, D3IL Avoid npz               D cut, CRC, empty, html  D pickle, .npy, folder;         D lengths/rows; F actions
                                                                   F a .pt renamed .npz          of another width/task
normalization.npz/.pth beside train.npz F cut                    F train.npz or text in its      T/X dims; F NaN, swapped
                                                                   place                         (were used silently)
robomimic / D4RL hdf5                   D cut, empty, html       D other layout; F robomimic     F Can for Lift, D4RL for
                                                                   for hopper                    Lift
Minari dataset (minari:ID)              M unreadable             T Avoid hint                    M other task
eval.csv (plot_runs.py; resume)         T empty/header; R row    T binary, folder                P column; T NaN steps
args.json (plot_runs.py; resume)        P not JSON; resume keeps -                               -
                                          it, records resumes
probe.json, <task>__<method>.json       F (were tracebacks)      F binary                        F keys, rows, 3 numbers
  (baselines_comparison.py)
record_numbers.py --compare record      F checkpoint             F binary eval.csv               -
avoid_comparison.py reused <env>_<m>.pt F                        F gaussian as dppo              -
loaders.convert checkpoint/statistics   F empty, X               F folder, DPPO ckpt, .pt stats  X, C

tool                        empty                     wrong-typed                   unwritable output
--------------------------  ------------------------  ----------------------------  -----------------------------------
loaders.convert             F empty file              F folder as checkpoint        C full disk; F under a file
collect_dataset.py          B empty .pt               B folder as --out             B under a file
generate_avoid_demos.py     F --subsets (no value)    F --n-demos abc               F --out-dir under / is a file
robomimic_demos.py          F --task ''               F --n-demos abc, --out folder F --out under a file
plot_runs.py                P no paths                T binary eval.csv             F --out under a file, read-only dir
baselines_comparison.py     Q no task/method          F binary json                 F --out a file / under a file
avoid_comparison.py         F no subset/method        F unknown method (ran a GMM)  F --out a file / under a file
record_numbers.py           F --only (ran all)        F binary eval.csv             F --out a file / under a file
deploy_franka.py            F empty poses file        F binary calibration          Y --log exists / under a file
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro

import deploy_franka as deploy
import dppo_finetune as ft
import dppo_pretrain as pt
from common import runs
from common.errors import DatasetError, UsageError
from common.normalizer import Normalizer
from common.tasks import get_task
from hardware.robot import FilePoseSource, RobotError
from loaders import convert
from loaders.datasets import load_task_dataset, load_task_trajectories, save_train_npz
from loaders.files import read_normalization
from scripts import avoid_comparison, baselines_comparison as bc, generate_avoid_demos, plot_runs, record_numbers
from tests.test_convert import write_reference
from tests.test_deploy_franka import fake_args, reach_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "checkpoints" / "avoid-m2_diffusion.pt"
AVOID = get_task("avoid-m2")
FT = dict(env_id="avoid-m2", n_train_itr=1, num_envs=2, n_steps=5, val_freq=0, plot=False, seed=0,
          n_critic_warmup_itr=0)


def snapshot(folder) -> dict:
    """Every path under `folder`, files by their bytes."""
    out = {}
    for path, dirs, files in os.walk(folder):
        out[path] = "folder"
        for name in files:
            with open(os.path.join(path, name), "rb") as fh:
                out[os.path.join(path, name)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def one_line(call, error=DatasetError, *needles: str) -> str:
    """The message of `call()`, which raises `error` on one line containing every needle."""
    with pytest.raises(error) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def through_cli(main, args, monkeypatch, capsys, folder) -> str:
    """`main(args)` through `runs.cli` in `folder`: exit 2, one `error:` line, `folder` unchanged; returns the line."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    before = snapshot(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(main, type(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert snapshot(folder) == before
    return err[0]


def variant(path: Path, change) -> str:
    ckpt = torch.load(BUILTIN, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture
def broken(tmp_path) -> dict[str, str]:
    """The built-in checkpoint cut in half, a text file, an .npz and a folder, each where a checkpoint is expected."""
    raw = BUILTIN.read_bytes()
    (tmp_path / "half.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.pt").write_text("policy: diffusion\nweights: see the paper\n")
    with open(tmp_path / "npz.pt", "wb") as f:
        np.savez(f, states=np.zeros((3, 4)), actions=np.zeros((3, 2)), traj_lengths=np.array([3]))
    (tmp_path / "run").mkdir()
    shutil.copy(BUILTIN, tmp_path / "run" / "checkpoint.pt")
    return {k: str(tmp_path / n) for k, n in (("half", "half.pt"), ("text", "text.pt"), ("npz", "npz.pt"),
                                                ("folder", "run"))}


# ---------------------------------------------------------------- checkpoints: truncated, wrong kind, wrong shape

@pytest.mark.parametrize("policy", ["diffusion", "gaussian", "gmm", None])  # the scripts' calls; None: deploy_franka.py
def test_a_truncated_text_npz_or_folder_checkpoint_is_one_line(policy, broken):
    for kind in ("half", "text", "npz"):
        one_line(lambda: runs.load_checkpoint(broken[kind], policy, "hint"), DatasetError,
                 f"checkpoint {broken[kind]!r} is not a readable DPPO checkpoint")
    # a run folder given for its checkpoint was "not found": it names the file inside
    one_line(lambda: runs.load_checkpoint(broken["folder"], policy, "hint"), DatasetError, "is a folder",
             os.path.join(broken["folder"], "checkpoint.pt"))


def test_a_truncated_checkpoint_in_a_run_folder_is_one_line_on_resume(broken, tmp_path):
    shutil.copy(broken["half"], tmp_path / "run" / "checkpoint.pt")
    one_line(lambda: runs.load_resume(str(tmp_path / "run"), "diffusion", "hint"), DatasetError, "not a readable")
    with pytest.raises(DatasetError, match="not a readable"):
        pt.main(pt.Args(resume=str(tmp_path / "run")))


def test_finetuning_from_a_run_folder_instead_of_its_checkpoint_is_one_line(broken, tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    line = through_cli(ft.main, ft.Args(checkpoint=broken["folder"], **FT), monkeypatch, capsys, tmp_path / "work")
    assert "is a folder; give the checkpoint file inside it" in line


def _baseline_run(folder: Path, method: str = "drwr") -> str:
    """A run folder whose checkpoint is a diffusion RL baseline's (it saves `method` and one `actor`)."""
    folder.mkdir()

    def change(c):
        c.update(itr=2, env_steps=100, method=method, actor=c.pop("ema"), optimizers={}, schedulers={}, rng={},
                 args={"env_id": "avoid-m2"})
    variant(folder / "checkpoint.pt", change)
    return str(folder)


def test_a_baseline_run_given_to_the_ppo_or_pretraining_script_names_its_own_script(tmp_path, monkeypatch, capsys):
    """dppo_finetune.py --resume of a DRWR run said "not a fine-tuning checkpoint of this version (it lacks base,
    actor_ft, ...)", and dppo_pretrain.py --resume named dppo_finetune.py; both name drwr.py now."""
    run = _baseline_run(tmp_path / "drwr_run")
    (tmp_path / "work").mkdir()
    before = snapshot(run)
    line = through_cli(ft.main, ft.Args(resume=run), monkeypatch, capsys, tmp_path / "work")
    assert line == f"error: --resume {run} is a run of drwr.py, not of dppo_finetune.py; resume it with drwr.py"
    line = through_cli(pt.main, pt.Args(resume=run), monkeypatch, capsys, tmp_path / "work")
    assert "not a pre-training run's checkpoint" in line and line.endswith("resume it with drwr.py")
    assert snapshot(run) == before


def test_a_run_of_another_script_whose_arguments_do_not_fit_names_the_run_folder():
    """E.g. a pixel run (its backbone, cameras...) given to dppo_finetune.py: the unknown fields and the folder."""
    msg = one_line(lambda: runs.resume_args(ft.Args(), {"env_id": "lift-img", "img_cond_steps": 1}, "runs/pixel_run"),
                   DatasetError, "--resume runs/pixel_run: ", "img_cond_steps", "is it a run of another script?")
    assert msg.count("--resume") == 1


@pytest.mark.parametrize("group, dims", [("obs", 11), ("action", 3)])
def test_statistics_of_another_tasks_dimensions_are_refused_at_load(group, dims, tmp_path, monkeypatch, capsys):
    """A header for Avoid (obs 4, action 2) with the statistics of another task: the fine-tuning run used to open its
    run folder and die in the first rollout with torch's "size of tensor a (4) must match ... (11)"."""
    def change(c):
        c["normalization"][f"{group}_min"], c["normalization"][f"{group}_max"] = torch.zeros(dims), torch.ones(dims)
    path = variant(tmp_path / "other_stats.pt", change)
    one_line(lambda: runs.load_checkpoint(path, "diffusion", "hint", AVOID), DatasetError,
             f"normalisation statistics {group}_min and {group}_max have {dims} values, but its {group}_dim is "
             f"{AVOID.obs_dim if group == 'obs' else AVOID.action_dim}")
    (tmp_path / "work").mkdir()
    through_cli(ft.main, ft.Args(checkpoint=path, **FT), monkeypatch, capsys, tmp_path / "work")
    assert not (tmp_path / "work" / "runs").exists()


def test_deploy_with_a_truncated_checkpoint_is_one_line_and_moves_nothing(broken, tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    args = deploy.Args(checkpoint=broken["half"], robot="fake", yes=True, log=str(tmp_path / "work" / "e.jsonl"))
    assert "not a readable DPPO checkpoint" in through_cli(deploy.main, args, monkeypatch, capsys, tmp_path / "work")


# ---------------------------------------------------------------- the robot's files

@pytest.mark.parametrize("content, why", [("", "Expecting value"), ("[[0.5, 0.1, 0.0", "Expecting ','"),
                                          (b"\x89PNG\r\n\x1a\n\xff", "codec"), ("[[1, 2, 3]]", "expected 1 finite"),
                                          ('{"x": 1}', '7 numbers (x y z qx qy qz qw), got {"x": 1}'),
                                          ('[[1, 2], [3]]', "got [[1, 2], [3]]")])
def test_an_object_poses_file_empty_truncated_binary_or_of_another_shape_is_one_line(content, why, tmp_path):
    """A JSON object or a ragged list was a TypeError / ValueError traceback out of numpy."""
    path = tmp_path / "poses.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(lambda: FilePoseSource(str(path), 1), RobotError, str(path), why)


@pytest.mark.parametrize("content, why", [
    ('{"intrinsics": [600, 600', "JSONDecodeError"), (b"\xff\xfe\x00binary", "UnicodeDecodeError"),
    ('{"intrinsics": [600, 600, 320, 240]}', "KeyError: 'tag_size'"),
    ('{"intrinsics": [600, 600], "tag_size": 0.02, "base_T_camera": [[1, 0], [0, 1]], "objects": []}',
     "intrinsics must be 4 numbers"),
    ('{"intrinsics": "fx", "tag_size": 0.02, "base_T_camera": [], "objects": []}', "ValueError")])
def test_an_apriltag_calibration_truncated_binary_or_of_another_layout_is_one_line(content, why, tmp_path):
    """It was a raw json / KeyError traceback from inside the pose source."""
    pytest.importorskip("pupil_apriltags")
    pytest.importorskip("cv2")
    from hardware.robot import AprilTagPoseSource
    path = tmp_path / "cal.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(lambda: AprilTagPoseSource(str(path), 1), UsageError, f"--object-poses apriltag:{path}", why)


# ---------------------------------------------------------------- datasets and their statistics

def _normalised_pair(folder: Path, change=None) -> str:
    """A reference-layout train.npz (normalised) with its normalization.npz (changed by `change`) beside it."""
    rng = np.random.default_rng(0)
    raw = [{"obs": rng.uniform(0, 1, (20, 4)).astype(np.float32),
            "actions": rng.uniform(-0.01, 0.01, (20, 2)).astype(np.float32)} for _ in range(3)]
    norm = Normalizer.from_trajectories(raw)
    folder.mkdir()
    save_train_npz(str(folder / "train.npz"), [{"obs": norm.normalize_obs(t["obs"]),
                                                 "actions": norm.normalize_action(t["actions"])} for t in raw])
    stats = {k: v.numpy().copy() for k, v in norm.state_dict().items()}
    if change:
        change(stats)
    np.savez(folder / "normalization.npz", **stats)
    return str(folder / "train.npz")


def _swap(s):
    s["obs_min"], s["obs_max"] = s["obs_max"].copy(), s["obs_min"].copy()


@pytest.mark.parametrize("change, why", [(lambda s: s["obs_max"].__setitem__(1, np.nan), "obs_max is nan in dimension 1"),
                                         (_swap, "obs_min > obs_max in dimension 0")])
def test_statistics_beside_a_train_npz_that_are_nan_or_swapped_are_refused(change, why, tmp_path):
    """They were used to map the data back to env units: NaN data, or every observation mirrored, with no word."""
    path = _normalised_pair(tmp_path / "d", change)
    one_line(lambda: load_task_dataset(AVOID, path), DatasetError, str(tmp_path / "d" / "normalization.npz"), why)
    torch.save({f"stats.{g}.{m}": torch.tensor([1.0, 0.0]) if m == "min" else torch.tensor([0.0, 1.0])
                for g in ("observations", "actions") for m in ("min", "max")}, tmp_path / "normalization.pth")
    one_line(lambda: read_normalization(str(tmp_path / "normalization.pth")), DatasetError,
             "normalization.pth: normalisation statistic obs_min > obs_max in dimension 0")


@pytest.mark.parametrize("kind, why", [("half", "truncated or corrupt .npz"), ("train", "missing key 'obs_min'"),
                                       ("text", "not an .npz archive but a file that starts with")])
def test_statistics_beside_a_train_npz_truncated_or_of_another_kind_are_one_line(kind, why, tmp_path):
    path = _normalised_pair(tmp_path / "d")
    stats = tmp_path / "d" / "normalization.npz"
    if kind == "half":
        stats.write_bytes(stats.read_bytes()[:stats.stat().st_size // 2])
    elif kind == "train":
        shutil.copy(path, stats)
    else:
        stats.write_text("obs_min,obs_max\n0,1\n")
    one_line(lambda: load_task_dataset(AVOID, path), DatasetError, str(stats), why)


def test_a_checkpoint_given_as_a_dataset_is_named_a_checkpoint(tmp_path):
    shutil.copy(BUILTIN, tmp_path / "data.npz")  # torch.save's format is a zip archive, as an .npz
    one_line(lambda: load_task_trajectories(AVOID, str(tmp_path / "data.npz")), DatasetError,
             "a PyTorch checkpoint (torch.save), not a dataset")
    one_line(lambda: load_task_trajectories(AVOID, str(BUILTIN)), DatasetError, "unknown dataset format")


def test_datasets_of_another_width_or_task_are_one_line(tmp_path):
    """A train.npz whose actions have another width or of another task; a robomimic file of another task (Can for
    Lift: 14 object dims, not 10), or given to a gym task; a D4RL file given to a robomimic task."""
    save_train_npz(str(tmp_path / "wide.npz"), [{"obs": np.zeros((20, 4), np.float32),
                                                  "actions": np.zeros((20, 3), np.float32)}])
    one_line(lambda: load_task_trajectories(AVOID, str(tmp_path / "wide.npz")), DatasetError,
             "'actions' has shape (20, 3), expected (20, 2)")
    save_train_npz(str(tmp_path / "hopper.npz"), [{"obs": np.zeros((9, 11), np.float32),
                                                    "actions": np.zeros((9, 3), np.float32)}])
    one_line(lambda: load_task_trajectories(AVOID, str(tmp_path / "hopper.npz")), DatasetError,
             "'states' has shape (9, 11), expected (9, 4)")
    with h5py.File(tmp_path / "can.hdf5", "w") as f:
        f["data/demo_0/actions"] = np.zeros((4, 7))
        for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 14)):
            f[f"data/demo_0/obs/{key}"] = np.zeros((4, dim))
    one_line(lambda: load_task_trajectories(get_task("lift"), str(tmp_path / "can.hdf5")), DatasetError,
             "has shape (4, 23), expected (4, 19) for task 'lift'")
    one_line(lambda: load_task_trajectories(get_task("hopper"), str(tmp_path / "can.hdf5")), DatasetError,
             "is a robomimic dataset but task 'hopper' is not a robomimic task")
    with h5py.File(tmp_path / "hopper.hdf5", "w") as f:
        for key, value in (("observations", np.zeros((6, 11))), ("actions", np.zeros((6, 3))), ("rewards", np.ones(6)),
                           ("terminals", np.eye(6, dtype=bool)[2])):
            f[key] = value
    one_line(lambda: load_task_trajectories(get_task("lift"), str(tmp_path / "hopper.hdf5")), DatasetError,
             "'observations' has shape (6, 11), expected (N, 19)")


# ---------------------------------------------------------------- the converter

def test_the_converter_given_a_folder_an_empty_file_or_its_own_output(tmp_path, capsys):
    ref = write_reference(tmp_path, "square_mlp")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "stats").mkdir()
    cases = [([str(tmp_path / "square_mlp")], "is a folder; give the reference's checkpoint file"),
             ([str(tmp_path / "empty.pt")], "is not a readable checkpoint"),
             ([str(BUILTIN)], "is not a checkpoint of irom-princeton/dppo"),  # this project's format already
             ([str(ref), "--normalization", str(tmp_path / "stats")], "is a folder, not a dataset file"),
             ([str(ref), "--normalization", str(ref)], "expected the reference's LinearNormalizer state dict"),
             ([str(ref), "--output", str(tmp_path / "empty.pt" / "x.pt")], "cannot write under")]
    before = snapshot(tmp_path)
    for argv, why in cases:
        capsys.readouterr()
        assert convert.main([*argv, "--env-id", "square", *([] if "--output" in argv else
                                                            ["--output", str(tmp_path / "out.pt")])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the tools

def test_plot_runs_refuses_an_out_it_cannot_write_before_reading_any_run(tmp_path, monkeypatch):
    """--out under a regular file was an OSError after every run had been read (and named "Not a directory")."""
    read = []
    monkeypatch.setattr(plot_runs, "read_run", lambda path: read.append(path))
    (tmp_path / "file").write_text("x")
    one_line(lambda: plot_runs.main(plot_runs.Args(paths=["runs/x"], out=str(tmp_path / "file" / "c.png"))),
             plot_runs.PlotError, "cannot write under", str(tmp_path / "file"))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        try:
            one_line(lambda: plot_runs.main(plot_runs.Args(paths=["runs/x"], out=str(tmp_path / "ro" / "c.png"))),
                     plot_runs.PlotError, "cannot write under")
        finally:
            os.chmod(tmp_path / "ro", 0o755)
    assert read == []


@pytest.mark.parametrize("kw, why", [(dict(methods=["foo"]), "unknown method 'foo'; valid: dppo, gaussian, gmm"),
                                     (dict(subsets=["m2"]), "unknown subset 'm2'; valid: M1, M2, M3"),
                                     (dict(subsets=[]), "no subset given"), (dict(methods=[]), "no method given"),
                                     (dict(out="file"), "--out file is a file; give a folder"),
                                     (dict(out="file/cmp"), "cannot write under")])
def test_avoid_comparison_refuses_before_any_run(kw, why, tmp_path, monkeypatch, capsys):
    """An unknown method pre-trained a GMM for minutes, then died on a KeyError; no subset was a matplotlib
    traceback; --out a file an errno line."""
    (tmp_path / "file").write_text("x")
    args = avoid_comparison.Args(**{"out": "cmp", "subsets": ["M2"], "methods": ["dppo"], **kw})
    assert why in through_cli(avoid_comparison.main, args, monkeypatch, capsys, tmp_path)


@pytest.mark.parametrize("kind, why", [("half", "not a readable DPPO checkpoint"),
                                       ("gaussian", "holds a gaussian policy, not a diffusion one")])
def test_avoid_comparison_with_a_broken_checkpoint_in_its_folder_is_one_line(kind, why, tmp_path, monkeypatch, capsys):
    """The comparison reuses <env>_<method>.pt from --out: a truncated one or one of another kind is refused before
    a run folder is made."""
    (tmp_path / "cmp").mkdir()
    path = tmp_path / "cmp" / "avoid-m2_dppo.pt"
    if kind == "half":
        path.write_bytes(BUILTIN.read_bytes()[:1000])
    else:
        variant(path, lambda c: c.update(policy="gaussian"))
    args = avoid_comparison.Args(out="cmp", subsets=["M2"], methods=["dppo"], n_train_itr=2)
    assert why in through_cli(avoid_comparison.main, args, monkeypatch, capsys, tmp_path)


def _bc_result(**change) -> str:
    rows = [{"iteration": 0, "env_steps": 0, "mode": "stochastic", "return_mean": 1.0, "return_std": 0.0,
             "success_rate": 0.5, "n_episodes": 2}]
    return json.dumps({"task": "avoid-m2", "method": "drwr", "run_dir": "runs/x", "history": [{"iteration": 0}],
                       "eval_rows": rows, **change})


@pytest.mark.parametrize("name, content, why", [
    ("avoid-m2__drwr.json", _bc_result()[:40], "(JSONDecodeError)"),
    ("avoid-m2__drwr.json", b"\x89PNG\r\n\x1a\n\x00\xff", "(UnicodeDecodeError)"),
    ("avoid-m2__drwr.json", _bc_result(eval_rows=None), "with stochastic rows"),
    ("avoid-m2__drwr.json", _bc_result(eval_rows=[{"mode": "greedy"}]), "with stochastic rows"),
    ("avoid-m2__drwr.json", json.dumps({"task": "avoid-m2"}), "(KeyError)"),
    ("avoid-m2__drwr.json", _bc_result(eval_rows=[]), "with stochastic rows"),
    ("probe.json", '{"avoid-m2": {"drwr": [0.1, 0.2', "(JSONDecodeError)"),
    ("probe.json", "[1, 2]", "{task: {method: [rollout, warm-up update, update]}}"),
    ("probe.json", '{"avoid-m2": {"drwr": [0.1, 0.2]}}', "{task: {method: [rollout, warm-up update, update]}}")])
def test_baselines_comparison_files_truncated_binary_or_of_another_layout_are_one_line(name, content, why, tmp_path,
                                                                                        monkeypatch, capsys):
    """--report-only on a result json and --dry-run / --report-only on probe.json were json, Unicode, Key or Attribute
    error tracebacks."""
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    mode = dict(report_only=True) if name != "probe.json" else dict(dry_run=True)
    args = bc.Args(out=str(tmp_path / "cmp"), tasks=["avoid-m2"], methods=["drwr"], **mode)
    line = through_cli(bc.main, args, monkeypatch, capsys, tmp_path)
    assert line.startswith(f"error: {tmp_path / 'cmp' / name}: not a file of this harness") and why in line, line


@pytest.mark.parametrize("out, why", [("file", "is a file; give a folder"), ("file/cmp", "cannot write under")])
def test_baselines_comparison_refuses_an_out_it_cannot_write(out, why, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    args = bc.Args(out=str(tmp_path / out), tasks=["avoid-m2"], methods=["drwr"], report_only=True)
    assert why in through_cli(bc.main, args, monkeypatch, capsys, tmp_path)


@pytest.mark.parametrize("argv, why", [(["--subsets"], "argument --subsets: expected at least one argument"),
                                       (["--n-demos", "abc"], "invalid int value: 'abc'"),
                                       (["--out-dir", "{file}/x"], "--out-dir {file}/x/avoid-m2.npz: cannot write under"),
                                       (["--out-dir", "{file}"], "cannot write under {file}")])
def test_avoid_demo_tool_refuses_empty_mistyped_or_unwritable_input_in_one_line(argv, why, tmp_path, capsys):
    """A --out-dir under a file or that is a file was a NotADirectory / FileExists traceback after the demos were
    drawn; argparse's refusals were its usage block and a line."""
    file = tmp_path / "file"
    file.write_text("x")
    argv = [a.replace("{file}", str(file)) for a in argv]
    try:
        code = generate_avoid_demos.main(["--subsets", "M2", "--n-demos", "2", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and why.replace("{file}", str(file)) in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["file"] and file.read_text() == "x"


def test_robomimic_demo_tool_refuses_an_unwritable_or_mistyped_out_before_any_rollout(tmp_path, capsys, monkeypatch):
    pytest.importorskip("robosuite")
    from scripts import robomimic_demos
    monkeypatch.setattr(robomimic_demos, "generate_demos", lambda *a, **kw: pytest.fail("rollouts started"))
    (tmp_path / "file").write_text("x")
    for out, why in ((tmp_path, "is a folder"), (tmp_path / "file" / "d.hdf5", "cannot write under")):
        capsys.readouterr()
        assert robomimic_demos.main(["--task", "lift", "--out", str(out)]) == 2
        assert why in capsys.readouterr().err.strip().splitlines()[-1]
    assert robomimic_demos.main(["--task", "", "--out", str(tmp_path / "d.hdf5")]) == 2  # an empty task id
    assert "unknown task ''" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        robomimic_demos.main(["--task", "lift", "--n-demos", "abc"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_record_numbers_refuses_bad_input_before_minutes_of_runs(tmp_path, monkeypatch):
    """--only with no entry ran every entry; --out under a file failed after the first entry's runs; a truncated
    checkpoint or a binary eval.csv of the --compare record was a traceback after all of them."""
    monkeypatch.setattr(record_numbers, "run_entry", lambda *a: pytest.fail("an entry was run"))
    (tmp_path / "file").write_text("x")
    record = tmp_path / "before" / "drwr"
    record.mkdir(parents=True)
    (record / "checkpoint.pt").write_bytes(BUILTIN.read_bytes()[:500])
    cases = [(dict(only=[]), "--only names no entry"), (dict(out=str(tmp_path / "file")), "is a file; give a folder"),
             (dict(out=str(tmp_path / "file" / "x")), "cannot write under"),
             (dict(compare=str(tmp_path / "before")), f"{record / 'checkpoint.pt'}: not a readable checkpoint")]
    for kw, why in cases:
        with pytest.raises(SystemExit) as e:
            record_numbers.main(record_numbers.Args(**{"out": str(tmp_path / "after"), "only": ["drwr"], **kw}))
        assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and why in e.value.code, e.value.code
        assert "\n" not in e.value.code
    shutil.copy(BUILTIN, record / "checkpoint.pt")
    (record / "eval.csv").write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(SystemExit, match="eval.csv: not an eval.csv of a record"):
        record_numbers.main(record_numbers.Args(out=str(tmp_path / "after"), only=["drwr"], compare=str(tmp_path / "before")))
    assert sorted(os.listdir(tmp_path)) == ["before", "file"]


def test_record_numbers_compares_two_good_records(tmp_path):
    """The checks read what compare reads: two copies of one record are identical."""
    for d in ("a", "b"):
        (tmp_path / d / "drwr").mkdir(parents=True)
        shutil.copy(BUILTIN, tmp_path / d / "drwr" / "checkpoint.pt")
        (tmp_path / d / "drwr" / "eval.csv").write_text("iteration,env_steps\n0,0\n")
    assert record_numbers.compare("drwr", str(tmp_path / "a"), str(tmp_path / "b")).startswith(
        "drwr: eval.csv identical; checkpoint max |diff| 0")


def test_deploy_refuses_an_empty_poses_file_before_the_arm_moves(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]), n_objects=1)
    (tmp_path / "poses.json").write_text("")
    from hardware.robot import FakeRobot
    robot = FakeRobot()
    with pytest.raises(RobotError, match="poses.json"):
        deploy.main(fake_args(tmp_path, ckpt, object_poses=f"file:{tmp_path / 'poses.json'}"), robot=robot)
    assert robot.sent == [] and not robot.started and not (tmp_path / "episode.jsonl").exists()

