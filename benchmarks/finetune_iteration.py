"""Time one DPPO fine-tuning iteration, split into env stepping, sampling, old log-probs and the update.

Runs `dppo_finetune.main` itself (no copy of its loop) for 2 iterations with evaluation off and
reports the second one (the first warms up). The policy has the paper's architecture with random
weights: the time of an iteration does not depend on what the weights are.

    python benchmarks/finetune_iteration.py --env-id hopper --n-steps 100      # CPU: n_steps 500 -> 100
    python benchmarks/finetune_iteration.py --env-id can --n-steps 30 --num-envs 10
    python benchmarks/finetune_iteration.py --env-id hopper --device cuda      # full size on a GPU
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune  # noqa: E402
import dppo_pretrain  # noqa: E402
from common.datasets import Normalizer  # noqa: E402
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
    onednn_matmul: bool = False
    """dppo_finetune --onednn-matmul"""


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


def main(bench: Bench) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        random_checkpoint(bench.env_id, ckpt)
        paper = dppo_finetune.Args(env_id=bench.env_id)
        dppo_finetune.fill_defaults(paper)
        n_steps, num_envs = bench.n_steps or paper.n_steps, bench.num_envs or paper.num_envs
        # keep the paper's number of minibatches per epoch when n_steps / num_envs are reduced
        batch = paper.batch_size * n_steps * num_envs // (paper.n_steps * paper.num_envs)
        args = dppo_finetune.Args(batch_size=batch, env_id=bench.env_id, checkpoint=ckpt, n_train_itr=2, val_freq=0,
                                  plot=False,
                                  n_steps=bench.n_steps, num_envs=bench.num_envs, cuda=bench.device == "cuda",
                                  exp_name="bench", save_every=10**9, torch_deterministic=False,
                                  torch_threads=bench.threads, update_chunk=bench.update_chunk,
                                  onednn_matmul=bench.onednn_matmul)
        out = dppo_finetune.main(args)
    it = out["history"][-1]
    times = {k[5:]: v for k, v in it.items() if k.startswith("time_")}
    total = sum(times.values())
    a = dppo_finetune.Args(env_id=bench.env_id, n_steps=n_steps, num_envs=num_envs, batch_size=batch)
    dppo_finetune.fill_defaults(a)
    steps = a.n_steps * a.num_envs * a.act_steps
    print(f"\n{bench.env_id}: {a.num_envs} envs x {a.n_steps} chunk-steps ({steps} env steps), K'={a.ft_denoising_steps}, "
          f"batch {a.batch_size}, {a.update_epochs} epochs, device {bench.device}, torch threads {torch.get_num_threads()}")
    for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {k:13s} {v:8.2f} s  {100 * v / total:5.1f} %")
    print(f"  {'total':13s} {total:8.2f} s")
    scale = paper.n_steps * paper.num_envs / (n_steps * num_envs)
    if scale != 1:
        print(f"  x{scale:g} for the paper's size (every phase scales linearly with n_steps x num_envs): "
              f"{total * scale:.1f} s")
    return {"times": times, "total": total, "env_steps": steps}


if __name__ == "__main__":
    main(tyro.cli(Bench))
