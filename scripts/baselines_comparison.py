"""Paper §5.1, Fig. 5: DPPO against the diffusion RL baselines, from the same pre-trained checkpoint, one seed each.

Every method runs its own script with its task defaults (the reference's configs, `irom-princeton/dppo`
`cfg/gym/finetune/hopper-v2/ft_*_diffusion_mlp.yaml`) and is evaluated by the same function
(`common.envs.evaluate`) on the same horizon and reset seeds. Fig. 5 plots return against env steps, so when
this harness shortens an iteration it keeps the reference's schedule *in env steps*, not in iterations:

- `--budget paper`: the reference's sizes unchanged (Hopper: 1000 iterations of 40 envs x 500 chunk-steps,
  80k env steps each), read from each script's defaults: ~570 CPU-hours by `--dry-run`, for a GPU machine or a cluster.
- `--budget cpu` (default): Hopper iterations of 40 envs x 250 chunk-steps (1000 env steps per env, the
  episode limit: the shortest iteration that holds a whole episode) and as many iterations as it takes for
  every method's actor to take at least `--min-actor-updates` updates after its critic warm-up.
- Avoid M2 runs the scripts' Avoid defaults under both budgets (51 iterations of 50 envs x 25 chunk-steps,
  one episode each). The reference has no Avoid config for any baseline: those defaults are this project's
  adaptation (DPPO's Avoid run size, the gym configs' method settings; each script's docstring says so).

When an iteration holds r times fewer env steps than the script's default (r = 2 for Hopper under
`--budget cpu`), each run gets:

- the critic warm-up (`--n-critic-warmup-itr`; 5 for DIPO, IDQL, DQL and QSM in the reference's Hopper
  configs, 0 for the others) as the smallest number of iterations whose training iterations hold at least
  the reference's critic-only env steps (Hopper: 4 training iterations x 80k = 320k env steps before the
  actor's first update; evaluation iterations collect no data);
- the evaluation spacing (`--val-freq`) times r, so evaluations stay as far apart in env steps;
- on the methods that make epochs of minibatches over the iteration's own samples (DPPO, exact-likelihood PG,
  DRWR), the minibatch divided by r, so an epoch keeps its number of minibatches; the methods that draw
  batches from a buffer (DAWR, DIPO, IDQL, DQL, QSM) keep their batch, and their updates per iteration
  (n_steps·num_envs / batch_size x replay ratio) shrink by r by themselves: the same updates per env step;
- buffers (sized in transitions or in vector steps of the same num_envs) unchanged, so they span the same
  env steps; LR schedules are constant in every one of these configs (a cosine one would be refused).

A run is refused, in one line and before anything starts, when its iteration is shorter than an episode
and the method learns only from episodes that start and end inside one iteration (DRWR, `drwr.py`
`reward_to_go`), or when its actor would take fewer than `--min-actor-updates` updates after the critic
warm-up (DRWR's count is an upper bound: it updates on the finished episodes' chunk-steps only). The line
names the flag to raise. `--dry-run` prints every run's plan and an estimate of its CPU time from timed
probes of each method (`--probe` re-measures them on this machine: 3 tiny iterations per run, ~30 min for all
16 on a loaded 2-core machine).

Each run is a separate process (one torch thread); `--jobs` run at once, longest first. Per run it writes
`<task>__<method>.json` (the plan, eval rows, per-iteration history, wall and CPU time), and at the end
`table.md` and `comparison.png` (drawn by `scripts/plot_runs.py`) into --out.

    python scripts/baselines_comparison.py --dry-run                     # the plan and its estimated cost
    python scripts/baselines_comparison.py                               # everything (--budget cpu)
    python scripts/baselines_comparison.py --tasks avoid-m2 --methods dppo drwr
    python scripts/baselines_comparison.py --report-only                 # table and plot from the json files
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import DatasetError, UsageError  # noqa: E402
from common import runs  # noqa: E402
from common.runs import cli  # noqa: E402
from common.tasks import get_task  # noqa: E402

MODULES = {"dppo": "dppo_finetune", "drwr": "drwr", "dawr": "dawr", "exact": "exact_likelihood_pg", "dipo": "dipo",
           "idql": "idql", "dql": "dql", "qsm": "qsm"}
LABELS = {"dppo": "DPPO", "drwr": "DRWR", "dawr": "DAWR", "exact": "Exact-likelihood PG", "dipo": "DIPO", "idql": "IDQL",
          "dql": "DQL", "qsm": "QSM"}
TASKS = ("avoid-m2", "hopper")
CHECKPOINTS = {"hopper": "data/hopper/diffusion_medium.pt"}  # Avoid: each script's default, the shipped checkpoint
WHOLE_EPISODES = {"drwr"}  # learns only from episodes that start and end inside one iteration
ITERATION_EPOCHS = {"dppo", "exact", "drwr"}  # epochs of minibatches over the iteration's own samples
# CPU seconds per chunk-step of one iteration (all envs, one torch thread): rollout (sampling + env), update in a
# critic warm-up iteration, update after it. Measured with `--probe` at commit d7cd340 on this project's 2-core
# machine while 2-3 other jobs shared it (rough: +-50%); Hopper with a stand-in checkpoint of the same network (MLP
# 512x3, K 20) whose short episodes make DRWR's update its most costly. `<out>/probe.json` from `--probe` replaces them.
COSTS: dict[str, dict[str, tuple[float, float, float]]] = {
    "avoid-m2": {"dppo": (0.0456, 0.2719, 0.2307), "drwr": (0.0232, 0.0251, 0.0251), "dawr": (0.0232, 0.2050, 0.2050),
                 "exact": (0.0222, 1.7637, 1.7637), "dipo": (0.0297, 1.4668, 1.8578), "idql": (0.2278, 0.5290, 0.7879),
                 "dql": (0.0205, 0.1824, 0.8548), "qsm": (0.0203, 0.2441, 0.2657)},
    "hopper": {"dppo": (0.0426, 0.0733, 0.0733), "drwr": (0.0482, 0.0243, 0.0243), "dawr": (0.0731, 0.1343, 0.1343),
               "exact": (0.0569, 0.6101, 0.6101), "dipo": (0.0557, 0.8045, 1.6772), "idql": (0.2369, 0.4345, 0.5781),
               "dql": (0.0507, 0.1990, 0.6446), "qsm": (0.0398, 0.1775, 0.1907)},
}


@dataclass
class Args:
    out: str = "runs/baselines_comparison"
    """folder for the per-run json files, table.md and comparison.png"""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to run (avoid-m2, hopper)"""
    methods: list[str] = field(default_factory=lambda: list(MODULES))
    """methods to run (dppo drwr dawr exact dipo idql dql qsm)"""
    budget: Literal["cpu", "paper"] = "cpu"
    """cpu: Hopper iterations of one episode (250 chunk-steps), schedule kept in env steps; paper: the reference's
    sizes unchanged"""
    n_train_itr: Annotated[int | None, runs.POSITIVE] = None
    """iterations of every run (None: the budget's)"""
    n_steps: Annotated[int | None, runs.POSITIVE] = None
    """chunk-steps per env per iteration of every run (None: the budget's)"""
    min_actor_updates: Annotated[int, runs.POSITIVE] = 200
    """refuse a run whose actor takes fewer updates than this after its critic warm-up"""
    seed: Annotated[int, runs.SEED] = 1
    """seed of every run"""
    jobs: Annotated[int, runs.POSITIVE] = 2
    """runs at once (each uses one torch thread)"""
    dry_run: bool = False
    """print each run's plan (flags, env steps, warm-up, actor updates, estimated CPU time) and stop"""
    probe: bool = False
    """time a few tiny iterations of each run and write <out>/probe.json, which later estimates use"""
    report_only: bool = False
    """only write table.md and comparison.png from the json files already in --out"""
    one: str | None = None
    """internal: run one "task:method" in this process and write its json"""


