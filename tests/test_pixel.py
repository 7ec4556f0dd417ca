"""Pixel DPPO (paper §5.3, App. D.5): the ViT networks against the reference's (tests/reference/vit.npz), the
random-shift augmentation, the pixel robomimic env, the per-iteration shift before the old log-probs, gradient
accumulation, and smoke runs of dppo_pretrain_pixel.py / dppo_finetune_pixel.py on Lift at 32×32."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.vision import (ViTCritic, ViTEncoder, VisionDiffusionNet, VisionEncoder, random_shift,
                             vit_num_patches)
from tests.helpers import float64_forward

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
        for name, model, inputs in (("mlp_eps", mlp, (x, t, cond)), ("unet_eps", unet, (x, t, cond)),
                                    ("value", critic, (cond,))):
            ours, exact = model(*inputs).double(), float64_forward(model, *inputs)
            ref_out = torch.as_tensor(ref[f"{case}_{name}"]).double()
            diff, rounding = (exact - ref_out).abs().max().item(), (ours - exact).abs().max().item()
            print(f"REFDIFF {case}_{name} {diff:.3e} (our float32 from our float64: {rounding:.3e})")
            # fidelity at 1e-5 on every CPU: the reference's float32 output against the function our network computes,
            # evaluated in float64 (tests/reference/README.md, "Tolerances"); then our float32 path against it: the
            # U-Net's GroupNorm over short sequences amplifies rounding (0.3e-6 to 1.4e-5 measured across kernel
            # instruction sets, while float64 stays 2.2e-6 from the reference), so 1e-4 (a wrong join gives >= 1e-3)
            assert diff <= 1e-5, (name, diff)
            assert rounding <= 1e-4, (name, rounding)
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


# ---- the pixel env, the scripts (need robosuite and offscreen rendering; 32×32 images, 2 envs) ----

needs_robosuite = pytest.mark.skipif(not HAS_ROBOSUITE, reason="robosuite not installed")
TINY_PRE = dict(n_epochs=2, batch_size=32, mlp_dims=(64, 64, 64), embed_dim=32, spatial_emb=16, eval_every=0, seed=0)
TINY_FT = dict(num_envs=2, n_steps=3, n_workers=1, val_freq=0, eval_n_steps=2, batch_size=15, grad_accumulate=2,
               logprob_batch_size=4, update_epochs=2)


@pytest.fixture(scope="module")
def pixel_pretrained(tmp_path_factory):
    """Two scripted Lift demos rendered at 32×32 and a tiny pixel policy pre-trained on them for 2 epochs."""
    from scripts.robomimic_demos import generate_demos
    import dppo_pretrain_pixel as ptp
    folder = tmp_path_factory.mktemp("pixel")
    os.chdir(folder)
    generate_demos("lift", 2, 0, folder / "demos.hdf5", image_size=32, log=None)
    out = ptp.main(ptp.Args(dataset=str(folder / "demos.hdf5"), output=str(folder / "pre.pt"), **TINY_PRE))
    return {**out, "release": str(folder / "pre.pt"), "dataset": str(folder / "demos.hdf5")}


@needs_robosuite
def test_pixel_env_observations():
    from sims.robomimic import PixelChunkVecEnv, make_robomimic_env
    env = make_robomimic_env("lift-img", seed=0, image_size=(32, 40))
    obs, _ = env.reset(seed=3)
    assert obs["state"].shape == (9,) and obs["state"].dtype == np.float32
    assert obs["rgb"].shape == (3, 32, 40) and obs["rgb"].dtype == np.uint8 and obs["rgb"].std() > 0
    raw = env.raw_obs  # proprio = eef pos, quat, gripper; image = the wrist camera's HWC frame, upright, as CHW
    assert np.allclose(obs["state"], np.concatenate([raw["robot0_eef_pos"], raw["robot0_eef_quat"],
                                                     raw["robot0_gripper_qpos"]]))
    # robomimic's EnvRobosuite flips MuJoCo's bottom-up rows (di[k][::-1]); its datasets and the reference's envs
    # hold upright images
    assert np.array_equal(obs["rgb"], raw["robot0_eye_in_hand_image"][::-1].transpose(2, 0, 1))
    assert not np.array_equal(obs["rgb"], raw["robot0_eye_in_hand_image"].transpose(2, 0, 1))
    env.close()
    envs = PixelChunkVecEnv("lift-img", 2, seed=0, image_size=32, act_steps=4)
    o = envs.reset(seed=5)
    o2, r, term, trunc, info = envs.step(np.zeros((2, 4, 7)))
    assert o["rgb"].shape == (2, 1, 3, 32, 32) and o2["state"].shape == (2, 1, 9) and r.shape == (2,)
    assert np.array_equal(info["final_obs"]["rgb"], o2["rgb"])  # no episode ended
    assert np.array_equal(envs.reset(seed=5)["rgb"], o["rgb"])  # seeded resets reproduce the images
    envs.close()


@needs_robosuite
def test_missing_gl_backend_is_one_line(monkeypatch):
    import sims.robomimic as rm
    from common.errors import TaskError
    robosuite = rm._import_robosuite()

    def broken(*a, **kw):
        if kw.get("has_offscreen_renderer"):
            raise ImportError("Cannot initialize a EGL device display. This likely means that your EGL driver does not "
                              "support the PLATFORM_DEVICE extension.\nmore")
        raise AssertionError("the state env must not be affected")
    monkeypatch.setattr(robosuite, "make", broken)
    with pytest.raises(TaskError) as e:
        rm.make_robomimic_env("lift-img")
    msg = str(e.value)
    assert "\n" not in msg and "EGL" in msg and "OSMesa" in msg and "apt-get install" in msg


@needs_robosuite
def test_pixel_pretrain_and_finetune_smoke(pixel_pretrained, monkeypatch):
    import dppo_finetune_pixel as ftp
    from loaders.datasets import load_task_dataset
    from common.tasks import get_task
    trajs, _ = load_task_dataset(get_task("lift-img"), pixel_pretrained["dataset"])
    assert trajs[0]["images"].shape[1:] == (3, 32, 32) and trajs[0]["images"].dtype == np.uint8
    assert trajs[0]["obs"].shape[1] == 9
    assert len(pixel_pretrained["losses"]) == 2 and all(np.isfinite(pixel_pretrained["losses"]))
    ckpt = torch.load(pixel_pretrained["release"], weights_only=True)
    assert ckpt["backbone"] == "vit-mlp" and ckpt["denoising_steps"] == 100
    assert ckpt["arch"]["encoder_arch"]["img_h"] == 32 and ckpt["arch"]["encoder_arch"]["augment"]

    # record the order of the per-iteration shift and the old log-probs, and the update's minibatch log-probs
    events = []
    real_shift, real_lp = ftp.shift_images_, ftp.pair_logprobs

    def shift(rgb, *a, **kw):
        before = rgb.clone()
        real_shift(rgb, *a, **kw)
        events.append(("shift", bool((before != rgb).any()), rgb.flatten(0, 1).clone()))
    monkeypatch.setattr(ftp, "shift_images_", shift)
    real_encode = ftp.VisionDiffusionNet.encode
    monkeypatch.setattr(ftp.VisionDiffusionNet, "encode", lambda self, cond: events.append(
        ("encode", cond["rgb"].clone(), torch.is_grad_enabled())) or real_encode(self, cond))
    monkeypatch.setattr(ftp, "pair_logprobs", lambda *a: events.append(("lp", torch.is_grad_enabled())) or real_lp(*a))
    out = ftp.main(ftp.Args(checkpoint=pixel_pretrained["release"], n_train_itr=2, n_critic_warmup_itr=1, seed=0, **TINY_FT))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(h[i][k]) for i in range(2) for k in ("pg_loss", "v_loss", "approx_kl"))
    # iteration 0 is critic warm-up: the actor does not move, so the update's log-probs equal the old ones (same
    # shifted images, no augmentation inside the networks) up to float32 rounding: the minibatch is another batch
    # shape than the rollout's, which some CPUs' kernels sum in another order (|KL| 4e-9 seen); iteration 1 moves it
    assert abs(h[0]["approx_kl"]) < 1e-6 and h[0]["clipfrac"] == 0.0 and h[1]["approx_kl"] > 1e-6
    # per iteration: one shift that changed the stored images, before the old log-probs (no grad), then the update
    # the images the networks see after a shift are the shifted buffer's: the first old log-prob batch's
    for k, e in enumerate(events):
        if e[0] == "shift":
            rgb = next(x[1] for x in events[k:] if x[0] == "encode")
            assert torch.equal(rgb, e[2][:len(rgb)])
    per_itr = [e[:2] for e in events if e[0] == "shift" or e == ("lp", False)]
    shifts = [i for i, e in enumerate(per_itr) if e[0] == "shift"]
    assert len(shifts) == 2 and all(e[1] for e in per_itr if e[0] == "shift")
    assert all(per_itr[i + 1] == ("lp", False) for i in shifts)
    first_update = next(i for i, e in enumerate(events) if e == ("lp", True))
    first_shift = next(i for i, e in enumerate(events) if e[:2] == ("shift", True))
    assert first_shift < next(i for i, e in enumerate(events) if e == ("lp", False)) < first_update
    # checkpoint reloads; eval.csv has the final row; the frozen base is untouched
    ft_ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ft_ckpt["itr"] == 2 and len(out["eval_rows"]) == 1
    assert all(torch.equal(ft_ckpt["base"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    assert any(not torch.equal(ft_ckpt["actor_ft"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    assert any(not torch.equal(ft_ckpt["actor_ft"][k], v) for k, v in ckpt["ema"].items() if k.startswith("encoder."))
    assert any(e[0] == "encode" and e[2] for e in events)  # the update encodes with gradients (actor_ft's encoder)
    # --eval-only on the fine-tuned checkpoint, and the checks of bad input
    ev = ftp.main(ftp.Args(checkpoint=out["checkpoint"], eval_only=True, **TINY_FT))
    assert set(ev["eval"]) == {"deterministic", "stochastic"}


@needs_robosuite
def test_pixel_finetune_wiring_of_gae_and_the_loss(pixel_pretrained, monkeypatch):
    """One iteration of 3 chunk-steps with 8-step episodes (T_e = 4: every env truncated at chunk-step 1), γ 0.97,
    λ 0.9, one minibatch of all 30 pairs: GAE gets no termination as its cut but the truncations as dones, and as
    next values V(s_{t+1}) inside an episode and V(final observation) at the truncation and at the iteration's last
    step; the loss gets each env-step's GAE advantage once per fine-tuned denoising step, normalised over the minibatch
    and discounted by γ_denoise^(K'-i-1)."""
    import dppo_finetune_pixel as ftp
    steps, values, gaes, advs = [], [], [], []
    real_env, real_critic, real_gae, real_loss = ftp.PixelChunkVecEnv, ftp.ViTCritic, ftp.compute_gae, ftp.ppo_loss

    class Envs(real_env):
        def step(self, action):
            out = super().step(action)
            steps.append(dict(reward=out[1].copy(), term=out[2].copy(), trunc=out[3].copy(),
                              final_rgb=out[4]["final_obs"]["rgb"].copy()))
            return out

    class Critic(real_critic):
        def forward(self, cond):
            v = super().forward(cond)
            if not torch.is_grad_enabled():
                values.append((cond["rgb"].clone(), v))
            return v

    def compute_gae(*a):
        out = real_gae(*a)
        gaes.append((a, out))
        return out
    for name, f in (("PixelChunkVecEnv", Envs), ("ViTCritic", Critic), ("compute_gae", compute_gae),
                    ("ppo_loss", lambda new_lp, old_lp, adv, *a: advs.append(adv) or real_loss(new_lp, old_lp, adv, *a))):
        monkeypatch.setattr(ftp, name, f)
    kw = {**TINY_FT, "batch_size": 30, "grad_accumulate": 1, "update_epochs": 1, "logprob_batch_size": 6}
    ftp.main(ftp.Args(checkpoint=pixel_pretrained["release"], n_train_itr=1, n_critic_warmup_itr=0, seed=0,
                      max_episode_steps=8, gamma=0.97, gae_lambda=0.9, **kw))
    (rewards, v, next_v, cut, dones, gamma, lam), (adv, _) = gaes[0]
    term = np.stack([s["term"] for s in steps[:3]])
    done = np.stack([s["term"] | s["trunc"] for s in steps[:3]])
    assert done[1].all() and done.sum() == 2 and not term.any()
    assert rewards.shape == (3, 2)
    assert torch.equal(cut, torch.zeros(3, 2)) and torch.equal(dones, torch.as_tensor(done, dtype=torch.float32))
    assert (gamma, lam) == (0.97, 0.9)
    # the critic's calls before GAE: V of the 6 stored observations, then of the final observations at steps 1 and 2
    (_, v_all), (rgb1, v1), (rgb2, v2) = values[-3:]
    assert torch.equal(v, v_all.view(3, 2)) and torch.equal(next_v[0], v[1])
    assert torch.equal(next_v[1], v1) and torch.equal(rgb1, torch.as_tensor(steps[1]["final_rgb"]))
    assert torch.equal(next_v[2], v2) and torch.equal(rgb2, torch.as_tensor(steps[2]["final_rgb"]))
    assert not torch.equal(next_v[1], v[2])  # the truncation bootstraps from its own episode, not the reset one
    (a,) = advs  # the minibatch of all 30 pairs: each env-step's advantage once per DDIM step, normalised, discounted
    pairs = adv.flatten().repeat_interleave(5)
    expected = (pairs - pairs.mean()) / (pairs.std() + 1e-8) * ftp.denoising_discount(5, 0.99).repeat(6)
    torch.testing.assert_close(a.sort().values, expected.sort().values)


@needs_robosuite
def test_gradient_accumulation_equals_one_big_batch(pixel_pretrained, monkeypatch):
    """The critic's gradient at its optimiser step: 2 accumulated minibatches of 15 pairs = one of 30 (same
    permutation, so the same pairs); the value loss has no per-minibatch statistics, unlike the policy loss."""
    import dppo_finetune_pixel as ftp
    real = ftp.runs.optimizer_with_schedule

    def run(batch_size: int, grad_accumulate: int) -> list[torch.Tensor]:
        grads = []

        def recording(module, *a, **kw):
            opt, sched = real(module, *a, **kw)
            if isinstance(module, ftp.ViTCritic):
                opt.register_step_pre_hook(
                    lambda opt, *_: grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]).clone()))
            return opt, sched
        monkeypatch.setattr(ftp.runs, "optimizer_with_schedule", recording)
        kw = {**TINY_FT, "batch_size": batch_size, "grad_accumulate": grad_accumulate, "update_epochs": 1}
        ftp.main(ftp.Args(checkpoint=pixel_pretrained["release"], n_train_itr=1, n_critic_warmup_itr=0, seed=0, **kw))
        return grads

    accumulated, big = run(15, 2), run(30, 1)
    assert len(accumulated) == len(big) == 1  # one optimiser step each: 30 pairs = n_steps 3 x envs 2 x K' 5
    assert torch.allclose(accumulated[0], big[0], atol=1e-6, rtol=1e-5)
    assert big[0].abs().max() > 1e-4
    single = run(15, 1)  # without accumulation: two steps, on half the pairs each -> another gradient
    assert len(single) == 2 and not torch.allclose(single[0], big[0], atol=1e-6, rtol=1e-5)


