"""Exact-likelihood policy gradient: PPO on the final action chunk of a diffusion policy, with log p(a|s)
from the probability-flow ODE (Ren et al., ICLR 2025, App. B.5; Song et al. 2021, App. D).

Unlike DPPO, the MDP is the environment's alone: one PPO sample is one environment step, its action
the final chunk a = x_0 of the whole K-step DDPM chain, sampled by the one trainable ε-network (no
frozen copy: the old log-probs of the ratio are the same network's before the update, as in the
reference). log p(a|s) comes from the probability-flow ODE of the VP-SDE dx = -½β(t)x dt + √β(t) dW
whose β(t) is the cosine schedule's β_i at i = round(t·K) (clamped ≥ 1e-10), with score
-ε_θ(x, i, s)/√(1 - ᾱ_i):

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
`cfg/robomimic/finetune/can/ft_ppo_exact_diffusion_mlp.yaml`, which serves every robomimic task); Avoid has
none: DPPO's Avoid run size with the gym config's hyperparameters.

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn

from common import runs
from common.envs import make_vec_env
from common.networks import ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import get_task, refuse_pixel_task

# the critic's scheduler steps on a first evaluation iteration (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
HINT = runs.DIFFUSION_PRETRAIN_HINT  # how to make a pre-trained checkpoint, in error messages
METHOD = "exact_likelihood_pg"  # saved in the checkpoints: a run of another script is refused on resume
RESUME_KEYS = ("itr", "env_steps", "optimizers", "schedulers", "rng", "reward_scaler", "args", "actor", "critic", "method")
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py)
    checkpoint: str | None = None  # pre-trained (or whole-network fine-tuned) checkpoint (None: the task's built-in one)
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    resume: str | None = None  # a run folder to continue from its checkpoint.pt, with the run's own arguments
    eval_only: bool = False  # only evaluate the checkpoint (deterministic and stochastic) and exit; writes nothing
    plot: bool = True  # Avoid: trajectories.png, evaluation rollouts before and after fine-tuning
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (MUJOCO_GL=egl)
    save_every: Annotated[int, Positive] = 1  # iterations between checkpoints
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # gym simulator (auto: envpool when installed)
    # algorithm (None: the task's value, printed at start; SUITE_DEFAULTS below)
    n_train_itr: Annotated[int | None, Positive] = None  # fine-tuning iterations
    num_envs: Annotated[int | None, Positive] = None  # parallel environments N
    n_steps: Annotated[int | None, Positive] = None  # chunk-steps per env per iteration
    n_workers: Annotated[int | None, Positive] = None  # env processes (None: one per core for robomimic, else in-process)
    horizon_steps: Annotated[int | None, Positive] = None  # T_a of fine-tuning (None: the checkpoint's)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    gae_lambda: Annotated[float, Fraction] = 0.95  # GAE λ
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # σ^exp_min, the sampling std floor
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    sde_eps: Annotated[float, runs.Limits(1e-12, 0.5)] = 1e-4  # start time ε of the probability-flow ODE
    sde_step_size: Annotated[float, runs.Limits(1e-6, 1.0)] = 0.05  # Euler step of the ODE on t in [ε, 1] (at least ~1/K)
    sde_min_beta: Annotated[float, Positive] = 1e-10  # lower clamp of the SDE's β
    sde_beta_scale: Annotated[float, Positive] = 1.0  # β(t) = scale·β_round(t·K) (1: the reference; K: all the DDPM's noise)
    sde_num_probes: Annotated[int, Positive] = 2  # Rademacher probes of Hutchinson's divergence estimator
    fixed_probes: bool = False  # reuse each sample's probes of its old log-likelihood in the update (ratio starts at 1)
    exact_divergence_max_dim: Annotated[int, NonNegative] = 8  # exact divergence when T_a·D_a <= this (0: Hutchinson)
    actor_lr: Annotated[float, Positive] = 1e-5  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    batch_size: Annotated[int | None, Positive] = None  # PPO minibatch of env-steps; also the old-log-prob chunk
    update_epochs: Annotated[int | None, Positive] = None  # PPO epochs per iteration
    clip_coef: Annotated[float, Positive] = 0.01  # PPO clip ε
    vf_coef: Annotated[float, NonNegative] = 0.5  # value loss coefficient
    target_kl: Annotated[float | None, PositiveOrInf] = 1.0  # stop the epochs when approx KL exceeds this (inf: no limit)
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # actor gradient norm clip (None or inf: no limit)
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    reward_scale_running: bool = True  # running reward scaling
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    update_chunk: Annotated[int | None, Positive] = None  # env-steps per backward piece (None: 1000 on a CPU, all on a GPU)
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


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
    if task.suite not in SUITE_DEFAULTS:  # furniture, kitchen
        raise runs.UsageError(f"{task.id}: the reference has no exact-likelihood config for the {task.suite} tasks; use "
                              "dppo_finetune.py")
    filled = runs.apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                        "act_steps": task.act_steps})
    filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    if args.batch_size is None:  # Avoid: n_steps·num_envs/2, DPPO's Avoid rule over env-steps
        args.batch_size = filled["batch_size"] = args.n_steps * args.num_envs // 2
    runs.check_args(args)  # every number within the Limits of its field
    if not args.eval_only:
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    return filled


def fill_from_checkpoint(args: Args, ckpt: dict) -> None:
    """T_a from the checkpoint unless given; the flags checked against the network and one iteration's samples."""
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    if args.act_steps > args.horizon_steps:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the chunk T_a = {args.horizon_steps}")
    if not args.eval_only:
        runs.check_minibatch(args.batch_size, args.n_steps, args.num_envs)
    ode_grid(ckpt["denoising_steps"], args.sde_eps, args.sde_step_size)  # a grid past step K-1 is refused here


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
        raise runs.UsageError(f"--sde-step-size {step_size} evaluates the ODE at t = {t[-2].item():.4f}, where round(t·K) = "
                         f"{idx.max().item()} is past the last denoising step {K - 1}; use a step of at least {1 / K:g}")
    return idx.tolist(), (t[1:] - t[:-1]).tolist()



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



