"""System identification of the D3IL Avoid simulator (`sims/avoid.py`) from the 96 real demos.

`--fit` refits the dynamics constants of `sims/avoid.py` (`_W`, `_NH`, `_DISC_C`, `_R_DES`,
`_R_EE`) by minimising the open-loop replay error of all demos and prints them in the form the
module holds them; `--validate` replays every real demo's recorded desired positions open-loop
from its recorded start through the simulator and reports the fidelity stated in the module's
docstring (planar end-effector RMSE, demos whose row modes agree, demos that collide).

    python scripts/avoid_sysid.py --validate avoid_demos.npz     # the 96 real D3IL demos, converted
    python scripts/avoid_sysid.py --fit avoid_demos.npz          # ~4 min on 1 core
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sims.avoid import _GAIN_BOX, _GAIN_CENTRE, _demo_arrays, collided, replay, row_modes  # noqa: E402


def fit_dynamics(path: str, iters: int = 1500, lr: float = 5e-3, seed: int = 0,
                 train: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Refit the constants by minimising the open-loop replay MSE (torch autograd through the
    rollout of `sims.avoid.physics_step`). train: optional bool mask of the demos to fit on.
    ~4 min on 1 core."""
    import torch

    torch.manual_seed(seed)
    des, ee = _demo_arrays(path)
    n, T = len(des), max(len(x) for x in des)
    D, C, M = np.zeros((n, T, 2)), np.zeros((n, T, 2)), np.zeros((n, T))
    for i, (a, b) in enumerate(zip(des, ee)):
        D[i], C[i, : len(b)], M[i, : len(b)] = a[np.minimum(np.arange(T), len(a) - 1)], b, 1
    if train is not None:
        M *= np.asarray(train, dtype=np.float64)[:, None]
    D, C, M = (torch.tensor(x) for x in (D, C, M))
    W = torch.zeros(3, 2, 8, dtype=torch.float64)
    W[0, :, :2] = torch.diag(torch.tensor([0.3, 0.1], dtype=torch.float64))
    W[0, :, 2:4] = torch.diag(torch.tensor([0.7, 0.85], dtype=torch.float64))
    W[0, :, 4:6] = 0.01 * torch.randn(2, 2, dtype=torch.float64)
    Nh = 0.01 * torch.randn(2, 8, dtype=torch.float64)
    Nh[:, 4:6] = 0.5 * torch.eye(2, dtype=torch.float64)
    P = {"W": W, "Nh": Nh, "c": torch.zeros(2, dtype=torch.float64),
         "logR": torch.tensor([np.log(0.85), np.log(0.815)], dtype=torch.float64)}
    for v in P.values():
        v.requires_grad_(True)
    lo, hi, g0 = (torch.tensor(x) for x in (*_GAIN_BOX, _GAIN_CENTRE))

    def disc(x: "torch.Tensor", r: "torch.Tensor") -> "torch.Tensor":
        d = x - P["c"]
        return P["c"] + d * torch.clamp(r / d.norm(dim=-1, keepdim=True), max=1.0)

    def loss() -> "torch.Tensor":
        p, up = C[:, 0], C[:, 0]
        vel = h = torch.zeros(n, 2, dtype=torch.float64)
        R = P["logR"].exp()
        err = torch.zeros((), dtype=torch.float64)
        for t in range(T - 1):
            u = disc(D[:, t], R[0])
            z = torch.cat([u - p, vel, h, u - up], -1)
            q = torch.minimum(torch.maximum(p, lo), hi) - g0
            vel = z @ P["W"][0].T + (q[:, :1] * z) @ P["W"][1].T + (q[:, 1:] * z) @ P["W"][2].T
            h, up, pn = z @ P["Nh"].T, u, disc(p + vel, R[1])
            vel, p = pn - p, pn
            err = err + (((p - C[:, t + 1]) ** 2).sum(-1) * M[:, t + 1]).sum()
        return err / M[:, 1:].sum()

    opt = torch.optim.Adam(P.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for it in range(iters):
        opt.zero_grad()
        val = loss()
        val.backward()
        opt.step()
        sched.step()
        if it % 100 == 0:
            print(f"fit iter {it}: open-loop planar RMSE {val.item() ** 0.5 * 1e3:.2f} mm", flush=True)
    out = {k: v.detach().numpy() for k, v in P.items()}
    return {"W": out["W"], "NH": out["Nh"], "DISC_C": out["c"],
            "R_DES": np.exp(out["logR"][0]), "R_EE": np.exp(out["logR"][1])}


def validate_simulator(path: str) -> dict:
    """Replay every real demo's desired path open-loop from its recorded start: planar RMSE (mm)
    of the end-effector path, fraction of demos with the recorded row modes, demos that collide."""
    des, ee = _demo_arrays(path)
    T = max(len(x) for x in des)
    D = np.stack([x[np.minimum(np.arange(T), len(x) - 1)] for x in des])
    sim = replay(D, np.stack([x[0] for x in ee]))
    sq = np.concatenate([((sim[i, : len(x)] - x) ** 2).sum(-1) for i, x in enumerate(ee)])
    agree = [row_modes(sim[i, : len(x)]) == row_modes(x) for i, x in enumerate(ee)]
    hits = [collided(sim[i, : len(x)]) for i, x in enumerate(ee)]
    return {"rmse_mm": float(np.sqrt(sq.mean()) * 1e3), "mode_agreement": float(np.mean(agree)),
            "collisions": int(np.sum(hits)), "n_demos": len(ee)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="D3IL Avoid simulator: validate or refit it.")
    parser.add_argument("--validate", metavar="NPZ", help="replay the real demos open-loop")
    parser.add_argument("--fit", metavar="NPZ", help="refit the dynamics constants and print them")
    cli = parser.parse_args(argv)
    if not (cli.fit or cli.validate):
        parser.error("give --validate NPZ or --fit NPZ")
    if cli.fit:
        np.set_printoptions(precision=6, suppress=True, floatmode="fixed", linewidth=110)
        for name, val in fit_dynamics(cli.fit).items():
            print(f"_{name} = {np.asarray(val)!r}")
    if cli.validate:
        print(validate_simulator(cli.validate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
