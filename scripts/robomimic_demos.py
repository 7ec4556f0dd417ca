"""Scripted robomimic demonstrations (Lift, Can, Square) in robomimic's hdf5 layout.

A state machine on the privileged object pose drives the env of `sims/robomimic.py` with the
same OSC_POSE delta actions as the datasets, with randomised waypoints, P gain, phase durations and
action noise; only successful episodes are kept; a demo ends once the task has been solved for
`--hold-steps` (10) steps. Run from the repository root:

    python scripts/robomimic_demos.py --task lift --n-demos 100 --seed 0 --out data/lift/scripted.hdf5
    python scripts/robomimic_demos.py --task lift --images --image-size 96 --n-demos 100 --out data/lift-img/scripted.hdf5

`--images` also renders the pixel task's cameras (`<camera>_image`, HWC uint8, upright, as robomimic's image datasets) so
the same file pre-trains `lift` and `lift-img` (offscreen rendering: slow on a CPU, ~0.1 s per step here).

The same `--seed` writes the same file (every array and attribute; the model build is seeded too, see
`generate_demos`).

Seed 0, 100 demos: Lift 100 % of episodes succeed, 47 steps on average; Can 100 %, 142 steps;
Square 88 %, 162 steps. (Robomimic's human demos are longer and less regular; these are for
tests and quick pre-training, not a substitute for the MH datasets.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import runs  # noqa: E402
from common.errors import TaskError, UsageError  # noqa: E402
from common.tasks import Task, get_task  # noqa: E402
from loaders.convert import OneLineParser  # noqa: E402
from sims.robomimic import RobomimicEnv, env_args, image_keys, obs_keys, upright  # noqa: E402


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
        self.task_id = env.task.id.removesuffix("-img")
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


def _record(env: RobomimicEnv, raw: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    """The recorded obs keys; camera images upright, as robomimic stores them."""
    return {k: np.array(upright(raw[k]) if k.endswith("_image") else raw[env._rs_key(k)]) for k in keys}


def rollout_scripted(env: RobomimicEnv, seed: int, hold_steps: int = 10,
                     keys: list[str] | None = None) -> dict[str, Any] | None:
    """One scripted episode from reset(seed); the recorded demo (robomimic fields) if it succeeded.
    The demo ends once the task has been solved for `hold_steps` consecutive steps. `keys`: the recorded obs keys
    (default: the env's own)."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    policy = ScriptedPolicy(env, rng)
    keys = keys or env.keys
    rec: dict[str, list] = {"states": [], "actions": [], "rewards": [], "obs": [], "next_obs": []}
    model_file = env.env.sim.model.get_xml()
    solved = 0
    for _ in range(env.task.max_episode_steps):
        raw = env.raw_obs
        rec["states"].append(np.array(env.env.sim.get_state().flatten()))
        rec["obs"].append(_record(env, raw, keys))
        action = policy(raw)
        _, reward, _, _, info = env.step(action)
        rec["actions"].append(action)
        rec["rewards"].append(reward)
        rec["next_obs"].append(_record(env, env.raw_obs, keys))
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
                   log: Callable[[str], None] | None = print, image_size: int | None = None) -> dict[str, float]:
    """Write `n_demos` successful scripted demos to `out` (robomimic hdf5 layout); returns stats. `image_size`: also
    record the pixel task's camera images at that size."""
    import h5py
    import mujoco

    task = get_task(task) if isinstance(task, str) else task
    task = get_task(task.id.removesuffix("-img"))
    if task.id not in SCRIPTED_TASKS:
        raise TaskError(f"no scripted demonstrations for {task.id!r} "
                        f"(only {', '.join(SCRIPTED_TASKS)})")
    keys = obs_keys(task)
    # `seed` also seeds the model build: robosuite draws Lift's cube size from the global np.random there (robosuite
    # 1.4.1 `models/objects/primitive/box.py` -> `utils/mjcf_utils.py` `get_size`), and with `hard_reset=False` every
    # demo keeps that model; unseeded, two runs with the same seed had different cubes (and so other actions/states).
    # The stored `model_file` is MuJoCo's `mj_saveLastXML` of the model (robosuite `utils/binding_utils.py`
    # `MjModel.get_xml`, as robomimic's `EnvRobosuite.get_state`), which writes each mesh's `content_type` only when
    # the mesh was read from its file, not from MuJoCo's process-wide asset cache: empty the cache so the file does not
    # depend on what this process built before (a second call in one process gave another `model_file`)
    mujoco.mj_clearCache(mujoco.mj_getCache())
    if image_size is not None:
        env_task = get_task(f"{task.id}-img")
        env = RobomimicEnv(env_task, seed=seed, image_size=image_size)
        keys = keys + image_keys(env_task)
    else:
        env = RobomimicEnv(task, seed=seed)
    max_attempts = max_attempts or 3 * n_demos + 10
    demos, attempts, t0 = [], 0, time.time()
    while len(demos) < n_demos and attempts < max_attempts:
        demo = rollout_scripted(env, seed=seed + attempts, hold_steps=hold_steps, keys=keys)
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
        data.attrs["env_args"] = json.dumps(env_args(task) if image_size is None else
                                            env_args(env_task, image_size))
        n_valid = int(round(valid_frac * n_demos)) if n_demos > 1 else 0
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array(names[: n_demos - n_valid], dtype="S"))
        mask.create_dataset("valid", data=np.array(names[n_demos - n_valid:], dtype="S"))
    lengths = [len(d["actions"]) for d in demos]
    return {"success_rate": len(demos) / attempts, "attempts": attempts, "n_demos": n_demos,
            "mean_length": float(np.mean(lengths)), "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description="Write scripted robomimic demos (hdf5).")
    p.add_argument("--task", required=True, help=f"one of {', '.join(SCRIPTED_TASKS)}")
    p.add_argument("--n-demos", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="hdf5 path (default data/<task>/scripted.hdf5)")
    p.add_argument("--hold-steps", type=int, default=10, help="solved steps before a demo ends")
    p.add_argument("--images", action="store_true", help="also record the pixel task's camera images")
    p.add_argument("--image-size", type=int, default=96, help="image height and width with --images")
    args = p.parse_args(argv)
    try:
        for flag, value, limits in (("--n-demos", args.n_demos, runs.POSITIVE), ("--seed", args.seed, runs.SEED),
                                    ("--hold-steps", args.hold_steps, runs.POSITIVE),
                                    ("--image-size", args.image_size, runs.POSITIVE)):
            runs.check_number(flag, value, limits)
        task = get_task(args.task)
        out = args.out or f"data/{task.id}/scripted.hdf5"
        runs.check_output_path(out, "--out")  # before the minutes of rollouts
        r = generate_demos(task, args.n_demos, args.seed, out, hold_steps=args.hold_steps,
                           image_size=args.image_size if args.images else None)
    except (UsageError, TaskError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # bad input, as runs.cli and every other tool
    print(f"{task.id}: scripted success rate {r['success_rate']:.2f} ({r['n_demos']}/{r['attempts']}), "
          f"mean demo length {r['mean_length']:.1f} steps, {r['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
