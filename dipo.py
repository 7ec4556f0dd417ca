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
| K | `denoising_steps` (from the checkpoint) | 20 (10 from scratch); all K steps run the one trainable network |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| a (buffer) | `buf["action"]` | (buffer_size, T_a, D_a), normalised; the first T_e were executed |
| s, s' | `buf["obs"]`, `buf["next_obs"]` | (buffer_size, T_o, D_o), normalised; s' = final obs at an end |
| r, cut | `buf["reward"]`, `buf["cut"]` | (buffer_size,); r × `reward_scale`; cut: no bootstrap (terminated) |
| Q1, Q2 | `agent.critic` | (obs, a^{1:T_e}) -> (B,), (B,) |
| Q̄, π̄ | `agent.critic_target`, `agent.actor_target` | EMA, τ = `target_ema_rate` |
| η_a, M | `action_lr`, `action_gradient_steps` | 1e-4, 10 |
| replay ratio | `replay_ratio` | updates per iteration = n_steps·N / batch_size × replay_ratio |

Defaults: the reference's configs (`cfg/{gym,robomimic}/finetune/*/ft_dipo_diffusion_mlp.yaml`); Avoid has none
and takes DPPO's Avoid run size with the gym config's DIPO settings. `--from-scratch` (App. B.2) starts from a random
network with `cfg/gym/scratch/hopper-v2/dipo_diffusion_mlp.yaml` (SCRATCH_DEFAULTS).
Deviations from the reference implementation (irom-princeton/dppo) and from Table A8: docs/deviations.md.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn

from common import runs
from common.envs import make_vec_env
from common.networks import DoubleQCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import get_task, refuse_pixel_task

HINT = runs.DIFFUSION_PRETRAIN_HINT  # how to make a pre-trained checkpoint, in error messages
METHOD = runs.script_name(__file__)  # saved in the checkpoint: a run resumes only with its own script
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION
# the actor's scheduler steps from iteration 0 (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


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
    horizon_steps: Annotated[int | None, Positive] = None  # T_a of fine-tuning (None: the checkpoint's; a UNet's may differ)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    bootstrap_truncated: bool | None = None  # bootstrap time limits from Q(final obs); False: the horizon ends the task
    reward_scale: Annotated[float | None, Positive] = None  # rewards are multiplied by this before they enter the buffer
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # σ^exp_min, the sampling std floor
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    buffer_size: Annotated[int, Positive] = 1_000_000  # replay buffer capacity in transitions (chunk-steps)
    batch_size: Annotated[int | None, Positive] = None  # transitions per critic / actor update
    replay_ratio: Annotated[int | None, Positive] = None  # updates per iteration = n_steps·N / batch_size × this
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations in which only the critic learns
    target_ema_rate: Annotated[float, runs.RATE] = 0.005  # τ of the EMA target critic and actor, in (0, 1]
    action_lr: Annotated[float, Positive] = 1e-4  # η_a, Adam learning rate of the action gradient
    action_gradient_steps: Annotated[int, Positive] = 10  # M, Adam steps of the action gradient per update
    action_grad_norm_coef: Annotated[float, Positive] = 0.1  # the action gradient's norm is capped at this × T_e × D_a
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient norm clip of the actor (None or inf: no limit)
    critic_residual: bool = False  # residual Q-critic trunk (the reference's runs as a plain MLP: docs/deviations.md)
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's DIPO fine-tuning configs (paper App. D.3, D.9); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4,
                replay_ratio=64, n_critic_warmup_itr=5, reward_scale=0.01, batch_size=1000),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=300, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-5,
                      replay_ratio=16, n_critic_warmup_itr=2, reward_scale=1.0, batch_size=1000),
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-4,
                  replay_ratio=64, n_critic_warmup_itr=5, reward_scale=0.01, batch_size=1000),
}
TASK_DEFAULTS = {"lift": dict(n_critic_warmup_itr=5), "square": dict(n_steps=400),
                 "transport": dict(n_steps=400, n_train_itr=201)}
# From scratch (App. B.2): the reference's cfg/gym/scratch/hopper-v2/dipo_diffusion_mlp.yaml (K = 10)
SCRATCH_DEFAULTS = {"hopper": dict(SUITE_DEFAULTS["gym"], num_envs=10, n_steps=1000, replay_ratio=128, n_critic_warmup_itr=0,
                                   batch_size=256, horizon_steps=1, act_steps=1)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise runs.UsageError(f"{METHOD}.py has no {task.suite} setup (the reference has no DIPO config for it)")
    defaults = (runs.scratch_defaults(SCRATCH_DEFAULTS, task.id, args.checkpoint, HINT.format(task.id)) if args.from_scratch
                else {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {})})
    filled = runs.apply_defaults(args, {"act_steps": task.act_steps, **defaults})
    filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    runs.check_args(args)  # every number within the Limits of its field
    if not args.eval_only:
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    return filled


def fill_from_checkpoint(args: Args, ckpt: dict) -> int:
    """T_a from the checkpoint unless given; the chunk and the update count checked. Returns the updates per iteration."""
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    if args.act_steps > args.horizon_steps:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the chunk T_a = {args.horizon_steps}")
    n_updates = int(args.n_steps * args.num_envs / args.batch_size * args.replay_ratio)  # `TrainDIPODiffusionAgent.run`
    if not args.eval_only:
        runs.check_gradient_steps(n_updates, args.n_steps, args.num_envs, args.batch_size, args.replay_ratio)
    return n_updates


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



