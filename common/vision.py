"""Network blocks for pixel observations (paper App. D.5), loaded only by the pixel scripts: the ViT encoder, the
spatial embedding, random-shift augmentation, the pixel ε-network and critic. Plain `nn.Module`s, rebuilt from the
constructor arguments stored in each checkpoint, as `common/networks.py`'s."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from common.networks import DiffusionMLP, trunk
from common.unet import UNet1D


def random_shift(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-shift augmentation (reference `model/common/modules.py`, `RandomShiftsAug`): pad every image by `pad`
    pixels with replicate padding and crop it back at an offset drawn uniformly from {0..2·pad}² per image.

    x: (n, C, H, W) of any dtype (uint8 images stay uint8). The reference samples the padded image with
    `grid_sample` at integer offsets, which is this crop; here it is an exact gather with clamped indices (a
    replicate-padded pixel is the nearest edge pixel), so it also works for H != W. The offsets are drawn as the
    reference draws them, `randint(0, 2·pad + 1)` per image for (x, y) in that order."""
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=x.device if generator is None
                          else generator.device).to(x.device)
    rows = (shift[:, 1, None] + torch.arange(h, device=x.device) - pad).clamp(0, h - 1)  # (n, H)
    cols = (shift[:, 0, None] + torch.arange(w, device=x.device) - pad).clamp(0, w - 1)  # (n, W)
    out = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def vit_num_patches(img_h: int, img_w: int) -> int:
    """Patches of the conv stem (k8 s4, then k3 s2, no padding): 121 at 96×96, 81 at 84×84."""
    h, w = (img_h - 8) // 4 + 1, (img_w - 8) // 4 + 1
    return ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1)


