"""Learning curves from run folders: success rate (or return) against env steps, mean over seeds with a band.

    python scripts/plot_runs.py runs/* --out curves.png
    python scripts/plot_runs.py runs/hopper__* --band std --label cmp_dppo=DPPO cmp_drwr=DRWR

Reads each run folder's `eval.csv` (one row per evaluation: iteration, env_steps, mode, return_mean,
return_std, success_rate, n_episodes) and `args.json` (`env_id`, `exp_name`, `seed`; the folder name
`{env_id}__{exp_name}__{seed}__{time}` when there is none). Runs are grouped by task (`env_id`, one
subplot each) and method (`exp_name`, one line each; the scripts' default `exp_name` is the script's name).
Per task it plots the success rate when some row of the task has one, else the return, from the
deterministic evaluation rows when the task's runs have any, else the stochastic ones (Avoid, whose
success is measured with the training noise, paper App. D.8). Each seed's curve is interpolated onto
the union of the seeds' env steps inside the range every seed covers; the line is the mean over
seeds and the band is min–max over seeds (`--band std`: mean ± one standard deviation).

A run folder without `eval.csv` rows (no file yet, an empty one, or its header only) is skipped with a warning
naming the file, or, when no folder has any, stops the command with one line naming it; a path that is not a run
folder (no `args.json`, not named like one), or an `eval.csv` that is not one (a binary file, env steps that are
not a whole number >= 0, a column missing) stops the command with one line naming the file (and its line).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro

RUN_NAME = re.compile(r"^(?P<env_id>.+?)__(?P<exp_name>.+)__(?P<seed>-?\d+)__\d+(-\d+)?$")


class PlotError(ValueError):
    """A path the command cannot use; printed as one line."""


@dataclass
class Args:
    paths: tyro.conf.Positional[list[str]]
    """run folders, e.g. runs/*"""
    out: str = "curves.png"
    """the figure to write (png, pdf, svg)"""
    band: Literal["minmax", "std"] = "minmax"
    """the band around the mean over seeds: min–max over seeds, or ± one standard deviation"""
    mode: Literal["auto", "deterministic", "stochastic"] = "auto"
    """which eval.csv rows: auto = deterministic when the task's runs have any, else stochastic"""
    label: list[str] = field(default_factory=list)
    """EXP_NAME=LABEL pairs: legend names of methods"""
    title: str | None = None
    """a title over the whole figure"""


@dataclass
class RunCurve:
    path: str
    env_id: str
    method: str
    seed: int
    rows: list[dict[str, str]]


def read_run(path: str) -> RunCurve:
    """The run folder's identity and eval.csv rows; NoEvaluations when it has none yet."""
    name = os.path.basename(os.path.normpath(path))
    args_path = os.path.join(path, "args.json")
    if not os.path.isdir(path) or not (os.path.isfile(args_path) or RUN_NAME.match(name)):
        raise PlotError(f"{path}: not a run folder (no args.json, and not named {{env_id}}__{{exp_name}}__{{seed}}__{{time}})")
    if os.path.isfile(args_path):
        try:
            with open(args_path) as f:
                saved = json.load(f)
            env_id, method, seed = saved["env_id"], saved["exp_name"], int(saved["seed"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlotError(f"{args_path}: not a run's args.json ({type(e).__name__}: {e})") from None
    else:
        m = RUN_NAME.match(name)
        env_id, method, seed = m["env_id"], m["exp_name"], int(m["seed"])
    rows = read_eval_csv(os.path.join(path, "eval.csv"))
    return RunCurve(path, env_id, method, seed, rows)


class NoEvaluations(PlotError):
    """A run folder without evaluation rows yet: skipped with a warning, unless no folder has any."""


def read_eval_csv(csv_path: str) -> list[dict[str, str]]:
    """The rows of a run's eval.csv, checked: a text file with the columns read here, env steps a finite whole number
    >= 0, return_mean and success_rate numbers (NaN: no episode, or no success rule), mode one the scripts write."""
    if not os.path.exists(csv_path):
        raise NoEvaluations(f"{csv_path} does not exist (no evaluation written yet)")
    if not os.path.isfile(csv_path):
        raise PlotError(f"{csv_path} is a folder, not a run's eval.csv; move it away")
    try:
        with open(csv_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PlotError(f"cannot read {csv_path} ({e.strerror}); check its permissions") from None
    if not raw:
        raise NoEvaluations(f"{csv_path} is empty (0 bytes, not even its header)")
    try:
        text = raw.decode("utf-8")
        if "\0" in text:
            raise UnicodeError
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (UnicodeError, csv.Error):
        raise PlotError(f"{csv_path}: not a text file of comma-separated rows, so not an eval.csv of these scripts; "
                        "move it away or give the run folder it belongs to") from None
    missing = {"env_steps", "mode", "return_mean", "success_rate"} - set(rows[0] if rows else {})
    if rows and missing:
        raise PlotError(f"{csv_path}: not an eval.csv of these scripts (no {', '.join(sorted(missing))} column)")
    for n, r in enumerate(rows, start=2):
        try:
            steps, values = float(r["env_steps"]), (float(r["return_mean"]), float(r["success_rate"]))
        except (TypeError, ValueError):
            raise PlotError(f"{csv_path} line {n}: env_steps, return_mean and success_rate must be numbers") from None
        if not (math.isfinite(steps) and steps >= 0 and steps == int(steps)):
            raise PlotError(f"{csv_path} line {n}: env_steps is {r['env_steps']!r}, not a whole number >= 0; the scripts "
                            "write the env steps taken: repair or remove the line")
        if any(math.isinf(v) for v in values):
            raise PlotError(f"{csv_path} line {n}: return_mean and success_rate must be finite (or nan), not "
                            f"{r['return_mean']!r} and {r['success_rate']!r}; repair or remove the line")
        if r["mode"] not in ("deterministic", "stochastic"):
            raise PlotError(f"{csv_path} line {n}: mode is {r['mode']!r}, not deterministic or stochastic")
    if not rows:
        raise NoEvaluations(f"{csv_path} has its header but no evaluation rows yet")
    return rows


def group_runs(runs: list[RunCurve]) -> dict[str, dict[str, list[RunCurve]]]:
    """task -> method -> runs (one per seed), in the order first seen."""
    groups: dict[str, dict[str, list[RunCurve]]] = {}
    for run in runs:
        groups.setdefault(run.env_id, {}).setdefault(run.method, []).append(run)
    return groups


def task_metric(runs: list[RunCurve], mode: str = "auto") -> tuple[str, str]:
    """(metric column, eval mode) for one task's runs: success_rate when any row has one, else return_mean;
    deterministic rows when any run has them (with mode auto)."""
    rows = [r for run in runs for r in run.rows]
    if mode == "auto":
        mode = "deterministic" if any(r["mode"] == "deterministic" for r in rows) else "stochastic"
    has_success = any(r["mode"] == mode and not math.isnan(float(r["success_rate"])) for r in rows)
    return ("success_rate" if has_success else "return_mean"), mode


def seed_curve(run: RunCurve, metric: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of one run's rows of `mode`, sorted; the last row wins where env steps repeat."""
    points = {int(float(r["env_steps"])): float(r[metric]) for r in run.rows if r["mode"] == mode}
    x = np.array(sorted(points), dtype=float)
    return x, np.array([points[int(k)] for k in x])


def mean_and_band(curves: list[tuple[np.ndarray, np.ndarray]], band: str = "minmax"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves on the union of their env steps inside the range all of them cover (linear
    interpolation) -> (x, mean, low, high); low/high: min/max over seeds, or mean ∓ std (population std)."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return (np.zeros(0),) * 4
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean = ys.mean(0)
    if band == "std":
        std = ys.std(0)
        return grid, mean, mean - std, mean + std
    return grid, mean, ys.min(0), ys.max(0)


def plot(groups: dict[str, dict[str, list[RunCurve]]], out: str, band: str = "minmax", mode: str = "auto",
         labels: dict[str, str] | None = None, title: str | None = None) -> list[dict]:
    """One subplot per task, one line (mean) and band per method; writes `out` and returns one summary
    row per (task, method): seeds, metric, mode, last mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    summary = []
    for ax, (task, methods) in zip(axes[0], groups.items()):
        metric, task_mode = task_metric([r for runs in methods.values() for r in runs], mode)
        for method, runs in methods.items():
            x, mean, low, high = mean_and_band([seed_curve(r, metric, task_mode) for r in runs], band)
            if not len(x):
                print(f"warning: {task} {method}: no {task_mode} rows; not drawn", file=sys.stderr)
                continue
            seeds = sorted(r.seed for r in runs)
            count = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            if len(set(seeds)) < len(seeds):
                print(f"warning: {task} {method}: several runs of the same seed ({seeds}); each counts in the mean",
                      file=sys.stderr)
                count = f"{len(runs)} runs"
            line, = ax.plot(x, mean, marker="o", ms=3, lw=1.5, label=f"{labels.get(method, method)} ({count})")
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)
            summary.append({"task": task, "method": method, "seeds": seeds, "metric": metric, "mode": task_mode,
                            "env_steps": float(x[-1]), "last_mean": float(mean[-1])})
        what = "success rate" if metric == "success_rate" else "return"
        ax.set(title=task, xlabel="env steps", ylabel=f"{what} ({task_mode} evaluation)")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v else "0")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    note = "mean over seeds; band: " + ("min–max over seeds" if band == "minmax" else "± one std over seeds")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return summary


def check_out(out: str) -> None:
    """PlotError unless `out` names a file in a format matplotlib writes (its extension says which) in a folder that
    can be written (or made): checked before any run is read, so a typo costs nothing and the name printed is the file
    written."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if ext not in formats:
        got = f"the format .{ext}" if ext else "no extension"
        raise PlotError(f"--out {out!r} has {got}; give a file name ending in one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    if os.path.isdir(out):
        raise PlotError(f"--out {out!r} is a folder; give a file name, e.g. {os.path.join(out, 'curves.png')}")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the folders plot() makes
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PlotError(f"--out {out!r}: cannot write under {parent}; give a path in a folder you can write")


def main(args: Args) -> list[dict]:
    check_out(args.out)
    labels = {}
    for item in args.label:
        if "=" not in item:
            raise PlotError(f"--label {item!r}: write EXP_NAME=LABEL")
        key, value = item.split("=", 1)
        labels[key] = value
    if not args.paths:
        raise PlotError("give run folders, e.g. runs/*")
    runs, skipped = [], []
    for path in args.paths:
        try:
            runs.append(read_run(path))
        except NoEvaluations as e:
            skipped.append(str(e))
    runs = [run for run in runs if run is not None]
    if not runs:
        more = f" (and {len(skipped) - 1} more folders without evaluations)" if len(skipped) > 1 else ""
        raise PlotError("none of the run folders has evaluations" + (f": {skipped[0]}{more}" if skipped else ""))
    for why in skipped:
        print(f"warning: {why}; skipped", file=sys.stderr)
    summary = plot(group_runs(runs), args.out, args.band, args.mode, labels, args.title)
    for s in summary:
        print(f"{s['task']:>14} {labels.get(s['method'], s['method']):>20}: {len(s['seeds'])} seed(s), "
              f"{s['metric']} ({s['mode']}) {s['last_mean']:.3g} at {s['env_steps']:.0f} env steps")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
