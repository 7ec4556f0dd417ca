"""Robomimic tasks (Lift, Can, Square, Transport) as gymnasium envs.

`make_robomimic_env("lift")` builds the robosuite 1.4.1 env directly (not through robomimic) with
the settings the robomimic datasets were recorded with (robomimic's dataset `env_args`) and wraps
it as a `gymnasium.Env`:

- observation: float32 concat(robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos,
  [robot1 ditto for Transport], object) -> Lift 19, Can 23, Square 23, Transport 59
  (`env.obs_slices` names the slice of every key);
- action: Box [-1, 1]^7 (14 for Transport), OSC_POSE deltas (dx, dy, dz, drx, dry, drz, gripper
  with -1 open / +1 close);
- reward: robosuite's sparse reward, 1.0 on every step the task is solved (success is "some
  executed chunk has mean reward >= 1", computed from these rewards);
- `truncated` after `task.max_episode_steps` (300/300/400/800); `terminated` only with
  `terminate_on_success=True` (off in the paper); `info["success"]`;
- `reset(seed=s)` makes the object placement and robot init noise reproducible: robosuite draws
  them from the global `np.random`, so every env keeps its own `np.random` state and swaps it in
  around robosuite's reset (other envs in the same process do not disturb it).
  `make_robomimic_env(task, seed)` also seeds the model build, where Lift's cube size is drawn, so
  env `seed + i` in a worker process starts exactly as it does here.

Measured env throughput (env steps/s, 1 and 2 worker processes): `benchmarks/env_throughput.py`.
Scripted demonstrations for these envs: `scripts/robomimic_demos.py`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import gymnasium as gym
import numpy as np

from common.tasks import Task, TaskError, get_task, require_simulator

# OSC_POSE settings of the robomimic datasets: input ±1 -> ±5 cm / ±0.5 rad per step.
CONTROLLER_CONFIG: dict[str, Any] = {
    "type": "OSC_POSE",
    "input_max": 1,
    "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150,
    "damping_ratio": 1,
    "impedance_mode": "fixed",
    "kp_limits": [0, 300],
    "damping_ratio_limits": [0, 10],
    "position_limits": None,
    "orientation_limits": None,
    "uncouple_pos_ori": True,
    "control_delta": True,
    "interpolation": None,
    "ramp_ratio": 0.2,
}

ROBOT_KEYS = ("eef_pos", "eef_quat", "gripper_qpos")
"""per-robot proprio keys of the state observation, in order (robosuite name: robot{i}_{key})"""

# 96x96 cameras of the pixel variants; used by the pixel-obs path (not built yet).
PIXEL_CAMERAS: dict[str, tuple[str, ...]] = {
    "lift": ("robot0_eye_in_hand",),
    "can": ("robot0_eye_in_hand",),
    "square": ("agentview",),
    "transport": ("shouldercamera0", "shouldercamera1"),
}


def _no_macro_warning(record: logging.LogRecord) -> bool:
    return "macro" not in record.getMessage()


def _import_robosuite() -> Any:
    """robosuite, without its three-line "no private macro file" warning on every import."""
    logger = logging.getLogger("robosuite_logs")
    if _no_macro_warning not in logger.filters:
        logger.addFilter(_no_macro_warning)
    import robosuite

    return robosuite


def _resolve(task: Task | str) -> Task:
    task = get_task(task) if isinstance(task, str) else task
    if task.suite != "robomimic":
        raise TaskError(f"task {task.id!r} is not a robomimic task (lift, can, square, transport)")
    return task


def num_robots(task: Task | str) -> int:
    return 2 if _resolve(task).env_name == "TwoArmTransport" else 1


def obs_keys(task: Task | str) -> list[str]:
    """The robomimic obs keys concatenated (in this order) into the flat state observation."""
    robots = [f"robot{i}_{k}" for i in range(num_robots(task)) for k in ROBOT_KEYS]
    return robots + ["object"]


def env_kwargs(task: Task | str) -> dict[str, Any]:
    """robosuite.make kwargs of the dataset settings (JSON-serialisable; robomimic env_args)."""
    task = _resolve(task)
    kwargs: dict[str, Any] = {
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": 20,
        "controller_configs": dict(CONTROLLER_CONFIG),
        "robots": ["Panda"] * num_robots(task),
        "camera_depths": False,
        "camera_heights": 84,
        "camera_widths": 84,
        "reward_shaping": False,
        "hard_reset": False,
    }
    if num_robots(task) == 2:
        kwargs["env_configuration"] = "single-arm-opposed"
    return kwargs


def env_args(task: Task | str) -> dict[str, Any]:
    """robomimic's `data` attr `env_args` (type 1 = robosuite)."""
    robosuite = _import_robosuite()
    task = _resolve(task)
    return {"env_name": task.env_name, "env_version": robosuite.__version__, "type": 1,
            "env_kwargs": env_kwargs(task)}