class ViTLayer(nn.Module):
    """Pre-LN transformer layer (reference `model/common/vit.py`, `TransformerLayer`): x + MHA(LN(x)), then
    x + Linear(GELU(Linear(LN(x)))) with a 4× hidden width; qkv from one Linear laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.layer_norm1 = nn.LayerNorm(dim)
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv_proj(self.layer_norm1(x)).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.linear2(nn.functional.gelu(self.linear1(self.layer_norm2(x))))


class ViTEncoder(nn.Module):
    """Image (B, C, H, W) in [0, 255] -> patch features (B, P, D) (reference `model/common/vit.py`, `VitEncoder` with
    `embed_style: embed2`): x/255 − 0.5; Conv(C→D, k8, s4) → ReLU → Conv(D→D, k3, s2) gives P patches (121 at
    96×96); + learned positional embedding; `depth` pre-LN transformer layers; LayerNorm. Linear weights and the
    positional embedding start as truncated normals (std 0.02), Linear biases at zero, as the reference's."""

    def __init__(self, num_channel: int = 3, img_h: int = 96, img_w: int = 96, embed_dim: int = 128,
                 num_heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.num_patch, self.patch_dim = vit_num_patches(img_h, img_w), embed_dim
        self.patch_embed = nn.Sequential(nn.Conv2d(num_channel, embed_dim, kernel_size=8, stride=4), nn.ReLU(),
                                         nn.Conv2d(embed_dim, embed_dim, kernel_size=3, stride=2))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patch, embed_dim))
        self.layers = nn.Sequential(*[ViTLayer(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x / 255.0 - 0.5).flatten(2).transpose(1, 2)  # (B, P, D), patches row-major
        return self.norm(self.layers(x + self.pos_embed))


class SpatialEmb(nn.Module):
    """Patch features (B, P, D) and proprio (B, D_p) -> (B, proj_dim) (reference `model/common/modules.py`,
    `SpatialEmb`): for every one of the D channels, its vector over the P patches concatenated with the proprio goes
    through Linear → LayerNorm → ReLU to proj_dim; a learned weight per (channel, proj) sums over the channels."""

    def __init__(self, num_patch: int, patch_dim: int, prop_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(num_patch + prop_dim, proj_dim), nn.LayerNorm(proj_dim), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(1, patch_dim, proj_dim))

    def forward(self, feat: torch.Tensor, prop: torch.Tensor) -> torch.Tensor:
        feat = feat.transpose(1, 2)  # (B, D, P)
        feat = torch.cat([feat, prop[:, None].expand(-1, feat.shape[1], -1)], dim=-1)
        return (self.weight * self.input_proj(feat)).sum(1)


class VisionEncoder(nn.Module):
    """cond {"state": (B, T_o, D_p), "rgb": (B, T_o, 3·num_img, H, W) uint8 or float in [0, 255]} -> features
    (B, spatial_emb·num_img + T_o·D_p): one ViT shared by the cameras, a SpatialEmb per camera (the second starts
    as a copy of the first, as the reference's `compress2 = deepcopy(compress1)`), then the proprio appended
    (reference `VisionDiffusionMLP.forward`, `ViTCritic.forward`). The last `img_cond_steps` images of each camera
    are stacked along the channels. `augment`: random shift (pad 4) of every image, in training mode only."""

    def __init__(self, cond_dim: int, num_img: int = 1, img_cond_steps: int = 1, img_h: int = 96, img_w: int = 96,
                 embed_dim: int = 128, num_heads: int = 4, depth: int = 1, spatial_emb: int = 128,
                 augment: bool = False) -> None:
        super().__init__()
        self.num_img, self.img_cond_steps, self.augment = num_img, img_cond_steps, augment
        self.backbone = ViTEncoder(3 * img_cond_steps, img_h, img_w, embed_dim, num_heads, depth)
        first = SpatialEmb(self.backbone.num_patch, embed_dim, cond_dim, spatial_emb)
        self.compress = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_img - 1)])
        self.out_dim = spatial_emb * num_img + cond_dim

    def forward(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        state = cond["state"].reshape(cond["state"].shape[0], -1).to(dtype)  # uint8 images / float state -> weights' dtype
        rgb = cond["rgb"][:, -self.img_cond_steps:]
        B, T, C, H, W = rgb.shape
        # (B, T, num_img·3, H, W) -> (num_img·B, T·3, H, W), camera-major: camera 0 of every sample first
        rgb = rgb.reshape(B, T, self.num_img, 3, H, W).permute(2, 0, 1, 3, 4, 5).reshape(self.num_img * B, T * 3, H, W)
        if self.augment and self.training:
            rgb = random_shift(rgb)
        feat = self.backbone(rgb.to(dtype)).view(self.num_img, B, self.backbone.num_patch, -1)
        return torch.cat([emb(feat[i], state) for i, emb in enumerate(self.compress)] + [state], dim=-1)


class VisionDiffusionNet(nn.Module):
    """ε_θ(x_t, t, cond) on pixels: `VisionEncoder` features as the condition of a `DiffusionMLP` (reference
    `VisionDiffusionMLP`) or a `UNet1D` (reference `VisionUnet1D`); `head_arch` holds the head's own arguments
    (its obs_dim / cond_dim are the encoder's output). `encode` and `head` are split so that a sampler can encode
    the observation once for all denoising steps of one network."""

    def __init__(self, head: str, head_arch: dict, encoder_arch: dict) -> None:
        super().__init__()
        self.encoder = VisionEncoder(**encoder_arch)
        if head == "mlp":
            self.head = DiffusionMLP(**{**head_arch, "obs_dim": self.encoder.out_dim, "cond_steps": 1})
        elif head == "unet":
            self.head = UNet1D(**{**head_arch, "cond_dim": self.encoder.out_dim})
        else:
            raise ValueError(f"unknown head {head!r} (mlp or unet)")

    def encode(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """cond: the observation dict, or its features from `encode`."""
        return self.head(x, t, cond if isinstance(cond, torch.Tensor) else self.encoder(cond))


class ViTCritic(nn.Module):
    """V(s) on pixels (reference `model/common/critic.py`, `ViTCritic`): its own `VisionEncoder` (no augmentation)
    and a residual Mish MLP ([256]×3) -> (B,)."""

    def __init__(self, encoder_arch: dict, mlp_dims: tuple[int, ...] = (256, 256, 256), activation: str = "mish",
                 residual: bool = True) -> None:
        super().__init__()
        self.encoder = VisionEncoder(**{**encoder_arch, "augment": False})
        self.net = trunk(self.encoder.out_dim, list(mlp_dims), 1, activation, residual)

    def forward(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.encoder(cond)).squeeze(-1)
