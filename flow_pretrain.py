"""Pre-training of a flow-matching policy (1-rectified flow) by behaviour cloning, as ReinFlow does it (Zhang et al.,
NeurIPS 2025, arXiv 2505.22094; code ReinFlow/ReinFlow, `model/flow/reflow.py` `ReFlow`, `agent/pretrain/
train_reflow_agent.py`; rectified flow: Liu et al., arXiv 2209.03003).

A velocity network v_θ(x_t, t, obs) is trained on demonstration windows to carry Gaussian noise x₀ to the action chunk
x₁ along straight lines, with an EMA copy of its weights; at inference K Euler steps integrate dx/dt = v_θ from
x₀ ~ N(0, I). Fine-tuning (`reinflow.py`) starts from the EMA weights of the checkpoint this script writes.

| symbol | here | shape / value |
|---|---|---|
| K | `denoising_steps` | Euler steps at inference (4; written to the checkpoint) |
| T_a | `horizon_steps` | action chunk predicted |
| T_o | `cond_steps` | observation history (1) |
| x₁ | `actions` | (B, T_a, D_a), normalised to [-1, 1] |
| x₀ | `x0` | (B, T_a, D_a), N(0, I) |
| t | `t` | (B,) in [0, 1): `--sample-t-type` uniform, logitnormal or beta (`ReFlow.sample_time`) |
| s (obs) | `obs` | (B, T_o, D_o), normalised to [-1, 1] |
| v_θ | `network` | `common.networks.DiffusionMLP` with a float time: ReinFlow's `FlowMLP` (tests/reference/README.md) |

Loss: x_t = t·x₁ + (1 − t)·x₀, MSE(v_θ(x_t, t, s), x₁ − x₀).
Sampling: x ← x + v_θ(x, t_k, s)/K for k = 0..K-1 at the times t_k = k/K, the grid of `reinflow.py` and of ReinFlow's
`PPOFlow.get_logprobs` (ReinFlow's `ReFlow.sample` evaluates at `torch.linspace(0, 1, K)` instead, i.e. 0, 1/3, 2/3, 1
for K = 4 with the same step 1/K; the tests match it with those times; docs/deviations.md), clamped to [-1, 1] after
every step (`--clip-intermediate-actions`, ReinFlow's pre-training evaluation and fine-tuning configs) or only after
the last.

Defaults per task: ReinFlow's `cfg/{gym,robomimic}/pretrain/<task>/pre_reflow_mlp.yaml` where it has one (Hopper 40 and
Walker2d 80 epochs with the cosine learning-rate cycle of 3000 epochs, so the rate stays near its peak; Transport;
Kitchen's network and schedule equal DPPO's); the other tasks (Avoid, HalfCheetah, Lift, Can, Square, furniture,
Kitchen partial/mixed) take DPPO's pre-training config of the task for data, network and epochs, as `dppo_pretrain.py`
(Avoid: its fast default, 300 epochs). K is 4 (every state task's `ft_ppo_reflow_mlp.yaml` uses 4). Deviations
(docs/deviations.md, "flow_pretrain.py"): Avoid samples t from ReFlow's `beta` law (ReinFlow has no Avoid config;
uniform t gave half the success at K = 4); evaluation rollouts use `common.envs.evaluate`; one process (no torchrun).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import pretraining, runs
from common.envs import evaluate, make_vec_env
from common.networks import ACTIVATIONS, DiffusionMLP
from common.normalizer import Normalizer
from common.tasks import get_task, missing_packages, refuse_pixel_task
from loaders.datasets import WindowDataset, load_task_dataset

Positive, NonNegative, Fraction = runs.POSITIVE, runs.NON_NEGATIVE, runs.FRACTION


@dataclass
class Args:
    # experiment
    env_id: str = "avoid-m2"  # task id (common/tasks.py), e.g. avoid-m2, hopper, lift
    dataset: str | None = None  # a demonstration file, minari:<id> or paper (None: the task's; formats: README "Tasks")
    max_n_episodes: Annotated[int | None, Positive] = None  # pre-train on the dataset's first N episodes (None: all)
    exp_name: str = runs.script_name(__file__)  # name of this experiment (part of the run folder)
    seed: Annotated[int, runs.SEED] = 1  # seed of the experiment
    torch_deterministic: bool = True  # sets torch.use_deterministic_algorithms
    cuda: bool = True  # use CUDA when available
    torch_threads: Annotated[int | None, Positive] = 1  # CPU threads of torch (1: fastest, README "Threads"; None: torch's)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "dppo"  # the wandb project
    resume: str | None = None  # a run folder to continue from its checkpoint.pt, with the run's own arguments
    output: str | None = None  # the release checkpoint (None: checkpoints/<env_id>_flow.pt, where reinflow.py looks)
    capture_video: bool = False  # record evaluation episodes as MP4 in the run folder's videos/ (MUJOCO_GL=egl)
    save_every: Annotated[int, Positive] = 50  # epochs between checkpoints
    # algorithm (None: the task's value, printed at start; SUITE_DEFAULTS / TASK_DEFAULTS below)
    denoising_steps: Annotated[int, Positive] = 4  # K: Euler steps of the evaluation (written to the checkpoint)
    clip_intermediate_actions: bool = True  # clamp x to [-1, 1] after every Euler step (else after the last only)
    sample_t_type: Literal["uniform", "logitnormal", "beta"] | None = None  # law of t in training (None: uniform; Avoid beta)
    horizon_steps: Annotated[int | None, Positive] = None  # T_a (None: the task's)
    cond_steps: Annotated[int, Positive] = 1  # T_o
    mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # hidden widths of the MLP trunk (None: per task)
    cond_mlp_dims: Annotated[tuple[int, ...] | None, Positive] = None  # observation MLP before the trunk (None: per task)
    activation: str | None = None  # relu (gym, Avoid, Transport) or mish (robomimic, furniture, kitchen); None: per task
    time_dim: Annotated[int | None, Positive] = None  # width of the time embedding (None: 16; square, transport 32)
    use_layernorm: bool | None = None  # LayerNorm in the residual MLP blocks (None: no; furniture yes)
    residual: bool = True  # residual MLP trunk
    n_epochs: Annotated[int | None, Positive] = None  # passes over the dataset
    batch_size: Annotated[int | None, Positive] = None  # minibatch
    learning_rate: Annotated[float | None, Positive] = None  # peak learning rate
    min_lr: Annotated[float | None, Positive] = None  # final learning rate of the cosine schedule
    warmup_epochs: Annotated[int | None, NonNegative] = None  # linear warm-up epochs
    lr_cycle_epochs: Annotated[int | None, Positive] = None  # epochs of warm-up plus cosine (None: n_epochs; ReinFlow 3000)
    weight_decay: Annotated[float, NonNegative] = 1e-6  # AdamW weight decay
    ema_decay: Annotated[float, Fraction] = 0.995  # EMA decay
    ema_every: Annotated[int, Positive] = 10  # gradient steps between EMA updates
    ema_start_epoch: Annotated[int, NonNegative] = 20  # before this epoch the EMA is reset to the model
    eval_every: Annotated[int | None, NonNegative] = None  # epochs between evaluation rollouts (0: never)
    n_eval_envs: Annotated[int, Positive] = 50  # parallel envs in an evaluation
    # speed (opt-in, same results; docs/results.md "Speed")
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32; medium: bf16 (AMX), ~1e-3 off
    onednn_matmul: Literal["auto", "on", "off"] = "auto"  # auto: CPU matmuls via oneDNN where checked float32
    fused_adam: bool = False  # fused AdamW: faster steps, the same update up to rounding (docs/results.md "Pre-training")
    flush_denormal: bool = True  # CPU: denormals (< 1e-38) as zero, faster Adam steps (docs/results.md "Pre-training")


# Per-task defaults; an explicit flag always wins. DPPO's pre-training configs (as dppo_pretrain.py) where ReinFlow has none.
SUITE_DEFAULTS = {
    "gym": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    "robomimic": dict(batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10, activation="mish",
                      mlp_dims=(512, 512, 512), n_epochs=3000, eval_every=100),
    "furniture": dict(batch_size=256, learning_rate=1e-4, min_lr=1e-5, warmup_epochs=10, activation="mish",
                      mlp_dims=(1024,) * 7, cond_mlp_dims=(512, 64), time_dim=32, use_layernorm=True, n_epochs=8000,
                      eval_every=0),
    "avoid": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="relu",
                  mlp_dims=(512, 512, 512), n_epochs=300, eval_every=50, sample_t_type="beta"),  # beta: docs/deviations.md
    # ReinFlow cfg/gym/pretrain/kitchen-complete-v0/pre_reflow_mlp.yaml = DPPO's kitchen configs
    "kitchen": dict(batch_size=128, learning_rate=1e-3, min_lr=1e-4, warmup_epochs=1, activation="mish",
                    mlp_dims=(256, 256, 256), cond_mlp_dims=(128, 32), n_epochs=3000, eval_every=100),
}
TASK_DEFAULTS = {  # ReinFlow cfg/{gym,robomimic}/pretrain/<task>/pre_reflow_mlp.yaml; square, kitchen-mixed: DPPO's
    "hopper": dict(n_epochs=40, lr_cycle_epochs=3000), "walker2d": dict(n_epochs=80, lr_cycle_epochs=3000),
    "transport": dict(mlp_dims=(1024, 1024, 1024), time_dim=32, activation="relu", warmup_epochs=100, n_epochs=50,
                      lr_cycle_epochs=3000),
    "square": dict(mlp_dims=(1024, 1024, 1024), cond_mlp_dims=(512, 64), time_dim=32), "kitchen-mixed": dict(batch_size=256),
}


def fill_defaults(args: Args) -> dict:
    """Fill the task's defaults into every flag left at None and check every number; returns what was filled."""
    task = get_task(args.env_id)
    refuse_pixel_task(task)  # camera observations: no pixel flow policy here
    args.env_id = task.id
    defaults = {"time_dim": 16, "use_layernorm": False, "sample_t_type": "uniform", **SUITE_DEFAULTS[task.suite],
                **TASK_DEFAULTS.get(task.id, {}), "horizon_steps": task.horizon_steps}
    filled = runs.apply_defaults(args, defaults)
    if args.lr_cycle_epochs is None:
        args.lr_cycle_epochs = args.n_epochs
    runs.check_args(args)  # every number within the Limits of its field
    if task.suite == "furniture" and args.eval_every:  # Isaac Gym's envs are made by the fine-tuning scripts only
        raise runs.UsageError(f"--eval-every {args.eval_every}: furniture pre-training runs no evaluation rollouts; drop it")
    if args.activation not in ACTIVATIONS:
        raise runs.UsageError(f"--activation {args.activation}: one of {', '.join(ACTIVATIONS)}")
    return filled


