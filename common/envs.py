"""The envs of a task as the scripts make and evaluate them: the factory `make_vec_env` (Avoid, gym locomotion on
envpool or gymnasium, robomimic, Franka Kitchen, Furniture-Bench; a simulator of `sims/` is imported only when a task of
its suite is made, and `sims/video.py` only with `capture_video`), the episode tracker, running reward scaling, and
`evaluate`, the one evaluation function of every script. Every env follows the chunked vector-env protocol of
`common/vecenv.py`.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np
import torch

from common.errors import NonFiniteError, TaskError
from common.tasks import Task, check_mujoco_gl, require_simulator
from common.vecenv import ChunkVecEnv, MultiStep, ProcessChunkVecEnv, SyncChunkVecEnv, default_n_workers


# Independent random streams of one run, told apart by their number (`stream_seed`): the training draws (sampling
# noise of the rollouts, minibatches) and the evaluations' (docs/deviations.md "Evaluation draws from its own stream").
TRAINING_STREAM, EVAL_STREAM = 0, 1


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """A 63-bit seed for stream `stream` (and its `index`-th member, e.g. the evaluation at iteration `index`) of the run
    seeded `seed`; numpy's SeedSequence makes distinct (seed, stream, index) give unrelated streams."""
    return int(np.random.SeedSequence([seed % 2**64, stream, index]).generate_state(1, np.uint64)[0]) >> 1


@contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Inside the block torch's global generators (CPU, and CUDA's when CUDA is in use) draw from `seed`; on exit they
    continue exactly where they were, as if the block had not run. (The policies draw only from torch's generators.)"""
    cuda = torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


class EnvpoolChunkVecEnv:
    """Gym locomotion on envpool's C++ pool (used when envpool is installed; ~2.5x the steps/s of
    the gymnasium path here). Same protocol: an env that finishes inside a chunk is not stepped
    again in that chunk and is reset at its end. A seeded reset rebuilds the pool with that seed."""

    backend = "envpool"

    def __init__(self, task: Task, num_envs: int, seed: int | None, act_steps: int, cond_steps: int,
                 max_episode_steps: int) -> None:
        self.task, self.num_envs, self.max_episode_steps = task, num_envs, max_episode_steps
        self.act_steps, self.cond_steps = act_steps, cond_steps
        self._build(seed or 0)

    def _build(self, seed: int) -> None:
        import envpool
        self.env = envpool.make(self.task.env_name, env_type="gymnasium", num_envs=self.num_envs, seed=seed,
                                max_episode_steps=self.max_episode_steps)

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is not None:
            self.env.close()
            self._build(seed)
        obs, _ = self.env.reset()
        self._hist = np.repeat(obs.astype(np.float32)[:, None], self.cond_steps, axis=1)
        return self._hist.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        reward = np.zeros(n, np.float32)
        terminated, truncated = np.zeros(n, bool), np.zeros(n, bool)
        running = np.arange(n)
        for k in range(self.act_steps):
            obs, r, term, trunc, info = self.env.step(actions[running, k].astype(np.float32), running)
            ids = info["env_id"]
            reward[ids] += r
            terminated[ids], truncated[ids] = term, trunc
            self._hist[ids] = np.concatenate([self._hist[ids, 1:], obs.astype(np.float32)[:, None]], axis=1)
            running = ids[~(term | trunc)]
            if len(running) == 0:
                break
        final_obs = self._hist.copy()
        done = np.flatnonzero(terminated | truncated)
        if len(done):
            obs, info = self.env.reset(done)
            self._hist[info["env_id"]] = np.repeat(obs.astype(np.float32)[:, None], self.cond_steps, axis=1)
        return self._hist.copy(), reward, terminated, truncated, {"final_obs": final_obs}

    def close(self) -> None:
        self.env.close()


def make_env(task: Task, seed: int | None = None, terminate_on_success: bool = False,
             max_episode_steps: int | None = None, render: bool = False) -> gym.Env:
    """One raw (un-chunked) gymnasium env of the task; `render`: `env.render()` returns RGB frames
    (VIDEO_SIZE square) for evaluation videos."""
    require_simulator(task)
    check_mujoco_gl(task)
    steps = max_episode_steps or task.max_episode_steps
    if task.suite == "gym" and render:
        from sims.video import VIDEO_SIZE, plain_lighting

        # the locomotion models' own "track" camera follows the body (gymnasium's default free camera does not)
        env = gym.make(task.env_name, max_episode_steps=steps, render_mode="rgb_array", width=VIDEO_SIZE, height=VIDEO_SIZE,
                       camera_name="track")
        plain_lighting(env.unwrapped.model)
    elif task.suite == "gym":
        env = gym.make(task.env_name, max_episode_steps=steps)
    elif task.suite == "robomimic":
        from sims.robomimic import make_robomimic_env
        env = make_robomimic_env(task, seed=seed, terminate_on_success=terminate_on_success, video_frames=render)
    elif task.suite == "kitchen":
        from sims.kitchen import make_kitchen_env
        env = make_kitchen_env(task, max_episode_steps, render)
    else:  # furniture: GPU-batched, make_vec_env only (sims/furniture.py)
        raise TaskError(f"task {task.id!r} has no single-env gymnasium form; use make_vec_env")
    env.action_space.seed(seed)
    return env


ENV_BACKENDS = ("auto", "envpool", "gymnasium")


def make_vec_env(task: Task, num_envs: int, seed: int | None = None, act_steps: int | None = None,
                 cond_steps: int = 1, n_workers: int | None = None, terminate_on_success: bool = False,
                 max_episode_steps: int | None = None, backend: str = "auto", normalizer: Any = None,
                 obs_noise_std: float = 0.0, action_noise_std: float = 0.0, capture_video: bool = False) -> ChunkVecEnv:
    """`num_envs` chunked envs of `task` following the protocol of `common/vecenv.py`; the
    returned env's `backend` attribute names what runs it.

    n_workers: worker processes stepping the envs (`ProcessChunkVecEnv`, 1: in-process). Robomimic (slow in
    Python) defaults to one per core of this process (`default_n_workers`). Gym locomotion on gymnasium defaults
    to in-process and uses workers only when asked (n_workers > 1; ~1.8x with 2 workers on 2 idle cores,
    docs/results.md "Env stepping vs worker count"), except with capture_video (rendered in-process).
    backend (gym locomotion only): `envpool` (C++, ~2.5x the steps/s here; must be
    installed), `gymnasium`, or `auto` = envpool when it is installed, else gymnasium.
    Furniture only: the dataset `normalizer` and the sim-to-real noise (sims/furniture.py).
    capture_video: envs 0..VIDEO_EPISODES-1 can render and `evaluate` records their episodes
    (sims/video.py); the returned env's `video_fps` is then set.
    """
    if obs_noise_std or action_noise_std:
        if task.suite != "furniture":
            raise TaskError(f"observation / action noise is the Furniture-Bench sim-to-real option; {task.id!r} has none")
    if capture_video:
        from sims.video import AVOID_DT, VIDEO_EPISODES, RenderFrames, require_video, video_timing
    if task.suite == "furniture":  # Isaac Gym's GPU-batched envs (sims/furniture.py checks the install)
        if capture_video:
            require_video(task)  # no renderer for furniture here: one line
        from sims.furniture import make_furniture_vec_env
        return make_furniture_vec_env(task, num_envs, act_steps or task.act_steps, cond_steps, max_episode_steps,
                                      normalizer, obs_noise_std, action_noise_std, seed)
    require_simulator(task)
    check_mujoco_gl(task)
    if backend not in ENV_BACKENDS:
        raise TaskError(f"env backend {backend!r}: choose one of {', '.join(ENV_BACKENDS)}")
    has_envpool = importlib.util.find_spec("envpool") is not None
    if capture_video:
        require_video(task)
        if task.suite == "gym" and has_envpool and backend != "gymnasium":  # same simulator with and without videos
            raise TaskError("--capture-video renders gymnasium's MuJoCo envs, and envpool is installed: "
                            "add --env-backend gymnasium")
    if backend == "envpool" and (task.suite != "gym" or not has_envpool):
        raise TaskError("--env-backend envpool runs gym locomotion only, and needs `pip install envpool==1.2.5`"
                        if task.suite == "gym" else f"--env-backend envpool is for gym locomotion, not {task.id!r}")
    act_steps = act_steps or task.act_steps
    if task.suite == "avoid":
        from sims.avoid import AvoidVecEnv
        avoid = AvoidVecEnv(num_envs, act_steps=act_steps, cond_steps=cond_steps,
                            max_episode_steps=max_episode_steps or task.max_episode_steps, seed=seed)
        avoid.backend = "numpy (sims/avoid.py)"
        avoid.video_fps = 1 / AVOID_DT if capture_video else None
        return avoid

    stride, video_fps = 1, None
    if capture_video:  # env fps: gym's metadata (1/dt), robosuite's control frequency (20 Hz)
        if task.suite == "robomimic":
            from sims.robomimic import env_kwargs
            env_fps = float(env_kwargs(task)["control_freq"])
        else:
            env_fps = _gym_render_fps(task)
        stride, video_fps = video_timing(env_fps)

    def env_fn(i: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            render = capture_video and i < VIDEO_EPISODES
            env = make_env(task, None if seed is None else seed + i, terminate_on_success, max_episode_steps, render)
            return MultiStep(RenderFrames(env, stride) if render else env, act_steps, cond_steps)
        return thunk

    if task.suite == "gym" and has_envpool and backend != "gymnasium":
        return EnvpoolChunkVecEnv(task, num_envs, seed, act_steps, cond_steps, max_episode_steps or task.max_episode_steps)
    fns = [env_fn(i) for i in range(num_envs)]
    if task.suite == "robomimic":
        workers = n_workers or default_n_workers()
    else:  # gym locomotion and kitchen: in-process unless asked
        workers = 1 if capture_video else (n_workers or 1)
    vec = ProcessChunkVecEnv(fns, workers, context="fork") if workers > 1 and num_envs > 1 else SyncChunkVecEnv(fns)
    vec.video_fps = video_fps
    return vec


def _gym_render_fps(task: Task) -> float:
    """The env's own frame rate (1/dt), from one env that also proves rendering works here (one line if not)."""
    from sims.video import RenderFrames

    env = make_env(task, render=True)
    try:
        env.reset(seed=0)
        RenderFrames(env, 1)._grab()
        return float(env.metadata["render_fps"])
    finally:
        env.close()


class EpisodeTracker:
    """Per-env running return, length and best chunk reward of the current episode, kept across
    iterations; every episode that ends is recorded, however many iterations it spanned.

    `reset()` when the envs are reset (every running episode is dropped); `step(reward, done)`
    after each chunk-step; `pop()` returns the summary of the episodes that ended since the last
    `pop` (nan when none did, or when the task has no success rule). Success: some executed chunk
    with reward / T_e >= `success_chunk_reward` (robomimic: the task held for a whole chunk; Avoid:
    mode 5 passed and above y = 0.4), or a return >= `success_return` (furniture: every part pair assembled,
    the reference's threshold `len(pairs_to_assemble)`, `agent/finetune/train_agent.py`).
    """

    def __init__(self, num_envs: int, act_steps: int, success_chunk_reward: float | None,
                 success_return: float | None = None) -> None:
        self.act_steps, self.success_chunk_reward, self.success_return = act_steps, success_chunk_reward, success_return
        self.ret, self.length, self.best = np.zeros(num_envs), np.zeros(num_envs, int), np.full(num_envs, -np.inf)
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.successes: list[bool] = []

    def reset(self) -> None:
        self.ret[:], self.length[:], self.best[:] = 0.0, 0, -np.inf

    def step(self, reward: np.ndarray, done: np.ndarray) -> None:
        self.ret += reward
        self.length += 1
        self.best = np.maximum(self.best, reward)
        for i in np.flatnonzero(done):
            self.returns.append(float(self.ret[i]))
            self.lengths.append(int(self.length[i]))
            self.successes.append(
                (self.success_chunk_reward is not None and self.best[i] / self.act_steps >= self.success_chunk_reward - 1e-6)
                or (self.success_return is not None and self.ret[i] >= self.success_return - 1e-6))
        self.ret[done], self.length[done], self.best[done] = 0.0, 0, -np.inf

    def pop(self) -> dict[str, Any]:
        returns, n = np.array(self.returns), len(self.returns)
        out = {"return_mean": float(returns.mean()) if n else float("nan"),
               "return_std": float(returns.std()) if n else float("nan"),
               "success_rate": float(np.mean(self.successes))
               if n and (self.success_chunk_reward is not None or self.success_return is not None) else float("nan"),
               "episode_length": float(np.mean(self.lengths)) if n else float("nan"), "n_episodes": n}
        self.returns, self.lengths, self.successes = [], [], []
        return out


def eval_horizon(task: Task, act_steps: int) -> int:
    """The default length of an evaluation in chunk-steps: one whole episode, ⌈max_episode_steps / T_e⌉."""
    return -(-task.max_episode_steps // act_steps)


def evaluate(envs: ChunkVecEnv, act: Callable[[np.ndarray], np.ndarray], task: Task, act_steps: int, *,
             seed: int, index: int, n_steps: int | None = None) -> dict[str, Any]:
    """Roll `act` (raw obs (N, T_o, D_o) -> raw chunk (N, T_a, D_a)) for `n_steps` chunk-steps
    (default: one episode, `eval_horizon`) from a reset with `seed` and summarise the episodes that
    finished. The one evaluation used during training, after it and by `--eval-only`, by every script.
    `act` draws from the evaluation's own torch stream, `stream_seed(seed, EVAL_STREAM, index)` (`index`: the
    iteration or epoch evaluated); the caller's stream continues as if nothing had been drawn.

    Returns return_mean/return_std/success_rate/episode_length/n_episodes, and for Avoid
    `mode_fractions` (the share of finished episodes through each row-3 mode 5..8),
    `collision_rate` and `paths` (end-effector paths of the finished episodes); with envs made with
    `capture_video`, `videos` (`sims.video.EvalVideos`: recorded episodes the run folder keeps).
    """
    n_steps = n_steps or eval_horizon(task, act_steps)
    videos = None
    if getattr(envs, "video_fps", None):  # envs made with capture_video; before the reset: its first frame
        from sims.video import EvalVideos
        videos = EvalVideos(envs)
    obs = envs.reset(seed=seed)
    n = envs.num_envs
    tracker = EpisodeTracker(n, act_steps, task.success_chunk_reward, task.success_return)
    modes, collided, paths, path = [], [], [], [[] for _ in range(n)]
    with own_rng(stream_seed(seed, EVAL_STREAM, index)):  # the policy's noise: the evaluation's own stream
        for _ in range(n_steps):
            chunk = act(obs)[:, :act_steps]
            if not np.isfinite(chunk).all():
                raise NonFiniteError("the policy produced non-finite actions in evaluation; "
                                     "its weights or normalisation are broken")
            obs, reward, term, trunc, info = envs.step(chunk)
            done = term | trunc
            n_before = len(tracker.returns)
            tracker.step(reward, done)
            if videos is not None:  # (return, success) of each episode that just ended, in env order as the tracker
                ended = [(tracker.returns[n_before + k], None if task.success_chunk_reward is None
                          else tracker.successes[n_before + k]) for k in range(int(done.sum()))]
                videos.step(info, dict(zip((int(i) for i in np.flatnonzero(done)), ended)))
            if "mode" in info:  # Avoid: latched row modes and the end-effector path
                for i in range(n):
                    path[i].extend(info["ee_pos"][i])
                    if done[i]:
                        modes.append(info["mode"][i, 2])
                        collided.append(info["collided"][i])
                        paths.append(np.array(path[i]))
                        path[i] = []
    out = tracker.pop()
    if modes:
        modes_arr = np.array(modes)
        out["mode_fractions"] = {m: float((modes_arr == m).mean()) for m in (5, 6, 7, 8)}
        out["collision_rate"] = float(np.mean(collided))
        out["paths"] = paths
    if videos is not None:
        out["videos"] = videos.finish()
    return out