def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over chunk-steps (§4.2; reference `TrainPPODiffusionAgent.run`). All inputs (n_steps, N); next_values = V(s'_t),
    s'_t the observation after chunk-step t (the episode's final one where it ended)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
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
        ret = self.ret
        for t in range(rewards.shape[0]):
            ret = rets[t] = rewards[t] + self.gamma * (1.0 - firsts[t]) * ret
        self.ret = rets[-1].copy()
        x = rets.reshape(-1)  # the moments of the iteration's returns, merged into the running ones
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / (total - 1), total
        return np.clip(rewards / np.sqrt(self.var + self.eps), -self.clip, self.clip)


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, clip: float, n: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over env-steps (reference `model/diffusion/diffusion_ppo_exact.py`, `PPOExactDiffusion.loss`), for
    advantages already normalised over the minibatch: both log-likelihoods clamped to [-5, 2]. Returns (pg_loss,
    approx_kl, clipfrac), each a sum over the samples divided by `n` (default: their number, i.e. the mean; a piece of a
    minibatch of n samples gives its share of the minibatch's mean)."""
    n = n or new_lp.numel()
    log_ratio = new_lp.clamp(-5, 2) - old_lp.clamp(-5, 2)
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).sum() / n
    with torch.no_grad():
        return pg_loss, ((ratio - 1) - log_ratio).sum() / n, ((ratio - 1).abs() > clip).float().sum() / n


def step_lr_schedules(actor_sched, critic_sched, itr: int, n_critic_warmup_itr: int) -> None:
    """Once per iteration, evaluation iterations included; the actor's schedule only once the actor steps, after the
    critic warm-up (reference `agent/finetune/train_ppo_diffusion_agent.py`, `TrainPPODiffusionAgent.run`)."""
    if itr >= n_critic_warmup_itr:
        actor_sched.step()
    critic_sched.step()


