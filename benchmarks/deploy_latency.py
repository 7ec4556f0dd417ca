"""Policy latency per chunk and the jitter of the control loop of `deploy_franka.py`, on this machine's CPU.

Policies have random weights (the time does not depend on the weights) and One-leg's observation (58) and
chunk (T_a 8): the state tasks' diffusion MLP (3 x 512, time 16) with DDPM K = 20; the reference's furniture
diffusion MLP (7 x 1024, time 32, observation encoder [512, 64], LayerNorm) with DDPM K = 20 and with DDIM 5
steps of K = 100 (as fine-tuned, App. D.7); a furniture-size Gaussian MLP (10 x 1024, ~8.5M parameters).
Then one 10 Hz episode of each diffusion policy runs on the fake robot (`deploy_franka.main` itself) and
its lateness against the 10 Hz schedule is reported.

    python benchmarks/deploy_latency.py                  # latencies, plus 100 control steps per policy
    python benchmarks/deploy_latency.py --loop-steps 0   # latencies only
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deploy_franka  # noqa: E402
from common.networks import ChunkMLP, DiffusionMLP  # noqa: E402
from common.normalizer import Normalizer  # noqa: E402
from common.runs import CHECKPOINT_FORMAT, save_checkpoint  # noqa: E402


@dataclass
class Bench:
    repeats: int = 30
    """timed chunks per policy (after 3 warm-up ones)"""
    threads: int = 1
    """torch CPU threads"""
    loop_steps: int = 100
    """control steps of the 10 Hz episode on the fake robot per diffusion policy (0: none)"""


def header(policy: str, arch: dict, backbone: str = "mlp", **extra) -> dict:
    obs_dim = 58  # One-leg: robot 16 + 6 poses x 7
    down = np.array([1.0, 0, 0, 0, -1, 0])  # 6D of the gripper pointing down; a narrow orientation range, as in the
    norm = Normalizer(-np.ones(obs_dim), np.ones(obs_dim), np.r_[0.3, -0.3, 0.02, down - 0.1, -1],  # furniture data
                      np.r_[0.7, 0.3, 0.5, down + 0.1, 1])
    return {"format": CHECKPOINT_FORMAT, "policy": policy, "backbone": backbone, "arch": arch, "task": "one-leg-low",
            "obs_dim": obs_dim, "action_dim": 10, "horizon_steps": 8, "cond_steps": 1, "normalization": norm.state_dict(),
            "args": {}, **extra}


def main(bench: Bench) -> dict:
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    diff_arch = dict(action_dim=10, horizon_steps=8, obs_dim=58, cond_steps=1, time_dim=32, mlp_dims=(1024,) * 7,
                     cond_mlp_dims=(512, 64), activation="mish", residual=True, use_layernorm=True)
    gauss_arch = dict(obs_dim=58, horizon_steps=8, out_dim=10, cond_steps=1, mlp_dims=[1024] * 10, activation="mish",
                      residual=True)
    gauss = ChunkMLP(**gauss_arch)

    def diffusion_weights() -> dict:  # a small last layer: random ε-predictions that do not saturate the chunk
        net = DiffusionMLP(**diff_arch)
        net.net.net[-1].weight.data *= 0.01
        return net.state_dict()
    small_arch = dict(diff_arch, time_dim=16, mlp_dims=(512, 512, 512), cond_mlp_dims=None, use_layernorm=False)
    small = DiffusionMLP(**small_arch)
    small.net.net[-1].weight.data *= 0.01
    cases = {
        "diffusion DDPM K=20, state-task MLP 3 x 512": (
            header("diffusion", small_arch, denoising_steps=20, ema=small.state_dict()), dict(use_ddim=False)),
        "diffusion DDPM K=20, furniture MLP": (header("diffusion", diff_arch, denoising_steps=20, ema=diffusion_weights()),
                                dict(use_ddim=False)),
        "diffusion DDIM 5 of K=100, furniture MLP": (header("diffusion", diff_arch, denoising_steps=100,
                                             ema=diffusion_weights()), dict(use_ddim=True, ddim_steps=5)),
        f"gaussian ({sum(p.numel() for p in gauss.parameters()) / 1e6:.1f}M parameters)": (
            header("gaussian", gauss_arch, std_limits=[0.01, 0.2],
                   ema={**{f"network.{k}": v for k, v in gauss.state_dict().items()}, "log_std": torch.zeros(10)}), {}),
    }
    poses = os.path.join(folder, "poses.json")
    with open(poses, "w") as f:
        f.write(str([[0.5, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0]] * 6))
    results = {}
    for name, (ckpt, flags) in cases.items():
        path = os.path.join(folder, f"{len(results)}.pt")
        save_checkpoint(path, ckpt)
        args = deploy_franka.Args(checkpoint=path, robot="fake", yes=True, object_poses=f"file:{poses}",
                                  torch_threads=bench.threads, **flags)
        torch.set_num_threads(bench.threads)
        policy, _, _ = deploy_franka.load_policy(args)
        cond = torch.rand(1, 1, 58) * 2 - 1
        times = []
        for i in range(bench.repeats + 3):
            t0 = time.perf_counter()
            policy(cond, True)
            times.append(time.perf_counter() - t0)
        t = np.array(times[3:]) * 1e3
        results[name] = {"latency_ms_mean": t.mean(), "latency_ms_max": t.max()}
        print(f"{name}: {t.mean():.1f} ms per chunk (max {t.max():.1f}) on {bench.threads} CPU thread(s)")
        if bench.loop_steps and ckpt["policy"] == "diffusion":
            args.max_steps, args.log = bench.loop_steps, os.path.join(folder, f"{len(results)}.jsonl")
            # a fake robot started inside the default workspace; limits clip whatever the random policy asks
            out = deploy_franka.main(args, robot=deploy_franka.FakeRobot(pos=(0.5, 0.0, 0.3)))
            results[name].update({k: v for k, v in out.items() if k.startswith("period")})
            print(f"  10 Hz loop over {out['steps']} steps: lateness {out['period_lateness_mean'] * 1e3:.2f} ± "
                  f"{out['period_lateness_std'] * 1e3:.2f} ms, max {out['period_lateness_max'] * 1e3:.2f} ms")
    return results


if __name__ == "__main__":
    main(tyro.cli(Bench))
