"""Pre-training of a diffusion policy by behaviour cloning (DPPO paper §4, App. D.1, D.9).

The policy is a DDPM over action chunks: an ε-prediction network ε_θ(x_t, t, obs) is trained on
demonstration windows with the denoising loss, under a cosine noise schedule, with an EMA copy of
its weights. Fine-tuning (`dppo_finetune.py`) starts from the EMA weights of the checkpoint this
script writes.

| paper | here | shape / value |
|---|---|---|
| K | `denoising_steps` | 20 (100 for pixel / furniture) |
| T_a | `horizon_steps` | action chunk predicted |
| T_o | `cond_steps` | observation history (1 in the paper) |
| x_0 | `actions` | (B, T_a, D_a), normalised to [-1, 1] |
| s (obs) | `obs` | (B, T_o, D_o), normalised to [-1, 1] |

Loss: t ~ U{0..K-1}, ε ~ N(0, I), x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, MSE(ε_θ(x_t, t, s), ε).

Backbones: `mlp` (DiffusionMLP, paper App. D.1) and `unet` (UNet1D, `common/networks.py`: the reference's
`Unet1D`, which lets pre-training T_a differ from fine-tuning T_a). Defaults per task are the reference's
configs (`cfg/{gym,robomimic,furniture}/pretrain/*/pre_diffusion_{mlp,unet}.yaml`); the UNet's are listed in
docs/deviations.md (UNet1D). Gaussian and GMM policies are pre-trained inside
their own scripts (`gaussian_ppo.py`, `gmm_ppo.py`), see README.

Deviations from the reference implementation:
- Avoid: the paper trains with batch 16, lr 1e-4 -> 1e-5 for ~15000 epochs (App. D.8), hours on a
  CPU. Our default is batch 128, lr 1e-3 -> 1e-4, 300 epochs, so `python dppo_pretrain.py` finishes
  in a few minutes on 2 CPU cores; on the built-in M2 demos it gives both modes (44 % / 56 %) with
  <= 10 % collisions. `--paper-recipe` restores the paper's numbers.
- Evaluation rollouts during pre-training use the same `common.envs.evaluate` as fine-tuning.
- Several GPUs or processes (`torchrun --nproc-per-node N dppo_pretrain.py ...`, DistributedDataParallel; the reference
  trains on one device): every rank draws the same global batch, t and ε (same seed) and keeps its 1/N of the rows, so
  N processes take the single-process steps up to float summation order; only rank 0 writes the run folder
  (docs/deviations.md, "dppo_pretrain.py under torchrun").
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Annotated, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import pretraining, runs
from common.envs import evaluate, make_vec_env
from common.networks import ACTIVATIONS, DiffusionMLP
from common.unet import UNET_ACTIVATIONS, UNet1D
from common.normalizer import Normalizer
from common.tasks import get_task, missing_packages, refuse_pixel_task
from loaders.datasets import WindowDataset, load_task_dataset

Positive, NonNegative, Fraction = runs.POSITIVE, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py), e.g. avoid-m2, hopper, lift
    dataset: str | None = None  # a demonstration file, minari:<id> or paper (None: the task's; formats: README "Tasks")
    max_n_episodes: Annotated[int | None, Positive] = None  # pre-train on the dataset's first N episodes (App. B.2; None: all)
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (1: fastest, README "Threads"; None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    resume: str | None = None  # a run folder to continue from its checkpoint.pt, with the run's own arguments
    output: str | None = None  # also write the release checkpoint (header, normalisation, EMA: what fine-tuning reads) here
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (MUJOCO_GL=egl)
    save_every: Annotated[int, Positive] = 50  # epochs between checkpoints
    # algorithm (None: the task's value, printed at start; SUITE_DEFAULTS / TASK_DEFAULTS below)
    backbone: Literal["mlp", "unet"] = "mlp"  # `mlp` (DiffusionMLP) or `unet` (UNet1D)
    denoising_steps: Annotated[int | None, Positive] = None  # K: DDPM steps (None: 20; furniture 100)
    horizon_steps: Annotated[int | None, Positive] = None  # T_a (None: the task's; a UNet's transport and furniture 16)
    cond_steps: Annotated[int, Positive] = 1  # T_o
    mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # hidden widths of the MLP trunk (None: per task; MLP only)
    cond_mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # observation MLP before the trunk (Square: 512 64; MLP)
    activation: str | None = None  # relu (gym, Avoid) or mish (robomimic, furniture, every UNet); None: per task
    time_dim: Annotated[int | None, Positive] = None  # width of the denoising-step embedding (None: 16; square, furniture 32)
    use_layernorm: bool | None = None  # LayerNorm in the residual MLP blocks (None: no; furniture yes; MLP only)
    residual: bool = True  # residual MLP trunk (MLP only)
    unet_dim: Annotated[int | None, Positive] = None  # UNet1D base channels (None: 40; square, transport and furniture 64)
    unet_dim_mults: Annotated[tuple[int, ...] | None, Positive] = None  # UNet channel multipliers (None: 1 2; furniture 1 2 4)
    unet_groupnorm_eps: Annotated[float | None, Positive] = None  # GroupNorm eps (None: 1e-5; one-leg-low/lamp-low 1e-4)
    n_epochs: Annotated[int | None, Positive] = None  # passes over the dataset
    batch_size: Annotated[int | None, Positive] = None  # global minibatch (torchrun: batch_size / N rows per process)
    learning_rate: Annotated[float | None, Positive] = None  # peak learning rate
    min_lr: Annotated[float | None, Positive] = None  # final learning rate of the cosine schedule
    warmup_epochs: Annotated[int | None, NonNegative] = None  # linear warm-up epochs
    weight_decay: Annotated[float, NonNegative] = 1e-6  # AdamW weight decay
    ema_decay: Annotated[float, Fraction] = 0.995  # EMA decay
    ema_every: Annotated[int, Positive] = 10  # gradient steps between EMA updates
    ema_start_epoch: Annotated[int, NonNegative] = 20  # before this epoch the EMA is reset to the model
    eval_every: Annotated[int | None, NonNegative] = None  # epochs between evaluation rollouts (0: never)
    n_eval_envs: Annotated[int, Positive] = 50  # parallel envs in an evaluation
    paper_recipe: bool = False  # Avoid: the paper's batch 16, lr 1e-4 -> 1e-5, 15000 epochs instead of the fast default
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32
    fused_adam: bool = False  # fused AdamW: faster steps, the same update up to rounding (docs/results.md "Pre-training")
    flush_denormal: bool = True  # CPU: denormals (< 1e-38) as zero, faster Adam steps (docs/results.md "Pre-training")


# Per-task defaults (paper App. D.1, D.8, D.9); an explicit flag always wins.
SUITE_DEFAULTS = {
    "gym": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    "robomimic": dict(batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10, activation="mish",
                      mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    # furniture network: `irom-princeton/dppo` cfg/furniture/pretrain/one_leg_low/pre_diffusion_mlp.yaml
    "furniture": dict(denoising_steps=100, batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10,
                      activation="mish", mlp_dims=(1024,) * 7, cond_mlp_dims=(512, 64), time_dim=32, use_layernorm=True,
                      n_epochs=8000, eval_every=0),
    "avoid": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                  mlp_dims=(512, 512, 512), n_epochs=300, eval_every=50),
    # cfg/gym/pretrain/kitchen-*-v0/pre_diffusion_mlp.yaml (kitchen-partial's weight decay there: 1e-5)
    "kitchen": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="mish",
                    mlp_dims=(256, 256, 256), cond_mlp_dims=(128, 32), n_epochs=3000, eval_every=100),
}
PAPER_RECIPES = {"avoid": dict(batch_size=16, learning_rate=1e-4, min_lr=1e-5, n_epochs=15000, eval_every=1000)}
TASK_DEFAULTS = {
    "square": dict(mlp_dims=(1024, 1024, 1024), cond_mlp_dims=(512, 64), time_dim=32),
    "transport": dict(mlp_dims=(1024, 1024, 1024)), "kitchen-mixed": dict(batch_size=256),
}
# --backbone unet: `irom-princeton/dppo` cfg/{robomimic,furniture}/pretrain/*/pre_diffusion_unet.yaml (time embedding 16,
# Mish, kernel 5, 8 groups, FiLM scale, large FiLM encoder); gym and Avoid have no UNet config and get lift's network.
MLP_FLAGS = ("mlp_dims", "cond_mlp_dims", "use_layernorm", "residual")
UNET_GROUPS = 8  # GroupNorm groups of every reference UNet config
UNET_FLAGS = ("unet_dim", "unet_dim_mults", "unet_groupnorm_eps")
UNET_DEFAULTS = dict(time_dim=16, activation="mish", unet_dim=40, unet_dim_mults=(1, 2), unet_groupnorm_eps=1e-5)
UNET_SUITE_DEFAULTS = {"furniture": dict(unet_dim=64, unet_dim_mults=(1, 2, 4), horizon_steps=16)}
UNET_TASK_DEFAULTS = {"square": dict(unet_dim=64), "transport": dict(unet_dim=64, horizon_steps=16),
                      "one-leg-low": dict(unet_groupnorm_eps=1e-4), "lamp-low": dict(unet_groupnorm_eps=1e-4)}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: dppo_pretrain_pixel.py / dppo_finetune_pixel.py
    args.env_id = task.id
    unet = args.backbone == "unet"
    if not args.resume:  # a resumed run's arguments were checked when it started
        runs.refuse_flags(args, MLP_FLAGS if unet else UNET_FLAGS, f"does not apply to --backbone {args.backbone}")
    defaults = {"denoising_steps": 20, "time_dim": 16, "use_layernorm": False, **SUITE_DEFAULTS[task.suite],
                **TASK_DEFAULTS.get(task.id, {}), "horizon_steps": task.horizon_steps}
    if unet:
        defaults = {k: v for k, v in defaults.items() if k not in MLP_FLAGS}
        defaults.update({**UNET_DEFAULTS, **UNET_SUITE_DEFAULTS.get(task.suite, {}), **UNET_TASK_DEFAULTS.get(task.id, {})})
    if args.paper_recipe:
        defaults.update(PAPER_RECIPES.get(task.suite, {}))
    filled = runs.apply_defaults(args, defaults)
    runs.check_args(args)  # every number within the Limits of its field
    if task.suite == "furniture" and args.eval_every:  # Isaac Gym's envs are made by the fine-tuning scripts only
        raise runs.UsageError(f"--eval-every {args.eval_every}: furniture pre-training runs no evaluation rollouts; drop "
                              "it and evaluate the checkpoint with python -m sims.furniture dppo_finetune.py --eval-only")
    allowed = UNET_ACTIVATIONS if unet else tuple(ACTIVATIONS)
    if args.activation not in allowed:
        raise runs.UsageError(f"--activation {args.activation}: one of {', '.join(allowed)}")
    if unet and any(args.unet_dim * m % UNET_GROUPS for m in args.unet_dim_mults):
        raise runs.UsageError(f"--unet-dim {args.unet_dim} times each of --unet-dim-mults must be a multiple of "
                              f"{UNET_GROUPS} (the GroupNorm groups)")
    return filled


def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (reference `model/diffusion/sampling.py`, `cosine_beta_schedule`): ᾱ(i) = cos²(((i/K)+s)/(1+s)·π/2) /
    ᾱ(0); β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped to [0, 0.999].

    Float64. The reference (irom-princeton/dppo, model/diffusion/sampling.py, cosine_beta_schedule)
    evaluates the same float64 values and returns them cast to float32; everything derived from β is
    then computed in float32 (see `ddpm_coefficients`)."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)  # = i/K, evaluated as the reference does
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def build_network(backbone: str, arch: dict) -> nn.Module:
    if backbone == "mlp":
        return DiffusionMLP(**arch)
    if backbone == "unet":
        return UNet1D(**arch)
    raise ValueError(f"unknown backbone {backbone!r} (mlp or unet)")


def network_arch(args: Args, obs_dim: int, action_dim: int) -> dict:
    """Plain constructor arguments, stored in the checkpoint to rebuild the network."""
    if args.backbone == "mlp":
        return dict(action_dim=action_dim, horizon_steps=args.horizon_steps, obs_dim=obs_dim,
                    cond_steps=args.cond_steps, mlp_dims=list(args.mlp_dims),
                    cond_mlp_dims=list(args.cond_mlp_dims) if args.cond_mlp_dims else None,
                    activation=args.activation, residual=args.residual, time_dim=args.time_dim,
                    use_layernorm=args.use_layernorm)
    return dict(action_dim=action_dim, cond_dim=obs_dim * args.cond_steps, dim=args.unet_dim,
                dim_mults=list(args.unet_dim_mults), kernel_size=5, n_groups=UNET_GROUPS, time_dim=args.time_dim,
                cond_predict_scale=True, large_cond_encoder=True, groupnorm_eps=args.unet_groupnorm_eps,
                activation=args.activation)


def distributed_setup(batch_size: int, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun (WORLD_SIZE > 1, with RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT) this joins the process group, NCCL on CUDA (one GPU per LOCAL_RANK) and gloo on the CPU; otherwise it
    returns (0, 1, device) and does nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if batch_size % world:
        raise runs.UsageError(f"--batch-size {batch_size} is the global batch and must split evenly over the {world} "
                              "processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


USER_ERRORS = (runs.UsageError, runs.TaskError, runs.DatasetError, runs.NonFiniteError, OSError)  # one line (runs.cli)


@contextlib.contextmanager
def all_ranks_fail_together(world: int) -> Iterator[None]:
    """Under torchrun, an error raised in the block on one rank (what rank 0 alone sets up: its evaluation envs and the
    run folder) is raised on every rank, as the same one line (`runs.cli`), after the process group is left: no rank
    goes on into a collective that waits for a rank that has gone (gloo's "Connection closed by peer" traceback)."""
    failure = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every error is shared, then raised again
        failure = e
    if world > 1:
        kind = next((k for k in USER_ERRORS if isinstance(failure, k)), None)
        sent: list = [None] * world
        dist.all_gather_object(sent, None if failure is None else (kind and kind.__name__, str(failure)))
        first = next(((rank, s) for rank, s in enumerate(sent) if s is not None), None)
        if first is not None:
            dist.destroy_process_group()
            if failure is None:  # another rank's: the same type and line here
                rank, (name, text) = first
                kinds = {k.__name__: k for k in USER_ERRORS}
                failure = kinds[name](text) if name else RuntimeError(f"rank {rank} stopped: {text}")
    if failure is not None:
        raise failure


class DiffusionPolicy(nn.Module):
    """ε-network + DDPM schedule; `loss` for pre-training, `sample` for evaluation rollouts."""

    def __init__(self, network: nn.Module, denoising_steps: int, horizon_steps: int, action_dim: int) -> None:
        super().__init__()
        self.network, self.K = network, denoising_steps
        self.horizon_steps, self.action_dim = horizon_steps, action_dim
        # float32 from float32 β with the reference's operation order (irom-princeton/dppo,
        # model/diffusion/diffusion.py, DiffusionModel.__init__); see dppo_finetune.DiffusionPPO
        betas = cosine_beta_schedule(denoising_steps).float()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
        for name, value in dict(
            betas=betas, alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod - 1),
            posterior_var=(betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)).clamp(min=1e-20),
            mu_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            mu_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        ).items():
            self.register_buffer(name, value, persistent=False)

    def loss(self, obs: torch.Tensor, actions: torch.Tensor, network: nn.Module | None = None,
             rows: slice = slice(None)) -> torch.Tensor:
        """The denoising loss of a batch. Under torchrun every rank draws t and ε for the whole global batch (same seed,
        same numbers) and keeps its `rows`, through `network` (the DistributedDataParallel wrapper of `self.network`,
        which averages the gradients over the ranks): together the ranks take the single-process step."""
        t = torch.randint(0, self.K, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        x_t = self.sqrt_alphas_cumprod[t, None, None] * actions + self.sqrt_one_minus_alphas_cumprod[t, None, None] * noise
        network = self.network if network is None else network
        return F.mse_loss(network(x_t[rows], t[rows], obs[rows]), noise[rows])

    @torch.no_grad()
    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation sampling (reference `DiffusionModel.forward`): DDPM with std max(σ_t, 1e-3), none at t = 0; noise
        clamped ±3."""
        B = obs.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=obs.device)
        for t in range(self.K - 1, -1, -1):
            t_b = torch.full((B,), t, device=obs.device, dtype=torch.long)
            eps = self.network(x, t_b, obs)
            x0 = (self.sqrt_recip_alphas_cumprod[t] * x - self.sqrt_recipm1_alphas_cumprod[t] * eps).clamp(-1, 1)
            mean = self.mu_coef1[t] * x0 + self.mu_coef2[t] * x
            std = self.posterior_var[t].sqrt().clamp(min=1e-3) if t > 0 else 0.0
            x = mean + std * torch.randn_like(x).clamp(-3, 3)
        return x.clamp(-1, 1)


def main(args: Args) -> dict:
    resume_ckpt = None
    if args.resume:  # the run's own arguments; explicit flags win visibly or are refused
        resume_ckpt = pretraining.load_run(args.resume, "diffusion", "python dppo_pretrain.py")
        args = runs.resume_args(args, resume_ckpt["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    runs.check_output_path(args.output)
    # every rank is seeded alike on purpose: each draws the same global batch, t and ε and keeps its rows
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,
                                                 pretraining.mlp_shapes(args.batch_size, args.mlp_dims))
    pretraining.flush_denormals(args.flush_denormal)
    rank, world, device = distributed_setup(args.batch_size, device)
    is_main = rank == 0  # only rank 0 prints, evaluates and writes the run folder, checkpoints and logs
    if resume_ckpt is None and is_main:
        runs.print_defaults(task.id, filled)

    # Data: windows inside trajectories, min-max normalised to [-1, 1] (checked before anything is written).
    trajs, normalizer = load_task_dataset(task, args.dataset, max_n_episodes=args.max_n_episodes)  # the reference's statistics
    if resume_ckpt is not None:
        normalizer = Normalizer.from_state_dict(resume_ckpt["normalization"])
    data = WindowDataset(trajs, normalizer, args.horizon_steps, args.cond_steps, device=device)
    if world > 1 and len(data) < args.batch_size:
        raise runs.UsageError(f"--batch-size {args.batch_size} is more than the {len(data)} windows of the dataset; lower it")

    arch = network_arch(args, task.obs_dim, task.action_dim)
    policy = DiffusionPolicy(build_network(args.backbone, arch), args.denoising_steps, args.horizon_steps,
                             task.action_dim).to(device)
    ema = DiffusionPolicy(build_network(args.backbone, arch), args.denoising_steps, args.horizon_steps,
                          task.action_dim).to(device)
    ema.load_state_dict(policy.state_dict())
    ema.requires_grad_(False)
    # multi-tensor AdamW (the per-tensor loop's update bit for bit, fewer kernel launches) or, opt-in, the fused kernel
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **pretraining.adam_kernel(args.fused_adam))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretraining.warmup_then_cosine(args.learning_rate, args.min_lr,
                                                                                     args.warmup_epochs, args.n_epochs))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start_epoch, step, last_eval = 0, 0, {}
    if resume_ckpt is not None:
        start_epoch, step = pretraining.restore(resume_ckpt, os.path.join(args.resume, "checkpoint.pt"), policy.network,
                                                ema.network, optimizer, scheduler, generator, args.fused_adam)
        runs.check_resume_budget(args.resume, start_epoch, args.n_epochs, "--n-epochs", "epochs",  # nothing written yet
                                 left=f"--output {args.output}" if args.output and not os.path.isfile(args.output) else None)
    can_simulate = is_main and not missing_packages(task) and task.suite != "furniture" and args.eval_every
    if is_main and args.eval_every and missing_packages(task):  # said once; pre-training goes on without them
        print(f"no evaluation rollouts: {task.id} needs {' and '.join(missing_packages(task))}, which is not installed")
    if args.capture_video and not (not missing_packages(task) and task.suite != "furniture" and args.eval_every):
        raise runs.UsageError("--capture-video records evaluation rollouts, and this run has none (--eval-every 0 or no "
                              "simulator)")
    run = None
    with all_ranks_fail_together(world):  # e.g. an unwritable run folder ends every rank with rank 0's line
        if can_simulate:
            eval_envs = make_vec_env(task, args.n_eval_envs, seed=args.seed + 10_000, cond_steps=args.cond_steps,
                                     capture_video=args.capture_video)
        if is_main:  # keeps the rows up to the checkpoint's epoch
            run = runs.RunFolder(args, task.id, args.exp_name, args.seed, track=args.track,
                                 wandb_project=args.wandb_project_name, resume_dir=args.resume, resume_itr=start_epoch + 1)

    if world > 1:  # averages the gradients over the ranks during backward; each rank keeps its rows of the global batch
        ddp_network = DistributedDataParallel(policy.network, device_ids=[device.index] if device.type == "cuda" else None)
        rows = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    def run_evaluation(epoch: int) -> dict:
        ema.eval()

        def act(obs: np.ndarray) -> np.ndarray:
            o = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            return normalizer.unnormalize_action(ema.sample(o)).cpu().numpy()

        result = evaluate(eval_envs, act, task, task.act_steps, seed=args.seed + 10_000, index=epoch)
        run.log_eval(epoch, 0, "deterministic", result)
        run.scalars({f"eval/mode_{m}_fraction": f for m, f in result.get("mode_fractions", {}).items()}, epoch)
        if "collision_rate" in result:
            run.scalars({"eval/collision_rate": result["collision_rate"]}, epoch)
        return result

    def checkpoint(epoch: int) -> dict:
        return {
            "format": runs.CHECKPOINT_FORMAT, "policy": "diffusion", "backbone": args.backbone, "arch": arch,
            "task": task.id, "obs_dim": task.obs_dim, "action_dim": task.action_dim,
            "horizon_steps": args.horizon_steps, "cond_steps": args.cond_steps,
            "denoising_steps": args.denoising_steps, "normalization": normalizer.state_dict(), "args": runs.args_dict(args),
            "model": policy.network.state_dict(), "ema": ema.network.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            "epoch": epoch, "step": step,
        }

    if is_main:
        print(f"pre-training {task.id}: {len(trajs)} trajectories, {len(data)} windows, run folder {run.dir}"
              + (f", {world} processes" if world > 1 else ""))
    losses, t0 = [], time.time()
    bar = tqdm(range(start_epoch, args.n_epochs), initial=start_epoch, total=args.n_epochs, desc="epochs",
               disable=not is_main)
    for epoch in bar:
        policy.train()
        epoch_loss = torch.zeros((), device=device)
        n_batches = 0
        for obs, actions in data.iterate(args.batch_size, generator):
            loss = policy.loss(obs, actions) if world == 1 else policy.loss(obs, actions, ddp_network, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            n_batches += 1
            step += 1
            if step % args.ema_every == 0:  # EMA of the weights, reset to the model before ema_start_epoch
                pretraining.ema_update(ema, policy, args.ema_decay, reset=epoch < args.ema_start_epoch)
        scheduler.step()
        if world > 1:  # the mean of the ranks' losses is the global batch's loss
            dist.all_reduce(epoch_loss)
            epoch_loss /= world
        mean_loss = (epoch_loss / max(n_batches, 1)).item()  # one host sync per epoch
        runs.check_finite(f"epoch {epoch}", {"loss": mean_loss}, policy)
        losses.append(mean_loss)
        if not is_main:
            continue
        run.scalars({"losses/loss": mean_loss, "charts/learning_rate": optimizer.param_groups[0]["lr"],
                     "charts/SPS": step * args.batch_size / max(time.time() - t0, 1e-9)}, epoch)
        postfix = {"loss": f"{mean_loss:.4f}"}
        last_epoch = epoch + 1 == args.n_epochs
        if can_simulate and ((epoch + 1) % args.eval_every == 0 or last_epoch):
            last_eval = run_evaluation(epoch + 1)
            postfix["success"] = f"{last_eval['success_rate']:.2f}"
            postfix["return"] = f"{last_eval['return_mean']:.1f}"
            if "mode_fractions" in last_eval:
                postfix["modes"] = " ".join(f"{m}:{f:.2f}" for m, f in last_eval["mode_fractions"].items() if f > 0)
        bar.set_postfix(postfix)
        if (epoch + 1) % args.save_every == 0 or last_epoch:
            runs.save_checkpoint(run.checkpoint, checkpoint(epoch + 1))
    bar.close()
    if world > 1:
        # free DDP (its C++ Reducer holds the process group) while the group is still registered: dropped last by the
        # Reducer, a gloo group is destroyed holding the GIL its worker thread may need, and the process hangs at exit
        del ddp_network
        gc.collect()
        dist.barrier()  # rank 0 has written its last checkpoint
        dist.destroy_process_group()
    if not is_main:
        return {"run_dir": None, "checkpoint": None, "losses": losses, "eval": {}}

    if not os.path.isfile(run.checkpoint):
        runs.save_checkpoint(run.checkpoint, checkpoint(args.n_epochs))
    if args.output:  # the release form: what fine-tuning reads
        pretraining.write_release(run.checkpoint, args.output)
    if can_simulate:
        eval_envs.close()
    run.writer.close()
    summary = {k: v for k, v in last_eval.items() if k != "paths"}
    print(f"done in {time.time() - t0:.0f}s; checkpoint {run.checkpoint}; last evaluation {summary}")
    return {"run_dir": os.path.abspath(run.dir), "checkpoint": os.path.abspath(run.checkpoint), "losses": losses,
            "eval": last_eval}


if __name__ == "__main__":
    runs.cli(main, Args)