class ReplayBuffer:
    """Executed transitions in preallocated tensors on the training device, filled as a ring and sampled uniformly
    (the reference: deques copied to numpy once per iteration). `buf[key]`: one field's storage, rows [0, size) filled.
    Saved with every checkpoint (`state_dict`: the filled rows and the write pointer), so a run resumes with its data."""

    def __init__(self, capacity: int, T_o: int, D_o: int, T_a: int, D_a: int, device: torch.device) -> None:
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.data = {"obs": torch.zeros(capacity, T_o, D_o, device=device),
                     "next_obs": torch.zeros(capacity, T_o, D_o, device=device),
                     "action": torch.zeros(capacity, T_a, D_a, device=device), "reward": torch.zeros(capacity, device=device),
                     "cut": torch.zeros(capacity, device=device)}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def add(self, **rows: torch.Tensor) -> None:
        """One row per env of one chunk-step, at the write pointer."""
        n = rows["reward"].shape[0]
        idx = (self.ptr + torch.arange(n, device=rows["reward"].device)) % self.capacity
        for key, value in rows.items():
            self.data[key][idx] = value
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def megabytes(self) -> float:
        return sum(v.numel() * v.element_size() for v in self.data.values()) / 2**20

    def state_dict(self) -> dict:
        return {**{k: v[:self.size] for k, v in self.data.items()}, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:  # the filled part, in ring order
        self.ptr, self.size = int(state["ptr"]), int(state["reward"].shape[0])
        for k, v in self.data.items():
            v[:self.size] = state[k].to(v.device)


def main(args: Args) -> dict:
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, "diffusion", HINT.format(args.env_id), method=METHOD,
                                    keys=("itr", "env_steps", "optimizers", "schedulers", "rng", "args"))
    if resume is not None and "buffer_ptr" in resume:  # written before the pointer moved into the buffer (2026-12-06)
        resume["buffer"]["ptr"] = resume.pop("buffer_ptr")
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
    T_o, T_a, T_e, N, B = ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs, args.batch_size
    D_a = task.action_dim
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    actor = build_diffusion_network(ckpt, T_a)
    runs.load_weights(actor, runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)  # `actor`: the acting (target) one
    critic = DoubleQCritic(task.obs_dim, D_a, T_e, T_o, residual=args.critic_residual)
    diffusion = Diffusion(ckpt["denoising_steps"], T_a, D_a, args.min_sampling_denoising_std, args.randn_clip_value)
    agent = DiffusionDIPO(actor, critic, diffusion).to(device)
    if resume is not None:
        runs.load_weights(agent.actor, resume["actor_online"], ckpt_path)
        for name in ("critic", "critic_target"):
            runs.load_weights(getattr(agent, name), resume[name], ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json

    run = runs.Run(args, envs, task, normalizer, agent.get_action, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW without weight decay and the reference's cosine schedules (constant in every config)
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.actor, args.actor_lr, args.actor_lr_min,
                                                          args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr,
                                                            args.lr_cycle_itr, args.lr_warmup_itr)
    buf = ReplayBuffer(args.buffer_size, T_o, task.obs_dim, T_a, D_a, device)
    print(f"replay buffer: {args.buffer_size} transitions, {buf.megabytes():.1f} MB on {device}")
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": T_a},
              {"actor": agent.actor_target, "actor_online": agent.actor, "critic": agent.critic,
               "critic_target": agent.critic_target},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched},
              {"method": METHOD, "buffer": buf})
    max_norm = args.action_grad_norm_coef * T_e * D_a  # reference: 0.1 · D_a · T_e

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainDIPODiffusionAgent`)
            actor_sched.step()  # both schedules step every iteration, as the reference's DIPO agent
            critic_sched.step()
            continue

        # ---- rollout: executed chunks into the replay buffer ----
        if run.need_reset or task.reset_every_iteration:
            obs = run.reset_envs(itr)
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond)
            run.lap("sampling")
            obs, reward, term, trunc, info = envs.step(normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy())
            done = term | trunc
            buf.add(obs=cond, action=x,  # s' = the final observation where an episode ended
                    next_obs=normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device)),
                    reward=torch.as_tensor(reward * args.reward_scale, dtype=torch.float32, device=device),
                    cut=torch.as_tensor(term if args.bootstrap_truncated else done, dtype=torch.float32, device=device))
            run.step(reward, done)
        run.end_rollout(itr)

        # ---- updates: critic (eq. A6), action gradient written back (eq. A4), actor ε-MSE (eq. A5) ----
        stats = {k: [] for k in ("critic_loss", "actor_loss", "q_mean", "action_shift")}
        for _ in range(n_updates):
            i = torch.randint(buf.size, (B,), device=device)
            with torch.no_grad():
                next_action = agent.get_action(buf["next_obs"][i])[:, :T_e]
            loss_c = critic_loss(agent.critic, agent.critic_target, buf["obs"][i], buf["action"][i, :T_e], buf["reward"][i],
                                 buf["next_obs"][i], next_action, buf["cut"][i], args.gamma)
            critic_opt.zero_grad(set_to_none=True)
            loss_c.backward()
            critic_opt.step()
            stats["critic_loss"].append(loss_c.detach())
            if itr >= args.n_critic_warmup_itr:
                j = torch.randint(buf.size, (B,), device=device)  # a second batch, as the reference
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
                    stats["actor_loss"].append(loss_a.detach())
                    stats["q_mean"].append(torch.min(*agent.critic(o, guided)).mean())
                    stats["action_shift"].append((guided - a[:, :T_e]).abs().mean())
            ema_update(agent.critic_target, agent.critic, args.target_ema_rate)
            ema_update(agent.actor_target, agent.actor, args.target_ema_rate)
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        actor_sched.step()  # both schedules step every iteration, as the reference's DIPO agent
        critic_sched.step()
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = {k: torch.stack(v).mean().item() for k, v in stats.items() if v}
        runs.check_finite(f"iteration {itr}", logged, agent)  # stops before saving a broken state
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
