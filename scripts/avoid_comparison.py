"""Paper §6 / Fig. A7: DPPO vs Gaussian vs GMM fine-tuning on D3IL Avoid M1, M2, M3.

For each subset it pre-trains the three policies on the built-in scripted demos (or reuses
checkpoints already in --out), fine-tunes each with its own script, and writes
`results.csv` (one row per evaluation), `table.md` (final success) and `success.png` (success
rate against env steps, one panel per subset) into --out. Avoid success is measured with the
training noise, from the training rollouts (App. D.8).

    python scripts/avoid_comparison.py --out runs/avoid_comparison          # everything (~1 h on 2 CPU cores)
    python scripts/avoid_comparison.py --subsets M2 --methods dppo gaussian  # a part of it
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune  # noqa: E402
import dppo_pretrain  # noqa: E402
import gaussian_ppo  # noqa: E402
import gmm_ppo  # noqa: E402
from common import runs  # noqa: E402


@dataclass
class Args:
    out: str = "runs/avoid_comparison"
    """folder for checkpoints, results.csv, table.md and success.png"""
    subsets: list[str] = field(default_factory=lambda: ["M1", "M2", "M3"])
    """Avoid data subsets"""
    methods: list[str] = field(default_factory=lambda: ["dppo", "gaussian", "gmm"])
    """policies to compare"""
    n_train_itr: Annotated[int, runs.POSITIVE] = 51
    """fine-tuning iterations (paper App. D.9 and the reference's configs: 51)"""
    seed: Annotated[int, runs.SEED] = 1
    """seed of every run"""


def pretrain(method: str, env_id: str, path: str, seed: int) -> None:
    if os.path.isfile(path):
        return
    if method == "dppo":
        dppo_pretrain.main(dppo_pretrain.Args(env_id=env_id, seed=seed, output=path, exp_name="cmp_pretrain"))
    else:
        module = gaussian_ppo if method == "gaussian" else gmm_ppo
        module.main(module.Args(env_id=env_id, seed=seed, pretrain=True, output=path, exp_name=f"cmp_{method}_pretrain"))


def finetune(method: str, env_id: str, ckpt: str, args: Args) -> list[dict]:
    module = {"dppo": dppo_finetune, "gaussian": gaussian_ppo, "gmm": gmm_ppo}[method]
    out = module.main(module.Args(env_id=env_id, checkpoint=ckpt, seed=args.seed, n_train_itr=args.n_train_itr,
                                  val_freq=1, exp_name=f"cmp_{method}"))
    return [{"subset": env_id, "method": method, **row} for row in out["eval_rows"]]


SUBSETS, METHODS = ("M1", "M2", "M3"), ("dppo", "gaussian", "gmm")


def check_args(args: Args) -> None:
    """UsageError before any run: numbers (`Limits`), subsets and methods known and given, --out a folder to write."""
    runs.check_args(args)  # every number within the Limits of its field
    for kind, given, valid in (("subset", args.subsets, SUBSETS), ("method", args.methods, METHODS)):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            raise runs.UsageError(f"unknown {kind} {bad[0]!r}; valid: {', '.join(valid)}" if bad else f"no {kind} given")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise runs.UsageError(f"--out {args.out} is a file; give a folder (results.csv, table.md, ... go in it)")
    runs.check_output_path(os.path.join(args.out, "results.csv"), "--out")


def main(args: Args) -> list[dict]:
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    for subset in args.subsets:
        env_id = f"avoid-{subset.lower()}"
        for method in args.methods:
            ckpt = os.path.join(args.out, f"{env_id}_{method}.pt")
            pretrain(method, env_id, ckpt, args.seed)
            rows += finetune(method, env_id, ckpt, args)
            with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    write_table_and_plot(rows, args)
    return rows


def write_table_and_plot(rows: list[dict], args: Args) -> None:
    """table.md (first -> last success per cell) and success.png, drawn by scripts/plot_runs.py from the eval rows."""
    from scripts.plot_runs import RunCurve, plot

    lines = ["| subset | " + " | ".join(args.methods) + " |", "|---|" + "---|" * len(args.methods)]
    groups: dict[str, dict[str, list[RunCurve]]] = {}
    for subset in args.subsets:
        env_id = f"avoid-{subset.lower()}"
        cells = []
        for method in args.methods:
            r = [x for x in rows if x["subset"] == env_id and x["method"] == method]
            if not r:
                cells.append("–")
                continue
            groups.setdefault(env_id, {})[f"cmp_{method}"] = [RunCurve(args.out, env_id, f"cmp_{method}", args.seed, r)]
            success = [float(x["success_rate"]) for x in r if x["mode"] == "stochastic"]
            cells.append(f"{success[0]:.2f} → {success[-1]:.2f}")
        lines.append(f"| {subset} | " + " | ".join(cells) + " |")
    plot(groups, os.path.join(args.out, "success.png"), mode="stochastic", labels={f"cmp_{m}": m for m in args.methods},
         title="Avoid: DPPO vs Gaussian vs GMM (success with the training noise)")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("Success rate (training noise), first evaluation → after fine-tuning\n\n" + table)
    print(table)


if __name__ == "__main__":
    runs.cli(main, Args)
