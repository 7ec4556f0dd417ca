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
| K | `denoising_steps` (from the checkpoint) | 20 (10 from scratch) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | T_a = T_e (the actor is fit on executed chunks) |
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
`model/diffusion/diffusion_idql.py` `IDQLDiffusion`). Defaults: the reference's configs (buffer 25 000
vector steps × n_envs, replay ratio 128; Table A8: 2e5, 16); Avoid, which has none, takes DPPO's Avoid run size
with the gym config's IDQL settings (one iteration's 1250 chunk-steps hold a batch of 1000: 160 updates).
`--from-scratch` (App. B.2) starts from a random network with `cfg/gym/scratch/hopper-v2/idql_diffusion_mlp.yaml`.

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md ("idql.py").
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import runs
from common.envs import make_vec_env
from common.networks import DoubleQCritic, ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import get_task, refuse_pixel_task

HINT = runs.DIFFUSION_PRETRAIN_HINT  # how to make a pre-trained checkpoint, in error messages
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION
METHOD = "idql"  # saved in the checkpoint: a resumed run must be one of this script's


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py)
    checkpoint: str | None = None  # pre-trained (or fine-tuned) checkpoint (None: the task's built-in one, else the paper's)
    from_scratch: bool = False  # a random ε-network instead, K = 10 (App. B.2; SCRATCH_DEFAULTS): no checkpoint
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
    horizon_steps: Annotated[int | None, Positive] = None  # T_a, must equal T_e (None: the checkpoint's, a UNet's T_e)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk (None: the task's)
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # the sampling std floor (training)
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # learning rate of Q and V (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    buffer_size: Annotated[int | None, Positive] = None  # replay buffer in vector steps (x num_envs transitions)
    batch_size: Annotated[int | None, Positive] = None  # transitions per update
    replay_ratio: Annotated[int, Positive] = 128  # updates per iteration = n_steps·num_envs/batch_size × replay_ratio
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    critic_tau: Annotated[float, runs.RATE] = 0.001  # EMA rate of the target Q-networks
    expectile: Annotated[float, Fraction] = 0.8  # expectile τ of the V regression
    num_sample: Annotated[int | None, Positive] = None  # candidate chunks per action
    sample_weight: Annotated[float, Fraction] = 0.7  # training: candidate weight where Q - V > 0 (1 - it elsewhere)
    use_expectile_exploration: bool = True  # training draws candidates by the Q - V weights; False: argmax Q
    scale_reward_factor: Annotated[float | None, NonNegative] = None  # rewards stored × this
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # actor gradient norm clip (None or inf: no limit)
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's IDQL configs (cfg/gym/finetune/hopper-v2/ft_idql_diffusion_mlp.yaml, cfg/robomimic/finetune/*/);
# Avoid: DPPO's Avoid run size with the gym config's IDQL settings. An explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4,
                buffer_size=25000, num_sample=20, scale_reward_factor=0.01, batch_size=1000, n_critic_warmup_itr=5),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-5,
                      buffer_size=5000, num_sample=10, scale_reward_factor=1.0, batch_size=1000, n_critic_warmup_itr=5),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-4,
                  buffer_size=25000, num_sample=20, scale_reward_factor=0.01, batch_size=1000, n_critic_warmup_itr=5),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, n_train_itr=201), "transport": dict(n_steps=400, n_train_itr=201),
}
# From scratch (App. B.2): the reference's cfg/gym/scratch/hopper-v2/idql_diffusion_mlp.yaml (K = 10)
SCRATCH_DEFAULTS = {"hopper": dict(SUITE_DEFAULTS["gym"], num_envs=10, n_steps=1000, buffer_size=100000, num_sample=10,
                                   batch_size=256, n_critic_warmup_itr=0, horizon_steps=1, act_steps=1)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise runs.UsageError(f"{runs.script_name(__file__)}.py has no {task.suite} settings "
                              "(the reference has no IDQL config there)")
    defaults = (runs.scratch_defaults(SCRATCH_DEFAULTS, task.id, args.checkpoint, HINT.format(task.id)) if args.from_scratch
                else {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {})})
    filled = runs.apply_defaults(args, {"act_steps": task.act_steps, **defaults})
    filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    runs.check_args(args)  # every number within the Limits of its field
    if not args.eval_only:
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    return filled


def fill_from_checkpoint(args: Args, ckpt: dict) -> int:
    """T_a from the checkpoint unless given (a UNet's: T_e), checked against T_e; the batch against the buffer and the
    update count. Returns the updates per iteration."""
    T_e = args.act_steps
    args.horizon_steps = args.horizon_steps or (T_e if ckpt["backbone"] == "unet" else ckpt["horizon_steps"])
    if args.horizon_steps != T_e:  # the actor is fit on the executed chunks the buffer holds (reference)
        raise runs.UsageError(f"IDQL fits the actor on the executed chunks, so T_a must equal T_e: --horizon-steps "
                              f"{args.horizon_steps} vs --act-steps {T_e} (an MLP checkpoint fixes T_a; a UNet takes any)")
    if not args.eval_only and args.batch_size > args.buffer_size * args.num_envs:
        raise runs.UsageError(f"--batch-size {args.batch_size} exceeds the buffer's {args.buffer_size * args.num_envs} "
                              "transitions")
    n_updates = int(args.n_steps * args.num_envs / args.batch_size * args.replay_ratio)  # reference `num_batch`
    if not args.eval_only:
        runs.check_gradient_steps(n_updates, args.n_steps, args.num_envs, args.batch_size, args.replay_ratio)
    return n_updates


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


