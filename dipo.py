"""DIPO: fine-tuning a pre-trained diffusion policy with action gradients (Yang et al. 2023; Ren et al.,
ICLR 2025, Fig. 5 baselines, App. D.3 eqs. A4-A6, D.9 Table A8).

Off-policy: every executed chunk goes into a replay buffer. A double-Q critic learns
Q(s, a^{1:T_e}) by TD with the next chunk sampled by an EMA target actor and the minimum of the two
EMA target Qs (eq. A6). The "action gradient" (eq. A4) then moves buffer actions uphill on
min(Q1, Q2): 10 Adam steps (lr 1e-4) on a sampled batch, the gradient norm of the whole batch capped
at 0.1·T_e·D_a, the actions clamped to [-1, 1] and written back into the buffer. The whole diffusion
network fits the improved chunks by the plain ε-MSE of pre-training (eq. A5). Environment actions,
TD next actions and evaluation all come from the EMA target actor (reference `DIPODiffusion.forward`).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20; all K steps run the one trainable network |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| a (buffer) | `buf["action"]` | (buffer_size, T_a, D_a), normalised; the first T_e were executed |
| s, s' | `buf["obs"]`, `buf["next_obs"]` | (buffer_size, T_o, D_o), normalised; s' = final obs at an end |
| r, cut | `buf["reward"]`, `buf["cut"]` | (buffer_size,); r × `reward_scale`; cut: no bootstrap (terminated) |
| Q1, Q2 | `agent.critic` | (obs, a^{1:T_e}) -> (B,), (B,) |
| Q̄, π̄ | `agent.critic_target`, `agent.actor_target` | EMA, τ = `target_ema_rate` |
| η_a, M | `action_lr`, `action_gradient_steps` | 1e-4, 10 |
| replay ratio | `replay_ratio` | updates per iteration = n_steps·N / batch_size × replay_ratio |

Defaults are the reference's configs (`cfg/gym/finetune/hopper-v2/ft_dipo_diffusion_mlp.yaml`,
`cfg/robomimic/finetune/*/ft_dipo_diffusion_mlp.yaml`). Where they differ from the paper's Table A8:
buffer 1e6 transitions (A8: 4e5), batch 1000 (A8: 5000), robomimic replay ratio 16 (A8: 64),
Transport σ^exp_min 0.1 (A8: 0.08). Avoid has no reference config: DPPO's Avoid run size (50 envs ×
25 chunk-steps, 51 iterations, γ 0.99, envs reset every iteration, no bootstrap at the time limit)
with the gym config's DIPO settings (batch 1000 fits the 1250 transitions of one iteration). The
reference's Q-critic is a plain Mish MLP: its configs ask for `residual_style` but
`CriticObsAct` reads `residual_tyle`, so `--critic-residual` is off by default.

Deviations from the reference implementation (docs/deviations.md, "dipo.py"):
- The buffer holds the whole sampled chunk (T_a actions); the critic and the action gradient see
  its first T_e (executed) actions and the actor fits the whole chunk. The reference stores only
  the T_e executed actions and so runs only with T_a = T_e, where the two agree.
- Truncated transitions keep the finished episode's final observation as s' and bootstrap from it
  (as the reference); on Avoid the time limit is terminal (`--bootstrap-truncated False`).
- The replay buffer is a ring of preallocated tensors on the training device, sampled uniformly
  (the reference: deques copied to numpy once per iteration); it is saved with the checkpoint.
- Checkpoints save the EMA target actor (which acts and is evaluated) as `actor`, so other scripts
  and `--eval-only` load the policy DIPO reports; the ε-MSE-trained network is `actor_online`.
- The optimisers' LR schedules step every iteration, as the reference's DIPO agent does (the PPO
  scripts hold the actor's back during the critic warm-up); the configs keep both constant.
- Resumed runs reproduce uninterrupted ones exactly for tasks that reset their envs every
  iteration (Avoid, robomimic); gym locomotion envs restart their episodes on resume.
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

from common.envs import EpisodeTracker, evaluate, make_vec_env
from common.errors import UsageError
from common.networks import DoubleQCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.runs import (DIFFUSION_PRETRAIN_HINT, PhaseTimer, apply_defaults, apply_matmul_flags, check_finite, check_positive,
                         check_range, cli, diffusion_checkpoint_path, eval_only_report, finetune_checkpoint, load_checkpoint,
                         load_resume, load_weights, optimizer_with_schedule, policy_header, print_defaults, resume_args,
                         save_checkpoint, script_name, seed_everything, start_finetuning, step_schedulers,
                         whole_network_weights)
from common.tasks import get_task, refuse_pixel_task

# the actor's scheduler steps from iteration 0 (as in the reference), before its optimiser has
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
    """CPU threads for torch (see README "Threads"); None: torch's default"""
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
    (~4x faster matmuls on an AMX CPU, losses off by ~1e-3; docs/results.md "Speed")"""
    onednn_matmul: bool = False
    """CPU: run float32 matmuls through oneDNN where a start-up check shows they stay float32 (faster on some CPUs, see
    docs/results.md "Speed"; refused with a printed line where the check fails, e.g. on AMX CPUs that would use bf16)"""
    # algorithm (None: the task's value, printed at start; see SUITE_DEFAULTS / TASK_DEFAULTS below)
    n_train_itr: int | None = None
    """fine-tuning iterations (gym 1000, lift/can/square 300, transport 201, Avoid 51)"""
    num_envs: int | None = None
    """parallel environments (gym 40, robomimic 50, Avoid 50)"""
    n_steps: int | None = None
    """chunk-steps per env per iteration (gym 500, lift/can 300, square/transport 400, Avoid 25)"""
    n_workers: int | None = None
    """env worker processes; None: one per core this process may use for robomimic, in-process for gym (which uses
    workers when given 2 or more) and Avoid"""
    horizon_steps: int | None = None
    """T_a in fine-tuning (UNet may differ from pre-training; None: the checkpoint's)"""
    act_steps: int | None = None
    """T_e (None: the task's)"""
    gamma: float | None = None
    """environment discount per chunk-step (gym/Avoid 0.99, robomimic 0.999)"""
    bootstrap_truncated: bool | None = None
    """bootstrap time-limited episodes from Q(final observation); False: the horizon ends the task (Avoid,
    docs/deviations.md)"""
    reward_scale: float | None = None
    """rewards are multiplied by this before they enter the buffer (gym/Avoid 0.01, robomimic 1)"""
    min_sampling_denoising_std: float = 0.1
    """exploration std floor while sampling"""
    randn_clip_value: float = 3.0
    """sampling noise clamp"""
    actor_lr: float | None = None
    """actor learning rate (gym/Avoid 1e-4, robomimic 1e-5)"""
    actor_lr_min: float | None = None
    """end of the actor's cosine schedule (None: constant)"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    lr_warmup_itr: int = 10
    """warm-up iterations of the cosine LR schedules (constant schedules ignore it)"""
    lr_cycle_itr: int | None = None
    """first_cycle_steps of the cosine LR schedules (None: n_train_itr)"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in transitions (chunk-steps)"""
    batch_size: int = 1000
    """transitions per critic / actor update"""
    replay_ratio: int | None = None
    """updates per iteration = n_steps·num_envs / batch_size × replay_ratio (gym/Avoid 64, robomimic 16)"""
    n_critic_warmup_itr: int | None = None
    """iterations in which only the critic learns (gym/Avoid 5, lift 5, can/square/transport 2)"""
    target_ema_rate: float = 0.005
    """τ of the EMA target critic and target actor, updated after every update"""
    action_lr: float = 1e-4
    """Adam learning rate of the action gradient"""
    action_gradient_steps: int = 10
    """Adam steps of the action gradient per update"""
    action_grad_norm_coef: float = 0.1
    """the action gradient's norm is capped at this × T_e × D_a"""
    max_grad_norm: float | None = None
    """actor gradient norm clip (None: off)"""
    critic_residual: bool = False
    """residual Q-critic trunk (the reference's is a plain MLP, see the module docstring)"""
    val_freq: int = 10
    """iterations between evaluations (0: only the final one)"""
    eval_n_steps: int | None = None
    """chunk-steps of an evaluation (None: one episode, ⌈max_episode_steps / T_e⌉)"""
    terminate_on_success: bool = False
    """robomimic: end episodes on success (the paper does not)"""


# The reference's DIPO fine-tuning configs (paper App. D.3, D.9); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4,
                replay_ratio=64, n_critic_warmup_itr=5, reward_scale=0.01),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=300, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-5,
                      replay_ratio=16, n_critic_warmup_itr=2, reward_scale=1.0),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-4,
                  replay_ratio=64, n_critic_warmup_itr=5, reward_scale=0.01),
}
TASK_DEFAULTS = {"lift": dict(n_critic_warmup_itr=5), "square": dict(n_steps=400),
                 "transport": dict(n_steps=400, n_train_itr=201)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise UsageError(f"{script_name(__file__)}.py has no {task.suite} setup (the reference has no DIPO config for it)")
    filled = apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                   "act_steps": task.act_steps})
    filled.update(apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    check_positive(args, "n_train_itr", "num_envs", "n_steps", "n_workers", "horizon_steps", "act_steps", "save_every",
                   "torch_threads", "eval_n_steps", "actor_lr", "actor_lr_min", "critic_lr", "lr_cycle_itr", "buffer_size",
                   "batch_size", "replay_ratio", "target_ema_rate", "action_lr", "action_gradient_steps",
                   "action_grad_norm_coef", "min_sampling_denoising_std", "randn_clip_value", "max_grad_norm",
                   "reward_scale")
    check_range(args, "gamma", 0.0, 1.0)
    check_range(args, "target_ema_rate", 0.0, 1.0)
    check_range(args, "seed", 0, 2**31 - 1)  # numpy seeds stay below 2**32 with the per-env offsets
    for name in ("val_freq", "lr_warmup_itr", "n_critic_warmup_itr"):
        check_range(args, name, 0, math.inf)
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`), float64 as the
    reference evaluates it; everything derived from β is computed in float32 (`Diffusion.__init__`)."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


class Diffusion(nn.Module):
    """DDPM sampling and ε-MSE with one network for all K steps (reference `model/diffusion/diffusion.py`,
    `DiffusionModel`): float32 coefficients with the reference's operation order, indexed by t."""

    def __init__(self, denoising_steps: int, horizon_steps: int, action_dim: int, min_sampling_std: float,
                 randn_clip: float) -> None:
        super().__init__()
        self.K, self.horizon_steps, self.action_dim = denoising_steps, horizon_steps, action_dim
        self.min_sampling_std, self.randn_clip = min_sampling_std, randn_clip
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        var = betas * (1.0 - ac_prev) / (1.0 - ac)
        coefs = dict(sqrt_ac=torch.sqrt(ac), sqrt_1m_ac=torch.sqrt(1.0 - ac), sqrt_recip_ac=torch.sqrt(1.0 / ac),
                     sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1), c1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
                     c2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
                     std=torch.exp(0.5 * torch.log(torch.clamp(var, min=1e-20))))
        for name, value in coefs.items():
            self.register_buffer(name, value, persistent=False)

    def sample(self, net: nn.Module, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """x_0 (B, T_a, D_a) by K DDPM steps of `net` (reference `DiffusionModel.forward`): x̂_0 clamped to
        [-1, 1]; std max(σ_t, σ^exp_min), or in evaluation max(σ_t, 1e-3) and 0 at t = 0; noise clamped to
        ±randn_clip. Differentiable when called with gradients enabled (DQL); random numbers drawn as the
        reference draws them (x_K, then one draw per step)."""
        B = cond.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=cond.device)
        for t in range(self.K - 1, -1, -1):
            eps = net(x, torch.full((B,), t, device=cond.device, dtype=torch.long), cond)
            x0 = (self.sqrt_recip_ac[t] * x - self.sqrt_recipm1_ac[t] * eps).clamp(-1, 1)
            mean = self.c1[t] * x0 + self.c2[t] * x
            if deterministic:
                std = self.std[t] * 0 if t == 0 else self.std[t].clamp(min=1e-3)
            else:
                std = self.std[t].clamp(min=self.min_sampling_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
        return x

    def eps_loss(self, net: nn.Module, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Pre-training's ε-MSE (reference `DiffusionModel.loss` / `p_losses`): t ~ U{0..K-1}, ε ~ N(0, I),
        x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, mean (ε_θ(x_t, t, s) - ε)²."""
        t = torch.randint(0, self.K, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ac[t].view(-1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1) * noise
        return ((net(x_t, t, cond) - noise) ** 2).mean()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target ← (1 - τ)·target + τ·source (reference `DIPODiffusion.update_target_critic` / `update_target_actor`)."""
    tps = list(target.parameters())  # one foreach call per operation: the loop's float ops, bit-identical, in place
    torch._foreach_mul_(tps, 1.0 - tau)
    torch._foreach_add_(tps, torch._foreach_mul(list(source.parameters()), tau))


def critic_loss(critic: nn.Module, critic_target: nn.Module, obs: torch.Tensor, action: torch.Tensor,
                reward: torch.Tensor, next_obs: torch.Tensor, next_action: torch.Tensor, cut: torch.Tensor,
                gamma: float) -> torch.Tensor:
    """Double-Q TD (eq. A6, reference `DIPODiffusion.loss_critic`): y = r + γ(1 - cut)·min(Q̄1, Q̄2)(s', a'),
    loss = mean (Q1(s, a) - y)² + mean (Q2(s, a) - y)². Actions are the executed T_e chunk."""
    with torch.no_grad():
        nq1, nq2 = critic_target(next_obs, next_action)
        target = reward + gamma * (1 - cut) * torch.min(nq1, nq2)
    q1, q2 = critic(obs, action)
    return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()


def action_gradient(critic: nn.Module, obs: torch.Tensor, action: torch.Tensor, lr: float, steps: int,
                    max_norm: float) -> torch.Tensor:
    """Move (B, T_e, D_a) actions uphill on min(Q1, Q2) (eq. A4, reference `TrainDIPODiffusionAgent.run`): a
    fresh Adam (eps 1e-5) on the flattened actions, `steps` times: loss -Σ_b min Q, the gradient norm of the
    whole batch capped at `max_norm`, a step, then a clamp to [-1, 1]. Returns the new actions (detached)."""
    a = action.reshape(action.shape[0], -1).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([a], lr=lr, eps=1e-5)
    for _ in range(steps):
        q1, q2 = critic(obs, a)
        a.grad = torch.autograd.grad(-torch.min(q1, q2).sum(), a)[0]
        nn.utils.clip_grad_norm_([a], max_norm)
        opt.step()
        with torch.no_grad():
            a.clamp_(-1.0, 1.0)
    return a.detach().view_as(action)


class DiffusionDIPO(nn.Module):
    """The trained actor, its EMA target (which acts), the double-Q critic and its EMA target."""

    def __init__(self, actor: nn.Module, critic: nn.Module, diffusion: Diffusion) -> None:
        super().__init__()
        self.actor, self.critic, self.diffusion = actor, critic, diffusion
        self.actor_target = copy.deepcopy(actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """A chunk from the EMA target actor (reference `DIPODiffusion.forward`)."""
        return self.diffusion.sample(self.actor_target, cond, deterministic)


def new_buffer(size: int, T_o: int, D_o: int, T_a: int, D_a: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The replay buffer: preallocated tensors on the training device, filled as a ring."""
    return {"obs": torch.zeros(size, T_o, D_o, device=device), "next_obs": torch.zeros(size, T_o, D_o, device=device),
            "action": torch.zeros(size, T_a, D_a, device=device), "reward": torch.zeros(size, device=device),
            "cut": torch.zeros(size, device=device)}


def buffer_mb(buf: dict[str, torch.Tensor]) -> float:
    return sum(v.numel() * v.element_size() for v in buf.values()) / 2**20


def reference_conversion() -> ModuleType:
    """`loaders/convert.py`, which `load_checkpoint` uses only for `--checkpoint paper` or a checkpoint of
    irom-princeton/dppo: imported then, so a run from this project's checkpoints never loads it."""
    from loaders import convert

    return convert


def main(args: Args) -> dict:
    resume = None
    if args.resume:  # the run's own task and arguments; explicit flags win visibly or are refused
        resume = load_resume(args.resume, "diffusion", DIFFUSION_PRETRAIN_HINT.format(args.env_id),
                             keys=("itr", "env_steps", "optimizers",
                                   "schedulers", "rng", "args"), method=script_name(__file__))
        args = resume_args(args, resume["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        print_defaults(task.id, filled)
    args.checkpoint = diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt = resume or load_checkpoint(args.checkpoint, "diffusion", DIFFUSION_PRETRAIN_HINT.format(task.id), task,
                                     conversion=reference_conversion)
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    T_e, N, B = args.act_steps, args.num_envs, args.batch_size
    if T_e > args.horizon_steps:
        raise UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {args.horizon_steps}")
    n_updates = int(args.n_steps * N / B * args.replay_ratio)  # reference `TrainDIPODiffusionAgent.run`
    if not args.eval_only and n_updates < 1:
        raise UsageError(f"no update per iteration: n_steps·num_envs / batch_size × replay_ratio = {args.n_steps} x {N} / "
                         f"{B} x {args.replay_ratio} < 1 (lower --batch-size or raise --replay-ratio)")
    device = seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    apply_matmul_flags(args, device)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, args.horizon_steps)
    ckpt_path = os.path.join(args.resume, "checkpoint.pt") if resume is not None else args.checkpoint
    load_weights(actor, whole_network_weights(ckpt, ckpt_path), ckpt_path)  # `actor` is the acting (target) network
    critic = DoubleQCritic(task.obs_dim, task.action_dim, T_e, ckpt["cond_steps"], residual=args.critic_residual)
    diffusion = Diffusion(ckpt["denoising_steps"], args.horizon_steps, task.action_dim, args.min_sampling_denoising_std,
                          args.randn_clip_value)
    agent = DiffusionDIPO(actor, critic, diffusion).to(device)
    if resume is not None:
        load_weights(agent.actor, resume["actor_online"], ckpt_path)
        for name in ("critic", "critic_target"):
            load_weights(getattr(agent, name), resume[name], ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=ckpt["cond_steps"], n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)
    print(f"envs: {N} x {task.id} on {envs.backend}")
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

    actor_opt, actor_sched = optimizer_with_schedule(agent.actor, args.actor_lr, args.actor_lr_min, args.lr_cycle_itr,
                                                     args.lr_warmup_itr)
    critic_opt, critic_sched = optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr, args.lr_cycle_itr,
                                                       args.lr_warmup_itr)
    optimizers, schedulers = {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched}
    T_o, D_o, T_a, D_a = ckpt["cond_steps"], task.obs_dim, args.horizon_steps, task.action_dim
    buf = new_buffer(args.buffer_size, T_o, D_o, T_a, D_a, device)
    ptr, size = 0, 0
    if resume is not None:  # the filled part, in ring order
        ptr, size = int(resume["buffer_ptr"]), int(resume["buffer"]["reward"].shape[0])
        for k, v in resume["buffer"].items():
            buf[k][:size] = v.to(device)
    print(f"replay buffer: {args.buffer_size} transitions, {buffer_mb(buf):.1f} MB on {device}")
    run, start_itr, env_steps = start_finetuning(args, task, resume, optimizers, schedulers, None,
                                                 lambda: run_eval(eval_deterministic, 0))
    header = {**policy_header(ckpt), "horizon_steps": args.horizon_steps}
    max_norm = args.action_grad_norm_coef * T_e * D_a  # reference: 0.1 · D_a · T_e

    tracker = EpisodeTracker(N, T_e, task.success_chunk_reward)
    history, last_train = [], {}
    obs, need_reset = None, True
    timer = PhaseTimer(device)
    bar = tqdm(range(start_itr, args.n_train_itr), initial=start_itr, total=args.n_train_itr, desc="iterations")
    for itr in bar:
        t_itr = time.time()
        if eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            r = run_eval(True, itr)  # reset, run deterministically, no update here (reference `TrainDIPODiffusionAgent`)
            run.log_evaluation_iteration(itr, env_steps, r, last_train, bar)
            need_reset = True
            step_schedulers(schedulers, itr, 0)  # the reference steps both schedulers every iteration
            continue

        # ---- rollout: executed chunks into the replay buffer ----
        timer.reset()
        if need_reset or task.reset_every_iteration:
            obs = envs.reset(seed=args.seed + itr * N)
            tracker.reset()
            need_reset = False
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond)
            timer.lap("sampling")
            obs, reward, term, trunc, info = envs.step(normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy())
            done = term | trunc
            tracker.step(reward, done)
            idx = (ptr + torch.arange(N, device=device)) % args.buffer_size
            buf["obs"][idx], buf["action"][idx] = cond, x
            buf["next_obs"][idx] = normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device))
            buf["reward"][idx] = torch.as_tensor(reward * args.reward_scale, dtype=torch.float32, device=device)
            buf["cut"][idx] = torch.as_tensor(term if args.bootstrap_truncated else done, dtype=torch.float32,
                                              device=device)
            ptr, size = (ptr + N) % args.buffer_size, min(size + N, args.buffer_size)
            timer.lap("env")
        env_steps += args.n_steps * N * T_e
        last_train = tracker.pop()
        history.append({"iteration": itr, "env_steps": env_steps, **last_train})
        if not eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            run.log_eval(itr, env_steps, "stochastic", last_train)

        # ---- updates: critic (eq. A6), action gradient written back (eq. A4), actor ε-MSE (eq. A5) ----
        stats_t = {k: [] for k in ("critic_loss", "actor_loss", "q_mean", "action_shift")}
        for _ in range(n_updates):
            i = torch.randint(size, (B,), device=device)
            with torch.no_grad():
                next_action = agent.get_action(buf["next_obs"][i])[:, :T_e]
            loss_c = critic_loss(agent.critic, agent.critic_target, buf["obs"][i], buf["action"][i, :T_e], buf["reward"][i],
                                 buf["next_obs"][i], next_action, buf["cut"][i], args.gamma)
            critic_opt.zero_grad(set_to_none=True)
            loss_c.backward()
            critic_opt.step()
            stats_t["critic_loss"].append(loss_c.detach())
            if itr >= args.n_critic_warmup_itr:
                j = torch.randint(size, (B,), device=device)  # a second batch, as the reference
                o, a = buf["obs"][j], buf["action"][j]
                guided = action_gradient(agent.critic, o, a[:, :T_e], args.action_lr, args.action_gradient_steps, max_norm)
                improved = torch.cat([guided, a[:, T_e:]], dim=1)  # T_a > T_e: the unexecuted tail stays as sampled
                buf["action"][j] = improved  # written back (a row drawn twice gets the same improved action)
                loss_a = diffusion.eps_loss(agent.actor, improved, o)
                actor_opt.zero_grad(set_to_none=True)
                loss_a.backward()
                if args.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(agent.actor.parameters(), args.max_grad_norm)
                actor_opt.step()
                with torch.no_grad():
                    stats_t["actor_loss"].append(loss_a.detach())
                    stats_t["q_mean"].append(torch.min(*agent.critic(o, guided)).mean())
                    stats_t["action_shift"].append((guided - a[:, :T_e]).abs().mean())
            ema_update(agent.critic_target, agent.critic, args.target_ema_rate)
            ema_update(agent.actor_target, agent.actor, args.target_ema_rate)
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # the LRs of this iteration's update
        step_schedulers(schedulers, itr, 0)  # the reference steps both schedulers every iteration
        timer.lap("update")

        # ---- logging, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats_t.items() if v}
        check_finite(f"iteration {itr}", logged, agent)
        sps = args.n_steps * N * T_e / (time.time() - t_itr)
        run.end_iteration(itr, logged, last_train, sps, lrs, history[-1], timer.times, bar, env_steps)
        if (itr + 1) % args.save_every == 0 or itr + 1 == args.n_train_itr:
            extra = {"method": script_name(__file__), "buffer": {k: v[:size] for k, v in buf.items()}, "buffer_ptr": ptr}
            save_checkpoint(run.checkpoint, finetune_checkpoint(
                header, args, {"actor": agent.actor_target, "actor_online": agent.actor, "critic": agent.critic,
                               "critic_target": agent.critic_target}, optimizers, schedulers, extra, itr + 1, env_steps))
    bar.close()
    final = run_eval(eval_deterministic, args.n_train_itr)  # a final evaluation row after the last update
    out = run.finish(args.n_train_itr, env_steps, "deterministic" if eval_deterministic else "stochastic", final,
                     {"history": history})
    envs.close()
    return out


if __name__ == "__main__":
    cli(main, Args)
