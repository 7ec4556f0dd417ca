"""Gaussian chunk policy: behaviour-cloning pre-training and PPO fine-tuning (Ren et al., ICLR 2025, §5 baselines,
App. B.2, D.6, eq. A14).

The parameterisation baseline of DPPO: the policy outputs the whole action chunk at once, a ~ N(tanh(μ_θ(s)), σ²) with
a learned per-dimension σ shared across the chunk (App. D.6). It is fine-tuned with the PPO loop of `dppo_finetune.py`,
with one PPO sample per env-step instead of one per (env-step, denoising-step) pair. One file holds every stage:

    python gaussian_ppo.py --pretrain --env-id avoid-m2 [--dataset FILE] [--backbone transformer]
    python gaussian_ppo.py --env-id avoid-m2 --checkpoint runs/.../checkpoint.pt [--bc-coef 0.1]
    python gaussian_ppo.py --env-id Hopper-v5 --from-scratch           # App. B.2, any gymnasium id

| paper | here | shape / value |
|---|---|---|
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | chunk predicted / executed / obs history |
| μ_θ(s) | `GaussianPolicy.network` + tanh | (B, T_a, D_a), normalised actions |
| σ | `GaussianPolicy.log_std` | (D_a,): init 0.1, clamped to [0.01, 0.2] |
| γ_env, λ | `gamma`, `gae_lambda` | |
| α (eq. A14) | `bc_coef` | −α·log π_BC(a_new), a_new ~ π_θ reparameterised |
| obs, actions | `obs_buf`, `act_buf` | (n_steps, N, T_o, D_o), (n_steps, N, T_a, D_a), normalised |

Sampling: a = μ + σ·z with z ~ N(0, I) clamped to ±3 (so a ∈ μ ± 3σ); deterministic evaluation uses σ = 1e-4.
log π(a|s) is the Normal log-density averaged over all T_a·D_a entries (paper App. D.6), clamped to [-5, 2] in the PPO
ratio as the reference does. Pre-training (`--pretrain`, loaders/chunk_pretrain.py) minimises −log π(a|s) on
demonstration windows (so σ is learned too), with the optimiser, schedule and EMA of `dppo_pretrain.py` (App. D.1);
fine-tuning starts from the EMA. `--from-scratch` (App. B.2, Fig. A6) starts from a random policy with the reference's
scratch configs as its defaults (SCRATCH_DEFAULTS), on any gymnasium id with continuous actions.

Defaults and deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md.
"""

from __future__ import annotations

import copy
import importlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from common import runs
from common.envs import make_vec_env
from common.errors import TaskError
from common.networks import ChunkMLP, ChunkTransformer, ObsCritic
from common.normalizer import Normalizer
from common.scratch import scratch_normalizer
from common.tasks import Task, get_task, refuse_pixel_task

