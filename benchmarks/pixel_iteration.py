"""Time one pixel DPPO fine-tuning iteration, split into render, env, sampling, augment, advantages, old log-probs
and update.

Runs `dppo_finetune_pixel.main` itself for 2 iterations with evaluation off and reports the second one. The
policy and critic have the reference's architecture (ViT 128-d, MLP [512]×3 for Lift) with random weights at the
chosen image size. The env phase (physics + offscreen rendering) is split by timing the same number of steps of
one env with and without its cameras in this process (`render` = env phase × the rendering share of a step).

    python benchmarks/pixel_iteration.py --n-steps 5 --num-envs 2 --image-size 96       # CPU, tiny
    python benchmarks/pixel_iteration.py --device cuda                                    # the paper's size on a GPU
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune_pixel  # noqa: E402
import dppo_pretrain_pixel  # noqa: E402
from common.vision import VisionDiffusionNet  # noqa: E402
from common.normalizer import Normalizer  # noqa: E402
from common.tasks import get_task  # noqa: E402
from sims.robomimic import RobomimicEnv  # noqa: E402


@dataclass
class Bench:
    env_id: str = "lift-img"
    """pixel task whose reference-config settings are timed"""
    image_size: int = 96
    """image height and width"""
    n_steps: int | None = None
    """chunk-steps per env (None: the paper's 300/400; reduce on a CPU)"""
    num_envs: int = 50
    """parallel envs"""
    n_workers: int | None = None
    """env worker processes (None: number of cores)"""
    backbone: str = "mlp"
    """mlp or unet head"""
    device: str = "cpu"
    """cpu or cuda"""
    threads: int | None = 1
    """torch CPU threads (None: torch's default)"""


def random_checkpoint(task_id: str, image_size: int, backbone: str, path: str) -> None:
    """A pre-training checkpoint with the task's reference architecture and random weights."""
    args = dppo_pretrain_pixel.Args(env_id=task_id, backbone=backbone)
    dppo_pretrain_pixel.fill_defaults(args)
    task = get_task(task_id)
    arch = dppo_pretrain_pixel.network_arch(args, task, (image_size, image_size))
    net = VisionDiffusionNet(**arch)
    ones = lambda d: torch.ones(d)  # noqa: E731
    norm = Normalizer(-ones(task.obs_dim), ones(task.obs_dim), -ones(task.action_dim), ones(task.action_dim))
    torch.save({"format": "dppo-checkpoint-v1", "policy": "diffusion", "backbone": f"vit-{backbone}", "arch": arch,
                "task": task.id, "obs_dim": task.obs_dim, "action_dim": task.action_dim,
                "horizon_steps": args.horizon_steps, "cond_steps": 1, "denoising_steps": 100,
                "normalization": norm.state_dict(), "ema": net.state_dict(), "args": {}}, path)


def render_share(task_id: str, image_size: int, steps: int = 20) -> float:
    """Fraction of one env step spent rendering: the pixel env against the same env without cameras."""
    def per_step(env: RobomimicEnv) -> float:
        env.reset(seed=0)
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(np.zeros(env.task.action_dim))
        env.close()
        return (time.perf_counter() - t0) / steps
    pixel = per_step(RobomimicEnv(task_id, image_size=image_size))
    state = per_step(RobomimicEnv(task_id.removesuffix("-img")))
    print(f"one env step: {1e3 * pixel:.1f} ms with {image_size}x{image_size} rendering, {1e3 * state:.1f} ms without")
    return max(0.0, 1 - state / pixel)


def main(bench: Bench) -> dict:
    task = get_task(bench.env_id)
    paper = dppo_finetune_pixel.Args(env_id=task.id)
    dppo_finetune_pixel.fill_defaults(paper)
    n_steps = bench.n_steps or paper.n_steps
    # the paper's minibatch (500 pairs), or all pairs of a smaller iteration
    batch = min(paper.batch_size, n_steps * bench.num_envs * paper.ddim_steps)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random.pt")
        random_checkpoint(task.id, bench.image_size, bench.backbone, ckpt)
        cwd = os.getcwd()
        os.chdir(tmp)  # the run folder goes to the temporary directory
        try:
            args = dppo_finetune_pixel.Args(env_id=task.id, checkpoint=ckpt, n_train_itr=2, n_critic_warmup_itr=0, val_freq=0,
                                            n_steps=n_steps,
                                            num_envs=bench.num_envs, n_workers=bench.n_workers, batch_size=batch,
                                            cuda=bench.device == "cuda", exp_name="bench", save_every=10**9,
                                            torch_deterministic=False, torch_threads=bench.threads, eval_n_steps=1)
            out = dppo_finetune_pixel.main(args)
        finally:
            os.chdir(cwd)
    times = {k[5:]: v for k, v in out["history"][-1].items() if k.startswith("time_")}
    share = render_share(task.id, bench.image_size)
    times["render"] = times.get("env", 0.0) * share
    times["env"] = times.get("env", 0.0) - times["render"]
    total = sum(times.values())
    steps = n_steps * bench.num_envs * args.act_steps
    print(f"\n{task.id} at {bench.image_size}x{bench.image_size}: {bench.num_envs} envs x {n_steps} chunk-steps ({steps} env "
          f"steps), DDIM K'={args.ddim_steps}, minibatch {batch} x {args.grad_accumulate} accumulated, "
          f"{args.update_epochs} epochs, device {bench.device}, torch threads {torch.get_num_threads()}")
    for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {k:13s} {v:8.2f} s  {100 * v / total:5.1f} %")
    print(f"  {'total':13s} {total:8.2f} s")
    scale = paper.n_steps * paper.num_envs / (n_steps * bench.num_envs)
    if scale != 1:
        print(f"  x{scale:g} for the paper's size (every phase scales about linearly with n_steps x num_envs): "
              f"{total * scale:.0f} s")
    return {"times": times, "total": total, "env_steps": steps}


if __name__ == "__main__":
    main(tyro.cli(Bench))