def step_lr_schedules(schedulers: dict, itr: int, n_critic_warmup_itr: int) -> None:
    """Once per iteration, evaluation iterations included; the actor's only once it steps, after the critic warm-up
    (reference `agent/finetune/train_ppo_diffusion_agent.py`, `TrainPPODiffusionAgent.run`); the critics' every time."""
    for name, sched in schedulers.items():
        if name != "actor" or itr >= n_critic_warmup_itr:
            sched.step()


def main(args: Args) -> dict:
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, "diffusion", HINT.format(args.env_id),
                                    keys=("itr", "env_steps", "optimizers", "schedulers", "rng", "args"), method=METHOD)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    if resume is None:
        runs.print_defaults(task.id, filled)
    if args.from_scratch:  # App. B.2: a random ε-network, K = 10 (or the resumed run's)
        ckpt, ckpt_path = runs.open_scratch(resume, args.resume, task, args.horizon_steps, 10, args.seed)
    else:
        args.checkpoint = runs.diffusion_checkpoint_path(args.checkpoint, task.id)
        ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, "diffusion", HINT.format(task.id), task,
                                          conversion=lambda: importlib.import_module("loaders.convert"))
    n_updates = fill_from_checkpoint(args, ckpt)
    T_o, T_e, N, D_o, D_a = ckpt["cond_steps"], args.act_steps, args.num_envs, task.obs_dim, task.action_dim
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, args.horizon_steps)
    runs.load_weights(actor, runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or fine-tuned
    # reference `CriticObsAct` (its `residual_tyle` typo keeps Q a plain MLP) and `CriticObs` (residual), [256] x 3 Mish
    critic_q = DoubleQCritic(D_o, D_a, T_e, T_o, mlp_dims=(256,) * 3, activation="mish", residual=False)
    critic_v = ObsCritic(D_o, T_o, mlp_dims=(256,) * 3, activation="mish", residual=True)
    agent = IDQLDiffusion(actor, critic_q, critic_v, ckpt["denoising_steps"], args.horizon_steps, D_a, T_e,
                          args.min_sampling_denoising_std, args.randn_clip_value).to(device)
    if resume is not None:
        for name in ("critic_q", "target_q", "critic_v"):
            runs.load_weights(getattr(agent, name), resume[name], ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json

    def policy(cond: torch.Tensor, deterministic: bool) -> torch.Tensor:  # evaluation: the candidate choice too
        return agent.get_action(cond, deterministic, args.num_sample, args.sample_weight, args.use_expectile_exploration)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    optimizers, schedulers = {}, {}  # AdamW without weight decay, the reference's cosine schedules (constant by default)
    for name, module, lr, lr_min in (("actor", agent.actor, args.actor_lr, args.actor_lr_min),
                                     ("critic_q", agent.critic_q, args.critic_lr, args.critic_lr),
                                     ("critic_v", agent.critic_v, args.critic_lr, args.critic_lr)):
        optimizers[name], schedulers[name] = runs.optimizer_with_schedule(module, lr, lr_min, args.lr_cycle_itr,
                                                                          args.lr_warmup_itr)
    # the whole run's vector steps when fewer than buffer_size (the FIFO never drops anything then)
    capacity = min(args.buffer_size, max(args.n_train_itr * args.n_steps, resume["buffer"]["size"] if resume else 0))
    buffer = ReplayBuffer(capacity, N,
                          dict(obs=(T_o, D_o), next_obs=(T_o, D_o), actions=(T_e, D_a), rewards=(), terminal=()), device)
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": args.horizon_steps},
              {"actor": agent.actor, "critic_q": agent.critic_q, "target_q": agent.target_q, "critic_v": agent.critic_v},
              optimizers, schedulers, {"method": METHOD, "buffer": buffer})  # the buffer: saved, restored on resume

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainIDQLDiffusionAgent.run`)
            step_lr_schedules(schedulers, itr, args.n_critic_warmup_itr)  # as the reference, here too
            continue

        # ---- rollout: executed chunks into the replay buffer ----
        if run.need_reset or task.reset_every_iteration:
            obs = run.reset_envs(itr)
        agent.eval()
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond, False, args.num_sample, args.sample_weight, args.use_expectile_exploration)
            run.lap("sampling")
            obs, reward, term, trunc, info = envs.step(normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy())
            done = term | trunc
            terminal = term if args.bootstrap_truncated else done
            buffer.add(obs=cond, actions=x[:, :T_e],
                       next_obs=normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device)),
                       rewards=torch.as_tensor(reward * args.scale_reward_factor, dtype=torch.float32, device=device),
                       terminal=torch.as_tensor(terminal, dtype=torch.float32, device=device))
            run.step(reward, done)
        run.end_rollout(itr)

        # ---- updates: V (expectile), Q (TD on V), target EMA, actor ε-MSE (reference `run`) ----
        agent.train()
        stats = {k: [] for k in ("v_loss", "q_loss", "actor_loss")}
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
                stats[k].append(v.detach())
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # the LRs of this iteration's update
        step_lr_schedules(schedulers, itr, args.n_critic_warmup_itr)
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats.items() if v}
        runs.check_finite(f"iteration {itr}", logged, agent.actor, agent.critic_q, agent.critic_v)
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
