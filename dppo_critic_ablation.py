"""DPPO's advantage-estimator ablation (Ren et al., ICLR 2025, App. B.1 item 1, Fig. A1): dppo_finetune.py, with `--critic`.

dppo_finetune.py's method (§4, App. D.4, D.9) but for the critic and each pair's advantage (`diff dppo_finetune.py
dppo_critic_ablation.py`); the reference ships no variant. Quoted: App. B.1 and its footnote; the rest is chosen here.

- `value` (default, the paper's: eq. 4.8, A1): V(s_t), GAE over chunk-steps, each pair's weighted by γ_denoise^(K'-i-1)
  (eq. 4.7); dppo_finetune.py's numbers for the same flags and seed.
- `denoising-value`, "the value of the full state that includes environment state and denoised action" (s̄_t(k)):
  V(s, x, i) (`DenoisingStateCritic`), x^i the chunk entering fine-tuned step i (i = 0 the noisiest), i one-hot. GAE
  runs on V(s_t, x_t^0, 0) (x^0 pure noise when K' = K), bootstrapped with the same at a fresh chain of the rollout's
  policy at s'_t. Pair (t, i) gets R_t - V(s_t, x_t^i, i), R_t the λ-return (A1 with the full state's value as
  baseline: the GAE advantage at i = 0); every pair's state is regressed onto its R_t.
- `q`, "the state-action Q-function estimator used in Psenka et al." ("off-policy training with double Q-learning"; it
  "does not directly use the rollout reward in the advantage"): Q1, Q2 of (observation, executed T_e actions)
  (`DoubleQCritic`, as qsm.py), EMA targets (`critic_tau`), fit by TD on the iteration's transitions (no replay buffer)
  to y_t = r_t + γ(1 - terminal)·min(target Q1, Q2)(s'_t, a'), a' a fresh sample at s'_t, fixed for the iteration;
  A_t = min(Q1, Q2)(s_t, a_t) - min(Q1, Q2)(s_t, ã), ã a fresh sample at s_t (a one-sample baseline E_a Q(s_t, a)).

All: scaled rewards, a critic step per PPO minibatch on vf_coef × ½ MSE (Q: both heads summed), then the targets' EMA.
A fine-tuned checkpoint's critic of another kind is not loaded (a fresh one).

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
| V(s), V(s̄_t(k)), Q(s, a) | `agent.critic`: `ObsCritic`, `DenoisingStateCritic`, `DoubleQCritic` | (B,); Q: 2 × (B,) |

One PPO sample is an (env-step, denoising-step) pair; minibatches are drawn over all
n_steps·N·K' of them (eqs. 4.5-4.7, reference `PPODiffusion.loss`). Log-probs are element-wise Normal
densities clamped to [-5, 2], restricted to the executed T_e actions and averaged (eq. 4.4).

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import runs
from common.envs import make_vec_env
from common.networks import DoubleQCritic, ObsCritic, build_diffusion_network, trunk
from common.normalizer import Normalizer
from common.tasks import Task, get_task, refuse_pixel_task

HINT = runs.DIFFUSION_PRETRAIN_HINT  # how to make a pre-trained checkpoint, in error messages
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION
METHOD = "dppo_critic_ablation"  # saved in the checkpoint: a resumed run must be one of this script's


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py)
    checkpoint: str | None = None  # pre-trained (or fine-tuned) checkpoint (None: the task's built-in one, else the paper's)
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (1: fastest, README "Threads"; None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    resume: str | None = None  # a run folder to continue from its checkpoint.pt, with the run's own arguments
    eval_only: bool = False  # only evaluate the checkpoint (deterministic and stochastic) and exit; writes nothing
    plot: bool = True  # Avoid: trajectories.png, evaluation rollouts before and after fine-tuning
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (MUJOCO_GL=egl)
    save_every: Annotated[int, Positive] = 1  # iterations between checkpoints
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # gym simulator (auto: envpool when installed)
    # algorithm (None: the task's value, printed at start; SUITE_DEFAULTS / TASK_DEFAULTS below)
    n_train_itr: Annotated[int | None, Positive] = None  # fine-tuning iterations
    num_envs: Annotated[int | None, Positive] = None  # parallel environments N
    n_steps: Annotated[int | None, Positive] = None  # chunk-steps per env per iteration
    n_workers: Annotated[int | None, Positive] = None  # env processes (None: one per core for robomimic, else in-process)
    ft_denoising_steps: Annotated[int | None, Positive] = None  # K' fine-tuned denoising steps (None: 10; DDIM: ddim_steps)
    use_ddim: bool | None = None  # DDIM sampling, for checkpoints pre-trained with K = 100
    ddim_steps: Annotated[int, Positive] = 5  # DDIM steps
    horizon_steps: Annotated[int | None, Positive] = None  # T_a of fine-tuning (None: the checkpoint's; a UNet's may differ)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    gae_lambda: Annotated[float, Fraction] = 0.95  # GAE λ
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    gamma_denoising: Annotated[float | None, Fraction] = None  # γ_denoise, the discount per denoising step
    min_sampling_denoising_std: Annotated[float | None, Positive] = None  # σ^exp_min, the sampling std floor
    min_logprob_denoising_std: Annotated[float, Positive] = 0.1  # σ^prob_min, the std floor of the log-probs
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    final_action_clip: bool | None = None  # clamp executed actions to [-1, 1] (no reference config does)
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic: Literal["value", "denoising-value", "q"] = "value"  # advantage estimator (App. B.1): V(s), V(s, a_k, k), Q(s, a)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    critic_tau: Annotated[float, runs.RATE] = 0.005  # --critic q: EMA rate of the target Q-networks (as qsm.py)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    batch_size: Annotated[int | None, Positive] = None  # PPO minibatch of (env-step, denoising-step) pairs
    update_epochs: Annotated[int | None, Positive] = None  # PPO epochs per iteration
    clip_coef: Annotated[float | None, Positive] = None  # clip ε of the final denoising step
    clip_coef_base: Annotated[float | None, Positive] = None  # clip ε of the noisiest fine-tuned step
    clip_coef_rate: Annotated[float, Positive] = 3.0  # exponential rate of the per-step clip schedule
    vf_coef: Annotated[float, NonNegative] = 0.5  # value loss coefficient
    target_kl: Annotated[float | None, PositiveOrInf] = 1.0  # stop the epochs when approx KL exceeds this (inf: no limit)
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient norm clip of actor_ft (None or inf: no limit)
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    reward_scale_running: bool = True  # running reward scaling
    bc_coef: Annotated[float, NonNegative] = 0.0  # optional BC term: base-policy chains stay likely under actor_ft
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    obs_noise_std: Annotated[float, NonNegative] = 0.0  # furniture sim-to-real (App. D.7): observation noise, normalised
    action_noise_std: Annotated[float, NonNegative] = 0.0  # furniture sim-to-real (App. D.7: 0.03): action noise, normalised
    # speed (opt-in, same results up to float rounding; docs/results.md "Speed")
    update_chunk: Annotated[int | None, Positive] = None  # pairs per backward piece (None: 4096 on a CPU, all on a GPU)
    compile: bool = False  # torch.compile the sampling chain (CUDA graphs on a GPU): same noise, ~6e-7 off, 1-4 min to compile
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's fine-tuning configs (paper App. D); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, gamma_denoising=0.99,
                actor_lr=1e-4, batch_size=50000, update_epochs=5, clip_coef=0.01, clip_coef_base=0.01, n_critic_warmup_itr=0,
                min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, gamma_denoising=0.99,
                      actor_lr=1e-4, batch_size=7500, update_epochs=10, clip_coef=0.01, clip_coef_base=0.001,
                      n_critic_warmup_itr=2, min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
    # furniture: every episode ends at the time limit as terminal (the reference's wrapper); n_steps = max steps / T_e
    "furniture": dict(bootstrap_truncated=False, n_train_itr=1000, num_envs=1000, n_steps=125, gamma=0.999,
                      gamma_denoising=0.9, actor_lr=1e-5, actor_lr_min=1e-6, lr_cycle_itr=10000, batch_size=8800,
                      update_epochs=5, clip_coef=0.001, clip_coef_base=0.001, n_critic_warmup_itr=1,
                      min_sampling_denoising_std=0.04, final_action_clip=False, use_ddim=True),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, gamma_denoising=0.95,
                  actor_lr=1e-5, batch_size=None, update_epochs=10, clip_coef=0.1, clip_coef_base=0.1, n_critic_warmup_itr=1,
                  min_sampling_denoising_std=0.1, final_action_clip=False, use_ddim=False),
}
SUITE_DEFAULTS["kitchen"] = dict(SUITE_DEFAULTS["gym"], n_train_itr=301, n_steps=70, batch_size=5600, update_epochs=10)
TASK_DEFAULTS = {"lift": dict(n_train_itr=81), "can": dict(n_train_itr=151), "one-leg-low": dict(n_steps=88, batch_size=17600),
                 "square": dict(n_steps=400, batch_size=10000, n_train_itr=201), "one-leg-med": dict(n_steps=88),
                 "transport": dict(n_steps=400, batch_size=10000, n_train_itr=201, update_epochs=5)}
FURNITURE_UNET_BATCH = {"one_leg": 30000, "lamp": 40000, "round_table": 40000}  # cfg/furniture/finetune/*_unet.yaml


def fill_defaults(args: Args) -> tuple[Task, dict]:
    """Fill the task's defaults into every flag left at None and check every number; returns the task and what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    filled = runs.apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                        "act_steps": task.act_steps})
    filled.update(runs.apply_defaults(args, {"ft_denoising_steps": args.ddim_steps if args.use_ddim else 10,
                                             "actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    if args.batch_size is None:  # Avoid: n_steps·n_envs·K'/2 (App. D.8)
        args.batch_size = filled["batch_size"] = args.n_steps * args.num_envs * args.ft_denoising_steps // 2
    runs.check_args(args)  # every number within the Limits of its field
    if not args.eval_only:  # the actor steps at least once
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    if task.suite != "furniture":
        runs.refuse_flags(args, ("obs_noise_std", "action_noise_std"),
                          f"is a Furniture-Bench sim-to-real option; {task.id} has none")
    runs.refuse_flags(args, () if args.critic == "q" else ("critic_tau",), "is the target-Q rate of --critic q only")
    return task, filled


def fill_from_checkpoint(args: Args, task: Task, ckpt: dict, filled: dict) -> None:
    """T_a from the checkpoint unless given, the furniture UNet's batch; the flags checked against the network."""
    K, K_ft = ckpt["denoising_steps"], args.ft_denoising_steps
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    if task.suite == "furniture" and ckpt["backbone"] == "unet" and "batch_size" in filled:  # printed with the defaults
        args.batch_size = filled["batch_size"] = FURNITURE_UNET_BATCH[task.env_name]
    if args.use_ddim and K % args.ddim_steps:
        raise runs.UsageError(f"DDIM with {args.ddim_steps} steps needs K divisible by it (checkpoint K = {K})")
    if K_ft > (args.ddim_steps if args.use_ddim else K):  # DDIM fine-tunes the last K' of its ddim_steps
        raise runs.UsageError(f"--ft-denoising-steps {K_ft} exceeds the " + (
            f"{args.ddim_steps} DDIM steps" if args.use_ddim else f"checkpoint's K = {K}"))
    if args.act_steps > args.horizon_steps:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the chunk T_a = {args.horizon_steps}")
    if not args.eval_only:  # a sample is an (env-step, denoising-step) pair
        runs.check_minibatch(args.batch_size, args.n_steps, args.num_envs, K_ft)


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """β_1..β_K in float64 (reference `model/diffusion/sampling.py`; float32 after): ᾱ(i) = cos²((i/K + s)/(1 + s)·π/2)
    / ᾱ(0), β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped to [0, 0.999]."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)  # = i/K, evaluated as the reference does
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


class DiffusionPPO(nn.Module):
    """Frozen base network + trainable copy of it for the last K' steps, and the critic."""

    def __init__(self, base: nn.Module, critic: nn.Module, denoising_steps: int, ft_steps: int, horizon_steps: int,
                 action_dim: int, use_ddim: bool, ddim_steps: int, min_sampling_std: float, min_logprob_std: float,
                 randn_clip: float) -> None:
        super().__init__()
        self.actor = base.requires_grad_(False).eval()
        self.actor_ft = copy.deepcopy(base).requires_grad_(True)
        self.critic = critic
        self.horizon_steps, self.action_dim, self.use_ddim, self.ft_steps = horizon_steps, action_dim, use_ddim, ft_steps
        self.min_sampling_std, self.min_logprob_std, self.randn_clip = min_sampling_std, min_logprob_std, randn_clip

        # float32 from float32 β in the reference's order, std = exp(½·log var) (`model/diffusion/diffusion.py`
        # `DiffusionModel.__init__`, `diffusion_vpg.py` `VPGDiffusion.p_mean_var`): its log-probs to 1e-5 need it
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        one = torch.ones(1)
        if use_ddim:  # "leading" grid {0, 20, ..., 80} for K = 100, visited from the top (reference `DiffusionModel`)
            ts = (torch.arange(0, ddim_steps) * (denoising_steps // ddim_steps)).flip(0)
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
        for name, value in {"ts": ts, **coefs}.items():  # ts: the visited steps, in order; index j
            self.register_buffer(name, value, persistent=False)
        self.first_ft = len(ts) - ft_steps  # index j of the first fine-tuned step

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
    def get_action(self, cond: torch.Tensor, deterministic: bool = False, base_only: bool = False) -> tuple:
        """Sample a chunk (reference `DiffusionModel.forward`): x_0 (B, T_a, D_a) and the chain (B, K'+1, T_a, D_a)."""
        return self.sample(cond, deterministic, base_only)[:2]

    @torch.no_grad()
    def rollout_action(self, cond: torch.Tensor, act_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`get_action` and PPO's old log-probs (B, K') from the sampling means (the reference: a second actor_ft pass)."""
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

    def get_value(self, cond: torch.Tensor) -> torch.Tensor:  # V(s) (eq. 4.8)
        return self.critic(cond)

    def bc_loss(self, cond: torch.Tensor) -> torch.Tensor:
        """Optional BC term (reference `PPODiffusion.loss`, `use_bc_loss`): minus the log-prob under actor_ft of a base
        chain per observation at every fine-tuned step, clamped to [-5, 2], averaged over all T_a actions, K' and B."""
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
    """A pair's scalar (reference `PPODiffusion.loss`): log-probs (..., T_a, D_a) clamped to [-5, 2], mean over T_e."""
    return logprob.clamp(-5, 2)[..., :act_steps, :].mean(dim=(-2, -1))


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
    """GAE over chunk-steps (§4.2; reference `TrainPPODiffusionAgent.run`); (n_steps, N) each, next_values = V(s'_t)."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


class RunningRewardScaler:
    """Running reward scaling (reference `util/reward_scaling.py`, `RunningRewardScaler.__call__`), called once per
    iteration on its (n_steps, N) rewards: all the iteration's discounted returns (per env, ret <- r + 0.99 (1 - first)
    ret) update the running variance in one batch (`RunningMeanStd`: count 1e-4, mean 0, var 1; var = M2 / (count - 1)),
    then every reward is divided by sqrt(var + 1e-8) and clipped to ±10. `ret` carries over to the next iteration."""
    gamma, clip, eps = 0.99, 10.0, 1e-8  # the reference's (constants: the checkpoint holds the attributes below)

    def __init__(self, num_envs: int) -> None:
        self.ret, self.mean, self.var, self.count = np.zeros(num_envs), 0.0, 1.0, 1e-4

    def __call__(self, rewards: np.ndarray, firsts: np.ndarray) -> np.ndarray:
        rets = np.zeros_like(rewards, dtype=np.float64)
        for t in range(rewards.shape[0]):  # `ret` carries over to the next iteration
            self.ret = rets[t] = rewards[t] + self.gamma * (1.0 - firsts[t]) * self.ret
        x = rets.reshape(-1)  # the moments of the iteration's returns, merged into the running ones
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / (total - 1), total
        return np.clip(rewards / np.sqrt(self.var + self.eps), -self.clip, self.clip)


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor, n: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over pairs (eq. 4.6, reference `PPODiffusion.loss`) for normalised, discounted advantages and each
    pair's clip range `eps`: (pg_loss, approx_kl, clipfrac), sums over the pairs / `n` (default: their number)."""
    n = n or new_lp.numel()
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)).sum() / n
    with torch.no_grad():
        return pg_loss, ((ratio - 1) - log_ratio).sum() / n, ((ratio - 1).abs() > eps).float().sum() / n


def minibatch_values(critic: nn.Module, b_obs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V(s) of each pair's env-step, the critic run once per env-step (a minibatch holds each up to K' times): on all of
    them when they are no more than the pairs (no host sync), else, on the CPU, on the distinct ones."""
    if b_obs.shape[0] <= s.numel():
        return critic(b_obs).view(-1)[s]
    if s.device.type == "cpu":  # torch.unique would wait for a GPU
        rows, inverse = torch.unique(s, return_inverse=True)
        return critic(b_obs[rows]).view(-1)[inverse]
    return critic(b_obs[s]).view(-1)


class DenoisingStateCritic(nn.Module):
    """V(s, x, i) of a denoising state (App. B.1): (B, T_o, D_o), chunk (B, T_a, D_a), position (B,) one-hot -> (B,)."""

    def __init__(self, obs_dim: int, T_o: int, T_a: int, action_dim: int, ft_steps: int, mlp_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.ft_steps = ft_steps
        self.net = trunk(obs_dim * T_o + T_a * action_dim + ft_steps, list(mlp_dims), 1, "mish", True)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs.flatten(1), x.flatten(1), F.one_hot(i, self.ft_steps).to(obs.dtype)], -1)).squeeze(-1)


def build_critic(kind: str, task: Task, T_o: int, T_a: int, T_e: int, K_ft: int) -> nn.Module:
    """`--critic`'s network, each on the reference's V trunk (mish, residual; 512 wide for furniture, else 256)."""
    mlp_dims = (512,) * 3 if task.suite == "furniture" else (256,) * 3
    if kind == "denoising-value":
        return DenoisingStateCritic(task.obs_dim, T_o, T_a, task.action_dim, K_ft, mlp_dims)
    if kind == "q":  # on the executed T_e actions, as qsm.py's
        return DoubleQCritic(task.obs_dim, task.action_dim, T_e, T_o, mlp_dims=mlp_dims)
    return ObsCritic(task.obs_dim, T_o, mlp_dims=mlp_dims)  # as the reference


def critic_loss(kind: str, critic: nn.Module, b_obs: torch.Tensor, b_chain: torch.Tensor, b_act: torch.Tensor,
                b_ret: torch.Tensor, s: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The minibatch's critic loss for pairs (env-step s, denoising position i): ½ MSE of V(s) or of V(s, x_i, i) to the
    λ-return, ½ the sum over both Q heads of the MSE of Q(s, a) to the TD target (b_ret holds y for `q`)."""
    if kind == "denoising-value":
        return 0.5 * ((critic(b_obs[s], b_chain[s, i], i) - b_ret[s]) ** 2).mean()
    if kind == "q":
        return 0.5 * sum(((q - b_ret[s]) ** 2).mean() for q in critic(b_obs[s], b_act[s]))
    return 0.5 * ((minibatch_values(critic, b_obs, s) - b_ret[s]) ** 2).mean()


def ema_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - τ)·target + τ·source (as qsm.py)."""
    for t, p in zip(target.parameters(), source.parameters()):
        t.lerp_(p.detach(), tau)


def main(args: Args) -> dict:
    resume, args = runs.open_resume(args, args.resume, "diffusion", HINT.format(args.env_id), method=METHOD)  # its own args
    task, filled = fill_defaults(args)
    args.checkpoint = runs.diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, "diffusion", HINT.format(task.id), task,
                                      conversion=lambda: importlib.import_module("loaders.convert"))
    fill_from_checkpoint(args, task, ckpt, filled)
    runs.print_defaults(task.id, filled)  # a resumed run's own arguments are complete: nothing
    K_ft, T_o, T_a, T_e, N = args.ft_denoising_steps, ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    base = build_diffusion_network(ckpt, T_a)  # from pre-training's EMA (or a whole fine-tuned `actor`, e.g. drwr.py's)
    runs.load_weights(base, ckpt["base"] if "base" in ckpt else runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)
    critic = build_critic(args.critic, task, T_o, T_a, T_e, K_ft)
    agent = DiffusionPPO(base, critic, ckpt["denoising_steps"], K_ft, T_a, task.action_dim, args.use_ddim, args.ddim_steps,
                         args.min_sampling_denoising_std, args.min_logprob_denoising_std, args.randn_clip_value).to(device)
    target_q = copy.deepcopy(agent.critic).requires_grad_(False) if args.critic == "q" else None  # Q's target heads
    critics = {"critic": agent.critic, **({"target_q": target_q} if target_q is not None else {})}  # saved and loaded
    if "actor_ft" in ckpt:  # a fine-tuning checkpoint: resumed, or evaluated
        runs.load_weights(agent.actor_ft, ckpt["actor_ft"], ckpt_path)
        for name, net in critics.items() if ckpt.get("args", {}).get("critic", "value") == args.critic else ():  # or fresh
            runs.load_weights(net, ckpt.get(name), ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, normalizer=normalizer,
                        n_workers=args.n_workers, backend=args.env_backend, terminate_on_success=args.terminate_on_success,
                        obs_noise_std=args.obs_noise_std, action_noise_std=args.action_noise_std,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json
    if args.compile:
        agent.get_action = runs.compile_sampling(agent.get_action, device)
        agent.rollout_action = runs.compile_sampling(agent.rollout_action, device)
    chunk = args.update_chunk or (4096 if device.type == "cpu" else args.batch_size)  # pairs per backward piece

    executed = (lambda x: x.clamp(-1, 1)) if args.final_action_clip else (lambda x: x)  # noqa: E731
    policy = lambda cond, deterministic: executed(agent.get_action(cond, deterministic)[0])  # noqa: E731 (evaluation)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed, exp_name=args.exp_name,
                   eval_n_steps=args.eval_n_steps, val_freq=args.val_freq, save_every=args.save_every, plot=args.plot,
                   track=args.track, wandb_project=args.wandb_project_name, resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.actor_ft, args.actor_lr, args.actor_lr_min,  # AdamW, cosine
                                                          args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr,
                                                            args.lr_cycle_itr, args.lr_warmup_itr)
    scaler = RunningRewardScaler(N)
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": T_a}, {"base": agent.actor, "actor_ft": agent.actor_ft,
              **critics}, {"actor": actor_opt, "critic": critic_opt},
              {"actor": actor_sched, "critic": critic_sched}, {"reward_scaler": scaler, "method": METHOD})
    clip_eps = clip_schedule(K_ft, args.clip_coef_base, args.clip_coef, args.clip_coef_rate).to(device)  # (K',)
    disc = denoising_discount(K_ft, args.gamma_denoising).to(device)  # (K',)
    obs_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)  # the observation after each chunk-step (an episode's final one if it ended)
    chain_buf = torch.zeros(args.n_steps, N, K_ft + 1, T_a, task.action_dim, device=device)
    old_lp_buf = torch.zeros(args.n_steps, N, K_ft, device=device)

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainPPODiffusionAgent.run`)
            if itr >= args.n_critic_warmup_itr:  # the LR schedules step here too, as the reference's
                actor_sched.step()
            critic_sched.step()
            continue

        # ---- rollout ----
        if run.need_reset or task.reset_every_iteration:  # else `first` goes on from the last step (reference `run`)
            obs, first = run.reset_envs(itr), np.ones(N)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            obs_buf[step] = cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x, chain_buf[step], old_lp_buf[step] = agent.rollout_action(cond, T_e)  # old log-probs: while sampling
            run.lap("sampling")
            action = normalizer.unnormalize_action(executed(x)[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            next_obs_buf[step] = normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device))
            terminated[step], dones[step] = term, term | trunc
            first = dones[step].astype(np.float64)
            run.step(rewards[step], dones[step])
        run.end_rollout(itr)

        # ---- advantages: GAE over chunk-steps (eq. 4.7; truncation: docs/deviations.md), or Q's (App. B.1; docstring) ----
        r = scaler(rewards, firsts) if args.reward_scale_running else rewards  # once per iteration, as the reference
        b_obs, b_chain = obs_buf.flatten(0, 1), chain_buf.flatten(0, 1)  # (S, T_o, D_o), (S, K'+1, T_a, D_a); S = n_steps·N
        b_act = executed(b_chain[:, -1])[:, :T_e]  # (S, T_e, D_a) the executed actions (Q's input)
        with torch.no_grad():
            if args.critic == "value":
                values = agent.get_value(obs_buf.flatten(0, 1)).view(args.n_steps, N)
                next_values = agent.get_value(next_obs_buf.flatten(0, 1)).view(args.n_steps, N)
            else:  # a fresh chain of the rollout's policy at each s'_t (an ended episode's final observation)
                next_chain = agent.get_action(b_next_obs := next_obs_buf.flatten(0, 1))[1]
            if args.critic == "denoising-value":  # V of the first fine-tuned denoising state, at s_t and s'_t
                first = torch.zeros(b_obs.shape[0], dtype=torch.long, device=device)
                values = agent.critic(b_obs, b_chain[:, 0], first).view(args.n_steps, N)
                next_values = agent.critic(b_next_obs, next_chain[:, 0], first).view(args.n_steps, N)
            cut = terminated if args.bootstrap_truncated else dones  # where V(s') is not bootstrapped
            r, cut, d = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (r, cut, dones))
            if args.critic == "q":  # TD targets y of the target heads; A = Q(s, a) - Q(s, ã), ã a fresh sample at s_t
                q_min = lambda q, o, a: torch.min(*q(o, executed(a)[:, :T_e])).view(args.n_steps, N)  # noqa: E731
                returns = r + args.gamma * (1 - cut) * q_min(target_q, b_next_obs, next_chain[:, -1])
                values = q_min(agent.critic, b_obs, b_chain[:, -1])
                advantages = values - q_min(agent.critic, b_obs, agent.get_action(b_obs)[0])
            else:
                advantages, returns = compute_gae(r, values, next_values, cut, d, args.gamma, args.gae_lambda)
        run.lap("advantages")

        # ---- the pairs: every (env-step, denoising-step), S·K' of them ----
        b_ret, b_old_lp = returns.flatten(), old_lp_buf.flatten()  # (S,), (S·K',)
        S, B = b_obs.shape[0], args.batch_size
        pos = torch.arange(K_ft, device=device).repeat(S)                # (S·K',) denoising position i of each pair
        sample = torch.arange(S, device=device).repeat_interleave(K_ft)  # (S·K',) env-step of each pair
        with torch.no_grad():  # (S·K',) each pair's advantage: its env-step's, or R_t - V(s_t, x_t^i, i) (docstring)
            b_adv = (b_ret[sample] - agent.critic(b_obs[sample], b_chain[sample, pos], pos)
                     if args.critic == "denoising-value" else advantages.flatten()[sample])

        # ---- the PPO update (eqs. 4.5-4.7, reference `PPODiffusion.loss`) ----
        agent.train()
        stats = []  # per minibatch: pg_loss, v_loss, approx_kl, clipfrac, bc_loss
        for epoch in range(args.update_epochs):
            perm, kls = torch.randperm(S * K_ft, device=device), []
            for start in range(0, S * K_ft - B + 1, B):
                mb = perm[start:start + B]
                s, i = sample[mb], pos[mb]
                mb_adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8) * disc[i]  # normalised, then discounted
                v_loss = critic_loss(args.critic, agent.critic, b_obs, b_chain, b_act, b_ret, s, i)
                bc_loss = agent.bc_loss(b_obs[s]) if args.bc_coef > 0 else torch.zeros((), device=device)
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                pg_loss = approx_kl = clipfrac = 0.0
                for a in range(0, B, chunk):  # pieces of the minibatch, their gradients accumulated (one piece on a GPU)
                    p = slice(a, a + chunk)
                    new_lp = pair_logprobs(agent, b_obs[s[p]], b_chain[s[p], i[p]], b_chain[s[p], i[p] + 1], i[p], T_e)
                    pg, kl, cf = ppo_loss(new_lp, b_old_lp[mb[p]], mb_adv[p], clip_eps[i[p]], B)  # the piece's share
                    loss = pg + (args.vf_coef * v_loss + args.bc_coef * bc_loss if a == 0 else 0.0)  # value, BC: once
                    loss.backward()
                    pg_loss, approx_kl, clipfrac = pg_loss + pg.detach(), approx_kl + kl, clipfrac + cf
                if itr >= args.n_critic_warmup_itr:  # only actor_ft's gradient is clipped, once it steps (reference `run`)
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.actor_ft.parameters(), args.max_grad_norm)
                    actor_opt.step()
                critic_opt.step()
                if target_q is not None:  # the target heads follow Q (as qsm.py)
                    ema_update(target_q, agent.critic, args.critic_tau)
                kls.append(approx_kl)
                stats.append(torch.stack([pg_loss, v_loss.detach(), approx_kl, clipfrac, bc_loss.detach()]))
            if args.target_kl is not None and torch.stack(kls).max().item() > args.target_kl:
                break  # checked once per epoch: one host sync (docs/deviations.md)
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        if itr >= args.n_critic_warmup_itr:  # the actor's schedule starts after the critic warm-up (reference `run`)
            actor_sched.step()
        critic_sched.step()
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac", "bc_loss"), torch.stack(stats).mean(0).tolist()))
        runs.check_finite(f"iteration {itr}", logged, agent.actor_ft, agent.critic)  # stops before saving a broken state
        logged["explained_variance"] = runs.explained_variance(values.flatten(), returns.flatten())
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
