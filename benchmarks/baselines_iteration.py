"""Time one iteration of the diffusion RL baselines, phase by phase (env, sampling, update, ...).

Runs each script's own `main` (no copy of its loop) for 2 iterations with evaluation off and reports the second one
(the first warms up): per phase the wall time (`common.runs.Run`'s timer) and the
process CPU time (robust to other jobs on a shared machine). Policies have the paper's architecture with random
weights (the time of an iteration does not depend on the weights); each script runs at its own defaults for the task
except the chunk-steps per env, `--n-steps`, which is cut on the CPU (printed with the script's default).

    python benchmarks/baselines_iteration.py                                  # every script, Hopper, n_steps 125 (paper 500)
    python benchmarks/baselines_iteration.py --scripts gaussian_ppo drwr --n-steps 50
    python benchmarks/baselines_iteration.py --env-id avoid-m2 --n-steps 25   # Avoid M2 at its full size

`SCRIPTS` is the table of what can be timed: a name -> how to build that script's `Args` for 2 iterations at the given
settings (its checkpoint, if it needs one, written to a temporary folder first).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import importlib
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.finetune_iteration import random_checkpoint as random_diffusion_checkpoint  # noqa: E402
from common.errors import UsageError  # noqa: E402
from common.normalizer import Normalizer  # noqa: E402
from common.tasks import get_task  # noqa: E402


@dataclass
class Bench:
    scripts: tuple[str, ...] = ()
    """scripts to time (names in SCRIPTS; empty: all of them, in the table's order)"""
    env_id: str = "hopper"
    """task whose defaults are timed"""
    n_steps: int | None = 125
    """chunk-steps per env (None: the script's default; the paper's Hopper 500 is cut to 125 on the CPU)"""
    num_envs: int | None = None
    """parallel envs (None: the script's default)"""
    threads: int | None = 1
    """torch CPU threads (None: torch's default)"""
    repeats: int = 1
    """runs per script (each 2 iterations); the table shows each"""
    extra: tuple[str, ...] = ()
    """NAME=VALUE Args fields for every script that has them (e.g. update_chunk=2048), parsed as Python literals"""


def gaussian_checkpoint(module: Any, task_id: str, path: str) -> None:
    """gaussian_ppo / gmm_ppo: a pre-training checkpoint of the task's default architecture, random weights."""
    args = module.Args(pretrain=True, env_id=task_id)
    module.fill_defaults(args)
    task = get_task(task_id)
    arch = module.network_arch(args, task)
    std_limits = [args.std_min or 0.01, args.std_max or 0.2]
    net = module.build_network(args.backbone, arch)
    if module.POLICY == "gmm":
        policy = module.GMMPolicy(net, task.action_dim, args.n_modes, args.std_init, *std_limits)
    else:
        policy = module.GaussianPolicy(net, task.action_dim, args.std_init, *std_limits)
    ones = lambda d: torch.ones(d)  # noqa: E731
    norm = Normalizer(-ones(task.obs_dim), ones(task.obs_dim), -ones(task.action_dim), ones(task.action_dim))
    torch.save({**module.checkpoint_header(args, task, arch, norm, std_limits), "ema": policy.state_dict(),
                "model": policy.state_dict()}, path)


def finetune_args(checkpoint: Callable[[Any, str, str], None]) -> Callable[[Any, Bench, str], Any]:
    """An `Args` builder for a fine-tuning script that starts from `checkpoint(module, task_id, path)`: 2 iterations,
    evaluation off (a 1-chunk-step final one), no checkpoint writes between iterations, the script's defaults for the
    task except `--n-steps` / `--num-envs`; a minibatch larger than the cut iteration becomes the whole iteration."""
    def build(module: Any, bench: Bench, tmp: str) -> Any:
        ckpt = os.path.join(tmp, f"{module.__name__}.pt")
        checkpoint(module, bench.env_id, ckpt)
        args = module.Args(env_id=bench.env_id, checkpoint=ckpt, n_train_itr=2, val_freq=0, plot=False,
                           n_steps=bench.n_steps, num_envs=bench.num_envs, exp_name="bench", save_every=10**9,
                           torch_deterministic=False, torch_threads=bench.threads, eval_n_steps=1)
        if hasattr(args, "n_critic_warmup_itr"):  # the actor steps in the timed iteration (a 2-iteration budget)
            args.n_critic_warmup_itr = 0
        filled = copy.deepcopy(args)
        try:
            module.fill_defaults(filled)  # the script's own defaults at these sizes
            too_small = filled.batch_size > filled.n_steps * filled.num_envs
        except UsageError:  # e.g. dawr: no actor step at a tiny size
            too_small = True
        if too_small:  # n_steps cut below one minibatch: one minibatch of the whole iteration
            default = copy.deepcopy(args)
            default.n_steps = default.num_envs = None
            module.fill_defaults(default)
            args.batch_size = (bench.n_steps or default.n_steps) * (bench.num_envs or default.num_envs)
        return args
    return build


def diffusion_checkpoint(module: Any, task_id: str, path: str) -> None:
    random_diffusion_checkpoint(task_id, path)


@dataclass
class Script:
    """How to time one script."""
    module: str
    """the script's module name (its `main(args)` is run)"""
    build_args: Callable[[Any, Bench, str], Any]
    """(module, bench, temporary folder) -> the script's `Args` for 2 iterations at the bench's settings"""
    note: str = ""
    """printed with the script's line of the table"""
    fixed: dict[str, Any] = field(default_factory=dict)
    """`Args` fields set for every run of this script (after `build_args`; `--extra` wins)"""


SCRIPTS: dict[str, Script] = {
    "gaussian_ppo": Script("gaussian_ppo", finetune_args(gaussian_checkpoint)),
    "gmm_ppo": Script("gmm_ppo", finetune_args(gaussian_checkpoint)),
    "drwr": Script("drwr", finetune_args(diffusion_checkpoint)),
    "dawr": Script("dawr", finetune_args(diffusion_checkpoint), "actor/critic steps scale with n_steps; buffer fill too"),
    "exact_likelihood_pg": Script("exact_likelihood_pg", finetune_args(diffusion_checkpoint)),
}


def parse_extra(extra: tuple[str, ...]) -> dict[str, Any]:
    """`NAME=VALUE` strings -> {NAME: value}, values read as Python literals where they are (else kept as text)."""
    out = {}
    for item in extra:
        name, _, value = item.partition("=")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def time_script(name: str, bench: Bench) -> dict[str, Any]:
    """Run `name`'s main for 2 iterations; the second iteration's wall and CPU times per phase."""
    entry = SCRIPTS[name]
    module = importlib.import_module(entry.module)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        args = entry.build_args(module, bench, tmp)
        fields = {f.name for f in dataclasses.fields(args)}
        for k, v in {**entry.fixed, **parse_extra(bench.extra)}.items():
            if k in fields:
                setattr(args, k, v)
            else:
                print(f"{name} has no field {k}: left out for it")
        out = module.main(args)
    row = out["history"][-1]
    wall = {k[5:]: v for k, v in row.items() if k.startswith("time_")}
    cpu = {k[4:]: v for k, v in row.items() if k.startswith("cpu_")}  # common.runs.Run's timer
    default = module.Args(env_id=bench.env_id)
    module.fill_defaults(default)
    return {"wall": wall, "cpu": cpu, "args": args, "env_steps": args.n_steps * args.num_envs * args.act_steps,
            "default_n_steps": default.n_steps}


def main(bench: Bench) -> dict[str, list[dict[str, Any]]]:
    names = bench.scripts or tuple(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        raise SystemExit(f"error: unknown script(s) {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        results[name] = [time_script(name, bench) for _ in range(bench.repeats)]
    print(f"\nsecond iteration of 2, {bench.env_id}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; wall s / process CPU s per phase")
    for name, rs in results.items():
        a = rs[0]["args"]
        batch = getattr(a, "batch_size", None)
        cut = "" if a.n_steps == rs[0]["default_n_steps"] else f" (its default {rs[0]['default_n_steps']})"
        print(f"{name}: {a.num_envs} envs x {a.n_steps} chunk-steps{cut} ({rs[0]['env_steps']} env steps), batch {batch}"
              + (f"; {SCRIPTS[name].note}" if SCRIPTS[name].note else ""))
        for r in rs:
            phases = sorted(r["wall"], key=lambda k: -r["wall"][k])
            cells = "  ".join(f"{k} {r['wall'][k]:.2f}/{r['cpu'].get(k, float('nan')):.2f}" for k in phases)
            print(f"  {cells}  | total {sum(r['wall'].values()):.2f}/{sum(r['cpu'].values()):.2f}")
    if hasattr(resource, "getrusage"):
        print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    return results


if __name__ == "__main__":
    main(tyro.cli(Bench))
