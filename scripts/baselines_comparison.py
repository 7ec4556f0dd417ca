"""Paper §5.1, Fig. 5: DPPO against the diffusion RL baselines, from the same pre-trained checkpoint, one seed each.

Every method runs its own script with its task defaults (the reference's configs) and is evaluated by
the same function (`common.envs.evaluate`) on the same horizon and reset seeds:

- Avoid M2: 51 iterations of 50 envs x 25 chunk-steps from the shipped checkpoint; success with the
  training noise (App. D.8).
- Hopper: from the diffusion policy pre-trained on the built-in medium data (`scripts/hopper_data.sh`),
  40 envs, a 2-core budget of 15 iterations of 50 chunk-steps (the reference runs 1000 of 500);
  deterministic evaluations every 5 iterations (the reference: 10) and after the last, so 12
  iterations train (96k env steps). Where a
  method's minibatch was sized for 500 chunk-steps it is scaled by the same 1/10, so an epoch keeps
  its number of minibatches (DPPO 50000 -> 5000 pairs, exact-likelihood PG 5000 -> 500 samples); the
  off-policy methods' updates per iteration (n_steps·n_envs/batch × replay ratio) scale by themselves.
  Nothing else is changed.

Each run is a separate process (one torch thread); `--jobs` run at once. Per run it writes
`<task>__<method>.json` (eval rows, per-iteration history, wall time), and at the end `table.md`
and `comparison.png` (drawn by `scripts/plot_runs.py`, as `plot_runs.py runs/*__cmp_*` would from the run
folders) into --out.

    python scripts/baselines_comparison.py                               # everything
    python scripts/baselines_comparison.py --tasks avoid-m2 --methods dppo drwr
    python scripts/baselines_comparison.py --report-only                 # table and plot from the json files
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"dppo": "dppo_finetune", "drwr": "drwr", "dawr": "dawr", "exact": "exact_likelihood_pg", "dipo": "dipo",
           "idql": "idql", "dql": "dql", "qsm": "qsm"}
LABELS = {"dppo": "DPPO", "drwr": "DRWR", "dawr": "DAWR", "exact": "Exact-likelihood PG", "dipo": "DIPO", "idql": "IDQL",
          "dql": "DQL", "qsm": "QSM"}
# the budget of each task (flags given to every method) and per-method minibatch scaling (module docstring)
BUDGETS = {"avoid-m2": {}, "hopper": {"checkpoint": "data/hopper/diffusion_medium.pt", "n_train_itr": 15, "n_steps": 50,
                                   "val_freq": 5}}
SCALED = {"hopper": {"dppo": {"batch_size": 5000}, "exact": {"batch_size": 500}}}


@dataclass
class Args:
    out: str = "runs/baselines_comparison"
    """folder for the per-run json files, table.md and comparison.png"""
    tasks: list[str] = field(default_factory=lambda: ["avoid-m2", "hopper"])
    """tasks to run (avoid-m2, hopper)"""
    methods: list[str] = field(default_factory=lambda: list(MODULES))
    """methods to run"""
    seed: int = 1
    """seed of every run"""
    jobs: int = 2
    """runs at once (each uses one torch thread)"""
    report_only: bool = False
    """only write table.md and comparison.png from the json files already in --out"""
    one: str | None = None
    """internal: run one "task:method" in this process and write its json"""


def run_one(task: str, method: str, args: Args) -> None:
    import importlib

    sys.path.insert(0, ROOT)
    module = importlib.import_module(MODULES[method])
    flags = {**BUDGETS[task], **SCALED.get(task, {}).get(method, {})}
    t0, cpu0 = time.time(), time.process_time()
    out = module.main(module.Args(env_id=task, seed=args.seed, exp_name=f"cmp_{method}", plot=False, **flags))
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for h in out["history"]]
    iter_times = [sum(v for k, v in h.items() if k.startswith("time_")) for h in history]
    result = {"task": task, "method": method, "flags": flags, "run_dir": out["run_dir"], "wall_s": wall, "cpu_s": cpu,
              "train_iteration_s": sum(iter_times) / max(1, len(iter_times)), "eval_rows": out["eval_rows"],
              "history": history}
    with open(os.path.join(args.out, f"{task}__{method}.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)


def load_results(args: Args) -> dict[tuple[str, str], dict]:
    results = {}
    for task in args.tasks:
        for method in args.methods:
            path = os.path.join(args.out, f"{task}__{method}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    results[(task, method)] = json.load(f)
    return results


def write_report(args: Args) -> str:
    results = load_results(args)
    metric = {"avoid-m2": ("success_rate", "success rate (training noise)"), "hopper": ("return_mean", "return")}
    lines = []
    for task in args.tasks:
        key = metric.get(task, ("return_mean", ""))[0]
        fmt = "{:.2f}" if key == "success_rate" else "{:.0f}"
        what = "success rate with the training noise" if key == "success_rate" else "deterministic return"
        lines += [f"**{task}** ({what})",
                  "", "| method | first evaluation | last evaluation | best | env steps | wall s / training iteration "
                  "| CPU s / iteration |", "|---|---|---|---|---|---|---|"]
        for method in args.methods:
            r = results.get((task, method))
            if r is None:
                lines.append(f"| {LABELS[method]} | not run | | | | | |")
                continue
            rows = [x for x in r["eval_rows"] if x["mode"] == ("stochastic" if task.startswith("avoid") else "deterministic")]
            vals = [float(x[key]) for x in rows]
            n_itr = r["history"][-1]["iteration"] + 1 if r["history"] else 1
            cpu = f"{r['cpu_s'] / n_itr:.1f}" if "cpu_s" in r else "–"
            lines.append(f"| {LABELS[method]} | {fmt.format(vals[0])} | {fmt.format(vals[-1])} | {fmt.format(max(vals))} "
                         f"| {int(rows[-1]['env_steps'])} | {r['train_iteration_s']:.1f} | {cpu} |")
        lines.append("")
    table = "\n".join(lines)
    # the figure: scripts/plot_runs.py's curves, from the eval rows each run's json keeps (its run folder may be gone)
    sys.path.insert(0, ROOT)
    from scripts.plot_runs import RunCurve, plot

    groups = {task: {f"cmp_{m}": [RunCurve(r["run_dir"], task, f"cmp_{m}", args.seed, r["eval_rows"])]
                     for m in args.methods if (r := results.get((task, m))) is not None} for task in args.tasks}
    plot({t: g for t, g in groups.items() if g}, os.path.join(args.out, "comparison.png"), mode="auto",
         labels={f"cmp_{m}": LABELS[m] for m in MODULES}, title="DPPO vs the diffusion RL baselines, one seed each")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return table


def main(args: Args) -> None:
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        task, method = args.one.split(":")
        run_one(task, method, args)
        return
    if not args.report_only:
        queue = [(t, m) for t in args.tasks for m in args.methods]
        running: list[tuple[subprocess.Popen, str]] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        while queue or running:
            while queue and len(running) < args.jobs:
                task, method = queue.pop(0)
                log = open(os.path.join(args.out, f"{task}__{method}.log"), "w")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{task}:{method}", "--out", args.out,
                       "--seed", str(args.seed)]
                running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                f"{task}:{method}"))
                print(f"started {task}:{method}")
            time.sleep(2)
            for p, name in list(running):
                if p.poll() is not None:
                    running.remove((p, name))
                    print(f"finished {name} (exit {p.returncode})")
    write_report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
