"""Run plumbing that only the pre-training scripts use (`dppo_pretrain.py`, `dppo_pretrain_pixel.py`, the behaviour
cloning of `gaussian_ppo.py` / `gmm_ppo.py --pretrain`): their AdamW kernel, denormal flushing, learning-rate schedule,
the layer shapes of their `--onednn-matmul` check, and the released checkpoint. Fine-tuning never loads it."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from common.runs import ONEDNN_SHAPES, policy_header


def adam_kernel(fused: bool) -> dict[str, bool | None]:
    """Pre-training's AdamW implementation (keyword arguments of `torch.optim.AdamW`): the multi-tensor one (default; the
    per-tensor loop's update bit for bit) or, with `--fused-adam`, the fused kernel (the same update up to rounding)."""
    return dict(foreach=None, fused=True) if fused else dict(foreach=True, fused=None)


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


def warmup_then_cosine(lr: float, lr_min: float, warmup: int, total: int) -> Callable[[int], float]:
    """Pre-training LambdaLR factor per epoch: linear warm-up over `warmup` epochs, then cosine from
    `lr` to `lr_min` over the remaining `total - warmup` epochs."""
    def f(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        progress = (epoch - warmup) / max(1, total - warmup)
        return (lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr
    return f
