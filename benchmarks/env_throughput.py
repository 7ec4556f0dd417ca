"""Env steps/s through the vector env fine-tuning uses, against the number of worker processes.

    python benchmarks/env_throughput.py                                # lift can square transport, 1 and 2 workers
    python benchmarks/env_throughput.py can hopper --workers 1 2 3 4   # robomimic and gym locomotion
    python benchmarks/env_throughput.py --ipc --workers 1 2 4 8        # the pool's own cost: no-op envs
    python benchmarks/env_throughput.py hopper can --workers 1 2 3 4 --project   # + a projection to more cores

Each task: `num_envs` envs made by `common.envs.make_vec_env` (robomimic: 10 envs, gym: 40, on gymnasium) with
each number of workers (1: in-process), random chunks; env steps per wall-clock second and per CPU-second of all
processes involved (which other jobs on a shared machine distort less).

`--ipc`: the price of one chunk-step round trip through the pool itself, with no-op envs (Hopper's observation and
action sizes, one env per worker, so the workers do next to nothing): wall time and the parent's CPU time per
round trip, against the number of workers.

`--project [W ...]`: combines the two (a model, not a measurement): a chunk-step of the paper's N envs over W
workers takes
ceil(N / W) x (one env's chunk-step, from the task's CPU-s rate at 1 worker) + the no-op round trip's latency at
1 worker + the parent's CPU (a line in W fitted to the --ipc figures of every measured W >= 1),
assuming W free cores. Printed per W: projected env steps/s, speed-up over in-process and the parent's share;
once with the pool's measured costs and once with the bare-pipe floor (what shared memory could buy at best).
Measured figures and the projection: docs/results.md, "Env stepping vs worker count".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import make_vec_env  # noqa: E402
from common.errors import TaskError  # noqa: E402
from common.tasks import Task, get_task  # noqa: E402
from common.vecenv import MultiStep, ProcessChunkVecEnv, SyncChunkVecEnv, start_workers  # noqa: E402


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# env steps of one fine-tuning iteration with the paper's settings: n_envs x n_steps chunk-steps x T_e
# (the reference's ft_ppo_diffusion_mlp configs: gym 40 x 500 x 4, robomimic 50 x 300 or 400 x 4 or 8).
PAPER_ITERATION_ENV_STEPS = {"lift": 50 * 300 * 4, "can": 50 * 300 * 4, "square": 50 * 400 * 4,
                             "transport": 50 * 400 * 8, "hopper": 40 * 500 * 4, "walker2d": 40 * 500 * 4,
                             "halfcheetah": 40 * 500 * 4}
PAPER_NUM_ENVS = {"lift": 50, "can": 50, "square": 50, "transport": 50, "hopper": 40, "walker2d": 40, "halfcheetah": 40}


def measure_throughput(task: Task | str, num_envs: int | None = None, chunk_steps: int = 10,
                       workers: tuple[int, ...] = (1, 2)) -> dict[int, dict[str, float]]:
    """Random-chunk env steps/s of `num_envs` envs (default: robomimic 10, gym 40) through
    `common.envs.make_vec_env` (the path fine-tuning uses; gym on gymnasium) with each number of worker
    processes (1: in-process): per wall-clock second, per CPU-second of all processes involved, and the wall
    seconds one paper-size iteration of env stepping would take at that rate."""
    task = get_task(task) if isinstance(task, str) else task
    if task.id not in PAPER_ITERATION_ENV_STEPS:
        raise TaskError(f"task {task.id!r} does not step through the worker pool ({', '.join(PAPER_ITERATION_ENV_STEPS)})")
    num_envs = num_envs or (10 if task.suite == "robomimic" else 40)
    out = {}
    for n in workers:
        envs = make_vec_env(task, num_envs, seed=0, n_workers=n, backend="gymnasium")
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


class NoopEnv(gym.Env):
    """An env whose step costs nothing: what is left of a chunk-step is the pool's own traffic."""

    def __init__(self, obs_dim: int = 11, action_dim: int = 3) -> None:
        self.observation_space = gym.spaces.Box(-1, 1, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (action_dim,), np.float32)
        self._obs = np.zeros(obs_dim, np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        return self._obs, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self._obs, 0.0, False, False, {}


def measure_ipc(workers: tuple[int, ...] = (1, 2), round_trips: int = 2000, envs_per_worker: int = 1,
                obs_dim: int = 11, action_dim: int = 3, act_steps: int = 4) -> dict[int, dict[str, float]]:
    """Per chunk-step round trip through `ProcessChunkVecEnv` with no-op envs (`envs_per_worker` per worker):
    wall µs and the parent's CPU µs, for each number of workers; 0 workers = the same envs in-process."""
    out = {}
    for w in workers:
        n = max(1, w) * envs_per_worker
        fns = [lambda: MultiStep(NoopEnv(obs_dim, action_dim), act_steps)] * n
        envs = SyncChunkVecEnv(fns) if w == 0 else ProcessChunkVecEnv(fns, w)
        try:
            envs.reset(seed=0)
            actions = np.zeros((n, act_steps, action_dim), np.float32)
            for _ in range(min(100, round_trips)):  # warm-up
                envs.step(actions)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(round_trips):
                envs.step(actions)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            envs.close()
        out[w] = {"wall_us": wall / round_trips * 1e6, "parent_cpu_us": cpu / round_trips * 1e6}
    return out


def _echo(remote: Any, _: list) -> None:
    while remote.recv_bytes() != b"close":
        remote.send_bytes(b"done")


def measure_pipe_floor(workers: tuple[int, ...] = (1, 2), round_trips: int = 2000) -> dict[int, dict[str, float]]:
    """The same round trip with nothing pickled (a few bytes each way through the same pipes): what is left of
    the pool's cost if the observations and actions went through shared memory instead, since a worker must
    still be woken and must still say it is done."""
    out = {}
    for w in workers:
        _, remotes, procs = start_workers(_echo, [lambda: None] * w, w, "fork")
        try:
            for k in range(100 + round_trips):
                if k == 100:
                    t0, c0 = time.perf_counter(), time.process_time()
                for remote in remotes:
                    remote.send_bytes(b"step")
                for remote in remotes:
                    remote.recv_bytes()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            for remote in remotes:
                remote.send_bytes(b"close")
            for proc in procs:
                proc.join(timeout=5)
        out[w] = {"wall_us": wall / round_trips * 1e6, "parent_cpu_us": cpu / round_trips * 1e6}
    return out


def project(env_chunk_s: float, num_envs: int, latency_s: float, parent_fixed_s: float, parent_per_worker_s: float,
            workers: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """A projection, not a measurement: one chunk-step of `num_envs` envs over W workers, W free cores, takes
    ceil(num_envs / W) * env_chunk_s (the busiest worker) + latency_s + parent_fixed_s + parent_per_worker_s * W;
    in-process it takes num_envs * env_chunk_s. Returns per W the chunk-step time, the speed-up over in-process
    and the parent's share of the chunk-step."""
    out = {}
    for w in workers:
        parent = parent_fixed_s + parent_per_worker_s * min(w, num_envs)  # start_workers starts at most num_envs
        t = math.ceil(num_envs / w) * env_chunk_s + latency_s + parent
        out[w] = {"chunk_step_s": t, "speedup": num_envs * env_chunk_s / t, "parent_share": parent / t}
    return out


def _median(runs: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    return {w: {k: float(np.median([run[w][k] for run in runs])) for k in runs[0][w]} for w in runs[0]}


def _print_projection(label: str, costs: dict[int, dict[str, float]], rates: dict[str, dict[int, dict[str, float]]],
                      workers: list[int]) -> None:
    """Fit parent CPU = fixed + per_worker * W (least squares over the measured W >= 1), latency = wall - parent
    CPU at 1 worker, and print `project` for each measured task at its paper number of envs."""
    ws = [w for w in costs if w]
    per_worker, fixed = np.polyfit(ws, [costs[w]["parent_cpu_us"] * 1e-6 for w in ws], 1)
    per_worker, fixed = max(0.0, per_worker), max(0.0, fixed)
    latency = max(0.0, costs[1]["wall_us"] - costs[1]["parent_cpu_us"]) * 1e-6
    print(f"PROJECTION ({label}): parent {fixed * 1e6:.0f} µs + {per_worker * 1e6:.0f} µs per worker, "
          f"latency {latency * 1e6:.0f} µs per round trip")
    for name, by_workers in rates.items():
        task = get_task(name)
        chunk_s = task.act_steps / by_workers[min(by_workers)]["steps_per_cpu_s"]
        n_envs = PAPER_NUM_ENVS[task.id]
        for w, r in project(chunk_s, n_envs, latency, fixed, per_worker, tuple(workers)).items():
            print(f"PROJECTION ({label}) {name}, {n_envs} envs, {w} workers: "
                  f"{n_envs * task.act_steps / r['chunk_step_s']:.0f} env steps/s, {r['speedup']:.1f}x "
                  f"in-process, parent {100 * r['parent_share']:.0f} % of a chunk-step", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Env steps/s through the fine-tuning vec env against the worker count.")
    p.add_argument("tasks", nargs="*", metavar="TASK", help=f"tasks ({', '.join(PAPER_ITERATION_ENV_STEPS)}); "
                   "default: the four robomimic ones, unless --ipc alone")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1: in-process)")
    p.add_argument("--num-envs", type=int, default=None, help="envs per measurement (default: robomimic 10, gym 40)")
    p.add_argument("--chunk-steps", type=int, default=10, help="timed chunk-steps per measurement")
    p.add_argument("--repeats", type=int, default=1, help="measurements per task (medians and the best printed)")
    p.add_argument("--ipc", action="store_true", help="measure the pool's round trip with no-op envs")
    p.add_argument("--round-trips", type=int, default=2000, help="timed round trips per --ipc measurement")
    p.add_argument("--project", type=int, nargs="*", default=None, metavar="W",
                   help="project each task to these worker counts (default 1 2 4 8 16 32 64); implies --ipc")
    args = p.parse_args(argv)
    if min(args.workers) < 1 or (args.num_envs is not None and args.num_envs < 1) or args.chunk_steps < 1 \
            or args.round_trips < 1 or args.repeats < 1 or (args.project and min(args.project) < 1):
        print("error: --workers, --num-envs, --chunk-steps, --repeats, --round-trips and --project take positive numbers",
              file=sys.stderr)
        return 2
    ipc_only = (args.ipc or args.project is not None) and not args.tasks
    tasks = args.tasks or ([] if ipc_only else ["lift", "can", "square", "transport"])
    try:
        rates = {}
        for name in tasks:
            runs = []
            for k in range(args.repeats):  # the worker counts interleaved, so that load changes hit them alike
                runs.append(measure_throughput(name, args.num_envs, args.chunk_steps, tuple(args.workers)))
                for n, r in runs[-1].items():
                    print(f"{name}: {n} worker{'s' if n > 1 else ''} {r['steps_per_s']:.0f} env steps/s "
                          f"({r['steps_per_cpu_s']:.0f} per CPU-s), one paper iteration of env stepping "
                          f"{r['paper_iteration_s']:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
            rates[name] = {n: {key: float(np.median([run[n][key] for run in runs])) for key in runs[0][n]}
                           for n in runs[0]}
            if args.repeats > 1:
                for n in runs[0]:
                    wall = sorted(run[n]["steps_per_s"] for run in runs)
                    print(f"{name}: {n} worker{'s' if n > 1 else ''}, {args.repeats} runs: median "
                          f"{rates[name][n]['steps_per_s']:.0f} env steps/s (best {wall[-1]:.0f}), median "
                          f"{rates[name][n]['steps_per_cpu_s']:.0f} per CPU-s", flush=True)
        if args.ipc or args.project is not None:
            counts = tuple(sorted({0, 1, 2, *args.workers}))
            ipc_runs, floor_runs = [], []
            for _ in range(args.repeats):
                ipc_runs.append(measure_ipc(counts, args.round_trips))
                floor_runs.append(measure_pipe_floor(counts[1:], args.round_trips))
            ipc, floor = (_median(runs) for runs in (ipc_runs, floor_runs))
            for w in counts:
                print(f"no-op round trip, {w or 'in-process'}{' workers' if w > 1 else ' worker' if w else ''}: "
                      f"{ipc[w]['wall_us']:.0f} µs wall, {ipc[w]['parent_cpu_us']:.0f} µs parent CPU"
                      + (f"; bare pipe (nothing pickled) {floor[w]['wall_us']:.0f} µs wall, "
                         f"{floor[w]['parent_cpu_us']:.0f} µs parent CPU" if w else "")
                      + f" (median of {args.repeats}); load {os.getloadavg()[0]:.1f}", flush=True)
        if args.project is not None:
            for label, costs in (("pool as it is", ipc), ("bare-pipe floor", floor)):
                _print_projection(label, costs, rates, args.project or [1, 2, 4, 8, 16, 32, 64])
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
