"""`gaussian_ppo.py --from-scratch` (paper App. B.2, Fig. A6, the Gaussian side; issue 28): the defaults it fills are the
reference's `cfg/gym/scratch/{hopper,walker2d,halfcheetah}-v2/ppo_gaussian_mlp.yaml`, an explicit flag wins, and a tiny
Hopper run goes through two iterations with them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gaussian_ppo as gauss

pytest.importorskip("mujoco")

# The reference's scratch configs (irom-princeton/dppo cc7234a, cfg/gym/scratch/<task>-v2/ppo_gaussian_mlp.yaml),
# transcribed (no `yaml` module in this venv) in this project's flag names: `train` (n_envs from `env`; the schedulers'
# first_cycle_steps / warmup_steps / min_lr as lr_cycle_itr / lr_warmup_itr / *_lr_min), `model` (clip_ploss_coef,
# randn_clip_value) and `model.actor` (mlp_dims, activation_type, residual_style; Gaussian_MLP's std_min 0.01 and
# std_max 1, which the configs leave at their defaults). The three differ only in n_train_itr.
REFERENCE = dict(num_envs=10, n_steps=1000, cond_steps=1, horizon_steps=1, act_steps=1, n_critic_warmup_itr=0, gamma=0.99,
                 actor_lr=1e-4, actor_lr_min=1e-4, lr_cycle_itr=1000, lr_warmup_itr=10, critic_lr=1e-3, val_freq=10,
                 reward_scale_running=True, gae_lambda=0.95, batch_size=500, update_epochs=10, vf_coef=0.5, target_kl=1.0,
                 clip_coef=0.1, randn_clip_value=3.0, mlp_dims=(512, 512, 512), activation="relu", residual=False,
                 std_min=0.01, std_max=1.0, max_grad_norm=None, final_action_clip=False)
N_TRAIN_ITR = {"hopper": 301, "walker2d": 301, "halfcheetah": 501}
TINY = dict(env_id="hopper", from_scratch=True, n_train_itr=2, num_envs=2, n_steps=16, batch_size=16, update_epochs=1,
            mlp_dims=(32, 32), val_freq=0, eval_n_steps=5, seed=0, env_backend="gymnasium", onednn_matmul="off", plot=False)


def filled(**kw) -> tuple[gauss.Args, dict]:
    args = gauss.Args(**kw)
    return args, gauss.fill_defaults(args)


@pytest.mark.parametrize("task", list(N_TRAIN_ITR))
def test_scratch_defaults_are_the_reference_gaussian_scratch_configs(task):
    """Every value of the reference's config that has a flag here is the flag's value with --from-scratch (filled, or
    the flag's own default where the two agree); σ starts at std_max (docs/deviations.md "From scratch")."""
    args, _ = filled(env_id=task, from_scratch=True)
    expected = dict(REFERENCE, n_train_itr=N_TRAIN_ITR[task])
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.std_init == 1.0 and args.bootstrap_truncated is True


def test_any_other_gymnasium_id_takes_hoppers_scratch_config():
    args, _ = filled(env_id="InvertedPendulum-v5", from_scratch=True)
    assert {k: getattr(args, k) for k in REFERENCE} == REFERENCE and args.n_train_itr == 301


def test_an_explicit_flag_wins_over_the_scratch_defaults():
    args, done = filled(env_id="walker2d", from_scratch=True, batch_size=250, clip_coef=0.2, mlp_dims=(64, 64),
                        std_init=0.5, final_action_clip=True)
    assert (args.batch_size, args.clip_coef, args.mlp_dims, args.std_init, args.final_action_clip) == (250, 0.2, (64, 64),
                                                                                                        0.5, True)
    assert not {"batch_size", "clip_coef", "mlp_dims", "std_init", "final_action_clip"} & set(done)
    assert done["n_train_itr"] == 301 and done["num_envs"] == 10  # the rest is still the reference's


def test_non_scratch_defaults_are_unchanged_by_the_scratch_table():
    """Fine-tuning Hopper from a checkpoint keeps the gym suite's values (SUITE_DEFAULTS), not the scratch ones."""
    args, _ = filled(env_id="hopper", checkpoint="x.pt")
    assert (args.n_train_itr, args.num_envs, args.n_steps, args.batch_size, args.update_epochs, args.clip_coef) == (
        1000, 40, 500, 5000, 5, 0.01)


def test_tiny_hopper_from_scratch_runs_two_iterations(tmp_path, monkeypatch, capsys):
    """Two iterations on gymnasium's Hopper-v5 with the scratch defaults printed, the executed actions not clamped (the
    reference's configs do not), the log-probs clamped in the ratio as the reference does, and σ at its clamp's top."""
    monkeypatch.chdir(tmp_path)
    clamped = []
    real = gauss.clamp_logprobs
    monkeypatch.setattr(gauss, "clamp_logprobs", lambda lp: clamped.append(lp.shape) or real(lp))
    out = gauss.main(gauss.Args(**TINY))
    printed = capsys.readouterr().out
    assert "hopper defaults: " in printed and "lr_cycle_itr=1000" in printed and "std_init=1.0" in printed
    assert "final_action_clip=False" in printed and "residual=False" in printed
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["itr"] == 2 and ckpt["task"] == "hopper" and ckpt["horizon_steps"] == 1 and ckpt["std_limits"] == [0.01, 1.0]
    assert ckpt["args"]["from_scratch"] and ckpt["args"]["final_action_clip"] is False and ckpt["args"]["checkpoint"] is None
    assert ckpt["arch"]["mlp_dims"] == [32, 32] and ckpt["arch"]["activation"] == "relu"
    assert not all(torch.equal(v, ckpt["base"][k]) for k, v in ckpt["actor_ft"].items())  # the actor stepped
    assert len(clamped) == 2 * 2 * 2  # 2 iterations x 2 minibatches x (new, old)
    assert len(out["history"]) == 2 and all(np.isfinite(row["pg_loss"]) for row in out["history"])
    assert out["history"][0]["std"] == pytest.approx(1.0, abs=1e-3)


def test_from_scratch_clips_only_the_actors_gradient(tmp_path, monkeypatch):
    """--max-grad-norm clips actor_ft alone, as the reference's `TrainPPOGaussianAgent.run` (until issue 28 a run from
    scratch also clipped the critic, as CleanRL does)."""
    monkeypatch.chdir(tmp_path)
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm: clipped.append(ps := list(params)) or real(ps, norm))
    gauss.main(gauss.Args(**dict(TINY, n_train_itr=1), max_grad_norm=0.5))
    # one clip per minibatch (2), each over the actor's tensors: none is the critic's V-head bias of shape (1,)
    assert len(clipped) == 2 and all(p.shape != (1,) for ps in clipped for p in ps)
