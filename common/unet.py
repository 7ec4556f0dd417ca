"""UNet1D (paper App. D.1): the temporal U-Net ε-network over the action chunk, loaded only by runs of a UNet policy
(`networks.build_diffusion_network` imports it when a checkpoint's backbone is `unet`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from common.layers import ACTIVATIONS, SinusoidalPosEmb

UNET_ACTIVATIONS = ("mish", "relu")  # the reference's `activation_type` Mish / ReLU


class Conv1dBlock(nn.Module):
    """Conv1d (same length) -> GroupNorm -> act. `block` indices as the reference's (Conv1d 0, GroupNorm 2;
    the reference reshapes to (B, C, 1, T) around its GroupNorm at 1 and 3, which changes nothing)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int, activation: str,
                 groupnorm_eps: float) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2), nn.Identity(),
                                   nn.GroupNorm(n_groups, out_ch, eps=groupnorm_eps), nn.Identity(),
                                   ACTIVATIONS[activation]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Resample1d(nn.Module):
    """The reference's `Downsample1d` (Conv1d k 3, stride 2: T -> ceil(T / 2)) or `Upsample1d`
    (ConvTranspose1d k 4, stride 2: T -> 2T), kept as a `conv` attribute for the same parameter names."""

    def __init__(self, ch: int, up: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(ch, ch, 4, stride=2, padding=1) if up else nn.Conv1d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResidualBlock1D(nn.Module):
    """Two conv blocks, FiLM-conditioned between them (reference `ResidualBlock1D`)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int,
                 cond_predict_scale: bool, large_cond_encoder: bool, activation: str, groupnorm_eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(in_ch, out_ch, kernel_size, n_groups, activation, groupnorm_eps),
                                     Conv1dBlock(out_ch, out_ch, kernel_size, n_groups, activation, groupnorm_eps)])
        act = ACTIVATIONS[activation]
        film = out_ch * (2 if cond_predict_scale else 1)
        if large_cond_encoder:
            self.cond_encoder = nn.Sequential(nn.Linear(cond_dim, film), act(), nn.Linear(film, film), act(),
                                              nn.Linear(film, film))
        else:
            self.cond_encoder = nn.Sequential(act(), nn.Linear(cond_dim, film))
        self.residual_conv = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.cond_predict_scale = cond_predict_scale

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        film = self.cond_encoder(c).unsqueeze(-1)  # (B, out_ch * {1, 2}, 1)
        if self.cond_predict_scale:
            scale, bias = film.chunk(2, dim=1)  # first half scale, second half bias, as the reference
            h = scale * h + bias
        else:
            h = h + film
        return self.blocks[1](h) + self.residual_conv(x)


class UNet1D(nn.Module):
    """ε_θ(x, t, cond) for action chunks x (B, T_a, D_a): a Diffusion-Policy-style temporal U-Net (paper App. D.1).

    `UNet1D(action_dim, cond_dim)(x, t, cond) -> eps` with x (B, T_a, D_a), t (B,) long denoising
    steps, cond (B, cond_dim) (or (B, T_o, D_o), flattened) and eps (B, T_a, D_a). Convolutions run
    over the T_a axis only, so the same weights serve T_a = 16 (pre-training) and T_a = 4 (fine-tuning).

    The same function, parameters, parameter names and state_dict order as the reference
    (`irom-princeton/dppo`, `model/diffusion/unet.py`, `Unet1D` and `ResidualBlock1D`; its
    `Conv1dBlock`, `Downsample1d`, `Upsample1d` in `model/diffusion/modules.py`), so its pre-trained
    `network.*` tensors load into this module unchanged:
    - `time_mlp`: sinusoidal(time_dim) -> Linear(time_dim, 4 time_dim) -> Mish -> Linear(4 time_dim, time_dim)
      (Mish whatever `activation` is, as in the reference);
    - every residual block: Conv1dBlock (Conv1d -> GroupNorm -> act) twice, FiLM in between from
      c = concat(time embedding, cond): h = scale(c) * block0(x) + bias(c) (`cond_predict_scale`; else
      h = block0(x) + bias(c)), then block1(h) + residual_conv(x) (a 1x1 conv when channels change);
      the FiLM encoder is Linear -> act -> Linear -> act -> Linear (`large_cond_encoder`, the reference's
      `smaller_encoder: False`, used by every published config) or act -> Linear;
    - registered in the reference's order: time_mlp, mid_modules (two blocks), down_modules (per level:
      two blocks and a stride-2 Conv1d, none after the last level), up_modules (per level but the
      deepest: two blocks on concat(h, skip), a stride-2 ConvTranspose1d), final_conv (Conv1dBlock, 1x1 Conv1d).
      Channels are dim * dim_mults (robomimic lift/can 40 * (1, 2), square/transport 64 * (1, 2),
      furniture 64 * (1, 2, 4)).

    One addition (docs/deviations.md): any T_a runs. The reference needs T_a divisible by
    2^(len(dim_mults) - 1); here an odd length is cropped back to the skip's length after each
    up-sampling, which leaves every length the reference accepts unchanged.

    Constructor arguments are plain ints/floats/tuples/bools/strings: a checkpoint stores them as a dict
    (`arch`) and rebuilds with `UNet1D(**arch)`.

    action_dim: D_a. cond_dim: T_o * D_o. dim, dim_mults: channels per level dim * m.
    kernel_size: temporal conv width. n_groups: GroupNorm groups (must divide every dim * m).
    time_dim: the denoising-step embedding width (reference `diffusion_step_embed_dim`).
    cond_predict_scale: FiLM scale and bias (True) or bias only. large_cond_encoder: the 3-layer FiLM
    encoder (reference `smaller_encoder: False`). groupnorm_eps: GroupNorm eps (reference 1e-5; 1e-4 in
    its furniture one_leg_low / lamp_low configs). activation: `mish` or `relu` (reference `activation_type`).
    Defaults are the reference configs' values (`cfg/{robomimic,furniture}/pretrain/*/pre_diffusion_unet.yaml`).
    """

    def __init__(self, action_dim: int, cond_dim: int, dim: int = 64, dim_mults: tuple[int, ...] = (1, 2),
                 kernel_size: int = 5, n_groups: int = 8, time_dim: int = 16, cond_predict_scale: bool = True,
                 large_cond_encoder: bool = True, groupnorm_eps: float = 1e-5, activation: str = "mish") -> None:
        super().__init__()
        if activation not in UNET_ACTIVATIONS:
            raise ValueError(f"UNet1D activation {activation!r}: one of {', '.join(UNET_ACTIVATIONS)}")
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 4),
                                      nn.Mish(), nn.Linear(time_dim * 4, time_dim))
        chans = [action_dim] + [dim * m for m in dim_mults]
        levels = list(zip(chans[:-1], chans[1:]))  # (in, out) channels per level

        def block(c_in: int, c_out: int) -> ResidualBlock1D:
            return ResidualBlock1D(c_in, c_out, time_dim + cond_dim, kernel_size, n_groups, cond_predict_scale,
                                   large_cond_encoder, activation, groupnorm_eps)

        self.mid_modules = nn.ModuleList([block(chans[-1], chans[-1]), block(chans[-1], chans[-1])])
        self.down_modules = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            last = i == len(levels) - 1
            self.down_modules.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out),
                Resample1d(c_out, up=False) if not last else nn.Identity()]))
        self.up_modules = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up_modules.append(nn.ModuleList([
                block(c_out * 2, c_in), block(c_in, c_in),
                Resample1d(c_in, up=True)]))
        self.final_conv = nn.Sequential(Conv1dBlock(dim, dim, kernel_size, n_groups, activation, groupnorm_eps),
                                        nn.Conv1d(dim, action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T_a, D_a), t (B,) or scalar, cond (B, cond_dim) or (B, T_o, D_o) -> eps like x."""
        B = x.shape[0]
        t = t.expand(B) if t.dim() == 0 else t
        c = torch.cat([self.time_mlp(t), cond.reshape(B, -1)], dim=-1)
        h = x.transpose(1, 2)  # (B, D_a, T_a): convolve over time
        skips = []
        for res1, res2, downsample in self.down_modules:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid_modules:
            h = res(h, c)
        for res1, res2, upsample in self.up_modules:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, c), c))
            h = h[..., : skips[-1].shape[-1]]  # odd lengths: crop to the next skip's length (a no-op otherwise)
        return self.final_conv(h).transpose(1, 2)
