"""DRWR: reward-weighted regression for a pre-trained diffusion policy (Ren et al., ICLR 2025, §5.1 and its
Fig. 5 comparison, App. D.3 eq. A1, settings App. D.2/D.5 and Table A8).

On-policy and critic-free. Each iteration samples chunks with the current policy (DDPM, every one of the K
denoising steps run by the one trainable ε-network), then fits the network to its own executed chunks by
the pre-training ε-prediction loss, each sample weighted by its exponentiated, normalised discounted
return-to-go: chunks that led to higher returns are imitated more (reference `RWRDiffusion.p_losses`,
`agent/finetune/train_rwr_diffusion_agent.py` `TrainRWRDiffusionAgent.run`).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 20 (10 from scratch) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | |
| γ (per chunk-step) | `gamma` | gym/Avoid 0.99, robomimic 0.999 |
| β, w_max | `beta`, `max_weight` | 10, 100 |
| R_t (discounted return-to-go of chunk-step t) | `returns` | (S,), S = chunk-steps of the finished episodes |
| R̂_t = (R_t - mean)/(std + 1e-3) | inside `rwr_weights` | (S,) |
| w_t = min(exp(β R̂_t), w_max) | `weights` | (S,) |
| a_t (the sampled chunk, normalised) | `x_buf` | (n_steps, N, T_a, D_a) |
| obs | `obs_buf` | (n_steps, N, T_o, D_o), normalised |

Which chunk-steps enter the update (as the reference): only those of episodes that start and end inside
the iteration (a `first` flag after each reset or episode end marks starts) and that last at least two
chunk-steps. Returns use the raw, unscaled chunk rewards, discounted by γ once per chunk-step and cut at the
episode's end, standardised over all of the iteration's samples (population std). Each of `update_epochs`
epochs shuffles them into max(1, S // batch_size) batches (the remainder is skipped). Every sample gets its
own t ~ U{0..K-1} and ε ~ N(0, I); loss = mean over the batch of w · mean over (T_a, D_a) of (ε_θ(x_t, t, obs) - ε)².

Defaults are the reference configs (`cfg/gym/finetune/hopper-v2/ft_rwr_diffusion_mlp.yaml`,
`cfg/robomimic/finetune/{lift,can,square,transport}/ft_rwr_diffusion_mlp.yaml`); Avoid (no reference config)
takes DPPO's Avoid run size and the gym config's method settings; furniture is refused. Where the reference
config differs from the paper's Table A8: Transport's actor LR is constant 1e-5 (Table A8: decayed to 1e-6)
and its σ^exp_min is 0.1 (Table A8: 0.08); robomimic uses weight decay 1e-6 (not in Table A8). `--from-scratch`
(App. B.2) starts from a random network with `cfg/gym/scratch/hopper-v2/rwr_diffusion_mlp.yaml` (SCRATCH_DEFAULTS).

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md ("drwr.py").
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn

from common import runs
from common.envs import make_vec_env
from common.networks import build_diffusion_network
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
    gamma: Annotated[float | None, Fraction] = None  # γ, the discount per chunk-step of the return-to-go
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # σ^exp_min, the sampling std floor
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # learning rate
    actor_lr_min: Annotated[float | None, Positive] = None  # end of the cosine schedule (None: actor_lr, constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the cosine schedule, from actor_lr_min up to actor_lr
    lr_cycle_itr: Annotated[int | None, Positive] = None  # cycle of the cosine schedule (None: n_train_itr)
    weight_decay: Annotated[float | None, NonNegative] = None  # AdamW weight decay
    beta: Annotated[float, NonNegative] = 10.0  # β: weight = exp(β · normalised return-to-go)
    max_weight: Annotated[float, PositiveOrInf] = 100.0  # w_max, the upper clip of the weights (inf: no limit)
    batch_size: Annotated[int | None, Positive] = None  # chunk-steps per gradient step
    update_epochs: Annotated[int | None, Positive] = None  # passes over the iteration's samples
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient norm clip (None or inf: no limit; as every config)
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    terminate_on_success: bool = False  # robomimic: end episodes on success (the paper does not)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's fine-tuning configs (paper App. D); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(n_train_itr=1000, num_envs=40, n_steps=500, gamma=0.99, actor_lr=1e-4, lr_cycle_itr=1000,
                weight_decay=0.0, batch_size=1000, update_epochs=16),
    "robomimic": dict(n_train_itr=151, num_envs=50, n_steps=300, gamma=0.999, actor_lr=1e-5, lr_cycle_itr=1000,
                      weight_decay=1e-6, batch_size=1000, update_epochs=16),
    # no reference config: DPPO's Avoid run size, the gym config's method settings
    "avoid": dict(n_train_itr=51, num_envs=50, n_steps=25, gamma=0.99, actor_lr=1e-4, weight_decay=0.0, batch_size=1000,
                  update_epochs=16),
}
TASK_DEFAULTS = {
    "lift": dict(n_train_itr=81), "can": dict(n_train_itr=151),
    "square": dict(n_steps=400, n_train_itr=201), "transport": dict(n_steps=400, n_train_itr=201),
}
# From scratch (App. B.2): the reference's cfg/gym/scratch/hopper-v2/rwr_diffusion_mlp.yaml (K = 10)
SCRATCH_DEFAULTS = {"hopper": dict(SUITE_DEFAULTS["gym"], num_envs=10, n_steps=1000, batch_size=256, update_epochs=128,
                                   horizon_steps=1, act_steps=1)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    if task.suite not in SUITE_DEFAULTS:
        raise runs.UsageError(f"{task.id}: the reference has no DRWR config for {task.suite} (and Isaac Gym is not "
                              "installable)")
    defaults = (runs.scratch_defaults(SCRATCH_DEFAULTS, task.id, args.checkpoint, HINT.format(task.id)) if args.from_scratch
                else {**SUITE_DEFAULTS[task.suite], **TASK_DEFAULTS.get(task.id, {})})
    filled = runs.apply_defaults(args, {"act_steps": task.act_steps, **defaults})
    filled.update(runs.apply_defaults(args, {"actor_lr_min": args.actor_lr, "lr_cycle_itr": args.n_train_itr}))
    runs.check_args(args)  # every number within the Limits of its field
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


def reward_to_go(rewards: np.ndarray, firsts: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples of one iteration (reference `TrainRWRDiffusionAgent.run`): rewards (n_steps, N); firsts
    (n_steps + 1, N), 1 where an episode starts (after a reset, or after the previous chunk-step's done).

    Keeps the chunk-steps of episodes that start and end inside the iteration and last at least two
    chunk-steps. Returns (step index, env index, R_t) per kept chunk-step, R_t = r_t + γ R_{t+1} within
    its episode (0 after its last chunk-step)."""
    steps, envs, returns = [], [], []
    for env in range(rewards.shape[1]):
        starts = np.flatnonzero(firsts[:, env] == 1)
        for start, end in zip(starts[:-1], starts[1:]):  # an episode: chunk-steps start .. end - 1
            if end - start > 1:
                ret, ep = 0.0, np.zeros(end - start)
                for t in range(end - 1, start - 1, -1):
                    ret = rewards[t, env] + gamma * ret
                    ep[t - start] = ret
                steps.append(np.arange(start, end))
                envs.append(np.full(end - start, env))
                returns.append(ep)
    if not steps:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    return np.concatenate(steps), np.concatenate(envs), np.concatenate(returns)