@needs_robosuite
def test_pixel_scripts_refuse_bad_input(pixel_pretrained, tmp_path):
    import dppo_finetune_pixel as ftp
    import dppo_pretrain_pixel as ptp
    from common.errors import DatasetError
    from common.errors import UsageError
    with pytest.raises(UsageError, match="dppo_finetune.py"):
        ftp.main(ftp.Args(env_id="lift", checkpoint=pixel_pretrained["release"]))
    with pytest.raises(UsageError, match="dppo_pretrain.py"):
        ptp.main(ptp.Args(env_id="lift", dataset=pixel_pretrained["dataset"]))
    import dppo_finetune as ft
    import dppo_pretrain as pt
    from common.errors import TaskError
    with pytest.raises(TaskError, match="dppo_finetune_pixel.py"):
        ft.main(ft.Args(env_id="lift-img"))
    with pytest.raises(TaskError, match="dppo_pretrain_pixel.py"):
        pt.main(pt.Args(env_id="lift-img"))
    with pytest.raises(UsageError, match="--checkpoint"):
        ftp.main(ftp.Args())
    with pytest.raises(UsageError, match="batch-size"):
        ftp.main(ftp.Args(checkpoint=pixel_pretrained["release"], **{**TINY_FT, "batch_size": 31}))
    with pytest.raises(DatasetError, match="lift-img"):  # a checkpoint of another task
        ftp.main(ftp.Args(env_id="can-img", checkpoint=pixel_pretrained["release"], **TINY_FT))
    state_demos = tmp_path / "state.hdf5"
    from scripts.robomimic_demos import generate_demos
    generate_demos("lift", 1, 0, state_demos, log=None)
    with pytest.raises(DatasetError, match="image"):  # a state dataset has no camera images
        ptp.main(ptp.Args(dataset=str(state_demos), **TINY_PRE))


