"""DPPO from camera images: fine-tuning a pixel diffusion policy with PPO (Ren et al., ICLR 2025, §4, §5.3, App. D.5).

The algorithm of `dppo_finetune.py` (the denoising chain as an inner MDP, eqs. 4.4-4.8) on the robomimic `-img`
tasks, with what pixels change: the policy and a separate critic each see the proprioception and the camera
images through their own ViT encoder (`common/networks.py`, `VisionEncoder`); the policy was pre-trained with
K = 100 DDPM steps (`dppo_pretrain_pixel.py`) and is fine-tuned with DDIM, 5 steps, all of them fine-tuned
(`actor_ft` is a copy of the whole network, ViT included); images are stored as uint8 in the rollout buffer and
randomly shifted (pad 4) once per iteration, before the values and old log-probs are computed, so every epoch
of the update sees the same shifted images as its old log-probs; the update accumulates gradients over
`grad_accumulate` minibatches of 500 (env-step, denoising-step) pairs (reference
`agent/finetune/train_ppo_diffusion_img_agent.py`, `TrainPPOImgDiffusionAgent.run`).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 100 |
| K' | `ft_denoising_steps` = `ddim_steps` | 5 (DDIM grid {80, 60, 40, 20, 0}) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | 4, 4, 1 (Transport 8, 8; UNet 16, 8) |
| γ_env, λ, γ_denoise | `gamma`, `gae_lambda`, `gamma_denoising` | 0.999, 0.95, 0.99 |
| σ^exp_min, σ^prob_min | `min_sampling_denoising_std`, `min_logprob_denoising_std` | 0.1, 0.1 |
| obs | `state_buf`, `rgb_buf` | (n_steps, N, T_o, D_p) normalised float32; (n_steps, N, T_o, 3·cameras, H, W) uint8 |
| chain | `chain_buf` | (n_steps, N, K'+1, T_a, D_a) |

Deviations from the reference implementation (docs/deviations.md, "Pixel DPPO"), besides those of dppo_finetune.py
(truncation bootstraps from the finished episode's final observation; one evaluation function; resume):
- The accumulated gradient is the mean over the accumulated minibatches (the reference sums them; Adam steps the
  same up to its ε), and a partial group at the end of an epoch is stepped too (the reference carries it over
  into the next epoch; with the paper's sizes the groups divide the epoch exactly).
- The observation is encoded once per network and sample for all of its denoising steps (same numbers).
- Evaluation renders at the checkpoint's image size; the reference's env wrapper hard-codes its shape_meta.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.envs import EpisodeTracker, RunningRewardScaler, evaluate
from common.errors import DatasetError, UsageError
from common.networks import ViTCritic, VisionDiffusionNet, random_shift
from common.normalizer import Normalizer
from common.runs import (PhaseTimer, apply_defaults, apply_matmul_flags, check_finite, check_positive, check_range, cli,
                         eval_only_report, explained_variance, finetune_checkpoint, load_checkpoint, load_resume, load_weights,
                         policy_header, ppo_optimizers, print_defaults, resume_args, save_checkpoint, script_name,
                         seed_everything, start_finetuning, step_schedulers)
from common.tasks import Task, get_task
from common.vecenv import default_n_workers
from sims.robomimic import PixelChunkVecEnv

warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
PRETRAIN_HINT = "python dppo_pretrain_pixel.py --env-id {}"


@dataclass
class Args:
    # experiment
    env_id: str = "lift-img"
    """pixel task id: lift-img, can-img, square-img, transport-img"""
    checkpoint: str | None = None
    """pre-trained (dppo_pretrain_pixel.py) or fine-tuned checkpoint"""
    exp_name: str = script_name(__file__)
    """name of this experiment (part of the run folder)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets torch.use_deterministic_algorithms"""
    cuda: bool = True
    """use CUDA when available"""
    torch_threads: int | None = 1
    """CPU threads for torch (None: torch's default)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "dppo"
    """the wandb project"""
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmuls: highest keeps float32 (the default); high: TF32; medium: bf16 products on AMX CPUs, TF32 on GPUs
    (~4x faster matmuls on an AMX CPU, log-probs off by ~1e-3; docs/results.md "Speed")"""
    onednn_matmul: bool = False
    """CPU: run float32 matmuls through oneDNN where a start-up check shows they stay float32 (faster on some CPUs, see
    docs/results.md "Speed"; refused with a printed line where the check fails, e.g. on AMX CPUs that would use bf16)"""
    resume: str | None = None
    """a run folder to continue from its checkpoint.pt, with the run's own arguments"""
    eval_only: bool = False
    """only evaluate the checkpoint (deterministic and stochastic) and exit; writes nothing"""
    capture_video: bool = False
    """record a few evaluation episodes per evaluation as MP4 in the run folder's videos/ (robosuite's agentview
    camera; with --eval-only: a new run folder holding only the videos)"""
    save_every: int = 1
    """iterations between checkpoints"""
    # algorithm (None: the task's value, printed at start; see TASK_DEFAULTS)
    n_train_itr: int | None = None
    """fine-tuning iterations (lift 81, can 151, square 301, transport 201)"""
    num_envs: int = 50
    """parallel environments"""
    n_steps: int | None = None
    """chunk-steps per env per iteration (lift/can 300, square/transport 400)"""
    n_workers: int | None = None
    """worker processes rendering the envs (None: one per core this process may use)"""
    ddim_steps: int = 5
    """DDIM steps, all fine-tuned (K')"""
    act_steps: int | None = None
    """T_e (None: the task's)"""
    gamma: float = 0.999
    """environment discount per chunk-step"""
    gae_lambda: float = 0.95
    """GAE λ"""
    gamma_denoising: float = 0.99
    """denoising discount"""
    min_sampling_denoising_std: float = 0.1
    """exploration std floor while sampling"""
    min_logprob_denoising_std: float = 0.1
    """std floor when evaluating log-probs"""
    randn_clip_value: float = 3.0
    """sampling noise clamp"""
    actor_lr: float | None = None
    """actor learning rate (lift/can 5e-5, square/transport 1e-5, transport UNet 2e-5); constant"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    lr_warmup_itr: int = 10
    """warm-up iterations of the LR schedules (constant schedules ignore it)"""
    batch_size: int = 500
    """PPO minibatch of (env-step, denoising-step) pairs"""
    grad_accumulate: int | None = None
    """minibatches per optimiser step (lift/can 15, square/transport 20)"""
    logprob_batch_size: int | None = None
    """observations per batch when computing values and old log-probs (lift/can 500, square/transport 1000)"""
    augment: bool = True
    """shift the stored images randomly (pad 4) once per iteration before the old log-probs"""
    update_epochs: int = 10
    """PPO epochs per iteration"""
    clip_coef: float = 0.01
    """clip ε of the final denoising step"""
    clip_coef_base: float = 0.001
    """clip ε of the noisiest fine-tuned step"""
    clip_coef_rate: float = 3.0
    """exponential rate of the per-step clip schedule"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    target_kl: float | None = 1.0
    """stop the epochs when approx KL exceeds this (after the critic warm-up)"""
    max_grad_norm: float | None = None
    """gradient norm clip of actor_ft (None: off)"""
    n_critic_warmup_itr: int = 2
    """iterations before the actor starts to step"""
    val_freq: int = 10
    """iterations between evaluations (0: only the final one)"""
    eval_n_steps: int | None = None
    """chunk-steps of an evaluation (None: one episode, ⌈max_episode_steps / T_e⌉)"""
    reward_scale_running: bool = True
    """running reward scaling"""
    terminate_on_success: bool = False
    """end episodes on success (the paper does not)"""
    max_episode_steps: int | None = None
    """episode length in env steps (None: the task's 300/300/400/800; shorter only for quick measurements)"""


# The reference's configs (cfg/robomimic/finetune/*/ft_ppo_diffusion_{mlp,unet}_img.yaml); an explicit flag wins.
TASK_DEFAULTS = {
    "lift-img": dict(n_train_itr=81, n_steps=300, actor_lr=5e-5, grad_accumulate=15, logprob_batch_size=500),
    "can-img": dict(n_train_itr=151, n_steps=300, actor_lr=5e-5, grad_accumulate=15, logprob_batch_size=500),
    "square-img": dict(n_train_itr=301, n_steps=400, actor_lr=1e-5, grad_accumulate=20, logprob_batch_size=1000),
    "transport-img": dict(n_train_itr=201, n_steps=400, actor_lr=1e-5, grad_accumulate=20, logprob_batch_size=1000),
}


def pixel_task(env_id: str) -> Task:
    task = get_task(env_id)
    if task.suite != "robomimic-img":
        raise UsageError(f"--env-id {task.id}: dppo_finetune_pixel.py fine-tunes the pixel tasks "
                         "(lift-img, can-img, square-img, transport-img); state tasks: dppo_finetune.py")
    return task


def fill_defaults(args: Args, backbone: str = "vit-mlp") -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = pixel_task(args.env_id)
    args.env_id = task.id
    defaults = {**TASK_DEFAULTS[task.id], "act_steps": task.act_steps}
    if task.id == "transport-img" and backbone == "vit-unet":
        defaults["actor_lr"] = 2e-5
    filled = apply_defaults(args, defaults)
    check_positive(args, "n_train_itr", "num_envs", "n_steps", "n_workers", "ddim_steps", "act_steps", "batch_size",
                   "grad_accumulate", "logprob_batch_size", "update_epochs", "save_every", "torch_threads",
                   "eval_n_steps", "max_episode_steps", "actor_lr", "critic_lr", "clip_coef", "clip_coef_base",
                   "min_logprob_denoising_std",
                   "min_sampling_denoising_std", "randn_clip_value", "target_kl", "max_grad_norm", "clip_coef_rate")
    if args.batch_size < 2:
        raise UsageError("--batch-size must be at least 2 (advantages are normalised within each minibatch)")
    for name in ("gamma", "gae_lambda", "gamma_denoising"):
        check_range(args, name, 0.0, 1.0)
    check_range(args, "seed", 0, 2**31 - 1)
    for name in ("val_freq", "lr_warmup_itr", "n_critic_warmup_itr", "vf_coef"):
        check_range(args, name, 0, math.inf)
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`), float64, as dppo_finetune.py."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def clip_schedule(ft_steps: int, base: float, clip: float, rate: float) -> torch.Tensor:
    """Per fine-tuned step i (0 = noisiest): ε(i) = base + (clip - base)(e^{rate·u} - 1)/(e^{rate} - 1), u = i/(K'-1)."""
    if ft_steps == 1:
        return torch.tensor([clip])
    u = torch.linspace(0, 1, ft_steps, dtype=torch.float64)
    return (base + (clip - base) * (torch.exp(rate * u) - 1) / (math.exp(rate) - 1)).float()


def denoising_discount(ft_steps: int, gamma_denoising: float) -> torch.Tensor:
    """γ_denoise^(K'-i-1): the final denoising step has weight 1 (eq. 4.7)."""
    return gamma_denoising ** torch.arange(ft_steps - 1, -1, -1, dtype=torch.float32)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over chunk-steps (§4.2), as dppo_finetune.py. All inputs (n_steps, N)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, disc: torch.Tensor, eps: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over (env-step, denoising-step) pairs (eqs. 4.5-4.7, reference `PPODiffusion.loss`):
    minibatch-normalised advantages weighted by γ_denoise^(K'-i-1); per-pair clip ranges."""
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) * disc
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > eps).float().mean()
    return pg_loss, approx_kl, clipfrac


class PixelDiffusionPPO(nn.Module):
    """Frozen pre-trained network, its trainable copy `actor_ft` (ViT included) for the K' fine-tuned DDIM steps,
    and the ViT critic. Observations are dicts {"state", "rgb"} (see the module docstring)."""

    def __init__(self, base: VisionDiffusionNet, critic: ViTCritic, denoising_steps: int, ddim_steps: int,
                 horizon_steps: int, action_dim: int, min_sampling_std: float, min_logprob_std: float,
                 randn_clip: float) -> None:
        super().__init__()
        self.actor = base.requires_grad_(False).eval()
        self.actor_ft = copy.deepcopy(base).requires_grad_(True)
        self.critic = critic
        self.horizon_steps, self.action_dim, self.ft_steps = horizon_steps, action_dim, ddim_steps
        self.min_sampling_std, self.min_logprob_std, self.randn_clip = min_sampling_std, min_logprob_std, randn_clip
        # DDIM coefficients in float32 from float32 β, as dppo_finetune.DiffusionPPO (reference `VPGDiffusion.p_mean_var`)
        ac = torch.cumprod(1.0 - cosine_beta_schedule(denoising_steps).float(), 0)
        ts = (torch.arange(0, ddim_steps) * (denoising_steps // ddim_steps)).flip(0)  # "leading" grid, from the top
        a, a_prev = ac[ts], torch.cat([ac[ts[1:]], torch.ones(1)])
        sigma = (((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 1 while training
        sigma0 = (0.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 0 in evaluation
        for name, value in dict(ts=ts, sqrt_a=a**0.5, sqrt_1ma=(1.0 - a) ** 0.5, sqrt_a_prev=a_prev**0.5,
                                dir=(1.0 - a_prev - sigma**2).clamp(min=0).sqrt(),
                                dir0=(1.0 - a_prev - sigma0**2).clamp(min=0).sqrt(),
                                std=torch.exp(0.5 * torch.log(sigma**2))).items():
            self.register_buffer(name, value, persistent=False)

    def p_mean_std(self, net: VisionDiffusionNet, x: torch.Tensor, j: torch.Tensor, feat: torch.Tensor,
                   deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (un-floored) std of the DDIM step at grid index j ((B,) tensor); `feat` = net.encode(obs)."""
        eps = net(x, self.ts[j], feat)
        v = lambda buf: buf[j].view(-1, 1, 1)  # noqa: E731
        sqrt_a, sqrt_1ma = v(self.sqrt_a), v(self.sqrt_1ma)
        x0 = ((x - sqrt_1ma * eps) / sqrt_a).clamp(-1, 1)
        eps = (x - sqrt_a * x0) / sqrt_1ma  # ε re-derived from the clamped x̂_0
        std = torch.zeros_like(sqrt_a) if deterministic else v(self.std)
        return v(self.sqrt_a_prev) * x0 + v(self.dir0 if deterministic else self.dir) * eps, std

    @torch.no_grad()
    def get_action(self, cond: dict[str, torch.Tensor], deterministic: bool = False, base_only: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a chunk; returns x_0 (B, T_a, D_a) and the chain (B, K'+1, T_a, D_a). Every DDIM step is fine-tuned,
        so `actor_ft` encodes the observation once and runs all of them (`base_only`: the frozen network)."""
        net = self.actor if base_only else self.actor_ft
        feat = net.encode(cond)
        B = feat.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=feat.device)
        chain = [x]
        for j in range(self.ft_steps):
            mean, std = self.p_mean_std(net, x, torch.full((B,), j, device=feat.device), feat, deterministic)
            std = torch.zeros_like(std) if deterministic else std.clamp(min=self.min_sampling_std)  # η = 0 in evaluation
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
            chain.append(x)
        return x, torch.stack(chain, dim=1)

    def get_logprobs(self, feat: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Element-wise log N(x_prev; μ_ft(x_t), max(σ_t, σ^prob_min)²) at DDIM index i (eq. 4.4); feat = actor_ft.encode."""
        mean, std = self.p_mean_std(self.actor_ft, x_t, i, feat)
        std = std.clamp(min=self.min_logprob_std)
        return -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)

    def get_value(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.critic(cond)


def pair_logprobs(agent: PixelDiffusionPPO, feat: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor,
                  act_steps: int) -> torch.Tensor:
    """One scalar per (env-step, denoising-step) pair: log-probs clamped to [-5, 2], restricted to the executed T_e
    actions and averaged (`PPODiffusion.loss`, reference)."""
    return agent.get_logprobs(feat, x_t, x_prev, i).clamp(-5, 2)[:, :act_steps].mean(dim=(1, 2))


def shift_images_(rgb: torch.Tensor, chunk: int = 4096) -> None:
    """Random shift (pad 4) of every stored image, in place and in chunks (no second buffer): rgb (..., C, H, W)
    uint8; each camera image and each of the T_o frames gets its own offset, as the reference shifts
    "(s e t) c h w" per camera."""
    flat = rgb.view(-1, 3, *rgb.shape[-2:])
    for part in flat.split(chunk):
        part.copy_(random_shift(part))


def reference_conversion() -> ModuleType:
    """`loaders/convert.py`, which `load_checkpoint` uses only for `--checkpoint paper` or a checkpoint of
    irom-princeton/dppo: imported then, so a run from this project's checkpoints never loads it."""
    from loaders import convert

    return convert


def main(args: Args) -> dict:
    resume = None
    if args.resume:
        resume = load_resume(args.resume, "diffusion", PRETRAIN_HINT.format(args.env_id))
        args = resume_args(args, resume["args"], args.resume)
    if args.checkpoint is None and resume is None:
        raise UsageError(f"--checkpoint is required: a pixel policy pre-trained by {PRETRAIN_HINT.format(args.env_id)}")
    task = pixel_task(args.env_id)
    ckpt = resume or load_checkpoint(args.checkpoint, "diffusion", PRETRAIN_HINT.format(task.id), task,
                                     conversion=reference_conversion)
    if not str(ckpt.get("backbone", "")).startswith("vit-"):
        raise DatasetError(f"checkpoint {args.checkpoint!r} holds a {ckpt.get('backbone')} policy on states, not a pixel "
                           "policy; fine-tune it with dppo_finetune.py")
    filled = fill_defaults(args, ckpt["backbone"])
    if resume is None:
        print_defaults(task.id, filled)
    K_ft, T_e, N = args.ddim_steps, args.act_steps, args.num_envs
    if ckpt["denoising_steps"] % K_ft:
        raise UsageError(f"DDIM with {K_ft} steps needs K divisible by it (checkpoint K = {ckpt['denoising_steps']})")
    if T_e > ckpt["horizon_steps"]:
        raise UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {ckpt['horizon_steps']}")
    n_pairs = args.n_steps * N * K_ft
    if not args.eval_only and args.batch_size > n_pairs:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {n_pairs} (env-step, denoising-step) pairs of one "
                         f"iteration (n_steps {args.n_steps} x num_envs {N} x K' {K_ft})")
    device = seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    apply_matmul_flags(args, device)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    arch = ckpt["arch"]
    # no augmentation inside the networks: the stored images are shifted once per iteration instead (reference
    # ft_ppo_diffusion_*_img.yaml: `augment: False` for actor and critic, `train.augment: True`)
    base = VisionDiffusionNet(**{**arch, "encoder_arch": {**arch["encoder_arch"], "augment": False}})
    ckpt_path = os.path.join(args.resume, "checkpoint.pt") if resume is not None else args.checkpoint
    load_weights(base, ckpt["base"] if "base" in ckpt else ckpt["ema"], ckpt_path)
    critic = ViTCritic(arch["encoder_arch"])  # the reference's ViTCritic: own ViT, [256] x 3 Mish residual MLP
    T_a, T_o = ckpt["horizon_steps"], ckpt["cond_steps"]
    agent = PixelDiffusionPPO(base, critic, ckpt["denoising_steps"], K_ft, T_a, task.action_dim,
                              args.min_sampling_denoising_std, args.min_logprob_denoising_std,
                              args.randn_clip_value).to(device)
    if "actor_ft" in ckpt:
        load_weights(agent.actor_ft, ckpt["actor_ft"], ckpt_path)
        load_weights(agent.critic, ckpt.get("critic"), ckpt_path)
    image_hw = (arch["encoder_arch"]["img_h"], arch["encoder_arch"]["img_w"])
    envs = PixelChunkVecEnv(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, image_size=image_hw,
                            n_workers=args.n_workers or default_n_workers(), terminate_on_success=args.terminate_on_success,
                            max_episode_steps=args.max_episode_steps, capture_video=args.capture_video)
    eval_n_steps = args.eval_n_steps or -(-(args.max_episode_steps or task.max_episode_steps) // T_e)  # one episode
    print(f"envs: {N} x {task.id} at {image_hw[0]}x{image_hw[1]} on {envs.backend}")

    def as_cond(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"state": normalizer.normalize_obs(torch.as_tensor(obs["state"], device=device)),
                "rgb": torch.as_tensor(obs["rgb"], device=device)}

    def run_eval(deterministic: bool, itr: int) -> dict:  # itr: the iteration evaluated (its own stream)
        def act(obs: dict[str, np.ndarray]) -> np.ndarray:
            x, _ = agent.get_action(as_cond(obs), deterministic)
            return normalizer.unnormalize_action(x).cpu().numpy()
        return evaluate(envs, act, task, T_e, seed=args.seed + 1_000_000, index=itr, n_steps=eval_n_steps)

    if args.eval_only:
        out = eval_only_report(run_eval, args, task.id, index=ckpt.get("itr", 0))
        envs.close()
        return out

    lr_args = SimpleNamespace(actor_lr=args.actor_lr, actor_lr_min=args.actor_lr, critic_lr=args.critic_lr,
                              lr_cycle_itr=args.n_train_itr, lr_warmup_itr=args.lr_warmup_itr)  # constant (min_lr = lr)
    optimizers, schedulers = ppo_optimizers(agent.actor_ft, agent.critic, lr_args)
    actor_opt, critic_opt = optimizers["actor"], optimizers["critic"]
    scaler = RunningRewardScaler(N)
    clip_eps = clip_schedule(K_ft, args.clip_coef_base, args.clip_coef, args.clip_coef_rate).to(device)
    disc = denoising_discount(K_ft, args.gamma_denoising).to(device)
    run, start_itr, env_steps = start_finetuning(args, task, resume, optimizers, schedulers, scaler, lambda: {})
    header = policy_header(ckpt)

    S = args.n_steps * N
    state_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    rgb_buf = torch.zeros(args.n_steps, N, T_o, *envs_rgb_shape(arch), dtype=torch.uint8, device=device)
    chain_buf = torch.zeros(args.n_steps, N, K_ft + 1, T_a, task.action_dim, device=device)
    print(f"rollout buffer: images {rgb_buf.numel() / 2**20:.1f} MiB (uint8), proprio and chains "
          f"{(state_buf.numel() + chain_buf.numel()) * 4 / 2**20:.1f} MiB")
    tracker = EpisodeTracker(N, T_e, task.success_chunk_reward)
    history, last_train = [], {}
    timer = PhaseTimer(device)
    bar = tqdm(range(start_itr, args.n_train_itr), initial=start_itr, total=args.n_train_itr, desc="iterations")
    for itr in bar:
        t_itr = time.time()
        if args.val_freq > 0 and itr % args.val_freq == 0:
            r = run_eval(True, itr)  # reset and run deterministically, no update this iteration (reference `TrainPPOAgent`)
            run.log_evaluation_iteration(itr, env_steps, r, last_train, bar)
            step_schedulers(schedulers, itr, args.n_critic_warmup_itr)
            continue

        # ---- rollout: uint8 images into the buffer; final observations of finished episodes kept aside ----
        timer.reset()
        obs = envs.reset(seed=args.seed + itr * N)
        tracker.reset()
        first = np.ones(N)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        finals: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []  # (step, env ids, their final obs)
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            cond = as_cond(obs)
            x, chain = agent.get_action(cond)
            state_buf[step], rgb_buf[step], chain_buf[step] = cond["state"], cond["rgb"], chain
            timer.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            terminated[step], dones[step] = term, term | trunc
            ids = np.arange(N) if step == args.n_steps - 1 else np.flatnonzero(dones[step])
            if len(ids):  # V(s') of these comes from the final observation, not the next row of the buffer
                finals.append((step, ids, {k: v[ids] for k, v in info["final_obs"].items()}))
            tracker.step(rewards[step], dones[step].astype(bool))
            first = dones[step].astype(np.float64)
            timer.lap("env")
        env_steps += args.n_steps * N * T_e
        last_train = tracker.pop()
        history.append({"iteration": itr, "env_steps": env_steps, **last_train})

        # ---- one random shift of the stored images per iteration, then values and old log-probs on them ----
        b_state, b_rgb = state_buf.flatten(0, 1), rgb_buf.flatten(0, 1)  # (S, T_o, D_p), (S, T_o, C, H, W)
        b_chain = chain_buf.flatten(0, 1)                                 # (S, K'+1, T_a, D_a)
        with torch.no_grad():
            if args.augment:
                shift_images_(rgb_buf)  # reference `TrainPPOImgDiffusionAgent.run`: before values and old log-probs
            timer.lap("augment")
            batches = torch.arange(S, device=device).split(args.logprob_batch_size)
            values = torch.cat([agent.get_value({"state": b_state[b], "rgb": b_rgb[b]}) for b in batches])
            values = values.view(args.n_steps, N)
            next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
            for step, ids, final in finals:  # truncation bootstraps from the finished episode's final observation
                next_values[step, torch.as_tensor(ids, device=device)] = agent.get_value(as_cond(final))
            r_scaled = scaler(rewards, firsts) if args.reward_scale_running else rewards
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            advantages, returns = compute_gae(as_t(r_scaled), values, next_values, as_t(terminated), as_t(dones),
                                              args.gamma, args.gae_lambda)
            timer.lap("advantages")
            b_adv, b_ret = advantages.flatten(), returns.flatten()
            pos = torch.arange(K_ft, device=device).repeat(S)                # (S·K',) DDIM index of each pair
            sample = torch.arange(S, device=device).repeat_interleave(K_ft)  # (S·K',) env-step of each pair

            def old_logprobs(b: torch.Tensor) -> torch.Tensor:  # actor_ft encodes each observation once for its K' pairs
                feat = agent.actor_ft.encode({"state": b_state[b], "rgb": b_rgb[b]}).repeat_interleave(K_ft, 0)
                s, i = b.repeat_interleave(K_ft), torch.arange(K_ft, device=device).repeat(len(b))
                return pair_logprobs(agent, feat, b_chain[s, i], b_chain[s, i + 1], i, T_e)
            old_lp = torch.cat([old_logprobs(b) for b in batches])  # ordered as (sample, pos)
        timer.lap("old_logprobs")

        # ---- PPO update over (env-step, denoising-step) pairs, gradients accumulated over grad_accumulate minibatches ----
        agent.train()
        agent.actor.eval()
        stats_t = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac")}
        n_batches = n_pairs // args.batch_size
        for epoch in range(args.update_epochs):
            perm = torch.randperm(n_pairs, device=device)
            kls = []
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            for batch in range(n_batches):
                idx = perm[batch * args.batch_size:(batch + 1) * args.batch_size]
                s, i = sample[idx], pos[idx]
                cond = {"state": b_state[s], "rgb": b_rgb[s]}
                feat = agent.actor_ft.encode(cond)
                new_lp = pair_logprobs(agent, feat, b_chain[s, i], b_chain[s, i + 1], i, T_e)
                pg_loss, kl, clipfrac = ppo_loss(new_lp, old_lp[idx], b_adv[s], disc[i], clip_eps[i])
                v_loss = 0.5 * ((agent.get_value(cond) - b_ret[s]) ** 2).mean()
                group = min(args.grad_accumulate, n_batches - batch // args.grad_accumulate * args.grad_accumulate)
                ((pg_loss + args.vf_coef * v_loss) / group).backward()  # the mean over the accumulated minibatches
                for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("approx_kl", kl), ("clipfrac", clipfrac)):
                    stats_t[k].append(v.detach())
                kls.append(kl.detach())
                if (batch + 1) % args.grad_accumulate == 0 or batch + 1 == n_batches:
                    if itr >= args.n_critic_warmup_itr:
                        if args.max_grad_norm is not None:
                            nn.utils.clip_grad_norm_(agent.actor_ft.parameters(), args.max_grad_norm)
                        actor_opt.step()
                    critic_opt.step()
                    actor_opt.zero_grad(set_to_none=True)
                    critic_opt.zero_grad(set_to_none=True)
            if (args.target_kl is not None and itr >= args.n_critic_warmup_itr
                    and torch.stack(kls).max().item() > args.target_kl):
                break  # one host sync per epoch
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
        step_schedulers(schedulers, itr, args.n_critic_warmup_itr)
        timer.lap("update")

        # ---- logging, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats_t.items() if v}
        check_finite(f"iteration {itr}", logged, agent.actor_ft, agent.critic)
        logged["explained_variance"] = explained_variance(values.flatten(), returns.flatten())
        sps = args.n_steps * N * T_e / (time.time() - t_itr)
        run.end_iteration(itr, logged, last_train, sps, lrs, history[-1], timer.times, bar, env_steps)
        if (itr + 1) % args.save_every == 0 or itr + 1 == args.n_train_itr:
            save_checkpoint(run.checkpoint, finetune_checkpoint(
                header, args, {"base": agent.actor, "actor_ft": agent.actor_ft, "critic": agent.critic}, optimizers,
                schedulers, {"reward_scaler": scaler.state_dict()}, itr + 1, env_steps))
    bar.close()
    final = run_eval(True, args.n_train_itr)
    out = run.finish(args.n_train_itr, env_steps, "deterministic", final, {"history": history})
    envs.close()
    return out


def envs_rgb_shape(arch: dict) -> tuple[int, int, int]:
    """(3·cameras, H, W) of one observation's images, from the checkpoint's encoder arguments."""
    enc = arch["encoder_arch"]
    return 3 * enc["num_img"], enc["img_h"], enc["img_w"]


if __name__ == "__main__":
    cli(main, Args)
