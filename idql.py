"""IDQL: implicit diffusion Q-learning, fine-tuning the whole pre-trained diffusion policy off-policy
(Hansen-Estruch et al. 2023; a diffusion RL baseline of Ren et al., ICLR 2025, Fig. 5, App. D.3).

A replay buffer keeps every executed chunk. V(s) is fit by expectile regression (τ = 0.8) to the
minimum of the two target Q-networks; Q(s, a) by TD to r + γ·V(s'); the target Q follows Q by EMA.
The diffusion ε-network (all K denoising steps, one trainable network) is fit by plain ε-MSE to the
buffer's chunks, so it tracks the behaviour policy; the critic acts as the policy's selector: each
action is one of `num_sample` DDPM candidates, in training drawn with weight 0.7 where Q − V > 0 and
0.3 elsewhere (expectile exploration), in evaluation the one of highest min(target Q1, Q2).
Its first evaluation therefore differs from the other diffusion scripts' for the same checkpoint: it takes the argmax
of a still-untrained critic. With `--num-sample 1` (one candidate, no selection) it is the same row; on Avoid, whose rows
are the training rollouts, also `--use-expectile-exploration False` (the weighted draw spends random numbers).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20 |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | T_a = T_e (see below) |
| ε_θ | `agent.actor` (whole network, fine-tuned) | (B, T_a, D_a) |
| Q_1, Q_2 / targets | `agent.critic_q` / `agent.target_q` (`DoubleQCritic`, plain MLP) | (B,), (B,) |
| V | `agent.critic_v` (`ObsCritic`, residual) | (B,) |
| τ (expectile), τ_EMA | `expectile`, `critic_tau` | 0.8, 0.001 |
| candidates | `num_sample` | 20 gym / Avoid, 10 robomimic |
| buffer | `ReplayBuffer` (obs, executed chunk, r·scale, final next obs, terminal) | (capacity, N, ...) |

One iteration: N envs × `n_steps` chunk-steps go into the buffer (rewards × `scale_reward_factor`:
0.01 gym and Avoid, 1 robomimic), then n_steps·N/batch_size × replay_ratio updates, each on a batch
drawn uniformly with replacement from the buffer: V step, Q step (with the new V), target EMA, then
the actor's ε-MSE step once `n_critic_warmup_itr` iterations have passed (reference
`irom-princeton/dppo` `agent/finetune/train_idql_diffusion_agent.py` `TrainIDQLDiffusionAgent.run`,
`model/diffusion/diffusion_idql.py` `IDQLDiffusion`).

Chunks: the buffer holds the executed chunk (T_e actions), the critic sees it flattened (T_e·D_a) and
the actor is fit on it, as in the reference; the network therefore predicts T_a = T_e actions (an
MLP checkpoint must have been pre-trained with T_a = T_e; a UNet runs at T_a = T_e by default).

Reference config (our default) vs the paper's Table A8: buffer 25 000 vector steps × n_envs (1M
transitions on Hopper; Table A8: 2e5), replay ratio 128 (Table A8: 16). Avoid has no reference
config: DPPO's Avoid run size (50 envs × 25 chunk-steps, 51 iterations, γ 0.99, envs reset every
iteration, time limit terminal) with the gym config's IDQL settings; one iteration's 1250 chunk-steps
hold a batch of 1000 (160 updates per iteration), so nothing is changed.

Deviations from the reference implementation (docs/deviations.md, "idql.py"):
- Truncated transitions store the finished episode's final observation as next observation (the
  reference stores it too; terminated ones the next episode's first, masked); only `terminated` ends
  the bootstrap, except on Avoid (`--bootstrap-truncated False`: the 100-step limit ends the task).
- The replay buffer is preallocated on the training device with capacity min(buffer_size, vector steps
  of the whole run) (the reference's deque copies the whole buffer to numpy every iteration).
- The critic Q is a plain (not residual) MLP: the reference's `CriticObsAct` takes `residual_tyle`, so
  the configs' `residual_style: True` never reaches it. Reproduced as is.
- During the critic warm-up the actor's ε-MSE loss is logged but not back-propagated (the reference
  computes its gradients and drops them); the actor's LR schedule is held during the warm-up (the
  reference steps it; the configs' schedules are constant, so the numbers are the same).
- Evaluation: one function (`common.envs.evaluate`) on one horizon, as dppo_finetune.py.
- The candidate choice evaluates V(s) once per state (the reference: on every candidate's copy of it); the same
  values up to float rounding (docs/deviations.md, "Speed of the Q-learning baselines").
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
import torch.nn.functional as F
from tqdm import tqdm

from common.envs import EpisodeTracker, evaluate, make_vec_env
from common.errors import UsageError
from common.networks import DoubleQCritic, ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.runs import (DIFFUSION_PRETRAIN_HINT, PhaseTimer, apply_defaults, apply_matmul_flags, check_finite, check_positive,
                         check_range, cli, diffusion_checkpoint_path, eval_only_report, finetune_checkpoint, load_checkpoint,
                         load_resume, load_weights, optimizer_with_schedule, policy_header, print_defaults, resume_args,
                         save_checkpoint, script_name, seed_everything, start_finetuning, step_schedulers,
                         whole_network_weights)
from common.tasks import get_task, refuse_pixel_task

# the schedulers step on a first evaluation iteration (as in the reference), before their optimisers have
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")

METHOD = "idql"


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
    """CPU threads for torch (README "Threads"); None: torch's default"""
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
    """fine-tuning iterations (gym 1000, lift 81, can 151, square/transport 201, Avoid 51)"""
    num_envs: int | None = None
    """parallel environments (gym 40, robomimic 50, Avoid 50)"""
    n_steps: int | None = None
    """chunk-steps per env per iteration (gym 500, lift/can 300, square/transport 400, Avoid 25)"""
    n_workers: int | None = None
    """env worker processes; None: one per core this process may use for robomimic, in-process for gym (which uses
    workers when given 2 or more) and Avoid"""
    horizon_steps: int | None = None
    """T_a (must equal T_e; None: the checkpoint's, a UNet's T_e)"""
    act_steps: int | None = None
    """T_e (None: the task's)"""
    gamma: float | None = None
    """environment discount per chunk-step (gym/Avoid 0.99, robomimic 0.999)"""
    bootstrap_truncated: bool | None = None
    """bootstrap time-limited episodes from the final observation; False: the horizon ends the task (Avoid,
    docs/deviations.md)"""
    min_sampling_denoising_std: float = 0.1
    """exploration std floor while sampling"""
    randn_clip_value: float = 3.0
    """sampling noise clamp"""
    actor_lr: float | None = None
    """actor learning rate (gym/Avoid 1e-4, robomimic 1e-5)"""
    actor_lr_min: float | None = None
    """end of the actor's cosine schedule (None: actor_lr, constant)"""
    critic_lr: float = 1e-3
    """learning rate of Q and V"""
    lr_warmup_itr: int = 10
    """warm-up iterations of the cosine LR schedules (constant schedules ignore it)"""
    lr_cycle_itr: int | None = None
    """first_cycle_steps of the cosine LR schedules (None: n_train_itr)"""
    buffer_size: int | None = None
    """replay buffer in vector steps (x num_envs transitions; gym/Avoid 25000, robomimic 5000)"""
    batch_size: int = 1000
    """transitions per update"""
    replay_ratio: int = 128
    """updates per iteration = n_steps·num_envs/batch_size × replay_ratio"""
    n_critic_warmup_itr: int = 5
    """iterations before the actor starts to step"""
    critic_tau: float = 0.001
    """EMA rate of the target Q-networks"""
    expectile: float = 0.8
    """expectile τ of the V regression"""
    num_sample: int | None = None
    """candidate chunks per action (gym/Avoid 20, robomimic 10)"""
    sample_weight: float = 0.7
    """training: candidate weight where Q - V > 0 (1 - it elsewhere)"""
    use_expectile_exploration: bool = True
    """training picks candidates by the Q - V weights; False: argmax Q as in evaluation"""
    scale_reward_factor: float | None = None
    """rewards stored × this (gym/Avoid 0.01, robomimic 1)"""
    max_grad_norm: float | None = None
    """actor gradient norm clip (None: off)"""
    val_freq: int = 10
    """iterations between evaluations (0: only the final one)"""
    eval_n_steps: int | None = None
    """chunk-steps of an evaluation (None: one episode, ⌈max_episode_steps / T_e⌉)"""
    terminate_on_success: bool = False
    """robomimic: end episodes on success (the paper does not)"""


