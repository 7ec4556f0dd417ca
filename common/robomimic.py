"""Robomimic tasks (Lift, Can, Square, Transport) as gymnasium envs, plus scripted demonstrations.

`make_robomimic_env("lift")` builds the robosuite 1.4.1 env directly (not through robomimic) with
the settings the robomimic datasets were recorded with (ENVS.md "Robomimic tasks") and wraps it as
a `gymnasium.Env`:

- observation: float32 concat(robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos,
  [robot1 ditto for Transport], object) -> Lift 19, Can 23, Square 23, Transport 59
  (`env.obs_slices` names the slice of every key);
- action: Box [-1, 1]^7 (14 for Transport), OSC_POSE deltas (dx, dy, dz, drx, dry, drz, gripper
  with -1 open / +1 close);
- reward: robosuite's sparse reward, 1.0 on every step the task is solved (SPEC §8 computes
  success as "some executed chunk has mean reward >= 1" from these rewards);
- `truncated` after `task.max_episode_steps` (300/300/400/800); `terminated` only with
  `terminate_on_success=True` (off in the paper); `info["success"]`;
- `reset(seed=s)` makes the object placement and robot init noise reproducible: robosuite draws
  them from the global `np.random`, so every env keeps its own `np.random` state and swaps it in
  around robosuite's reset (other envs in the same process do not disturb it).
  `make_robomimic_env(task, seed)` also seeds the model build, where Lift's cube size is drawn, so
  env `seed + i` in a worker process starts exactly as it does here.

Throughput here (`python -m common.robomimic --benchmark`: 10 envs through `common.envs.make_vec_env`,
the path fine-tuning uses, 10 random chunks each; env steps/s on the otherwise idle 2-core machine,
load average 1.6-1.8 from the benchmark itself):

| task      | 1 worker (in-process) | 2 worker processes | one paper iteration of env stepping, 2 workers |
|-----------|-----------------------|--------------------|------------------------------------------------|
| Lift      | 232                   | 289                | 208 s (50 envs x 300 chunk-steps x 4 = 60k steps) |
| Can       | 183                   | 229                | 261 s (60k)                                    |
| Square    | 155                   | 240                | 333 s (50 x 400 x 4 = 80k)                     |
| Transport | 47                    | 71                 | 2251 s (50 x 400 x 8 = 160k)                   |

Use 2 workers on a 2-core machine (1.25-1.55x; the default is the number of cores). Env time only,
no policy inference.

`python -m common.robomimic --generate lift --n-demos 100 --seed 0 --out data/lift/scripted.hdf5`
writes scripted demonstrations in robomimic's hdf5 layout: a state machine on the privileged
object pose with randomised waypoints, P gain, phase durations and action noise; only successful
episodes are kept; a demo ends once the task has been solved for `--hold-steps` (10) steps.
Seed 0, 100 demos: Lift 100 % of episodes succeed, 47 steps on average; Can 100 %, 142 steps;
Square 88 %, 162 steps. (Robomimic's human demos are longer and less regular; these are for
tests and quick pre-training, not a substitute for the MH datasets.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np

from common.tasks import Task, TaskError, get_task, require_simulator

# OSC_POSE settings of the robomimic datasets (ENVS.md): input ±1 -> ±5 cm / ±0.5 rad per step.
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

# 96x96 cameras of the pixel variants (ENVS.md); used by the pixel-obs path (not built yet).
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

    metadata = {"render_modes": []}

    def __init__(self, task: Task | str, seed: int | None = None,
                 terminate_on_success: bool = False, render: bool = False) -> None:
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
            self.env = robosuite.make(self.task.env_name, **env_kwargs(self.task))
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

    def close(self) -> None:
        self.env.close()


def make_robomimic_env(task: Task | str, seed: int | None = None,
                       terminate_on_success: bool = False, render: bool = False) -> gym.Env:
    """A robomimic task as a gymnasium env (see the module docstring). `seed` seeds the model build
    (Lift's cube size is drawn then), the first reset and the action space; later `reset()` calls
    continue the env's own random stream. Use seed + i for the i-th of several envs."""
    env = RobomimicEnv(task, seed=seed, terminate_on_success=terminate_on_success, render=render)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


# ------------------------------------------------------------------------------------------------
# Scripted demonstrations (privileged object pose -> OSC_POSE delta actions)


def _yaw(quat_xyzw: np.ndarray) -> float:
    """Yaw of a frame's x axis projected on the table plane."""
    x, y, z, w = quat_xyzw
    return float(np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z)))


def _quat2mat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a unit quaternion in robosuite's (x, y, z, w) order."""
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _wrap(angle: float, period: float) -> float:
    return float((angle + period / 2) % period - period / 2)


