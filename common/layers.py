"""The smallest network pieces, shared by `common/networks.py` and `common/unet.py`: the activations by name and the
sinusoidal time embedding."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "mish": nn.Mish, "tanh": nn.Tanh,
                                           "elu": nn.ELU, "gelu": nn.GELU}


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of t (B,) -> (B, dim): a diffusion policy's integer step or a flow policy's float time."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)
