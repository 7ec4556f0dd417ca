"""UNet1D: a Diffusion-Policy-style temporal U-Net over action chunks (paper App. D.1).

`UNet1D(action_dim, cond_dim)(x, t, cond) -> eps` with x (B, T_a, D_a), t (B,) long denoising
steps, cond (B, cond_dim) (or (B, T_o, D_o), flattened) and eps (B, T_a, D_a). Convolutions run
over the T_a axis only, so the same weights serve T_a = 16 (pre-training) and T_a = 4 (fine-tuning);
any T_a works (skip connections are cropped after up-sampling).

Layout: sinusoidal(time_dim) -> Linear -> Mish -> Linear gives the time embedding; every residual
block gets FiLM (scale and bias per channel) from concat(time embedding, cond). Each level has two
residual blocks (Conv1d -> GroupNorm -> Mish, twice) then a stride-2 down-sampling (not after the
last level); two middle blocks; the up path mirrors it with skip connections; a final conv block
and a 1x1 conv map back to D_a. Channels are dim * dim_mults (robomimic 40 * (1, 2), furniture
64 * (1, 2, 4)). Constructor arguments are plain ints/tuples/bools: a checkpoint stores them as a
dict and rebuilds with `UNet1D(**arch)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.networks import SinusoidalPosEmb


class Conv1dBlock(nn.Sequential):
    """Conv1d (same length) -> GroupNorm -> Mish."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int) -> None:
        super().__init__(nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, out_ch), nn.Mish())


class ResidualBlock(nn.Module):
    """Two conv blocks, FiLM-conditioned between them: h = scale(c) * block1(x) + bias(c)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int,
                 cond_predict_scale: bool = True) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.cond_predict_scale = cond_predict_scale
        film_out = out_ch * (2 if cond_predict_scale else 1)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_out))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        film = self.film(c).unsqueeze(-1)  # (B, out_ch * {1,2}, 1)
        if self.cond_predict_scale:
            scale, bias = film.chunk(2, dim=1)
            h = scale * h + bias
        else:
            h = h + film
        return self.block2(h) + self.skip(x)


class UNet1D(nn.Module):
    """eps_theta(x, t, cond) for action chunks x (B, T_a, D_a); see the module docstring."""

    def __init__(self, action_dim: int, cond_dim: int, dim: int = 40,
                 dim_mults: tuple[int, ...] = (1, 2), kernel_size: int = 5, n_groups: int = 8,
                 time_dim: int = 16, cond_predict_scale: bool = True) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 2),
                                      nn.Mish(), nn.Linear(time_dim * 2, time_dim))
        film_dim = time_dim + cond_dim
        chans = [action_dim] + [dim * m for m in dim_mults]
        levels = list(zip(chans[:-1], chans[1:]))  # (in, out) channels per level

        def block(c_in: int, c_out: int) -> ResidualBlock:
            return ResidualBlock(c_in, c_out, film_dim, kernel_size, n_groups, cond_predict_scale)

        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            last = i == len(levels) - 1
            self.down.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity()]))
        self.mid = nn.ModuleList([block(chans[-1], chans[-1]), block(chans[-1], chans[-1])])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up.append(nn.ModuleList([
                block(c_out * 2, c_in), block(c_in, c_in),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(Conv1dBlock(chans[1], chans[1], kernel_size, n_groups),
                                   nn.Conv1d(chans[1], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T_a, D_a), t (B,) or scalar, cond (B, cond_dim) or (B, T_o, D_o) -> eps like x."""
        B, T = x.shape[0], x.shape[1]
        t = t.expand(B) if t.dim() == 0 else t
        c = torch.cat([self.time_mlp(t), cond.reshape(B, -1)], dim=-1)
        h = x.transpose(1, 2)  # (B, D_a, T_a): convolve over time
        skips, lengths = [], []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            lengths.append(h.shape[-1])
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, c), c))
            h = h[..., : lengths[len(skips) - 1]]  # odd lengths: crop to the skip's length
        return self.final(h)[..., :T].transpose(1, 2)