SCRIPTED_TASKS = ("lift", "can", "square")


class ScriptedPolicy:
    """A state machine on the privileged object pose, in the OSC_POSE delta action space:
    approach above the grasp point (turning the gripper to the cube's face / across the nut's
    handle) -> descend -> close -> lift [Can, Square: -> carry over the goal (bin quadrant / square
    peg) -> lower -> release -> retreat upwards]. Waypoint offsets, P gain, phase durations and the
    action-noise level are drawn per episode from `rng`, so demos vary."""

    def __init__(self, env: RobomimicEnv, rng: np.random.Generator) -> None:
        self.task_id = env.task.id
        if self.task_id not in SCRIPTED_TASKS:
            raise TaskError(f"no scripted demonstrations for {self.task_id!r} "
                            f"(only {', '.join(SCRIPTED_TASKS)})")
        self.rng = rng
        self.gain = rng.uniform(10.0, 20.0)  # action per metre of position error (1 = 5 cm)
        self.noise = rng.uniform(0.0, 0.15)  # std of the Gaussian noise on every action
        self.above = rng.uniform(0.06, 0.12)  # approach height above the grasp point
        self.grasp_offset = rng.uniform([-0.008, -0.008, -0.01], [0.008, 0.008, 0.005])
        self.close_steps = int(rng.integers(6, 12))
        self.open_steps = int(rng.integers(4, 10))
        self.phase, self.phase_t = "approach", 0
        self.integral, self.leak, self.ki = np.zeros(3), 0.0, 0.0
        self.settled, self.settle_steps = 0, 1
        inner = env.env
        if self.task_id == "lift":
            self.carry_z = inner.model.mujoco_arena.table_offset[2] + rng.uniform(0.12, 0.2)
        elif self.task_id == "can":  # target quadrant of the goal bin
            self.goal = inner.target_bin_placements[inner.object_id].copy()
            self.goal[:2] += rng.uniform(-0.03, 0.03, 2)
            self.carry_z = inner.bin2_pos[2] + rng.uniform(0.2, 0.26)
            self.release_z = inner.bin2_pos[2] + rng.uniform(0.08, 0.13)
            self.place_tol = 0.015
            self.above = rng.uniform(0.08, 0.14)
            self.grasp_offset[2] = rng.uniform(-0.005, 0.015)
        else:  # square: grasp the handle, bring the nut's centre over the square peg, drop it
            table_z = inner.table_offset[2]
            self.goal = np.array(inner.sim.data.body_xpos[inner.peg1_body_id])
            self.handle = np.array([rng.uniform(0.055, 0.065), 0.0, 0.0])  # handle: 0.044-0.079
            self.grasp_offset = rng.uniform([-0.003, -0.003, -0.004], [0.003, 0.003, 0.004])
            self.carry_z = table_z + rng.uniform(0.18, 0.22)  # nut height (peg top: table + 0.13)
            self.release_z = table_z + rng.uniform(0.04, 0.06)
            self.place_tol, self.settle_steps = 0.006, 4
            self.leak, self.ki = 0.9, 0.3

    def _yaw_err(self, raw: dict[str, np.ndarray]) -> float:
        """Gripper yaw error: cube -> nearest face (90-degree symmetric), square nut -> fingers
        across the handle (180-degree symmetric), can -> none."""
        if self.task_id == "can":
            return 0.0
        period = np.pi / 2 if self.task_id == "lift" else np.pi
        return _wrap(_yaw(raw["object-state"][3:7]) - _yaw(raw["robot0_eef_quat"]), period)

    def _next(self, phase: str) -> None:
        self.phase, self.phase_t, self.settled = phase, 0, 0
        self.integral[:] = 0.0

    def _place(self, eef: np.ndarray, obj_pos: np.ndarray, z: float) -> np.ndarray:
        """eef target bringing the held object (can: the eef itself) over the goal at height z."""
        if self.task_id == "square":  # move the nut's centre, holding the eef-nut offset
            return eef + np.array([*self.goal[:2], z]) - obj_pos
        return np.array([*self.goal[:2], z])

    def __call__(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        eef = raw["robot0_eef_pos"]
        obj_pos, obj_quat = raw["object-state"][:3], raw["object-state"][3:7]
        held = obj_pos if self.task_id == "square" else eef  # what is brought to the goal
        grasp = obj_pos + self.grasp_offset
        if self.task_id == "square":
            grasp = grasp + _quat2mat(obj_quat) @ self.handle
        self.phase_t += 1
        if self.phase == "approach":
            target = grasp + [0.0, 0.0, self.above]
            err = target - eef
            if self.task_id == "can" and np.linalg.norm(err[:2]) > 0.03:
                target[2] = max(target[2], eef[2])  # stay high until above the can
            if (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02
                    and abs(self._yaw_err(raw)) < 0.05) or self.phase_t > 80:
                self._next("descend")
        if self.phase == "descend":
            target = grasp
            if np.linalg.norm(target - eef) < 0.01 or self.phase_t > 40:
                self._next("close")
                self.hold = eef.copy()
        if self.phase == "close":
            target = self.hold
            if self.phase_t > self.close_steps:
                self._next("lift")
        if self.phase == "lift":
            target = np.array([*self.hold[:2], eef[2] + self.carry_z - held[2]])
            if self.task_id != "lift" and held[2] > self.carry_z - 0.02:
                self._next("carry")
        if self.phase == "carry":
            target = self._place(eef, obj_pos, self.carry_z)
            near = np.linalg.norm(self.goal[:2] - held[:2]) < self.place_tol
            self.settled = self.settled + 1 if near else 0  # square: wait for the swing to stop
            if self.settled >= self.settle_steps or self.phase_t > 100:
                self._next("lower")
        if self.phase == "lower":
            target = self._place(eef, obj_pos, self.release_z)
            if held[2] < self.release_z + 0.01 or self.phase_t > 60:
                self._next("release")
                self.hold = eef.copy()
        if self.phase == "release":
            target = self.hold
            if self.phase_t > self.open_steps:
                self._next("retreat")
        if self.phase == "retreat":  # move up: robosuite's Can success needs the gripper away
            target = self.hold + [0.0, 0.0, 0.1]
        # leaky integral of the (clipped) error against the OSC's steady-state error; no wind-up
        self.integral = self.leak * self.integral + np.clip(target - eef, -0.01, 0.01)
        action = np.zeros(7)
        action[:3] = self.gain * (target - eef + self.ki * self.integral)
        if self.phase in ("approach", "descend"):
            action[5] = 2.0 * self._yaw_err(raw)
        action[6] = 1.0 if self.phase in ("close", "lift", "carry", "lower") else -1.0
        action[:6] += self.noise * self.rng.standard_normal(6) * [1, 1, 1, 0.2, 0.2, 0.2]
        return np.clip(action, -1.0, 1.0)


def rollout_scripted(env: RobomimicEnv, seed: int, hold_steps: int = 10) -> dict[str, Any] | None:
    """One scripted episode from reset(seed); the recorded demo (robomimic fields) if it succeeded.
    The demo ends once the task has been solved for `hold_steps` consecutive steps."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    policy = ScriptedPolicy(env, rng)
    keys = env.keys
    rec: dict[str, list] = {"states": [], "actions": [], "rewards": [], "obs": [], "next_obs": []}
    model_file = env.env.sim.model.get_xml()
    solved = 0
    for _ in range(env.task.max_episode_steps):
        raw = env.raw_obs
        rec["states"].append(np.array(env.env.sim.get_state().flatten()))
        rec["obs"].append({k: np.array(raw[env._rs_key(k)]) for k in keys})
        action = policy(raw)
        _, reward, _, _, info = env.step(action)
        rec["actions"].append(action)
        rec["rewards"].append(reward)
        rec["next_obs"].append({k: np.array(env.raw_obs[env._rs_key(k)]) for k in keys})
        solved = solved + 1 if info["success"] else 0
        if solved >= hold_steps:
            break
    if solved < hold_steps:
        return None
    n = len(rec["actions"])
    dones = np.zeros(n, dtype=np.int64)
    dones[-1] = 1
    return {
        "states": np.stack(rec["states"]),
        "actions": np.stack(rec["actions"]).astype(np.float64),
        "rewards": np.asarray(rec["rewards"], dtype=np.float64),
        "dones": dones,
        "obs": {k: np.stack([o[k] for o in rec["obs"]]) for k in keys},
        "next_obs": {k: np.stack([o[k] for o in rec["next_obs"]]) for k in keys},
        "model_file": model_file,
    }


def generate_demos(task: Task | str, n_demos: int, seed: int, out: str | Path,
                   max_attempts: int | None = None, valid_frac: float = 0.1,
                   hold_steps: int = 10,
                   log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Write `n_demos` successful scripted demos to `out` (robomimic hdf5 layout); returns stats."""
    import h5py

    task = _resolve(task)
    if task.id not in SCRIPTED_TASKS:
        raise TaskError(f"no scripted demonstrations for {task.id!r} "
                        f"(only {', '.join(SCRIPTED_TASKS)})")
    env = RobomimicEnv(task)
    max_attempts = max_attempts or 3 * n_demos + 10
    demos, attempts, t0 = [], 0, time.time()
    while len(demos) < n_demos and attempts < max_attempts:
        demo = rollout_scripted(env, seed=seed + attempts, hold_steps=hold_steps)
        attempts += 1
        if demo is not None:
            demos.append(demo)
        if log and attempts % 10 == 0:
            log(f"  {attempts} episodes, {len(demos)} successful ({time.time() - t0:.0f} s)")
    env.close()
    if len(demos) < n_demos:
        raise RuntimeError(f"only {len(demos)}/{n_demos} successful demos in {attempts} attempts")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [f"demo_{i}" for i in range(n_demos)]
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        total = 0
        for name, demo in zip(names, demos):
            g = data.create_group(name)
            n = len(demo["actions"])
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = demo["model_file"]
            total += n
            for field in ("states", "actions", "rewards", "dones"):
                g.create_dataset(field, data=demo[field])
            for group in ("obs", "next_obs"):
                for k, v in demo[group].items():
                    g.create_dataset(f"{group}/{k}", data=v)
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env_args(task))
        n_valid = int(round(valid_frac * n_demos)) if n_demos > 1 else 0
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array(names[: n_demos - n_valid], dtype="S"))
        mask.create_dataset("valid", data=np.array(names[n_demos - n_valid:], dtype="S"))
    lengths = [len(d["actions"]) for d in demos]
    return {"success_rate": len(demos) / attempts, "attempts": attempts, "n_demos": n_demos,
            "mean_length": float(np.mean(lengths)), "seconds": time.time() - t0}


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# SPEC §11: env steps of one paper fine-tuning iteration, 50 envs x n_steps chunk-steps x T_e.
PAPER_ITERATION_ENV_STEPS = {"lift": 50 * 300 * 4, "can": 50 * 300 * 4, "square": 50 * 400 * 4,
                             "transport": 50 * 400 * 8}