class _FeatureNet(torch.nn.Module):
    """A pixel network seen as a state network: `cond` is already the encoder's features."""

    def __init__(self, net: VisionDiffusionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, t, cond):
        return self.net(x, t, cond)


@pytest.mark.parametrize("head", ["mlp", "unet"])
def test_pixel_ddim_matches_the_state_scripts_ddim(head):
    """PixelDiffusionPPO's DDIM steps, chains and log-probs are dppo_finetune.DiffusionPPO's (whose DDIM is checked
    against the reference in tests/reference/ddim_furniture.npz) on the encoder's features; two cameras, T_a 8."""
    import dppo_finetune as ft
    import dppo_finetune_pixel as ftp
    torch.manual_seed(0)
    enc = dict(cond_dim=18, num_img=2, img_h=32, img_w=32, embed_dim=32, spatial_emb=16)
    head_arch = (dict(action_dim=14, horizon_steps=8, time_dim=32, mlp_dims=(64,) * 3, activation="mish") if head == "mlp"
                 else dict(action_dim=14, dim=16, dim_mults=(1, 2), time_dim=32))
    net = VisionDiffusionNet(head, head_arch, enc)
    critic = ViTCritic(enc, mlp_dims=(32,) * 3)
    pix = ftp.PixelDiffusionPPO(net, critic, 100, 5, 8, 14, 0.1, 0.1, 3.0).eval()
    ref = ft.DiffusionPPO(_FeatureNet(net), torch.nn.Identity(), 100, 5, 8, 14, True, 5, 0.1, 0.1, 3.0).eval()
    cond = {"state": torch.randn(3, 1, 18), "rgb": torch.randint(0, 256, (3, 1, 6, 32, 32), dtype=torch.uint8)}
    feat = net.encode(cond)
    for deterministic in (False, True):
        torch.manual_seed(1)
        x, chain = pix.get_action(cond, deterministic)
        torch.manual_seed(1)
        x_ref, chain_ref = ref.get_action(feat, deterministic)
        assert chain.shape == (3, 6, 8, 14) and torch.allclose(chain, chain_ref, atol=1e-6)
    i = torch.tensor([0, 2, 4])
    with torch.no_grad():
        lp = pix.get_logprobs(feat, chain[torch.arange(3), i], chain[torch.arange(3), i + 1], i)
        lp_ref = ref.get_logprobs(feat, chain[torch.arange(3), i], chain[torch.arange(3), i + 1], i)
    assert torch.allclose(lp, lp_ref, atol=1e-6)
    assert pix.get_value(cond).shape == (3,)