def network_arch(args: Args, obs_dim: int, action_dim: int) -> dict:
    """Plain constructor arguments of the velocity network (`DiffusionMLP`), stored in the checkpoint to rebuild it."""
    return dict(action_dim=action_dim, horizon_steps=args.horizon_steps, obs_dim=obs_dim, cond_steps=args.cond_steps,
                mlp_dims=list(args.mlp_dims), cond_mlp_dims=list(args.cond_mlp_dims) if args.cond_mlp_dims else None,
                activation=args.activation, residual=args.residual, time_dim=args.time_dim,
                use_layernorm=args.use_layernorm)


class FlowPolicy(nn.Module):
    """Velocity network + 1-rectified flow (ReinFlow `model/flow/reflow.py`, `ReFlow`); `loss` for pre-training,
    `sample` (K Euler steps) for evaluation."""

    def __init__(self, network: nn.Module, horizon_steps: int, action_dim: int, sample_t_type: str = "uniform") -> None:
        super().__init__()
        self.network, self.horizon_steps, self.action_dim = network, horizon_steps, action_dim
        self.sample_t_type = sample_t_type

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        """t (n,) in [0, 1) from the global torch stream (`ReFlow.sample_time` with its default parameters)."""
        if self.sample_t_type == "uniform":
            return torch.rand(n, device=device)
        if self.sample_t_type == "logitnormal":  # sigmoid of N(0, 1)
            return 1 / (1 + torch.exp(-torch.normal(0.0, 1.0, size=(n,), device=device)))
        if self.sample_t_type == "beta":  # 0.999·(1 − Beta(1.5, 1)): more weight near t = 0
            return 0.999 * (1 - torch.distributions.Beta(1.5, 1.0).sample((n,)).to(device))
        raise ValueError(f"unknown sample_t_type {self.sample_t_type!r}")

    def loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """MSE between v_θ(x_t, t, s) and x₁ − x₀ (`ReFlow.generate_target` then `ReFlow.loss`: t drawn before x₀)."""
        t = self.sample_time(actions.shape[0], actions.device)
        x0 = torch.randn_like(actions)
        x_t = t[:, None, None] * actions + (1 - t[:, None, None]) * x0
        return F.mse_loss(self.network(x_t, t, obs), actions - x0)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, K: int, clip_intermediate: bool = True, z: torch.Tensor | None = None,
               return_chain: bool = False, times: torch.Tensor | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """K Euler steps of 1/K from z (default x₀ ~ N(0, I)) at the times t_k = k/K (default; reinflow.py's grid) or
        `times` (`ReFlow.sample`'s are linspace(0, 1, K)); clamped to [-1, 1] after every step or only after the last.
        With `return_chain`, also (B, K + 1, T_a, D_a): z and every step's x."""
        B = obs.shape[0]
        x = torch.randn(B, self.horizon_steps, self.action_dim, device=obs.device) if z is None else z
        chain = [x]
        times = torch.linspace(0, 1 - 1 / K, K, device=obs.device) if times is None else times
        for i in range(K):
            x = x + self.network(x, times[i].expand(B), obs) * (1 / K)
            if clip_intermediate or i == K - 1:
                x = x.clamp(-1, 1)
            chain.append(x)
        return (x, torch.stack(chain, 1)) if return_chain else x


