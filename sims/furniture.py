"""Furniture-Bench (paper §5.3, App. D.7) as this project's chunked vector env, and the Isaac Gym launcher.

The simulator is `FurnitureRLSimEnv` of the ankile/furniture-bench fork: one object runs all N envs on the
GPU, `reset(env_idxs=None)` and `step(action (N, 10))` take and return batched torch tensors:
obs = {"robot_state": (N, 14), "parts_poses": (N, 7·(parts + 1))}, reward (N, 1) (1 at the step a part
pair becomes assembled), done (N, 1) (ignored, as the reference does), info; `env_steps` (N,) counts the
steps of each env's episode. `FurnitureChunkVecEnv` drives it the way the reference's
`FurnitureRLSimEnvMultiStepWrapper` (`irom-princeton/dppo`, `env/gym_utils/wrapper/furniture.py`) does, and
presents the protocol of `common/vecenv.py`: raw observations (N, T_o, D_o) with the quaternion of
`robot_state` replaced by its 6D rotation (58 = 16 + 42 for One-leg, 44 = 16 + 28 for Lamp/Round-table),
raw chunks (N, T_e, 10) (position, 6D rotation, gripper), the chunk's rewards summed (the reference's
`sparse_reward: True`), and same-step autoreset with `info["final_obs"]`.

What it adds to the reference (docs/deviations.md, "Furniture-Bench"):
- Truncation at the task's 700 / 1000 steps exactly: an env that reaches the limit inside a chunk
  collects no more reward in it and its final observation is the one at the limit (the batched simulator
  steps it on while other envs run; the reference counts the reward of those few extra steps).
- A guard against non-finite observations (the reference README warns that Isaac Gym can produce NaN
  observations; its wrapper does not handle them): an env whose observation becomes NaN/inf (or whose
  quaternion is zero) collects no more reward, its episode ends (truncated) with its last finite
  observation as the final one, it is reset, and the count is printed.
- Sim-to-real domain randomisation (App. D.7), off by default: Gaussian noise on every observation and on
  every executed action, with standard deviations in the dataset's normalised units ([-1, 1] per
  dimension), so 0.03 is the paper's action noise on the policy's sampled action.

The reference clamps normalised observations to [-5, 5]; given the dataset normaliser, so does this env
(in raw units: the values whose normalisation is ±5), which keeps the scripts' own normalisation as is.

Isaac Gym must be imported before torch. The scripts import torch first, so furniture runs go through
this module as a launcher, which imports Isaac Gym and then runs the script:

    python -m sims.furniture dppo_finetune.py --env-id one-leg-low --checkpoint CKPT ...
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "torch" not in sys.modules:  # the launcher: Isaac Gym before torch
    try:
        import isaacgym  # noqa: F401
    except ImportError:
        pass  # `launch` reports what to install

import importlib.util
import os
import runpy
from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from common.errors import NonFiniteError, TaskError
from common.rotations import quat_to_rot6d
from common.tasks import Task

LAUNCH_HINT = "python -m sims.furniture {script} --env-id {task} ..."
FORK_URL = "https://github.com/ankile/furniture-bench"


# ---------------------------------------------------------------- the furniture observation

def robot_state_to_6d(robot_state: torch.Tensor) -> torch.Tensor:
    """(..., 14) [pos 3, quat xyzw 4, linear vel 3, angular vel 3, gripper width 1] -> (..., 16), 6D in place
    of the quaternion (the fork's `proprioceptive_quat_to_6d_rotation`)."""
    return torch.cat([robot_state[..., :3], quat_to_rot6d(robot_state[..., 3:7]), robot_state[..., 7:]], dim=-1)


# ---------------------------------------------------------------- the simulator

def install_error() -> str | None:
    """One line naming what to install for FurnitureSim, or None when Isaac Gym and the fork are importable."""
    missing = []
    if importlib.util.find_spec("isaacgym") is None:
        missing.append("Isaac Gym Preview 4 (not on PyPI: https://developer.nvidia.com/isaac-gym, then "
                       "pip install -e isaacgym/python)")
    spec = importlib.util.find_spec("furniture_bench")
    if spec is None:
        missing.append(f"the furniture-bench fork (git clone {FORK_URL} && pip install -e furniture-bench)")
    elif not any(os.path.isfile(os.path.join(d, "envs", "furniture_rl_sim_env.py"))
                 for d in spec.submodule_search_locations or []):
        missing.append(f"the furniture-bench fork in place of the installed furniture-bench, which lacks "
                       f"FurnitureRLSimEnv (git clone {FORK_URL} && pip install -e furniture-bench)")
    if not missing:
        return None
    return "Furniture-Bench needs " + " and ".join(missing) + "; it runs on an NVIDIA GPU"


def make_sim(task: Task, num_envs: int, max_episode_steps: int, gpu_id: int = 0, headless: bool = True) -> Any:
    """The fork's `FurnitureRLSimEnv`, built with the reference's settings (`irom-princeton/dppo`,
    `env/gym_utils/__init__.py`, `make_async`, env_type furniture). Tests replace this function."""
    problem = install_error()
    if problem:
        raise TaskError(f"task {task.id!r}: {problem}")
    if "isaacgym" not in sys.modules:
        script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "SCRIPT.py"
        raise TaskError(f"task {task.id!r}: Isaac Gym must be imported before torch; start the script through "
                        f"the launcher: {LAUNCH_HINT.format(script=script, task=task.id)}")
    from furniture_bench.envs.furniture_rl_sim_env import FurnitureRLSimEnv
    from furniture_bench.envs.observation import DEFAULT_STATE_OBS

    return FurnitureRLSimEnv(
        act_rot_repr="rot_6d", action_type="pos", april_tags=False, concat_robot_state=True, ctrl_mode="diffik",
        obs_keys=DEFAULT_STATE_OBS, furniture=task.env_name, gpu_id=gpu_id, headless=headless, num_envs=num_envs,
        observation_space="state", randomness=task.option("randomness"), max_env_steps=max_episode_steps,
        record=False, pos_scalar=1, rot_scalar=1, stiffness=1_000, damping=200)


class FurnitureChunkVecEnv:
    """FurnitureSim's N GPU-batched envs as a chunked vector env (the protocol in `common/vecenv.py`).

    normalizer: the dataset's `Normalizer` (obs/action min and max); needed for the [-5, 5] observation
    clamp and for the noise, which are skipped without it (no noise is allowed then).
    """

    backend = "Isaac Gym (FurnitureRLSimEnv, sims/furniture.py)"

    def __init__(self, sim: Any, task: Task, act_steps: int, cond_steps: int = 1, max_episode_steps: int | None = None,
                 normalizer: Any = None, obs_noise_std: float = 0.0, action_noise_std: float = 0.0,
                 seed: int | None = None, log: Callable[[str], None] = print) -> None:
        if (obs_noise_std or action_noise_std) and normalizer is None:
            raise ValueError("observation / action noise is in normalised units and needs the dataset normaliser")
        self.sim, self.task, self.num_envs = sim, task, int(sim.num_envs)
        self.act_steps, self.cond_steps = act_steps, cond_steps
        self.max_episode_steps = max_episode_steps or task.max_episode_steps
        self.device = torch.device(getattr(sim, "device", "cpu"))
        self.obs_noise_std, self.action_noise_std, self.log = obs_noise_std, action_noise_std, log
        self.nonfinite_resets = 0
        """how many episodes the non-finite guard ended so far"""
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(0 if seed is None else seed)
        if normalizer is not None:  # per-dimension half ranges: one normalised unit in raw units
            f = lambda k: torch.as_tensor(getattr(normalizer, k), dtype=torch.float32, device=self.device)  # noqa: E731
            lo, hi, a_lo, a_hi = f("obs_min"), f("obs_max"), f("action_min"), f("action_max")
            self._obs_half, self._act_half = (hi - lo + 1e-6) / 2, (a_hi - a_lo + 1e-6) / 2
            self._obs_clip = (lo - 4 * self._obs_half, lo + 6 * self._obs_half)  # normalised -5 and +5
        else:
            self._obs_clip = None
        self._hist: deque[torch.Tensor] = deque(maxlen=cond_steps)

    # -- observations
    def _process(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sim observation -> (obs (N, D_o) as the policy sees it, finite (N,) bool)."""
        obs = torch.cat([robot_state_to_6d(raw["robot_state"].float()), raw["parts_poses"].float()], dim=-1)
        finite = torch.isfinite(obs).all(-1)  # NaN/inf anywhere, or a zero quaternion
        if obs.shape[-1] != self.task.obs_dim:
            raise TaskError(f"task {self.task.id!r}: FurnitureSim gives {obs.shape[-1]}-d observations, the task has "
                            f"{self.task.obs_dim}; is the installed furniture-bench the fork ({FORK_URL})?")
        if self.obs_noise_std:
            obs = obs + self.obs_noise_std * self._obs_half * torch.randn(obs.shape, generator=self._gen, device=self.device)
        if self._obs_clip is not None:
            obs = torch.maximum(torch.minimum(obs, self._obs_clip[1]), self._obs_clip[0])
        return obs, finite

    def _stacked(self) -> torch.Tensor:
        return torch.stack(list(self._hist), dim=1)  # (N, T_o, D_o)

    def _reset_sim(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset all envs (idx None) or those in idx; a reset that itself gives a non-finite observation is retried."""
        ids = torch.arange(self.num_envs, device=self.device) if idx is None else idx
        obs, finite = self._process(self.sim.reset() if idx is None else self.sim.reset(ids.to(torch.int32)))
        pending = ids
        for attempt in range(4):
            bad = pending[~finite[pending]]
            if len(bad) == 0:
                return obs, ids
            if attempt == 3:
                raise NonFiniteError(f"FurnitureSim gives non-finite observations after 4 resets of {len(bad)} env(s); "
                                     "the simulation is unstable (check the Isaac Gym install and the GPU)")
            self.log(f"furniture: {len(bad)} env(s) gave non-finite observations right after a reset; resetting them again")
            again, finite = self._process(self.sim.reset(bad.to(torch.int32)))
            obs[bad], pending = again[bad], bad
        raise AssertionError("unreachable")

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env. The simulator draws its initial states from torch's global RNG, which is not
        reseeded here (the reference does not seed Isaac Gym envs); `seed` reseeds the noise."""
        if seed is not None:
            self._gen.manual_seed(seed)
        obs, _ = self._reset_sim(None)
        self._hist.clear()
        self._hist.extend([obs] * self.cond_steps)
        return self._stacked().cpu().numpy()

    # -- one chunk-step
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """actions: (N, >= T_e, D_a) raw; the first T_e are executed."""
        chunk = torch.as_tensor(np.asarray(actions)[:, :self.act_steps], dtype=torch.float32, device=self.device)
        if self.action_noise_std:  # App. D.7: noise on the sampled action, in normalised units
            chunk = chunk + self.action_noise_std * self._act_half * torch.randn(chunk.shape, generator=self._gen,
                                                                                 device=self.device)
        n = self.num_envs
        reward = torch.zeros(n, device=self.device)
        broken = torch.zeros(n, dtype=torch.bool, device=self.device)
        for k in range(chunk.shape[1]):
            running = (self.sim.env_steps.to(self.device) < self.max_episode_steps) & ~broken
            if not running.any():
                break
            raw, r, _done, _info = self.sim.step(chunk[:, k])  # the sim's own `done` (all assembled) is ignored
            obs, finite = self._process(raw)
            newly_broken = running & ~finite
            broken |= newly_broken
            keep = running & finite
            reward += torch.where(keep, torch.nan_to_num(r.reshape(n).float()), torch.zeros_like(reward))
            last = self._hist[-1]
            self._hist.append(torch.where(keep[:, None], obs, last))
        truncated = (self.sim.env_steps.to(self.device) >= self.max_episode_steps) | broken
        final_obs = self._stacked()
        done_idx = truncated.nonzero().flatten()
        if len(done_idx):
            if broken.any():
                nb = int(broken.sum())
                self.nonfinite_resets += nb
                self.log(f"furniture: {nb} env(s) gave non-finite observations; their episodes end here (truncated) "
                         f"and they are reset ({self.nonfinite_resets} so far)")
            obs, ids = self._reset_sim(done_idx)
            for h in self._hist:
                h[ids] = obs[ids]
        info = {"final_obs": final_obs.cpu().numpy(), "nonfinite_resets": int(broken.sum())}
        return (self._stacked().cpu().numpy(), reward.cpu().numpy().astype(np.float32),
                np.zeros(n, bool), truncated.cpu().numpy(), info)

    def close(self) -> None:
        close = getattr(self.sim, "close", None)
        if callable(close):
            close()


def make_furniture_vec_env(task: Task, num_envs: int, act_steps: int, cond_steps: int = 1,
                           max_episode_steps: int | None = None, normalizer: Any = None, obs_noise_std: float = 0.0,
                           action_noise_std: float = 0.0, seed: int | None = None) -> FurnitureChunkVecEnv:
    """N envs of a furniture task on GPU 0 (`make_sim`), chunked."""
    steps = max_episode_steps or task.max_episode_steps
    sim = make_sim(task, num_envs, steps)
    return FurnitureChunkVecEnv(sim, task, act_steps, cond_steps, steps, normalizer, obs_noise_std, action_noise_std, seed)


# ---------------------------------------------------------------- the launcher
def launch(argv: list[str]) -> None:
    """`python -m sims.furniture SCRIPT.py ARGS...`: Isaac Gym is imported (above, before torch), then
    SCRIPT runs as `__main__` with ARGS."""
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        print(f"error: usage: {LAUNCH_HINT.format(script='SCRIPT.py', task='one-leg-low')} "
              "(SCRIPT.py: dppo_finetune.py, gaussian_ppo.py, ...)", file=sys.stderr)
        raise SystemExit(2)
    problem = install_error()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    launch(sys.argv[1:])
