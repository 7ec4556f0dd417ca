"""dppo_pretrain.py under torchrun: 2 CPU processes (gloo, DistributedDataParallel) take the single-process steps."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_pretrain as pt
from common.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny Avoid M2 run: 7479 windows, 29 steps of the global batch 256 per epoch
TINY = dict(env_id="avoid-m2", n_epochs=3, batch_size=256, mlp_dims=(32, 32), eval_every=0, cuda=False)
# measured: losses within 2.5e-7 (relative), weights within 2.3e-7 after 87 steps; another seed differs by ~1e-2
TOL = 1e-5


def _flags(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        out += [f"--no-{flag[2:]}"] if v is False else [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return out


def _run_torchrun(cmd: list[str], cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """`subprocess.run`, except that on a timeout torchrun gets SIGTERM, on which it stops its workers (they run in
    sessions of their own, which a plain kill of torchrun leaves behind), and the failure shows their output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "(no output: torchrun did not stop on SIGTERM)"
        pytest.fail(f"torchrun did not finish in {timeout} s; its output:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tensorboard_losses(run_dir: str) -> np.ndarray:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    return np.array([e.value for e in events.Scalars("losses/loss")])


def test_two_gloo_processes_give_the_single_process_loss_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same global batch: the ranks draw the same batch, t and ε and each keeps half the rows, so the only
    difference is the float summation order (two half-batch gradients averaged by the all-reduce instead of one sum)."""
    (tmp_path / "ddp").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "dppo_pretrain.py"), *_flags({**TINY, "seed": 0})]
    r = _run_torchrun(cmd, cwd=tmp_path / "ddp", env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "ddp" / "runs" / "*"))
    assert len(runs) == 1 and r.stdout.count("pre-training avoid-m2") == 1  # only rank 0 writes and prints
    ddp_losses = _tensorboard_losses(runs[0])
    ddp_ckpt = torch.load(os.path.join(runs[0], "checkpoint.pt"), weights_only=True)

    monkeypatch.chdir(tmp_path)
    single = pt.main(pt.Args(**TINY, seed=0))
    other_seed = pt.main(pt.Args(**TINY, seed=1))
    one = np.array(single["losses"], dtype=np.float32)  # (TensorBoard keeps float32)
    assert ddp_losses.shape == (3,) and np.abs(ddp_losses / one - 1).max() < TOL
    assert np.abs(np.array(other_seed["losses"]) / one - 1).max() > 100 * TOL  # the tolerance tells runs apart
    ckpt = torch.load(single["checkpoint"], weights_only=True)
    assert ddp_ckpt["epoch"] == ckpt["epoch"] == 3 and ddp_ckpt["step"] == ckpt["step"] == 87
    for key in ("model", "ema"):
        assert ddp_ckpt[key].keys() == ckpt[key].keys()  # the plain network's names, no DDP "module." prefix
        assert max((ddp_ckpt[key][k] - ckpt[key][k]).abs().max().item() for k in ckpt[key]) < TOL


def test_rank_rows_of_the_loss_average_to_the_global_loss() -> None:
    """Each rank's `loss(..., rows)` is its part of the single-process loss drawn with the same seed."""
    net = pt.build_network("mlp", dict(action_dim=2, horizon_steps=4, obs_dim=3, cond_steps=1, mlp_dims=[16],
                                       activation="relu", residual=False, time_dim=8))
    policy = pt.DiffusionPolicy(net, 20, 4, 2)
    obs, actions = torch.randn(8, 1, 3), torch.rand(8, 4, 2) * 2 - 1
    losses = []
    for rows in (slice(None), slice(0, 4), slice(4, 8)):
        torch.manual_seed(0)
        losses.append(policy.loss(obs, actions, net, rows))
    assert torch.allclose((losses[1] + losses[2]) / 2, losses[0], atol=1e-6)
    assert not torch.allclose(losses[1], losses[0], atol=1e-3)


def test_global_batch_must_split_over_the_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match="--batch-size 256 is the global batch and must split evenly over the 3"):
        pt.distributed_setup(256, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pt.distributed_setup(256, torch.device("cpu")) == (0, 1, torch.device("cpu"))