def rwr_weights(returns: np.ndarray, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(β R̂), w_max), R̂ = (R - mean)/(std + 1e-3) over all the iteration's samples (float64, population
    std), then float32 as the reference (`TrainRWRDiffusionAgent.run`)."""
    normalised = (returns - returns.mean()) / (returns.std() + 1e-3)
    return torch.exp(beta * torch.as_tensor(normalised, dtype=torch.float32)).clamp(max=max_weight)


RESUME_KEYS = ("itr", "env_steps", "optimizers", "schedulers", "rng", "args", "actor", "method")



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
    T_o, T_a, T_e, N = ckpt["cond_steps"], args.horizon_steps, args.act_steps, args.num_envs
    if T_e > T_a:
        raise runs.UsageError(f"--act-steps {T_e} exceeds the chunk T_a = {T_a}")
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    network = build_diffusion_network(ckpt, T_a)
    runs.load_weights(network, runs.whole_network_weights(ckpt, ckpt_path), ckpt_path)  # pre-training's EMA, or an actor
    agent = DiffusionPolicy(network, ckpt["denoising_steps"], T_a, task.action_dim, args.min_sampling_denoising_std,
                            args.randn_clip_value).to(device)
    envs = make_vec_env(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, n_workers=args.n_workers,
                        terminate_on_success=args.terminate_on_success, backend=args.env_backend,
                        capture_video=args.capture_video)

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json

    policy = lambda cond, deterministic: agent.get_action(cond, deterministic)  # noqa: E731 (evaluation)
    run = runs.Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed,
                   exp_name=args.exp_name, eval_n_steps=args.eval_n_steps, val_freq=args.val_freq,
                   save_every=args.save_every, plot=args.plot, track=args.track, wandb_project=args.wandb_project_name,
                   resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW and the reference's cosine schedule (constant in every config)
    opt, sched = runs.optimizer_with_schedule(agent.network, args.actor_lr, args.actor_lr_min, args.lr_cycle_itr,
                                              args.lr_warmup_itr, args.weight_decay)
    run.start(resume, {**runs.policy_header(ckpt), "horizon_steps": T_a}, {"actor": agent.network}, {"actor": opt},
              {"actor": sched}, {"method": METHOD})
    obs_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    x_buf = torch.zeros(args.n_steps, N, T_a, task.action_dim, device=device)
    done = np.zeros(N)

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `run`)
            sched.step()  # the reference steps its schedule on evaluation iterations too
            continue

        # ---- rollout ----
        firsts = np.zeros((args.n_steps + 1, N))  # 1 where an episode starts: after a reset or an episode's end
        if run.need_reset or task.reset_every_iteration:
            obs = run.reset_envs(itr)
            firsts[0] = 1
        else:  # envs that continue across iterations: an episode starts here only where the last one just ended
            firsts[0] = done
        rewards = np.zeros((args.n_steps, N))
        agent.eval()
        for step in range(args.n_steps):
            cond = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = agent.get_action(cond)
            obs_buf[step], x_buf[step] = cond, x
            run.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, _ = envs.step(action)
            done = (term | trunc).astype(np.float64)
            firsts[step + 1] = done
            run.step(rewards[step], done)
        run.end_rollout(itr)

        # ---- weights: normalised discounted return-to-go of the finished episodes (App. D.3 eq. A1) ----
        step_idx, env_idx, returns = reward_to_go(rewards, firsts, args.gamma)
        S = len(returns)
        logged = {"n_samples": S}
        run.lap("returns")

        # ---- reward-weighted ε-prediction regression ----
        losses = []
        if S > 0:  # no finished episode, no update (docs/deviations.md)
            s_t, e_t = (torch.as_tensor(a, device=device) for a in (step_idx, env_idx))
            b_obs, b_x = obs_buf[s_t, e_t], x_buf[s_t, e_t]
            weights = rwr_weights(returns, args.beta, args.max_weight).to(device)
            agent.train()
            n_batch = max(1, S // args.batch_size)  # the remainder is skipped, as the reference
            for epoch in range(args.update_epochs):
                perm = torch.randperm(S, device=device)
                for b in range(n_batch):
                    idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
                    loss = agent.loss(b_x[idx], b_obs[idx], weights[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if args.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(agent.network.parameters(), args.max_grad_norm)
                    opt.step()
                    losses.append(loss.detach())
        lrs = {"actor": opt.param_groups[0]["lr"]}  # this update's
        sched.step()
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        if losses:  # one host sync
            stats = torch.stack([torch.stack(losses).mean(), weights.mean(), weights.max()]).tolist()
            logged.update(zip(("loss", "weight_mean", "weight_max"), stats))
        runs.check_finite(f"iteration {itr}", {k: v for k, v in logged.items() if k != "n_samples"}, agent.network)
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
