"""The paper's appendix ablations in small (Ren et al., ICLR 2025, App. B), each run by the project's own scripts.

- `scratch` (App. B.2, Fig. A6): `dppo_finetune.py --from-scratch` against `gaussian_ppo.py --from-scratch` on Hopper-v5,
  the same iterations (10 envs x 1000 steps each); the figure draws the deterministic evaluation's return against env
  steps and against wall seconds (TensorBoard's time of each `eval/episodic_return`, from the run folder's opening).
- `expert-data` (App. B.2, Fig. A5): DPPO (`dppo_pretrain.py`) and Gaussian (`gaussian_ppo.py --pretrain`) pre-trained
  on the first N episodes of the task's demonstrations (`--max-n-episodes`), then each fine-tuned by its own script.
- `critic` (App. B.1 item 1, Fig. A1): `dppo_critic_ablation.py --critic value|denoising-value|q` from the task's
  built-in checkpoint.

Every script runs as its own process (`--jobs` at a time, `--torch-threads 1` each; CPU seconds from `os.wait4`), its
output in `<out>/logs/`. A cell already finished (`<out>/cells/<name>.json`) is read back, not run again, and a
pre-trained checkpoint already in `<out>/checkpoints/` is reused. Writes `<out>/results.csv` (one row per evaluation),
`<out>/table.md` and `<out>/figure.png`. Avoid's success is that of the training rollouts (App. D.8).

    python scripts/appendix_ablations.py scratch --dry-run   # the commands, nothing run
    python scripts/appendix_ablations.py scratch             # 36 iterations, 30 of them training: 300k env steps each
    python scripts/appendix_ablations.py expert-data         # N = 10, 30, 96 of the 96 built-in Avoid M2 demos
    python scripts/appendix_ablations.py critic --seeds 1 2 3
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import runs  # noqa: E402


@dataclass
class Args:
    experiment: tyro.conf.Positional[Literal["scratch", "expert-data", "critic"]]
    """which ablation: scratch (Fig. A6), expert-data (Fig. A5) or critic (Fig. A1)"""
    out: str | None = None
    """folder for results.csv, table.md, figure.png, logs/, cells/ (None: runs/appendix/<experiment>)"""
    env_id: str | None = None
    """task (None: hopper for scratch, avoid-m2 otherwise)"""
    seeds: Annotated[list[int], runs.SEED] = field(default_factory=lambda: [1])
    """seeds of every cell"""
    n_train_itr: Annotated[int | None, runs.POSITIVE] = None
    """fine-tuning iterations of every run (None: the scripts' defaults; scratch: 36)"""
    val_freq: Annotated[int | None, runs.NON_NEGATIVE] = None
    """iterations between evaluations (None: scratch 6, so 30 of 36 iterations train; Avoid 1, from the rollouts)"""
    episodes: Annotated[list[int] | None, runs.POSITIVE] = None
    """expert-data: the numbers N of demonstrations (None: 10 30 96)"""
    jobs: Annotated[int, runs.POSITIVE] = 2
    """processes at a time"""
    torch_threads: Annotated[int, runs.POSITIVE] = 1
    """--torch-threads of every script"""
    dry_run: bool = False
    """print the commands and exit"""


@dataclass
class Cell:
    name: str  # exp_name of its fine-tuning run, and the file names under <out>
    method: str  # the line of the figure
    group: str  # the panel of the figure (expert-data: N demonstrations)
    seed: int
    steps: list[tuple[list[str], str | None]]  # (argv, the file it makes: skipped when it exists)


def cells(args: Args) -> list[Cell]:
    """Every run of the experiment, the longest first."""
    py, common = sys.executable, ["--env-id", args.env_id, "--torch-threads", str(args.torch_threads)]
    ft = common + ["--val-freq", str(args.val_freq)] + (["--n-train-itr", str(args.n_train_itr)] if args.n_train_itr else [])
    out = []
    for seed in args.seeds:
        s = ["--seed", str(seed)]
        if args.experiment == "scratch":
            for script, method in (("dppo_finetune", "DPPO"), ("gaussian_ppo", "Gaussian")):
                name = f"a6_{script}"
                out.append(Cell(name, method, args.env_id, seed, [([py, f"{script}.py", "--from-scratch", *ft, *s,
                                                                    "--exp-name", name], None)]))
        elif args.experiment == "critic":
            for critic in ("q", "denoising-value", "value"):
                argv = [py, "dppo_critic_ablation.py", "--critic", critic, *ft, *s, "--exp-name", f"a1_{critic}"]
                out.append(Cell(f"a1_{critic}", critic, args.env_id, seed, [(argv, None)]))
        else:
            for n in args.episodes:
                for method, pre, tune in (("DPPO", ["dppo_pretrain.py"], "dppo_finetune.py"),
                                          ("Gaussian", ["gaussian_ppo.py", "--pretrain"], "gaussian_ppo.py")):
                    name = f"a5_{method.lower()}_n{n}"
                    ckpt = os.path.join(args.out, "checkpoints", f"{args.env_id}_{method.lower()}_n{n}_s{seed}.pt")
                    pretrain = [py, *pre, *common, "--max-n-episodes", str(n), *s, "--output", ckpt, "--exp-name",
                                f"{name}_pretrain"]
                    out.append(Cell(name, method, f"{n} demonstrations", seed, [
                        (pretrain, ckpt), ([py, tune, "--checkpoint", ckpt, *ft, *s, "--exp-name", name], None)]))
    return out


def run_cell(cell: Cell, out: str, failed: threading.Event) -> dict | None:
    """Run the cell's steps in order (output to logs/<name>_s<seed>.log) -> {run_dir, cpu_s, wall_s}, also kept in
    cells/<name>_s<seed>.json; a step that fails sets `failed` and raises UsageError with its last line; once `failed`
    is set, a cell not started yet is skipped (None)."""
    key = f"{cell.name}_s{cell.seed}"
    record = os.path.join(out, "cells", f"{key}.json")
    if os.path.isfile(record):
        with open(record) as f:
            return json.load(f)
    if failed.is_set():
        return None
    log_path, cpu, t0 = os.path.join(out, "logs", f"{key}.log"), 0.0, time.time()
    with open(log_path, "w") as log:
        for argv, makes in cell.steps:
            if makes and os.path.exists(makes):
                continue
            log.write("$ " + " ".join(argv[1:]) + "\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            if proc.returncode:
                failed.set()
                with open(log_path) as f:
                    last = [line.strip() for line in f if line.strip()][-1]
                raise runs.UsageError(f"{key}: {os.path.basename(argv[1])} exited {proc.returncode}: {last} "
                                      f"(whole output: {log_path})")
    with open(log_path) as f:
        found = re.findall(r"^run folder (\S+): success", f.read(), re.M)
    result = {"run_dir": os.path.join(ROOT, found[-1]), "cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1)}
    with open(record, "w") as f:
        json.dump(result, f)
    return result


def eval_seconds(run_dir: str) -> dict[int, float]:
    """iteration -> wall seconds from the run folder's opening to its `eval/episodic_return` (TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "eval/episodic_return" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.wall_time - acc.FirstEventTimestamp() for e in acc.Scalars("eval/episodic_return")}


def write_results(args: Args, done: list[tuple[Cell, dict]]) -> None:
    """results.csv (every evaluation row of every cell), table.md (first -> last evaluation, CPU s) and figure.png."""
    from scripts.plot_runs import RunCurve, plot, read_eval_csv, task_metric

    curves = [RunCurve(res["run_dir"], cell.group, cell.method, cell.seed,
                       read_eval_csv(os.path.join(res["run_dir"], "eval.csv"))) for cell, res in done]
    metric, mode = task_metric(curves)  # Avoid: success of the training rollouts; Hopper: deterministic return
    rows, groups = [], {}
    lines = [f"| {'demonstrations' if args.experiment == 'expert-data' else 'task'} | method | seed | {metric} first "
             "→ last (best) | env steps | CPU s | wall s |", "|---|---|---|---|---|---|---|"]
    for (cell, res), curve in zip(done, curves):
        seconds = eval_seconds(res["run_dir"]) if args.experiment == "scratch" else {}
        for r in curve.rows:
            at = seconds.get(int(r["iteration"])) if r["mode"] == "deterministic" else None
            rows.append({"cell": cell.name, "method": cell.method, "group": cell.group, "seed": cell.seed, **r,
                         "wall_s": "" if at is None else round(at, 1)})
        ys = [float(r[metric]) for r in curve.rows if r["mode"] == mode]
        lines.append(f"| {cell.group} | {cell.method} | {cell.seed} | {ys[0]:.2f} → **{ys[-1]:.2f}** ({max(ys):.2f}) | "
                     f"{curve.rows[-1]['env_steps']} | {res['cpu_s']:.0f} | {res['wall_s']:.0f} |")
        groups.setdefault(cell.group, {}).setdefault(cell.method, []).append(curve)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    title = {"scratch": "From scratch (App. B.2, Fig. A6)", "critic": "Advantage estimators (App. B.1, Fig. A1)",
             "expert-data": "Pre-trained on N demonstrations, then fine-tuned (App. B.2, Fig. A5)"}[args.experiment]
    figure = os.path.join(args.out, "figure.png")
    if args.experiment != "scratch":
        plot(groups, figure, mode=mode, title=title)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for cell, _ in done:  # each seed its own line
        det = [r for r in rows if (r["cell"], r["seed"], r["mode"]) == (cell.name, cell.seed, "deterministic")]
        timed = [r for r in det if r["wall_s"] != ""]
        label = f"{cell.method} seed {cell.seed}"
        axes[0].plot([int(r["env_steps"]) for r in det], [float(r["return_mean"]) for r in det], "o-", ms=3, label=label)
        axes[1].plot([r["wall_s"] for r in timed], [float(r["return_mean"]) for r in timed], "o-", ms=3, label=label)
    axes[0].set(xlabel="training env steps", ylabel="return (deterministic evaluation)", title=args.env_id)
    axes[1].set(xlabel="wall seconds of a 1-thread process (shared 2-core CPU)", title=args.env_id)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)


def main(args: Args) -> list[dict]:
    runs.check_args(args)  # every number within the Limits of its field
    if args.episodes is not None and args.experiment != "expert-data":
        raise runs.UsageError(f"--episodes is for expert-data; drop it for {args.experiment}")
    for flag, values in (("--seeds", args.seeds), ("--episodes", args.episodes or [])):
        if len(set(values)) < len(values):
            raise runs.UsageError(f"{flag} {' '.join(map(str, values))}: a value given twice; give each once")
    args.env_id = args.env_id or ("hopper" if args.experiment == "scratch" else "avoid-m2")
    args.episodes = args.episodes or ([10, 30, 96] if args.experiment == "expert-data" else None)
    args.n_train_itr = args.n_train_itr or (36 if args.experiment == "scratch" else None)
    args.val_freq = (6 if args.experiment == "scratch" else 1) if args.val_freq is None else args.val_freq
    args.out = os.path.abspath(args.out or os.path.join("runs", "appendix", args.experiment))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise runs.UsageError(f"--out {args.out} is a file; give a folder (results.csv, table.md, ... go in it)")
    plan = cells(args)
    if args.dry_run:
        for cell in plan:
            print("\n".join(" ".join(["python", *argv[1:]]) for argv, _ in cell.steps))
        return []
    for sub in ("logs", "cells") + (("checkpoints",) if args.experiment == "expert-data" else ()):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    failed = threading.Event()  # a run failed: start no other, raise its line once the running ones end
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_cell, cell, args.out, failed) for cell in plan]
        done = [(cell, f.result()) for cell, f in zip(plan, futures)]
    write_results(args, done)
    return [res for _, res in done]


if __name__ == "__main__":
    runs.cli(main, Args)
