"""Network blocks shared by the scripts (paper App. D.1): MLP trunks, the ε-networks (`DiffusionMLP`, `UNet1D`), the
critics and the Gaussian/GMM backbones (pixel observations: `common/vision.py`). Plain `nn.Module`s, rebuilt from a dict
of plain constructor arguments stored in each checkpoint (`DiffusionMLP(**arch)`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from common.errors import UsageError

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


def MLP(dims: list[int], activation: str = "mish", out_activation: bool = False) -> nn.Sequential:
    """Plain MLP: Linear(dims[0], dims[1]) -> act -> ... -> Linear(dims[-2], dims[-1])."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or out_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + Linear(act(LN(Linear(act(LN(x)))))), the LayerNorms optional.

    As in the reference implementation (irom-princeton/dppo, model/common/mlp.py,
    TwoLayerPreActivationResNetLinear): with `use_layernorm` there are two LayerNorms (eps 1e-6), one
    before each activation, registered after the two Linears (the same parameter order)."""

    def __init__(self, dim: int, activation: str, use_layernorm: bool = False) -> None:
        super().__init__()
        # the second ReLU may overwrite its input, a fresh tensor no backward needs (one buffer less)
        self.net = nn.Sequential(ACTIVATIONS[activation](), nn.Linear(dim, dim),
                                 nn.ReLU(inplace=True) if activation == "relu" else ACTIVATIONS[activation](),
                                 nn.Linear(dim, dim))
        if use_layernorm:
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm1 = self.norm2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[1](self.net[0](self.norm1(x)))
        return x + self.net[3](self.net[2](self.norm2(h)))


class ResidualMLP(nn.Module):
    """paper App. D.1 trunk: Linear(in, h), (L-1)/2 residual blocks, Linear(h, out) for L hidden layers
    of width h ([512]x3 -> one block, [1024]x7 -> three)."""

    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int, activation: str = "mish",
                 use_layernorm: bool = False) -> None:
        super().__init__()
        h = hidden_dims[0]
        assert all(d == h for d in hidden_dims), "residual MLP needs equal hidden widths"
        blocks = [ResidualBlock(h, activation, use_layernorm) for _ in range((len(hidden_dims) - 1) // 2)]
        self.net = nn.Sequential(nn.Linear(in_dim, h), *blocks, nn.Linear(h, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def trunk(in_dim: int, hidden_dims: list[int], out_dim: int, activation: str, residual: bool,
          use_layernorm: bool = False) -> nn.Module:
    if residual:
        return ResidualMLP(in_dim, hidden_dims, out_dim, activation, use_layernorm)
    return MLP([in_dim, *hidden_dims, out_dim], activation)


class DiffusionMLP(nn.Module):
    """ε-prediction network ε_θ(x_t, t, obs) (paper App. D.1); with a float time t in [0, 1], the velocity network
    v_θ(x_t, t, obs) of a flow policy, ReinFlow's `FlowMLP` (model/flow/mlp_flow.py; tests/reference/README.md).

    x: (B, T_a, D_a), t: (B,) integer denoising step or float flow time, cond: (B, T_o, D_o) -> ε̂ or v̂ (B, T_a, D_a).
    """

    def __init__(self, action_dim: int, horizon_steps: int, obs_dim: int, cond_steps: int = 1,
                 time_dim: int = 16, mlp_dims: tuple[int, ...] = (512, 512, 512),
                 cond_mlp_dims: tuple[int, ...] | None = None, activation: str = "relu",
                 residual: bool = True, use_layernorm: bool = False) -> None:
        super().__init__()
        self.action_dim, self.horizon_steps = action_dim, horizon_steps
        self.time_embedding = nn.Sequential(SinusoidalPosEmb(time_dim), nn.Linear(time_dim, time_dim * 2),
                                            nn.Mish(), nn.Linear(time_dim * 2, time_dim))
        cond_dim = obs_dim * cond_steps
        if cond_mlp_dims:  # observation encoder: the network's activation between layers, none after the last
            # (reference: model/diffusion/mlp_diffusion.py, DiffusionMLP.__init__)
            self.cond_mlp: nn.Module = MLP([cond_dim, *cond_mlp_dims], activation)
            cond_dim = cond_mlp_dims[-1]
        else:
            self.cond_mlp = nn.Identity()
        in_dim = action_dim * horizon_steps + time_dim + cond_dim
        self.net = trunk(in_dim, list(mlp_dims), action_dim * horizon_steps, activation, residual, use_layernorm)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = torch.cat([x.reshape(B, -1), self.time_embedding(t), self.cond_mlp(cond.reshape(B, -1))], dim=-1)
        return self.net(h).view(B, self.horizon_steps, self.action_dim)


class ObsCritic(nn.Module):
    """V(s) on the environment observation only (eq. 4.8): (B, T_o, D_o) -> (B,)."""

    def __init__(self, obs_dim: int, cond_steps: int = 1, mlp_dims: tuple[int, ...] = (256, 256, 256),
                 activation: str = "mish", residual: bool = True, use_layernorm: bool = False) -> None:
        super().__init__()
        self.net = trunk(obs_dim * cond_steps, list(mlp_dims), 1, activation, residual, use_layernorm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.reshape(obs.shape[0], -1)).squeeze(-1)


class DoubleQCritic(nn.Module):
    """Two Q(s, a) heads over concat(obs, flattened executed chunk): -> (q1, q2), each (B,)."""

    def __init__(self, obs_dim: int, action_dim: int, act_steps: int, cond_steps: int = 1,
                 mlp_dims: tuple[int, ...] = (256, 256, 256), activation: str = "mish",
                 residual: bool = True, use_layernorm: bool = False) -> None:
        super().__init__()
        in_dim = obs_dim * cond_steps + action_dim * act_steps
        self.q1 = trunk(in_dim, list(mlp_dims), 1, activation, residual, use_layernorm)
        self.q2 = trunk(in_dim, list(mlp_dims), 1, activation, residual, use_layernorm)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs.reshape(obs.shape[0], -1), action.reshape(action.shape[0], -1)], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ChunkMLP(nn.Module):
    """Observation -> action chunk for Gaussian / GMM policies (paper App. D.6), MLP backbone.

    cond (B, T_o, D_o) -> (chunk (B, T_a, out_dim), extra (B, n_extra)); `extra` carries e.g. the
    mixture logits (an empty (B, 0) tensor when n_extra = 0).
    """

    def __init__(self, obs_dim: int, horizon_steps: int, out_dim: int, cond_steps: int = 1, n_extra: int = 0,
                 mlp_dims: tuple[int, ...] = (512, 512, 512), activation: str = "relu", residual: bool = True,
                 use_layernorm: bool = False) -> None:
        super().__init__()
        self.horizon_steps, self.out_dim, self.n_extra = horizon_steps, out_dim, n_extra
        self.net = trunk(obs_dim * cond_steps, list(mlp_dims), horizon_steps * out_dim + n_extra, activation,
                         residual, use_layernorm)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = cond.shape[0]
        h = self.net(cond.reshape(B, -1))
        chunk = h[:, : self.horizon_steps * self.out_dim].view(B, self.horizon_steps, self.out_dim)
        return chunk, h[:, h.shape[1] - self.n_extra:]


class ChunkTransformer(nn.Module):
    """Decoder-only (GPT-style) Transformer over the action chunk (paper App. D.6), same interface as ChunkMLP.

    Tokens: the T_o observations (Linear embedding + learned position) followed by T_a learned chunk
    positional embeddings; pre-LN causal self-attention, no dropout. Output at the T_a chunk tokens
    -> (B, T_a, out_dim); `extra` (B, n_extra) is read from the last observation token.
    """

    def __init__(self, obs_dim: int, horizon_steps: int, out_dim: int, cond_steps: int = 1, n_extra: int = 0,
                 n_emb: int = 128, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.horizon_steps, self.cond_steps, self.n_extra = horizon_steps, cond_steps, n_extra
        self.obs_emb = nn.Linear(obs_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, cond_steps + horizon_steps, n_emb))
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(n_emb, n_heads, 4 * n_emb, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, out_dim)
        self.extra_head = nn.Linear(n_emb, n_extra) if n_extra else None
        L = cond_steps + horizon_steps
        self.register_buffer("mask", torch.triu(torch.full((L, L), float("-inf")), diagonal=1), persistent=False)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = cond.shape[0]
        tokens = torch.cat([self.obs_emb(cond), self.pos_emb.new_zeros(B, self.horizon_steps, self.pos_emb.shape[2])], 1)
        h = self.norm(self.blocks(tokens + self.pos_emb, mask=self.mask))
        last_obs = h[:, self.cond_steps - 1]
        return self.head(h[:, self.cond_steps:]), (self.extra_head(last_obs) if self.extra_head else last_obs[:, :0])


# ---- UNet1D (paper App. D.1): a temporal U-Net over the action chunk ----

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


def build_diffusion_network(ckpt: dict, horizon_steps: int) -> nn.Module:
    """The ε-network a diffusion checkpoint's header describes (`backbone`, `arch`): a `DiffusionMLP`,
    or a `UNet1D`, whose convolutions also run at another chunk length T_a than pre-training's."""
    arch = dict(ckpt["arch"])
    if ckpt["backbone"] == "unet":
        return UNet1D(**arch)
    if horizon_steps != arch["horizon_steps"]:
        raise UsageError(f"an MLP policy predicts T_a = {arch['horizon_steps']}; --horizon-steps {horizon_steps} needs a UNet")
    return DiffusionMLP(**arch)
