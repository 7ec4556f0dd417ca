"""Franka Kitchen (`kitchen-complete`, `kitchen-partial`, `kitchen-mixed`) on gymnasium-robotics' `FrankaKitchen-v1`.

The reference fine-tunes on D4RL's mujoco-py kitchen (irom-princeton/dppo, cfg/gym/finetune/kitchen-*-v0), which does
not install on a current Python; its maintained successor is gymnasium-robotics' `FrankaKitchen-v1` with Minari's
`D4RL/kitchen/{complete,partial,mixed}-v2` datasets, recorded in it. Both the env and the Minari datasets give a dict
observation (`observation` 59: robot joint positions 9 and velocities 9, object positions 21 and velocities 20;
`achieved_goal` / `desired_goal`: a dict by task). `flat_obs` flattens it to D4RL's 60-dim layout, the reference's
`obs_dim: 60` (D4RL `KitchenBase._get_obs`: qp, obj_qp, goal): the robot joint positions (9), the object positions (21)
and the 30-dim goal, zero except at each task's joint indices, which hold its goal (`OBS_ELEMENT_INDICES` /
`OBS_ELEMENT_GOALS`, the same in D4RL and gymnasium-robotics). The velocities are dropped, as D4RL's observation has
none (docs/deviations.md "Franka Kitchen").

Reward (as D4RL's): the number of the task's four subtasks completed at that step (a subtask counts once), so an
episode's return is the number of subtasks completed; it terminates when all four are done, and is truncated at 280
steps. Success: all four completed (return >= 4).
"""

from __future__ import annotations

import contextlib
import io

import gymnasium as gym
import numpy as np

from common.errors import DatasetError
from common.tasks import Task

ROBOT_QPOS, OBJECT_QPOS = slice(0, 9), slice(18, 39)  # in the 59-dim `observation`
GOAL_DIM = 30  # D4RL's goal vector: one entry per joint position (robot 9 + objects 21)


def kitchen_tasks(task: Task) -> list[str]:
    """The four subtasks of a kitchen task (D4RL's TASK_ELEMENTS of its env)."""
    return task.option("tasks").split(",")


def goal_vector(desired_goal: dict[str, np.ndarray]) -> np.ndarray:
    """D4RL's 30-dim goal: zeros except each task's goal at its joint indices; (..., 30) for goals of shape (..., d)."""
    from gymnasium_robotics.envs.franka_kitchen.kitchen_env import OBS_ELEMENT_INDICES

    first = np.asarray(next(iter(desired_goal.values())))
    goal = np.zeros((*first.shape[:-1], GOAL_DIM))
    for name, value in desired_goal.items():
        goal[..., OBS_ELEMENT_INDICES[name]] = value
    return goal


def flat_obs(obs: dict) -> np.ndarray:
    """FrankaKitchen-v1's dict observation (one, or a Minari episode's (L+1, ...) arrays) -> D4RL's 60 (float32)."""
    o = np.asarray(obs["observation"])
    return np.concatenate([o[..., ROBOT_QPOS], o[..., OBJECT_QPOS], goal_vector(obs["desired_goal"])], -1).astype(np.float32)


def check_dataset_space(name: str, space: gym.spaces.Space, task: Task) -> None:
    """DatasetError (one line) unless a Minari dataset's observation space is FrankaKitchen-v1's for this task's subtasks."""
    inner = getattr(space, "spaces", {})
    goals = set(getattr(inner.get("desired_goal"), "spaces", {}))
    if getattr(inner.get("observation"), "shape", None) != (59,) or goals != set(kitchen_tasks(task)):
        raise DatasetError(f"{name} holds observations {space}, not FrankaKitchen-v1's for the subtasks of {task.id} "
                           f"({', '.join(kitchen_tasks(task))}); use minari:{task.data.split(':', 1)[1]}")


class FlatKitchen(gym.ObservationWrapper):
    """FrankaKitchen-v1 with D4RL's flat 60-dim observation (`flat_obs`)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (60,), np.float32)

    def observation(self, observation: dict) -> np.ndarray:
        return flat_obs(observation)


def make_kitchen_env(task: Task, max_episode_steps: int | None = None, render: bool = False) -> gym.Env:
    """One kitchen env of `task`; `max_episode_steps` None: the task's 280 (the reference's)."""
    with contextlib.redirect_stderr(io.StringIO()):  # its import prints a notice about the Adroit hand envs, not these
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
    env = gym.make(task.env_name, tasks_to_complete=kitchen_tasks(task), disable_env_checker=True,
                   max_episode_steps=max_episode_steps or task.max_episode_steps, render_mode="rgb_array" if render else None)
    return FlatKitchen(env)