class Refused(UsageError):
    """A budget at which a run would not measure what Fig. 5 measures."""


@dataclass
class Plan:
    task: str
    method: str
    flags: dict[str, Any]  # given to the script's Args (everything else: its task defaults)
    n_train_itr: int
    n_steps: int
    num_envs: int
    act_steps: int
    val_freq: int
    warmup_itr: int
    eval_itrs: list[int]  # evaluation-only iterations (no data, no update)
    iteration_env_steps: int
    env_steps: int  # collected by the training iterations
    warmup_env_steps: int  # collected before the actor's first update (the critic learns alone on them)
    reference_warmup_env_steps: int
    updates_per_iteration: int
    actor_updates: int  # after the warm-up; DRWR: an upper bound
    eval_n_steps: int


def reference_args(task: str, method: str) -> Any:
    """The script's Args with its task defaults filled (the reference's config, or the Avoid adaptation)."""
    module = importlib.import_module(MODULES[method])
    args = module.Args(env_id=task)
    module.fill_defaults(args)
    return args


def eval_iterations(n_train_itr: int, val_freq: int, deterministic: bool) -> list[int]:
    """Iterations that only evaluate (reset, run deterministically, no data, no update). Avoid is evaluated with
    the training noise from the training rollouts (App. D.8), so it has none."""
    if not deterministic or val_freq <= 0:
        return []
    return [i for i in range(n_train_itr) if i % val_freq == 0]


