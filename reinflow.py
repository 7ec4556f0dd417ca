"""ReinFlow: fine-tuning a pre-trained flow-matching policy with PPO through a noisy few-step Euler chain (Zhang et al.,
NeurIPS 2025, arXiv 2505.22094; code ReinFlow/ReinFlow at aed2819, `model/flow/ft_ppo/ppoflow.py` `PPOFlow`,
`agent/finetune/reinflow/train_ppo_flow_agent.py` `TrainPPOFlowAgent`).

A flow policy (flow_pretrain.py) draws x_0 ~ N(0, I) and integrates a velocity field in K Euler steps,
x_{k+1} = x_k + v_θ(x_k, t_k, s)/K. ReinFlow injects Gaussian noise into every step, x_{k+1} ~ N(μ_k, σ_k²) with
μ_k = clamp(x_k + v_θ(x_k, t_k, s)/K, ±1) and σ_k = σ_φ(t_k, s) from a small noise network on the velocity network's
embeddings, so the chain x_0 → … → x_K is a Markov process with an exact Gaussian likelihood (ReinFlow §4). The whole
chain is one PPO action: its log-probability (log N(x_0; 0, I) plus the K transitions) is averaged over the K + 1
terms and the T_a·D_a entries and clamped to [logprob_min, logprob_max]; the advantage is the env-step's (GAE). The
noise network is trained with the velocity network and pushed up by an entropy bonus; its output is squashed into
[σ_min, σ_max(itr)], where σ_max(itr) is held, then decays (`noise_decay`, ReinFlow's `learn_decay`).

| ReinFlow | here | shape / value |
|---|---|---|
| K (inference_steps = ft_denoising_steps) | `denoising_steps` (from the checkpoint) | 4 (1–4) |
| t_k | `agent.t` | k/K, k = 0 … K-1 (`PPOFlow.get_logprobs`' grid; docs/deviations.md) |
| v_θ (FlowMLP in NoisyFlowMLP.policy) | `agent.actor_ft` (`common.networks.DiffusionMLP` on float t) | (B, T_a, D_a) |
| σ_φ (ExploreNoiseNet) | `agent.noise_net` on [time embedding (detached), obs embedding] | (B, T_a·D_a), Tanh MLP |
| min_std, max_std | `min_std`, `max_std` | 0.10, 0.24 (gym) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| chain | `chain_buf` | (n_steps, N, K+1, T_a, D_a), normalised actions |
| obs | `obs_buf` | (n_steps, N, T_o, D_o), normalised |

One PPO sample is one env-step; each epoch draws every sample `repeat_samples` times (ReinFlow's `repeat_samples`, ×10)
in random minibatches. The loss (`PPOFlow.loss`): clipped surrogate + vf_coef·value loss − ent_coef·entropy, one
backward; the entropy is the chain's Gaussian entropy averaged as the log-prob. Deterministic evaluation is the
noise-free Euler chain. Where ReinFlow has no config for a task (Avoid, furniture, lift/can/square in state form),
SUITE_DEFAULTS takes the nearest one (see there). Deviations from ReinFlow: docs/deviations.md ("reinflow.py").
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

from common import runs
from common.envs import make_vec_env
from common.networks import MLP, ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import Task, get_task, refuse_pixel_task

HINT = "python flow_pretrain.py --env-id {}"  # how to make a pre-trained flow checkpoint, in error messages
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py)
    checkpoint: str | None = None  # pre-trained (or fine-tuned) flow checkpoint (None: flow_pretrain.py's default output)
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
    denoising_steps: Annotated[int | None, Positive] = None  # K Euler steps of the chain (None: the checkpoint's)
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk
    gamma: Annotated[float | None, Fraction] = None  # γ_env, the discount per chunk-step
    gae_lambda: Annotated[float, Fraction] = 0.95  # GAE λ
    bootstrap_truncated: bool | None = None  # bootstrap time limits from V(final obs); False: the horizon ends the task
    min_std: Annotated[float | None, Positive] = None  # σ_min, the lower bound of the injected noise's std
    max_std: Annotated[float | None, Positive] = None  # σ_max, its upper bound (at the start, with --noise-decay)
    noise_decay: bool | None = None  # learn_decay: σ_max held, then a cosine down to (1-r)·σ_min + r·σ_max
    noise_hold_ratio: Annotated[float, Fraction] = 0.35  # the fraction of n_train_itr σ_max is held
    noise_decay_ratio: Annotated[float, Fraction] = 0.7  # r above (ReinFlow's max_noise_decay_ratio)
    noise_hidden_dims: Annotated[tuple[int, ...] | None, Positive] = None  # hidden widths of the noise network
    logprob_min: float = -1.0  # the chain's (averaged) log-prob is clamped to [logprob_min, logprob_max]
    logprob_max: float = 1.0  # (ReinFlow's logprob_min / logprob_max)
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this (in stds)
    denoised_clip_value: Annotated[float, Positive] = 1.0  # each Euler step's mean is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # learning rate of the velocity and noise networks
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the actor's cosine schedule
    critic_lr: Annotated[float | None, Positive] = None  # critic learning rate
    critic_lr_min: Annotated[float | None, Positive] = None  # end of the critic's cosine schedule
    critic_weight_decay: Annotated[float | None, NonNegative] = None  # AdamW weight decay of the critic
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedules, from the *_lr_min up to the lr
    lr_cycle_itr: Annotated[int, Positive] = 100  # cycle of the cosine schedules (they restart after it)
    batch_size: Annotated[int | None, Positive] = None  # PPO minibatch of env-steps
    repeat_samples: Annotated[int | None, Positive] = None  # times each env-step is drawn per epoch (1: once)
    update_epochs: Annotated[int | None, Positive] = None  # PPO epochs per iteration
    clip_coef: Annotated[float, Positive] = 0.01  # PPO clip ε
    vf_coef: Annotated[float, NonNegative] = 0.5  # value loss coefficient
    ent_coef: Annotated[float | None, NonNegative] = None  # entropy bonus of the chain
    target_kl: Annotated[float | None, PositiveOrInf] = None  # stop the update past this minibatch approx KL (inf: no limit)
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient-norm clip of actor and critic (inf: no limit)
    n_critic_warmup_itr: Annotated[int | None, NonNegative] = None  # iterations before the actor starts to step
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    reward_scale_running: bool = True  # running reward scaling
    terminate_on_success: bool = False  # robomimic: end episodes on success
    # speed (opt-in, same results up to float rounding)
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# ReinFlow's configs (cfg/gym/finetune/hopper-v2/ft_ppo_reflow_mlp.yaml, its siblings); an explicit flag always wins.
GYM = dict(bootstrap_truncated=True, n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, n_critic_warmup_itr=0,
           min_std=0.10, max_std=0.24, noise_decay=True, noise_hidden_dims=(64, 64), actor_lr=4.5e-5, actor_lr_min=2e-5,
           critic_lr=6.5e-4, critic_lr_min=3e-4, critic_weight_decay=1e-5, batch_size=50000, repeat_samples=10,
           update_epochs=5, ent_coef=0.03, target_kl=1.0)
# robomimic: cfg/robomimic/finetune/transport/ft_ppo_reflow_mlp.yaml (the only state config; lift/can/square take it
# with DPPO's run sizes, TASK_DEFAULTS)
ROBOMIMIC = dict(GYM, n_train_itr=201, num_envs=50, n_steps=400, gamma=0.999, n_critic_warmup_itr=2, min_std=0.08,
                 max_std=0.14, noise_hidden_dims=(128, 128), batch_size=10000, ent_coef=0.01, target_kl=0.01)
SUITE_DEFAULTS = {
    "gym": GYM,
    # cfg/gym/finetune/kitchen-complete-v0/ft_ppo_reflow_mlp.yaml: a learned std in a constant range ("learn")
    "kitchen": dict(GYM, n_train_itr=301, n_steps=70, batch_size=5600, update_epochs=10, target_kl=0.01, noise_decay=False),
    "robomimic": ROBOMIMIC,
    # no ReinFlow config: DPPO's furniture run size (dppo_finetune.py) with ReinFlow's robomimic method settings
    "furniture": dict(ROBOMIMIC, bootstrap_truncated=False, n_train_itr=1000, num_envs=1000, n_steps=125,
                      n_critic_warmup_itr=1, batch_size=62500),
    # no ReinFlow config: DPPO's Avoid run size (dppo_finetune.py: 51 itr, 50 envs x 25 chunk-steps, one critic warm-up
    # iteration, no bootstrap at the limit) with ReinFlow's gym method settings, 4 minibatches per epoch as hopper's
    "avoid": dict(GYM, bootstrap_truncated=False, n_train_itr=51, num_envs=50, n_steps=25, n_critic_warmup_itr=1,
                  batch_size=3125)}
TASK_DEFAULTS = {
    "walker2d": dict(n_critic_warmup_itr=5, actor_lr=4e-4, actor_lr_min=4e-4, critic_lr=4e-3, critic_lr_min=4e-3),
    "halfcheetah": dict(n_critic_warmup_itr=10, actor_lr=3e-5, actor_lr_min=1.5e-5, critic_lr=3e-4, critic_lr_min=1.5e-4,
                        critic_weight_decay=1e-4),
    "lift": dict(n_train_itr=81, n_steps=300), "can": dict(n_train_itr=151, n_steps=300), "square": dict(n_steps=400),
    "one-leg-low": dict(n_steps=88, batch_size=44000), "one-leg-med": dict(n_steps=88, batch_size=44000)}


def fill_defaults(args: Args) -> tuple[Task, dict]:
    """Fill the task's defaults into every flag left at None and check every number; returns the task and what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)
    args.env_id = task.id
    filled = runs.apply_defaults(args, {"act_steps": task.act_steps, **SUITE_DEFAULTS[task.suite],
                                        **TASK_DEFAULTS.get(task.id, {})})
    runs.check_args(args)  # every number within the Limits of its field
    if args.min_std > args.max_std:
        raise runs.UsageError(f"--min-std {args.min_std} exceeds --max-std {args.max_std}; the noise std lies between them")
    if args.logprob_min >= args.logprob_max:
        raise runs.UsageError(f"--logprob-min {args.logprob_min} must be below --logprob-max {args.logprob_max}")
    if not args.eval_only:  # the actor steps at least once; a minibatch fits in an iteration's repeated samples
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
        if args.batch_size > args.n_steps * args.num_envs * args.repeat_samples:
            raise runs.UsageError(f"--batch-size {args.batch_size} exceeds the {args.n_steps * args.num_envs} env-steps "
                                  f"x --repeat-samples {args.repeat_samples} of one iteration; lower it")
    return task, filled