def measure_throughput(task: Task | str, num_envs: int = 10, chunk_steps: int = 10,
                       workers: tuple[int, ...] = (1, 2)) -> dict[int, dict[str, float]]:
    """Random-chunk env steps/s of `num_envs` envs through `common.envs.make_vec_env` (the path
    fine-tuning uses) with each number of worker processes (1: in-process): per wall-clock second,
    per CPU-second of all processes involved (which other jobs on a shared machine distort less),
    and the wall seconds one paper-size iteration of env stepping would take at that rate."""
    from common.envs import make_vec_env
    task = _resolve(task)
    out = {}
    for n in workers:
        envs = make_vec_env(task, num_envs, seed=0, n_workers=n)
        envs.reset(seed=0)
        shape = (num_envs, task.act_steps, task.action_dim)
        rng = np.random.default_rng(0)
        envs.step(rng.uniform(-1, 1, shape))  # numba compiles on the first step
        pids = getattr(envs, "worker_pids", [])  # none in-process
        t0, c0, w0 = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
        for _ in range(chunk_steps):
            envs.step(rng.uniform(-1, 1, shape))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0 + _cpu_seconds(pids) - w0
        envs.close()
        steps = num_envs * chunk_steps * task.act_steps
        out[n] = {"steps_per_s": steps / wall, "steps_per_cpu_s": steps / cpu,
                  "paper_iteration_s": PAPER_ITERATION_ENV_STEPS[task.id] / (steps / wall)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.robomimic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--generate", metavar="TASK", help="write scripted demos: lift, can or square")
    p.add_argument("--n-demos", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="hdf5 path (default data/<task>/scripted.hdf5)")
    p.add_argument("--hold-steps", type=int, default=10, help="solved steps before a demo ends")
    p.add_argument("--benchmark", nargs="*", metavar="TASK", help="measure env steps/s")
    args = p.parse_args(argv)
    try:
        if args.benchmark is not None:
            for name in args.benchmark or ["lift", "can", "square", "transport"]:
                for n, r in measure_throughput(name).items():
                    print(f"{name}: {n} worker{'s' if n > 1 else ''} {r['steps_per_s']:.0f} env steps/s "
                          f"({r['steps_per_cpu_s']:.0f} per CPU-s), one paper iteration of env stepping "
                          f"{r['paper_iteration_s']:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        if args.generate:
            task = _resolve(args.generate)
            out = args.out or f"data/{task.id}/scripted.hdf5"
            r = generate_demos(task, args.n_demos, args.seed, out, hold_steps=args.hold_steps)
            print(f"{task.id}: scripted success rate {r['success_rate']:.2f} "
                  f"({r['n_demos']}/{r['attempts']}), mean demo length {r['mean_length']:.1f} "
                  f"steps, {r['seconds']:.0f} s -> {out}")
        if not args.generate and args.benchmark is None:
            p.print_usage()
            return 2
    except (TaskError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