@contextlib.contextmanager
def _global_np_random(rs: np.random.RandomState) -> Iterator[None]:
    """Let robosuite, which draws from the global `np.random`, draw from `rs` instead."""
    outer = np.random.get_state()
    np.random.set_state(rs.get_state())
    try:
        yield
    finally:
        rs.set_state(np.random.get_state())
        np.random.set_state(outer)


class RobomimicEnv(gym.Env):
    """A robosuite 1.4.1 env with the robomimic dataset settings and a flat float32 state obs."""

    metadata = {"render_modes": ["rgb_array"]}
    VIDEO_CAMERA = "agentview"
    """the camera of evaluation videos (`render()`, with `video_frames=True`)"""

    def __init__(self, task: Task | str, seed: int | None = None,
                 terminate_on_success: bool = False, render: bool = False, video_frames: bool = False) -> None:
        self.task = _resolve(task)
        require_simulator(self.task)
        if render:
            # TODO(pixel obs, later issue): has_offscreen_renderer=True, use_camera_obs=True,
            # camera_names=PIXEL_CAMERAS[self.task.id], camera_heights/widths=96, MUJOCO_GL=egl; obs
            # becomes a dict {"state": proprio (9/18), "rgb": uint8 (C*cams, 96, 96)}; vector envs
            # then need context="spawn" (fork hangs after the parent made a GL context).
            raise NotImplementedError("pixel observations (render=True) are not implemented yet")
        robosuite = _import_robosuite()
        # building the model draws from np.random too (Lift's cube size): seed it with `seed`
        seeded = seed is not None
        with _global_np_random(np.random.RandomState(seed)) if seeded else contextlib.nullcontext():
            # video frames: robosuite's offscreen renderer (a GL context; the physics is the same)
            self.env = robosuite.make(self.task.env_name, **{**env_kwargs(self.task), "has_offscreen_renderer": video_frames})
        self.render_mode = "rgb_array" if video_frames else None
        if video_frames:
            from common.video import plain_lighting
            plain_lighting(self.env.sim.model._model)
        self.terminate_on_success = terminate_on_success
        self.keys = obs_keys(self.task)
        self.obs_slices: dict[str, slice] = {}
        raw = self.env._get_observations(force_update=True)
        start = 0
        for key in self.keys:
            n = raw[self._rs_key(key)].size
            self.obs_slices[key] = slice(start, start + n)
            start += n
        assert start == self.task.obs_dim, (start, self.task.obs_dim)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (start,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.task.action_dim,), np.float32)
        self.raw_obs: dict[str, np.ndarray] = raw
        """robosuite's observation dict of the latest reset/step (scripted policies read it)"""
        self._rs: np.random.RandomState | None = None  # this env's own np.random stream
        self._t = 0

    @staticmethod
    def _rs_key(key: str) -> str:
        return "object-state" if key == "object" else key

    def _flat(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([raw[self._rs_key(k)] for k in self.keys]).astype(np.float32)

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def reset(self, *, seed: int | None = None,
              options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None or self._rs is None:
            # gymnasium seeds self.np_random from `seed` (or OS entropy); derive robosuite's stream
            self._rs = np.random.RandomState(int(self.np_random.integers(2**31)))
        with _global_np_random(self._rs):  # object placement, robot init noise
            self.raw_obs = self.env.reset()
        self._t = 0
        return self._flat(self.raw_obs), {"success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.raw_obs, reward, _, _ = self.env.step(action)
        self._t += 1
        success = self.is_success()
        terminated = self.terminate_on_success and success
        truncated = self._t >= self.task.max_episode_steps
        return self._flat(self.raw_obs), float(reward), terminated, truncated, {"success": success}

    def render(self) -> np.ndarray:
        """(VIDEO_SIZE, VIDEO_SIZE, 3) uint8 frame of the `agentview` camera (needs video_frames=True)."""
        from common.video import VIDEO_SIZE
        return self.env.sim.render(camera_name=self.VIDEO_CAMERA, width=VIDEO_SIZE, height=VIDEO_SIZE)[::-1]

    def close(self) -> None:
        self.env.close()


def make_robomimic_env(task: Task | str, seed: int | None = None, terminate_on_success: bool = False,
                       render: bool = False, video_frames: bool = False) -> gym.Env:
    """A robomimic task as a gymnasium env (see the module docstring). `seed` seeds the model build
    (Lift's cube size is drawn then), the first reset and the action space; later `reset()` calls
    continue the env's own random stream. Use seed + i for the i-th of several envs."""
    env = RobomimicEnv(task, seed=seed, terminate_on_success=terminate_on_success, render=render, video_frames=video_frames)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env