# The reference's IDQL configs (cfg/gym/finetune/hopper-v2/ft_idql_diffusion_mlp.yaml, cfg/robomimic/finetune/*/);
# Avoid: DPPO's Avoid run size with the gym config's IDQL settings. An explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4,
                buffer_size=25000, num_sample=20, scale_reward_factor=0.01),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-5,
                      buffer_size=5000, num_sample=10, scale_reward_factor=1.0),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-4,
                  buffer_size=25000, num_sample=20, scale_reward_factor=0.01),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, n_train_itr=201), "transport": dict(n_steps=400, n_train_itr=201),
}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise UsageError(f"{script_name(__file__)}.py has no {task.suite} settings (the reference has no IDQL config there)")
    filled = apply_defaults(args, {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}),
                                   "act_steps": task.act_steps})
    filled.update(apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    check_positive(args, "n_train_itr", "num_envs", "n_steps", "n_workers", "horizon_steps", "act_steps", "batch_size",
                   "buffer_size", "replay_ratio", "num_sample", "save_every", "torch_threads", "eval_n_steps", "actor_lr",
                   "actor_lr_min", "critic_lr", "lr_cycle_itr", "min_sampling_denoising_std", "randn_clip_value",
                   "max_grad_norm")
    for name in ("gamma", "critic_tau", "expectile", "sample_weight"):
        check_range(args, name, 0.0, 1.0)
    check_range(args, "seed", 0, 2**31 - 1)  # numpy seeds stay below 2**32 with the per-env offsets
    for name in ("val_freq", "lr_warmup_itr", "n_critic_warmup_itr", "scale_reward_factor"):
        check_range(args, name, 0, math.inf)
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule in float64, as dppo_finetune.py (reference `model/diffusion/sampling.py` `cosine_beta_schedule`)."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Element-wise |τ - 1(diff < 0)|·diff²: weight τ where diff > 0, 1 - τ elsewhere (reference `expectile_loss`)."""
    return torch.where(diff > 0, expectile, 1 - expectile) * diff**2


def candidate_weights(q: torch.Tensor, v: torch.Tensor, weight: float) -> torch.Tensor:
    """(S, B) selection probabilities of S candidates (q: (S, B), v: (S, B) or (1, B)): `weight` where Q - V > 0,
    1 - `weight` elsewhere, normalised over the candidates (reference `IDQLDiffusion.forward`)."""
    w = torch.where(q - v > 0, weight, 1 - weight)
    return w / w.sum(0)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - τ)·target + τ·source (reference `update_target_critic`)."""
    tps = list(target.parameters())  # one foreach call per operation: the loop's float ops, bit-identical, in place
    torch._foreach_mul_(tps, 1.0 - tau)
    torch._foreach_add_(tps, torch._foreach_mul(list(source.parameters()), tau))


class ReplayBuffer:
    """FIFO of vector steps, preallocated on the training device: row i holds one chunk-step of all N envs.
    Transitions are drawn uniformly over the filled rows × envs."""

    def __init__(self, capacity: int, n_envs: int, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.capacity, self.n_envs, self.ptr, self.size = capacity, n_envs, 0, 0
        self.data = {k: torch.zeros(capacity, n_envs, *s, device=device) for k, s in shapes.items()}

    def add(self, **step: torch.Tensor) -> None:
        for k, v in step.items():
            self.data[k][self.ptr] = v
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size * self.n_envs, (batch_size,), device=self.data["obs"].device)
        return {k: v.flatten(0, 1)[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        """Only the filled rows (with the write pointer and the capacity), for the checkpoint."""
        return {"ptr": self.ptr, "size": self.size, "capacity": self.capacity,
                **{k: v[:self.size].cpu() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        """The same rows in the same places (a resumed run draws the same batches); a run extended on resume has
        another capacity: its rows are then laid out oldest first (the newest `capacity` of them)."""
        rows = {k: state[k] for k in self.data}
        self.ptr, self.size = state["ptr"], state["size"]
        if state["capacity"] != self.capacity:
            order = torch.arange(self.size).roll(-self.ptr if self.size == state["capacity"] else 0)[-self.capacity:]
            rows = {k: v[order] for k, v in rows.items()}
            self.size = len(order)
            self.ptr = self.size % self.capacity
        for k, v in self.data.items():
            v[:self.size] = rows[k].to(v.device)


class IDQLDiffusion(nn.Module):
    """The whole ε-network (trainable), double Q with its EMA target, and V."""

    def __init__(self, actor: nn.Module, critic_q: nn.Module, critic_v: nn.Module, denoising_steps: int,
                 horizon_steps: int, action_dim: int, act_steps: int, min_sampling_std: float, randn_clip: float) -> None:
        super().__init__()
        self.actor, self.critic_q, self.critic_v = actor, critic_q, critic_v
        self.target_q = copy.deepcopy(critic_q).requires_grad_(False)
        self.K, self.horizon_steps, self.action_dim, self.act_steps = denoising_steps, horizon_steps, action_dim, act_steps
        self.min_sampling_std, self.randn_clip = min_sampling_std, randn_clip
        # float32 from float32 β with the reference's operation order, as `DiffusionPPO.__init__` (DDPM) in
        # dppo_finetune.py (irom-princeton/dppo, model/diffusion/diffusion.py, DiffusionModel.__init__)
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        logvar = torch.log(torch.clamp(betas * (1.0 - ac_prev) / (1.0 - ac), min=1e-20))
        for name, value in dict(sqrt_ac=torch.sqrt(ac), sqrt_1m_ac=torch.sqrt(1.0 - ac),
                                sqrt_recip_ac=torch.sqrt(1.0 / ac), sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1),
                                c1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
                                c2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
                                std=torch.exp(0.5 * logvar)).items():
            self.register_buffer(name, value, persistent=False)  # indexed by the denoising step t

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """DDPM through all K steps (reference `RWRDiffusion.forward`): x̂0 clamped to [-1, 1], std max(σ_t, 0.1) in
        training, max(σ_t, 1e-3) and none at t = 0 in evaluation, noise clamped to ±3. -> (B, T_a, D_a)."""
        B = cond.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=cond.device)
        for t in range(self.K - 1, -1, -1):
            eps = self.actor(x, torch.full((B,), t, device=cond.device, dtype=torch.long), cond)
            x0 = (self.sqrt_recip_ac[t] * x - self.sqrt_recipm1_ac[t] * eps).clamp(-1, 1)
            mean = self.c1[t] * x0 + self.c2[t] * x
            if deterministic:
                std = torch.zeros_like(self.std[t]) if t == 0 else self.std[t].clamp(min=1e-3)
            else:
                std = self.std[t].clamp(min=self.min_sampling_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
        return x

    def q_min(self, net: nn.Module, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q1, q2 = net(cond, x[:, :self.act_steps])
        return torch.min(q1, q2)

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False, num_sample: int = 20, weight: float = 0.7,
                   expectile_exploration: bool = True) -> torch.Tensor:
        """One of `num_sample` candidate chunks per observation (reference `IDQLDiffusion.forward`), scored by
        min(target Q1, Q2): argmax in evaluation, drawn by `candidate_weights` in training. -> (B, T_a, D_a)."""
        B, S = cond.shape[0], num_sample
        cond_rep = cond.repeat(S, *(1,) * (cond.dim() - 1))  # (S·B, T_o, D_o), candidate-major
        x = self.sample(cond_rep, deterministic)
        q = self.q_min(self.target_q, cond_rep, x).view(S, B)
        if deterministic or not expectile_exploration:
            pick = q.argmax(0)
        else:
            v = self.critic_v(cond)[None]  # V(s) once per state, not per candidate (the same values)
            pick = torch.multinomial(candidate_weights(q, v, weight).T, 1).squeeze(1)
        return x.view(S, B, *x.shape[1:])[pick, torch.arange(B, device=cond.device)]

    def loss_critic_v(self, obs: torch.Tensor, actions: torch.Tensor, expectile: float) -> torch.Tensor:
        """Expectile regression of V(s) on min(target Q1, Q2)(s, a) (reference `IDQLDiffusion.loss_critic_v`)."""
        with torch.no_grad():
            q = self.q_min(self.target_q, obs, actions)
        return expectile_loss(q - self.critic_v(obs), expectile).mean()

    def loss_critic_q(self, obs: torch.Tensor, next_obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                      terminal: torch.Tensor, gamma: float) -> torch.Tensor:
        """Σ_i mean((Q_i(s, a) - (r + γ·(1 - terminal)·V(s')))²) (reference `IDQLDiffusion.loss_critic_q`)."""
        q1, q2 = self.critic_q(obs, actions[:, :self.act_steps])
        with torch.no_grad():
            target = rewards + gamma * self.critic_v(next_obs) * (1 - terminal)
        return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

    def loss_actor(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Unweighted ε-MSE on buffer chunks (reference `IDQLDiffusion.p_losses`): t ~ U{0..K-1}, then ε."""
        t = torch.randint(0, self.K, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        x_t = self.sqrt_ac[t].view(-1, 1, 1) * actions + self.sqrt_1m_ac[t].view(-1, 1, 1) * noise
        return F.mse_loss(self.actor(x_t, t, obs), noise)


def reference_conversion() -> ModuleType:
    """`loaders/convert.py`, which `load_checkpoint` uses only for `--checkpoint paper` or a checkpoint of
    irom-princeton/dppo: imported then, so a run from this project's checkpoints never loads it."""
    from loaders import convert

    return convert


def main(args: Args) -> dict:
    resume = None
    if args.resume:  # the run's own task and arguments; explicit flags win visibly or are refused
        resume = load_resume(args.resume, "diffusion", DIFFUSION_PRETRAIN_HINT.format(args.env_id),
                             keys=("itr", "env_steps", "optimizers", "schedulers", "rng", "args"), method=METHOD)
        args = resume_args(args, resume["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        print_defaults(task.id, filled)
    args.checkpoint = diffusion_checkpoint_path(args.checkpoint, task.id)
    ckpt = resume or load_checkpoint(args.checkpoint, "diffusion", DIFFUSION_PRETRAIN_HINT.format(task.id), task,
                                     conversion=reference_conversion)
    T_e, N = args.act_steps, args.num_envs
    args.horizon_steps = args.horizon_steps or (T_e if ckpt["backbone"] == "unet" else ckpt["horizon_steps"])
    if args.horizon_steps != T_e:  # the actor is fit on the executed chunks the buffer holds (reference)
        raise UsageError(f"IDQL fits the actor on the executed chunks, so T_a must equal T_e: --horizon-steps "
                         f"{args.horizon_steps} vs --act-steps {T_e} (an MLP checkpoint fixes T_a; a UNet takes any)")
    if not args.eval_only and args.batch_size > args.buffer_size * N:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the buffer's {args.buffer_size * N} transitions")
    device = seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    apply_matmul_flags(args, device)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, args.horizon_steps)
    ckpt_path = os.path.join(args.resume, "checkpoint.pt") if resume is not None else args.checkpoint
    load_weights(actor, whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or a fine-tuned actor
    T_o, D_o, D_a = ckpt["cond_steps"], task.obs_dim, task.action_dim
    # reference `CriticObsAct` (its `residual_tyle` typo keeps Q a plain MLP) and `CriticObs` (residual), [256] x 3 Mish
    critic_q = DoubleQCritic(D_o, D_a, T_e, T_o, mlp_dims=(256,) * 3, activation="mish", residual=False)
    critic_v = ObsCritic(D_o, T_o, mlp_dims=(256,) * 3, activation="mish", residual=True)
    agent = IDQLDiffusion(actor, critic_q, critic_v, ckpt["denoising_steps"], args.horizon_steps, D_a, T_e,
                          args.min_sampling_denoising_std, args.randn_clip_value).to(device)
    if resume is not None:
        for name in ("critic_q", "target_q", "critic_v"):
            load_weights(getattr(agent, name), resume[name], ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)
    print(f"envs: {N} x {task.id} on {envs.backend}")
    # Avoid is evaluated with the training noise (App. D.8); everything else deterministically.
    eval_deterministic = task.suite != "avoid"

    def act(deterministic: bool):
        def f(obs: np.ndarray) -> np.ndarray:
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond, deterministic, args.num_sample, args.sample_weight, args.use_expectile_exploration)
            return normalizer.unnormalize_action(x).cpu().numpy()
        return f

    def run_eval(deterministic: bool, itr: int) -> dict:  # itr: the iteration evaluated (its own stream)
        return evaluate(envs, act(deterministic), task, T_e, seed=args.seed + 1_000_000, index=itr, n_steps=args.eval_n_steps)

    if args.eval_only:
        out = eval_only_report(run_eval, args, task.id, index=ckpt.get("itr", 0))
        envs.close()
        return out

    optimizers, schedulers = {}, {}
    for name, module, lr, lr_min in (("actor", agent.actor, args.actor_lr, args.actor_lr_min),
                                     ("critic_q", agent.critic_q, args.critic_lr, args.critic_lr),
                                     ("critic_v", agent.critic_v, args.critic_lr, args.critic_lr)):
        optimizers[name], schedulers[name] = optimizer_with_schedule(module, lr, lr_min, args.lr_cycle_itr,
                                                                     args.lr_warmup_itr)
    # the whole run's vector steps when fewer than buffer_size (the FIFO never drops anything then)
    capacity = min(args.buffer_size, max(args.n_train_itr * args.n_steps, resume["buffer"]["size"] if resume else 0))
    buffer = ReplayBuffer(capacity, N,
                          dict(obs=(T_o, D_o), next_obs=(T_o, D_o), actions=(T_e, D_a), rewards=(), terminal=()), device)
    if resume is not None:
        buffer.load_state_dict(resume["buffer"])
    run, start_itr, env_steps = start_finetuning(args, task, resume, optimizers, schedulers, None,
                                                 lambda: run_eval(eval_deterministic, 0))
    header = {**policy_header(ckpt), "horizon_steps": args.horizon_steps}
    n_updates = int(args.n_steps * N / args.batch_size * args.replay_ratio)  # reference `num_batch`

    tracker = EpisodeTracker(N, T_e, task.success_chunk_reward)
    history, last_train = [], {}
    obs, need_reset = None, True
    timer = PhaseTimer(device)
    bar = tqdm(range(start_itr, args.n_train_itr), initial=start_itr, total=args.n_train_itr, desc="iterations")
    for itr in bar:
        t_itr = time.time()
        if eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            r = run_eval(True, itr)  # reset and run deterministically, no update this iteration (reference `run`)
            run.log_evaluation_iteration(itr, env_steps, r, last_train, bar)
            need_reset = True
            step_schedulers(schedulers, itr, args.n_critic_warmup_itr)  # the reference steps on evaluation iterations too
            continue

        # ---- rollout: executed chunks into the replay buffer ----
        timer.reset()
        if need_reset or task.reset_every_iteration:
            obs = envs.reset(seed=args.seed + itr * N)
            tracker.reset()
            need_reset = False
        agent.eval()
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond, False, args.num_sample, args.sample_weight, args.use_expectile_exploration)
            timer.lap("sampling")
            obs, reward, term, trunc, info = envs.step(normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy())
            done = term | trunc
            terminal = term if args.bootstrap_truncated else done
            buffer.add(obs=cond, actions=x[:, :T_e],
                       next_obs=normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device)),
                       rewards=torch.as_tensor(reward * args.scale_reward_factor, dtype=torch.float32, device=device),
                       terminal=torch.as_tensor(terminal, dtype=torch.float32, device=device))
            tracker.step(reward, done.astype(bool))
            timer.lap("env")
        env_steps += args.n_steps * N * T_e
        last_train = tracker.pop()
        history.append({"iteration": itr, "env_steps": env_steps, **last_train})
        if not eval_deterministic and args.val_freq > 0 and itr % args.val_freq == 0:
            run.log_eval(itr, env_steps, "stochastic", last_train)

        # ---- updates: V (expectile), Q (TD on V), target EMA, actor ε-MSE (reference `run`) ----
        agent.train()
        stats_t = {k: [] for k in ("v_loss", "q_loss", "actor_loss")}
        for _ in range(n_updates):
            b = buffer.sample(args.batch_size)
            v_loss = agent.loss_critic_v(b["obs"], b["actions"], args.expectile)
            optimizers["critic_v"].zero_grad(set_to_none=True)
            v_loss.backward()
            optimizers["critic_v"].step()
            q_loss = agent.loss_critic_q(b["obs"], b["next_obs"], b["actions"], b["rewards"], b["terminal"], args.gamma)
            optimizers["critic_q"].zero_grad(set_to_none=True)
            q_loss.backward()
            optimizers["critic_q"].step()
            ema_update(agent.target_q, agent.critic_q, args.critic_tau)
            if itr >= args.n_critic_warmup_itr:
                actor_loss = agent.loss_actor(b["obs"], b["actions"])
                optimizers["actor"].zero_grad(set_to_none=True)
                actor_loss.backward()
                if args.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(agent.actor.parameters(), args.max_grad_norm)
                optimizers["actor"].step()
            else:  # warm-up: the loss is logged, the actor does not move
                with torch.no_grad():
                    actor_loss = agent.loss_actor(b["obs"], b["actions"])
            for k, v in (("v_loss", v_loss), ("q_loss", q_loss), ("actor_loss", actor_loss)):
                stats_t[k].append(v.detach())
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # the LRs of this iteration's update
        step_schedulers(schedulers, itr, args.n_critic_warmup_itr)
        timer.lap("update")

        # ---- logging, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats_t.items() if v}
        check_finite(f"iteration {itr}", logged, agent.actor, agent.critic_q, agent.critic_v)
        sps = args.n_steps * N * T_e / (time.time() - t_itr)
        run.end_iteration(itr, logged, last_train, sps, lrs, history[-1], timer.times, bar, env_steps)
        if (itr + 1) % args.save_every == 0 or itr + 1 == args.n_train_itr:
            save_checkpoint(run.checkpoint, finetune_checkpoint(
                header, args, {"actor": agent.actor, "critic_q": agent.critic_q, "target_q": agent.target_q,
                               "critic_v": agent.critic_v}, optimizers, schedulers,
                {"method": METHOD, "buffer": buffer.state_dict()}, itr + 1, env_steps))
    bar.close()
    final = run_eval(eval_deterministic, args.n_train_itr)  # a final evaluation row after the last update
    out = run.finish(args.n_train_itr, env_steps, "deterministic" if eval_deterministic else "stochastic", final,
                     {"history": history})
    envs.close()
    return out


if __name__ == "__main__":
    cli(main, Args)
