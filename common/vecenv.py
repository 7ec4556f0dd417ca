"""Environments as the DPPO scripts see them: chunked, vectorised, same-step autoreset.

Every vector env made by `common.envs.make_vec_env` follows one protocol (the reference's `MultiStep` wrapper
and vector env, `irom-princeton/dppo` `env/gym_utils/wrapper/multi_step.py`, with same-step autoreset):

    obs = envs.reset(seed)                      # (N, T_o, D_o) float32, raw (un-normalised)
    obs, reward, terminated, truncated, info = envs.step(chunks)   # chunks (N, T_e, D_a), raw
        reward: (N,) sum of the T_e rewards (a chunk stops early at done)
        an env whose episode ended is reset at once and `obs` holds the new episode's first
        observation; info["final_obs"] (N, T_o, D_o) holds what it would have returned without
        the reset (equal to obs elsewhere) — the state GAE bootstraps from on truncation.

`MultiStep` turns one gymnasium env into a chunked one; `SyncChunkVecEnv` runs a list of them in
this process, `ProcessChunkVecEnv` spreads them over a few worker processes (each worker steps its
share of envs serially, so 50 envs need only as many processes as cores). Avoid has its own
numpy-vectorised simulator with the same protocol (`sims/avoid.py`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np
import torch

from common.errors import TaskError


class ChunkVecEnv(Protocol):
    num_envs: int

    def reset(self, seed: int | None = None) -> np.ndarray: ...
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]: ...
    def close(self) -> None: ...


class MultiStep(gym.Wrapper):
    """One step = T_e env steps (paper §4.1 action chunks): rewards summed, early stop at done, last T_o
    observations stacked (the first one repeated after reset)."""

    def __init__(self, env: gym.Env, act_steps: int, cond_steps: int = 1) -> None:
        super().__init__(env)
        self.act_steps, self.cond_steps = act_steps, cond_steps
        self._obs: deque[Any] = deque(maxlen=cond_steps)
        obs_space, act_space = env.observation_space, env.action_space
        if isinstance(obs_space, gym.spaces.Box):  # (dict observations, the pixel tasks', are stacked per key)
            self.observation_space = gym.spaces.Box(
                np.stack([obs_space.low] * cond_steps).astype(np.float32),
                np.stack([obs_space.high] * cond_steps).astype(np.float32), dtype=np.float32)
        self.action_space = gym.spaces.Box(
            np.stack([act_space.low] * act_steps).astype(np.float32),
            np.stack([act_space.high] * act_steps).astype(np.float32), dtype=np.float32)

    def _stacked(self) -> Any:
        if isinstance(self._obs[0], dict):  # {"state": (T_o, D_p), "rgb": (T_o, C, H, W) uint8}
            return {k: np.stack([o[k] for o in self._obs]) for k in self._obs[0]}
        return np.stack(self._obs).astype(np.float32)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._obs.extend([obs] * self.cond_steps)
        return self._stacked(), info

    def step(self, chunk: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total, terminated, truncated, info = 0.0, False, False, {}
        for action in chunk[: self.act_steps]:
            obs, reward, terminated, truncated, info = self.env.step(action)
            self._obs.append(obs)
            total += float(reward)
            if terminated or truncated:
                break
        return self._stacked(), total, terminated, truncated, info


class SyncChunkVecEnv:
    """MultiStep envs stepped one after another in this process, with same-step autoreset."""

    backend = "gymnasium"
    video_fps: float | None = None  # set by make_vec_env when the envs render (--capture-video)

    def __init__(self, env_fns: list[Callable[[], gym.Env]]) -> None:
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self._recording: list[int] = []

    def set_recording(self, indices: list[int]) -> None:
        """Render frames of these envs (their RenderFrames wrapper) from now on, into info["frames"]."""
        from sims.video import RenderFrames

        self._recording = list(indices)
        for i, env in enumerate(self.envs):
            if isinstance(env.env, RenderFrames):
                env.env.recording = i in self._recording
                env.env.pop_frames()

    def reset(self, seed: int | None = None, seeds: list[int | None] | None = None) -> np.ndarray:
        if seeds is None:
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        return np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, seeds)])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, final_obs = [], []
        reward = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        frames = {}
        for i, env in enumerate(self.envs):
            o, reward[i], terminated[i], truncated[i], _ = env.step(actions[i])
            final_obs.append(o)
            if i in self._recording:  # the episode's frames, before an autoreset starts the next one's
                frames[i] = env.env.pop_frames()
            if terminated[i] or truncated[i]:
                o, _ = env.reset()
            obs.append(o)
        info = {"final_obs": np.stack(final_obs)}
        if self._recording:
            info["frames"] = frames
        return np.stack(obs), reward, terminated, truncated, info

    def close(self) -> None:
        for env in self.envs:
            env.close()


def default_n_workers() -> int:
    """The worker processes a vector env gets when none is asked for: one per core this process may run on
    (its CPU affinity, which a container or `taskset` narrows; `os.cpu_count()` counts the whole host)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _worker(remote: Any, env_fns: list[Callable[[], gym.Env]]) -> None:
    torch.set_num_threads(1)  # one core per worker: a worker's torch must not spread over the others'
    serve_envs(remote, SyncChunkVecEnv(env_fns))