def main(args: Args) -> dict:
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, "diffusion", HINT.format(args.env_id), keys=RESUME_KEYS, method=METHOD)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        runs.print_defaults(task.id, filled)
    args.checkpoint = runs.diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, "diffusion", HINT.format(task.id), task,
                                      conversion=lambda: importlib.import_module("loaders.convert"))
    fill_from_checkpoint(args, ckpt)
    T_o, T_a, T_e, N = ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, T_a)
    runs.load_weights(actor, runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or an `actor`
    critic = ObsCritic(task.obs_dim, T_o, mlp_dims=(256,) * 3)
    if resume is not None:
        runs.load_weights(critic, resume["critic"], ckpt_path)
    agent = ExactLikelihoodPG(actor, critic, ckpt["denoising_steps"], T_a, task.action_dim, args.min_sampling_denoising_std,
                              args.randn_clip_value, args.sde_eps, args.sde_step_size, args.sde_min_beta,
                              args.sde_num_probes, args.exact_divergence_max_dim, args.sde_beta_scale).to(device)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)
    print("divergence: " + ("exact" if agent.exact_divergence else f"Hutchinson, {args.sde_num_probes} Rademacher probes"))

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json
    chunk = args.update_chunk or (1000 if device.type == "cpu" else args.batch_size)  # env-steps per backward piece

    run = runs.Run(args, envs, task, normalizer, agent.get_action, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW without weight decay and the reference's cosine schedules (constant for the critic, and by default)
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.actor, args.actor_lr, args.actor_lr_min,
                                                          args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr,
                                                            args.lr_cycle_itr, args.lr_warmup_itr)
    scaler = RunningRewardScaler(N)
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": T_a}, {"actor": agent.actor, "critic": agent.critic},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched},
              {"method": METHOD, "reward_scaler": scaler})
    obs_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)  # the observation after each chunk-step (an episode's final one if it ended)
    act_buf = torch.zeros(args.n_steps, N, T_a, task.action_dim, device=device)

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainPPOAgent`)
            step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)  # as the reference, here too
            continue

        # ---- rollout: only the final chunk x_0 is stored ----
        if run.need_reset or task.reset_every_iteration:  # else `first` goes on from the last step (reference `run`)
            obs, first = run.reset_envs(itr), np.ones(N)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            obs_buf[step] = cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            act_buf[step] = x = agent.get_action(cond)
            run.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            next_obs_buf[step] = normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device))
            terminated[step], dones[step] = term, term | trunc
            first = dones[step].astype(np.float64)
            run.step(rewards[step], dones[step])
        run.end_rollout(itr)

        # ---- advantages: GAE over chunk-steps (truncation: docs/deviations.md) ----
        r = scaler(rewards, firsts) if args.reward_scale_running else rewards  # once per iteration, as the reference
        with torch.no_grad():
            values = agent.get_value(obs_buf.flatten(0, 1)).view(args.n_steps, N)
            next_values = agent.get_value(next_obs_buf.flatten(0, 1)).view(args.n_steps, N)
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            cut = terminated if args.bootstrap_truncated else dones
            advantages, returns = compute_gae(as_t(r), values, next_values, as_t(cut), as_t(dones),
                                              args.gamma, args.gae_lambda)
        run.lap("advantages")

        # ---- old log-likelihoods: the network before this update, in chunks of one minibatch ----
        b_obs, b_act = obs_buf.flatten(0, 1), act_buf.flatten(0, 1)  # (S, T_o, D_o), (S, T_a, D_a); S = n_steps·N
        b_adv, b_ret = advantages.flatten(), returns.flatten()
        S, B = b_obs.shape[0], args.batch_size
        b_probes, weight = agent.probes(S, device) if args.fixed_probes else (None, 0.0)  # (S·P, T_a, D_a)

        def probes_of(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
            """The divergence probes of samples `idx` (P per sample, sample-major): fresh, or the iteration's."""
            if b_probes is None:
                return agent.probes(len(idx), device)
            P = b_probes.shape[0] // S
            return b_probes[(idx.unsqueeze(1) * P + torch.arange(P, device=device)).flatten()], weight

        with torch.no_grad():
            old_lp = torch.cat([agent.log_likelihood(b_obs[idx], b_act[idx], *probes_of(idx))
                                for idx in torch.arange(S, device=device).split(B)])
        run.lap("old_logprobs")

        # ---- the PPO update over env-steps, back-propagating through the ODE ----
        agent.train()
        stats = []  # per minibatch: pg_loss, v_loss, approx_kl, clipfrac
        for epoch in range(args.update_epochs):
            perm, kls = torch.randperm(S, device=device), []
            for start in range(0, S - B + 1, B):
                idx = perm[start:start + B]
                probes, w = probes_of(idx)  # drawn for the whole minibatch at once, then cut with it
                P = probes.shape[0] // B
                mb_adv = (b_adv[idx] - b_adv[idx].mean()) / (b_adv[idx].std() + 1e-8)  # normalised over the minibatch
                v_loss = 0.5 * ((agent.get_value(b_obs[idx]) - b_ret[idx]) ** 2).mean()
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                pg_loss = approx_kl = clipfrac = 0.0
                for a in range(0, B, chunk):  # pieces of the minibatch, their gradients accumulated (one piece on a GPU)
                    p = slice(a, a + chunk)
                    new_lp = agent.log_likelihood(b_obs[idx[p]], b_act[idx[p]], probes[a * P:(a + chunk) * P], w)
                    pg, kl, cf = ppo_loss(new_lp, old_lp[idx[p]], mb_adv[p], args.clip_coef, B)  # the piece's share
                    loss = pg + (args.vf_coef * v_loss if a == 0 else 0.0)  # the value term once
                    loss.backward()
                    pg_loss, approx_kl, clipfrac = pg_loss + pg.detach(), approx_kl + kl, clipfrac + cf
                if itr >= args.n_critic_warmup_itr:
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.actor.parameters(), args.max_grad_norm)
                    actor_opt.step()
                critic_opt.step()
                kls.append(approx_kl)
                stats.append(torch.stack([pg_loss, v_loss.detach(), approx_kl, clipfrac]))
            if args.target_kl is not None and torch.stack(kls).max().item() > args.target_kl:
                break  # checked once per epoch: one host sync (docs/deviations.md)
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac"), torch.stack(stats).mean(0).tolist()))
        logged["old_logprob_mean"] = old_lp.mean().item()
        runs.check_finite(f"iteration {itr}", logged, agent.actor, agent.critic)  # stops before saving a broken state
        logged["explained_variance"] = runs.explained_variance(values.flatten(), returns.flatten())
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