POLICY = "gaussian"
HINT = f"python {POLICY}_ppo.py --pretrain --env-id {{}}"  # how to make a pre-trained checkpoint, in error messages
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION
# the critic's scheduler steps on a first evaluation iteration (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py), or any gymnasium id with continuous actions (--from-scratch)
    checkpoint: str | None = None  # pre-trained (or fine-tuned) Gaussian checkpoint to fine-tune or evaluate
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
    save_every: Annotated[int, Positive] = 1  # fine-tuning iterations between checkpoints
    env_backend: Literal["auto", "envpool", "gymnasium"] = "auto"  # gym simulator (auto: envpool when installed)
    # modes
    pretrain: bool = False  # behaviour-cloning pre-training on --dataset instead of fine-tuning
    dataset: str | None = None  # pre-training demonstrations, or `paper` for the reference's train.npz (None: the task's)
    from_scratch: bool = False  # PPO from a random policy (App. B.2): T_a = T_e = 1, no checkpoint
    output: str | None = None  # --pretrain: also write the release checkpoint (header, normalisation, EMA) here
    # policy (pre-training / from scratch; fine-tuning reads it from the checkpoint)
    backbone: Literal["mlp", "transformer"] = "mlp"  # ChunkMLP or ChunkTransformer
    horizon_steps: Annotated[int | None, Positive] = None  # T_a (None: the task's)
    cond_steps: Annotated[int, Positive] = 1  # T_o
    mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # hidden widths of the MLP (None: per task)
    activation: str | None = None  # MLP activation (None: per task)
    residual: bool | None = None  # residual MLP trunk (None: yes, except from scratch)
    n_emb: Annotated[int, Positive] = 128  # Transformer width
    n_heads: Annotated[int, Positive] = 4  # Transformer attention heads
    n_layers: Annotated[int, Positive] = 2  # Transformer layers
    std_init: Annotated[float | None, Positive] = None  # initial σ (None: 0.1; from scratch 1)
    std_min: Annotated[float | None, Positive] = None  # σ lower clamp (None: the checkpoint's, else 0.01)
    std_max: Annotated[float | None, Positive] = None  # σ upper clamp (None: the checkpoint's, else 0.2; from scratch 1)
    randn_clip_value: Annotated[float, Positive] = 3.0  # sampling noise clamp: actions stay within μ ± 3σ
    # pre-training (optimiser, schedule and EMA of dppo_pretrain.py)
    n_epochs: Annotated[int | None, Positive] = None  # passes over the dataset (None: per task)
    max_n_episodes: Annotated[int | None, Positive] = None  # pre-train on the dataset's first N episodes (App. B.2; None: all)
    pretrain_batch_size: Annotated[int | None, Positive] = None  # minibatch (None: gym 128, robomimic/furniture 256)
    learning_rate: Annotated[float | None, Positive] = None  # peak learning rate (None: per task)
    min_lr: Annotated[float | None, Positive] = None  # end of the cosine schedule (None: per task)
    warmup_epochs: Annotated[int | None, NonNegative] = None  # linear warm-up epochs
    weight_decay: Annotated[float, NonNegative] = 1e-6  # AdamW weight decay
    ema_decay: Annotated[float, Fraction] = 0.995  # EMA decay
    ema_every: Annotated[int, Positive] = 10  # gradient steps between EMA updates
    ema_start_epoch: Annotated[int, NonNegative] = 20  # before this epoch the EMA is reset to the model
    eval_every: Annotated[int | None, NonNegative] = None  # epochs between evaluation rollouts (0: never)
    n_eval_envs: Annotated[int, Positive] = 50  # parallel envs of a pre-training evaluation
    pretrain_save_every: Annotated[int, Positive] = 50  # epochs between pre-training checkpoints
    # fine-tuning (None: the task's value, printed at start; SUITE_DEFAULTS / TASK_DEFAULTS below)
    n_train_itr: Annotated[int | None, Positive] = None  # fine-tuning iterations
    num_envs: Annotated[int | None, Positive] = None  # parallel environments N
    n_steps: Annotated[int | None, Positive] = None  # chunk-steps per env per iteration
    n_workers: Annotated[int | None, Positive] = None  # env processes (None: one per core for robomimic, else in-process)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk (None: the task's)
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    gae_lambda: Annotated[float, Fraction] = 0.95  # GAE λ
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    final_action_clip: bool | None = None  # clamp executed actions to [-1, 1] before un-normalising
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    batch_size: Annotated[int | None, Positive] = None  # PPO minibatch of env-steps (Avoid: n_steps·num_envs/2)
    update_epochs: Annotated[int | None, Positive] = None  # PPO epochs per iteration
    clip_coef: Annotated[float | None, Positive] = None  # PPO clip ε
    vf_coef: Annotated[float, NonNegative] = 0.5  # value loss coefficient
    target_kl: Annotated[float | None, PositiveOrInf] = 1.0  # stop the epochs when approx KL exceeds this (inf: no limit)
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient norm clip (None or inf: no limit)
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    reward_scale_running: bool = True  # running reward scaling (reference `util/reward_scaling.py`)
    bc_coef: Annotated[float, NonNegative] = 0.0  # α of eq. A14: −α·log π_BC(a_new) under the frozen pre-trained policy
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's configs (batch over env-steps: DPPO's minibatch / K'); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4,
                batch_size=5000, update_epochs=5, clip_coef=0.01, n_critic_warmup_itr=0, final_action_clip=False),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-4,
                      batch_size=7500, update_epochs=10, clip_coef=0.01, n_critic_warmup_itr=2, final_action_clip=False),
    "furniture": dict(bootstrap_truncated=False, n_train_itr=1000, num_envs=1000, n_steps=125, gamma=0.999, actor_lr=1e-5,
                      actor_lr_min=1e-6, lr_cycle_itr=10000, batch_size=8800, update_epochs=5, clip_coef=0.01,
                      n_critic_warmup_itr=1, final_action_clip=False),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-5,
                  batch_size=None, update_epochs=10, clip_coef=0.1, n_critic_warmup_itr=1, final_action_clip=False),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, batch_size=10000, n_train_itr=201),
    "transport": dict(n_steps=400, batch_size=10000, n_train_itr=201, update_epochs=5),
    "one-leg-low": dict(n_steps=88), "one-leg-med": dict(n_steps=88),
}
# Pre-training, as dppo_pretrain.py (paper App. D.1).
PRETRAIN_DEFAULTS = {
    "gym": dict(pretrain_batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    "robomimic": dict(pretrain_batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10, activation="mish",
                      mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    "furniture": dict(pretrain_batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10, activation="mish",
                      mlp_dims=(1024, 1024, 1024), n_epochs=8000, eval_every=0),
    # Avoid: the fast recipe of dppo_pretrain.py (the paper: batch 16, lr 1e-4 -> 1e-5, ~10000 epochs, App. D.8)
    "avoid": dict(pretrain_batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                  mlp_dims=(512, 512, 512), n_epochs=300, eval_every=50),
}
# From scratch (App. B.2, Fig. A6): the reference's cfg/gym/scratch/{hopper,walker2d,halfcheetah}-v2/ppo_gaussian_mlp.yaml
# (any other gymnasium id: Hopper's). σ starts at its clamp's top, as the reference's random log-variance head does.
SCRATCH_DEFAULTS = {t: dict(SUITE_DEFAULTS["gym"], n_train_itr=n, num_envs=10, n_steps=1000, batch_size=500, update_epochs=10,
                            clip_coef=0.1, lr_cycle_itr=1000, horizon_steps=1, act_steps=1, mlp_dims=(512, 512, 512),
                            activation="relu", residual=False, std_init=1.0, std_min=0.01, std_max=1.0)
                    for t, n in (("hopper", 301), ("walker2d", 301), ("halfcheetah", 501))}


def resolve_task(env_id: str) -> Task:
    """A registry task, or else any registered gymnasium id with a Box action space (T_a = T_e = 1)."""
    try:
        return get_task(env_id)
    except TaskError:
        if env_id not in gym.registry:
            raise
    env = gym.make(env_id)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise TaskError(f"{env_id}: needs a flat observation and a continuous (Box) action space")
    return Task(env_id, "gym", env_id, obs_space.shape[0], act_space.shape[0], gym.spec(env_id).max_episode_steps or 1000,
                1, 1, reset_every_iteration=False)


# Which flags each mode reads (groups of `Args`): a flag the mode would not use is refused, never silently ignored.
FIELDS = [f.name for f in dataclasses.fields(Args)]
PRETRAIN_FLAGS = ("dataset", "output", *FIELDS[FIELDS.index("n_epochs"):FIELDS.index("n_train_itr")])
ARCH_FLAGS = tuple(FIELDS[FIELDS.index("backbone"):FIELDS.index("std_min")])  # the network and its initial σ
FINETUNE_FLAGS = ("checkpoint", "resume", "eval_only", "save_every", "env_backend", "from_scratch",
                  *FIELDS[FIELDS.index("n_train_itr"):FIELDS.index("float32_matmul_precision")])


def check_mode_flags(args: Args) -> None:
    """Refuse the flags of another mode (pre-training vs fine-tuning) before any default is filled in."""
    if args.pretrain:
        runs.refuse_flags(args, FINETUNE_FLAGS, "is a fine-tuning flag; --pretrain does not use it")
    else:
        runs.refuse_flags(args, PRETRAIN_FLAGS, "is a pre-training flag; use it with --pretrain")
        if not args.from_scratch:
            runs.refuse_flags(args, ARCH_FLAGS, "sets the architecture, which fine-tuning reads from the checkpoint")


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults for the chosen mode into every flag left at None and check every number; returns what
    was filled."""
    task = resolve_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in (PRETRAIN_DEFAULTS if args.pretrain else SUITE_DEFAULTS):  # e.g. kitchen: DPPO's only
        raise runs.UsageError(f"{task.id}: this script has no Gaussian {'pre-training' if args.pretrain else 'fine-tuning'} "
                              f"config for the {task.suite} tasks; use dppo_pretrain.py and dppo_finetune.py")
    if args.pretrain:
        defaults = {**PRETRAIN_DEFAULTS[task.suite], "horizon_steps": task.horizon_steps, "residual": True, "std_init": 0.1}
    else:
        defaults = {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {}), "act_steps": task.act_steps}
        if args.from_scratch:
            defaults.update(SCRATCH_DEFAULTS.get(task.id, SCRATCH_DEFAULTS["hopper"]))
    filled = runs.apply_defaults(args, defaults)
    if not args.pretrain:
        filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
        if args.batch_size is None:  # Avoid: n_steps·n_envs/2 (DPPO's minibatch without the K' factor)
            args.batch_size = filled["batch_size"] = args.n_steps * args.num_envs // 2
    runs.check_args(args)  # every number within the Limits of its field
    if not args.pretrain and not args.eval_only:
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    return filled


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) averaged over the chunk's T_a·D_a entries (paper App. D.6): (B, T_a, D_a) -> (B,)."""
    lp = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=(1, 2))


def build_network(backbone: str, arch: dict) -> nn.Module:
    if backbone == "mlp":
        return ChunkMLP(**arch)
    if backbone == "transformer":
        return ChunkTransformer(**arch)
    raise TaskError(f"unknown backbone {backbone!r} (mlp or transformer)")


def network_arch(args: Args, task: Task) -> dict:
    """Plain constructor arguments, stored in the checkpoint to rebuild the network."""
    common = dict(obs_dim=task.obs_dim, horizon_steps=args.horizon_steps, out_dim=task.action_dim, cond_steps=args.cond_steps)
    if args.backbone == "mlp":
        return dict(common, mlp_dims=list(args.mlp_dims), activation=args.activation, residual=args.residual)
    return dict(common, n_emb=args.n_emb, n_heads=args.n_heads, n_layers=args.n_layers)


def sample_actions(policy: nn.Module, cond: torch.Tensor, deterministic: bool, randn_clip: float) -> torch.Tensor:
    """a = μ + σ·z, z ~ N(0, I) clamped to ±randn_clip; σ = 1e-4 when deterministic (paper App. D.6). Differentiable."""
    mean, std = policy(cond)
    std = torch.full_like(std, 1e-4) if deterministic else std
    return mean + std * torch.randn_like(mean).clamp(-randn_clip, randn_clip)


class GaussianPolicy(nn.Module):
    """a ~ N(tanh(μ_θ(s)), σ²) over the chunk; σ learned per action dimension, shared across the chunk."""

    def __init__(self, network: nn.Module, action_dim: int, std_init: float, std_min: float, std_max: float) -> None:
        super().__init__()
        self.network = network
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(std_init)))
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, T_a, D_a) and std (D_a,), clamped to [std_min, std_max] (paper App. D.6)."""
        return torch.tanh(self.network(cond)[0]), self.log_std.clamp(self.log_std_min, self.log_std_max).exp()


class GaussianPPO(nn.Module):
    """The fine-tuned policy `actor_ft`, a frozen copy of the pre-trained one (for eq. A14), and the critic."""

    def __init__(self, actor: GaussianPolicy, critic: nn.Module, randn_clip: float) -> None:
        super().__init__()
        self.actor = copy.deepcopy(actor).requires_grad_(False).eval()
        self.actor_ft = actor
        self.critic = critic
        self.randn_clip = randn_clip

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return sample_actions(self.actor_ft, cond, deterministic, self.randn_clip)

    def get_logprobs(self, cond: torch.Tensor, x: torch.Tensor, base: bool = False) -> torch.Tensor:
        mean, std = (self.actor if base else self.actor_ft)(cond)
        return gaussian_logprob(x, mean, std)

    def bc_loss(self, cond: torch.Tensor) -> torch.Tensor:
        """Eq. A14: −log π_BC(a_new) with a_new ~ π_θ(·|s) by reparameterisation; π_BC is frozen."""
        return -self.get_logprobs(cond, sample_actions(self.actor_ft, cond, False, self.randn_clip), base=True).mean()

    def get_value(self, cond: torch.Tensor) -> torch.Tensor:
        return self.critic(cond)


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


def clamp_logprobs(lp: torch.Tensor) -> torch.Tensor:
    """New and old log-probs clamped to [-5, 2] before the ratio (reference `model/rl/gaussian_ppo.py` `PPO_Gaussian.loss`)."""
    return lp.clamp(-5, 2)


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over env-steps (eq. 4.5 without the denoising discount). Returns (pg_loss, approx_kl, clipfrac)."""
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > eps).float().mean()
    return pg_loss, approx_kl, clipfrac


