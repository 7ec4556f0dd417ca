"""`--max-n-episodes N` of every pre-training script (issue 28, the expert-data ablation of paper App. B.2, Fig. A5):
the first N episodes of the dataset, cut as the reference's `StitchedSequenceDataset` (irom-princeton/dppo,
agent/dataset/sequence.py: `traj_lengths[:N]` and the rows they span), normalised with the statistics of the whole
dataset (the reference's normalization.npz, computed by its pre-processing scripts over the whole file), recorded
in the checkpoint's arguments; 0, negative and more than the dataset holds are refused in one line."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

import dppo_pretrain as pt
import dppo_pretrain_pixel as ptp
import gaussian_ppo as gauss
import gmm_ppo as gmm
from common import runs
from common.errors import UsageError
from common.normalizer import Normalizer
from common.tasks import get_task
from loaders.datasets import first_episodes, load_task_dataset, load_task_trajectories, save_train_npz

AVOID = get_task("avoid-m2")
LENGTHS = (7, 5, 9, 6, 8)


def _trajs(obs_dim: int, action_dim: int, seed: int = 0) -> list[dict]:
    """Five episodes whose value ranges widen with the index: the first ones' min/max are not the whole file's."""
    rng = np.random.default_rng(seed)
    return [{"obs": (rng.uniform(-1, 1, (n, obs_dim)) * (i + 1)).astype(np.float32),
             "actions": (rng.uniform(-1, 1, (n, action_dim)) * (i + 1)).astype(np.float32)}
            for i, n in enumerate(LENGTHS)]


def _same(a: Normalizer, b: Normalizer) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_first_n_episodes_and_the_whole_files_statistics(tmp_path):
    """The rows kept are exactly the file's first sum(traj_lengths[:N]) rows, split at traj_lengths[:N]; the
    normaliser is the one of the whole file, not of the N episodes."""
    trajs = _trajs(AVOID.obs_dim, AVOID.action_dim)
    path = str(tmp_path / "demos.npz")
    save_train_npz(path, trajs)
    with np.load(path) as f:
        states, actions, lengths = f["states"], f["actions"], f["traj_lengths"]
    whole, whole_norm = load_task_dataset(AVOID, path)
    got, norm = load_task_dataset(AVOID, path, max_n_episodes=3)
    assert [len(t["obs"]) for t in got] == list(lengths[:3]) == [7, 5, 9]  # traj_lengths[:3]
    rows = int(lengths[:3].sum())
    np.testing.assert_array_equal(np.concatenate([t["obs"] for t in got]), states[:rows])
    np.testing.assert_array_equal(np.concatenate([t["actions"] for t in got]), actions[:rows])
    assert all(np.array_equal(g[k], w[k]) for g, w in zip(got, whole[:3]) for k in ("obs", "actions"))
    assert _same(norm, whole_norm) and _same(norm, Normalizer.from_trajectories(trajs))
    assert not _same(norm, Normalizer.from_trajectories(trajs[:3]))  # the statistics of the cut would differ
    assert len(load_task_dataset(AVOID, path, max_n_episodes=5)[0]) == 5  # all of them: accepted


def test_the_references_layout_keeps_its_statistics_file(tmp_path):
    """A normalised train.npz beside its normalization.npz: the first N episodes back in env units, the file's
    statistics (computed by the reference over the whole dataset) unchanged."""
    trajs = _trajs(AVOID.obs_dim, AVOID.action_dim, seed=1)
    stats = Normalizer.from_trajectories(trajs)
    normalised = [{"obs": stats.normalize_obs(t["obs"]), "actions": stats.normalize_action(t["actions"])} for t in trajs]
    save_train_npz(str(tmp_path / "train.npz"), normalised)
    np.savez(tmp_path / "normalization.npz", **{k: v.numpy() for k, v in stats.state_dict().items()})
    whole, _ = load_task_dataset(AVOID, str(tmp_path / "train.npz"))
    got, norm = load_task_dataset(AVOID, str(tmp_path / "train.npz"), max_n_episodes=2)
    assert _same(norm, stats) and [len(t["obs"]) for t in got] == [7, 5]
    assert all(np.array_equal(g[k], w[k]) for g, w in zip(got, whole) for k in ("obs", "actions"))


def test_zero_negative_and_too_many_are_refused(tmp_path):
    path = str(tmp_path / "demos.npz")
    save_train_npz(path, _trajs(AVOID.obs_dim, AVOID.action_dim))
    with pytest.raises(UsageError) as e:
        load_task_dataset(AVOID, path, max_n_episodes=6)
    assert str(e.value) == (f"--max-n-episodes 6: {path} has 5 episodes; pass at most 5 (or leave --max-n-episodes out "
                            "for all of them)")
    trajs = load_task_trajectories(AVOID, path)
    for bad in (0, -2, 2.0, True):  # trajs[:-2] would drop the last two in silence
        with pytest.raises(UsageError, match="--max-n-episodes must be a whole number > 0"):
            first_episodes(trajs, bad, path)
    assert first_episodes(trajs, None, path) is trajs


def _cli(monkeypatch, module, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    runs.cli(module.main, module.Args)


@pytest.mark.parametrize("argv, message", [
    (["--max-n-episodes", "0"], "error: --max-n-episodes must be positive (got 0)"),
    (["--max-n-episodes=-3"], "error: --max-n-episodes must be positive (got -3)"),
    (["--max-n-episodes", "97"], "error: --max-n-episodes 97: {} has 96 episodes; pass at most 96 (or leave "
                                 "--max-n-episodes out for all of them)")])
def test_the_script_refuses_in_one_line_before_writing(argv, message, tmp_path, monkeypatch, capsys):
    from loaders.datasets import AVOID_DEMO_DIR, avoid_demo_file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        _cli(monkeypatch, pt, [*argv, "--n-epochs", "1", "--eval-every", "0", "--output", "pre.pt"])
    shipped = str(AVOID_DEMO_DIR / avoid_demo_file("M2"))
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [message.format(shipped)]
    assert os.listdir(tmp_path) == []


def test_dppo_pretrain_max_n_episodes_10_on_the_built_in_demos(tmp_path, monkeypatch, capsys):
    """The issue's command, `python dppo_pretrain.py --max-n-episodes 10` (one small epoch): the windows of the first
    10 Avoid M2 demos, the normalisation of all 96, and the 10 in the checkpoint's arguments, args.json and the
    release checkpoint."""
    monkeypatch.chdir(tmp_path)
    _cli(monkeypatch, pt, ["--max-n-episodes", "10", "--n-epochs", "1", "--eval-every", "0", "--mlp-dims", "64", "64",
                           "64", "--output", "pre.pt"])
    out = capsys.readouterr().out
    assert "pre-training on the first 10 of the 96 episodes" in out and "avoid-m2: 10 trajectories, " in out
    all_trajs, all_norm = load_task_dataset(AVOID)
    windows = sum(len(t["actions"]) - AVOID.horizon_steps + 1 for t in all_trajs[:10])
    assert f"10 trajectories, {windows} windows" in out
    (ckpt_path,) = glob.glob("runs/*/checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    release = torch.load("pre.pt", weights_only=True)
    with open(os.path.join(os.path.dirname(ckpt_path), "args.json")) as f:
        saved = json.load(f)
    assert ckpt["args"]["max_n_episodes"] == release["args"]["max_n_episodes"] == saved["max_n_episodes"] == 10
    assert _same(Normalizer.from_state_dict(ckpt["normalization"]), all_norm)
    assert not _same(all_norm, Normalizer.from_trajectories(all_trajs[:10]))


@pytest.mark.parametrize("module", [gauss, gmm], ids=["gaussian", "gmm"])
def test_gaussian_and_gmm_pretrain_take_it(module, tmp_path, monkeypatch, capsys):
    """`--pretrain --max-n-episodes 4` (loaders/chunk_pretrain.py): 4 trajectories, recorded; without --pretrain it
    is a pre-training flag, refused."""
    monkeypatch.chdir(tmp_path)
    out = module.main(module.Args(pretrain=True, max_n_episodes=4, n_epochs=1, eval_every=0, seed=0, mlp_dims=(32, 32),
                                  pretrain_batch_size=64, output="pre.pt"))
    assert "avoid-m2: 4 trajectories, " in capsys.readouterr().out
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["args"]["max_n_episodes"] == torch.load("pre.pt", weights_only=True)["args"]["max_n_episodes"] == 4
    _, all_norm = load_task_dataset(AVOID)
    assert _same(Normalizer.from_state_dict(ckpt["normalization"]), all_norm)
    with pytest.raises(UsageError, match="^--max-n-episodes is a pre-training flag; use it with --pretrain$"):
        module.check_mode_flags(module.Args(checkpoint="pre.pt", max_n_episodes=4))


def test_pixel_pretrain_takes_it(tmp_path, monkeypatch, capsys):
    """dppo_pretrain_pixel.py: the first N of its --n-demos data, normalised with the statistics of those --n-demos;
    more than --n-demos keeps is refused naming it; a tiny run records N."""
    rng = np.random.default_rng(0)
    trajs = [{"obs": (rng.uniform(-1, 1, (n, 9)) * (i + 1)).astype(np.float32),
              "actions": (rng.uniform(-1, 1, (n, 7)) * (i + 1)).astype(np.float32),
              "images": rng.integers(0, 256, (n, 3, 16, 16)).astype(np.uint8)} for i, n in enumerate(LENGTHS)]
    path = str(tmp_path / "demos.npz")
    save_train_npz(path, trajs)
    task = get_task("lift-img")
    got, norm = ptp.load_pixel_dataset(task, path, 4, 2)
    assert [len(t["obs"]) for t in got] == [7, 5] and np.array_equal(got[1]["images"], trajs[1]["images"])
    assert _same(norm, Normalizer.from_trajectories(trajs[:4]))  # the data's (--n-demos 4) statistics, not the 2's
    with pytest.raises(UsageError, match=rf"--max-n-episodes 5: {path} \(--n-demos 4\) has 4 episodes"):
        ptp.load_pixel_dataset(task, path, 4, 5)
    monkeypatch.chdir(tmp_path)
    out = ptp.main(ptp.Args(dataset=path, max_n_episodes=3, n_demos=None, n_epochs=1, batch_size=8, mlp_dims=(32, 32),
                            embed_dim=16, spatial_emb=8, eval_every=0, seed=0))
    assert "pre-training on the first 3 of the 5 episodes" in capsys.readouterr().out
    assert torch.load(out["checkpoint"], weights_only=True)["args"]["max_n_episodes"] == 3
