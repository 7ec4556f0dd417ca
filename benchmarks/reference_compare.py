"""Model compute of one Hopper fine-tuning iteration: the reference implementation's against ours, side by side.

Env stepping is left out (random observations stand in for the simulator's), so only the model's work is timed:
sampling the chains (n_steps calls on num_envs observations), the critic's values, the old log-probs of all
(env-step, denoising-step) pairs and the PPO update (update_epochs epochs of minibatches of pairs, with the optimiser
steps). Hopper's settings (`cfg/gym/finetune/hopper-v2/ft_ppo_diffusion_mlp.yaml`): K = 20, K' = 10, T_a = 4, the
[512] x 3 residual ReLU actor and the [256] x 3 residual Mish critic; n_steps is cut from 500 to 100 and the
minibatch from 50 000 to 10 000 so that an epoch has the paper's 4 minibatches.

Variants, timed in turns (`--repeats` rounds, medians reported):
- `reference`: irom-princeton/dppo's `PPODiffusion` driven as `TrainPPODiffusionAgent.run` drives it (only with
  `--reference /path/to/dppo`, a checkout of that repository; its `einops` must be importable);
- `before`: our update as it was before the fast paths (critic once per pair, whole-minibatch backward, old
  log-probs in a second pass after the rollout);
- `ours`: `dppo_finetune.py` as it runs now, old log-probs taken while sampling (`ours:N` sets `--update-chunk N`;
  `ours@medium` sets `--float32-matmul-precision medium`, bf16 products on AMX CPUs).

CPU time: with 1 thread the process CPU time (`time.process_time`), which other processes on a shared machine
barely disturb; with more threads the wall time (CPU time adds up the threads).

    python benchmarks/reference_compare.py --reference /path/to/dppo --threads 1
    python benchmarks/reference_compare.py --variants before ours:2048 ours:4096 ours:8192   # chunk size sweep
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dppo_finetune as ft  # noqa: E402
from common.networks import DiffusionMLP, ObsCritic  # noqa: E402
from common.runs import apply_matmul_flags, keep_freed_memory, linear_shapes, set_float32_matmul_precision  # noqa: E402

OBS, ACT, T_A, K, K_FT = 11, 3, 4, 20, 10  # Hopper


@dataclass
class Bench:
    reference: str | None = None
    """path to a checkout of irom-princeton/dppo (None: the reference is not timed)"""
    variants: tuple[str, ...] = ("reference", "before", "ours")
    """what to time: reference, before, ours, ours:CHUNK; a suffix @medium (or @high) runs that variant at
    dppo_finetune's --float32-matmul-precision medium and prints the error it makes in the log-probs"""
    threads: int = 1
    """torch CPU threads"""
    repeats: int = 3
    """rounds of all variants (medians reported)"""
    num_envs: int = 40
    """parallel envs"""
    n_steps: int = 100
    """chunk-steps per env"""
    batch_size: int = 10000
    """PPO minibatch of pairs"""
    update_epochs: int = 5
    """PPO epochs"""
    onednn_matmul: Literal["auto", "on", "off"] = "auto"
    """dppo_finetune --onednn-matmul, decided once on ours' layer shapes (its default: auto); applies to every variant
    without @precision, the reference included"""
    keep_freed_memory: bool = True
    """glibc keeps freed memory as every script of ours sets it (`common.runs.keep_freed_memory`); process-wide, so it
    applies to every variant, the reference included"""


class Clock:
    """CPU and wall seconds per phase."""

    def __init__(self) -> None:
        self.times: dict[str, tuple[float, float]] = {}
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def lap(self, phase: str) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.times[phase] = (cpu - self.cpu, wall - self.wall)
        self.cpu, self.wall = cpu, wall


