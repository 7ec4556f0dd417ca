"""Time one DPPO fine-tuning iteration, split into env stepping, sampling (with the old log-probs) and the update.

Runs `dppo_finetune.main` itself (no copy of its loop) for 2 iterations with evaluation off and
reports the second one (the first warms up). The policy has the paper's architecture with random
weights: the time of an iteration does not depend on what the weights are.

    python benchmarks/finetune_iteration.py --env-id hopper --n-steps 100      # CPU: n_steps 500 -> 100
    python benchmarks/finetune_iteration.py --env-id can --n-steps 30 --num-envs 10
    python benchmarks/finetune_iteration.py --env-id hopper --device cuda      # full size on a GPU
    python benchmarks/finetune_iteration.py --env-id hopper --device cuda --compile   # + CUDA graphs for sampling

`--device cuda` runs the paper's size (Hopper: 40 envs x 500 chunk-steps, minibatch 50 000) unless sizes are given,
with the env side on the fastest installed simulator (envpool's C++ pool when installed, else gymnasium) and the
update without host syncs inside an epoch (each minibatch one backward, the critic once per env-step). Without a
GPU it prints what it would run and stops with an error (never a silent CPU run).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune  # noqa: E402
import dppo_pretrain  # noqa: E402
from common.normalizer import Normalizer  # noqa: E402
from common.tasks import get_task  # noqa: E402


@dataclass
class Bench:
    env_id: str = "hopper"
    """task whose reference-config settings are timed"""
    n_steps: int | None = None
    """chunk-steps per env (None: the paper's; reduce on CPU)"""
    num_envs: int | None = None
    """parallel envs (None: the paper's)"""
    device: str = "cpu"
    """cpu or cuda"""
    threads: int | None = 1
    """torch CPU threads (None: torch's default)"""
    update_chunk: int | None = None
    """dppo_finetune --update-chunk (None: its default)"""
    onednn_matmul: Literal["auto", "on", "off"] = "auto"
    """dppo_finetune --onednn-matmul (its default: auto)"""
    compile: bool = False
    """dppo_finetune --compile (sampling compiled; CUDA graphs on a GPU)"""


def random_checkpoint(task_id: str, path: str) -> None:
    """A pre-training checkpoint with the task's default architecture and random weights."""
    args = dppo_pretrain.Args(env_id=task_id)
    dppo_pretrain.fill_defaults(args)
    task = get_task(task_id)
    arch = dppo_pretrain.network_arch(args, task.obs_dim, task.action_dim)
    net = dppo_pretrain.build_network(args.backbone, arch)
    ones = lambda d: torch.ones(d)  # noqa: E731
    norm = Normalizer(-ones(task.obs_dim), ones(task.obs_dim), -ones(task.action_dim), ones(task.action_dim))
    torch.save({"format": "dppo-checkpoint-v1", "policy": "diffusion", "backbone": args.backbone, "arch": arch,
                "task": task.id, "obs_dim": task.obs_dim, "action_dim": task.action_dim,
                "horizon_steps": args.horizon_steps, "cond_steps": args.cond_steps,
                "denoising_steps": args.denoising_steps, "normalization": norm.state_dict(),
                "model": net.state_dict(), "ema": net.state_dict(), "args": {}}, path)


def plan(bench: Bench, n_steps: int, num_envs: int, batch: int) -> str:
    """One line saying what the benchmark runs."""
    a = dppo_finetune.Args(env_id=bench.env_id, n_steps=n_steps, num_envs=num_envs, batch_size=batch)
    dppo_finetune.fill_defaults(a)
    sim = "envpool" if importlib.util.find_spec("envpool") and get_task(a.env_id).suite == "gym" else "the task's default"
    chunk = bench.update_chunk or (a.batch_size if bench.device == "cuda" else 4096)
    return (f"{a.env_id}: {a.num_envs} envs x {a.n_steps} chunk-steps ({a.n_steps * a.num_envs * a.act_steps} env steps), "
            f"K'={a.ft_denoising_steps}, batch {a.batch_size}, {a.update_epochs} epochs, device {bench.device}, "
            f"simulator {sim}, update pieces of {chunk} pairs, compile {'on' if bench.compile else 'off'}")


def main(bench: Bench) -> dict:
    paper = dppo_finetune.Args(env_id=bench.env_id)
    dppo_finetune.fill_defaults(paper)
    n_steps, num_envs = bench.n_steps or paper.n_steps, bench.num_envs or paper.num_envs
    # keep the paper's number of minibatches per epoch when n_steps / num_envs are reduced
    batch = paper.batch_size * n_steps * num_envs // (paper.n_steps * paper.num_envs)
    print(f"runs 2 iterations, times the second: {plan(bench, n_steps, num_envs, batch)}")
    if bench.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU and none is visible here; the line above is what it "
                         "would run (test its code path with --device cpu and small --n-steps / --num-envs)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        random_checkpoint(bench.env_id, ckpt)
        args = dppo_finetune.Args(batch_size=batch, env_id=bench.env_id, checkpoint=ckpt, n_train_itr=2, val_freq=0,
                                  plot=False, n_critic_warmup_itr=0,
                                  n_steps=bench.n_steps, num_envs=bench.num_envs, cuda=bench.device == "cuda",
                                  exp_name="bench", save_every=10**9, torch_deterministic=False,
                                  torch_threads=bench.threads, update_chunk=bench.update_chunk,
                                  onednn_matmul=bench.onednn_matmul, compile=bench.compile)
        out = dppo_finetune.main(args)
    it = out["history"][-1]  # the phase times of `common.runs.Run`'s timer: wall (time_*) and process CPU (cpu_*)
    times = {k[5:]: v for k, v in it.items() if k.startswith("time_")}
    cpu = {k[4:]: v for k, v in it.items() if k.startswith("cpu_")}
    total = sum(times.values())
    a = dppo_finetune.Args(env_id=bench.env_id, n_steps=n_steps, num_envs=num_envs, batch_size=batch)
    dppo_finetune.fill_defaults(a)
    steps = a.n_steps * a.num_envs * a.act_steps
    print(f"\n{plan(bench, n_steps, num_envs, batch)}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} (wall times; process CPU times, which other jobs barely disturb)")
    for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {k:13s} {v:8.2f} s  {100 * v / total:5.1f} %   cpu {cpu.get(k, float('nan')):8.2f} s")
    print(f"  {'total':13s} {total:8.2f} s           cpu {sum(cpu.values()):8.2f} s")
    scale = paper.n_steps * paper.num_envs / (n_steps * num_envs)
    if scale != 1:
        print(f"  x{scale:g} for the paper's size (every phase scales linearly with n_steps x num_envs): "
              f"{total * scale:.1f} s")
    return {"times": times, "cpu": cpu, "total": total, "env_steps": steps}


if __name__ == "__main__":
    main(tyro.cli(Bench))
