"""Run plumbing that only the pre-training scripts use (`dppo_pretrain.py`, `dppo_pretrain_pixel.py`, `flow_pretrain.py`,
the behaviour cloning of `gaussian_ppo.py` / `gmm_ppo.py --pretrain`): their AdamW kernel, denormal flushing,
learning-rate schedule, EMA of the weights, the layer shapes of their `--onednn-matmul` check, resuming a run, and the
released checkpoint. Fine-tuning never loads it."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn as nn

from common.errors import DatasetError
from common.runs import (FINETUNE_SCRIPTS, ONEDNN_SHAPES, load_checkpoint, load_weights, policy_header, save_checkpoint,
                         script_name)

# the script that pre-trains each kind of policy (what a pre-training run folder of that kind is resumed with)
PRETRAIN_SCRIPTS = {"diffusion": "dppo_pretrain.py", "flow": "flow_pretrain.py", "gaussian": "gaussian_ppo.py --pretrain",
                    "gmm": "gmm_ppo.py --pretrain"}
RESUME_KEYS = ("args", "model", "optimizer", "scheduler", "rng", "epoch", "step")  # what a pre-training checkpoint holds


def adam_kernel(fused: bool) -> dict[str, bool | None]:
    """Pre-training's AdamW implementation (keyword arguments of `torch.optim.AdamW`): the multi-tensor one (default; the
    per-tensor loop's update bit for bit) or, with `--fused-adam`, the fused kernel (the same update up to rounding)."""
    return dict(foreach=None, fused=True) if fused else dict(foreach=True, fused=None)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, reset: bool) -> None:
    """ema <- decay·ema + (1 - decay)·model, or a copy of the model while `reset` (the first epochs); one multi-tensor
    op over all the weights (the same per-tensor kernels, bit for bit)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_copy_(ema_params, params) if reset else torch._foreach_lerp_(ema_params, params, 1 - decay)


def flush_denormals(enabled: bool) -> None:
    """Pre-training's `--flush-denormal` (on by default): float denormals (magnitudes below 1.2e-38) computed as zero on
    the CPU, process-wide (`torch.set_flush_denormal`; set either way, so one run does not leak into the next in the
    same process). Adam's moments of weights whose gradients vanish decay into denormals, which x86 CPUs compute 5-25x
    slower (docs/results.md "Pre-training"); no other value changes."""
    if not torch.set_flush_denormal(enabled) and enabled:
        print("--flush-denormal: this CPU cannot flush denormals (no SSE3); left as is")


def mlp_shapes(rows: int, widths: tuple[int, ...] | None) -> tuple[tuple[int, int, int], ...]:
    """(rows, in, out) of an MLP's hidden layers of `widths` (none: `ONEDNN_SHAPES`): representative products for a
    script whose network is not built yet when it sets its kernels."""
    if not widths:
        return ONEDNN_SHAPES
    return tuple((rows, i, o) for i, o in dict.fromkeys(zip(widths, widths[1:] or widths)))


def release_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What fine-tuning reads from a pre-training checkpoint: header, normalisation, arguments and
    the EMA weights (no optimiser, no training weights); about a quarter of the full file."""
    return {**policy_header(ckpt), "args": ckpt.get("args", {}), "ema": ckpt["ema"]}


def load_run(run_dir: str, policy: str, pretrain_command: str) -> dict[str, Any]:
    """The checkpoint of the pre-training run folder `run_dir` (`--resume`) of a `policy` policy; a missing folder, a
    run of another kind of policy or a fine-tuning run is refused in one line naming the script to resume it with."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--resume {run_dir}: no such run folder")
    path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = load_checkpoint(path, None, pretrain_command)
    if ckpt["policy"] != policy:
        raise DatasetError(f"checkpoint {path!r} holds a {ckpt['policy']} policy, not a {policy} one; use "
                           f"{PRETRAIN_SCRIPTS[ckpt['policy']]}")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        fix = f"; resume it with {ckpt.get('method') or script_name(FINETUNE_SCRIPTS[policy])}.py" if "itr" in ckpt else ""
        raise DatasetError(f"--resume {run_dir}: its checkpoint is not a pre-training run's checkpoint "
                           f"(it lacks {', '.join(missing)}){fix}")
    return ckpt


def restore(ckpt: dict[str, Any], path: str, network: nn.Module, ema_network: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator, fused_adam: bool) -> tuple[int, int]:
    """Load a pre-training checkpoint (`load_run`, read from `path`) into the training state: the network and its EMA,
    AdamW (with this run's kernel choice), the schedule, the batch generator and the global torch stream; returns the
    (epoch, gradient step) it reached."""
    load_weights(network, ckpt["model"], path)
    load_weights(ema_network, ckpt["ema"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the saved groups carry the kernel choice of the run that wrote them
        group.update(adam_kernel(fused_adam))
    scheduler.load_state_dict(ckpt["scheduler"])
    generator.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["epoch"], ckpt["step"]


def write_release(checkpoint: str, output: str) -> None:
    """Write the release form of the run's `checkpoint` (`release_checkpoint`: what fine-tuning reads) to `output`."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)
    save_checkpoint(output, release_checkpoint(trained))


def warmup_then_cosine(lr: float, lr_min: float, warmup: int, total: int) -> Callable[[int], float]:
    """Pre-training LambdaLR factor per epoch: linear warm-up over `warmup` epochs, then cosine from
    `lr` to `lr_min` over the remaining `total - warmup` epochs."""
    def f(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        progress = (epoch - warmup) / max(1, total - warmup)
        return (lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr
    return f
