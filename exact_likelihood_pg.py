"""Exact-likelihood policy gradient: PPO on the final action chunk of a diffusion policy, with log p(a|s)
from the probability-flow ODE (Ren et al., ICLR 2025, App. B.5; Song et al. 2021, App. D).

Unlike DPPO, the MDP is the environment's alone: one PPO sample is one environment step, its action
the final chunk a = x_0 of the whole K-step DDPM chain, sampled by the one trainable ε-network (no
frozen copy: the old log-probs of the ratio are the same network's before the update, as in the
reference, whose frozen network only serves its drift above step K' and its divergence). log p(a|s)
comes from the probability-flow ODE of the VP-SDE dx = -½β(t)x dt + √β(t) dW whose β(t) is the
cosine schedule's β_i at i = round(t·K) (clamped ≥ 1e-10), with score -ε_θ(x, i, s)/√(1 - ᾱ_i):

    dx/dt = f(x, t) = -½β(t)·(x - ε_θ(x, i, s)/√(1 - ᾱ_i)),
    log p_0(a) = log N(x(1); 0, I) + ∫_ε^1 ∇·f(x(t), t) dt,   x(ε) = a,

integrated forward from t = ε to 1 with Euler steps of 0.05 (20 network evaluations at K = 20), the
divergence by Hutchinson's estimator (Rademacher probes, fixed over one integration) or exactly
(the T_a·D_a basis vectors) when T_a·D_a is small. As in the reference, the log-likelihood is in bits
per dimension of the whole chunk (divided by ln 2·T_a·D_a) and clamped to [-5, 2]; the PPO update
back-propagates through the whole integration, divergence included. The critic V(s), GAE and the
running reward scaling are DPPO's (eq. 4.8, §4.2).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20 (state) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| γ_env, λ | `gamma`, `gae_lambda` | |
| σ^exp_min | `min_sampling_denoising_std` | 0.1 |
| a = x_0 | `act_buf` | (n_steps, N, T_a, D_a), the whole sampled chunk |
| obs | `obs_buf` | (n_steps, N, T_o, D_o), normalised |
| β_i, √(1-ᾱ_i) | `sde_beta`, `sde_sigma` | (K,) |
| ε, Δt | `sde_eps`, `sde_step_size` | 1e-4, 0.05 |
| probes v | `sde_num_probes` Rademacher or the basis | (B·P, T_a, D_a) |

Defaults are the reference's configs (`cfg/gym/finetune/hopper-v2/ft_ppo_exact_diffusion_mlp.yaml`,
`cfg/robomimic/finetune/can/ft_ppo_exact_diffusion_mlp.yaml`; the reference has no other robomimic
config, so Can's serves every robomimic task). Avoid has no reference config: DPPO's Avoid run size
(50 envs × 25 chunk-steps, 51 iterations, reset every iteration, no bootstrap at the time limit) with
the gym config's hyperparameters; the gym batch of 5000 exceeds the 1250 samples of one Avoid
iteration, so Avoid's batch is n_steps·num_envs/2 = 625, DPPO's Avoid rule without K'. The paper
gives no settings for this method (App. B.5) and no Table A8 entry for it is known to us, so no
paper value is named as differing from these defaults.

Deviations from the reference implementation (docs/deviations.md, "exact_likelihood_pg.py"):
- The divergence is taken of the same (fine-tuned) network as the drift; the reference differentiates
  the frozen pre-trained network there, so its likelihood is not the fine-tuned policy's.
- The whole network is fine-tuned at every denoising step (the reference samples the first K - K'
  steps and integrates the drift above step K' with the frozen network).
- The divergence is exact (T_a·D_a basis probes) when T_a·D_a ≤ `exact_divergence_max_dim` (8:
  Avoid; gym and robomimic keep the reference's 2 Rademacher probes, fresh at every evaluation;
  `--fixed-probes` reuses a sample's old-log-likelihood probes in the update, off by default).
- Sampling noise is clamped to ±3 as in DPPO; the reference's exact-likelihood configs leave it at
  the code default ±10.
- Truncation bootstraps from the finished episode's final observation; Avoid's time limit ends the
  episode without a bootstrap (as dppo_finetune.py).
- The target-KL stop is checked once per epoch (as dppo_finetune.py), not per minibatch.
Reproduced as the reference has it (docs/deviations.md): β(t) = β_round(t·K) on t in [ε, 1] integrates
only Σβ_i/K of the DDPM's noise (`--sde-beta-scale K` gives all of it), and log p is in bits per
dimension of the whole chunk before the [-5, 2] clamp and the ratio.
"""

