"""A policy to start from without pre-training (`--from-scratch`, paper App. B.2, Fig. A6), loaded only on that path:
the env's own scales as the normalisation, and a random ε-network of the reference's scratch configs
(`cfg/gym/scratch/*/ppo_diffusion_mlp.yaml` and the baselines' `*_diffusion_mlp.yaml` there)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from common.envs import own_rng
from common.errors import TaskError
from common.networks import DiffusionMLP
from common.normalizer import Normalizer
from common.tasks import Task, require_simulator


def scratch_normalizer(task: Task) -> Normalizer:
    """The normalisation of a policy trained from scratch: the observation as the env gives it (min -1, max 1: the
    identity) and [-1, 1] mapped to the env's own action bounds (its gymnasium action space)."""
    require_simulator(task)
    env = gym.make(task.env_name)
    low, high = env.action_space.low, env.action_space.high
    env.close()
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise TaskError(f"{task.id}: --from-scratch needs finite action bounds")
    return Normalizer(-np.ones(task.obs_dim), np.ones(task.obs_dim), low, high)


def random_diffusion_policy(task: Task, horizon_steps: int, denoising_steps: int, seed: int) -> dict[str, Any]:
    """A diffusion checkpoint's header and weights (`ema`) for a random ε-network: the scratch configs' `DiffusionMLP`
    (time_dim 16, [512] x 3 ReLU, residual, T_o = 1) drawn from `seed` on its own stream, K = `denoising_steps`,
    normalised by `scratch_normalizer`."""
    arch = dict(action_dim=task.action_dim, horizon_steps=horizon_steps, obs_dim=task.obs_dim, cond_steps=1, time_dim=16,
                mlp_dims=[512, 512, 512], activation="relu", residual=True)
    with own_rng(seed):
        weights = DiffusionMLP(**arch).state_dict()
    return {"policy": "diffusion", "backbone": "mlp", "arch": arch, "task": task.id, "obs_dim": task.obs_dim,
            "action_dim": task.action_dim, "horizon_steps": horizon_steps, "cond_steps": 1,
            "denoising_steps": denoising_steps, "normalization": scratch_normalizer(task).state_dict(), "ema": weights}
