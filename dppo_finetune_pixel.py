"""DPPO from camera images: fine-tuning a pixel diffusion policy with PPO (Ren et al., ICLR 2025, §4, §5.3, App. D.5).

The algorithm of `dppo_finetune.py` (the denoising chain as an inner MDP, eqs. 4.4-4.8) on the robomimic `-img`
tasks, with what pixels change: the policy and a separate critic each see the proprioception and the camera
images through their own ViT encoder (`common/vision.py`, `VisionEncoder`); the policy was pre-trained with
K = 100 DDPM steps (`dppo_pretrain_pixel.py`) and is fine-tuned with DDIM, 5 steps, all of them fine-tuned
(`actor_ft` is a copy of the whole network, ViT included); images are stored as uint8 in the rollout buffer and
randomly shifted (pad 4) once per iteration, before the values and old log-probs are computed, so every epoch
of the update sees the same shifted images as its old log-probs; the update accumulates gradients over
`grad_accumulate` minibatches of 500 (env-step, denoising-step) pairs (reference
`agent/finetune/train_ppo_diffusion_img_agent.py`, `TrainPPOImgDiffusionAgent.run`).

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` (from the checkpoint) | 100 |
| K' | `ft_denoising_steps` = `ddim_steps` | 5 (DDIM grid {80, 60, 40, 20, 0}) |
| T_a, T_e, T_o | `horizon_steps`, `act_steps`, `cond_steps` | 4, 4, 1 (Transport 8, 8; UNet 16, 8) |
| γ_env, λ, γ_denoise | `gamma`, `gae_lambda`, `gamma_denoising` | 0.999, 0.95, 0.99 |
| σ^exp_min, σ^prob_min | `min_sampling_denoising_std`, `min_logprob_denoising_std` | 0.1, 0.1 |
| obs | `state_buf`, `rgb_buf` | (n_steps, N, T_o, D_p) normalised float32; (n_steps, N, T_o, 3·cameras, H, W) uint8 |
| chain | `chain_buf` | (n_steps, N, K'+1, T_a, D_a) |

Deviations from the reference implementation (irom-princeton/dppo): docs/deviations.md ("Pixel DPPO"), besides
those of dppo_finetune.py.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn

from common import runs
from common.envs import evaluate
from common.vision import ViTCritic, VisionDiffusionNet, random_shift
from common.normalizer import Normalizer
from common.tasks import Task, get_task
from common.vecenv import default_n_workers
from sims.robomimic import PixelChunkVecEnv

# the critic's scheduler steps on a first evaluation iteration (as in the reference), before its optimiser has
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
PRETRAIN_HINT = "python dppo_pretrain_pixel.py --env-id {}"  # how to make a pre-trained checkpoint, in error messages
Positive, PositiveOrInf, NonNegative, Fraction = runs.POSITIVE, runs.POSITIVE_OR_INF, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "lift-img"  # pixel task id: lift-img, can-img, square-img, transport-img
    checkpoint: str | None = None  # pre-trained (dppo_pretrain_pixel.py) or fine-tuned checkpoint
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    resume: str | None = None  # a run folder to continue from its checkpoint.pt, with the run's own arguments
    eval_only: bool = False  # only evaluate the checkpoint (deterministic and stochastic) and exit; writes nothing
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (agentview camera)
    save_every: Annotated[int, Positive] = 1  # iterations between checkpoints
    # algorithm (None: the task's value, printed at start; TASK_DEFAULTS below)
    n_train_itr: Annotated[int | None, Positive] = None  # fine-tuning iterations
    num_envs: Annotated[int, Positive] = 50  # parallel environments N
    n_steps: Annotated[int | None, Positive] = None  # chunk-steps per env per iteration
    n_workers: Annotated[int | None, Positive] = None  # worker processes rendering the envs (None: one per core)
    ddim_steps: Annotated[int, Positive] = 5  # DDIM steps, all fine-tuned (K')
    act_steps: Annotated[int | None, Positive] = None  # T_e, the executed actions of a chunk
    gamma: Annotated[float, Fraction] = 0.999  # γ_env, the discount per chunk-step
    gae_lambda: Annotated[float, Fraction] = 0.95  # GAE λ
    gamma_denoising: Annotated[float, Fraction] = 0.99  # γ_denoise, the discount per denoising step
    min_sampling_denoising_std: Annotated[float, Positive] = 0.1  # σ^exp_min, the sampling std floor
    min_logprob_denoising_std: Annotated[float, Positive] = 0.1  # σ^prob_min, the std floor of the log-probs
    randn_clip_value: Annotated[float, Positive] = 3.0  # the sampling noise is clamped to ± this
    actor_lr: Annotated[float | None, Positive] = None  # actor learning rate (constant)
    critic_lr: Annotated[float, Positive] = 1e-3  # critic learning rate (constant)
    lr_warmup_itr: Annotated[int, NonNegative] = 10  # warm-up of the LR schedules (constant schedules ignore it)
    batch_size: Annotated[int, Positive] = 500  # PPO minibatch of (env-step, denoising-step) pairs
    grad_accumulate: Annotated[int | None, Positive] = None  # minibatches per optimiser step
    logprob_batch_size: Annotated[int | None, Positive] = None  # observations per batch of the values and old log-probs
    augment: bool = True  # shift the stored images randomly (pad 4) once per iteration before the old log-probs
    update_epochs: Annotated[int, Positive] = 10  # PPO epochs per iteration
    clip_coef: Annotated[float, Positive] = 0.01  # clip ε of the final denoising step
    clip_coef_base: Annotated[float, Positive] = 0.001  # clip ε of the noisiest fine-tuned step
    clip_coef_rate: Annotated[float, Positive] = 3.0  # exponential rate of the per-step clip schedule
    vf_coef: Annotated[float, NonNegative] = 0.5  # value loss coefficient
    target_kl: Annotated[float | None, PositiveOrInf] = 1.0  # stop the epochs when approx KL exceeds this (inf: no limit)
    max_grad_norm: Annotated[float | None, PositiveOrInf] = None  # gradient norm clip of actor_ft (None or inf: no limit)
    n_critic_warmup_itr: Annotated[int, NonNegative] = 2  # iterations before the actor starts to step
    val_freq: Annotated[int, NonNegative] = 10  # iterations between evaluations (0: only the final one)
    eval_n_steps: Annotated[int | None, Positive] = None  # chunk-steps of an evaluation (None: one episode)
    reward_scale_running: bool = True  # running reward scaling
    terminate_on_success: bool = False  # end episodes on success (the paper does not)
    max_episode_steps: Annotated[int | None, Positive] = None  # episode length in env steps (None: the task's)
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32


# The reference's configs (cfg/robomimic/finetune/*/ft_ppo_diffusion_{mlp,unet}_img.yaml); an explicit flag wins.
TASK_DEFAULTS = {
    "lift-img": dict(n_train_itr=81, n_steps=300, actor_lr=5e-5, grad_accumulate=15, logprob_batch_size=500),
    "can-img": dict(n_train_itr=151, n_steps=300, actor_lr=5e-5, grad_accumulate=15, logprob_batch_size=500),
    "square-img": dict(n_train_itr=301, n_steps=400, actor_lr=1e-5, grad_accumulate=20, logprob_batch_size=1000),
    "transport-img": dict(n_train_itr=201, n_steps=400, actor_lr=1e-5, grad_accumulate=20, logprob_batch_size=1000),
}


def pixel_task(env_id: str) -> Task:
    task = get_task(env_id)
    if task.suite != "robomimic-img":
        raise runs.UsageError(f"--env-id {task.id}: dppo_finetune_pixel.py fine-tunes the pixel tasks "
                              "(lift-img, can-img, square-img, transport-img); state tasks: dppo_finetune.py")
    return task


def fill_defaults(args: Args, backbone: str = "vit-mlp") -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = pixel_task(args.env_id)
    args.env_id = task.id
    defaults = {**TASK_DEFAULTS[task.id], "act_steps": task.act_steps}
    if task.id == "transport-img" and backbone == "vit-unet":
        defaults["actor_lr"] = 2e-5
    filled = runs.apply_defaults(args, defaults)
    runs.check_args(args)  # every number within the Limits of its field
    if not args.eval_only:
        runs.check_warmup(args.n_critic_warmup_itr, args.n_train_itr)
    if args.batch_size < 2:
        raise runs.UsageError("--batch-size must be at least 2 (advantages are normalised within each minibatch)")
    return filled


def fill_from_checkpoint(args: Args, ckpt: dict) -> None:
    """The flags checked against the network and one iteration's pairs."""
    K, K_ft, T_a = ckpt["denoising_steps"], args.ddim_steps, ckpt["horizon_steps"]
    if K % K_ft:
        raise runs.UsageError(f"DDIM with {K_ft} steps needs K divisible by it (checkpoint K = {K})")
    if args.act_steps > T_a:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the chunk T_a = {T_a}")
    if not args.eval_only:  # a sample is an (env-step, denoising-step) pair
        runs.check_minibatch(args.batch_size, args.n_steps, args.num_envs, K_ft)


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`), float64, as dppo_finetune.py."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


class PixelDiffusionPPO(nn.Module):
    """Frozen pre-trained network, its trainable copy `actor_ft` (ViT included) for the K' fine-tuned DDIM steps,
    and the ViT critic. Observations are dicts {"state", "rgb"} (see the module docstring)."""

    def __init__(self, base: VisionDiffusionNet, critic: ViTCritic, denoising_steps: int, ddim_steps: int,
                 horizon_steps: int, action_dim: int, min_sampling_std: float, min_logprob_std: float,
                 randn_clip: float) -> None:
        super().__init__()
        self.actor = base.requires_grad_(False).eval()
        self.actor_ft = copy.deepcopy(base).requires_grad_(True)
        self.critic = critic
        self.horizon_steps, self.action_dim, self.ft_steps = horizon_steps, action_dim, ddim_steps
        self.min_sampling_std, self.min_logprob_std, self.randn_clip = min_sampling_std, min_logprob_std, randn_clip
        # DDIM coefficients in float32 from float32 β, as dppo_finetune.DiffusionPPO (reference `VPGDiffusion.p_mean_var`)
        ac = torch.cumprod(1.0 - cosine_beta_schedule(denoising_steps).float(), 0)
        ts = (torch.arange(0, ddim_steps) * (denoising_steps // ddim_steps)).flip(0)  # "leading" grid, from the top
        a, a_prev = ac[ts], torch.cat([ac[ts[1:]], torch.ones(1)])
        sigma = (((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 1 while training
        sigma0 = (0.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)  # η = 0 in evaluation
        for name, value in dict(ts=ts, sqrt_a=a**0.5, sqrt_1ma=(1.0 - a) ** 0.5, sqrt_a_prev=a_prev**0.5,
                                dir=(1.0 - a_prev - sigma**2).clamp(min=0).sqrt(),
                                dir0=(1.0 - a_prev - sigma0**2).clamp(min=0).sqrt(),
                                std=torch.exp(0.5 * torch.log(sigma**2))).items():
            self.register_buffer(name, value, persistent=False)

    def p_mean_std(self, net: VisionDiffusionNet, x: torch.Tensor, j: torch.Tensor, feat: torch.Tensor,
                   deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (un-floored) std of the DDIM step at grid index j ((B,) tensor); `feat` = net.encode(obs)."""
        eps = net(x, self.ts[j], feat)
        v = lambda buf: buf[j].view(-1, 1, 1)  # noqa: E731
        sqrt_a, sqrt_1ma = v(self.sqrt_a), v(self.sqrt_1ma)
        x0 = ((x - sqrt_1ma * eps) / sqrt_a).clamp(-1, 1)
        eps = (x - sqrt_a * x0) / sqrt_1ma  # ε re-derived from the clamped x̂_0
        std = torch.zeros_like(sqrt_a) if deterministic else v(self.std)
        return v(self.sqrt_a_prev) * x0 + v(self.dir0 if deterministic else self.dir) * eps, std

    @torch.no_grad()
    def get_action(self, cond: dict[str, torch.Tensor], deterministic: bool = False, base_only: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a chunk; returns x_0 (B, T_a, D_a) and the chain (B, K'+1, T_a, D_a). Every DDIM step is fine-tuned,
        so `actor_ft` encodes the observation once and runs all of them (`base_only`: the frozen network)."""
        net = self.actor if base_only else self.actor_ft
        feat = net.encode(cond)
        B = feat.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=feat.device)
        chain = [x]
        for j in range(self.ft_steps):
            mean, std = self.p_mean_std(net, x, torch.full((B,), j, device=feat.device), feat, deterministic)
            std = torch.zeros_like(std) if deterministic else std.clamp(min=self.min_sampling_std)  # η = 0 in evaluation
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
            chain.append(x)
        return x, torch.stack(chain, dim=1)

    def get_logprobs(self, feat: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Element-wise log N(x_prev; μ_ft(x_t), max(σ_t, σ^prob_min)²) at DDIM index i (eq. 4.4); feat = actor_ft.encode."""
        mean, std = self.p_mean_std(self.actor_ft, x_t, i, feat)
        std = std.clamp(min=self.min_logprob_std)
        return -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)

    def get_value(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.critic(cond)


def pair_logprobs(agent: PixelDiffusionPPO, feat: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor, i: torch.Tensor,
                  act_steps: int) -> torch.Tensor:
    """One scalar per (env-step, denoising-step) pair: log-probs clamped to [-5, 2], restricted to the executed T_e
    actions and averaged (`PPODiffusion.loss`, reference)."""
    return agent.get_logprobs(feat, x_t, x_prev, i).clamp(-5, 2)[:, :act_steps].mean(dim=(1, 2))


def clip_schedule(ft_steps: int, base: float, clip: float, rate: float) -> torch.Tensor:
    """Per fine-tuned step i (0 = noisiest): ε(i) = base + (clip - base)(e^{rate·u} - 1)/(e^{rate} - 1), u = i/(K'-1)."""
    if ft_steps == 1:
        return torch.tensor([clip])
    u = torch.linspace(0, 1, ft_steps, dtype=torch.float64)
    return (base + (clip - base) * (torch.exp(rate * u) - 1) / (math.exp(rate) - 1)).float()


def denoising_discount(ft_steps: int, gamma_denoising: float) -> torch.Tensor:
    """γ_denoise^(K'-i-1): the final denoising step has weight 1 (eq. 4.7)."""
    return gamma_denoising ** torch.arange(ft_steps - 1, -1, -1, dtype=torch.float32)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                dones: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over chunk-steps (§4.2), as dppo_finetune.py. All inputs (n_steps, N)."""
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


def ppo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate over (env-step, denoising-step) pairs (eqs. 4.5-4.7, reference `PPODiffusion.loss`), for
    advantages already normalised over the minibatch and discounted by γ_denoise^(K'-i-1); `eps`: each pair's clip
    range. Returns the means (pg_loss, approx_kl, clipfrac)."""
    log_ratio = new_lp - old_lp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)).mean()
    with torch.no_grad():
        return pg_loss, ((ratio - 1) - log_ratio).mean(), ((ratio - 1).abs() > eps).float().mean()


def shift_images_(rgb: torch.Tensor, chunk: int = 4096) -> None:
    """Random shift (pad 4) of every stored image, in place and in chunks (no second buffer): rgb (..., C, H, W)
    uint8; each camera image and each of the T_o frames gets its own offset, as the reference shifts
    "(s e t) c h w" per camera."""
    flat = rgb.view(-1, 3, *rgb.shape[-2:])
    for part in flat.split(chunk):
        part.copy_(random_shift(part))


def step_lr_schedules(actor_sched, critic_sched, itr: int, n_critic_warmup_itr: int) -> None:
    """Once per iteration, evaluation iterations included; the actor's schedule only once the actor steps, after the
    critic warm-up (reference `agent/finetune/train_ppo_diffusion_agent.py`, `TrainPPODiffusionAgent.run`)."""
    if itr >= n_critic_warmup_itr:
        actor_sched.step()
    critic_sched.step()


class PixelRun(runs.Run):
    """`runs.Run` with the evaluation of dict observations {"state", "rgb"}: the proprioception normalised, the uint8
    images as they are (`Run.evaluate` normalises one observation array)."""

    def evaluate(self, deterministic: bool, index: int) -> dict:
        def act(obs: dict[str, np.ndarray]) -> np.ndarray:
            return self.normalizer.unnormalize_action(self.policy(as_cond(obs, self.normalizer, self.device),
                                                                  deterministic)).cpu().numpy()
        return evaluate(self.envs, act, self.task, self.act_steps, seed=self.seed + 1_000_000, index=index,
                        n_steps=self.eval_n_steps)


def as_cond(obs: dict[str, np.ndarray], normalizer: Normalizer, device: torch.device) -> dict[str, torch.Tensor]:
    """An env's observation on the device: the proprioception normalised, the uint8 images as they are."""
    return {"state": normalizer.normalize_obs(torch.as_tensor(obs["state"], device=device)),
            "rgb": torch.as_tensor(obs["rgb"], device=device)}


def main(args: Args) -> dict:
    # the run's own arguments with --resume; explicit flags win visibly or are refused
    resume, args = runs.open_resume(args, args.resume, "diffusion", PRETRAIN_HINT.format(args.env_id))
    if args.checkpoint is None and resume is None:
        raise runs.UsageError(f"--checkpoint is required: a pixel policy pre-trained by {PRETRAIN_HINT.format(args.env_id)}")
    task = pixel_task(args.env_id)
    ckpt, ckpt_path = runs.open_start(resume, args.resume, args.checkpoint, "diffusion", PRETRAIN_HINT.format(task.id), task,
                                      conversion=lambda: importlib.import_module("loaders.convert"))
    if not str(ckpt.get("backbone", "")).startswith("vit-"):
        raise runs.DatasetError(f"checkpoint {args.checkpoint!r} holds a {ckpt.get('backbone')} policy on states, not a "
                                "pixel policy; fine-tune it with dppo_finetune.py")
    filled = fill_defaults(args, ckpt["backbone"])
    if resume is None:
        runs.print_defaults(task.id, filled)
    fill_from_checkpoint(args, ckpt)
    K_ft, T_o, T_a, T_e, N = args.ddim_steps, ckpt["cond_steps"], ckpt["horizon_steps"], args.act_steps, args.num_envs
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)

    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    arch, enc = ckpt["arch"], ckpt["arch"]["encoder_arch"]
    # no augmentation inside the networks: the stored images are shifted once per iteration instead (reference
    # ft_ppo_diffusion_*_img.yaml: `augment: False` for actor and critic, `train.augment: True`)
    base = VisionDiffusionNet(**{**arch, "encoder_arch": {**enc, "augment": False}})
    runs.load_weights(base, ckpt["base"] if "base" in ckpt else ckpt["ema"], ckpt_path)
    critic = ViTCritic(enc)  # the reference's ViTCritic: own ViT, [256] x 3 Mish residual MLP
    agent = PixelDiffusionPPO(base, critic, ckpt["denoising_steps"], K_ft, T_a, task.action_dim,
                              args.min_sampling_denoising_std, args.min_logprob_denoising_std,
                              args.randn_clip_value).to(device)
    if "actor_ft" in ckpt:  # a fine-tuning checkpoint: resumed, or evaluated
        runs.load_weights(agent.actor_ft, ckpt["actor_ft"], ckpt_path)
        runs.load_weights(agent.critic, ckpt.get("critic"), ckpt_path)
    envs = PixelChunkVecEnv(task, N, seed=args.seed, act_steps=T_e, cond_steps=T_o, image_size=(enc["img_h"], enc["img_w"]),
                            n_workers=args.n_workers or default_n_workers(), terminate_on_success=args.terminate_on_success,
                            max_episode_steps=args.max_episode_steps, capture_video=args.capture_video)
    print(f"images: {enc['img_h']}x{enc['img_w']}, {enc['num_img']} camera(s)")

    # ---- speed: opt-in, the same numbers (docs/results.md "Speed"; --float32-matmul-precision below highest aside) ----
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # process-wide
                                                 runs.linear_shapes((N, args.batch_size), agent))  # on/off, in args.json

    eval_n_steps = args.eval_n_steps or -(-(args.max_episode_steps or task.max_episode_steps) // T_e)  # one episode
    run = PixelRun(args, envs, task, normalizer, lambda cond, deterministic: agent.get_action(cond, deterministic)[0],
                   act_steps=T_e, device=device, seed=args.seed, exp_name=args.exp_name, eval_n_steps=eval_n_steps,
                   val_freq=args.val_freq, save_every=args.save_every, track=args.track,
                   wandb_project=args.wandb_project_name, resume_dir=args.resume)
    if args.eval_only:
        return run.eval_only(index=ckpt.get("itr", 0))
    # AdamW without weight decay, constant learning rates (the reference's schedules with min_lr = lr)
    actor_opt, actor_sched = runs.optimizer_with_schedule(agent.actor_ft, args.actor_lr, args.actor_lr, args.n_train_itr,
                                                          args.lr_warmup_itr)
    critic_opt, critic_sched = runs.optimizer_with_schedule(agent.critic, args.critic_lr, args.critic_lr,
                                                            args.n_train_itr, args.lr_warmup_itr)
    scaler = RunningRewardScaler(N)
    clip_eps = clip_schedule(K_ft, args.clip_coef_base, args.clip_coef, args.clip_coef_rate).to(device)  # (K',)
    disc = denoising_discount(K_ft, args.gamma_denoising).to(device)  # (K',)
    run.start(resume, runs.policy_header(ckpt), {"base": agent.actor, "actor_ft": agent.actor_ft, "critic": agent.critic},
              {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched},
              {"reward_scaler": scaler})
    state_buf = torch.zeros(args.n_steps, N, T_o, task.obs_dim, device=device)
    rgb_buf = torch.zeros(args.n_steps, N, T_o, 3 * enc["num_img"], enc["img_h"], enc["img_w"], dtype=torch.uint8,
                          device=device)
    chain_buf = torch.zeros(args.n_steps, N, K_ft + 1, T_a, task.action_dim, device=device)
    print(f"rollout buffer: images {rgb_buf.numel() / 2**20:.1f} MiB (uint8), proprio and chains "
          f"{(state_buf.numel() + chain_buf.numel()) * 4 / 2**20:.1f} MiB")

    for itr in run.iterations(args.n_train_itr):
        if run.evaluation_iteration(itr):  # a deterministic evaluation, no update (reference `TrainPPODiffusionAgent.run`)
            step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)  # as the reference, here too
            continue

        # ---- rollout: uint8 images into the buffer; final observations of finished episodes kept aside ----
        obs, first = run.reset_envs(itr), np.ones(N)  # every iteration (reference `TrainPPOImgDiffusionAgent.run`)
        rewards, terminated, dones, firsts = (np.zeros((args.n_steps, N)) for _ in range(4))
        finals: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []  # (step, env ids, their final obs)
        agent.eval()
        for step in range(args.n_steps):
            firsts[step] = first
            cond = as_cond(obs, normalizer, device)
            x, chain = agent.get_action(cond)
            state_buf[step], rgb_buf[step], chain_buf[step] = cond["state"], cond["rgb"], chain
            run.lap("sampling")
            action = normalizer.unnormalize_action(x[:, :T_e]).cpu().numpy()
            obs, rewards[step], term, trunc, info = envs.step(action)
            terminated[step], dones[step] = term, term | trunc
            ids = np.arange(N) if step == args.n_steps - 1 else np.flatnonzero(dones[step])
            if len(ids):  # V(s') of these comes from the final observation, not the next row of the buffer
                finals.append((step, ids, {k: v[ids] for k, v in info["final_obs"].items()}))
            first = dones[step].astype(np.float64)
            run.step(rewards[step], dones[step])
        run.end_rollout(itr)

        # ---- one random shift of the stored images per iteration, then values and old log-probs on them ----
        b_state, b_rgb = state_buf.flatten(0, 1), rgb_buf.flatten(0, 1)  # (S, T_o, D_p), (S, T_o, C, H, W)
        b_chain = chain_buf.flatten(0, 1)                                 # (S, K'+1, T_a, D_a)
        S = b_state.shape[0]
        with torch.no_grad():
            if args.augment:
                shift_images_(rgb_buf)  # reference `TrainPPOImgDiffusionAgent.run`: before values and old log-probs
            run.lap("augment")
            batches = torch.arange(S, device=device).split(args.logprob_batch_size)
            values = torch.cat([agent.get_value({"state": b_state[b], "rgb": b_rgb[b]}) for b in batches])
            values = values.view(args.n_steps, N)
            next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
            for step, ids, final in finals:  # truncation bootstraps from the finished episode's final observation
                next_values[step, torch.as_tensor(ids, device=device)] = agent.get_value(as_cond(final, normalizer, device))
            r = scaler(rewards, firsts) if args.reward_scale_running else rewards  # once per iteration, as the reference
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            advantages, returns = compute_gae(as_t(r), values, next_values, as_t(terminated), as_t(dones),
                                              args.gamma, args.gae_lambda)
            run.lap("advantages")
            b_adv, b_ret = advantages.flatten(), returns.flatten()
            pos = torch.arange(K_ft, device=device).repeat(S)                # (S·K',) DDIM index of each pair
            sample = torch.arange(S, device=device).repeat_interleave(K_ft)  # (S·K',) env-step of each pair

            def old_logprobs(b: torch.Tensor) -> torch.Tensor:  # actor_ft encodes each observation once for its K' pairs
                feat = agent.actor_ft.encode({"state": b_state[b], "rgb": b_rgb[b]}).repeat_interleave(K_ft, 0)
                s, i = b.repeat_interleave(K_ft), torch.arange(K_ft, device=device).repeat(len(b))
                return pair_logprobs(agent, feat, b_chain[s, i], b_chain[s, i + 1], i, T_e)
            old_lp = torch.cat([old_logprobs(b) for b in batches])  # ordered as (sample, pos)
        run.lap("old_logprobs")

        # ---- the PPO update over pairs, gradients accumulated over grad_accumulate minibatches (eqs. 4.5-4.7) ----
        agent.train()
        agent.actor.eval()
        stats = []  # per minibatch: pg_loss, v_loss, approx_kl, clipfrac
        n_pairs, B = S * K_ft, args.batch_size
        n_batches = n_pairs // B
        for epoch in range(args.update_epochs):
            perm, kls = torch.randperm(n_pairs, device=device), []
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            for batch in range(n_batches):
                idx = perm[batch * B:(batch + 1) * B]
                s, i = sample[idx], pos[idx]
                mb_adv = (b_adv[s] - b_adv[s].mean()) / (b_adv[s].std() + 1e-8) * disc[i]  # normalised, then discounted
                cond = {"state": b_state[s], "rgb": b_rgb[s]}
                feat = agent.actor_ft.encode(cond)
                new_lp = pair_logprobs(agent, feat, b_chain[s, i], b_chain[s, i + 1], i, T_e)
                pg_loss, approx_kl, clipfrac = ppo_loss(new_lp, old_lp[idx], mb_adv, clip_eps[i])
                v_loss = 0.5 * ((agent.get_value(cond) - b_ret[s]) ** 2).mean()
                group = min(args.grad_accumulate, n_batches - batch // args.grad_accumulate * args.grad_accumulate)
                loss = (pg_loss + args.vf_coef * v_loss) / group  # the mean over the accumulated minibatches
                loss.backward()
                kls.append(approx_kl)
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), approx_kl, clipfrac]))
                if (batch + 1) % args.grad_accumulate == 0 or batch + 1 == n_batches:
                    if itr >= args.n_critic_warmup_itr:  # only actor_ft's gradient is clipped, once it steps
                        if args.max_grad_norm is not None:
                            nn.utils.clip_grad_norm_(agent.actor_ft.parameters(), args.max_grad_norm)
                        actor_opt.step()
                    critic_opt.step()
                    actor_opt.zero_grad(set_to_none=True)
                    critic_opt.zero_grad(set_to_none=True)
            if (args.target_kl is not None and itr >= args.n_critic_warmup_itr
                    and torch.stack(kls).max().item() > args.target_kl):
                break  # checked once per epoch: one host sync (docs/deviations.md)
        lrs = {"actor": actor_opt.param_groups[0]["lr"], "critic": critic_opt.param_groups[0]["lr"]}  # this update's
        step_lr_schedules(actor_sched, critic_sched, itr, args.n_critic_warmup_itr)
        run.lap("update")

        # ---- logging and the checkpoint, once per iteration ----
        logged = dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac"), torch.stack(stats).mean(0).tolist()))
        runs.check_finite(f"iteration {itr}", logged, agent.actor_ft, agent.critic)  # stops before saving a broken state
        logged["explained_variance"] = runs.explained_variance(values.flatten(), returns.flatten())
        run.end_iteration(itr, logged, lrs)
    return run.finish()


if __name__ == "__main__":
    runs.cli(main, Args)