def test_pixel_dataset_from_reference_train_npz(tmp_path):
    """The reference's image train.npz (`images` N×C×H×W): loaded per trajectory for the -img task; float images of
    whole numbers in [0, 255] become uint8, images in [0, 1] and a file without images are refused in one line."""
    import dppo_pretrain_pixel as ptp
    from common.errors import DatasetError
    from loaders.datasets import load_task_dataset, save_train_npz
    from common.tasks import get_task
    rng = np.random.default_rng(0)
    trajs = [{"obs": rng.standard_normal((n, 9)).astype(np.float32), "actions": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
              "images": rng.integers(0, 256, (n, 3, 20, 20)).astype(np.uint8)} for n in (5, 7)]
    save_train_npz(str(tmp_path / "train.npz"), trajs)
    loaded, _ = load_task_dataset(get_task("lift-img"), str(tmp_path / "train.npz"))
    assert [t["images"].shape for t in loaded] == [(5, 3, 20, 20), (7, 3, 20, 20)]
    assert np.array_equal(loaded[1]["images"], trajs[1]["images"])
    for t in trajs:
        t["images"] = t["images"].astype(np.float32)
    save_train_npz(str(tmp_path / "float.npz"), trajs)
    got, _ = ptp.load_pixel_dataset(get_task("lift-img"), str(tmp_path / "float.npz"), None)
    assert got[0]["images"].dtype == np.uint8 and np.array_equal(got[0]["images"], trajs[0]["images"])
    for t in trajs:
        t["images"] = t["images"] / 255.0
    save_train_npz(str(tmp_path / "unit.npz"), trajs)
    with pytest.raises(DatasetError, match=r"uint8.*\[0, 255\]"):
        ptp.load_pixel_dataset(get_task("lift-img"), str(tmp_path / "unit.npz"), None)
    with pytest.raises(DatasetError, match="images"):  # the -img task on a state train.npz
        save_train_npz(str(tmp_path / "state.npz"), [{k: v for k, v in t.items() if k != "images"} for t in trajs])
        load_task_dataset(get_task("lift-img"), str(tmp_path / "state.npz"))
    with pytest.raises(DatasetError, match=r"\(6, H, W\)"):  # one camera's images for the two-camera Transport
        t2 = [{"obs": np.zeros((5, 18), np.float32), "actions": np.zeros((5, 14), np.float32),
               "images": np.zeros((5, 3, 20, 20), np.uint8)}]
        save_train_npz(str(tmp_path / "t.npz"), t2)
        ptp.load_pixel_dataset(get_task("transport-img"), str(tmp_path / "t.npz"), None)