def main(args: Args) -> dict:
    resume_ckpt = None
    if args.resume:  # the run's own arguments; explicit flags win visibly or are refused
        resume_ckpt = pretraining.load_run(args.resume, "flow", "python flow_pretrain.py")
        args = runs.resume_args(args, resume_ckpt["args"], args.resume)
    filled = fill_defaults(args)
    task = get_task(args.env_id)
    output = args.output or runs.default_flow_checkpoint(task.id)
    runs.check_output_path(output)
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,
                                                 pretraining.mlp_shapes(args.batch_size, args.mlp_dims))
    pretraining.flush_denormals(args.flush_denormal)
    if resume_ckpt is None:
        runs.print_defaults(task.id, filled)

    # Data: windows inside trajectories, min-max normalised to [-1, 1] (checked before anything is written).
    trajs, normalizer = load_task_dataset(task, args.dataset, max_n_episodes=args.max_n_episodes)
    if resume_ckpt is not None:
        normalizer = Normalizer.from_state_dict(resume_ckpt["normalization"])
    data = WindowDataset(trajs, normalizer, args.horizon_steps, args.cond_steps, device=device)

    arch = network_arch(args, task.obs_dim, task.action_dim)
    policy = FlowPolicy(DiffusionMLP(**arch), args.horizon_steps, task.action_dim, args.sample_t_type).to(device)
    ema = FlowPolicy(DiffusionMLP(**arch), args.horizon_steps, task.action_dim, args.sample_t_type).to(device)
    ema.load_state_dict(policy.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **pretraining.adam_kernel(args.fused_adam))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretraining.warmup_then_cosine(
        args.learning_rate, args.min_lr, args.warmup_epochs, args.lr_cycle_epochs))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start_epoch, step, last_eval = 0, 0, {}
    if resume_ckpt is not None:
        start_epoch, step = pretraining.restore(resume_ckpt, os.path.join(args.resume, "checkpoint.pt"), policy.network,
                                                ema.network, optimizer, scheduler, generator, args.fused_adam)
        runs.check_resume_budget(args.resume, start_epoch, args.n_epochs, "--n-epochs", "epochs",  # nothing written yet
                                 left=f"--output {output}" if not os.path.isfile(output) else None)
    can_simulate = not missing_packages(task) and task.suite != "furniture" and bool(args.eval_every)
    if args.eval_every and missing_packages(task):  # said once; pre-training goes on without them
        print(f"no evaluation rollouts: {task.id} needs {' and '.join(missing_packages(task))}, which is not installed")
    if args.capture_video and not can_simulate:
        raise runs.UsageError("--capture-video records evaluation rollouts, and this run has none (--eval-every 0 or no "
                              "simulator)")
    if can_simulate:
        eval_envs = make_vec_env(task, args.n_eval_envs, seed=args.seed + 10_000, cond_steps=args.cond_steps,
                                 capture_video=args.capture_video)
    run = runs.RunFolder(args, task.id, args.exp_name, args.seed, track=args.track, wandb_project=args.wandb_project_name,
                         resume_dir=args.resume, resume_itr=start_epoch + 1)  # keeps the rows up to the checkpoint's epoch

    def run_evaluation(epoch: int) -> dict:
        ema.eval()

        def act(obs: np.ndarray) -> np.ndarray:  # the deterministic Euler chain from x₀ ~ N(0, I)
            o = normalizer.normalize_obs(torch.as_tensor(obs, device=device))
            x = ema.sample(o, args.denoising_steps, args.clip_intermediate_actions)
            return normalizer.unnormalize_action(x).cpu().numpy()

        result = evaluate(eval_envs, act, task, task.act_steps, seed=args.seed + 10_000, index=epoch)
        run.log_eval(epoch, 0, "deterministic", result)
        run.scalars({f"eval/mode_{m}_fraction": f for m, f in result.get("mode_fractions", {}).items()}, epoch)
        if "collision_rate" in result:
            run.scalars({"eval/collision_rate": result["collision_rate"]}, epoch)
        return result

    def checkpoint(epoch: int) -> dict:
        return {
            "format": runs.CHECKPOINT_FORMAT, "policy": "flow", "backbone": "mlp", "arch": arch,
            "task": task.id, "obs_dim": task.obs_dim, "action_dim": task.action_dim,
            "horizon_steps": args.horizon_steps, "cond_steps": args.cond_steps,
            "denoising_steps": args.denoising_steps, "normalization": normalizer.state_dict(), "args": runs.args_dict(args),
            "model": policy.network.state_dict(), "ema": ema.network.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            "epoch": epoch, "step": step,
        }

    print(f"pre-training a flow policy on {task.id}: {len(trajs)} trajectories, {len(data)} windows, run folder {run.dir}")
    losses, t0 = [], time.time()
    bar = tqdm(range(start_epoch, args.n_epochs), initial=start_epoch, total=args.n_epochs, desc="epochs")
    for epoch in bar:
        policy.train()
        epoch_loss = torch.zeros((), device=device)
        n_batches = 0
        for obs, actions in data.iterate(args.batch_size, generator):
            loss = policy.loss(obs, actions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            n_batches += 1
            step += 1
            if step % args.ema_every == 0:  # EMA of the weights, reset to the model before ema_start_epoch
                pretraining.ema_update(ema, policy, args.ema_decay, reset=epoch < args.ema_start_epoch)
        scheduler.step()
        mean_loss = (epoch_loss / max(n_batches, 1)).item()  # one host sync per epoch
        runs.check_finite(f"epoch {epoch}", {"loss": mean_loss}, policy)
        losses.append(mean_loss)
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

    if not os.path.isfile(run.checkpoint):
        runs.save_checkpoint(run.checkpoint, checkpoint(args.n_epochs))
    pretraining.write_release(run.checkpoint, output)  # the release form: what reinflow.py reads
    if can_simulate:
        eval_envs.close()
    run.writer.close()
    summary = {k: v for k, v in last_eval.items() if k != "paths"}
    print(f"done in {time.time() - t0:.0f}s; checkpoint {run.checkpoint}; release {output}; last evaluation {summary}")
    return {"run_dir": os.path.abspath(run.dir), "checkpoint": os.path.abspath(run.checkpoint), "output": output,
            "losses": losses, "eval": last_eval}


if __name__ == "__main__":
    runs.cli(main, Args)
