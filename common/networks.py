"""Network blocks shared by the scripts (paper App. D.1): MLP trunks, the ε-network `DiffusionMLP` (the UNet:
`common/unet.py`), the critics and the Gaussian/GMM backbones (pixel observations: `common/vision.py`). Plain
`nn.Module`s, rebuilt from a dict of plain constructor arguments stored in each checkpoint (`DiffusionMLP(**arch)`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import UsageError
from common.layers import ACTIVATIONS, SinusoidalPosEmb


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


def build_diffusion_network(ckpt: dict, horizon_steps: int) -> nn.Module:
    """The ε-network a diffusion checkpoint's header describes (`backbone`, `arch`): a `DiffusionMLP`,
    or a `UNet1D`, whose convolutions also run at another chunk length T_a than pre-training's."""
    arch = dict(ckpt["arch"])
    if ckpt["backbone"] == "unet":
        from common.unet import UNet1D  # loaded only by UNet runs

        return UNet1D(**arch)
    if horizon_steps != arch["horizon_steps"]:
        raise UsageError(f"an MLP policy predicts T_a = {arch['horizon_steps']}; --horizon-steps {horizon_steps} needs a UNet")
    return DiffusionMLP(**arch)