@needs_robosuite
def test_pixel_finetune_resume_matches_uninterrupted(pixel_pretrained):
    import dppo_finetune_pixel as ftp
    from tests.helpers import assert_resumed_run_matches
    kw = dict(checkpoint=pixel_pretrained["release"], n_critic_warmup_itr=0, seed=3, **TINY_FT)
    full = ftp.main(ftp.Args(n_train_itr=2, **kw))
    part = ftp.main(ftp.Args(n_train_itr=1, **kw))
    resumed = ftp.main(ftp.Args(resume=part["run_dir"], n_train_itr=2))
    assert_resumed_run_matches(full, resumed, n_eval_rows=1)


@needs_robosuite
def test_pixel_capture_video_same_numbers(pixel_pretrained, tmp_path, monkeypatch):
    """--capture-video on a pixel task: the same evaluation numbers with and without it (the policy's own camera
    images are untouched), and MP4s of the recorded episodes in a new run folder (eval-only)."""
    import imageio.v3 as iio

    import dppo_finetune_pixel as ftp
    monkeypatch.chdir(tmp_path)
    base = dict(checkpoint=pixel_pretrained["release"], eval_only=True, seed=3, max_episode_steps=8,
                **{**TINY_FT, "eval_n_steps": 3})
    plain = ftp.main(ftp.Args(**base))["eval"]
    recorded = ftp.main(ftp.Args(**base, capture_video=True))["eval"]
    for mode in ("deterministic", "stochastic"):
        for key in ("return_mean", "return_std", "success_rate", "n_episodes"):
            a, b = plain[mode][key], recorded[mode][key]
            assert (np.isnan(a) and np.isnan(b)) or a == b, (mode, key, a, b)
    videos = sorted(p for p in (tmp_path / "runs").rglob("*.mp4"))
    assert videos and all("eval_only_" in p.name and "_return_" in p.name for p in videos)
    frames = iio.imread(videos[0])
    assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames) >= 2 and frames.std() > 0
