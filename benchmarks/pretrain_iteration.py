"""Time diffusion pre-training (`dppo_pretrain.py`) per gradient step and per epoch, split into phases.

Runs `dppo_pretrain.main` itself (no copy of its loop) for 3 epochs and reports the second (the first warms up; the
third also holds the evaluation rollout and the checkpoint, timed on their own). Phases are timed from outside the loop,
by wrapping what it calls: the batch iterator (data batch assembly), `DiffusionPolicy.loss` and `Tensor.backward`
(forward+backward), the optimizer's step hooks, `zero_grad` and `ema_update` (optimizer+EMA), `check_finite` and
`RunFolder.scalars` (logging: the end-of-epoch finiteness check and TensorBoard); `other` is the rest of the epoch (the loop's
own lines, the progress bar and these timers' overhead, ~0.2 ms per step). Times are process CPU time
(`time.process_time`), medians over `--repeats` runs.

    python benchmarks/pretrain_iteration.py --env-id hopper        # reference settings, generated data
    python benchmarks/pretrain_iteration.py --env-id avoid-m2      # the built-in M2 demonstrations
    python benchmarks/pretrain_iteration.py --env-id hopper --float32-matmul-precision medium

Hopper: the reference's `cfg/gym/pretrain/hopper-medium-v2/pre_diffusion_mlp.yaml` (batch 128, DiffusionMLP [512]x3
ReLU residual, K 20, T_a 4) on generated trajectories of random numbers with the shapes of D4RL hopper-medium-v2
(obs 11, action 3; the dataset has 1 000 000 transitions in 2186 episodes, 993 442 windows of T_a 4, i.e. 7761 steps
per epoch). An epoch of that size costs ~1 CPU minute, so by default the benchmark trains on `--n-windows` 64 000 (500
steps) and scales the per-step phases to the full epoch; `--n-windows 993442` runs it whole. The step's time depends on
how far training has gone: Adam's moments of weights whose gradients vanish decay into denormal floats, which the CPU
computes many times slower, so the optimizer step of the full epoch 2 (steps 7761-15522) is 2-3x that of the small
epoch 2 (steps 500-1000); `--flush-denormal` removes that.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_pretrain  # noqa: E402
from common import pretraining, runs  # noqa: E402
from common.tasks import get_task  # noqa: E402

HOPPER_TRANSITIONS, HOPPER_EPISODES = 1_000_000, 2186  # D4RL hopper-medium-v2


@dataclass
class Bench:
    env_id: str = "hopper"
    """hopper (reference settings, generated data) or an Avoid task (its built-in demonstrations)"""
    n_windows: int = 64_000
    """Hopper: windows of the generated dataset (993442: the full hopper-medium-v2 epoch)"""
    repeats: int = 3
    """runs of 3 epochs each; medians reported"""
    eval: bool = True
    """time one evaluation rollout (the script's own, every `eval_every` epochs) and amortise it per epoch"""
    threads: int | None = 1
    """torch CPU threads (None: torch's default)"""
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """dppo_pretrain --float32-matmul-precision"""
    fused_adam: bool = False
    """dppo_pretrain --fused-adam"""
    flush_denormal: bool = True
    """dppo_pretrain --flush-denormal (its default; --no-flush-denormal keeps IEEE denormals)"""


def hopper_like_dataset(path: str, n_windows: int, horizon_steps: int = 4) -> int:
    """A train.npz (the reference's layout, not normalised) of random trajectories with hopper-medium-v2's shapes and
    mean episode length (457 transitions), cut to hold `n_windows` windows; returns the windows it holds."""
    length = HOPPER_TRANSITIONS // HOPPER_EPISODES
    per_traj = length - horizon_steps + 1
    lengths = [length] * (n_windows // per_traj)
    if n_windows % per_traj:
        lengths.append(n_windows % per_traj + horizon_steps - 1)
    n = sum(lengths)
    rng = np.random.default_rng(0)
    np.savez(path, states=rng.uniform(-1, 1, (n, 11)).astype(np.float32),
             actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32), traj_lengths=np.array(lengths, dtype=np.int64))
    return sum(length - horizon_steps + 1 for length in lengths)


class PhaseClock:
    """Process CPU time spent in each phase, per epoch (an epoch starts where the loop asks for its batch iterator)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.marks: list[float] = []
        self.steps: list[int] = []

    def add(self, phase: str, seconds: float) -> None:
        if self.epochs:
            self.epochs[-1][phase] = self.epochs[-1].get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, phase: str):
        t = time.process_time()
        try:
            yield
        finally:
            self.add(phase, time.process_time() - t)

    def wrap(self, fn, phase: str):
        def timed(*a, **kw):
            with self.timing(phase):
                return fn(*a, **kw)
        return timed

    def wrap_iterate(self, iterate):
        clock = self

        def timed_iterate(data, *a, **kw):
            clock.marks.append(time.process_time())
            clock.epochs.append({})
            clock.steps.append(0)
            it = iterate(data, *a, **kw)
            while True:
                with clock.timing("data"):
                    batch = next(it, None)
                if batch is None:
                    return
                clock.steps[-1] += 1
                yield batch
        return timed_iterate


@contextlib.contextmanager
def patched(clock: PhaseClock):
    """Wrap what dppo_pretrain's loop calls (undone on exit)."""
    plumbing = dppo_pretrain if hasattr(dppo_pretrain, "save_checkpoint") else runs  # older commits imported the names
    ema = pretraining if hasattr(pretraining, "ema_update") else dppo_pretrain  # older commits: in the script
    saved = [(dppo_pretrain.WindowDataset, "iterate"), (dppo_pretrain.DiffusionPolicy, "loss"), (torch.Tensor, "backward"),
             (torch.optim.Optimizer, "zero_grad"), (ema, "ema_update"), (dppo_pretrain, "evaluate"),
             (plumbing, "save_checkpoint"), (plumbing, "check_finite"), (runs.RunFolder, "scalars")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in saved]
    pre: list[float] = []
    hooks = [register_optimizer_step_pre_hook(lambda *_: pre.append(time.process_time())),
             register_optimizer_step_post_hook(lambda *_: clock.add("optimizer+EMA", time.process_time() - pre.pop()))]
    phases = {"iterate": None, "loss": "forward+backward", "backward": "forward+backward", "zero_grad": "optimizer+EMA",
              "ema_update": "optimizer+EMA", "evaluate": "evaluation", "save_checkpoint": "checkpoint",
              "check_finite": "logging", "scalars": "logging"}
    try:
        for obj, name, fn in saved:
            setattr(obj, name, clock.wrap_iterate(fn) if name == "iterate" else clock.wrap(fn, phases[name]))
        yield
    finally:
        for h in hooks:
            h.remove()
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def run_once(bench: Bench, dataset: str | None, eval_every: int, tmp: str, extra: dict) -> tuple[dict[str, float], int, dict]:
    """3 epochs of dppo_pretrain.main; the second epoch's phases (s), its steps, and the third's evaluation/checkpoint."""
    flags = dict(env_id=bench.env_id, dataset=dataset, n_epochs=3, eval_every=eval_every, save_every=10**9,
                 exp_name="bench", torch_threads=bench.threads, cuda=False, **extra)
    if bench.float32_matmul_precision != "highest":  # only new flags when asked: the benchmark also runs older commits
        flags["float32_matmul_precision"] = bench.float32_matmul_precision
    if bench.fused_adam:
        flags["fused_adam"] = True
    if bench.flush_denormal:
        flags["flush_denormal"] = True
    clock = PhaseClock()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with patched(clock):
            out = dppo_pretrain.main(dppo_pretrain.Args(**flags))
            clock.marks.append(time.process_time())
    finally:
        os.chdir(cwd)
        torch.set_flush_denormal(False)  # process-wide: the next run starts as the script does
    epoch = dict(clock.epochs[1])
    epoch["total"] = clock.marks[2] - clock.marks[1]
    epoch["other"] = epoch["total"] - sum(v for k, v in epoch.items() if k != "total")
    last = {k: clock.epochs[2].get(k, 0.0) for k in ("evaluation", "checkpoint")}
    last["loss"] = out["losses"][-1]
    return epoch, clock.steps[1], last


def main(bench: Bench, extra: dict | None = None) -> dict:
    """`extra`: more dppo_pretrain.Args fields (tests shrink the network with it)."""
    task = get_task(bench.env_id)
    defaults = dppo_pretrain.Args(env_id=task.id)
    dppo_pretrain.fill_defaults(defaults)
    torch.set_num_threads(bench.threads or torch.get_num_threads())
    runs, steps, lasts = [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        dataset, full_windows = None, None
        if task.suite == "gym":
            if task.id != "hopper":
                raise SystemExit(f"error: --env-id {task.id}: the benchmark generates Hopper's data only (hopper, avoid-m*)")
            dataset = os.path.join(tmp, "train.npz")
            hopper_like_dataset(dataset, bench.n_windows, defaults.horizon_steps)
            full_windows = HOPPER_TRANSITIONS - HOPPER_EPISODES * (defaults.horizon_steps - 1)
        for r in range(bench.repeats):
            evaluate_now = bench.eval and r == bench.repeats - 1 and defaults.eval_every  # one rollout is enough
            epoch, steps, last = run_once(bench, dataset, 3 if evaluate_now else 0, tmp, extra or {})
            runs.append(epoch)
            lasts.append(last)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    per_epoch = ("total", "logging", "other")
    train = sum(v for k, v in med.items() if k not in per_epoch)
    print(f"\n{task.id}: batch {defaults.batch_size}, network {list(defaults.mlp_dims)} {defaults.activation}, "
          f"K {defaults.denoising_steps}, T_a {defaults.horizon_steps}, {steps} steps per measured epoch; "
          f"float32 matmul precision {bench.float32_matmul_precision}, fused AdamW {bench.fused_adam}, flush denormals "
          f"{bench.flush_denormal}; torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; process CPU time, median of {len(runs)}")
    per_step = {k: v / steps for k, v in med.items() if k not in per_epoch}
    for k, v in per_step.items():
        print(f"  {k:18s} {1e3 * v:8.3f} ms/step  {100 * v * steps / train:5.1f} %")
    print(f"  {'step':18s} {1e3 * train / steps:8.3f} ms/step")
    result = {"per_step": per_step, "step": train / steps, "epoch": med["total"], "logging": med["logging"],
              "other": med["other"], "steps": steps, "loss": lasts[0]["loss"], "runs": runs}
    print(f"  measured epoch: {med['total']:.3f} s ({steps} steps; logging {1e3 * med['logging']:.1f} ms, other "
          f"{1e3 * med['other']:.1f} ms)")
    if full_windows is not None:
        full_steps = full_windows // defaults.batch_size
        result["full_epoch"] = (train + med["other"]) / steps * full_steps + med["logging"]
        print(f"  full hopper-medium-v2 epoch ({full_windows} windows, {full_steps} steps): "
              f"{result['full_epoch']:.1f} s (per-step phases and other x {full_steps} + logging)")
    evaluation = lasts[-1]["evaluation"]
    if bench.eval and defaults.eval_every and evaluation:
        result["evaluation"] = evaluation
        epoch_time = result.get("full_epoch", med["total"])
        share = evaluation / defaults.eval_every / epoch_time
        print(f"  one evaluation rollout ({defaults.n_eval_envs} envs): {evaluation:.1f} s, every {defaults.eval_every} "
              f"epochs: {evaluation / defaults.eval_every:.2f} s per epoch ({100 * share:.1f} % of an epoch)"
              + ("; random weights fall early, so a trained policy's rollout is longer" if task.suite == "gym" else ""))
    print(f"  loss after 3 epochs: {result['loss']:.6f}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Bench))