def ours_iteration(b: Bench, agent: ft.DiffusionPPO, opts: list, data: dict, chunk: int | None) -> dict:
    """The model compute of `dppo_finetune.main`'s iteration; chunk None: the formulation before the fast paths."""
    N, S = b.num_envs, b.num_envs * b.n_steps
    clock = Clock()
    with torch.no_grad():
        chain_buf = torch.zeros(b.n_steps, N, K_FT + 1, T_A, ACT)
        lp_buf = torch.zeros(b.n_steps, N, K_FT)
        for step in range(b.n_steps):
            if chunk is None:
                _, chain_buf[step] = agent.get_action(data["obs"][step])
            else:  # the old log-probs come with the samples
                _, chain_buf[step], lp_buf[step] = agent.rollout_action(data["obs"][step], T_A)
        clock.lap("sampling")
        agent.get_value(data["obs"].flatten(0, 1))
        agent.get_value(data["obs"].flatten(0, 1))  # V(s) and V(s')
        clock.lap("values")
        b_obs, b_chain = data["obs"].flatten(0, 1), chain_buf.flatten(0, 1)
        pos, sample = torch.arange(K_FT).repeat(S), torch.arange(S).repeat_interleave(K_FT)

        def logprob(idx: torch.Tensor) -> torch.Tensor:
            s, i = sample[idx], pos[idx]
            return ft.pair_logprobs(agent, b_obs[s], b_chain[s, i], b_chain[s, i + 1], i, T_A)

        if chunk is None:
            old_lp = torch.cat([logprob(idx) for idx in torch.arange(S * K_FT).split(50_000)])
        else:
            old_lp = lp_buf.flatten()
        clock.lap("old_logprobs")
    disc, eps = ft.denoising_discount(K_FT, 0.99), ft.clip_schedule(K_FT, 0.01, 0.01, 3.0)
    b_adv, b_ret, B = data["adv"], data["ret"], b.batch_size
    for _ in range(b.update_epochs):
        perm = torch.randperm(S * K_FT)
        for start in range(0, S * K_FT - B + 1, B):  # the minibatch update of `dppo_finetune.main`
            mb = perm[start:start + B]
            s, i = sample[mb], pos[mb]
            mb_adv = (b_adv[s] - b_adv[s].mean()) / (b_adv[s].std() + 1e-8) * disc[i]
            if chunk is None:  # before: the critic once per pair, one piece
                v_loss = 0.5 * ((agent.get_value(b_obs[s]) - b_ret[s]) ** 2).mean()
            else:
                v_loss = 0.5 * ((ft.minibatch_values(agent.critic, b_obs, s) - b_ret[s]) ** 2).mean()
            for o in opts:
                o.zero_grad(set_to_none=True)
            piece = chunk or B
            for a in range(0, B, piece):
                pg, _, _ = ft.ppo_loss(logprob(mb[a:a + piece]), old_lp[mb[a:a + piece]], mb_adv[a:a + piece],
                                       eps[i[a:a + piece]], B)
                (pg + (0.5 * v_loss if a == 0 else 0.0)).backward()
            for o in opts:
                o.step()
    clock.lap("update")
    return clock.times


def logprob_error(b: Bench, precision: str) -> str:
    """Max and mean |log-prob at `precision` - log-prob at highest| over the pairs of 8 sampled chains per
    env of Hopper (random weights, the actor_ft nudged away from the sampling policy), the scalar per pair of the loss."""
    torch.manual_seed(1)
    agent, _ = build_ours()
    with torch.no_grad():
        for p in agent.actor_ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
        obs = torch.randn(8 * b.num_envs, 1, OBS)
        _, chain = agent.get_action(obs)
        i = torch.arange(K_FT).repeat(obs.shape[0])
        s = torch.arange(obs.shape[0]).repeat_interleave(K_FT)
        lps = []
        for p in ("highest", precision):
            set_float32_matmul_precision(p)
            lps.append(ft.pair_logprobs(agent, obs[s], chain[s, i], chain[s, i + 1], i, T_A))
        set_float32_matmul_precision("highest")
    d = (lps[1] - lps[0]).abs()
    return (f"log-probs at {precision} vs highest: max |diff| {d.max():.1e}, mean {d.mean():.1e} "
            f"(log-probs of magnitude {lps[0].abs().mean():.2f})")


