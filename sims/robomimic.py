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

Pixel tasks (`lift-img`, `can-img`, `square-img`, `transport-img`; paper §5.3, App. D.5) use the same
env with robosuite's offscreen renderer (MuJoCo EGL, or OSMesa with `MUJOCO_GL=osmesa`): the
observation is a dict {"state": float32 proprio (9; Transport 18), "rgb": uint8 (3·cameras, H, W)}
with the reference's cameras (`PIXEL_CAMERAS`), 96×96 by default, any size. Images are upright: MuJoCo
renders rows bottom-up and robomimic's `EnvRobosuite.get_observation` flips them (`[::-1]`), which is the
orientation of robomimic's image datasets and of the reference's envs; we flip the same way.
`PixelChunkVecEnv` chunks and vectorises them (dict observations; worker processes started with `spawn`,
since a forked child cannot use the parent's GL context).
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np

from common.errors import TaskError
from common.tasks import Task, check_mujoco_gl, get_task, require_simulator
from common.vecenv import MultiStep, close_workers, serve_envs, start_workers

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

# cameras of the pixel variants (the reference's `image_keys`, cfg/robomimic/finetune/*/ft_ppo_diffusion_*_img.yaml)
PIXEL_CAMERAS: dict[str, tuple[str, ...]] = {
    "lift": ("robot0_eye_in_hand",),
    "can": ("robot0_eye_in_hand",),
    "square": ("agentview",),
    "transport": ("shouldercamera0", "shouldercamera1"),
}


def _no_macro_warning(record: logging.LogRecord) -> bool:
    return "macro" not in record.getMessage()


def _import_robosuite() -> Any:
    """robosuite (MUJOCO_GL checked first), without its three-line "no private macro file" warning on every import."""
    check_mujoco_gl()
    logger = logging.getLogger("robosuite_logs")
    if _no_macro_warning not in logger.filters:
        logger.addFilter(_no_macro_warning)
    import robosuite

    return robosuite


def _resolve(task: Task | str) -> Task:
    task = get_task(task) if isinstance(task, str) else task
    if task.suite not in ("robomimic", "robomimic-img"):
        raise TaskError(f"task {task.id!r} is not a robomimic task (lift, can, square, transport, or their -img variants)")
    return task


def num_robots(task: Task | str) -> int:
    return 2 if _resolve(task).env_name == "TwoArmTransport" else 1


def is_pixel(task: Task | str) -> bool:
    return _resolve(task).suite == "robomimic-img"


def obs_keys(task: Task | str) -> list[str]:
    """The robomimic obs keys concatenated (in this order) into the flat state observation (pixel tasks: the proprio)."""
    robots = [f"robot{i}_{k}" for i in range(num_robots(task)) for k in ROBOT_KEYS]
    return robots if is_pixel(task) else robots + ["object"]


def camera_names(task: Task | str) -> list[str]:
    """The cameras of a pixel task, in the order their images are stacked along the channels."""
    return _resolve(task).option("cameras", "").split(",") if is_pixel(task) else []


def image_keys(task: Task | str) -> list[str]:
    """robomimic obs keys of a pixel task's images (`<camera>_image`, HWC uint8 in the hdf5 files)."""
    return [f"{c}_image" for c in camera_names(task)]


def image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 16 or w < 16:  # the ViT's patch stem (k8 s4 then k3 s2) needs at least 16 pixels
        raise TaskError(f"image size {h}x{w}: at least 16x16")
    return int(h), int(w)


def env_kwargs(task: Task | str, image_size: int | tuple[int, int] = 96) -> dict[str, Any]:
    """robosuite.make kwargs of the dataset settings (JSON-serialisable; robomimic env_args); pixel tasks add
    the offscreen renderer and their cameras at `image_size` (an int or (H, W))."""
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
    if is_pixel(task):
        h, w = image_hw(image_size)
        kwargs.update(has_offscreen_renderer=True, use_camera_obs=True, camera_names=camera_names(task),
                      camera_heights=h, camera_widths=w)
    return kwargs


def env_args(task: Task | str, image_size: int | tuple[int, int] = 96) -> dict[str, Any]:
    """robomimic's `data` attr `env_args` (type 1 = robosuite)."""
    robosuite = _import_robosuite()
    task = _resolve(task)
    return {"env_name": task.env_name, "env_version": robosuite.__version__, "type": 1,
            "env_kwargs": env_kwargs(task, image_size)}


def upright(frame: np.ndarray) -> np.ndarray:
    """A robosuite camera frame (H, W, 3), rows bottom-up as MuJoCo renders them, turned upright (robomimic
    `EnvRobosuite.get_observation`: `di[k][::-1]`)."""
    return frame[::-1]


GL_HINT = ("offscreen rendering failed (MUJOCO_GL={gl}: {err}); pixel tasks need MuJoCo's EGL backend "
           "(apt-get install libegl1 libgl1-mesa-dri; runs on a GPU driver or Mesa's software renderer) or OSMesa "
           "(apt-get install libosmesa6, then MUJOCO_GL=osmesa)")


def _make_robosuite(task: Task, image_size: int | tuple[int, int], video_frames: bool = False) -> Any:
    robosuite = _import_robosuite()
    if not is_pixel(task):  # video frames: robosuite's offscreen renderer (a GL context; the physics is the same)
        return robosuite.make(task.env_name, **{**env_kwargs(task), "has_offscreen_renderer": video_frames})
    try:  # robosuite picks EGL unless MUJOCO_GL says osmesa/glx; GL libraries load at the first render context
        return robosuite.make(task.env_name, **env_kwargs(task, image_size))
    except (ImportError, OSError, RuntimeError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(GL_HINT.format(gl=os.environ.get("MUJOCO_GL", "egl"), err=msg)) from None


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
    """A robosuite 1.4.1 env with the robomimic dataset settings and a flat float32 state obs
    (pixel tasks: a dict of the proprio and the uint8 CHW camera images, see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"]}
    VIDEO_CAMERA = "agentview"
    """the camera of evaluation videos (`render()`, with `video_frames=True`)"""

    def __init__(self, task: Task | str, seed: int | None = None,
                 terminate_on_success: bool = False, render: bool = False, video_frames: bool = False,
                 image_size: int | tuple[int, int] = 96, max_episode_steps: int | None = None) -> None:
        self.task = _resolve(task)
        self.max_episode_steps = max_episode_steps or self.task.max_episode_steps
        require_simulator(self.task)
        if render and not is_pixel(self.task):
            raise TaskError(f"task {self.task.id!r} has state observations; camera observations are task "
                            f"{self.task.id}-img")
        self.pixel = is_pixel(self.task)
        self.image_size = image_hw(image_size) if self.pixel else None
        # building the model draws from np.random too (Lift's cube size): seed it with `seed`
        seeded = seed is not None
        with _global_np_random(np.random.RandomState(seed)) if seeded else contextlib.nullcontext():
            self.env = _make_robosuite(self.task, image_size, video_frames)
        self.render_mode = "rgb_array" if video_frames else None
        if video_frames and not self.pixel:  # (a pixel policy's own camera images must keep the scene's lighting)
            from sims.video import plain_lighting
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
        if self.pixel:
            self.image_keys = image_keys(self.task)
            rgb_shape = (3 * len(self.image_keys), *self.image_size)
            self.observation_space = gym.spaces.Dict({"state": self.observation_space,
                                                      "rgb": gym.spaces.Box(0, 255, rgb_shape, np.uint8)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.task.action_dim,), np.float32)
        self.raw_obs: dict[str, np.ndarray] = raw
        """robosuite's observation dict of the latest reset/step (scripted policies read it)"""
        self._rs: np.random.RandomState | None = None  # this env's own np.random stream
        self._t = 0

    @staticmethod
    def _rs_key(key: str) -> str:
        return "object-state" if key == "object" else key

    def _flat(self, raw: dict[str, np.ndarray]) -> Any:
        state = np.concatenate([raw[self._rs_key(k)] for k in self.keys]).astype(np.float32)
        if not self.pixel:
            return state
        # HWC uint8 per camera, flipped upright as robomimic does -> (3·cameras, H, W), cameras in the task's order
        # (reference `RobomimicImageWrapper.get_observation`)
        rgb = np.concatenate([upright(raw[k]).transpose(2, 0, 1) for k in self.image_keys])
        return {"state": state, "rgb": np.ascontiguousarray(rgb, dtype=np.uint8)}

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def reset(self, *, seed: int | None = None,
              options: dict | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None or self._rs is None:
            # gymnasium seeds self.np_random from `seed` (or OS entropy); derive robosuite's stream
            self._rs = np.random.RandomState(int(self.np_random.integers(2**31)))
        with _global_np_random(self._rs):  # object placement, robot init noise
            self.raw_obs = self.env.reset()
        self._t = 0
        return self._flat(self.raw_obs), {"success": False}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.raw_obs, reward, _, _ = self.env.step(action)
        self._t += 1
        success = self.is_success()
        terminated = self.terminate_on_success and success
        truncated = self._t >= self.max_episode_steps
        return self._flat(self.raw_obs), float(reward), terminated, truncated, {"success": success}

    def render(self) -> np.ndarray:
        """(VIDEO_SIZE, VIDEO_SIZE, 3) uint8 frame of the `agentview` camera (needs video_frames=True)."""
        from sims.video import VIDEO_SIZE
        return self.env.sim.render(camera_name=self.VIDEO_CAMERA, width=VIDEO_SIZE, height=VIDEO_SIZE)[::-1]

    def close(self) -> None:
        self.env.close()


def make_robomimic_env(task: Task | str, seed: int | None = None, terminate_on_success: bool = False,
                       render: bool = False, video_frames: bool = False, image_size: int | tuple[int, int] = 96,
                       max_episode_steps: int | None = None) -> gym.Env:
    """A robomimic task as a gymnasium env (see the module docstring). `seed` seeds the model build
    (Lift's cube size is drawn then), the first reset and the action space; later `reset()` calls
    continue the env's own random stream. Use seed + i for the i-th of several envs. `render`: camera
    observations (the pixel tasks); `video_frames`: `render()` gives evaluation-video frames."""
    env = RobomimicEnv(task, seed=seed, terminate_on_success=terminate_on_success, render=render,
                       video_frames=video_frames, image_size=image_size, max_episode_steps=max_episode_steps)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


class PixelChunkEnv:
    """One pixel env stepped in chunks of T_e actions (`common.vecenv.MultiStep`: rewards summed, early stop at done,
    the last T_o observations stacked per key, the first repeated after reset), with autoreset."""

    def __init__(self, task: Task | str, seed: int | None, act_steps: int, cond_steps: int,
                 image_size: int | tuple[int, int], terminate_on_success: bool,
                 max_episode_steps: int | None = None, video_stride: int = 0) -> None:
        env = make_robomimic_env(task, seed, terminate_on_success, image_size=image_size,
                                 max_episode_steps=max_episode_steps, video_frames=video_stride > 0)
        if video_stride:  # --capture-video: evaluation-video frames of this env (sims/video.py)
            from sims.video import RenderFrames
            env = RenderFrames(env, video_stride)
        self.frames_env = env  # RenderFrames while recording videos
        self.env = MultiStep(env, act_steps, cond_steps)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        return self.env.reset(seed=seed)[0]

    def step(self, chunk: np.ndarray) -> tuple[dict, dict, float, bool, bool, list[np.ndarray] | None]:
        """-> (obs after autoreset, final obs, summed reward, terminated, truncated, the chunk's video frames while
        recording (taken before the autoreset starts the next episode), else None)."""
        final, total, terminated, truncated, _ = self.env.step(chunk)
        frames = self.frames_env.pop_frames() if getattr(self.frames_env, "recording", False) else None
        obs = self.reset() if terminated or truncated else final
        return obs, final, total, terminated, truncated, frames

    def set_recording(self, on: bool) -> None:
        if hasattr(self.frames_env, "recording"):
            self.frames_env.recording = on
            self.frames_env.pop_frames()

    def close(self) -> None:
        self.env.close()


def _stack_dicts(ds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([d[k] for d in ds]) for k in ds[0]}


def _cat_dicts(ds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([d[k] for d in ds]) for k in ds[0]}


class _PixelEnvs:
    """A list of PixelChunkEnvs stepped one after another (in this process or in one worker)."""

    def __init__(self, fns: list[Callable[[], PixelChunkEnv]]) -> None:
        self.envs = [fn() for fn in fns]

    def reset(self, seeds: list[int | None]) -> dict[str, np.ndarray]:
        return _stack_dicts([env.reset(s) for env, s in zip(self.envs, seeds)])

    def step(self, actions: np.ndarray) -> tuple:
        out = [env.step(a) for env, a in zip(self.envs, actions)]
        frames = {i: o[5] for i, o in enumerate(out) if o[5] is not None}  # local env index -> frames
        return (_stack_dicts([o[0] for o in out]), _stack_dicts([o[1] for o in out]),
                np.array([o[2] for o in out], np.float32), np.array([o[3] for o in out]), np.array([o[4] for o in out]),
                frames)

    def set_recording(self, indices: list[int]) -> None:
        for i, env in enumerate(self.envs):
            env.set_recording(i in indices)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _pixel_worker(remote: Any, fns: list[Callable[[], PixelChunkEnv]]) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        envs = _PixelEnvs(fns)
        remote.send(("ok", None))
    except Exception as e:  # a GL failure in the worker reaches the parent as one line
        remote.send(("error", f"{type(e).__name__}: {e}"))
        return
    serve_envs(remote, envs)


class PixelChunkVecEnv:
    """`num_envs` pixel envs with the chunked vector-env protocol of `common.envs` (same-step autoreset,
    info["final_obs"]), observations as dicts {"state": (N, T_o, D_p) float32, "rgb": (N, T_o, C, H, W) uint8}.
    n_workers > 1: the envs are split over spawned worker processes."""

    def __init__(self, task: Task | str, num_envs: int, seed: int | None = None, act_steps: int | None = None,
                 cond_steps: int = 1, image_size: int | tuple[int, int] = 96, n_workers: int = 1,
                 terminate_on_success: bool = False, max_episode_steps: int | None = None,
                 capture_video: bool = False) -> None:
        task = _resolve(task)
        if not is_pixel(task):
            raise TaskError(f"task {task.id!r} has state observations; use common.envs.make_vec_env")
        require_simulator(task)
        check_mujoco_gl()  # here, before the workers start
        image_hw(image_size)
        self.num_envs, self.task = num_envs, task
        act_steps = act_steps or task.act_steps
        stride, self.video_fps = 0, None
        if capture_video:  # agentview frames of envs 0..VIDEO_EPISODES-1 (sims/video.py), at the control rate
            from sims.video import VIDEO_EPISODES, require_video, video_timing
            require_video(task)
            stride, self.video_fps = video_timing(float(env_kwargs(task)["control_freq"]))
        fns = [partial(PixelChunkEnv, task.id, None if seed is None else seed + i, act_steps, cond_steps, image_size,
                       terminate_on_success, max_episode_steps, stride if capture_video and i < VIDEO_EPISODES else 0)
               for i in range(num_envs)]
        n_workers = max(1, min(n_workers, num_envs))
        self._remotes, self._procs, self._local = [], [], None
        if n_workers == 1:
            self._splits = [np.arange(num_envs)]
            self._local = _PixelEnvs(fns)
            self.backend = "robosuite offscreen rendering (in-process)"
            return
        self.backend = f"robosuite offscreen rendering ({n_workers} spawned worker processes)"
        # (spawned, not forked: a GL context does not survive a fork)
        self._splits, self._remotes, self._procs = start_workers(_pixel_worker, fns, n_workers, "spawn")
        errors = [msg for status, msg in (r.recv() for r in self._remotes) if status == "error"]
        if errors:
            self.close()
            raise TaskError(f"a pixel env worker failed: {errors[0]}")

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        seeds = [[None if seed is None else seed + int(i) for i in idx] for idx in self._splits]
        if self._local is not None:
            return self._local.reset(seeds[0])
        for remote, s in zip(self._remotes, seeds):
            remote.send(("reset", s))
        return _cat_dicts(self._receive())

    def _receive(self) -> list[Any]:
        results = [remote.recv() for remote in self._remotes]
        for r in results:
            if isinstance(r, TaskError):  # raised in a worker (common.vecenv.serve_envs): one line here
                raise r
        return results

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._local is not None:
            obs, final, rew, term, trunc, frames = self._local.step(actions)
            return obs, rew, term, trunc, {"final_obs": final, **({"frames": frames} if frames else {})}
        for remote, idx in zip(self._remotes, self._splits):
            remote.send(("step", actions[idx]))
        res = self._receive()
        obs, final = _cat_dicts([r[0] for r in res]), _cat_dicts([r[1] for r in res])
        rew, term, trunc = (np.concatenate([r[k] for r in res]) for k in (2, 3, 4))
        frames = {int(idx[i]): f for r, idx in zip(res, self._splits) for i, f in r[5].items()}  # global env indices
        return obs, rew, term, trunc, {"final_obs": final, **({"frames": frames} if frames else {})}

    def set_recording(self, indices: list[int]) -> None:
        """Record the episodes of these envs (evaluation videos, `common.envs.evaluate`)."""
        if self._local is not None:
            self._local.set_recording(list(indices))
        for remote, idx in zip(self._remotes, self._splits):
            remote.send(("record", [int(j) for j, g in enumerate(idx) if g in indices]))

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        close_workers(self._remotes, self._procs)
