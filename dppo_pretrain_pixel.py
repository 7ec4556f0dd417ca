"""Pre-training of a pixel diffusion policy by behaviour cloning (DPPO paper §5.3, App. D.1, D.5).

The pixel counterpart of `dppo_pretrain.py` for the robomimic `-img` tasks: the ε-network sees the
proprioception and camera images through a ViT encoder (`common/vision.py`, `VisionEncoder`: conv patch
stem, one pre-LN transformer layer, spatial embedding per camera, proprio appended) and a residual-MLP or
UNet head; images are randomly shifted (pad 4, replicate padding) in every training batch. K = 100 DDPM
steps, so that fine-tuning (`dppo_finetune_pixel.py`) can run DDIM with 5 steps.

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` | 100 |
| T_a, T_o | `horizon_steps`, `cond_steps` | 4 (Transport 8; Transport UNet 16), 1 |
| x_0 | `actions` | (B, T_a, D_a), normalised to [-1, 1] |
| s (obs) | `cond` | {"state": (B, T_o, D_p) normalised, "rgb": (B, T_o, 3·cameras, H, W) uint8} |

Loss: t ~ U{0..K-1}, ε ~ N(0, I), x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, MSE(ε_θ(x_t, t, s), ε).

Defaults are the reference's configs (`irom-princeton/dppo` `cfg/robomimic/pretrain/*/pre_diffusion_{mlp,unet}_img.yaml`:
ViT 128-d, 4 heads, depth 1, spatial embedding 128, time embedding 32, MLP [512]×3 Lift/Can and [768]×3
Square/Transport, UNet dim 40 (Square/Transport 64) × [1, 2], batch 256, lr 1e-4 → 1e-5 over 2000 epochs with
100 warm-up epochs, EMA 0.995, the first 100 demonstrations). The image size is the dataset's (96×96 for the
reference's data, 84×84 for robomimic's `image_v141.hdf5`) and is stored in the checkpoint, so fine-tuning
renders at the same size.

Deviations from the reference implementation (docs/deviations.md, "Pixel DPPO"):
- The random shift runs only in training mode (the reference's network shifts whenever `augment` is set).
- Resuming a pixel pre-training run is not supported (start a new one); the state pre-training script resumes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import pretraining, runs
from common.envs import evaluate
from common.vision import VisionDiffusionNet
from common.normalizer import Normalizer
from common.tasks import get_task
from loaders.datasets import first_episodes, load_task_dataset
from sims.robomimic import PixelChunkVecEnv, camera_names

Positive, NonNegative, Fraction = runs.POSITIVE, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "lift-img"  # pixel task id: lift-img, can-img, square-img, transport-img
    dataset: str | None = None  # robomimic image hdf5 or the reference's image train.npz (None: the task's; README "Pixels")
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (1: fastest, README "Threads"; None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    output: str | None = None  # also write the release checkpoint (header, normalisation, EMA: what fine-tuning reads) here
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (needs --eval-every)
    save_every: Annotated[int, Positive] = 50  # epochs between checkpoints
    # algorithm (the reference's cfg/robomimic/pretrain/*/pre_diffusion_{mlp,unet}_img.yaml; None: TASK_DEFAULTS below)
    backbone: Literal["mlp", "unet"] = "mlp"  # head of the ViT encoder: `mlp` (VisionDiffusionMLP) or `unet` (VisionUnet1D)
    n_demos: Annotated[int | None, Positive] = 100  # the data: the file's first n demos (reference `--n 100`; None: all)
    max_n_episodes: Annotated[int | None, Positive] = None  # pre-train on the data's first N episodes (App. B.2; None: all)
    denoising_steps: Annotated[int, Positive] = 100  # K: DDPM steps (100, for DDIM fine-tuning)
    horizon_steps: Annotated[int | None, Positive] = None  # T_a (None: the task's; transport UNet 16)
    cond_steps: Annotated[int, Positive] = 1  # T_o (proprio and images)
    mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # MLP head widths (None: 512 x3; square/transport 768 x3)
    unet_dim: Annotated[int | None, Positive] = None  # UNet base channels (None: 40; square/transport 64)
    unet_dim_mults: Annotated[tuple[int, ...], Positive] = (1, 2)  # UNet channel multipliers
    time_dim: Annotated[int, Positive] = 32  # denoising-step embedding width
    embed_dim: Annotated[int, Positive] = 128  # ViT width
    num_heads: Annotated[int, Positive] = 4  # ViT attention heads
    spatial_emb: Annotated[int, Positive] = 128  # spatial-embedding width per camera
    augment: bool = True  # random-shift augmentation (pad 4) of the training images
    n_epochs: Annotated[int, Positive] = 2000  # passes over the dataset
    batch_size: Annotated[int, Positive] = 256  # minibatch size
    learning_rate: Annotated[float, Positive] = 1e-4  # peak learning rate
    min_lr: Annotated[float, Positive] = 1e-5  # final learning rate of the cosine schedule
    warmup_epochs: Annotated[int, NonNegative] = 100  # linear warm-up epochs
    weight_decay: Annotated[float, NonNegative] = 1e-6  # AdamW weight decay
    ema_decay: Annotated[float, Fraction] = 0.995  # EMA decay
    ema_every: Annotated[int, Positive] = 10  # gradient steps between EMA updates
    ema_start_epoch: Annotated[int, NonNegative] = 20  # before this epoch the EMA is reset to the model
    eval_every: Annotated[int, NonNegative] = 0  # epochs between rollouts (0: never; CPU: dppo_finetune_pixel.py --eval-only)
    n_eval_envs: Annotated[int, Positive] = 50  # parallel envs in an evaluation
    n_workers: Annotated[int, Positive] = 1  # worker processes of the evaluation envs
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32
    fused_adam: bool = False  # fused AdamW: faster steps, the same update up to rounding (docs/results.md "Pre-training")
    flush_denormal: bool = True  # CPU: denormals (< 1e-38) as zero, faster Adam steps (docs/results.md "Pre-training")


TASK_DEFAULTS = {  # reference cfg/robomimic/pretrain/*/pre_diffusion_{mlp,unet}_img.yaml
    "lift-img": dict(mlp_dims=(512,) * 3, unet_dim=40), "can-img": dict(mlp_dims=(512,) * 3, unet_dim=40),
    "square-img": dict(mlp_dims=(768,) * 3, unet_dim=64), "transport-img": dict(mlp_dims=(768,) * 3, unet_dim=64),
}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    if task.suite != "robomimic-img":
        raise runs.UsageError(f"--env-id {task.id}: dppo_pretrain_pixel.py pre-trains the pixel tasks "
                              "(lift-img, can-img, square-img, transport-img); state tasks: dppo_pretrain.py")
    args.env_id = task.id
    horizon = 16 if args.backbone == "unet" and task.id == "transport-img" else task.horizon_steps
    defaults = {**TASK_DEFAULTS[task.id], "horizon_steps": horizon}
    if args.backbone == "unet":
        defaults.pop("mlp_dims")
    else:
        defaults.pop("unet_dim")
    filled = runs.apply_defaults(args, defaults)
    runs.check_args(args)  # every number within the Limits of its field
    if args.embed_dim % args.num_heads:
        raise runs.UsageError(f"--embed-dim {args.embed_dim} must be a multiple of --num-heads {args.num_heads}")
    if args.backbone == "unet" and any(args.unet_dim * m % 8 for m in args.unet_dim_mults):
        raise runs.UsageError(f"--unet-dim {args.unet_dim} times each of --unet-dim-mults must be a multiple of 8 "
                              "(the GroupNorm groups)")
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`), float64, as dppo_pretrain.py."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def network_arch(args: Args, task, image_hw: tuple[int, int]) -> dict:
    """Plain constructor arguments of `VisionDiffusionNet`, stored in the checkpoint to rebuild it."""
    encoder = dict(cond_dim=task.obs_dim * args.cond_steps, num_img=len(camera_names(task)), img_cond_steps=args.cond_steps,
                   img_h=image_hw[0], img_w=image_hw[1], embed_dim=args.embed_dim, num_heads=args.num_heads, depth=1,
                   spatial_emb=args.spatial_emb, augment=args.augment)
    if args.backbone == "mlp":
        head = dict(action_dim=task.action_dim, horizon_steps=args.horizon_steps, time_dim=args.time_dim,
                    mlp_dims=list(args.mlp_dims), activation="mish", residual=True)
    else:
        head = dict(action_dim=task.action_dim, dim=args.unet_dim, dim_mults=list(args.unet_dim_mults), kernel_size=5,
                    n_groups=8, time_dim=args.time_dim, cond_predict_scale=True, large_cond_encoder=True,
                    groupnorm_eps=1e-5, activation="mish")
    return dict(head=args.backbone, head_arch=head, encoder_arch=encoder)


class DiffusionPolicy(nn.Module):
    """ε-network + DDPM schedule; `loss` for pre-training, `sample` for evaluation rollouts."""

    def __init__(self, network: VisionDiffusionNet, denoising_steps: int, horizon_steps: int, action_dim: int) -> None:
        super().__init__()
        self.network, self.K = network, denoising_steps
        self.horizon_steps, self.action_dim = horizon_steps, action_dim
        betas = cosine_beta_schedule(denoising_steps).float()  # float32 from float32 β, as dppo_pretrain.py
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        for name, value in dict(
            sqrt_ac=torch.sqrt(ac), sqrt_1m_ac=torch.sqrt(1.0 - ac), sqrt_recip_ac=torch.sqrt(1.0 / ac),
            sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1), posterior_var=(betas * (1.0 - ac_prev) / (1.0 - ac)).clamp(min=1e-20),
            mu_coef1=betas * torch.sqrt(ac_prev) / (1.0 - ac), mu_coef2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
        ).items():
            self.register_buffer(name, value, persistent=False)

    def loss(self, cond: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.K, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        x_t = self.sqrt_ac[t, None, None] * actions + self.sqrt_1m_ac[t, None, None] * noise
        return F.mse_loss(self.network(x_t, t, cond), noise)

    @torch.no_grad()
    def sample(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """DDPM sampling (reference `DiffusionModel.forward`): std max(σ_t, 1e-3), none at t = 0; noise clamped ±3.
        The observation is encoded once for all K steps."""
        feat = self.network.encode(cond)
        B = feat.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=feat.device)
        for t in range(self.K - 1, -1, -1):
            eps = self.network(x, torch.full((B,), t, device=feat.device, dtype=torch.long), feat)
            x0 = (self.sqrt_recip_ac[t] * x - self.sqrt_recipm1_ac[t] * eps).clamp(-1, 1)
            mean = self.mu_coef1[t] * x0 + self.mu_coef2[t] * x
            std = self.posterior_var[t].sqrt().clamp(min=1e-3) if t > 0 else 0.0
            x = mean + std * torch.randn_like(x).clamp(-3, 3)
        return x.clamp(-1, 1)


class PixelWindows:
    """Every T_a-action window inside one trajectory with the T_o most recent proprio vectors and images (the first
    repeated before the episode start), as `loaders.datasets.WindowDataset`; images stay uint8 on the device."""

    def __init__(self, trajs: list[dict], normalizer, horizon_steps: int, cond_steps: int, device: torch.device) -> None:
        obs_idx, act_idx, offset = [], [], 0
        for t in trajs:
            starts = np.arange(max(len(t["actions"]) - horizon_steps + 1, 0))[:, None]
            act_idx.append(offset + starts + np.arange(horizon_steps))
            obs_idx.append(offset + np.maximum(starts + np.arange(1 - cond_steps, 1), 0))
            offset += len(t["actions"])
        if sum(len(i) for i in act_idx) == 0:
            raise runs.DatasetError(f"no trajectory has {horizon_steps} actions (horizon_steps); lower horizon_steps")
        state = normalizer.normalize_obs(np.concatenate([t["obs"] for t in trajs]).astype(np.float32))
        actions = normalizer.normalize_action(np.concatenate([t["actions"] for t in trajs]).astype(np.float32))
        self.state = torch.from_numpy(state).to(device)
        self.images = torch.from_numpy(np.concatenate([t["images"] for t in trajs])).to(device)  # (N, C, H, W) uint8
        self.obs_idx = torch.from_numpy(np.concatenate(obs_idx)).to(device)  # (n, T_o)
        self.act_idx = torch.from_numpy(np.concatenate(act_idx)).to(device)  # (n, T_a)
        self.actions = torch.from_numpy(actions).to(device)

    def __len__(self) -> int:
        return self.obs_idx.shape[0]

    def iterate(self, batch_size: int, generator: torch.Generator):
        """One epoch of (cond dict, actions (B, T_a, D_a)); a partial last batch is dropped."""
        n = len(self)
        perm = torch.randperm(n, generator=generator, device=generator.device).to(self.obs_idx.device)
        for i in range(max(n // batch_size, 1)):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            o = self.obs_idx[idx]
            yield {"state": self.state[o], "rgb": self.images[o]}, self.actions[self.act_idx[idx]]


def load_pixel_dataset(task, path: str | None, n_demos: int | None,
                       max_n_episodes: int | None = None) -> tuple[list[dict], Normalizer]:
    """The task's demonstrations with images, checked: uint8 (N, 3·cameras, H, W), one frame per action. The data is
    the file's first `n_demos`, normalised with their min/max (the reference made its image data from robomimic's
    first 100 demos, `dataset_states_to_obs.py --n 100`, and computed its normalization.npz on them); `max_n_episodes`
    then trains on the first N of those with that normalisation (the reference's `max_n_episodes`)."""
    trajs, normalizer = load_task_dataset(task, path)
    reference_stats = path is not None and os.path.basename(path) == "train.npz" and os.path.exists(
        os.path.join(os.path.dirname(os.path.abspath(path)), "normalization.npz"))
    trajs = trajs[:n_demos]
    if not reference_stats:  # min/max of the demonstrations used
        normalizer = Normalizer.from_trajectories(trajs)
    channels = 3 * len(camera_names(task))
    shapes = {t["images"].shape[1:] for t in trajs if "images" in t}
    if any("images" not in t for t in trajs) or len(shapes) != 1:
        raise runs.DatasetError(f"{path or 'the dataset'}: every trajectory needs images of one size")
    shape = shapes.pop()
    if shape[0] != channels or min(shape[1:]) < 16:
        raise runs.DatasetError(f"{path or 'the dataset'}: images {tuple(shape)}, expected ({channels}, H, W) with "
                                f"H, W >= 16 for {task.id}'s {len(camera_names(task))} camera(s)")
    for t in trajs:  # uint8 in [0, 255]; a float store of whole numbers in that range is converted
        img = t["images"]
        if img.dtype != np.uint8:
            if not (np.isfinite(img).all() and img.min() >= 0 and img.max() <= 255 and (img == np.round(img)).all()
                    and img.max() > 1):
                raise runs.DatasetError(f"{path or 'the dataset'}: images must be uint8 (or whole numbers) in [0, 255], "
                                        f"found {img.dtype} in [{img.min():.3g}, {img.max():.3g}]")
            t["images"] = img.astype(np.uint8)
    if n_demos is not None and len(trajs) < n_demos:
        print(f"dataset has {len(trajs)} demonstrations (fewer than --n-demos {n_demos}); using all")
    cut = f" (--n-demos {n_demos})" if n_demos is not None and len(trajs) == n_demos else ""
    return first_episodes(trajs, max_n_episodes, f"{path or 'the dataset'}{cut}"), normalizer


def main(args: Args) -> dict:
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    runs.print_defaults(task.id, filled)
    runs.check_output_path(args.output)
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,
                                                 pretraining.mlp_shapes(args.batch_size, args.mlp_dims))
    pretraining.flush_denormals(args.flush_denormal)

    trajs, normalizer = load_pixel_dataset(task, args.dataset, args.n_demos, args.max_n_episodes)
    image_hw = tuple(int(s) for s in trajs[0]["images"].shape[2:])
    data = PixelWindows(trajs, normalizer, args.horizon_steps, args.cond_steps, device)
    arch = network_arch(args, task, image_hw)
    policy = DiffusionPolicy(VisionDiffusionNet(**arch), args.denoising_steps, args.horizon_steps, task.action_dim).to(device)
    ema = DiffusionPolicy(VisionDiffusionNet(**arch), args.denoising_steps, args.horizon_steps, task.action_dim).to(device)
    ema.load_state_dict(policy.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **pretraining.adam_kernel(args.fused_adam))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretraining.warmup_then_cosine(args.learning_rate, args.min_lr,
                                                                                     args.warmup_epochs, args.n_epochs))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eval_envs = None
    if args.capture_video and not args.eval_every:
        raise runs.UsageError("--capture-video records evaluation rollouts, and this run has none (--eval-every 0)")
    if args.eval_every:
        try:
            eval_envs = PixelChunkVecEnv(task, args.n_eval_envs, seed=args.seed + 10_000, cond_steps=args.cond_steps,
                                         image_size=image_hw, n_workers=args.n_workers, capture_video=args.capture_video)
        except runs.TaskError as e:
            raise runs.TaskError(f"{e} (or pre-train without rollouts: --eval-every 0)") from None
    run = runs.RunFolder(args, task.id, args.exp_name, args.seed, track=args.track, wandb_project=args.wandb_project_name)

    def run_evaluation(epoch: int) -> dict:
        ema.eval()

        def act(obs: dict) -> np.ndarray:
            cond = {"state": normalizer.normalize_obs(torch.as_tensor(obs["state"], device=device)),
                    "rgb": torch.as_tensor(obs["rgb"], device=device)}
            return normalizer.unnormalize_action(ema.sample(cond)).cpu().numpy()

        result = evaluate(eval_envs, act, task, task.act_steps, seed=args.seed + 10_000, index=epoch)
        run.log_eval(epoch, 0, "deterministic", result)
        return result

    def checkpoint(epoch: int, step: int) -> dict:
        return {"format": runs.CHECKPOINT_FORMAT, "policy": "diffusion", "backbone": f"vit-{args.backbone}", "arch": arch,
                "task": task.id, "obs_dim": task.obs_dim, "action_dim": task.action_dim,
                "horizon_steps": args.horizon_steps, "cond_steps": args.cond_steps,
                "denoising_steps": args.denoising_steps, "normalization": normalizer.state_dict(),
                "args": runs.args_dict(args), "model": policy.network.state_dict(), "ema": ema.network.state_dict(),
                "epoch": epoch, "step": step}

    print(f"pre-training {task.id}: {len(trajs)} trajectories, {len(data)} windows, images {image_hw}, "
          f"run folder {run.dir}")
    losses, last_eval, step, t0 = [], {}, 0, time.time()
    bar = tqdm(range(args.n_epochs), total=args.n_epochs, desc="epochs")
    for epoch in bar:
        policy.train()
        epoch_loss, n_batches = torch.zeros((), device=device), 0
        for cond, actions in data.iterate(args.batch_size, generator):
            loss = policy.loss(cond, actions)  # images shifted inside the encoder (training mode)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            n_batches += 1
            step += 1
            if step % args.ema_every == 0:
                pretraining.ema_update(ema, policy, args.ema_decay, reset=epoch < args.ema_start_epoch)
        scheduler.step()
        mean_loss = (epoch_loss / max(n_batches, 1)).item()
        runs.check_finite(f"epoch {epoch}", {"loss": mean_loss}, policy)
        losses.append(mean_loss)
        run.scalars({"losses/loss": mean_loss, "charts/learning_rate": optimizer.param_groups[0]["lr"]}, epoch)
        postfix = {"loss": f"{mean_loss:.4f}"}
        last_epoch = epoch + 1 == args.n_epochs
        if eval_envs is not None and ((epoch + 1) % args.eval_every == 0 or last_epoch):
            last_eval = run_evaluation(epoch + 1)
            postfix["success"] = f"{last_eval['success_rate']:.2f}"
        bar.set_postfix(postfix)
        if (epoch + 1) % args.save_every == 0 or last_epoch:
            runs.save_checkpoint(run.checkpoint, checkpoint(epoch + 1, step))
    bar.close()
    if args.output:  # the release form: what fine-tuning reads
        pretraining.write_release(run.checkpoint, args.output)
    if eval_envs is not None:
        eval_envs.close()
    run.writer.close()
    print(f"done in {time.time() - t0:.0f}s; checkpoint {run.checkpoint}; last evaluation {last_eval}")
    return {"run_dir": os.path.abspath(run.dir), "checkpoint": os.path.abspath(run.checkpoint), "losses": losses,
            "eval": last_eval}


if __name__ == "__main__":
    runs.cli(main, Args)
