"""Pixel DPPO (paper §5.3, App. D.5): the ViT networks against the reference's (tests/reference/vit.npz), the
random-shift augmentation, the pixel robomimic env, the per-iteration shift before the old log-probs, gradient
accumulation, and smoke runs of dppo_pretrain_pixel.py / dppo_finetune_pixel.py on Lift at 32×32."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from common.networks import (ViTCritic, ViTEncoder, VisionDiffusionNet, VisionEncoder, random_shift,
                             vit_num_patches)

REF = Path(__file__).parent / "reference"
HAS_ROBOSUITE = importlib.util.find_spec("robosuite") is not None


def _ours_key(ref_key: str) -> str:
    """The reference's state_dict name -> ours (VisionDiffusionMLP / VisionUnet1D / ViTCritic)."""
    k = ref_key.replace("backbone.vit.", "encoder.backbone.").replace("patch_embed.embed.3.", "patch_embed.2.")
    k = k.replace("patch_embed.embed.0.", "patch_embed.0.").replace(".net.0.mha.", ".layers.0.")
    k = k.replace(".net.0.", ".layers.0.")
    for old, new in (("compress1.", "encoder.compress.0."), ("compress2.", "encoder.compress.1."),
                     ("compress.", "encoder.compress.0.")):
        if k.startswith(old):
            k = new + k[len(old):]
    for prefix in ("mlp_mean.", "Q1."):
        if k.startswith(prefix):
            k = k[len(prefix):].replace("layers.1.l1.", "net.1.net.1.").replace("layers.1.l2.", "net.1.net.3.")
            k = ("head.net." if prefix == "mlp_mean." else "net.") + k.replace("layers.", "net.")
    if not k.startswith(("encoder.", "head.", "net.")):
        k = "head." + k  # time embedding, UNet blocks
    return k


def _load_ref(model: torch.nn.Module, ref: dict, prefix: str) -> None:
    theirs = {_ours_key(k[len(prefix):]): torch.as_tensor(v) for k, v in ref.items() if k.startswith(prefix)}
    ours = model.state_dict()
    assert set(theirs) == set(ours), (set(theirs) ^ set(ours))
    model.load_state_dict(theirs)


@pytest.mark.parametrize("case", ["one", "two"])
def test_vision_networks_match_reference(case):
    with np.load(REF / "vit.npz") as f:
        ref = {k: f[k] for k in f.files}
    num_img, h = (1, 24) if case == "one" else (2, 32)
    obs_dim, action_dim = 9 * num_img, 7 * num_img
    enc = dict(cond_dim=obs_dim, num_img=num_img, img_h=h, img_w=h, embed_dim=16, spatial_emb=16)
    mlp = VisionDiffusionNet("mlp", dict(action_dim=action_dim, horizon_steps=4, time_dim=32, mlp_dims=(32,) * 3,
                                         activation="mish"), enc)
    unet = VisionDiffusionNet("unet", dict(action_dim=action_dim, dim=8, dim_mults=(1, 2), time_dim=32), enc)
    critic = ViTCritic(enc, mlp_dims=(32,) * 3)
    for name, model in (("mlp", mlp), ("unet", unet), ("critic", critic)):
        _load_ref(model, ref, f"{case}_{name}/")
        model.eval()
    x, t = torch.as_tensor(ref[f"{case}_x"]), torch.as_tensor(ref[f"{case}_t"])
    cond = {"state": torch.as_tensor(ref[f"{case}_state"]), "rgb": torch.as_tensor(ref[f"{case}_rgb"])}  # uint8
    with torch.no_grad():
        for name, ours in (("mlp_eps", mlp(x, t, cond)), ("unet_eps", unet(x, t, cond)), ("value", critic(cond))):
            diff = (ours - torch.as_tensor(ref[f"{case}_{name}"])).abs().max().item()
            print(f"REFDIFF {case}_{name} {diff:.3e}")
            assert diff < 1e-5, (name, diff)
        # encode once, then the head: the same numbers (what the fine-tuning sampler does)
        assert torch.equal(mlp(x, t, mlp.encode(cond)), mlp(x, t, cond))


def test_random_shift_matches_reference_and_keeps_dtype():
    with np.load(REF / "vit.npz") as f:
        img, expected = torch.as_tensor(f["aug_in"]), torch.as_tensor(f["aug_out"])
    torch.manual_seed(123)  # the reference's RandomShiftsAug draws its shifts from the global generator
    out = random_shift(img, 4)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    assert torch.equal(out.float(), expected.round())  # grid_sample at pixel centres = an exact crop
    assert (expected - expected.round()).abs().max() < 1e-3


def test_random_shift_bounds_and_replicate_padding():
    g = torch.Generator().manual_seed(0)
    n, h, w, pad = 2000, 10, 13, 4  # H != W works too
    base = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(n, 2, h, w)
    out = random_shift(base, pad, g)
    # recover each image's offset from its interior pixel (row 5, col 6): value = r·w + c with clamped r, c
    r, c = out[:, 0, 5, 6].long() // w - 5, out[:, 0, 5, 6].long() % w - 6
    assert r.min() == -pad and r.max() == pad and c.min() == -pad and c.max() == pad  # all 9 offsets seen, none beyond
    assert torch.equal(out[:, 0], out[:, 1])  # one offset per image, all channels
    for i in range(100):  # every output pixel is the source pixel at the clamped (replicate-padded) position
        rows = (torch.arange(h) + r[i]).clamp(0, h - 1)
        cols = (torch.arange(w) + c[i]).clamp(0, w - 1)
        assert torch.equal(out[i, 0], base[0, 0][rows][:, cols])
    counts = torch.bincount((r + pad) * 9 + (c + pad), minlength=81).float()
    assert counts.min() > 0 and counts.max() < 3 * n / 81  # roughly uniform over the 81 offsets


def test_vit_shapes_96_and_other_sizes():
    assert vit_num_patches(96, 96) == 121 and vit_num_patches(84, 84) == 81 and vit_num_patches(32, 48) == 3 * 5
    for (h, w), n in (((96, 96), 1), ((84, 84), 2), ((32, 48), 1)):
        vit = ViTEncoder(3, h, w)
        assert vit(torch.rand(2, 3, h, w) * 255).shape == (2, vit_num_patches(h, w), 128)
        enc = VisionEncoder(cond_dim=9 * n, num_img=n, img_h=h, img_w=w)
        cond = {"state": torch.randn(2, 1, 9 * n), "rgb": torch.randint(0, 256, (2, 1, 3 * n, h, w), dtype=torch.uint8)}
        assert enc(cond).shape == (2, 128 * n + 9 * n) == (2, enc.out_dim)
    # the architecture: one pre-LN layer, 4 heads, 128-d; the cameras share the ViT
    enc = VisionEncoder(cond_dim=18, num_img=2)
    assert len(enc.backbone.layers) == 1 and enc.backbone.layers[0].num_heads == 4 and len(enc.compress) == 2
    assert torch.equal(enc.compress[0].weight, enc.compress[1].weight)  # compress2 starts as a copy (reference)


def test_augmentation_only_in_training_mode():
    torch.manual_seed(0)
    enc = VisionEncoder(cond_dim=9, img_h=32, img_w=32, augment=True)
    cond = {"state": torch.randn(3, 1, 9), "rgb": torch.randint(0, 256, (3, 1, 3, 32, 32), dtype=torch.uint8)}
    enc.eval()
    assert torch.equal(enc(cond), enc(cond))
    enc.train()
    assert not torch.allclose(enc(cond), enc(cond))