def max_std_at(itr: int, n_train_itr: int, min_std: float, max_std: float, hold: float, decay: float) -> float:
    """σ_max of iteration `itr` under learn_decay (`TrainPPOFlowAgent.__init__`, util/scheduler_simple.py 'cosine'):
    σ_max for int(hold·n) iterations, then a cosine over int((1-hold)·n) down to (1-decay)·σ_min + decay·σ_max. The
    agent sets the bound after each iteration, so iteration itr samples with the schedule's value at itr - 1."""
    low, held, anneal = min_std * (1 - decay) + max_std * decay, int(n_train_itr * hold), int(n_train_itr * (1 - hold))
    progress = min(max((itr - 1 - held) / max(anneal, 1), 0.0), 1.0)  # (anneal 0, n_train_itr 1: never reached)
    return low + (max_std - low) * 0.5 * (1 + math.cos(progress * math.pi))


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    """Element-wise log N(x; mean, std²), as torch.distributions.Normal.log_prob."""
    log_std = std.log() if torch.is_tensor(std) else math.log(std)
    return -((x - mean) ** 2) / (2 * std**2) - log_std - math.log(math.sqrt(2 * math.pi))


def velocity(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v_θ(x, t, s) of a DiffusionMLP on float t, and the noise network's input [time embedding (detached), observation
    embedding] (ReinFlow `FlowMLP.forward(output_embedding=True)`, `NoisyFlowMLP.forward`)."""
    B = x.shape[0]
    t_emb, s_emb = net.time_embedding(t), net.cond_mlp(cond.reshape(B, -1))
    v = net.net(torch.cat([x.reshape(B, -1), t_emb, s_emb], dim=-1)).view_as(x)
    return v, torch.cat([t_emb.detach(), s_emb], dim=-1)


class ReinFlowAgent(nn.Module):
    """The frozen pre-trained velocity network (kept for the checkpoint, as ReinFlow's `actor_old`), its trainable copy
    `actor_ft`, the noise network and the critic (`PPOFlow`)."""

    def __init__(self, base: nn.Module, critic: nn.Module, denoising_steps: int, noise_hidden_dims: tuple[int, ...],
                 horizon_steps: int, action_dim: int, obs_shape: tuple[int, int], min_std: float, max_std: float,
                 randn_clip: float, denoised_clip: float) -> None:
        super().__init__()
        self.actor = base.requires_grad_(False).eval()
        self.actor_ft = copy.deepcopy(base).requires_grad_(True)
        self.critic = critic
        self.K, self.horizon_steps, self.action_dim = denoising_steps, horizon_steps, action_dim
        self.min_std, self.max_std, self.randn_clip, self.denoised_clip = min_std, max_std, randn_clip, denoised_clip
        self.register_buffer("t", torch.linspace(0, 1 - 1 / denoising_steps, denoising_steps), persistent=False)  # k/K
        with torch.no_grad():  # the width of [time embedding, observation embedding]
            _, feature = velocity(base, torch.zeros(1, horizon_steps, action_dim), torch.zeros(1), torch.zeros(1, *obs_shape))
        self.noise_net = MLP([feature.shape[-1], *noise_hidden_dims, horizon_steps * action_dim], "tanh")

    def noise_std(self, feature: torch.Tensor) -> torch.Tensor:
        """σ_φ in [min_std, max_std]: a tanh of the network's log-variance mapped onto [log σ_min², log σ_max²]
        (ReinFlow `ExploreNoiseNet.process_noise`)."""
        lo, hi = torch.tensor(self.min_std**2).log(), torch.tensor(self.max_std**2).log()
        logvar = lo + (hi - lo) * (torch.tanh(self.noise_net(feature)) + 1) / 2.0
        return torch.exp(0.5 * logvar)

    def step(self, x: torch.Tensor, i: int, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of x_{i+1} given x_i: clamp(x_i + v·Δt, ±denoised_clip) (clip_intermediate_actions), σ_φ."""
        v, feature = velocity(self.actor_ft, x, self.t[i].expand(x.shape[0]), cond)
        return (x + v * (1 / self.K)).clamp(-self.denoised_clip, self.denoised_clip), self.noise_std(feature).view_as(x)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk x_K (B, T_a, D_a), the chain (B, K+1, T_a, D_a) and its log-prob (B,) (`PPOFlow.get_actions`);
        deterministic: the noise-free Euler chain. The last step is clamped to [-1, 1], its log-prob taken there."""
        x = torch.randn(cond.shape[0], self.horizon_steps, self.action_dim, device=cond.device)
        chain, logprob = [x], gaussian_logprob(x, 0.0, 1.0).sum(dim=(-2, -1))  # log N(x_0; 0, I)
        for i in range(self.K):
            mean, std = self.step(x, i, cond)
            x = mean if deterministic else mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
            if i == self.K - 1:
                x = x.clamp(-1, 1)
            logprob = logprob + gaussian_logprob(x, mean, std).sum(dim=(-2, -1))
            chain.append(x)
        return x, torch.stack(chain, dim=1), logprob / (self.K + 1) / (self.horizon_steps * self.action_dim)

    def get_logprobs(self, cond: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chain's log-prob and entropy (B,), averaged over the K + 1 terms and T_a·D_a entries, and the mean std
        (`PPOFlow.get_logprobs` with account_for_initial_stochasticity and both normalisations, as the agent calls it)."""
        steps = [self.step(chain[:, i], i, cond) for i in range(self.K)]
        mean, std = torch.stack([m for m, _ in steps], dim=1), torch.stack([s for _, s in steps], dim=1)
        logprob = gaussian_logprob(chain[:, 0], 0.0, 1.0).flatten(1).sum(-1)
        logprob = logprob + gaussian_logprob(chain[:, 1:], mean, std).flatten(2).sum(-1).sum(-1)
        entropy_1 = 0.5 + 0.5 * math.log(2 * math.pi)  # of N(0, 1) per entry; N(μ, σ²): entropy_1 + log σ
        entropy = entropy_1 * chain[0, 0].numel() + (entropy_1 + std.log()).flatten(2).sum(-1).sum(-1)
        n = self.horizon_steps * self.action_dim
        return logprob / (self.K + 1) / n, entropy / (self.K + 1) / n, std.mean()

    def get_value(self, cond: torch.Tensor) -> torch.Tensor:
        return self.critic(cond)


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, clip: float, lp_min: float, lp_max: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate of `PPOFlow.loss`: both log-probs clamped to [lp_min, lp_max], the minibatch's advantages
    normalised; (pg_loss, approx_kl, clipfrac)."""
    log_ratio = new_lp.clamp(lp_min, lp_max) - old_lp.clamp(lp_min, lp_max)
    ratio = log_ratio.exp()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    with torch.no_grad():
        return pg_loss, ((ratio - 1) - log_ratio).mean(), ((ratio - 1).abs() > clip).float().mean()


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over chunk-steps (ReinFlow `PPOBuffer.update_adv_returns`); (n_steps, N) each, next_values = V(s'_t)."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


class RunningRewardScaler:
    """Running reward scaling (ReinFlow `PPOBuffer.normalize_reward`, as dppo_finetune.py), once per iteration on its
    (n_steps, N) rewards: discounted returns (ret <- r + 0.99 (1 - first) ret) update the running variance in one
    batch (count 1e-4, mean 0, var 1), then rewards / sqrt(var + 1e-8), clipped to ±10; `ret` carries over."""
    gamma, clip, eps = 0.99, 10.0, 1e-8

    def __init__(self, num_envs: int) -> None:
        self.ret, self.mean, self.var, self.count = np.zeros(num_envs), 0.0, 1.0, 1e-4

    def __call__(self, rewards: np.ndarray, firsts: np.ndarray) -> np.ndarray:
        rets = np.zeros_like(rewards, dtype=np.float64)
        for t in range(rewards.shape[0]):
            self.ret = rets[t] = rewards[t] + self.gamma * (1.0 - firsts[t]) * self.ret
        x = rets.reshape(-1)
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / (total - 1), total
        return np.clip(rewards / np.sqrt(self.var + self.eps), -self.clip, self.clip)


def main(args: Args) -> dict:
    resume, args = runs.open_resume(args, args.resume, "flow", HINT.format(args.env_id),
                                    keys=(*runs.RESUME_KEYS, "noise_net"))  # the run's own arguments
    task, filled = fill_defaults(args)
    args.checkpoint = args.checkpoint or runs.default_flow_checkpoint(task.id)  # flow_pretrain.py's default output
    ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, "flow", HINT.format(task.id), task,
                                      conversion=lambda: importlib.import_module("loaders.convert"))  # refuses ReinFlow's
    filled.update(runs.apply_defaults(args, {"denoising_steps": ckpt["denoising_steps"]}))
    if args.act_steps > ckpt["horizon_steps"]:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the chunk T_a = {ckpt['horizon_steps']}")
    runs.print_defaults(task.id, filled)  # a resumed run's own arguments are complete: nothing
    K, T_o, T_a, T_e, N = args.denoising_steps, ckpt["cond_steps"], ckpt["horizon_steps"], args.act_steps, args.num_envs
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    base = build_diffusion_network(ckpt, T_a)  # the velocity network: pre-training's EMA, or a fine-tuned run's base
    runs.load_weights(base, ckpt["base"] if "base" in ckpt else ckpt["ema"], ckpt_path)
    critic = ObsCritic(task.obs_dim, T_o, mlp_dims=(256,) * 3)  # ReinFlow's CriticObs: [256]x3, Mish, residual
    agent = ReinFlowAgent(base, critic, K, args.noise_hidden_dims, T_a, task.action_dim, (T_o, task.obs_dim), args.min_std,
                          args.max_std, args.randn_clip_value, args.denoised_clip_value).to(device)
    if "actor_ft" in ckpt:  # a fine-tuning checkpoint: resumed, or evaluated
        for name in ("actor_ft", "noise_net", "critic"):
            runs.load_weights(getattr(agent, name), ckpt.get(name), ckpt_path)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, normalizer=normalizer,
                        n_workers=args.n_workers, backend=args.env_backend, terminate_on_success=args.terminate_on_success,
                        capture_video=args.capture_video)
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json

    def set_noise_bound(itr: int) -> None:  # σ_max of iteration itr (learn_decay), or the constant one
        agent.max_std = (max_std_at(itr, args.n_train_itr, args.min_std, args.max_std, args.noise_hold_ratio,
                                    args.noise_decay_ratio) if args.noise_decay else args.max_std)

    policy = lambda cond, deterministic: agent.sample(cond, deterministic)[0]  # noqa: E731 (evaluation)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed, exp_name=args.exp_name,
                   eval_n_steps=args.eval_n_steps, val_freq=args.val_freq, save_every=args.save_every, plot=args.plot,
                   track=args.track, wandb_project=args.wandb_project_name, resume_dir=args.resume)
    if args.eval_only:
        set_noise_bound(ckpt.get("itr", 0))
        return run.eval_only(index=ckpt.get("itr", 0))
    actor_opt, actor_sched = runs.optimizer_with_schedule(nn.ModuleList([agent.actor_ft, agent.noise_net]), args.actor_lr,
                                                          args.actor_lr_min, args.lr_cycle_itr, args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr_min,
                                                            args.lr_cycle_itr, args.lr_warmup_itr, args.critic_weight_decay)
    scaler = RunningRewardScaler(N)
    set_noise_bound(0)  # the "before" evaluation (Avoid) samples as iteration 0 does
    run.start(resume, {**runs.policy_header(ckpt), "denoising_steps": K},
              {"base": agent.actor, "actor_ft": agent.actor_ft, "noise_net": agent.noise_net, "critic": agent.critic},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched},
              {"reward_scaler": scaler})
    obs_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    next_obs_buf = torch.zeros_like(obs_buf)  # the observation after each chunk-step (an episode's final one if it ended)
    chain_buf = torch.zeros(args.n_steps, N, K + 1, T_a, task.action_dim, device=device)
    old_lp_buf = torch.zeros(args.n_steps, N, device=device)

    for itr in run.iterations(args.n_train_itr):
        set_noise_bound(itr)
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (ReinFlow `TrainPPOFlowAgent.run`)
            if itr >= args.n_critic_warmup_itr:  # the LR schedules step here too
                actor_sched.step()
            critic_sched.step()
            continue

        # ---- rollout ----
        if run.need_reset or task.reset_every_iteration:  # else `first` goes on from the last step
            obs, first = run.reset_envs(itr), np.ones(N)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        for step in range(args.n_steps):
            firsts[step] = first
            obs_buf[step] = cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x, chain_buf[step], old_lp_buf[step] = agent.sample(cond)  # old log-probs: while sampling
            run.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            next_obs_buf[step] = normalizer.normalize_obs(torch.as_tensor(info["final_obs"], device=device))
            terminated[step], dones[step] = term, term | trunc
            first = dones[step].astype(np.float64)
            run.step(rewards[step], dones[step])
        run.end_rollout(itr)

        # ---- advantages: GAE over chunk-steps (truncation: docs/deviations.md) ----
        r = scaler(rewards, firsts) if args.reward_scale_running else rewards  # once per iteration
        with torch.no_grad():
            values = agent.get_value(obs_buf.flatten(0, 1)).view(args.n_steps, N)
            next_values = agent.get_value(next_obs_buf.flatten(0, 1)).view(args.n_steps, N)
            cut = terminated if args.bootstrap_truncated else dones  # where V(s') is not bootstrapped
            r, cut, d = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (r, cut, dones))
            advantages, returns = compute_gae(r, values, next_values, cut, d, args.gamma, args.gae_lambda)
        run.lap("advantages")

        # ---- the PPO update: one sample per env-step, each drawn repeat_samples times per epoch (PPOFlow.loss) ----
        b_obs, b_chain, b_old_lp = obs_buf.flatten(0, 1), chain_buf.flatten(0, 1), old_lp_buf.flatten()
        b_adv, b_ret = advantages.flatten(), returns.flatten()
        S, R, B = b_obs.shape[0], args.repeat_samples, args.batch_size
        stats, stop = [], False  # per minibatch: pg_loss, v_loss, entropy_loss, approx_kl, clipfrac, noise std
        for epoch in range(args.update_epochs):
            perm = torch.randperm(S * R, device=device) // R  # env-step of each draw (torch.unravel_index(·, (S, R)))
            for start in range(0, S * R - B + 1, B):
                s = perm[start:start + B]
                new_lp, entropy, std_mean = agent.get_logprobs(b_obs[s], b_chain[s])
                pg_loss, approx_kl, clipfrac = ppo_loss(new_lp, b_old_lp[s], b_adv[s], args.clip_coef, args.logprob_min,
                                                        args.logprob_max)
                v_loss = 0.5 * ((agent.critic(b_obs[s]) - b_ret[s]) ** 2).mean()
                entropy_loss = -entropy.mean()
                loss = pg_loss + args.ent_coef * entropy_loss + args.vf_coef * v_loss
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(agent.critic.parameters(), args.max_grad_norm)
                critic_opt.step()
                if itr >= args.n_critic_warmup_itr:
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(actor_opt.param_groups[0]["params"], args.max_grad_norm)
                    actor_opt.step()
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl, clipfrac,
                                          std_mean.detach()]))
                if args.target_kl is not None and approx_kl.item() > args.target_kl:
                    stop = True  # ReinFlow stops the whole update (TrainPPOFlowAgent.minibatch_generator)
                    break
            if stop:
                break
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        if itr >= args.n_critic_warmup_itr:  # the actor's schedule starts after the critic warm-up
            actor_sched.step()
        critic_sched.step()
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        names = ("pg_loss", "v_loss", "entropy_loss", "approx_kl", "clipfrac", "noise_std")
        logged = dict(zip(names, torch.stack(stats).mean(0).tolist()), max_std=agent.max_std)
        runs.check_finite(f"iteration {itr}", logged, agent.actor_ft, agent.noise_net, agent.critic)
        logged["explained_variance"] = runs.explained_variance(values.flatten(), returns.flatten())
        run.end_iteration(itr, logged, lrs)
    set_noise_bound(args.n_train_itr)  # the final evaluation samples as the next iteration would
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