from __future__ import annotations

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
from common.runs import (DIFFUSION_PRETRAIN_HINT, PhaseTimer, apply_defaults, apply_matmul_flags, check_finite, check_positive,
                         check_range, cli, diffusion_checkpoint_path, eval_only_report, explained_variance,
                         finetune_checkpoint, load_checkpoint, load_resume, load_weights, policy_header, ppo_optimizers,
                         print_defaults, resume_args, save_checkpoint, script_name, seed_everything, start_finetuning,
                         step_schedulers, whole_network_weights)
from common.tasks import get_task, refuse_pixel_task

# the critic's scheduler steps on a first evaluation iteration (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")

METHOD = "exact_likelihood_pg"


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"
    """task id (see common/tasks.py)"""
    checkpoint: str | None = None
    """pre-trained (or whole-network fine-tuned) checkpoint; None: the built-in one for the task, if any"""
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
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmuls: highest keeps float32 (the default); high: TF32; medium: bf16 products on AMX CPUs, TF32 on GPUs
    (~4x faster matmuls on an AMX CPU, log-probs off by ~1e-3; docs/results.md "Speed")"""
    onednn_matmul: bool = False
    """CPU: run float32 matmuls through oneDNN where a start-up check shows they stay float32 (faster on some CPUs, see
    docs/results.md "Speed"; refused with a printed line where the check fails, e.g. on AMX CPUs that would use bf16)"""
    update_chunk: int | None = None
    """env-steps per forward/backward piece of a PPO minibatch, gradients accumulated over the pieces (the same gradient
    up to float rounding, peak memory ~ piece size); None: 1000 on the CPU (docs/results.md "Speed"), the whole minibatch
    on a GPU"""
    # algorithm (None: the task's value, printed at start; see SUITE_DEFAULTS below)
    n_train_itr: int | None = None
    """fine-tuning iterations (gym 1000, robomimic 300, Avoid 51)"""
    num_envs: int | None = None
    """parallel environments (gym 40, robomimic 50, Avoid 50)"""
    n_steps: int | None = None
    """chunk-steps per env per iteration (gym 500, robomimic 300, Avoid 25)"""
    n_workers: int | None = None
    """env worker processes; None: one per core this process may use for robomimic, in-process for gym (which uses
    workers when given 2 or more) and Avoid"""
    horizon_steps: int | None = None
    """T_a in fine-tuning (UNet may differ from pre-training; None: the checkpoint's)"""
    act_steps: int | None = None
    """T_e (None: the task's)"""
    gamma: float | None = None
    """environment discount per chunk-step (gym/Avoid 0.99, robomimic 0.999)"""
    gae_lambda: float = 0.95
    """GAE λ"""
    bootstrap_truncated: bool | None = None
    """bootstrap time-limited episodes from V(final observation); False: the horizon ends the task (Avoid,
    docs/deviations.md)"""
    min_sampling_denoising_std: float = 0.1
    """exploration std floor while sampling"""
    randn_clip_value: float = 3.0
    """sampling noise clamp"""
    sde_eps: float = 1e-4
    """start time ε of the probability-flow ODE"""
    sde_step_size: float = 0.05
    """Euler step of the ODE on t in [ε, 1]"""
    sde_min_beta: float = 1e-10
    """lower clamp of the SDE's β"""
    sde_beta_scale: float = 1.0
    """β(t) = scale·β_round(t·K): 1 is the reference (the SDE then reaches only ᾱ(1) = exp(-Σβ_i/K) ≈ 0.79 at K = 20,
    docs/deviations.md); K makes ∫β(t)dt = Σβ_i, the DDPM's total noise"""
    sde_num_probes: int = 2
    """Rademacher probes of Hutchinson's divergence estimator"""
    fixed_probes: bool = False
    """reuse each sample's Rademacher probes of its old log-likelihood in the update (common random numbers: the
    ratio starts at 1); False: fresh probes at every evaluation, as the reference"""
    exact_divergence_max_dim: int = 8
    """T_a·D_a at or below which the divergence is exact (T_a·D_a basis probes); 0: always Hutchinson (the reference)"""
    actor_lr: float = 1e-5
    """actor learning rate"""
    actor_lr_min: float | None = None
    """end of the actor's cosine schedule (None: actor_lr, constant)"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    lr_warmup_itr: int = 10
    """warm-up iterations of the cosine LR schedules (constant schedules ignore it)"""
    lr_cycle_itr: int | None = None
    """first_cycle_steps of the cosine LR schedules (gym 1000, robomimic 1000, Avoid n_train_itr)"""
    batch_size: int | None = None
    """PPO minibatch of env-steps (gym 5000, robomimic 7500, Avoid n_steps·num_envs/2); also the chunk of the
    old-log-prob pass"""
    update_epochs: int | None = None
    """PPO epochs per iteration (gym 5, robomimic 10, Avoid 5)"""
    clip_coef: float = 0.01
    """PPO clip ε"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    target_kl: float | None = 1.0
    """stop the epochs when approx KL exceeds this"""
    max_grad_norm: float | None = None
    """actor gradient norm clip (None: off)"""
    n_critic_warmup_itr: int | None = None
    """iterations before the actor starts to step (gym 0, robomimic 2, Avoid 0)"""
    val_freq: int = 10
    """iterations between evaluations (0: only the final one)"""
    eval_n_steps: int | None = None
    """chunk-steps of an evaluation (None: one episode, ⌈max_episode_steps / T_e⌉)"""
    reward_scale_running: bool = True
    """running reward scaling"""
    terminate_on_success: bool = False
    """robomimic: end episodes on success (the paper does not)"""


# The reference's configs (gym: hopper-v2/halfcheetah-v2; robomimic: can); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, batch_size=5000,
                update_epochs=5, n_critic_warmup_itr=0, lr_cycle_itr=1000),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=300, num_envs=50, n_steps=300, gamma=0.999, batch_size=7500,
                      update_epochs=10, n_critic_warmup_itr=2, lr_cycle_itr=1000),
    # no reference config: DPPO's Avoid run size, the gym config's hyperparameters, batch n_steps·num_envs/2
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, batch_size=None,
                  update_epochs=5, n_critic_warmup_itr=0),
}
TASK_DEFAULTS: dict[str, dict] = {}  # the reference has one robomimic config (Can); it serves every robomimic task


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite == "furniture":
        raise UsageError(f"{task.id}: the reference has no exact-likelihood config for furniture (and Isaac Gym is "
                         "not installable here); use dppo_finetune.py")
    filled = apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                   "act_steps": task.act_steps})
    filled.update(apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    if args.batch_size is None:  # Avoid: n_steps·num_envs/2, DPPO's Avoid rule over env-steps
        args.batch_size = filled["batch_size"] = args.n_steps * args.num_envs // 2
    check_positive(args, "n_train_itr", "num_envs", "n_steps", "n_workers", "horizon_steps", "act_steps", "batch_size",
                   "update_epochs", "save_every", "torch_threads", "eval_n_steps", "actor_lr", "actor_lr_min",
                   "critic_lr", "lr_cycle_itr", "clip_coef", "min_sampling_denoising_std", "randn_clip_value",
                   "target_kl", "max_grad_norm", "sde_step_size", "sde_min_beta", "sde_beta_scale", "sde_num_probes",
                   "update_chunk")
    for name in ("gamma", "gae_lambda"):
        check_range(args, name, 0.0, 1.0)
    check_range(args, "sde_eps", 1e-12, 0.5)
    check_range(args, "seed", 0, 2**31 - 1)  # numpy seeds stay below 2**32 with the per-env offsets
    for name in ("val_freq", "lr_warmup_itr", "n_critic_warmup_itr", "vf_coef", "exact_divergence_max_dim"):
        check_range(args, name, 0, math.inf)
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`): ᾱ(i) = cos²(((i/K)+s)/(1+s)·π/2) /
    ᾱ(0); β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped to [0, 0.999]. Float64; cast to float32 by the caller, as the reference."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)  # = i/K, evaluated as the reference does
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def ode_grid(K: int, eps: float, step_size: float) -> tuple[list[int], list[float]]:
    """The Euler grid on t in [ε, 1] (reference `model/diffusion/exact_likelihood.py`, torchdiffeq's fixed grid
    from `step_size`, in float32): t_k = ε + k·Δt, the last point replaced by 1. Returns, per Euler step, the
    denoising index round(t_k·K) its drift is evaluated at and its length t_{k+1} - t_k (the last one shorter)."""
    start, end = torch.tensor(eps, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
    n = int(torch.ceil((end - start) / step_size + 1).item())
    t = torch.arange(0, n, dtype=torch.float32) * step_size + start
    t[-1] = end
    idx = torch.round(t[:-1] * K).long()
    if idx.max() >= K:
        raise UsageError(f"--sde-step-size {step_size} evaluates the ODE at t = {t[-2].item():.4f}, where round(t·K) = "
                         f"{idx.max().item()} is past the last denoising step {K - 1}; use a step of at least {1 / K:g}")
    return idx.tolist(), (t[1:] - t[:-1]).tolist()


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


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, clip: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over env-steps (reference `model/diffusion/diffusion_ppo_exact.py`, `PPOExactDiffusion.loss`):
    both log-likelihoods clamped to [-5, 2], advantages normalised within the minibatch. Returns (pg_loss,
    approx_kl, clipfrac)."""
    log_ratio = new_lp.clamp(-5, 2) - old_lp.clamp(-5, 2)
    ratio = log_ratio.exp()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return pg_loss, approx_kl, clipfrac


def ppo_loss_backward(loglik, n: int, old_lp: torch.Tensor, adv: torch.Tensor, clip: float, chunk: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ppo_loss(loglik(0, n), old_lp, adv, clip)` and its backward pass, in pieces of `chunk` env-steps: advantages
    normalised over the whole minibatch first, each piece back-propagates its sum / n, so the gradients accumulate to
    the whole minibatch's (up to float rounding) while the graph of the ODE integration is held for one piece only.
    `loglik(a, b)` is the log-likelihood of the minibatch's samples a..b-1. Returns the detached (pg_loss, approx_kl,
    clipfrac)."""
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    total = torch.zeros(3, device=adv.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        log_ratio = loglik(a, b).clamp(-5, 2) - old_lp[a:b].clamp(-5, 2)
        ratio = log_ratio.exp()
        pg = torch.max(-adv[a:b] * ratio, -adv[a:b] * torch.clamp(ratio, 1 - clip, 1 + clip)).sum() / n
        pg.backward()
        with torch.no_grad():
            total += torch.stack([pg, ((ratio - 1) - log_ratio).sum() / n, ((ratio - 1).abs() > clip).float().sum() / n])
    return total[0], total[1], total[2]


class ExactLikelihoodPG(nn.Module):
    """The trainable ε-network (every denoising step), its DDPM sampler, its probability-flow log-likelihood,
    and the critic."""

    def __init__(self, actor: nn.Module, critic: nn.Module, denoising_steps: int, horizon_steps: int, action_dim: int,
                 min_sampling_std: float, randn_clip: float, sde_eps: float, sde_step_size: float, sde_min_beta: float,
                 num_probes: int, exact_divergence_max_dim: int, sde_beta_scale: float = 1.0) -> None:
        super().__init__()
        self.actor, self.critic = actor, critic
        self.K, self.horizon_steps, self.action_dim = denoising_steps, horizon_steps, action_dim
        self.min_sampling_std, self.randn_clip = min_sampling_std, randn_clip
        self.dim = horizon_steps * action_dim
        self.num_probes, self.exact_divergence = num_probes, self.dim <= exact_divergence_max_dim

        # DDPM posterior in float32 from float32 β, with the reference's operation order and std = exp(½·log var)
        # (irom-princeton/dppo: model/diffusion/diffusion.py, DiffusionModel.__init__ / p_mean_var)
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        ts = torch.arange(denoising_steps - 1, -1, -1)
        logvar = torch.log(torch.clamp(betas * (1.0 - ac_prev) / (1.0 - ac), min=1e-20))
        coefs = dict(sqrt_recip_ac=torch.sqrt(1.0 / ac)[ts], sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1)[ts],
                     c1=(betas * torch.sqrt(ac_prev) / (1.0 - ac))[ts],
                     c2=((1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac))[ts], std=torch.exp(0.5 * logvar)[ts])
        # VP-SDE of the same schedule (reference `model/diffusion/sde_lib.py`, `VPSDE.set_betas`): β clamped, ᾱ again
        sde_beta = betas.clamp(min=sde_min_beta)
        coefs.update(sde_beta=sde_beta * sde_beta_scale, sde_sigma=torch.sqrt(1 - torch.cumprod(1.0 - sde_beta, 0)))
        self.register_buffer("ts", ts, persistent=False)  # sampling visits t = K-1 ... 0; index j
        for name, value in coefs.items():
            self.register_buffer(name, value, persistent=False)
        self.ode_idx, self.ode_dt = ode_grid(denoising_steps, sde_eps, sde_step_size)  # Python lists: no host syncs

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Sample a chunk x_0 (B, T_a, D_a) with the whole network at every step (reference `DiffusionModel.forward`):
        x̂0 clamped to [-1, 1]; std max(σ_t, σ^exp_min), noise clamped to ±randn_clip; deterministic: DPPO's
        (max(σ_t, 1e-3), none at t = 0)."""
        B = cond.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=cond.device)
        for j in range(self.K):
            eps = self.actor(x, self.ts[j].expand(B), cond)
            x0 = (self.sqrt_recip_ac[j] * x - self.sqrt_recipm1_ac[j] * eps).clamp(-1, 1)
            mean, std = self.c1[j] * x0 + self.c2[j] * x, self.std[j]
            if deterministic:
                std = torch.zeros_like(std) if j == self.K - 1 else std.clamp(min=1e-3)
            else:
                std = std.clamp(min=self.min_sampling_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
        return x

    def get_value(self, cond: torch.Tensor) -> torch.Tensor:
        return self.critic(cond)

    def probes(self, B: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """Divergence probes (B·P, T_a, D_a), sample-major, and the weight of each: Rademacher ±1 drawn as the
        reference draws them, weight 1/P (Hutchinson); or the T_a·D_a basis vectors, weight 1 (exact trace)."""
        if self.exact_divergence:
            eye = torch.eye(self.dim, device=device).view(self.dim, self.horizon_steps, self.action_dim)
            return eye.repeat(B, 1, 1), 1.0
        shape = (B * self.num_probes, self.horizon_steps, self.action_dim)
        return torch.randint(0, 2, shape, device=device).float() * 2 - 1.0, 1.0 / self.num_probes

    def drift(self, x: torch.Tensor, i: int, cond: torch.Tensor) -> torch.Tensor:
        """Probability-flow drift f(x, t) = -½β(t)·(x - ε_θ(x, i, s)/√(1 - ᾱ_i)), i = round(t·K)
        (reference `sde_lib.VPSDE.sde`, `SDE.reverse` with probability_flow, `get_score_fn`)."""
        eps = self.actor(x, self.ts.new_full((x.shape[0],), i), cond)
        return -0.5 * self.sde_beta[i] * (x - eps / self.sde_sigma[i])

    def log_likelihood(self, cond: torch.Tensor, x0: torch.Tensor, probes: torch.Tensor, weight: float) -> torch.Tensor:
        """log p(x0 | cond) in bits per dimension, (B,), from the probability-flow ODE integrated with Euler from
        t = ε to 1 (reference `exact_likelihood.get_likelihood_fn`): (log N(x(1); 0, I) + ∫ ∇·f dt) / (ln 2·T_a·D_a).
        `probes` (B·P, T_a, D_a), sample-major. The drift is one forward on the B samples per Euler step; only its
        vector-Jacobian products differ per probe: P backward passes through that one graph (the reference repeats
        each sample P times through the network instead). Under grad mode the result is differentiable through the
        whole integration, divergence included."""
        B, P = x0.shape[0], probes.shape[0] // x0.shape[0]
        build_graph = torch.is_grad_enabled()
        v = probes.view(B, P, *probes.shape[1:])
        x, delta = x0, x0.new_zeros(B)
        for i, dt in zip(self.ode_idx, self.ode_dt):
            with torch.enable_grad():
                x_in = x if build_graph and x.requires_grad else x.detach().requires_grad_(True)
                f = self.drift(x_in, i, cond)
                vjps = [torch.autograd.grad(f, x_in, grad_outputs=v[:, p], retain_graph=build_graph or p < P - 1,
                                            create_graph=build_graph)[0] for p in range(P)]
            # vᵀ(∂f/∂x)v per probe, averaged (Hutchinson) or summed (basis)
            div = torch.stack([(vjp * v[:, p]).sum(dim=(1, 2)) for p, vjp in enumerate(vjps)], 1).sum(1) * weight
            if not build_graph:
                f, div = f.detach(), div.detach()
            x, delta = x + dt * f, delta + dt * div
        prior = -self.dim / 2.0 * math.log(2 * math.pi) - (x**2).sum(dim=(1, 2)) / 2.0
        return (prior + delta) / (math.log(2) * self.dim)


def reference_conversion() -> ModuleType:
    """`loaders/convert.py`, which `load_checkpoint` uses only for `--checkpoint paper` or a checkpoint of
    irom-princeton/dppo: imported then, so a run from this project's checkpoints never loads it."""
    from loaders import convert

    return convert


def main(args: Args) -> dict:
    resume = None
    if args.resume:  # the run's own task and arguments; explicit flags win visibly or are refused
        resume = load_resume(args.resume, "diffusion", DIFFUSION_PRETRAIN_HINT.format(args.env_id),
                             keys=("itr", "env_steps", "optimizers", "schedulers", "rng",
                                   "reward_scaler", "args", "actor", "critic", "method"), method=METHOD)
        args = resume_args(args, resume["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        print_defaults(task.id, filled)
    args.checkpoint = diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt = resume or load_checkpoint(args.checkpoint, "diffusion", DIFFUSION_PRETRAIN_HINT.format(task.id), task,
                                     conversion=reference_conversion)
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    T_e, N = args.act_steps, args.num_envs
    if T_e > args.horizon_steps:
        raise UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {args.horizon_steps}")
    if not args.eval_only and args.batch_size > args.n_steps * N:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {args.n_steps * N} env-steps of one iteration "
                         f"(n_steps {args.n_steps} x num_envs {N})")
    ode_grid(ckpt["denoising_steps"], args.sde_eps, args.sde_step_size)  # a grid past step K-1 is refused here
    device = seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    apply_matmul_flags(args, device)
    chunk = args.update_chunk or (1000 if device.type == "cpu" else args.batch_size)  # docs/results.md "Speed"

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, args.horizon_steps)
    ckpt_path = os.path.join(args.resume, "checkpoint.pt") if resume is not None else args.checkpoint
    load_weights(actor, whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or an `actor`
    critic = ObsCritic(task.obs_dim, ckpt["cond_steps"], mlp_dims=(256,) * 3)
    if resume is not None:
        load_weights(critic, resume["critic"], ckpt_path)
    agent = ExactLikelihoodPG(actor, critic, ckpt["denoising_steps"], args.horizon_steps, task.action_dim,
                              args.min_sampling_denoising_std, args.randn_clip_value, args.sde_eps, args.sde_step_size,
                              args.sde_min_beta, args.sde_num_probes, args.exact_divergence_max_dim,
                              args.sde_beta_scale).to(device)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=ckpt["cond_steps"], n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)
    print(f"envs: {N} x {task.id} on {envs.backend}; divergence: "
          + ("exact" if agent.exact_divergence else f"Hutchinson, {args.sde_num_probes} Rademacher probes"))
    # Avoid is evaluated with the training noise (App. D.8); everything else deterministically.
    eval_deterministic = task.suite != "avoid"

    def act(deterministic: bool):
        def f(obs: np.ndarray) -> np.ndarray:
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            return normalizer.unnormalize_action(agent.get_action(cond, deterministic)).cpu().numpy()
        return f

    def run_eval(deterministic: bool, itr: int) -> dict:  # itr: the iteration evaluated (its own stream)
        return evaluate(envs, act(deterministic), task, T_e, seed=args.seed + 1_000_000, index=itr, n_steps=args.eval_n_steps)

    if args.eval_only:
        out = eval_only_report(run_eval, args, task.id, index=ckpt.get("itr", 0))
        envs.close()
        return out

    optimizers, schedulers = ppo_optimizers(agent.actor, agent.critic, args)  # AdamW, the reference's cosine schedules
    actor_opt, critic_opt = optimizers["actor"], optimizers["critic"]
    scaler = RunningRewardScaler(N)
    run, start_itr, env_steps = start_finetuning(args, task, resume, optimizers, schedulers, scaler,
                                                 lambda: run_eval(eval_deterministic, 0))
    header = {**policy_header(ckpt), "horizon_steps": args.horizon_steps}

    T_o, D_o, T_a, D_a = ckpt["cond_steps"], task.obs_dim, args.horizon_steps, task.action_dim
    obs_buf = torch.zeros(args.n_steps, N, T_o, D_o, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)
    act_buf = torch.zeros(args.n_steps, N, T_a, D_a, device=device)
    tracker = EpisodeTracker(N, T_e, task.success_chunk_reward)
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

        # ---- rollout: only the final chunk x_0 is stored ----
        timer.reset()
        if need_reset or task.reset_every_iteration:
            obs = envs.reset(seed=args.seed + itr * N)
            tracker.reset()
            need_reset = False
            first = np.ones(N)
        # else: envs that continue across iterations keep the last step's done as the first step's `first`
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond)
            obs_buf[step], act_buf[step] = cond, x
            timer.lap("sampling")
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

        # ---- advantages: GAE over chunk-steps (truncation: docs/deviations.md) ----
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

        # ---- old log-likelihoods: the network before this update, in chunks of one minibatch ----
        b_obs, b_act = obs_buf.flatten(0, 1), act_buf.flatten(0, 1)  # (S, T_o, D_o), (S, T_a, D_a); S = n_steps·N
        b_adv, b_ret = advantages.flatten(), returns.flatten()
        S = b_obs.shape[0]

        b_probes, weight = agent.probes(S, device) if args.fixed_probes else (None, 0.0)  # (S·P, T_a, D_a)

        def probes_of(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
            """The divergence probes of samples `idx` (P per sample, sample-major): fresh, or the iteration's."""
            if b_probes is None:
                return agent.probes(len(idx), device)
            P = b_probes.shape[0] // S
            return b_probes[(idx.unsqueeze(1) * P + torch.arange(P, device=device)).flatten()], weight

        def loglik(idx: torch.Tensor) -> torch.Tensor:
            return agent.log_likelihood(b_obs[idx], b_act[idx], *probes_of(idx))

        with torch.no_grad():
            old_lp = torch.cat([loglik(idx) for idx in torch.arange(S, device=device).split(args.batch_size)])
        timer.lap("old_logprobs")

        # ---- PPO update over env-steps, back-propagating through the ODE ----
        agent.train()
        stats_t = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac")}
        for epoch in range(args.update_epochs):
            perm = torch.randperm(S, device=device)
            kls = []
            for start in range(0, S - args.batch_size + 1, args.batch_size):
                idx = perm[start:start + args.batch_size]
                probes, w = probes_of(idx)  # drawn for the whole minibatch at once, then cut with it
                P = probes.shape[0] // len(idx)
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                # loss = pg_loss + vf_coef·v_loss, the policy part back-propagated in pieces (same gradient)
                pg_loss, kl, clipfrac = ppo_loss_backward(
                    lambda a, b: agent.log_likelihood(b_obs[idx[a:b]], b_act[idx[a:b]], probes[a * P:b * P], w),
                    len(idx), old_lp[idx], b_adv[idx], args.clip_coef, chunk)
                v_loss = 0.5 * ((agent.get_value(b_obs[idx]) - b_ret[idx]) ** 2).mean()
                (args.vf_coef * v_loss).backward()
                if itr >= args.n_critic_warmup_itr:
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.actor.parameters(), args.max_grad_norm)
                    actor_opt.step()
                critic_opt.step()
                kls.append(kl)
                for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("approx_kl", kl), ("clipfrac", clipfrac)):
                    stats_t[k].append(v.detach())
            if args.target_kl is not None and kls and torch.stack(kls).max().item() > args.target_kl:
                break  # one host sync per epoch
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # the LRs of this iteration's update
        step_schedulers(schedulers, itr, args.n_critic_warmup_itr)
        timer.lap("update")

        # ---- logging, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats_t.items() if v}
        logged["old_logprob_mean"] = old_lp.mean().item()
        check_finite(f"iteration {itr}", logged, agent.actor, agent.critic)
        logged["explained_variance"] = explained_variance(values.flatten(), returns.flatten())
        sps = args.n_steps * N * T_e / (time.time() - t_itr)
        run.end_iteration(itr, logged, last_train, sps, lrs, history[-1], timer.times, bar, env_steps)
        if (itr + 1) % args.save_every == 0 or itr + 1 == args.n_train_itr:
            save_checkpoint(run.checkpoint, finetune_checkpoint(
                header, args, {"actor": agent.actor, "critic": agent.critic}, optimizers, schedulers,
                {"method": METHOD, "reward_scaler": scaler.state_dict()}, itr + 1, env_steps))
    bar.close()
    final = run_eval(eval_deterministic, args.n_train_itr)  # a final evaluation row after the last update
    out = run.finish(args.n_train_itr, env_steps, "deterministic" if eval_deterministic else "stochastic", final,
                     {"history": history})
    envs.close()
    return out


if __name__ == "__main__":
    cli(main, Args)