@torch.no_grad()
def old_logprobs(agent: nn.Module, obs: torch.Tensor, act: torch.Tensor, chunk: int) -> torch.Tensor:
    """log π(a|s) of every env-step before the update, in pieces of `chunk` rows (the same values; faster on a CPU)."""
    return torch.cat([agent.get_logprobs(o, a) for o, a in zip(obs.split(chunk), act.split(chunk))])


def policy_from_checkpoint(ckpt: dict, args: Args, weights: str, path: str = "checkpoint") -> GaussianPolicy:
    std_min, std_max = args.std_min or ckpt["std_limits"][0], args.std_max or ckpt["std_limits"][1]
    policy = GaussianPolicy(build_network(ckpt["backbone"], ckpt["arch"]), ckpt["action_dim"], 0.1, std_min, std_max)
    runs.load_weights(policy, ckpt[weights], path)
    return policy


def checkpoint_header(args: Args, task: Task, arch: dict, normalizer: Normalizer, std_limits: list[float]) -> dict:
    return {"format": runs.CHECKPOINT_FORMAT, "policy": POLICY, "backbone": args.backbone, "arch": arch, "task": task.id,
            "obs_dim": task.obs_dim, "action_dim": task.action_dim, "horizon_steps": arch["horizon_steps"],
            "cond_steps": arch["cond_steps"], "std_limits": std_limits, "normalization": normalizer.state_dict(),
            "args": runs.args_dict(args)}