def serve_envs(remote: Any, envs: Any) -> None:
    """A worker process's loop: the parent's step / reset / record / close commands run on `envs` (anything with
    step(actions), reset(seeds=...), set_recording(indices), close()); a TaskError goes back to be raised there."""
    while True:
        cmd, data = remote.recv()
        if cmd in ("step", "reset"):
            try:
                remote.send(envs.step(data) if cmd == "step" else envs.reset(seeds=data))
            except TaskError as e:  # e.g. --capture-video cannot render here: raised again in the parent, one line
                remote.send(e)
        elif cmd == "record":
            envs.set_recording(data)
        else:
            envs.close()
            remote.close()
            return


class ProcessChunkVecEnv:
    """The envs split over `n_workers` processes; each worker runs a SyncChunkVecEnv. One chunk-step is one
    round trip per worker: the parent sends every worker its actions, then collects the replies (the workers
    step in parallel meanwhile); docs/results.md "Env stepping vs worker count" measures what it costs."""

    video_fps: float | None = None

    def __init__(self, env_fns: list[Callable[[], gym.Env]], n_workers: int, context: str = "fork") -> None:
        self.num_envs = len(env_fns)
        self._splits, self._remotes, self._procs = start_workers(_worker, env_fns, n_workers, context)
        self.backend = f"gymnasium ({len(self._procs)} worker processes)"

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def reset(self, seed: int | None = None) -> np.ndarray:
        for remote, idx in zip(self._remotes, self._splits):
            remote.send(("reset", [None if seed is None else seed + int(i) for i in idx]))
        return np.concatenate(self._receive())

    def _receive(self) -> list[Any]:
        results = [remote.recv() for remote in self._remotes]
        for r in results:
            if isinstance(r, TaskError):
                raise r
        return results

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        for remote, idx in zip(self._remotes, self._splits):
            remote.send(("step", actions[idx]))
        results = self._receive()
        obs, rew, term, trunc = (np.concatenate([r[k] for r in results]) for k in range(4))
        info = {"final_obs": np.concatenate([r[4]["final_obs"] for r in results])}
        if any("frames" in r[4] for r in results):  # worker-local env indices -> global ones
            info["frames"] = {int(idx[i]): f for r, idx in zip(results, self._splits)
                              for i, f in r[4].get("frames", {}).items()}
        return obs, rew, term, trunc, info

    def set_recording(self, indices: list[int]) -> None:
        for remote, idx in zip(self._remotes, self._splits):
            remote.send(("record", [int(j) for j, g in enumerate(idx) if g in indices]))

    def close(self) -> None:
        close_workers(self._remotes, self._procs)


def start_workers(target: Callable[[Any, list[Callable[[], Any]]], None], env_fns: list[Callable[[], Any]],
                  n_workers: int, context: str) -> tuple[list[np.ndarray], list[Any], list[Any]]:
    """Split `env_fns` over min(n_workers, len) daemon processes, each running `target(pipe, its env_fns)`;
    returns (the env indices of each worker, the parent ends of the pipes, the processes)."""
    splits = np.array_split(np.arange(len(env_fns)), max(1, min(n_workers, len(env_fns))))
    ctx = mp.get_context(context)
    remotes, procs = [], []
    for idx in splits:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, [env_fns[i] for i in idx]), daemon=True)
        proc.start()
        child.close()
        remotes.append(parent)
        procs.append(proc)
    return splits, remotes, procs


def close_workers(remotes: list[Any], procs: list[Any]) -> None:
    """Ask every worker to close its envs, then wait for it (terminated after 5 s)."""
    for remote in remotes:
        try:
            remote.send(("close", None))
        except (BrokenPipeError, EOFError, OSError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
