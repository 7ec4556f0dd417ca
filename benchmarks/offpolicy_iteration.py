"""Time one iteration of the off-policy diffusion baselines (DQL, IDQL, DIPO, QSM), split into env stepping,
sampling and the update.

Runs each script's own `main` (no copy of its loop) for 2 iterations with evaluation off and reports the second one
(the first warms up). The policy has the task's pre-training architecture with random weights (the time of an
iteration does not depend on what the weights are). The critic warm-up is turned off (`--n-critic-warmup-itr 0`) so
that the timed iteration updates the actor as every iteration after the warm-up does; the final evaluation that
`main` always runs is cut to one chunk-step and is not timed.

    python benchmarks/offpolicy_iteration.py                                # Hopper, n_steps 500 -> 25, all four
    python benchmarks/offpolicy_iteration.py --scripts dql qsm --n-steps 50
    python benchmarks/offpolicy_iteration.py --env-id avoid-m2 --n-steps 25  # Avoid M2 at its full size

Each phase scales linearly with n_steps at a fixed batch size (the number of updates per iteration is
n_steps·num_envs / batch_size × replay_ratio), so the last column scales the total to the scripts' n_steps.
Pick n_steps so that this number is an integer for every script (25 for Hopper: 16 / 128 / 64 / 16 updates).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.finetune_iteration import random_checkpoint  # noqa: E402

SCRIPTS = ("dql", "idql", "dipo", "qsm")


@dataclass
class Bench:
    env_id: str = "hopper"
    """task whose reference-config settings are timed"""
    scripts: list[Literal["dql", "idql", "dipo", "qsm"]] = field(default_factory=lambda: list(SCRIPTS))
    """which scripts to time, in this order"""
    n_steps: int | None = 25
    """chunk-steps per env (None: the scripts' own, e.g. Hopper 500; reduce on CPU)"""
    num_envs: int | None = None
    """parallel envs (None: the scripts' own)"""
    batch_size: int | None = None
    """transitions per update (None: the scripts' own, 1000)"""
    threads: int | None = 1
    """torch CPU threads (None: torch's default)"""
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """the scripts' --float32-matmul-precision (passed only when not highest)"""
    onednn_matmul: Literal["auto", "on", "off"] = "auto"
    """the scripts' --onednn-matmul (their default: auto)"""


def run_one(name: str, bench: Bench, ckpt: str) -> dict:
    """`main` of one script for 2 iterations; returns the second iteration's phase times (wall and process CPU)
    and its size."""
    mod = importlib.import_module(name)
    extra = {}
    if bench.float32_matmul_precision != "highest":
        extra["float32_matmul_precision"] = bench.float32_matmul_precision
    extra["onednn_matmul"] = bench.onednn_matmul
    if bench.batch_size is not None:
        extra["batch_size"] = bench.batch_size
    args = mod.Args(env_id=bench.env_id, checkpoint=ckpt, n_train_itr=2, val_freq=0, eval_n_steps=1, plot=False,
                    n_steps=bench.n_steps, num_envs=bench.num_envs, n_critic_warmup_itr=0, exp_name="bench",
                    save_every=10**9, torch_deterministic=False, torch_threads=bench.threads, cuda=False, **extra)
    out = mod.main(args)
    times = {k[5:]: v for k, v in out["history"][-1].items() if k.startswith("time_")}
    cpu = {k[4:]: v for k, v in out["history"][-1].items() if k.startswith("cpu_")}  # common.runs.Run's timer
    batch = args.batch_size
    updates = int(args.n_steps * args.num_envs / batch * args.replay_ratio)
    paper = mod.Args(env_id=bench.env_id)
    mod.fill_defaults(paper)
    return {"times": times, "total": sum(times.values()), "cpu": cpu, "cpu_total": sum(cpu.values()),
            "n_steps": args.n_steps, "num_envs": args.num_envs, "updates": updates, "batch": batch,
            "scale": paper.n_steps * paper.num_envs / (args.n_steps * args.num_envs)}


def main(bench: Bench) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        random_checkpoint(bench.env_id, ckpt)
        cwd = os.getcwd()
        os.chdir(tmp)  # the run folders go into the temporary folder
        try:
            for name in bench.scripts:
                print(f"\n==== {name}.py: 2 iterations, the second timed ====")
                results[name] = run_one(name, bench, ckpt)
        finally:
            os.chdir(cwd)
    print(f"\n{bench.env_id}, torch threads {torch.get_num_threads()}, float32 matmul precision "
          f"{bench.float32_matmul_precision}, load average {os.getloadavg()[0]:.1f}; the second iteration, "
          "process CPU s (wall s)")
    phases = ("env", "sampling", "update")
    print(f"| script | envs x chunk-steps | updates (batch) | {' | '.join(phases)} | total | x scale (scripts' size) |")
    print("|---|---|---|" + "---|" * len(phases) + "---|---|")
    for name, r in results.items():
        cells = " | ".join(f"{r['cpu'].get(p, 0.0):.2f} ({r['times'].get(p, 0.0):.2f})" for p in phases)
        print(f"| {name} | {r['num_envs']} x {r['n_steps']} | {r['updates']} ({r['batch']}) | {cells} | "
              f"{r['cpu_total']:.2f} ({r['total']:.2f}) | x{r['scale']:g} = {r['cpu_total'] * r['scale']:.1f} |")
    return results


if __name__ == "__main__":
    main(tyro.cli(Bench))
