"""DPPO: fine-tuning a pre-trained diffusion policy with PPO (Ren et al., ICLR 2025, §4, App. D.4, D.9).

The denoising process is an inner MDP inside each environment step (§4.1): every denoising step
x_t -> x_{t-1} of the last K' steps is an action with a Gaussian likelihood, and the whole chain
shares the environment-step advantage, discounted by γ_denoise per denoising step (eq. 4.5–4.7).
The first K - K' steps run the frozen pre-trained network; the last K' run `actor_ft`, a trainable
copy. The critic V(s) sees only the environment observation (eq. 4.8).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20 state, 100 pixel/furniture |
| K' | `ft_denoising_steps` | 10 (DDIM: `ddim_steps` = 5, all fine-tuned) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| γ_env, λ | `gamma`, `gae_lambda` | |
| γ_denoise | `gamma_denoising` | 0.99 (Avoid 0.95, furniture 0.9) |
| σ^exp_min, σ^prob_min | `min_sampling_denoising_std`, `min_logprob_denoising_std` | 0.1, 0.1 |
| chain | `chain_buf` | (n_steps, N, K'+1, T_a, D_a): the input of the first fine-tuned step and every output after it |
| obs | `obs_buf` | (n_steps, N, T_o, D_o), normalised |

One PPO sample is an (env-step, denoising-step) pair; minibatches are drawn over all
n_steps·N·K' of them (eqs. 4.5-4.7, reference `PPODiffusion.loss`). Log-probs are element-wise Normal
densities clamped to [-5, 2], restricted to the executed T_e actions and averaged (eq. 4.4).

Deviations from the reference implementation (docs/deviations.md):
- Truncation bootstraps from the finished episode's final observation, not the next episode's
  first; only `terminated` removes the bootstrap.
- K' = 1 uses the maximum clip range (the reference divides by zero).
- Avoid's 100-step limit is the task's horizon: there a time limit ends the episode without a
  bootstrap (`--bootstrap-truncated False`, the Avoid default; measured in docs/deviations.md).
- One evaluation function (`common.envs.evaluate`) serves training, pre-training and `--eval-only`,
  on one horizon: one episode, ⌈max_episode_steps / T_e⌉ chunk-steps (`--eval-n-steps` overrides it).
- The frozen network runs only on the steps it owns, and the old log-probs are taken while sampling,
  from the means the chain was drawn with, instead of a second pass of actor_ft over all pairs (the
  same formula and weights; float rounding aside; benchmarks/reference_compare.py).
- The critic runs once per env-step of a minibatch, not once per pair, and each minibatch is
  back-propagated in pieces of `--update-chunk` pairs with the gradients accumulated (the same loss
  and gradient up to float rounding; benchmarks/reference_compare.py).
- The target-KL stop is checked once per epoch (the max KL of its minibatches), not per minibatch,
  to keep host syncs out of the update loop; with target_kl = 1 it practically never fires.
- Resumed runs reproduce uninterrupted ones exactly for tasks that reset their envs every
  iteration (Avoid, robomimic); gym locomotion envs restart their episodes on resume.
- Furniture-Bench (`sims/furniture.py`, run through `python -m sims.furniture dppo_finetune.py ...`):
  truncation at exactly 700 / 1000 steps, a reset of envs whose observations turn non-finite, and the
  optional sim-to-real noise (App. D.7) in normalised units.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.envs import EpisodeTracker, RunningRewardScaler, evaluate, make_vec_env
from common.errors import UsageError
from common.networks import ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.runs import (DIFFUSION_PRETRAIN_HINT, PhaseTimer, apply_defaults, check_finite, check_positive,
                         apply_matmul_flags, check_range, cli, diffusion_checkpoint_path,
                         eval_only_report, explained_variance,
                         finetune_checkpoint, load_checkpoint, load_resume, load_weights, policy_header, ppo_optimizers,
                         print_defaults, resume_args, save_checkpoint, script_name, seed_everything,
                         start_finetuning,
                         step_schedulers, whole_network_weights)
from common.tasks import get_task, refuse_pixel_task

# the critic's scheduler steps on a first evaluation iteration (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")



@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"
    """task id (see common/tasks.py)"""
    checkpoint: str | None = None
    """pre-trained (or fine-tuned) checkpoint; None: the built-in one for the task, if any"""
    exp_name: str = script_name(__file__)
    """name of this experiment (part of the run folder)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets torch.use_deterministic_algorithms"""
    cuda: bool = True
    """use CUDA when available"""
    torch_threads: int | None = 1
    """CPU threads for torch: 1 is fastest for the small batches of sampling and immune to
    oversubscription (see README "Threads"); None: torch's default"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "dppo"
    """the wandb project"""
    resume: str | None = None
    """a run folder to continue from its checkpoint.pt, with the run's own arguments"""
    eval_only: bool = False
    """only evaluate the checkpoint (deterministic and stochastic) and exit; writes nothing"""
    plot: bool = True
    """Avoid: write trajectories.png with evaluation rollouts before and after fine-tuning"""
    capture_video: bool = False
    """record a few evaluation episodes per evaluation as MP4 in the run folder's videos/ (gym, robomimic: set
    MUJOCO_GL=egl without a display; with --eval-only: a new run folder holding only the videos)"""
    save_every: int = 1
    """iterations between checkpoints"""
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    """gym locomotion simulator: envpool, gymnasium, or auto (envpool when installed); the one used is printed"""
    update_chunk: int | None = None
    """(env-step, denoising-step) pairs per forward/backward piece of a PPO minibatch, gradients accumulated over the
    pieces (the same gradient up to float rounding); None: 4096 on the CPU (measured, docs/results.md "Speed"), the whole
    minibatch on a GPU"""
    compile: bool = False
    """torch.compile the sampling chain (`get_action`; on a GPU with CUDA graphs, mode reduce-overhead): the same noise
    as eager, ~40 % less sampling time on the CPU for ~1-2 minutes of compilation at start (docs/results.md "Speed")"""
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmuls: highest keeps float32 (the default); high: TF32; medium: bf16 products on AMX CPUs, TF32 on GPUs
    (~4x faster matmuls on an AMX CPU, log-probs off by ~1e-3; docs/results.md "Speed")"""
    onednn_matmul: bool = False
    """CPU: run float32 matmuls through oneDNN where a start-up check shows they stay float32 (faster on some CPUs, see
    docs/results.md "Speed"; refused with a printed line where the check fails, e.g. on AMX CPUs that would use bf16)"""
    # algorithm (None: the task's value, printed at start; see SUITE_DEFAULTS / TASK_DEFAULTS below)
    n_train_itr: int | None = None
    """fine-tuning iterations (gym 1000, lift 81, can 151, square/transport 201, Avoid 51)"""
    num_envs: int | None = None
    """parallel environments (gym 40, robomimic 50, furniture 1000, Avoid 50)"""
    n_steps: int | None = None
    """chunk-steps per env per iteration (gym 500, lift/can 300, square/transport 400, Avoid 25, furniture 88 One-leg,
    125 Lamp/Round-table)"""
    n_workers: int | None = None
    """env worker processes; None: one per core this process may use for robomimic, in-process for gym (which uses
    workers when given 2 or more) and Avoid"""
    ft_denoising_steps: int | None = None
    """K': the last K' denoising steps are fine-tuned (None: 10; under DDIM all ddim_steps)"""
    use_ddim: bool | None = None
    """DDIM sampling for checkpoints pre-trained with K = 100 (None: furniture yes, else no)"""
    ddim_steps: int = 5
    """DDIM steps"""
    horizon_steps: int | None = None
    """T_a in fine-tuning (UNet may differ from pre-training; None: the checkpoint's)"""
    act_steps: int | None = None
    """T_e (None: the task's)"""
    gamma: float | None = None
    """environment discount per chunk-step (gym/Avoid 0.99, robomimic/furniture 0.999)"""
    gae_lambda: float = 0.95
    """GAE λ"""
    bootstrap_truncated: bool | None = None
    """bootstrap time-limited episodes from V(final observation); False: the horizon ends the task (Avoid,
    docs/deviations.md)"""
    gamma_denoising: float | None = None
    """denoising discount (0.99; Avoid 0.95, furniture 0.9)"""
    min_sampling_denoising_std: float | None = None
    """exploration std floor while sampling (0.1; furniture 0.04)"""
    min_logprob_denoising_std: float = 0.1
    """std floor when evaluating log-probs"""
    randn_clip_value: float = 3.0
    """sampling noise clamp"""
    final_action_clip: bool | None = None
    """clamp executed actions to [-1, 1] before un-normalising (None: no; the reference's configs never clamp)"""
    actor_lr: float | None = None
    """actor learning rate (gym/robomimic 1e-4, furniture/Avoid 1e-5)"""
    actor_lr_min: float | None = None
    """end of the actor's cosine schedule (None: constant; furniture 1e-6)"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    lr_warmup_itr: int = 10
    """warm-up iterations of the cosine LR schedules (from actor_lr_min up to actor_lr; constant schedules ignore it)"""
    lr_cycle_itr: int | None = None
    """first_cycle_steps of the cosine LR schedules: warm-up, then cosine down to actor_lr_min
    (None: n_train_itr; furniture 10000)"""
    batch_size: int | None = None
    """PPO minibatch of (env-step, denoising-step) pairs (gym 50000, lift/can 7500, square/transport 10000, Avoid
    n_steps·num_envs·K'/2, furniture MLP 8800 (one-leg-low 17600), UNet 30000 One-leg / 40000)"""
    update_epochs: int | None = None
    """PPO epochs per iteration (10; gym, transport, furniture 5)"""
    clip_coef: float | None = None
    """clip ε of the final denoising step (gym 0.01, robomimic 0.01, furniture 0.001, Avoid 0.1)"""
    clip_coef_base: float | None = None
    """clip ε of the noisiest fine-tuned step (robomimic 0.001; elsewhere = clip_coef)"""
    clip_coef_rate: float = 3.0
    """exponential rate of the per-step clip schedule"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    target_kl: float | None = 1.0
    """stop the epochs when approx KL exceeds this"""
    max_grad_norm: float | None = None
    """gradient norm clip (None: off)"""
    n_critic_warmup_itr: int | None = None
    """iterations before the actor starts to step (gym 0, robomimic 2, furniture/Avoid 1)"""
    val_freq: int = 10
    """iterations between evaluations (0: only the final one)"""
    eval_n_steps: int | None = None
    """chunk-steps of an evaluation (None: one episode, ⌈max_episode_steps / T_e⌉)"""
    reward_scale_running: bool = True
    """running reward scaling"""
    bc_coef: float = 0.0
    """optional BC term: log-prob of base-policy chains under actor_ft (off by default)"""
    terminate_on_success: bool = False
    """robomimic: end episodes on success (the paper does not)"""
    obs_noise_std: float = 0.0
    """furniture sim-to-real (paper App. D.7): std of Gaussian noise on every observation, in the dataset's normalised
    units, applied by the env in training and evaluation (0: off)"""
    action_noise_std: float = 0.0
    """furniture sim-to-real (paper App. D.7 uses 0.03): std of Gaussian noise on every executed action, in normalised
    units, applied by the env in training and evaluation (0: off)"""


# The reference's fine-tuning configs (paper App. D); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, gamma_denoising=0.99,
                actor_lr=1e-4, batch_size=50000, update_epochs=5, clip_coef=0.01, clip_coef_base=0.01, n_critic_warmup_itr=0,
                min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, gamma_denoising=0.99,
                      actor_lr=1e-4, batch_size=7500, update_epochs=10, clip_coef=0.01, clip_coef_base=0.001,
                      n_critic_warmup_itr=2, min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
    # furniture: the reference's wrapper ends every episode at the time limit as terminal (no bootstrap), and
    # n_steps = round(max_episode_steps / T_e) = 88 (One-leg) or 125 (Lamp, Round-table)
    "furniture": dict(bootstrap_truncated=False, n_train_itr=1000, num_envs=1000, n_steps=125, gamma=0.999,
                      gamma_denoising=0.9, actor_lr=1e-5, actor_lr_min=1e-6, lr_cycle_itr=10000, batch_size=8800,
                      update_epochs=5, clip_coef=0.001, clip_coef_base=0.001, n_critic_warmup_itr=1,
                      min_sampling_denoising_std=0.04, final_action_clip=False, use_ddim=True),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, gamma_denoising=0.95,
                  actor_lr=1e-5, batch_size=None, update_epochs=10, clip_coef=0.1, clip_coef_base=0.1, n_critic_warmup_itr=1,
                  min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, batch_size=10000, n_train_itr=201),
    "transport": dict(n_steps=400, batch_size=10000, n_train_itr=201, update_epochs=5),
    "one-leg-low": dict(n_steps=88, batch_size=17600), "one-leg-med": dict(n_steps=88),
}
# cfg/furniture/finetune/*/ft_ppo_diffusion_unet.yaml: the UNet's batch (used when --batch-size is not given)
FURNITURE_UNET_BATCH = {"one_leg": 30000, "lamp": 40000, "round_table": 40000}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    filled = apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                   "act_steps": task.act_steps})
    if args.use_ddim and args.ft_denoising_steps is not None and args.ft_denoising_steps > args.ddim_steps:
        raise UsageError(f"--ft-denoising-steps {args.ft_denoising_steps} exceeds the {args.ddim_steps} DDIM steps "
                         "(DDIM fine-tunes the last K' <= ddim_steps steps)")
    filled.update(apply_defaults(args, {"ft_denoising_steps": args.ddim_steps if args.use_ddim else 10,
                                        "actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    if args.batch_size is None:  # Avoid: n_steps·n_envs·K'/2 (App. D.8)
        args.batch_size = filled["batch_size"] = args.n_steps * args.num_envs * args.ft_denoising_steps // 2
    check_positive(args, "n_train_itr", "num_envs", "n_steps", "n_workers", "ft_denoising_steps", "ddim_steps",
                   "horizon_steps", "act_steps", "batch_size", "update_epochs", "save_every", "torch_threads", "eval_n_steps",
                   "actor_lr", "actor_lr_min", "critic_lr", "lr_cycle_itr", "clip_coef", "clip_coef_base",
                   "min_logprob_denoising_std", "min_sampling_denoising_std", "randn_clip_value", "target_kl", "max_grad_norm",
                   "clip_coef_rate", "update_chunk")
    for name in ("gamma", "gae_lambda", "gamma_denoising"):
        check_range(args, name, 0.0, 1.0)
    check_range(args, "seed", 0, 2**31 - 1)  # numpy seeds stay below 2**32 with the per-env offsets
    for name in ("obs_noise_std", "action_noise_std"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {value})")
        if value and task.suite != "furniture":
            raise UsageError(f"--{name.replace('_', '-')} is the Furniture-Bench sim-to-real option; {task.id} has none")
    for name in ("val_freq", "lr_warmup_itr", "n_critic_warmup_itr", "vf_coef", "bc_coef"):
        check_range(args, name, 0, math.inf)
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`): ᾱ(i) = cos²(((i/K)+s)/(1+s)·π/2) /
    ᾱ(0); β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped to [0, 0.999].

    Float64. The reference (irom-princeton/dppo, model/diffusion/sampling.py, cosine_beta_schedule)
    evaluates the same float64 values and returns them cast to float32; everything derived from β is
    then computed in float32 (see `DiffusionPPO.__init__`)."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)  # = i/K, evaluated as the reference does
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def clip_schedule(ft_steps: int, base: float, clip: float, rate: float) -> torch.Tensor:
    """Per fine-tuned step i (0 = noisiest): ε(i) = base + (clip - base)(e^{rate·u} - 1)/(e^{rate} - 1), u = i/(K'-1)."""
    if ft_steps == 1:  # the reference divides by zero here (docs/deviations.md)
        return torch.tensor([clip])
    u = torch.linspace(0, 1, ft_steps, dtype=torch.float64)
    return (base + (clip - base) * (torch.exp(rate * u) - 1) / (math.exp(rate) - 1)).float()


def denoising_discount(ft_steps: int, gamma_denoising: float) -> torch.Tensor:
    """γ_denoise^(K'-i-1): the final denoising step has weight 1 (eq. 4.7)."""
    return gamma_denoising ** torch.arange(ft_steps - 1, -1, -1, dtype=torch.float32)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over chunk-steps (§4.2; reference `TrainPPODiffusionAgent.run`). All inputs (n_steps, N);
    next_values = V(s'_t) where s'_t is the observation after chunk-step t (the final observation when
    the episode ended there)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def surrogate_terms(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: clipped surrogate loss, approx KL and clipped flag, for advantages already normalised and discounted."""
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps))
    with torch.no_grad():
        return pg, (ratio - 1) - log_ratio, ((ratio - 1).abs() > eps).float()


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, disc: torch.Tensor, eps: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over (env-step, denoising-step) pairs (eqs. 4.5-4.7, reference `PPODiffusion.loss`).

    Advantages are normalised within the minibatch, then weighted by γ_denoise^(K'-i-1) (`disc`);
    `eps` is each pair's clip range. Returns (pg_loss, approx_kl, clipfrac)."""
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) * disc
    pg, kl, clipped = surrogate_terms(new_lp, old_lp, adv, eps)
    return pg.mean(), kl.mean(), clipped.mean()


def ppo_loss_backward(logprob, idx: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, disc: torch.Tensor,
                      eps: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ppo_loss(logprob(idx), old_lp, adv, disc, eps)` and its backward pass, in pieces of `chunk` pairs that fit the
    CPU cache: the advantages are normalised over the whole minibatch first, each piece back-propagates its sum / the
    minibatch size, so the gradient accumulates to that of the whole minibatch (up to float rounding). Returns the
    detached (pg_loss, approx_kl, clipfrac)."""
    n = idx.numel()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) * disc
    total = torch.zeros(3, device=idx.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        pg, kl, clipped = surrogate_terms(logprob(idx[a:b]), old_lp[a:b], adv[a:b], eps[a:b])
        pg = pg.sum() / n
        pg.backward()
        total += torch.stack([pg.detach(), kl.sum() / n, clipped.sum() / n])
    return total[0], total[1], total[2]


def minibatch_values(critic: nn.Module, b_obs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V(s) of each pair's env-step, the critic run once per env-step instead of once per pair (the same values: a
    minibatch holds each env-step up to K' times). All env-steps when they are no more than the pairs (no host sync);
    else, on the CPU, the distinct ones."""
    if b_obs.shape[0] <= s.numel():
        return critic(b_obs).view(-1)[s]
    if s.device.type == "cpu":  # torch.unique would wait for a GPU
        rows, inverse = torch.unique(s, return_inverse=True)
        return critic(b_obs[rows]).view(-1)[inverse]
    return critic(b_obs[s]).view(-1)


class DiffusionPPO(nn.Module):
    """Frozen base network + trainable copy of it for the last K' steps, and the critic."""

    def __init__(self, base: nn.Module, critic: nn.Module, denoising_steps: int, ft_denoising_steps: int,
                 horizon_steps: int, action_dim: int, use_ddim: bool, ddim_steps: int, min_sampling_std: float,
                 min_logprob_std: float, randn_clip: float) -> None:
        super().__init__()
        self.actor = base.requires_grad_(False).eval()
        self.actor_ft = copy.deepcopy(base).requires_grad_(True)
        self.critic = critic
        self.horizon_steps, self.action_dim = horizon_steps, action_dim
        self.use_ddim, self.K, self.ft_steps = use_ddim, denoising_steps, ft_denoising_steps
        self.min_sampling_std, self.min_logprob_std, self.randn_clip = min_sampling_std, min_logprob_std, randn_clip

        # All coefficients in float32 from float32 β, with the reference's operation order and
        # std = exp(½·log var) (irom-princeton/dppo: model/diffusion/diffusion.py, DiffusionModel.__init__;
        # model/diffusion/diffusion_vpg.py, VPGDiffusion.p_mean_var). Matching its log-probs to 1e-5 needs
        # this: e.g. at K = 100, t = 0 the float32 mean coefficient c2 is 1.0000139, not 1.
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        one = torch.ones(1)
        if use_ddim:  # "leading" grid {0, 20, ..., 80} for K = 100, visited from the top (reference `DiffusionModel`)
            ts = torch.arange(0, ddim_steps) * (denoising_steps // ddim_steps)
            ts = ts.flip(0)
            a, a_prev = ac[ts], torch.cat([ac[ts[1:]], one])
            sigma = (1.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 1
            sigma0 = (0.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 0 (evaluation)
            coefs = dict(ddim_a=a, ddim_a_prev=a_prev, ddim_sqrt_a=a**0.5, ddim_sqrt_1ma=(1.0 - a) ** 0.5,
                         ddim_sqrt_a_prev=a_prev**0.5, ddim_dir=(1.0 - a_prev - sigma**2).clamp(min=0).sqrt(),
                         ddim_dir0=(1.0 - a_prev - sigma0**2).clamp(min=0).sqrt(),
                         std=torch.exp(0.5 * torch.log(sigma**2)))
        else:  # DDPM posterior (reference `model/diffusion/diffusion.py`, `DiffusionModel.p_mean_var`)
            ts = torch.arange(denoising_steps - 1, -1, -1)
            ac_prev = torch.cat([one, ac[:-1]])
            var = betas * (1.0 - ac_prev) / (1.0 - ac)
            logvar = torch.log(torch.clamp(var, min=1e-20))
            coefs = dict(sqrt_recip_ac=torch.sqrt(1.0 / ac)[ts], sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1)[ts],
                         c1=(betas * torch.sqrt(ac_prev) / (1.0 - ac))[ts],
                         c2=((1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac))[ts],
                         std=torch.exp(0.5 * logvar)[ts])
        self.register_buffer("ts", ts, persistent=False)  # the visited steps, in order; index j
        for name, value in coefs.items():
            self.register_buffer(name, value, persistent=False)
        self.first_ft = len(ts) - ft_denoising_steps  # index j of the first fine-tuned step

    def p_mean_std(self, net: nn.Module, x: torch.Tensor, j: torch.Tensor | int, cond: torch.Tensor,
                   deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (un-floored) std of p(x_{t-1} | x_t) at visited index j: a (B,) tensor, or one int for all rows
        (sampling: the coefficients broadcast instead of being gathered per row; the same numbers)."""
        eps = net(x, self.ts[j].expand(x.shape[0]), cond)
        v = lambda buf: buf[j].view(-1, 1, 1)  # noqa: E731
        if self.use_ddim:  # same float32 operations as the reference's VPGDiffusion.p_mean_var
            sqrt_a, sqrt_1ma = v(self.ddim_sqrt_a), v(self.ddim_sqrt_1ma)
            x0 = ((x - sqrt_1ma * eps) / sqrt_a).clamp(-1, 1)
            eps = (x - sqrt_a * x0) / sqrt_1ma
            std = torch.zeros_like(sqrt_a) if deterministic else v(self.std)  # η = 0 in evaluation
            mean = v(self.ddim_sqrt_a_prev) * x0 + v(self.ddim_dir0 if deterministic else self.ddim_dir) * eps
        else:
            x0 = (v(self.sqrt_recip_ac) * x - v(self.sqrt_recipm1_ac) * eps).clamp(-1, 1)
            mean = v(self.c1) * x0 + v(self.c2) * x
            std = v(self.std)
        return mean, std

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False, base_only: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a chunk (reference `DiffusionModel.forward`). Returns x_0 (B, T_a, D_a) and the chain (B, K'+1, T_a, D_a)."""
        x, chain, _ = self.sample(cond, deterministic, base_only)
        return x, chain

    @torch.no_grad()
    def rollout_action(self, cond: torch.Tensor, act_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`get_action` for the rollout, plus each fine-tuned step's `pair_logprobs` (B, K'): PPO's old log-probs, read
        off the means the chain was sampled from instead of a second pass of actor_ft over all pairs after the rollout
        (the reference's; same weights, same formula, float rounding aside)."""
        x, chain, (means, stds) = self.sample(cond, keep_means=True)
        return x, chain, chunk_logprob(self.logprob(chain[:, 1:], torch.stack(means, 1), torch.stack(stds, 1)), act_steps)

    def sample(self, cond: torch.Tensor, deterministic: bool = False, base_only: bool = False, keep_means: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The chain, and with `keep_means` the mean and std of each fine-tuned step."""
        B = cond.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=cond.device)
        chain, means, stds = [x] if self.first_ft == 0 else [], [], []
        for j in range(len(self.ts)):
            net = self.actor if (j < self.first_ft or base_only) else self.actor_ft
            mean, std = self.p_mean_std(net, x, j, cond, deterministic)
            if deterministic:  # DDPM: max(σ_t, 1e-3), none at t = 0; DDIM: η = 0 (reference `DiffusionModel.forward`)
                sampling_std = torch.zeros_like(std) if (self.use_ddim or j == len(self.ts) - 1) else std.clamp(min=1e-3)
            else:
                sampling_std = std.clamp(min=self.min_sampling_std)
            x = mean + sampling_std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
            if j + 1 == self.first_ft or j >= self.first_ft:
                chain.append(x)
            if keep_means and j >= self.first_ft:
                means.append(mean)
                stds.append(std)
        return x, torch.stack(chain, dim=1), (means, stds)

    def logprob(self, x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Element-wise log N(x_prev; mean, max(std, σ^prob_min)²) (eq. 4.4)."""
        std = std.clamp(min=self.min_logprob_std)
        return -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)

    def get_logprobs(self, cond: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Element-wise log N(x_prev; μ_ft(x_t), max(σ_t, σ^prob_min)²) at fine-tuned position i (eq. 4.4)."""
        return self.logprob(x_prev, *self.p_mean_std(self.actor_ft, x_t, self.first_ft + i, cond))

    def get_value(self, cond: torch.Tensor) -> torch.Tensor:
        return self.critic(cond)

    def bc_loss(self, cond: torch.Tensor) -> torch.Tensor:
        """Optional BC term (`irom-princeton/dppo` `model/diffusion/diffusion_ppo.py` `PPODiffusion.loss`,
        `use_bc_loss`): one full chain sampled by the frozen base policy per observation, its log-prob
        under actor_ft at every fine-tuned step, clamped to [-5, 2] and averaged over the whole chunk
        (all T_a actions), the K' steps and the batch; minus that mean."""
        _, chain = self.get_action(cond, base_only=True)
        B = chain.shape[0]
        i = torch.arange(self.ft_steps, device=cond.device).repeat(B)
        b = torch.arange(B, device=cond.device).repeat_interleave(self.ft_steps)
        return -self.get_logprobs(cond[b], chain[b, i], chain[b, i + 1], i).clamp(-5, 2).mean()


def pair_logprobs(agent: DiffusionPPO, obs: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor,
                  act_steps: int) -> torch.Tensor:
    """One scalar per (env-step, denoising-step) pair (`chunk_logprob` of `get_logprobs`)."""
    return chunk_logprob(agent.get_logprobs(obs, x_t, x_prev, i), act_steps)


def chunk_logprob(logprob: torch.Tensor, act_steps: int) -> torch.Tensor:
    """A pair's scalar: element-wise log-probs (..., T_a, D_a) clamped to [-5, 2], restricted to the executed T_e
    actions and averaged (`PPODiffusion.loss`, reference)."""
    return logprob.clamp(-5, 2)[..., :act_steps, :].mean(dim=(-2, -1))


def compile_sampling(get_action, device: torch.device):
    """`torch.compile` of the sampling chain, drawing the same noise as eager (inductor's `fallback_random`); on a GPU
    in mode reduce-overhead, which replays CUDA graphs instead of launching each denoising step's small kernels."""
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    return torch.compile(get_action, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def reference_conversion() -> ModuleType:
    """`loaders/convert.py`, which `load_checkpoint` uses only for `--checkpoint paper` or a checkpoint of
    irom-princeton/dppo: imported then, so a run from this project's checkpoints never loads it."""
    from loaders import convert

    return convert


def main(args: Args) -> dict:
    resume = None
    if args.resume:  # the run's own task and arguments; explicit flags win visibly or are refused
        resume = load_resume(args.resume, "diffusion", DIFFUSION_PRETRAIN_HINT.format(args.env_id))
        args = resume_args(args, resume["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        print_defaults(task.id, filled)
    args.checkpoint = diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt = resume or load_checkpoint(args.checkpoint, "diffusion", DIFFUSION_PRETRAIN_HINT.format(task.id), task,
                                     conversion=reference_conversion)
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    if task.suite == "furniture" and ckpt["backbone"] == "unet" and "batch_size" in filled:
        args.batch_size = FURNITURE_UNET_BATCH[task.env_name]
        print(f"{task.id} UNet default: batch_size={args.batch_size}")
    K_ft, T_e, N = args.ft_denoising_steps, args.act_steps, args.num_envs
    if args.use_ddim and ckpt["denoising_steps"] % args.ddim_steps:
        raise UsageError(f"DDIM with {args.ddim_steps} steps needs K divisible by it "
                         f"(checkpoint K = {ckpt['denoising_steps']})")
    if not args.use_ddim and K_ft > ckpt["denoising_steps"]:
        raise UsageError(f"--ft-denoising-steps {K_ft} exceeds the checkpoint's K = {ckpt['denoising_steps']}")
    if T_e > args.horizon_steps:
        raise UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {args.horizon_steps}")
    if not args.eval_only and args.batch_size > args.n_steps * N * K_ft:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {args.n_steps * N * K_ft} (env-step, denoising-step) "
                         f"pairs of one iteration (n_steps {args.n_steps} x num_envs {N} x K' {K_ft})")
    device = seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    apply_matmul_flags(args, device)
    # pieces of each minibatch's backward (docs/results.md "Speed")
    chunk = args.update_chunk or (4096 if device.type == "cpu" else args.batch_size)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    base = build_diffusion_network(ckpt, args.horizon_steps)
    ckpt_path = os.path.join(args.resume, "checkpoint.pt") if resume is not None else args.checkpoint
    # fine-tuning starts from the EMA of pre-training (or a whole-network fine-tuned `actor`, e.g. drwr.py's)
    load_weights(base, ckpt["base"] if "base" in ckpt else whole_network_weights(ckpt, ckpt_path), ckpt_path)
    # the reference's furniture critic is [512] x 3 (cfg/furniture/finetune/*/ft_ppo_*.yaml), elsewhere ours is [256] x 3
    critic = ObsCritic(task.obs_dim, ckpt["cond_steps"], mlp_dims=(512,) * 3 if task.suite == "furniture" else (256,) * 3)
    agent = DiffusionPPO(base, critic, ckpt["denoising_steps"], K_ft, args.horizon_steps,
                         task.action_dim, args.use_ddim, args.ddim_steps, args.min_sampling_denoising_std,
                         args.min_logprob_denoising_std, args.randn_clip_value).to(device)
    if "actor_ft" in ckpt:
        load_weights(agent.actor_ft, ckpt["actor_ft"], ckpt_path)
        load_weights(agent.critic, ckpt.get("critic"), ckpt_path)
    if args.compile:  # an opt-in speed-up; the eager path is the default
        agent.get_action = compile_sampling(agent.get_action, device)
        agent.rollout_action = compile_sampling(agent.rollout_action, device)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=ckpt["cond_steps"], n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend, normalizer=normalizer,
                        obs_noise_std=args.obs_noise_std, action_noise_std=args.action_noise_std,
                        capture_video=args.capture_video)
    print(f"envs: {N} x {task.id} on {envs.backend}")
    # Avoid is evaluated with the training noise (App. D.8); everything else deterministically.
    eval_deterministic = task.suite != "avoid"

    def act(deterministic: bool):
        def f(obs: np.ndarray) -> np.ndarray:
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x, _ = agent.get_action(cond, deterministic)
            x = x.clamp(-1, 1) if args.final_action_clip else x
            return normalizer.unnormalize_action(x).cpu().numpy()
        return f

    def run_eval(deterministic: bool, itr: int) -> dict:  # itr: the iteration evaluated (its own stream)
        return evaluate(envs, act(deterministic), task, T_e, seed=args.seed + 1_000_000, index=itr, n_steps=args.eval_n_steps)

    if args.eval_only:
        out = eval_only_report(run_eval, args, task.id, index=ckpt.get("itr", 0))
        envs.close()
        return out

    optimizers, schedulers = ppo_optimizers(agent.actor_ft, agent.critic, args)
    actor_opt, critic_opt = optimizers["actor"], optimizers["critic"]
    scaler = RunningRewardScaler(N)
    clip_eps = clip_schedule(K_ft, args.clip_coef_base, args.clip_coef, args.clip_coef_rate).to(device)
    disc = denoising_discount(K_ft, args.gamma_denoising).to(device)
    run, start_itr, env_steps = start_finetuning(args, task, resume, optimizers, schedulers, scaler,
                                                 lambda: run_eval(eval_deterministic, 0))
    header = {**policy_header(ckpt), "horizon_steps": args.horizon_steps}

    T_o, D_o, T_a, D_a = ckpt["cond_steps"], task.obs_dim, args.horizon_steps, task.action_dim
    obs_buf = torch.zeros(args.n_steps, N, T_o, D_o, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)
    chain_buf = torch.zeros(args.n_steps, N, K_ft + 1, T_a, D_a, device=device)
    old_lp_buf = torch.zeros(args.n_steps, N, K_ft, device=device)
    tracker = EpisodeTracker(N, T_e, task.success_chunk_reward, task.success_return)
    history, last_train = [], {}
    obs, need_reset = None, True
    timer = PhaseTimer(device)
    bar = tqdm(range(start_itr, args.n_train_itr), initial=start_itr, total=args.n_train_itr, desc="iterations")
    for itr in bar:
        t_itr = time.time()
        if eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            r = run_eval(True, itr)  # reset and run deterministically, no update this iteration (reference `TrainPPOAgent`)
            run.log_evaluation_iteration(itr, env_steps, r, last_train, bar)
            need_reset = True
            step_schedulers(schedulers, itr, args.n_critic_warmup_itr)  # the reference steps on evaluation iterations too
            continue

        # ---- rollout ----
        timer.reset()
        if need_reset or task.reset_every_iteration:
            obs = envs.reset(seed=args.seed + itr * N)
            tracker.reset()
            need_reset = False
            first = np.ones(N)
        # else: envs that continue across iterations keep the last step's done as the first step's
        # `first` (reference `agent/finetune/train_ppo_diffusion_agent.py` `run`, `firsts_trajs[0] = done_venv`)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x, chain, old_lp_buf[step] = agent.rollout_action(cond, T_e)
            obs_buf[step], chain_buf[step] = cond, chain
            timer.lap("sampling")
            x = x.clamp(-1, 1) if args.final_action_clip else x
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            next_obs_buf[step] = normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device))
            terminated[step], dones[step] = term, term | trunc
            tracker.step(rewards[step], dones[step].astype(bool))
            first = dones[step].astype(np.float64)
            timer.lap("env")
        env_steps += args.n_steps * N * T_e
        last_train = tracker.pop()
        history.append({"iteration": itr, "env_steps": env_steps, **last_train})
        if not eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            run.log_eval(itr, env_steps, "stochastic", last_train)

        # ---- advantages: GAE over chunk-steps (paper eq. 4.7; truncation: docs/deviations.md) ----
        r_scaled = rewards
        if args.reward_scale_running:
            r_scaled = scaler(rewards, firsts)  # once per iteration, as the reference (docs/deviations.md)
        with torch.no_grad():
            values = agent.get_value(obs_buf.flatten(0, 1)).view(args.n_steps, N)
            next_values = agent.get_value(next_obs_buf.flatten(0, 1)).view(args.n_steps, N)
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            cut = terminated if args.bootstrap_truncated else dones
            advantages, returns = compute_gae(as_t(r_scaled), values, next_values, as_t(cut), as_t(dones),
                                              args.gamma, args.gae_lambda)
        timer.lap("advantages")

        # ---- the pairs; their old log-probs were taken while sampling (`DiffusionPPO.rollout_action`) ----
        b_obs = obs_buf.flatten(0, 1)                                    # (S, T_o, D_o), S = n_steps·N
        b_chain = chain_buf.flatten(0, 1)                                # (S, K'+1, T_a, D_a)
        b_adv, b_ret = advantages.flatten(), returns.flatten()
        S = b_obs.shape[0]
        pos = torch.arange(K_ft, device=device).repeat(S)                # (S·K',) position i of each pair
        sample = torch.arange(S, device=device).repeat_interleave(K_ft)  # (S·K',) env-step of each pair

        def logprob(idx: torch.Tensor) -> torch.Tensor:
            s, i = sample[idx], pos[idx]
            return pair_logprobs(agent, b_obs[s], b_chain[s, i], b_chain[s, i + 1], i, T_e)

        old_lp = old_lp_buf.flatten()                                    # (S·K',) in the order of (sample, pos)

        # ---- PPO update over (env-step, denoising-step) pairs (paper eqs. 4.5-4.7) ----
        agent.train()
        stats_t = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "bc_loss")}
        for epoch in range(args.update_epochs):
            perm = torch.randperm(S * K_ft, device=device)
            kls = []
            for start in range(0, S * K_ft - args.batch_size + 1, args.batch_size):
                idx = perm[start:start + args.batch_size]
                s, i = sample[idx], pos[idx]
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                # loss = pg_loss + vf_coef·v_loss (+ bc_coef·bc_loss), back-propagated in parts (same gradient)
                pg_loss, kl, clipfrac = ppo_loss_backward(logprob, idx, old_lp[idx], b_adv[s], disc[i], clip_eps[i], chunk)
                v_loss = 0.5 * ((minibatch_values(agent.critic, b_obs, s) - b_ret[s]) ** 2).mean()
                loss = args.vf_coef * v_loss
                bc_loss = torch.zeros((), device=device)
                if args.bc_coef > 0:  # optional: base-policy chains should stay likely under actor_ft
                    bc_loss = agent.bc_loss(b_obs[s])  # one base chain per pair's observation, as the reference
                    loss = loss + args.bc_coef * bc_loss
                loss.backward()
                if itr >= args.n_critic_warmup_itr:
                    # the reference clips only actor_ft's gradients, after the critic warm-up
                    # (`agent/finetune/train_ppo_diffusion_agent.py` `run`)
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.actor_ft.parameters(), args.max_grad_norm)
                    actor_opt.step()
                critic_opt.step()
                kls.append(kl)
                for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("approx_kl", kl), ("bc_loss", bc_loss),
                             ("clipfrac", clipfrac)):
                    stats_t[k].append(v.detach())
            if args.target_kl is not None and kls and torch.stack(kls).max().item() > args.target_kl:
                break  # one host sync per epoch
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # the LRs of this iteration's update
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
    final = run_eval(eval_deterministic, args.n_train_itr)  # a final evaluation row after the last update
    out = run.finish(args.n_train_itr, env_steps, "deterministic" if eval_deterministic else "stochastic", final,
                     {"history": history})
    envs.close()
    return out


if __name__ == "__main__":
    cli(main, Args)
