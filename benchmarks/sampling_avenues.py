"""Time the rollout sampling of one chunk-step (`DiffusionPPO.rollout_action`: the K-step chain and the old log-probs
of its K' fine-tuned steps) today and with the avenues left to speed it up in float32, and check each against today's
numbers bit for bit.

The policy has the task's default architecture with random weights (`finetune_iteration.random_checkpoint`; Hopper:
the [512] x 3 residual ReLU DiffusionMLP, K = 20, K' = 10, T_a = 4, 40 envs). Variants, timed in turns:
- `eager`: `rollout_action` as dppo_finetune.py runs it (under `torch.no_grad`);
- `inference_mode`: the same under `torch.inference_mode`;
- `sincache`: the same with the sinusoidal step embedding's frequencies made once (the network recomputes them from an
  `arange` at every call); `im_sincache`: both;
- `coefs`: the chain's arithmetic unchanged, but each step's coefficients ((1, 1, 1) tensors), floored sampling std
  and (B,) step tensor made once instead of indexed, viewed and expanded at every step;
- `inplace`: `coefs` with the chain's elementwise steps in place (fewer intermediate tensors; the same operations in
  the same order, so the same roundings); `inplace_im`: under `torch.inference_mode`;
- `addcmul`: `inplace` with each `a ± b·c` as one `addcmul` (one kernel instead of two, but a fused multiply-add
  rounds once where the two round twice: not the same numbers);
- `fused`: `inplace` and `sincache`, with the step tensor made float once; `all`: `fused` under `torch.inference_mode`
  (which torch.compile cannot trace in torch 2.13: "Cannot set version_counter for inference tensor",
  pytorch/pytorch#180823);
- `compile`: `common.runs.compile_sampling` (dppo_finetune.py `--compile`: torch.compile, inductor's
  `fallback_random` so the noise is eager's); its compilation (first call, fresh inductor cache) is timed apart.

Each variant's output (x_0, the chain, the old log-probs) is compared with eager's from the same seed: bit-identical
(`torch.equal`) or its max |deviation|. Times are per chunk-step: wall time, and with 1 thread the process CPU time
too (which other jobs on a shared machine disturb less); medians and ranges over `--rounds` interleaved rounds, with
the load average at each round.

    python benchmarks/sampling_avenues.py --threads 1 --iteration-s 74   # all of them; compiling takes minutes
    python benchmarks/sampling_avenues.py --variants eager inference_mode fused all --threads 1 2 --rounds 12

Findings and the commands behind them: docs/results.md, "Speed", "Sampling: what is left in float32".
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune as ft  # noqa: E402
from benchmarks.finetune_iteration import random_checkpoint  # noqa: E402
from common.networks import ObsCritic, SinusoidalPosEmb, build_diffusion_network  # noqa: E402
from common.runs import compile_sampling, keep_freed_memory  # noqa: E402
from common.tasks import get_task  # noqa: E402

VARIANTS = ("eager", "inference_mode", "sincache", "im_sincache", "coefs", "inplace", "inplace_im", "addcmul", "fused",
            "all", "compile")


@dataclass
class Bench:
    env_id: str = "hopper"
    """task whose default architecture and fine-tuning settings are timed (an MLP policy, DDPM sampling)"""
    num_envs: int | None = None
    """rows sampled at once (None: the task's num_envs, 40 for Hopper)"""
    variants: tuple[str, ...] = VARIANTS
    """what to time (eager is always timed: the others are compared with it)"""
    threads: tuple[int, ...] = (1, 2)
    """torch CPU thread counts, each variant timed at each (compile: compiled once, at the first)"""
    calls: int = 10
    """chunk-steps per variant per round"""
    rounds: int = 30
    """interleaved rounds (medians and ranges reported)"""
    inductor_cache: str | None = None
    """compile: inductor's cache folder (None: a fresh one, so the compile time is a first run's; run twice with one
    folder for a later run's, whose compiled kernels are cached)"""
    iteration_s: float | None = None
    """seconds per training iteration at the task's default size (e.g. from finetune_iteration.py): prints the
    compile break-even in minutes too"""


def hopper_agent(env_id: str) -> tuple[ft.DiffusionPPO, ft.Args, int]:
    """dppo_finetune.py's agent for the task's default architecture, random weights, as its `main` builds it."""
    args = ft.Args(env_id=env_id)
    task, _ = ft.fill_defaults(args)
    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(env_id, os.path.join(tmp, "random.pt"))
        ckpt = torch.load(os.path.join(tmp, "random.pt"), weights_only=True)
    if ckpt["backbone"] != "mlp" or args.use_ddim:
        raise SystemExit(f"error: {env_id} has a {ckpt['backbone']} policy with {'DDIM' if args.use_ddim else 'DDPM'}; "
                         "the rewritten variants here follow the MLP's DDPM chain (try --env-id hopper)")
    base = build_diffusion_network(ckpt, ckpt["horizon_steps"])
    base.load_state_dict(ckpt["ema"])
    agent = ft.DiffusionPPO(base, ObsCritic(task.obs_dim, ckpt["cond_steps"]), ckpt["denoising_steps"],
                            args.ft_denoising_steps, ckpt["horizon_steps"], task.action_dim, False, args.ddim_steps,
                            args.min_sampling_denoising_std, args.min_logprob_denoising_std, args.randn_clip_value)
    return agent.eval(), args, ckpt["cond_steps"]


def step_constants(agent: ft.DiffusionPPO, B: int, float_t: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Per visited step j, made once: the (B,) step tensor (`float_t`: as float), the DDPM coefficients and the floored
    sampling std as the (1, 1, 1) tensors `p_mean_std` indexes and views at every step (the same values)."""
    v = lambda buf, j: buf[j].view(-1, 1, 1)  # noqa: E731
    t = lambda j: agent.ts[j].expand(B).float() if float_t else agent.ts[j].expand(B)  # noqa: E731
    return [(t(j), v(agent.sqrt_recip_ac, j), v(agent.sqrt_recipm1_ac, j), v(agent.c1, j), v(agent.c2, j), v(agent.std, j),
             v(agent.std, j).clamp(min=agent.min_sampling_std)) for j in range(len(agent.ts))]


def rollout_rewritten(agent: ft.DiffusionPPO, cond: torch.Tensor, act_steps: int, consts: list, inplace: bool,
                      fma: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rollout_action` (DDPM, stochastic) with the step constants made once, the elementwise steps in place
    (`fma`: each a ± b·c as one addcmul)."""
    B, clip = cond.shape[0], agent.randn_clip
    x = torch.randn(B, agent.horizon_steps, agent.action_dim, device=cond.device)
    chain, means, stds = [x] if agent.first_ft == 0 else [], [], []
    for j, (t, a, b, c1, c2, std, sampling_std) in enumerate(consts):
        eps = (agent.actor if j < agent.first_ft else agent.actor_ft)(x, t, cond)
        if fma:
            x0 = (a * x).addcmul_(b, eps, value=-1).clamp_(-1, 1)
            mean = (c2 * x).addcmul_(c1, x0)
            x = torch.addcmul(mean, sampling_std, torch.randn_like(x).clamp_(-clip, clip))
        elif inplace:  # the same products, differences and sums as p_mean_std / sample, in the same order
            x0 = (a * x).sub_(eps.mul_(b)).clamp_(-1, 1)
            mean = (c1 * x0).add_(x0.copy_(x).mul_(c2))
            x = torch.randn_like(x).clamp_(-clip, clip).mul_(sampling_std).add_(mean)
        else:
            x0 = (a * x - b * eps).clamp(-1, 1)
            mean = c1 * x0 + c2 * x
            x = mean + sampling_std * torch.randn_like(x).clamp(-clip, clip)
        if j + 1 == agent.first_ft or j >= agent.first_ft:
            chain.append(x)
        if j >= agent.first_ft:
            means.append(mean)
            stds.append(std)
    chain_t = torch.stack(chain, 1)
    lp = agent.logprob(chain_t[:, 1:], torch.stack(means, 1), torch.stack(stds, 1))
    return x, chain_t, ft.chunk_logprob(lp, act_steps)


class CachedSinusoid(SinusoidalPosEmb):
    """`SinusoidalPosEmb` with its frequencies computed once (the same `exp(arange · c)`) instead of at every call."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * (-math.log(10000) / (half - 1))), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def with_cached_sinusoid(agent: ft.DiffusionPPO) -> ft.DiffusionPPO:
    out = copy.deepcopy(agent)
    for net in (out.actor, out.actor_ft):
        net.time_embedding[0] = CachedSinusoid(net.time_embedding[0].dim)
    return out


def make_variants(agent: ft.DiffusionPPO, B: int, act_steps: int, names: tuple[str, ...]
                  ) -> dict[str, Callable[[torch.Tensor], tuple]]:
    consts, cached = step_constants(agent, B), with_cached_sinusoid(agent)
    cached_consts = step_constants(cached, B, float_t=True)

    def inference(fn: Callable) -> Callable:
        def run(cond: torch.Tensor) -> tuple:
            with torch.inference_mode():
                return fn(cond)
        return run

    def no_grad(fn: Callable) -> Callable:
        return torch.no_grad()(fn)

    table = {
        "eager": lambda cond: agent.rollout_action(cond, act_steps),
        "inference_mode": inference(lambda cond: agent.rollout_action(cond, act_steps)),
        "sincache": lambda cond: cached.rollout_action(cond, act_steps),
        "im_sincache": inference(lambda cond: cached.rollout_action(cond, act_steps)),
        "coefs": no_grad(lambda cond: rollout_rewritten(agent, cond, act_steps, consts, False)),
        "inplace": no_grad(lambda cond: rollout_rewritten(agent, cond, act_steps, consts, True)),
        "inplace_im": inference(lambda cond: rollout_rewritten(agent, cond, act_steps, consts, True)),
        "addcmul": no_grad(lambda cond: rollout_rewritten(agent, cond, act_steps, consts, True, fma=True)),
        "fused": no_grad(lambda cond: rollout_rewritten(cached, cond, act_steps, cached_consts, True)),
        "all": inference(lambda cond: rollout_rewritten(cached, cond, act_steps, cached_consts, True)),
    }
    return {name: table[name] for name in names if name in table}


def compare(out: tuple, ref: tuple) -> str:
    if all(torch.equal(a, b) for a, b in zip(out, ref)):
        return "bit-identical"
    return f"max |dev| {max((a - b).abs().max().item() for a, b in zip(out, ref)):.1e}"


def check(fn: Callable, eager: Callable, conds: list[torch.Tensor]) -> str:
    """`fn` against eager from the same seeds, over several observation batches: the worst verdict."""
    verdicts = []
    for seed, cond in enumerate(conds):
        torch.manual_seed(seed)
        ref = eager(cond)
        torch.manual_seed(seed)
        verdicts.append(compare(fn(cond), ref))
    worst = [v for v in verdicts if v != "bit-identical"]
    return max(worst, key=lambda v: float(v.split()[-1])) if worst else "bit-identical"


def time_calls(fn: Callable, cond: torch.Tensor, calls: int, per_call: bool = True) -> tuple[float, float]:
    """Wall and process CPU time: ms per call, or (`per_call` False) s in all."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn(cond)
    scale = 1e3 / calls if per_call else 1.0
    return (time.perf_counter() - w) * scale, (time.process_time() - c) * scale


def main(bench: Bench) -> dict:
    unknown = set(bench.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    names = tuple(dict.fromkeys(("eager", *bench.variants)))
    keep_freed_memory()  # as every script of ours does (seed_everything)
    torch.manual_seed(0)
    agent, args, cond_steps = hopper_agent(bench.env_id)
    B = bench.num_envs or args.num_envs
    task = get_task(bench.env_id)
    conds = [torch.randn(B, cond_steps, task.obs_dim) for _ in range(3)]
    fns = make_variants(agent, B, args.act_steps, names)
    torch.set_num_threads(bench.threads[0])
    verdict = {name: check(fn, fns["eager"], conds) for name, fn in fns.items()}
    compile_s = {}
    if "compile" in names:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = bench.inductor_cache or tempfile.mkdtemp(prefix="inductor_")
        compiled = compile_sampling(agent.rollout_action, torch.device("cpu"))
        torch.manual_seed(0)
        compile_s["rollout_action"] = time_calls(lambda cond: compiled(cond, args.act_steps), conds[0], 1, per_call=False)
        compile_eval = compile_sampling(agent.get_action, torch.device("cpu"))  # a second graph a run compiles
        compile_s["get_action (evaluation)"] = time_calls(lambda cond: compile_eval(cond, True), conds[0], 1, per_call=False)
        fns["compile"] = lambda cond: compiled(cond, args.act_steps)
        verdict["compile"] = check(fns["compile"], fns["eager"], conds)
    print(f"{bench.env_id}: {B} envs, K = {len(agent.ts)}, K' = {agent.ft_steps}, T_a = {agent.horizon_steps}, "
          f"{bench.calls} chunk-steps per variant per round, {bench.rounds} rounds, threads {bench.threads}, "
          f"torch {torch.__version__}")
    for name, seconds in compile_s.items():  # (wall, CPU) s
        print(f"compile: {name} {seconds[0]:.1f} s wall, {seconds[1]:.1f} s process CPU (first call, inductor cache "
              f"{os.environ['TORCHINDUCTOR_CACHE_DIR']}, {bench.threads[0]} thread(s))")

    cond, times, loads = conds[0], {}, []
    for name in fns:  # warm-up
        for th in bench.threads:
            torch.set_num_threads(th)
            time_calls(fns[name], cond, 3)
    for r in range(bench.rounds):
        loads.append(os.getloadavg()[0])
        for th in bench.threads:
            torch.set_num_threads(th)
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate the order within a round
            for name in order:
                times.setdefault((name, th), []).append(time_calls(fns[name], cond, bench.calls))
    print(f"load average (1 min) at each round: {' '.join(f'{x:.1f}' for x in loads)}")
    out: dict = {}
    for th in bench.threads:
        k = 1 if th == 1 else 0  # the measure compared: process CPU time with 1 thread, else wall time
        print(f"\n{th} thread(s): ms per chunk-step, median [min-max] of {bench.rounds} rounds; ratio: to eager's "
              f"{'CPU' if k else 'wall'} time in the same round, median [quartiles] over the rounds")
        print(f"  {'variant':15s} {'numbers':20s} {'wall':>23s} {'cpu':>23s}   ratio                 faster in")
        for name in fns:
            wall, cpu = ([t[i] for t in times[(name, th)]] for i in (0, 1))
            ratios = [t[k] / e[k] for t, e in zip(times[(name, th)], times[("eager", th)])]
            q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"  {name:15s} {verdict[name]:20s} {statistics.median(wall):7.2f} [{min(wall):6.2f}-{max(wall):6.2f}] "
                  f"{statistics.median(cpu):7.2f} [{min(cpu):6.2f}-{max(cpu):6.2f}]   {med:.3f} [{q1:.3f}-{q3:.3f}]   "
                  f"{sum(r < 1 for r in ratios)} of {len(ratios)} rounds")
            out[(name, th)] = {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "ratio": med,
                               "faster_rounds": sum(r < 1 for r in ratios), "numbers": verdict[name]}
    if compile_s:
        th = bench.threads[0]
        k = "cpu" if th == 1 else "wall"
        saving = out[("eager", th)][k] - out[("compile", th)][k]  # ms per chunk-step
        total = sum(wall for wall, _ in compile_s.values())
        if saving > 0:
            per_itr = saving * args.n_steps / 1e3  # s saved per training iteration (its n_steps chunk-steps)
            n = total / per_itr
            minutes = f", {n * (bench.iteration_s or 0) / 60:.0f} min at {bench.iteration_s} s per iteration"
            print(f"\ncompile at {th} thread(s): {saving:.2f} ms ({k}) saved per chunk-step, {per_itr:.2f} s per iteration "
                  f"of {args.num_envs} envs x {args.n_steps} chunk-steps; {total:.0f} s (wall) of compilation paid back after "
                  f"{n:.0f} iterations{minutes * bool(bench.iteration_s)} ({args.n_train_itr} in a run)")
        else:
            print(f"\ncompile at {th} thread(s): no saving ({-saving:.2f} ms slower per chunk-step); never paid back")
        out["compile_s"] = compile_s
    return out


if __name__ == "__main__":
    main(tyro.cli(Bench))
