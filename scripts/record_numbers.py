"""Record what fixed-seed tiny runs of every training script write, or compare two records: a refactor that changes
no maths must leave every number identical.

Each entry runs one script through its command line (seed 1, one torch thread) in a fresh folder and keeps its
`eval.csv` and its checkpoint (pre-training: the release file). `--compare` prints, per entry, whether the eval.csv
rows are identical and the largest absolute difference over the checkpoint's tensors (0 when bit-identical).

    python scripts/record_numbers.py --out /tmp/numbers_before                 # all entries (~10 min on 2 cores)
    python scripts/record_numbers.py --out /tmp/numbers_after --compare /tmp/numbers_before
    python scripts/record_numbers.py --out /tmp/n --only dppo_finetune dipo

Entries (Avoid M2 with the shipped checkpoint unless said): `dppo_finetune` 3 iterations; DRWR, DAWR, exact-likelihood
PG 2; DIPO, IDQL, DQL, QSM 2 with a 1-iteration critic warm-up (so the actor updates once); Gaussian and GMM
pre-trained for 2 epochs on the built-in Avoid data, then fine-tuned 2 iterations; `dppo_pretrain` 2 epochs; the pixel
pair on 2 generated Lift demos at 32x32 (needs robosuite and offscreen rendering, `MUJOCO_GL=egl`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_PRE = ["--n-epochs", "2", "--batch-size", "32", "--mlp-dims", "64", "64", "64", "--embed-dim", "32",
             "--spatial-emb", "16", "--eval-every", "0"]
PIXEL_FT = ["--num-envs", "2", "--n-steps", "3", "--n-workers", "1", "--val-freq", "0", "--eval-n-steps", "2",
            "--batch-size", "15", "--grad-accumulate", "2", "--logprob-batch-size", "4", "--update-epochs", "2",
            "--n-train-itr", "2", "--n-critic-warmup-itr", "1"]
WARMUP1 = ["--n-train-itr", "2", "--n-critic-warmup-itr", "1"]
# name: list of (script, flags) run in order in one folder; {pre} is the folder's pre-training output
ENTRIES: dict[str, list[tuple[str, list[str]]]] = {
    "dppo_finetune": [("dppo_finetune.py", ["--n-train-itr", "3"])],
    "drwr": [("drwr.py", ["--n-train-itr", "2"])],
    "dawr": [("dawr.py", ["--n-train-itr", "2"])],
    "exact_likelihood_pg": [("exact_likelihood_pg.py", ["--n-train-itr", "2"])],
    "dipo": [("dipo.py", WARMUP1)],
    "idql": [("idql.py", WARMUP1)],
    "dql": [("dql.py", WARMUP1)],
    "qsm": [("qsm.py", WARMUP1)],
    "gaussian_ppo": [("gaussian_ppo.py", ["--pretrain", "--n-epochs", "2", "--output", "{pre}"]),
                     ("gaussian_ppo.py", ["--checkpoint", "{pre}", "--n-train-itr", "2"])],
    "gmm_ppo": [("gmm_ppo.py", ["--pretrain", "--n-epochs", "2", "--output", "{pre}"]),
                ("gmm_ppo.py", ["--checkpoint", "{pre}", "--n-train-itr", "2"])],
    "dppo_pretrain": [("dppo_pretrain.py", ["--n-epochs", "2", "--output", "{pre}"])],
    "pixel": [("scripts/robomimic_demos.py", ["--task", "lift", "--n-demos", "2", "--seed", "0", "--images",
                                              "--image-size", "32", "--out", "demos.hdf5"]),
              ("dppo_pretrain_pixel.py", ["--dataset", "demos.hdf5", "--output", "{pre}", *PIXEL_PRE]),
              ("dppo_finetune_pixel.py", ["--checkpoint", "{pre}", *PIXEL_FT])],
}


@dataclasses.dataclass
class Args:
    out: str
    """folder for the record (one subfolder per entry: eval.csv, checkpoint.pt, log.txt)"""
    compare: str | None = None
    """an earlier record to compare with"""
    only: list[str] | None = None
    """entries to run (default: all)"""


def run_entry(name: str, out: str) -> None:
    dest = os.path.join(out, name)
    os.makedirs(dest, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"numbers_{name}_")
    pre = os.path.join(work, "pre.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "PYTHONPATH": ROOT}
    log = []
    for script, flags in ENTRIES[name]:
        cmd = [sys.executable, os.path.join(ROOT, script), *[f.replace("{pre}", pre) for f in flags]]
        if not script.startswith("scripts/"):
            cmd += ["--seed", "1", "--exp-name", "numbers"]
        t = time.time()
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        log.append(f"$ {' '.join(cmd[1:])}\n{p.stdout}{p.stderr}\n({time.time() - t:.0f} s, exit {p.returncode})\n")
        if p.returncode:
            open(os.path.join(dest, "log.txt"), "w").write("".join(log))
            raise SystemExit(f"{name}: {script} failed (exit {p.returncode}); see {dest}/log.txt")
    open(os.path.join(dest, "log.txt"), "w").write("".join(log))
    runs = sorted(glob.glob(os.path.join(work, "runs", "*")), key=os.path.getmtime)
    if runs and os.path.exists(os.path.join(runs[-1], "eval.csv")):
        shutil.copy(os.path.join(runs[-1], "eval.csv"), dest)
    ckpt = os.path.join(runs[-1], "checkpoint.pt") if runs else pre  # the last run's training state
    shutil.copy(ckpt, os.path.join(dest, "checkpoint.pt"))
    shutil.rmtree(work)


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a checkpoint, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in tensors(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in tensors(val, f"{prefix}/{i}").items()}
    return {}


def read_record(folder: str, name: str) -> tuple[list[list[str]] | None, dict[str, torch.Tensor]]:
    """The eval.csv rows (None: no file) and the checkpoint's tensors of entry `name` of the record in `folder`; one line
    naming the file (SystemExit) when it is missing, truncated or not what this script writes."""
    p, ckpt = os.path.join(folder, name, "eval.csv"), os.path.join(folder, name, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        raise SystemExit(f"error: {folder}: no record of {name!r} there ({ckpt} missing; record it first with --out)")
    try:
        with open(p, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        rows = None
    except (OSError, ValueError, csv.Error) as e:  # a folder, a binary file
        raise SystemExit(f"error: {p}: not an eval.csv of a record ({type(e).__name__}); record it again") from None
    try:
        return rows, tensors(torch.load(ckpt, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise SystemExit(f"error: {ckpt}: not a readable checkpoint ({type(e).__name__}); record it again") from None


def compare(name: str, a: str, b: str) -> str:
    (rows_a, ta), (rows_b, tb) = read_record(a, name), read_record(b, name)
    rows = [rows_a, rows_b]
    if ta.keys() != tb.keys():
        return f"{name}: checkpoint keys differ: only before {sorted(ta.keys() - tb.keys())[:3]}, only after " \
               f"{sorted(tb.keys() - ta.keys())[:3]}"
    diff = 0.0
    for k in ta:
        if ta[k].shape != tb[k].shape:
            return f"{name}: {k} shape {tuple(ta[k].shape)} -> {tuple(tb[k].shape)}"
        if ta[k].is_floating_point():
            diff = max(diff, (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].numel() else 0.0)
        elif not torch.equal(ta[k], tb[k]):
            diff = float("inf")
    same_rows = "eval.csv identical" if rows[0] == rows[1] else "eval.csv DIFFERS"
    if rows[0] is None and rows[1] is None:
        same_rows = "no eval.csv"
    return f"{name}: {same_rows}; checkpoint max |diff| {diff:.3g} over {len(ta)} tensors"


def main(args: Args) -> None:
    if args.only is not None and not args.only:
        raise SystemExit(f"error: --only names no entry; entries: {', '.join(ENTRIES)}")
    names = args.only or list(ENTRIES)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise SystemExit(f"error: unknown entry {unknown[0]!r}; entries: {', '.join(ENTRIES)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out} is a file; give a folder for the record")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise SystemExit(f"error: --out {args.out}: cannot write under {parent}")
    for name in names if args.compare else ():  # checked before minutes of runs
        read_record(args.compare, name)
    for name in names:
        t = time.time()
        run_entry(name, args.out)
        print(f"{name}: recorded in {time.time() - t:.0f} s", flush=True)
    if args.compare:
        for name in names:
            print(compare(name, args.compare, args.out))


if __name__ == "__main__":
    main(tyro.cli(Args))
