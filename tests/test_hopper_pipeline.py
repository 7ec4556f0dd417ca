"""scripts/hopper_data.sh in miniature: the data path it relies on, end to end, at toy sizes.

A from-scratch Hopper-v5 checkpoint (gaussian_ppo.py, T_a = 1) collects a train.npz under the
registry task `hopper`; dppo_pretrain.py (T_a = 4) trains on that file and dppo_finetune.py
evaluates the result. Checks formats and ids fit together, not returns (the script's measured
figures are in its comments)."""


import numpy as np
import pytest
import torch

import dppo_finetune as ft
import dppo_pretrain as pt
import gaussian_ppo as gauss
from loaders.datasets import load_train_npz
from scripts import collect_dataset


def test_from_scratch_hopper_to_diffusion_pretraining(tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)  # runs/ goes to tmp_path
    torch.set_num_threads(1)
    expert = gauss.main(gauss.Args(env_id="Hopper-v5", from_scratch=True, n_train_itr=1, num_envs=2, n_steps=64,
                                   batch_size=64, mlp_dims=(64, 64), val_freq=0, seed=0))
    ckpt = torch.load(expert["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["task"] == "hopper" and ckpt["horizon_steps"] == 1

    out = str(tmp_path / "data" / "hopper" / "medium" / "train.npz")
    data = collect_dataset.collect(collect_dataset.Args(env_id="hopper", checkpoint=expert["checkpoint"], n_env_steps=400,
                                                        num_envs=4, out=out))
    trajs = load_train_npz(out, 11, 3)
    assert sum(len(t["actions"]) for t in trajs) == 400 and len(trajs) == data["n_trajectories"]
    assert all(np.abs(t["actions"]).max() <= 1 + 1e-6 for t in trajs)  # Hopper's bounds are [-1, 1]
    with np.load(out) as f:
        assert {"states", "actions", "traj_lengths", "rewards"} <= set(f.files)

    pre = pt.main(pt.Args(env_id="hopper", dataset=out, n_epochs=1, eval_every=0, mlp_dims=(32, 32, 32),
                          output=str(tmp_path / "diffusion.pt")))
    assert np.isfinite(pre["losses"]).all()
    # eval-only still checks --batch-size against one iteration's (env-step, denoising-step) pairs
    ev = ft.main(ft.Args(env_id="hopper", checkpoint=str(tmp_path / "diffusion.pt"), eval_only=True, num_envs=2,
                         n_steps=250, batch_size=500))
    for mode in ("deterministic", "stochastic"):
        assert ev["eval"][mode]["n_episodes"] >= 2 and np.isfinite(ev["eval"][mode]["return_mean"])
