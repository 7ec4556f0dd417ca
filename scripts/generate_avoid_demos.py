"""Scripted D3IL Avoid demonstrations: the built-in Avoid data shipped in `builtin-data/`.

The real D3IL demos cannot be redistributed, so the Avoid tasks' built-in data are scripted
demonstrations executed in the simulator of `sims/avoid.py`: 96 per subset (the size of the real
dataset), 50/50 between the subset's two row-3 modes, collision-free, passing the same M1/M2/M3
filters as the real demos (`sims.avoid.subset_mode`). They are written in the reference
implementation's `train.npz` format (`states`, `actions`, `traj_lengths`; float32, compressed),
one file per subset, which `loaders.datasets.load_task_trajectories` loads for an Avoid task given
no dataset path. The shipped files were written, from the repository root, with

    python scripts/generate_avoid_demos.py
    # the defaults: --subsets M1 M2 M3 --n-demos 96 --seed 0 --out-dir builtin-data

(~1 s per subset) and `tests/test_avoid.py` checks that this reproduces them exactly.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import runs  # noqa: E402
from common.errors import UsageError  # noqa: E402
from loaders.convert import OneLineParser  # noqa: E402
from loaders.datasets import AVOID_DEMO_DIR, AVOID_N_DEMOS, avoid_demo_file, save_train_npz  # noqa: E402
from sims.avoid import (ACTION_HIGH, ACTION_LOW, START, SUBSETS, _to_demo, collided, replay, row_modes,  # noqa: E402
                        subset_mode)

_ROW3_X = {5: (0.265, 0.30), 6: (0.41, 0.44), 7: (0.56, 0.59), 8: (0.695, 0.73)}  # free gaps


def _scripted_path(rng: np.random.Generator, mode: int) -> np.ndarray:
    """Desired positions of one scripted demo, shaped like the human D3IL demos: idle, then steer
    at a steady speed along the direction to the next waypoint (smoothed, so paths are diagonal
    curves, never moving backwards in y): right of obstacle 1 (mode 1), diagonally left through
    row 2 (mode 2), through the row-3 gap of `mode`, and on to y ~ 0.45."""
    x1, x2, x3 = rng.uniform(0.56, 0.60), rng.uniform(0.33, 0.375), rng.uniform(*_ROW3_X[mode])
    wps = [(x1 + rng.uniform(-0.01, 0.01), rng.uniform(-0.17, -0.13)), (x1, rng.uniform(-0.06, -0.02)),
           (x2, rng.uniform(0.07, 0.09)), (x3, rng.uniform(0.21, 0.23)), (x3, rng.uniform(0.30, 0.33)),
           (x3 + rng.uniform(-0.03, 0.03), 0.6)]
    speed, alpha = rng.uniform(0.013, 0.016), rng.uniform(0.6, 0.8)  # per-axis limits 0.0125
    des, step = [START.copy() for _ in range(rng.integers(2, 8))], np.zeros(2)
    for wp in wps:
        while np.linalg.norm(wp - des[-1]) > 0.025 and len(des) < 150:
            to_wp = wp - des[-1]
            step = alpha * step + (1 - alpha) * speed * to_wp / np.linalg.norm(to_wp)
            des.append(des[-1] + np.clip(step, ACTION_LOW, ACTION_HIGH))
    return np.array(des)


def generate_avoid_demos(subset: str, n_demos: int = 100, seed: int = 0) -> list[dict]:
    """Scripted demos executed in the simulator, alternating the subset's two row-3 modes
    (50/50); a path is redrawn if it collides, changes mode, or fails the subset filter. Each
    ends 3-8 steps after the end-effector crosses y > 0.4 (as the real demos, 60-110 steps).
    Demos are dicts of float32 obs (L, 4) = [desired, ee] and actions (L, 2); the first n of
    `n_demos` > n are the demos of `n_demos=n` (one random stream, drawn demo by demo)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown Avoid subset {subset!r}; use one of {sorted(SUBSETS)}")
    rng = np.random.default_rng(seed)
    demos = []
    while len(demos) < n_demos:
        mode = SUBSETS[subset][len(demos) % 2]
        des = _scripted_path(rng, mode)
        ee = replay(des[None], START[None])[0]
        up = np.flatnonzero(ee[:, 1] > 0.4)
        if not len(up):
            continue
        end = min(up[0] + rng.integers(3, 9), len(des) - 1) + 1
        des, ee = des[:end], ee[:end]
        if end > 110 or collided(ee) or subset_mode(des, subset) != mode or row_modes(ee) != (1, 2, mode):
            continue
        demos.append(_to_demo(des, ee))
    return demos


def write_avoid_demos(subset: str, path: str, n_demos: int = AVOID_N_DEMOS, seed: int = 0) -> list[dict]:
    """Generate a subset's demos and write them to `path` as a compressed `train.npz`."""
    demos = generate_avoid_demos(subset, n_demos=n_demos, seed=seed)
    save_train_npz(path, demos, compressed=True)
    return demos


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description="Write the scripted D3IL Avoid demos, one train.npz per subset.")
    p.add_argument("--subsets", nargs="+", default=sorted(SUBSETS), choices=sorted(SUBSETS))
    p.add_argument("--n-demos", type=int, default=AVOID_N_DEMOS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(AVOID_DEMO_DIR),
                   help="folder of the files avoid-m1.npz, ... (default: the shipped ones)")
    args = p.parse_args(argv)
    try:
        runs.check_number("--n-demos", args.n_demos, runs.POSITIVE)
        runs.check_number("--seed", args.seed, runs.SEED)
        for subset in args.subsets:  # a folder that cannot be written is refused before any demo is drawn
            runs.check_output_path(os.path.join(args.out_dir, avoid_demo_file(subset)), "--out-dir")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for subset in args.subsets:
        path = os.path.join(args.out_dir, avoid_demo_file(subset))
        try:
            demos = write_avoid_demos(subset, path, args.n_demos, args.seed)
        except OSError as e:  # a full disk, a folder made read-only meanwhile
            print(f"error: cannot write {path} ({e.strerror or e})", file=sys.stderr)
            return 2
        lengths = [len(d["actions"]) for d in demos]
        print(f"{subset}: {len(demos)} demos, {min(lengths)}-{max(lengths)} steps, "
              f"{os.path.getsize(path) / 1e3:.0f} kB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
