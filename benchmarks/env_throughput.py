"""Env throughput of the robomimic tasks through the vector env fine-tuning uses.

    python benchmarks/env_throughput.py                 # lift can square transport
    python benchmarks/env_throughput.py lift can

Throughput here (`python benchmarks/env_throughput.py`: 10 envs through `common.envs.make_vec_env`,
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
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import make_vec_env  # noqa: E402
from common.tasks import Task, TaskError, get_task  # noqa: E402


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# env steps of one fine-tuning iteration with the paper's settings: 50 envs x n_steps chunk-steps x T_e.
PAPER_ITERATION_ENV_STEPS = {"lift": 50 * 300 * 4, "can": 50 * 300 * 4, "square": 50 * 400 * 4,
                             "transport": 50 * 400 * 8}


def measure_throughput(task: Task | str, num_envs: int = 10, chunk_steps: int = 10,
                       workers: tuple[int, ...] = (1, 2)) -> dict[int, dict[str, float]]:
    """Random-chunk env steps/s of `num_envs` envs through `common.envs.make_vec_env` (the path
    fine-tuning uses) with each number of worker processes (1: in-process): per wall-clock second,
    per CPU-second of all processes involved (which other jobs on a shared machine distort less),
    and the wall seconds one paper-size iteration of env stepping would take at that rate."""
    task = get_task(task) if isinstance(task, str) else task
    if task.id not in PAPER_ITERATION_ENV_STEPS:
        raise TaskError(f"task {task.id!r} is not a robomimic task ({', '.join(PAPER_ITERATION_ENV_STEPS)})")
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
    p = argparse.ArgumentParser(description="Measure robomimic env steps/s through the fine-tuning vec env.")
    p.add_argument("tasks", nargs="*", default=list(PAPER_ITERATION_ENV_STEPS), metavar="TASK",
                   help="robomimic tasks (default: all four)")
    args = p.parse_args(argv)
    try:
        for name in args.tasks:
            for n, r in measure_throughput(name).items():
                print(f"{name}: {n} worker{'s' if n > 1 else ''} {r['steps_per_s']:.0f} env steps/s "
                      f"({r['steps_per_cpu_s']:.0f} per CPU-s), one paper iteration of env stepping "
                      f"{r['paper_iteration_s']:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