def critic_only_env_steps(warmup_itr: int, val_freq: int, deterministic: bool, iteration_env_steps: int) -> int:
    """Env steps the training iterations before the actor's first update collect."""
    evals = set(eval_iterations(warmup_itr, val_freq, deterministic))
    return sum(iteration_env_steps for i in range(warmup_itr) if i not in evals)


def updates_per_iteration(method: str, a: Any) -> int:
    """Actor updates in one training iteration after the warm-up (each script's update loop)."""
    samples = a.n_steps * a.num_envs
    if method == "dppo":  # epochs x whole minibatches of (env-step, denoising-step) pairs
        return a.update_epochs * (samples * a.ft_denoising_steps // a.batch_size)
    if method == "exact":
        return a.update_epochs * (samples // a.batch_size)
    if method == "drwr":  # at most: only the finished episodes' chunk-steps count
        return a.update_epochs * max(1, samples // a.batch_size)
    return int(samples / a.batch_size * a.replay_ratio)  # buffer methods, reference `num_batch`


def derive(task: str, method: str, n_steps: int, n_train_itr: int | None) -> tuple[dict[str, Any], Any]:
    """Flags that shorten the iteration to `n_steps` chunk-steps with the reference's schedule kept in env steps
    (module docstring), and the script's Args they give."""
    module = importlib.import_module(MODULES[method])
    ref = reference_args(task, method)
    flags: dict[str, Any] = {}
    if task in CHECKPOINTS:
        flags["checkpoint"] = CHECKPOINTS[task]
    if n_steps != ref.n_steps:
        r = ref.n_steps / n_steps
        deterministic = get_task(task).suite != "avoid"
        flags["n_steps"] = n_steps
        val_freq = max(1, round(ref.val_freq * r)) if ref.val_freq > 0 else 0
        if val_freq != ref.val_freq:
            flags["val_freq"] = val_freq
        if deterministic and val_freq == 1:
            raise Refused(f"refused: {method} on {task}: at {n_steps} chunk-steps every iteration would only evaluate "
                          f"(the reference evaluates every {ref.val_freq * ref.n_steps} chunk-steps); lower --n-steps")
        ref_warmup = getattr(ref, "n_critic_warmup_itr", 0) or 0
        if ref_warmup > 0:
            iteration = n_steps * ref.num_envs * ref.act_steps
            need = critic_only_env_steps(ref_warmup, ref.val_freq, deterministic,
                                         ref.n_steps * ref.num_envs * ref.act_steps)
            warmup = next(w for w in itertools.count(1)
                          if critic_only_env_steps(w, val_freq, deterministic, iteration) >= need)
            if warmup != ref_warmup:
                flags["n_critic_warmup_itr"] = warmup
        if method in ITERATION_EPOCHS:
            flags["batch_size"] = max(1, round(ref.batch_size / r))
        lr_min = getattr(ref, "actor_lr_min", None)
        if lr_min is not None and lr_min != ref.actor_lr:
            raise Refused(f"refused: {method} on {task}: its actor LR follows a cosine schedule over iterations, which "
                          "this harness does not rescale; run it with --budget paper")
    if n_train_itr is not None and n_train_itr != ref.n_train_itr:
        flags["n_train_itr"] = n_train_itr
    args = module.Args(env_id=task, **flags, eval_only=True)  # the defaults filled without the rules of a training run
    module.fill_defaults(args)  # (whether it can train is `plans`' refusal, which names the budget that suffices)
    return flags, args


def make_plan(task: str, method: str, n_steps: int, n_train_itr: int | None) -> Plan:
    flags, a = derive(task, method, n_steps, n_train_itr)
    t = get_task(task)
    deterministic = t.suite != "avoid"
    iteration = a.n_steps * a.num_envs * a.act_steps
    warmup = getattr(a, "n_critic_warmup_itr", 0) or 0
    evals = eval_iterations(a.n_train_itr, a.val_freq, deterministic)
    training = [i for i in range(a.n_train_itr) if i not in set(evals)]
    upi = updates_per_iteration(method, a)
    ref = reference_args(task, method)
    ref_warmup = getattr(ref, "n_critic_warmup_itr", 0) or 0
    return Plan(task, method, flags, a.n_train_itr, a.n_steps, a.num_envs, a.act_steps, a.val_freq, warmup, evals,
                iteration, len(training) * iteration,
                critic_only_env_steps(warmup, a.val_freq, deterministic, iteration),
                critic_only_env_steps(ref_warmup, ref.val_freq, deterministic, ref.n_steps * ref.num_envs * ref.act_steps),
                upi, upi * sum(1 for i in training if i >= warmup),
                a.eval_n_steps or math.ceil(t.max_episode_steps / a.act_steps))


def budget_n_steps(task: str, budget: str) -> int:
    """Chunk-steps per iteration: the reference's (paper), or for gym locomotion the shortest iteration that holds a
    whole episode (cpu; Hopper: 1000 env steps / T_e 4 = 250)."""
    t = get_task(task)
    ref = reference_args(task, "dppo")
    if budget == "paper" or t.suite != "gym":
        return ref.n_steps
    return math.ceil(t.max_episode_steps / ref.act_steps)


def min_n_train_itr(task: str, method: str, n_steps: int, min_updates: int) -> int:
    """The fewest iterations at which the method's actor takes `min_updates` updates after its warm-up."""
    plan = make_plan(task, method, n_steps, 1)
    deterministic = get_task(task).suite != "avoid"
    if plan.updates_per_iteration == 0:
        return 10**9
    updates, n = 0, 0
    while updates < min_updates:
        evaluates = deterministic and plan.val_freq > 0 and n % plan.val_freq == 0
        if not evaluates and n >= plan.warmup_itr:
            updates += plan.updates_per_iteration
        n += 1
    return n


def plans(args: Args) -> list[Plan]:
    """Every run's plan; Refused (one line naming the flag to raise) for a run that would not measure Fig. 5."""
    out = []
    for task in args.tasks:
        n_steps = args.n_steps or budget_n_steps(task, args.budget)
        n_train_itr = args.n_train_itr
        if n_train_itr is None and args.budget == "cpu" and get_task(task).suite == "gym":
            # the same iterations for every method (all of them, not only --methods): the fewest that give each
            # actor its --min-actor-updates
            n_train_itr = max(min_n_train_itr(task, m, n_steps, args.min_actor_updates) for m in MODULES)
        for method in args.methods:
            p = make_plan(task, method, n_steps, n_train_itr)
            episode = get_task(task).max_episode_steps
            if method in WHOLE_EPISODES and p.n_steps * p.act_steps < episode:
                raise Refused(f"refused: {method} on {task}: an iteration of {p.n_steps} chunk-steps "
                              f"({p.n_steps * p.act_steps} env steps per env) is shorter than an episode ({episode}) "
                              f"and {method} learns only from "
                              f"episodes that start and end inside one iteration; raise --n-steps to at least "
                              f"{math.ceil(episode / p.act_steps)}")
            if p.actor_updates < args.min_actor_updates:
                need = min_n_train_itr(task, method, p.n_steps, args.min_actor_updates)
                warm = f" after the critic warm-up ({p.warmup_env_steps // 1000}k env steps)" if p.warmup_itr else ""
                hint = (f"raise --n-train-itr to at least {need}" if need < 10**9 else
                        "raise --n-steps (one iteration gives it no update)")
                raise Refused(f"refused: {method} on {task}: its actor would take {p.actor_updates} updates{warm}, fewer "
                              f"than --min-actor-updates {args.min_actor_updates}; {hint}")
            out.append(p)
    return out


# ---- cost ----

def read_json(path: str, ok: Any, shape: str) -> Any:
    """The JSON file this harness wrote at `path`, if `ok(data)`; else (a truncated or binary file, another layout) one
    DatasetError naming the file and the layout (`shape`) it must have."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        good = ok(data)
    except (ValueError, OSError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{path}: not a file of this harness ({type(e).__name__}); it holds {shape}: move it aside "
                           "and run again") from None
    if not good:
        raise DatasetError(f"{path}: not a file of this harness; it holds {shape}: move it aside and run again")
    return data


def read_probe(path: str) -> dict[str, dict[str, list[float]]]:
    """<out>/probe.json (written by `probe`): task -> method -> 3 CPU seconds per chunk-step."""
    return read_json(path, lambda d: isinstance(d, dict) and all(
        isinstance(per, dict) and all(isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in v) for v in per.values())
        for per in d.values()), "{task: {method: [rollout, warm-up update, update]}} CPU seconds (--probe)")


def load_costs(out: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    costs = {t: dict(v) for t, v in COSTS.items()}
    path = os.path.join(out, "probe.json")
    if os.path.isfile(path):
        for task, per in read_probe(path).items():
            costs.setdefault(task, {}).update({m: tuple(v) for m, v in per.items()})
    return costs


def estimate_s(p: Plan, costs: dict) -> float | None:
    """CPU seconds: training iterations (rollout + the update of a warm-up or a full iteration) and evaluations
    (the eval iterations and the final one, each eval_n_steps chunk-steps at the rollout's cost)."""
    c = costs.get(p.task, {}).get(p.method)
    if c is None:
        return None
    roll, warm, full = c
    evals = set(p.eval_itrs)
    s = sum(p.n_steps * (roll + (warm if i < p.warmup_itr else full)) for i in range(p.n_train_itr) if i not in evals)
    return s + (len(evals) + 1) * p.eval_n_steps * roll


def wall_s(times: list[float], jobs: int) -> float:
    """Longest first, each run on the first free slot."""
    slots = [0.0] * max(1, jobs)
    for t in sorted(times, reverse=True):
        slots[slots.index(min(slots))] += t
    return max(slots)


def fmt_h(s: float | None) -> str:
    return "–" if s is None else f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.0f} min"


def print_plans(ps: list[Plan], args: Args) -> None:
    costs = load_costs(args.out)
    print(f"budget {args.budget}; --min-actor-updates {args.min_actor_updates}; seed {args.seed}")
    for p in ps:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in p.flags.items()) or "(the script's defaults)"
        bound = "at most " if p.method in WHOLE_EPISODES else ""
        warm = (f"warm-up {p.warmup_itr} itr = {p.warmup_env_steps:,} env steps (reference {p.reference_warmup_env_steps:,})"
                if p.warmup_itr else "no warm-up")
        print(f"{p.task}:{p.method}: python {MODULES[p.method]}.py --env-id {p.task} {flags}\n"
              f"    {p.n_train_itr} itr x {p.num_envs} envs x {p.n_steps} chunk-steps x T_e {p.act_steps} "
              f"({p.iteration_env_steps:,} env steps/itr), {len(p.eval_itrs)} eval-only itr, {p.env_steps:,} env steps; "
              f"{warm}; actor updates after it: {bound}{p.actor_updates} ({p.updates_per_iteration}/itr); "
              f"estimated {fmt_h(estimate_s(p, costs))}")
    est = [estimate_s(p, costs) for p in ps]
    known = [e for e in est if e is not None]
    if known:
        per_task = ", ".join(f"{t} {fmt_h(sum(e for p, e in zip(ps, est) if p.task == t and e is not None))}"
                             for t in args.tasks)
        missing = len(est) - len(known)
        print(f"estimated CPU time {fmt_h(sum(known))} ({per_task}); wall at --jobs {args.jobs}: "
              f"{fmt_h(wall_s(known, args.jobs))}" + (f"; {missing} runs not probed" if missing else ""))
    else:
        print("no cost estimate: run --probe first")


# ---- running ----

def probe(ps: list[Plan], args: Args) -> None:
    """Time 3 tiny iterations of each run (iteration 0 a critic-only warm-up where the method has one, no
    evaluation iterations) and write the per-chunk-step costs to <out>/probe.json."""
    import torch

    torch.set_num_threads(1)
    result: dict[str, dict[str, list[float]]] = {}
    for p in ps:
        module = importlib.import_module(MODULES[p.method])
        # a tenth of the iteration, but whole episodes where the method needs them
        small = p.method not in WHOLE_EPISODES and get_task(p.task).suite == "gym"
        n_steps = max(1, p.n_steps // 10) if small else p.n_steps
        flags, _ = derive(p.task, p.method, n_steps, 3)
        flags.update(val_freq=0, exp_name=f"probe_{p.method}", plot=False, seed=args.seed, save_every=10**6)
        if p.warmup_itr:
            flags["n_critic_warmup_itr"] = 1
        t0, cpu0 = time.time(), time.process_time()
        out = module.main(module.Args(env_id=p.task, **flags))
        busy = (time.process_time() - cpu0) / (time.time() - t0)  # phase times are wall: CPU = wall x this share
        rows = out["history"]
        roll = [busy * sum(h.get(f"time_{k}", 0.0) for k in ("other", "sampling", "env")) / n_steps for h in rows]
        upd = [busy * sum(v for k, v in h.items() if k.startswith("time_") and k[5:] not in ("other", "sampling", "env"))
               / n_steps for h in rows]
        full = sum(upd[1:]) / len(upd[1:])
        result.setdefault(p.task, {})[p.method] = [sum(roll[1:]) / len(roll[1:]), upd[0] if p.warmup_itr else full, full]
        roll_s, warm_s, _ = result[p.task][p.method]
        print(f"probe {p.task}:{p.method}: CPU share {busy:.2f}; CPU s per chunk-step: rollout {roll_s:.4f}, "
              f"warm-up update {warm_s:.4f}, update {full:.4f}")
    path = os.path.join(args.out, "probe.json")
    old = read_probe(path) if os.path.isfile(path) else {}
    for task, per in result.items():
        old.setdefault(task, {}).update(per)
    with open(path, "w") as f:
        json.dump(old, f, indent=1)
    print(f"wrote {path}")


def run_one(p: Plan, args: Args) -> None:
    module = importlib.import_module(MODULES[p.method])
    t0, cpu0 = time.time(), time.process_time()
    out = module.main(module.Args(env_id=p.task, seed=args.seed, exp_name=f"cmp_{p.method}", plot=False, **p.flags))
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for h in out["history"]]
    iter_times = [sum(v for k, v in h.items() if k.startswith("time_")) for h in history]
    result = {"task": p.task, "method": p.method, "budget": args.budget, "flags": p.flags, "plan": dataclasses.asdict(p),
              "run_dir": out["run_dir"], "wall_s": wall, "cpu_s": cpu,
              "train_iteration_s": sum(iter_times) / max(1, len(iter_times)), "eval_rows": out["eval_rows"],
              "history": history}
    with open(os.path.join(args.out, f"{p.task}__{p.method}.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)


def load_results(args: Args) -> dict[tuple[str, str], dict]:
    results = {}
    for task in args.tasks:
        for method in args.methods:
            path = os.path.join(args.out, f"{task}__{method}.json")
            if os.path.isfile(path):
                results[(task, method)] = read_json(path, lambda d: isinstance(d["run_dir"], str) and isinstance(
                    d["history"], list) and isinstance(d["eval_rows"], list) and all(
                    r["mode"] in ("deterministic", "stochastic") and math.isfinite(float(r["env_steps"]))
                    for r in d["eval_rows"]) and any(r["mode"] == report_mode(task) for r in d["eval_rows"]),
                    f"a run's run_dir, history and eval_rows, with {report_mode(task)} rows (one run, --one)")
    return results


def report_mode(task: str) -> str:
    """The evaluations the report shows: Avoid's success with the training noise (App. D.8), else deterministic."""
    return "stochastic" if task.startswith("avoid") else "deterministic"


def write_report(args: Args) -> str:
    results = load_results(args)
    lines = []
    for task in args.tasks:
        key = "success_rate" if task.startswith("avoid") else "return_mean"
        fmt = "{:.2f}" if key == "success_rate" else "{:.0f}"
        what = "success rate with the training noise" if key == "success_rate" else "deterministic return"
        lines += [f"**{task}** ({what})", "", "| method | first evaluation | last evaluation | best | env steps "
                  "| actor updates | CPU s / iteration |", "|---|---|---|---|---|---|---|"]
        for method in args.methods:
            r = results.get((task, method))
            if r is None:
                lines.append(f"| {LABELS[method]} | not run | | | | | |")
                continue
            rows = [x for x in r["eval_rows"] if x["mode"] == report_mode(task)]
            vals = [float(x[key]) for x in rows]
            n_itr = r["history"][-1]["iteration"] + 1 if r["history"] else 1
            updates = r.get("plan", {}).get("actor_updates", "–")
            updates = f"≤ {updates}" if method in WHOLE_EPISODES and "plan" in r else updates
            cpu = f"{r['cpu_s'] / n_itr:.1f}" if "cpu_s" in r else "–"
            lines.append(f"| {LABELS[method]} | {fmt.format(vals[0])} | {fmt.format(vals[-1])} | {fmt.format(max(vals))} "
                         f"| {int(rows[-1]['env_steps'])} | {updates} | {cpu} |")
        lines.append("")
    table = "\n".join(lines)
    from scripts.plot_runs import RunCurve, plot

    groups = {task: {f"cmp_{m}": [RunCurve(r["run_dir"], task, f"cmp_{m}", args.seed, r["eval_rows"])]
                     for m in args.methods if (r := results.get((task, m))) is not None} for task in args.tasks}
    if any(groups.values()):
        plot({t: g for t, g in groups.items() if g}, os.path.join(args.out, "comparison.png"), mode="auto",
             labels={f"cmp_{m}": LABELS[m] for m in MODULES}, title="DPPO vs the diffusion RL baselines, one seed each")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return table


def check_args(args: Args) -> None:
    runs.check_args(args)  # every number within the Limits of its field
    for kind, given, valid in (("method", args.methods, list(MODULES)), ("task", args.tasks, list(TASKS))):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            raise UsageError(f"unknown {kind} {bad[0]!r}; valid: {', '.join(valid)}" if bad else f"no {kind} given")
    args.methods = list(dict.fromkeys(args.methods))
    args.tasks = list(dict.fromkeys(args.tasks))
    if not args.dry_run and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder (the json files, table.md, ... go in it)")
    if not args.dry_run:
        runs.check_output_path(os.path.join(args.out, "table.md"), "--out")


def main(args: Args) -> None:
    check_args(args)
    args.out = os.path.abspath(args.out)
    if args.report_only:
        os.makedirs(args.out, exist_ok=True)
        write_report(args)
        return
    try:
        ps = plans(args)
    except Refused as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    if args.one:
        task, method = args.one.split(":")
        run_one(next(p for p in ps if p.task == task and p.method == method), args)
        return
    if args.dry_run:
        print_plans(ps, args)
        return
    missing = sorted({p.flags["checkpoint"] for p in ps if "checkpoint" in p.flags
                      and not os.path.isfile(os.path.join(ROOT, p.flags["checkpoint"]))})
    if missing:
        raise UsageError(f"{missing[0]} not found: run `bash scripts/hopper_data.sh` first")
    os.makedirs(args.out, exist_ok=True)
    if args.probe:
        os.chdir(ROOT)
        probe(ps, args)
        return
    print_plans(ps, args)
    costs = load_costs(args.out)
    queue = sorted(ps, key=lambda p: -(estimate_s(p, costs) or 0.0))
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    passed = ["--budget", args.budget, "--min-actor-updates", str(args.min_actor_updates), "--seed", str(args.seed),
              "--out", args.out] + [x for name in ("n_train_itr", "n_steps") if getattr(args, name) is not None
                                    for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    while queue or running:
        while queue and len(running) < args.jobs:
            p = queue.pop(0)
            log = open(os.path.join(args.out, f"{p.task}__{p.method}.log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{p.task}:{p.method}", "--tasks", p.task,
                   "--methods", p.method, *passed]
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            f"{p.task}:{p.method}"))
            print(f"started {p.task}:{p.method}")
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"finished {name} (exit {proc.returncode})")
    write_report(args)


if __name__ == "__main__":
    cli(main, Args)
