"""What `--onednn-matmul auto` measures on this CPU, round by round, and what it decides.

The check of `common.runs.apply_matmul_flags` (`measure_onednn`: oneDNN's float32 matmuls against the default kernels,
the largest relative deviation and the time of each) on the layers of Hopper's DPPO fine-tuning run (the paper's
[512] x 3 actor and [256] x 3 critic, as `benchmarks/reference_compare.py` builds them; rows: the envs sampled at once
and the minibatch), then the line a run prints.

    python benchmarks/onednn_check.py                                        # 1 thread
    python benchmarks/onednn_check.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/onednn_check.py    # an AMX CPU as one without AMX
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.reference_compare import build_ours  # noqa: E402
from common import runs  # noqa: E402


@dataclass
class Bench:
    threads: int = 1
    """torch CPU threads"""
    rounds: int = 3
    """checks run (each: the deviation, then 3 interleaved timings of both kernels)"""
    num_envs: int = 40
    """rows sampled at once"""
    batch_size: int = 50000
    """rows of a minibatch (checked at `common.runs.ONEDNN_ROWS`)"""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(b: Bench) -> dict:
    torch.set_num_threads(b.threads)
    with torch.random.fork_rng(devices=[]):
        shapes = runs.linear_shapes((b.num_envs, b.batch_size), build_ours()[0])
    print(f"{cpu_name()}, torch {torch.__version__}, {b.threads} thread(s), ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; {len(shapes)} products of Hopper's layers")
    rounds = []
    for i in range(b.rounds):
        t0 = time.perf_counter()
        err, t_default, t_onednn = runs.measure_onednn(shapes, timed=True)
        rounds.append((err, t_default, t_onednn))
        print(f"  round {i + 1}: deviation {err:.1e}, default {1e3 * t_default:.1f} ms, oneDNN {1e3 * t_onednn:.1f} ms "
              f"({t_onednn / t_default:.2f}x), the check took {time.perf_counter() - t0:.2f} s")
    decided = runs.apply_matmul_flags("highest", "auto", torch.device("cpu"), shapes)
    runs.set_float32_matmul_precision("highest")
    return {"rounds": rounds, "decided": decided}


if __name__ == "__main__":
    main(tyro.cli(Bench))