class RunningRewardScaler:
    """Running reward scaling (reference `util/reward_scaling.py`), once per iteration on its (n_steps, N) rewards: the
    discounted returns (per env, ret <- r + 0.99 (1 - first) ret) update the running variance in one batch (count 1e-4,
    mean 0, var 1; var = M2 / (count - 1)), then rewards / sqrt(var + 1e-8), clipped to ±10; `ret` carries over."""
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


def step_lr_schedules(actor_sched, critic_sched, itr: int, n_critic_warmup_itr: int) -> None:
    """Once per iteration, evaluation iterations included; the actor's schedule only once the actor steps, after the
    critic warm-up (reference `agent/finetune/train_ppo_gaussian_agent.py`, `TrainPPOGaussianAgent.run`)."""
    if itr >= n_critic_warmup_itr:
        actor_sched.step()
    critic_sched.step()



def main(args: Args) -> dict:
    check_mode_flags(args)
    if args.pretrain:
        task = resolve_task(args.env_id)
        runs.print_defaults(task.id, fill_defaults(args))
        runs.check_output_path(args.output)  # before any work
        from loaders.chunk_pretrain import pretrain  # behaviour cloning as dppo_pretrain.py (App. D.1), on this policy

        arch, std_limits = network_arch(args, task), [args.std_min or 0.01, args.std_max or 0.2]
        return pretrain(args, task, lambda: GaussianPolicy(build_network(args.backbone, arch), task.action_dim, args.std_init,
                                                           *std_limits),
                        lambda pi, obs, actions: -gaussian_logprob(actions, *pi(obs)).mean(),  # the loss: −log π(a|s)
                        sample_actions, lambda normalizer: checkpoint_header(args, task, arch, normalizer, std_limits))
    explicit_act_steps, explicit_clip = args.act_steps, args.final_action_clip
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, POLICY, f"python {POLICY}_ppo.py --pretrain")
    filled = fill_defaults(args)
    task = resolve_task(args.env_id)
    if resume is None:
        runs.print_defaults(task.id, filled)
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    if args.from_scratch and resume is None:  # App. B.2: random init, identity normalisation, T_a = T_e = 1
        if args.checkpoint:
            raise runs.UsageError("--from-scratch starts from a random policy; drop --checkpoint (or --from-scratch)")
        if task.suite != "gym":  # App. B.2 is MuJoCo locomotion; the other suites start from a pre-trained policy
            raise runs.UsageError(f"--from-scratch runs gymnasium ids (e.g. Hopper-v5), not the {task.suite} task "
                                  f"{task.id}: pre-train it ({HINT.format(task.id)}) and fine-tune with --checkpoint")
        arch = network_arch(args, task)
        net = GaussianPolicy(build_network(args.backbone, arch), task.action_dim, args.std_init, args.std_min, args.std_max)
        ckpt = {**checkpoint_header(args, task, arch, scratch_normalizer(task), [args.std_min, args.std_max]),
                "ema": net.state_dict()}
        ckpt_path = "--from-scratch"  # where the weights come from, as load errors name it
    elif args.checkpoint is None and resume is None:
        raise FileNotFoundError(f"--checkpoint is required for {task.id} (pre-train: {HINT.format(task.id)}, "
                                "or use --from-scratch)")
    else:
        ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, POLICY, HINT.format(task.id), task,
                                          conversion=lambda: importlib.import_module("loaders.convert"))
    args.horizon_steps = ckpt["horizon_steps"]
    if explicit_act_steps is None:  # a checkpoint with a shorter chunk than the task's T_e (e.g. from scratch, T_a = 1)
        args.act_steps = min(args.act_steps, args.horizon_steps)
    elif args.act_steps > args.horizon_steps:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the checkpoint's chunk T_a = {args.horizon_steps}")
    # fine-tuning a from-scratch checkpoint (e.g. a Hopper expert): its normalisation is the env's bounds
    if explicit_clip is None and not args.from_scratch and ckpt.get("args", {}).get("from_scratch"):
        args.final_action_clip = True
    T_o, T_a, T_e, N = ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs
    if not args.eval_only:
        runs.check_minibatch(args.batch_size, args.n_steps, N)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    base = policy_from_checkpoint(ckpt, args, "base" if "base" in ckpt else "ema", ckpt_path)  # starts from the EMA
    # the reference's furniture critic is [512] x 3 (cfg/furniture/finetune/*/ft_ppo_*.yaml), elsewhere ours is [256] x 3
    critic = ObsCritic(task.obs_dim, T_o, mlp_dims=(512,) * 3 if task.suite == "furniture" else (256,) * 3)
    agent = GaussianPPO(base, critic, args.randn_clip_value).to(device)
    if "actor_ft" in ckpt:  # a fine-tuning checkpoint: resumed, or evaluated
        runs.load_weights(agent.actor_ft, ckpt["actor_ft"], ckpt_path)
        runs.load_weights(agent.critic, ckpt.get("critic"), ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend, normalizer=normalizer,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json
    lp_chunk = 4096 if device.type == "cpu" else 50_000  # rows per piece of the old log-probs

    executed = (lambda x: x.clamp(-1, 1)) if args.final_action_clip else (lambda x: x)  # noqa: E731
    policy = lambda cond, deterministic: executed(agent.get_action(cond, deterministic))  # noqa: E731 (evaluation)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW without weight decay and the reference's cosine schedules (constant for the critic, and by default)
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.actor_ft, args.actor_lr, args.actor_lr_min,
                                                          args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr,
                                                            args.lr_cycle_itr, args.lr_warmup_itr)
    scaler = RunningRewardScaler(N)
    run.start(resume, runs.policy_header(ckpt), {"base": agent.actor, "actor_ft": agent.actor_ft, "critic": agent.critic},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched},
              {"reward_scaler": scaler})
    obs_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)  # the observation after each chunk-step (an episode's final one if it ended)
    act_buf = torch.zeros(args.n_steps, N, T_a, task.action_dim, device=device)

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainPPOAgent`)
            step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)  # as the reference, here too
            continue

        # ---- rollout ----
        if run.need_reset or task.reset_every_iteration:  # else `first` goes on from the last step (reference `run`)
            obs, first = run.reset_envs(itr), np.ones(N)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            obs_buf[step] = cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            act_buf[step] = x = agent.get_action(cond)
            run.lap("sampling")
            action = normalizer.unnormalize_action(executed(x)[:, :T_e]).cpu().numpy()
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
            advantages, returns = compute_gae(as_t(r), values, next_values, as_t(cut), as_t(dones), args.gamma,
                                              args.gae_lambda)
        run.lap("advantages")

        # ---- the samples: every env-step, with its log-prob before the update ----
        b_obs, b_act = obs_buf.flatten(0, 1), act_buf.flatten(0, 1)  # (S, T_o, D_o), (S, T_a, D_a); S = n_steps·N
        b_adv, b_ret = advantages.flatten(), returns.flatten()  # (S,), (S,)
        S, B = b_obs.shape[0], args.batch_size
        old_lp = old_logprobs(agent, b_obs, b_act, lp_chunk)  # (S,)
        run.lap("old_logprobs")

        # ---- the PPO update, minibatches over env-steps (reference `PPO_Gaussian.loss`) ----
        agent.train()
        stats = []  # per minibatch: pg_loss, v_loss, approx_kl, clipfrac, bc_loss
        for epoch in range(args.update_epochs):
            perm, kls = torch.randperm(S, device=device), []
            for start in range(0, S - B + 1, B):
                mb = perm[start:start + B]
                new_lp, old = clamp_logprobs(agent.get_logprobs(b_obs[mb], b_act[mb])), clamp_logprobs(old_lp[mb])
                pg_loss, approx_kl, clipfrac = ppo_loss(new_lp, old, b_adv[mb], args.clip_coef)
                v_loss = 0.5 * ((agent.get_value(b_obs[mb]) - b_ret[mb]) ** 2).mean()
                bc_loss = agent.bc_loss(b_obs[mb]) if args.bc_coef > 0 else torch.zeros((), device=device)  # eq. A14
                loss = pg_loss + args.vf_coef * v_loss + args.bc_coef * bc_loss
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                if itr >= args.n_critic_warmup_itr:  # only actor_ft's gradient is clipped, once it steps (reference `run`)
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.actor_ft.parameters(), args.max_grad_norm)
                    actor_opt.step()
                critic_opt.step()
                kls.append(approx_kl)
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), approx_kl, clipfrac, bc_loss.detach()]))
            if args.target_kl is not None and kls and torch.stack(kls).max().item() > args.target_kl:
                break  # checked once per epoch: one host sync (docs/deviations.md)
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac", "bc_loss"), torch.stack(stats).mean(0).tolist()))
        runs.check_finite(f"iteration {itr}", logged, agent.actor_ft, agent.critic)  # stops before saving a broken state
        logged["explained_variance"] = runs.explained_variance(values.flatten(), returns.flatten())
        run.end_iteration(itr, logged, lrs)
        run.history[-1]["std"] = agent.actor_ft(b_obs[:1])[1].mean().item()  # σ, which Run does not log
        run.folder.scalars({"charts/std": run.history[-1]["std"]}, itr)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
