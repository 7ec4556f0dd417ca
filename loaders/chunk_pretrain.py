"""Behaviour-cloning pre-training of the chunk policies of `gaussian_ppo.py` and `gmm_ppo.py` (`--pretrain`): minimise
−log π(a|s) on demonstration windows, with the optimiser, schedule and EMA of `dppo_pretrain.py` (paper App. D.1).
The script hands over its policy (built after seeding), the negative log-likelihood and the sampler; `args` is the
script's `Args` (its pre-training group, seed, torch flags and run-folder flags)."""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common import pretraining, runs
from common.envs import evaluate, make_vec_env
from common.tasks import Task, missing_packages
from loaders.datasets import WindowDataset, load_task_dataset


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, reset: bool) -> None:
    """ema <- decay·ema + (1 - decay)·model, or a copy of the model while `reset` (the first epochs)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.copy_(p) if reset else p_ema.lerp_(p, 1 - decay)


def pretrain(args: Any, task: Task, make_policy: Callable[[], nn.Module],
             nll: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
             sample: Callable[[nn.Module, torch.Tensor, bool, float], torch.Tensor],
             header: Callable[[Any], dict]) -> dict:
    """`make_policy()`: the policy, built after seeding; `nll(policy, obs, actions)`: the minibatch's loss;
    `sample(policy, cond, deterministic, randn_clip)`: evaluation actions; `header(normalizer)`: the checkpoint header.
    Returns the run folder, the checkpoint, the per-epoch losses and the last evaluation."""
    if task.suite == "furniture" and args.eval_every:  # Isaac Gym's envs are made by the fine-tuning scripts only
        raise runs.UsageError(f"--eval-every {args.eval_every}: furniture pre-training runs no evaluation rollouts; drop "
                              "it and evaluate the checkpoint with the fine-tuning script's --eval-only")
    trajs, normalizer = load_task_dataset(task, args.dataset, max_n_episodes=args.max_n_episodes)  # checked before writing
    device = runs.seed_everything(args.seed, args.torch_deterministic, args.torch_threads, args.cuda)
    args.onednn_matmul = runs.apply_matmul_flags(args.float32_matmul_precision, args.onednn_matmul, device,  # results.md
                                                 pretraining.mlp_shapes(args.pretrain_batch_size, args.mlp_dims))  # "Speed"
    data = WindowDataset(trajs, normalizer, args.horizon_steps, args.cond_steps, device=device)
    policy = make_policy().to(device)
    ema = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = pretraining.warmup_then_cosine(args.learning_rate, args.min_lr, args.warmup_epochs, args.n_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    can_simulate = not missing_packages(task) and task.suite != "furniture" and args.eval_every
    if args.eval_every and missing_packages(task):  # said once; pre-training goes on without them
        print(f"no evaluation rollouts: {task.id} needs {' and '.join(missing_packages(task))}, which is not installed")
    if args.capture_video and not can_simulate:
        raise runs.UsageError("--capture-video records evaluation rollouts, and this run has none (--eval-every 0 or no "
                              "simulator)")
    if can_simulate:
        eval_envs = make_vec_env(task, args.n_eval_envs, seed=args.seed + 10_000, cond_steps=args.cond_steps,
                                 capture_video=args.capture_video)
    run = runs.RunFolder(args, task.id, args.exp_name, args.seed, track=args.track, wandb_project=args.wandb_project_name)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:  # the EMA; Avoid: with the training noise (App. D.8)
        x = sample(ema.eval(), normalizer.normalize_obs(torch.as_tensor(obs, device=device)), task.suite != "avoid",
                   args.randn_clip_value)
        return normalizer.unnormalize_action(x).cpu().numpy()

    print(f"pre-training a {header(normalizer)['policy']} policy on {task.id}: {len(trajs)} trajectories, {len(data)} "
          f"windows, run folder {run.dir}")
    losses, last_eval, step, t0 = [], {}, 0, time.time()
    bar = tqdm(range(args.n_epochs), desc="epochs")
    for epoch in bar:
        policy.train()
        epoch_loss, n_batches = torch.zeros((), device=device), 0
        for obs, actions in data.iterate(args.pretrain_batch_size, generator):
            loss = nll(policy, obs, actions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            n_batches += 1
            step += 1
            if step % args.ema_every == 0:  # EMA of the weights, reset to the model before ema_start_epoch
                ema_update(ema, policy, args.ema_decay, reset=epoch < args.ema_start_epoch)
        scheduler.step()
        losses.append((epoch_loss / max(n_batches, 1)).item())  # one host sync per epoch
        runs.check_finite(f"epoch {epoch}", {"loss": losses[-1]}, policy)
        run.scalars({"losses/loss": losses[-1], "charts/learning_rate": optimizer.param_groups[0]["lr"],
                     "charts/std": policy(data.obs[:1])[1].mean().item()}, epoch)
        postfix = {"loss": f"{losses[-1]:.4f}"}
        if can_simulate and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.n_epochs):
            last_eval = evaluate(eval_envs, act, task, task.act_steps, seed=args.seed + 10_000, index=epoch + 1)
            run.log_eval(epoch + 1, 0, "deterministic" if task.suite != "avoid" else "stochastic", last_eval)
            postfix.update(success=f"{last_eval['success_rate']:.2f}", ret=f"{last_eval['return_mean']:.1f}")
        bar.set_postfix(postfix)
        if (epoch + 1) % args.pretrain_save_every == 0 or epoch + 1 == args.n_epochs:
            runs.save_checkpoint(run.checkpoint, {**header(normalizer), "model": policy.state_dict(),
                                                  "ema": ema.state_dict(), "epoch": epoch + 1})
    bar.close()
    if args.output:  # the release form: what fine-tuning reads
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        runs.save_checkpoint(args.output, pretraining.release_checkpoint(torch.load(run.checkpoint, map_location="cpu",
                                                                             weights_only=True)))
    if can_simulate:
        eval_envs.close()
    run.writer.close()
    print(f"done in {time.time() - t0:.0f}s; checkpoint {run.checkpoint}; last evaluation "
          f"{ {k: v for k, v in last_eval.items() if k != 'paths'} }")
    return {"run_dir": os.path.abspath(run.dir), "checkpoint": os.path.abspath(run.checkpoint), "losses": losses,
            "eval": last_eval}
