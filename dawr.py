"""DAWR: advantage-weighted regression for a pre-trained diffusion policy (Ren et al., ICLR 2025, §5.1 and its
Fig. 5 comparison, App. D.3 eq. A2, settings App. D.2/D.5 and Table A8).

Off-policy, with a state-value critic. Every iteration appends its chunk-steps to a FIFO buffer of the last
`buffer_size` vector steps (each holds N chunk-steps), recomputes TD(λ) value targets over the whole buffer
with the current critic, regresses V on them, recomputes the targets with the updated critic and fits the
ε-network (one trainable network for all K DDPM steps) to the buffer's chunks by the pre-training
ε-prediction loss weighted by the exponentiated, normalised advantage (reference `AWRDiffusion`,
`agent/finetune/train_awr_diffusion_agent.py` `TrainAWRDiffusionAgent.run` and `td_values`).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20 (10 from scratch) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| γ, λ | `gamma`, `td_lambda` | 0.99, 0.95 |
| α (step of the target towards the λ-return) | `td_alpha` | 0.95 |
| β, w_max | `beta`, `max_weight` | 10, 100 |
| buffer (C vector steps) | `buf[k]`, k in `BUFFER_KEYS` | (C, N, ...): obs, next obs (T_o, D_o), chunk x (T_a, D_a) |
| δ_t = r_t + γ(1 - cut_t) V(s'_t) - V(s_t) | inside `td_lambda_targets` | (C, N) |
| G_t = α δ_t + γλ(1 - end_t) G_{t+1}; target y_t = V(s_t) + G_t | `targets` | (C, N) |
| A_t = y_t - V(s_t), Â = (A - mean)/(std + 1e-6) per batch | `adv`, inside `awr_weights` | (C·N,), (batch,) |
| w = min(exp(β Â), w_max) | inside `awr_weights` | (batch,) |

Updates per iteration (reference): n_batch = int(n_steps·N / batch_size · replay_ratio) actor steps and
n_batch // critic_update_ratio critic steps, each on a batch drawn with replacement from all C·N (step, env)
samples; critic loss = mean((V(s) - y)²) with y fixed during the critic's steps; the actor steps only after
`n_critic_warmup_itr` iterations. Rewards are scaled by `reward_scale` (gym 0.01) before they are stored.

Defaults are the reference configs (`cfg/gym/finetune/hopper-v2/ft_awr_diffusion_mlp.yaml`,
`cfg/robomimic/finetune/{lift,can,square,transport}/ft_awr_diffusion_mlp.yaml`), with γ = 0.99 on every suite:
the reference's `td_values` is called without the config's `gamma`. Avoid (no reference config) takes DPPO's
Avoid run size and the gym config's method settings; furniture is refused. Where the reference config differs
from the paper's Table A8: batch 1000 (Table A8: 256); robomimic critic replay ratio 64/4 = 16 (Table A8: 4);
γ of the TD targets 0.99 on robomimic (Table A8: 0.999); Transport's actor LR constant 1e-5 (Table A8: decayed
to 1e-6) and σ^exp_min 0.1 (Table A8: 0.08). The buffer sizes agree (5000 x 40 gym, 3000 x 50 robomimic).
`--from-scratch` (App. B.2) starts from a random network with `cfg/gym/scratch/hopper-v2/awr_diffusion_mlp.yaml`.

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md ("dawr.py").
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn

from common import runs
from common.envs import make_vec_env
from common.networks import ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import get_task, refuse_pixel_task

HINT = runs.DIFFUSION_PRETRAIN_HINT  # how to make a pre-trained checkpoint, in error messages
METHOD = runs.script_name(__file__)  # saved in the checkpoint: a run of this script resumes only with it
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py)
    checkpoint: str | None = None  # pre-trained (or whole-network fine-tuned) checkpoint (None: the task's built-in one)
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
    gamma: Annotated[float, Fraction] = 0.99  # γ, the discount per chunk-step of the TD(λ) targets (all suites)
    td_lambda: Annotated[float, Fraction] = 0.95  # λ of the TD(λ) targets
    td_alpha: Annotated[float, Fraction] = 0.95  # α: target = V + α·(λ-return - V) (reference `td_values`)
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # σ^exp_min, the sampling std floor
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule (None: actor_lr, constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedules (None: n_train_itr)
    reward_scale: Annotated[float | None, Positive] = None  # factor on the rewards stored in the buffer
    buffer_size: Annotated[int | None, Positive] = None  # C, the FIFO buffer's length in vector steps
    batch_size: Annotated[int | None, Positive] = None  # samples per gradient step (actor and critic)
    replay_ratio: Annotated[int | None, Positive] = None  # actor steps per iteration = int(n_steps·N / batch_size · this)
    critic_update_ratio: Annotated[int, Positive] = 4  # critic steps per iteration = actor steps // critic_update_ratio
    beta: Annotated[float, NonNegative] = 10.0  # β: weight = exp(β · normalised advantage)
    max_weight: Annotated[float, PositiveOrInf] = 100.0  # w_max, the upper clip of the weights (inf: no limit)
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # actor gradient norm clip (None or inf: no limit)
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's fine-tuning configs (paper App. D); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, actor_lr=1e-4, lr_cycle_itr=1000,
                reward_scale=0.01, buffer_size=5000, n_critic_warmup_itr=0, batch_size=1000, replay_ratio=64),
    "robomimic": dict(bootstrap_truncated=True, n_train_itr=151, num_envs=50, n_steps=300, actor_lr=1e-5,
                      lr_cycle_itr=1000, reward_scale=1.0, buffer_size=3000, n_critic_warmup_itr=2, batch_size=1000,
                      replay_ratio=64),
    # no reference config: DPPO's Avoid run size, the gym config's method settings
    "avoid": dict(bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, actor_lr=1e-4, reward_scale=0.01,
                  buffer_size=5000, n_critic_warmup_itr=0, batch_size=1000, replay_ratio=64),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, n_train_itr=201), "transport": dict(n_steps=400, n_train_itr=201),
}
# From scratch (App. B.2): the reference's cfg/gym/scratch/hopper-v2/awr_diffusion_mlp.yaml (K = 10)
SCRATCH_DEFAULTS = {"hopper": dict(SUITE_DEFAULTS["gym"], num_envs=10, n_steps=1000, buffer_size=100000, batch_size=256,
                                   replay_ratio=128, horizon_steps=1, act_steps=1)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise runs.UsageError(f"{task.id}: the reference has no DAWR config for {task.suite} (and Isaac Gym is not "
                              "installable)")
    defaults = (runs.scratch_defaults(SCRATCH_DEFAULTS, task.id, args.checkpoint, HINT.format(task.id)) if args.from_scratch
                else {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {})})
    filled = runs.apply_defaults(args, {"act_steps": task.act_steps, **defaults})
    filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    runs.check_args(args)  # every number within the Limits of its field
    n_batch = int(args.n_steps * args.num_envs / args.batch_size * args.replay_ratio)  # actor steps per iteration
    if not args.eval_only:
        runs.check_gradient_steps(n_batch, args.n_steps, args.num_envs, args.batch_size, args.replay_ratio)
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
        if n_batch // args.critic_update_ratio < 1:
            raise runs.UsageError(f"no critic step per iteration: {n_batch} actor steps / --critic-update-ratio "
                                  f"{args.critic_update_ratio} < 1; lower --critic-update-ratio")
    return filled

def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`), float64 as the
    reference evaluates it; callers cast to float32 as the reference returns it."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


class DiffusionPolicy(nn.Module):
    """One trainable ε-network for all K DDPM steps: sampling (reference `RWRDiffusion.forward`) and the
    forward noising of the ε-prediction loss (`DiffusionModel.q_sample`)."""

    def __init__(self, network: nn.Module, denoising_steps: int, horizon_steps: int, action_dim: int,
                 min_sampling_std: float, randn_clip: float) -> None:
        super().__init__()
        self.network = network
        self.K, self.horizon_steps, self.action_dim = denoising_steps, horizon_steps, action_dim
        self.min_sampling_std, self.randn_clip = min_sampling_std, randn_clip
        # float32 from float32 β in the reference's operation order (model/diffusion/diffusion.py, DiffusionModel.__init__)
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        logvar = torch.log(torch.clamp(betas * (1.0 - ac_prev) / (1.0 - ac), min=1e-20))
        coefs = dict(sqrt_ac=torch.sqrt(ac), sqrt_1m_ac=torch.sqrt(1.0 - ac), sqrt_recip_ac=torch.sqrt(1.0 / ac),
                     sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1), c1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
                     c2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac), std=torch.exp(0.5 * logvar))
        for name, value in coefs.items():  # indexed by the denoising step t
            self.register_buffer(name, value, persistent=False)

    @torch.no_grad()
    def get_action(self, cond: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Sample a chunk x_0 (B, T_a, D_a), t = K-1 ... 0. Training std = max(σ_t, σ^exp_min) at every step;
        deterministic: max(σ_t, 1e-3), none at t = 0 (reference `RWRDiffusion.forward`)."""
        B = cond.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=cond.device)
        for t in range(self.K - 1, -1, -1):
            t_b = torch.full((B,), t, device=cond.device)
            eps = self.network(x, t_b, cond)
            x0 = (self.sqrt_recip_ac[t] * x - self.sqrt_recipm1_ac[t] * eps).clamp(-1, 1)
            mean = self.c1[t] * x0 + self.c2[t] * x
            if deterministic:
                std = 0.0 if t == 0 else self.std[t].clamp(min=1e-3)
            else:
                std = self.std[t].clamp(min=self.min_sampling_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
        return x

    def weighted_loss(self, x0: torch.Tensor, cond: torch.Tensor, weights: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """mean_b w_b · mean_(T_a, D_a) (ε_θ(√ᾱ_t x0 + √(1-ᾱ_t) ε, t, obs) - ε)² (reference `RWRDiffusion.p_losses`)."""
        v = lambda buf: buf[t].view(-1, 1, 1)  # noqa: E731
        x_t = v(self.sqrt_ac) * x0 + v(self.sqrt_1m_ac) * noise
        per_sample = ((self.network(x_t, t, cond) - noise) ** 2).mean(dim=(1, 2))
        return (per_sample * weights).mean()

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`weighted_loss` at t ~ U{0..K-1}, ε ~ N(0, I) drawn per sample (reference `DiffusionModel.loss`)."""
        t = torch.randint(0, self.K, (x0.shape[0],), device=x0.device)
        return self.weighted_loss(x0, cond, weights, t, torch.randn_like(x0))


def td_lambda_targets(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, cut: torch.Tensor,
                      ends: torch.Tensor, gamma: float, lam: float, alpha: float) -> torch.Tensor:
    """TD(λ) targets over a buffer in time order, (T, N) each (reference `train_awr_diffusion_agent.py` `td_values`):
    δ_t = r_t + γ(1 - cut_t) V(s'_t) - V(s_t); G_t = α δ_t + γλ(1 - end_t) G_{t+1} (G_T = 0); y_t = V(s_t) + G_t.

    s'_t is the observation after chunk-step t (the true final one where an episode ended); `cut` removes the
    bootstrap (terminations), `ends` stops the recursion (every episode end, and the step before a reset)."""
    delta = rewards + gamma * (1 - cut) * next_values - values
    g = torch.zeros_like(values)
    last = torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        last = alpha * delta[t] + gamma * lam * (1 - ends[t]) * last
        g[t] = last
    return values + g


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(β Â), w_max), Â = (A - mean)/(std + 1e-6) within the batch (reference `TrainAWRDiffusionAgent.run`)."""
    return torch.exp(beta * (adv - adv.mean()) / (adv.std() + 1e-6)).clamp(max=max_weight)


RESUME_KEYS = ("itr", "env_steps", "optimizers", "schedulers", "rng", "args", "actor", "critic", "method", "buffer",
               "buffer_ptr", "buffer_count")
BUFFER_KEYS = ("obs", "next_obs", "x", "reward", "cut", "end")



def main(args: Args) -> dict:
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, "diffusion", HINT.format(args.env_id), keys=RESUME_KEYS, method=METHOD)
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
    args.horizon_steps = args.horizon_steps or ckpt["horizon_steps"]
    T_o, T_a, T_e, N, C = ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs, args.buffer_size
    if T_e > T_a:
        raise runs.UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {T_a}")
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    network = build_diffusion_network(ckpt, T_a)
    runs.load_weights(network, runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or an actor
    agent = DiffusionPolicy(network, ckpt["denoising_steps"], T_a, task.action_dim, args.min_sampling_denoising_std,
                            args.randn_clip_value).to(device)
    critic = ObsCritic(task.obs_dim, T_o, mlp_dims=(256,) * 3).to(device)  # Mish, residual
    if "critic" in ckpt and resume is not None:
        runs.load_weights(critic, ckpt["critic"], ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent, critic))  # on/off: args.json

    policy = lambda cond, deterministic: agent.get_action(cond, deterministic)  # noqa: E731 (evaluation)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW without weight decay and the reference's cosine schedules (constant in every config)
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.network, args.actor_lr, args.actor_lr_min,
                                                          args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(critic, args.critic_lr, args.critic_lr, args.lr_cycle_itr,
                                                            args.lr_warmup_itr)
    saved = {"method": METHOD, "buffer": {}, "buffer_ptr": 0, "buffer_count": 0}  # the checkpoint's buffer: set below
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": T_a}, {"actor": agent.network, "critic": critic},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched}, saved)

    # FIFO buffer of the last C vector steps, preallocated on the device; `ptr` is the next row to write
    buf = dict(obs=torch.zeros(C, N, T_o, task.obs_dim), next_obs=torch.zeros(C, N, T_o, task.obs_dim),
               x=torch.zeros(C, N, T_a, task.action_dim), reward=torch.zeros(C, N), cut=torch.zeros(C, N),
               end=torch.zeros(C, N))
    buf = {k: v.to(device) for k, v in buf.items()}
    ptr, count = 0, 0
    if resume is not None:
        ptr, count = resume["buffer_ptr"], resume["buffer_count"]
        for k in BUFFER_KEYS:
            buf[k][:count] = resume["buffer"][k].to(device)
    n_batch = int(args.n_steps * N / args.batch_size * args.replay_ratio)  # actor steps per iteration (reference)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731

    def targets_and_values() -> tuple[torch.Tensor, torch.Tensor]:
        """TD(λ) targets and V(s) of the filled buffer with the current critic, both (count·N,) in buffer order."""
        with torch.no_grad():
            def value(o: torch.Tensor) -> torch.Tensor:
                flat = o[:count].flatten(0, 1)
                return torch.cat([critic(c) for c in flat.split(50_000)]).view(count, N)
            values, next_values = value(buf["obs"]), value(buf["next_obs"])
            oldest = ptr if count == C else 0  # buffer row of the oldest step
            order = (torch.arange(count, device=device) + oldest) % count  # rows in time order
            y = td_lambda_targets(buf["reward"][order], values[order], next_values[order], buf["cut"][order],
                                  buf["end"][order], args.gamma, args.td_lambda, args.td_alpha)
            targets = y[(torch.arange(count, device=device) - oldest) % count]  # back to buffer rows (a gather)
        return targets.flatten(), values.flatten()

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `run`)
            actor_sched.step()  # the reference steps both schedules every iteration
            critic_sched.step()
            continue

        # ---- rollout into the FIFO buffer ----
        if run.need_reset or task.reset_every_iteration:
            obs = run.reset_envs(itr)
            if count > 0:  # the buffer's newest step is not followed by the next one: cut the λ-recursion there
                buf["end"][(ptr - 1) % C] = 1
        agent.eval()
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond)
            run.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, reward, term, trunc, info = envs.step(action)
            done = term | trunc
            buf["obs"][ptr], buf["x"][ptr] = cond, x
            buf["next_obs"][ptr] = normalizer.normalize_obs(as_t(info["final_obs"]))
            buf["reward"][ptr] = as_t(reward) * args.reward_scale
            buf["cut"][ptr] = as_t(term if args.bootstrap_truncated else done)
            buf["end"][ptr] = as_t(done)
            ptr, count = (ptr + 1) % C, min(count + 1, C)
            run.step(reward, done)
        run.end_rollout(itr)

        # ---- critic: regression on TD(λ) targets of the whole buffer (fixed during these steps) ----
        targets, _ = targets_and_values()
        b_obs, b_x = buf["obs"][:count].flatten(0, 1), buf["x"][:count].flatten(0, 1)
        run.lap("targets")
        critic_losses, actor_losses = [], []
        for _ in range(n_batch // args.critic_update_ratio):
            idx = torch.randint(count * N, (args.batch_size,), device=device)  # over all (step, env) samples
            critic_loss = ((critic(b_obs[idx]) - targets[idx]) ** 2).mean()
            critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            critic_opt.step()
            critic_losses.append(critic_loss.detach())
        run.lap("critic")

        # ---- actor: advantage-weighted ε-prediction regression (App. D.3 eq. A2) ----
        targets, values = targets_and_values()  # with the updated critic, as the reference
        adv = targets - values
        run.lap("targets")
        if itr >= args.n_critic_warmup_itr:
            agent.train()
            for _ in range(n_batch):
                idx = torch.randint(count * N, (args.batch_size,), device=device)
                loss = agent.loss(b_x[idx], b_obs[idx], awr_weights(adv[idx], args.beta, args.max_weight))
                actor_opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(agent.network.parameters(), args.max_grad_norm)
                actor_opt.step()
                actor_losses.append(loss.detach())
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        actor_sched.step()  # the reference steps both schedules every iteration, critic warm-up included
        critic_sched.step()
        run.lap("actor")

        # ---- logging and the checkpoint (with the buffer), once per iteration ----
        stats = {"critic_loss": torch.stack(critic_losses).mean() if critic_losses else None,
                 "actor_loss": torch.stack(actor_losses).mean() if actor_losses else None,
                 "advantage_mean": adv.mean(), "advantage_std": adv.std(), "value_mean": values.mean()}
        stats = {k: v for k, v in stats.items() if v is not None}
        logged = dict(zip(stats, torch.stack(list(stats.values())).tolist()))
        runs.check_finite(f"iteration {itr}", logged, agent.network, critic)
        logged["buffer_steps"] = count
        saved.update(buffer={k: buf[k][:count] for k in BUFFER_KEYS}, buffer_ptr=ptr, buffer_count=count)
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