def reference_iteration(b: Bench, model, opts: list, data: dict) -> dict:
    """`TrainPPODiffusionAgent.run`'s model calls (irom-princeton/dppo, agent/finetune/train_ppo_diffusion_agent.py)."""
    N, S, lp_batch = b.num_envs, b.num_envs * b.n_steps, 10000  # logprob_batch_size: its default
    clock = Clock()
    chains = torch.zeros(b.n_steps, N, K_FT + 1, T_A, ACT)
    with torch.no_grad():
        for step in range(b.n_steps):
            samples = model(cond={"state": data["obs"][step]}, deterministic=False, return_chain=True)
            samples.trajectories.cpu().numpy()
            chains[step] = torch.from_numpy(samples.chains.cpu().numpy())
        clock.lap("sampling")
        obs_k = data["obs"].flatten(0, 1)
        for o in obs_k.split(lp_batch):
            model.critic({"state": o}).cpu().numpy()
        model.critic({"state": data["obs"][-1]})
        clock.lap("values")
        chains_k = chains.flatten(0, 1)
        old = torch.cat([model.get_logprobs({"state": o}, c).view(-1, K_FT, T_A, ACT)
                         for o, c in zip(obs_k.split(lp_batch), chains_k.split(lp_batch))])
        clock.lap("old_logprobs")
    values = torch.zeros(S)
    for _ in range(b.update_epochs):
        inds_k = torch.randperm(S * K_FT)
        for batch in range(max(1, S * K_FT // b.batch_size)):
            inds_b = inds_k[batch * b.batch_size:(batch + 1) * b.batch_size]
            s, i = torch.unravel_index(inds_b, (S, K_FT))
            out = model.loss({"state": obs_k[s]}, chains_k[s, i], chains_k[s, i + 1], i, data["ret"][s], values[s],
                             data["adv"][s], old[s, i], use_bc_loss=False, reward_horizon=T_A)
            loss = out[0] + 0.5 * out[2]
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
    clock.lap("update")
    return clock.times


def build_reference(path: str):
    if not os.path.isfile(os.path.join(path, "model", "diffusion", "diffusion_ppo.py")):
        raise SystemExit(f"error: --reference {path} is not a checkout of irom-princeton/dppo "
                         "(no model/diffusion/diffusion_ppo.py)")
    sys.path.insert(0, os.path.abspath(path))
    try:
        from model.common.critic import CriticObs
        from model.diffusion.diffusion_ppo import PPODiffusion
        from model.diffusion.mlp_diffusion import DiffusionMLP as RefMLP
    except ImportError as e:
        raise SystemExit(f"error: the reference's model code needs {e.name!r} (pip install it, or put it on PYTHONPATH)")
    actor = RefMLP(time_dim=16, mlp_dims=[512] * 3, activation_type="ReLU", residual_style=True, cond_dim=OBS,
                   horizon_steps=T_A, action_dim=ACT)
    critic = CriticObs(cond_dim=OBS, mlp_dims=[256] * 3, activation_type="Mish", residual_style=True)
    model = PPODiffusion(actor=actor, critic=critic, ft_denoising_steps=K_FT, horizon_steps=T_A, obs_dim=OBS,
                         action_dim=ACT, denoising_steps=K, device="cpu", gamma_denoising=0.99, clip_ploss_coef=0.01,
                         clip_ploss_coef_base=0.01, clip_ploss_coef_rate=3, randn_clip_value=3,
                         min_sampling_denoising_std=0.1, min_logprob_denoising_std=0.1)
    return model, [torch.optim.AdamW(model.actor_ft.parameters(), lr=1e-4, weight_decay=0),
                   torch.optim.AdamW(model.critic.parameters(), lr=1e-3, weight_decay=0)]


def build_ours():
    net = DiffusionMLP(ACT, T_A, OBS, cond_steps=1, time_dim=16, mlp_dims=[512] * 3, activation="relu", residual=True)
    agent = ft.DiffusionPPO(net, ObsCritic(OBS, 1), K, K_FT, T_A, ACT, False, 5, 0.1, 0.1, 3.0)
    return agent, [torch.optim.AdamW(agent.actor_ft.parameters(), lr=1e-4, weight_decay=0),
                   torch.optim.AdamW(agent.critic.parameters(), lr=1e-3, weight_decay=0)]


def main(b: Bench) -> dict:
    torch.set_num_threads(b.threads)
    torch.manual_seed(0)
    if b.keep_freed_memory:
        keep_freed_memory()
    variants = [v for v in b.variants if v != "reference" or b.reference]
    if "reference" in b.variants and not b.reference:
        print("reference not timed: give --reference /path/to/a/checkout/of/irom-princeton/dppo")
    with torch.random.fork_rng(devices=[]):  # the layer shapes of ours, without drawing from the seeded RNG
        shapes = linear_shapes((b.num_envs, b.batch_size), build_ours()[0])
    onednn = apply_matmul_flags("highest", b.onednn_matmul, torch.device("cpu"), shapes) == "on"

    def kernels(precision: str) -> None:  # a variant's precision; float32 (the default) with oneDNN as decided
        set_float32_matmul_precision(precision or "highest")
        if onednn and not precision:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # oneDNN's float32 path, checked float32 above
    S = b.num_envs * b.n_steps
    data = {"obs": torch.randn(b.n_steps, b.num_envs, 1, OBS), "adv": torch.randn(S), "ret": torch.randn(S)}
    models = {"reference": build_reference(b.reference)} if "reference" in variants else {}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(b.repeats):
        for v in variants:
            if v == "reference":
                runs[v].append(reference_iteration(b, *models["reference"], data))
            else:
                name, _, precision = v.partition("@")
                chunk = None if name == "before" else int(name.split(":")[1]) if ":" in name else 4096
                kernels(precision)
                runs[v].append(ours_iteration(b, *build_ours(), data, chunk))
                kernels("")
    col = 0 if b.threads == 1 else 1
    what = "process CPU s" if col == 0 else "wall s"
    print(f"\nHopper model compute per iteration: {b.num_envs} envs x {b.n_steps} chunk-steps, K'={K_FT}, minibatch "
          f"{b.batch_size}, {b.update_epochs} epochs, {b.threads} thread(s); median of {b.repeats} ({what})")
    phases = ("sampling", "values", "old_logprobs", "update")
    print(f"  {'variant':12s}" + "".join(f"{p:>14s}" for p in phases) + f"{'total':>10s}  all runs' totals")
    med = {}
    for v, rs in runs.items():
        totals = [sum(r[p][col] for p in phases) for r in rs]
        med[v] = {p: statistics.median(r[p][col] for r in rs) for p in phases} | {"total": statistics.median(totals)}
        print(f"  {v:12s}" + "".join(f"{med[v][p]:14.2f}" for p in phases) + f"{med[v]['total']:10.2f}  "
              + " ".join(f"{t:.2f}" for t in totals))
    base = "reference" if "reference" in med else ("before" if "before" in med else None)
    for precision in sorted({v.partition("@")[2] for v in variants} - {""}):
        print("  " + logprob_error(b, precision))
    if base:
        for v in med:
            if v != base:
                print(f"  {v} / {base}: total {med[v]['total'] / med[base]['total']:.2f}x, "
                      f"update {med[v]['update'] / med[base]['update']:.2f}x")
    return med


if __name__ == "__main__":
    main(tyro.cli(Bench))
