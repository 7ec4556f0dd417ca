"""`--from-scratch` (paper App. B.2, Fig. A6) on `dppo_finetune.py` and the diffusion baselines (issue 28).

A random ε-network (the reference's scratch configs' DiffusionMLP, K = 10, T_a = T_e = T_o = 1) with identity
observation normalisation and the env's action bounds, on gymnasium's Hopper-v5; the defaults are the reference's
`cfg/gym/scratch/<task>-v2/*_diffusion_mlp.yaml`. A checkpoint with it, or a task the reference has no scratch config
for, is refused in one line; a resumed run continues from its own networks.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dawr
import dipo
import dppo_finetune as ft
import dql
import drwr
import idql
import qsm
from common.normalizer import Normalizer
from tests.test_bad_input_scripts import refused

pytest.importorskip("mujoco")

BASELINES = (drwr, dawr, dipo, dql, idql, qsm)
ALL = (ft, *BASELINES)
# tiny runs: 2 envs x 8 chunk-steps, one update pass, a 5-step final evaluation, no oneDNN check
TINY = dict(env_id="hopper", from_scratch=True, n_train_itr=2, num_envs=2, n_steps=8, val_freq=0, eval_n_steps=5, seed=0,
            env_backend="gymnasium", onednn_matmul="off", plot=False)
TINY_METHOD = {ft: dict(batch_size=40, update_epochs=1), drwr: dict(batch_size=4, update_epochs=1),
               dawr: dict(batch_size=4, replay_ratio=1, critic_update_ratio=1, buffer_size=20),
               dipo: dict(batch_size=4, replay_ratio=1, action_gradient_steps=2), dql: dict(batch_size=4, replay_ratio=1),
               idql: dict(batch_size=4, replay_ratio=1, buffer_size=20, num_sample=2),
               qsm: dict(batch_size=4, replay_ratio=1, buffer_size=20)}

# The reference's scratch configs (irom-princeton/dppo cc7234a, cfg/gym/scratch/hopper-v2/*_diffusion_mlp.yaml; walker2d
# and halfcheetah: ppo_diffusion_mlp.yaml only, 501 iterations), in this project's flag names.
COMMON = dict(num_envs=10, n_steps=1000, horizon_steps=1, act_steps=1, actor_lr=1e-4, actor_lr_min=1e-4, lr_cycle_itr=1000,
              lr_warmup_itr=10, min_sampling_denoising_std=0.1, randn_clip_value=3.0, val_freq=10)
CRITIC = dict(critic_lr=1e-3, n_critic_warmup_itr=0, gamma=0.99)
REFERENCE = {
    ft: dict(COMMON, **CRITIC, n_train_itr=301, batch_size=5000, update_epochs=10, gamma_denoising=1.0, clip_coef=0.1,
             clip_coef_base=0.1, clip_coef_rate=3.0, min_logprob_denoising_std=0.1, gae_lambda=0.95, vf_coef=0.5,
             target_kl=1.0, reward_scale_running=True, ft_denoising_steps=10, use_ddim=False),
    drwr: dict(COMMON, gamma=0.99, n_train_itr=1000, batch_size=256, update_epochs=128, beta=10.0, max_weight=100.0,
               weight_decay=0.0),
    dawr: dict(COMMON, **CRITIC, n_train_itr=1000, reward_scale=0.01, max_weight=100.0, beta=10.0, buffer_size=100000,
               batch_size=256, replay_ratio=128, critic_update_ratio=4),
    dipo: dict(COMMON, **CRITIC, n_train_itr=1000, reward_scale=0.01, target_ema_rate=0.005, buffer_size=1000000,
               action_lr=1e-4, action_gradient_steps=10, replay_ratio=128, batch_size=256),
    dql: dict(COMMON, **CRITIC, n_train_itr=1000, reward_scale=0.01, target_ema_rate=0.005, buffer_size=1000000, eta=1.0,
              replay_ratio=128, batch_size=256),
    idql: dict(COMMON, **CRITIC, n_train_itr=1000, scale_reward_factor=0.01, num_sample=10, critic_tau=0.001,
               use_expectile_exploration=True, buffer_size=100000, replay_ratio=128, batch_size=256),
    qsm: dict(COMMON, **CRITIC, n_train_itr=1000, scale_reward_factor=0.01, q_grad_coeff=50.0, critic_tau=0.005,
              buffer_size=100000, replay_ratio=128, batch_size=256),
}


def filled(module, **kw):
    args = module.Args(**kw)
    module.fill_defaults(args)
    return args


@pytest.mark.parametrize("module", ALL, ids=lambda m: m.__name__)
def test_scratch_defaults_are_the_reference_scratch_configs(module):
    """Every value of the reference's scratch config that has a flag here is the flag's default with --from-scratch."""
    tasks = {"hopper": 301, "walker2d": 501, "halfcheetah": 501} if module is ft else {"hopper": 1000}
    for task, n_train_itr in tasks.items():
        args = filled(module, env_id=task, from_scratch=True)
        expected = dict(REFERENCE[module], n_train_itr=n_train_itr)
        assert {k: getattr(args, k) for k in expected} == expected, task


def test_the_random_network_is_the_reference_scratch_configs_with_identity_normalisation():
    """DiffusionMLP time_dim 16, [512] x 3 ReLU, residual, T_o = 1 (cfg/gym/scratch/*: `actor`), K as asked, drawn from
    the seed; observations unchanged by the normalisation (within its 1e-6 guard) and actions mapped to Hopper-v5's
    bounds."""
    from common import runs
    task = ft.get_task("hopper")
    ckpt, path = runs.open_scratch(None, None, task, 1, 10, seed=3)
    assert path == "--from-scratch" and ckpt["denoising_steps"] == 10 and (ckpt["horizon_steps"], ckpt["cond_steps"]) == (1, 1)
    assert ckpt["arch"] == dict(action_dim=3, horizon_steps=1, obs_dim=11, cond_steps=1, time_dim=16, mlp_dims=[512] * 3,
                                activation="relu", residual=True)
    again, _ = runs.open_scratch(None, None, task, 1, 10, seed=3)
    other, _ = runs.open_scratch(None, None, task, 1, 10, seed=4)
    assert all(torch.equal(v, again["ema"][k]) for k, v in ckpt["ema"].items())
    assert not all(torch.equal(v, other["ema"][k]) for k, v in ckpt["ema"].items())
    norm = Normalizer.from_state_dict(ckpt["normalization"])
    obs = torch.randn(64, 11) * 5
    torch.testing.assert_close(norm.normalize_obs(obs), obs, rtol=1e-5, atol=1e-5)
    space = gym.make("Hopper-v5").action_space
    np.testing.assert_array_equal(ckpt["normalization"]["action_min"].numpy(), space.low)
    np.testing.assert_array_equal(ckpt["normalization"]["action_max"].numpy(), space.high)


def test_dppo_from_scratch_runs_on_gymnasium_hopper(tmp_path, monkeypatch, capsys):
    """The issue's `python dppo_finetune.py --env-id hopper --from-scratch --n-train-itr 2`, at a tiny size: the reference
    scratch config's defaults printed, Hopper-v5 stepped on gymnasium, and a checkpoint of the random network fine-tuned
    (K = K' = 10, T_a = 1) that writes no pre-trained checkpoint's name into its arguments."""
    monkeypatch.chdir(tmp_path)
    out = ft.main(ft.Args(**TINY, **TINY_METHOD[ft]))
    printed = capsys.readouterr().out
    assert "envs: 2 x hopper on gymnasium" in printed
    assert "hopper defaults: act_steps=1," in printed and "gamma_denoising=1.0" in printed and "lr_cycle_itr=1000" in printed
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["itr"] == 2 and ckpt["task"] == "hopper" and ckpt["denoising_steps"] == 10 and ckpt["horizon_steps"] == 1
    assert ckpt["args"]["from_scratch"] and ckpt["args"]["checkpoint"] is None
    assert not all(torch.equal(v, ckpt["base"][k]) for k, v in ckpt["actor_ft"].items())  # the actor stepped
    assert len(out["history"]) == 2 and all(np.isfinite(row["pg_loss"]) for row in out["history"])


@pytest.mark.parametrize("module", BASELINES, ids=lambda m: m.__name__)
def test_baseline_from_scratch_runs_two_iterations(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = module.main(module.Args(**TINY, **TINY_METHOD[module]))
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["itr"] == 2 and ckpt["denoising_steps"] == 10 and ckpt["horizon_steps"] == 1 and ckpt["arch"]["time_dim"] == 16
    assert ckpt["args"]["from_scratch"] and ckpt["args"]["checkpoint"] is None and len(out["history"]) == 2


@pytest.mark.parametrize("module", ALL, ids=lambda m: m.__name__)
def test_from_scratch_with_a_checkpoint_is_one_line(module, monkeypatch, capsys, tmp_path):
    line = refused(module.main, module.Args(env_id="hopper", from_scratch=True, checkpoint="policy.pt"), monkeypatch, capsys,
                   tmp_path)
    assert line == "error: --from-scratch starts from a random policy; drop --checkpoint (or --from-scratch)"


@pytest.mark.parametrize("module,env_id", [(ft, "avoid-m2"), (ft, "lift"), (drwr, "walker2d"), (qsm, "avoid-m2")],
                         ids=["dppo-avoid", "dppo-lift", "drwr-walker2d", "qsm-avoid"])
def test_from_scratch_on_a_task_without_a_scratch_config_is_one_line(module, env_id, monkeypatch, capsys, tmp_path):
    """The reference has scratch configs for DPPO on Hopper, Walker2d and HalfCheetah and for the baselines on Hopper only;
    any other task names the ones that work and how to start from a pre-trained policy instead."""
    line = refused(module.main, module.Args(env_id=env_id, from_scratch=True), monkeypatch, capsys, tmp_path)
    works = "hopper, walker2d, halfcheetah" if module is ft else "hopper"
    assert line == (f"error: --from-scratch runs {works} (the reference's scratch configs), not {env_id}: pre-train it "
                    f"(python dppo_pretrain.py --env-id {env_id}) and fine-tune with --checkpoint")


def test_a_resumed_from_scratch_run_continues_from_its_own_networks(tmp_path, monkeypatch):
    """`--resume` of a from-scratch run loads the run's frozen base and fine-tuned networks (not a fresh random draw, nor
    the paper's checkpoint that a run without --checkpoint would fetch), and keeps --checkpoint unset, so it resumes
    again."""
    monkeypatch.chdir(tmp_path)
    first = ft.main(ft.Args(**dict(TINY, n_train_itr=1), **TINY_METHOD[ft]))
    saved = torch.load(first["checkpoint"], weights_only=True)
    seen = []
    real = ft.DiffusionPPO.rollout_action

    def rollout_action(self, cond, act_steps):
        if not seen:
            seen.append({k: v.clone() for k, v in self.state_dict().items()})
        return real(self, cond, act_steps)
    monkeypatch.setattr(ft.DiffusionPPO, "rollout_action", rollout_action)
    resumed = ft.main(ft.Args(resume=first["run_dir"], n_train_itr=2))
    for name in ("base", "actor_ft", "critic"):
        prefix = {"base": "actor.", "actor_ft": "actor_ft.", "critic": "critic."}[name]
        assert all(torch.equal(seen[0][prefix + k], v) for k, v in saved[name].items()), name
    after = torch.load(resumed["checkpoint"], weights_only=True)
    assert after["itr"] == 2 and after["args"]["checkpoint"] is None and after["args"]["from_scratch"]
    again = ft.main(ft.Args(resume=first["run_dir"], n_train_itr=3))
    assert torch.load(again["checkpoint"], weights_only=True)["itr"] == 3


def test_the_baselines_fine_tuning_defaults_are_unchanged():
    """The flags whose fixed defaults became per-suite values (so that --from-scratch can set them) keep the fine-tuning
    configs' values on every suite."""
    for task in ("hopper", "lift", "avoid-m2"):
        assert filled(drwr, env_id=task).batch_size == 1000 and filled(drwr, env_id=task).update_epochs == 16
        assert (filled(dawr, env_id=task).batch_size, filled(dawr, env_id=task).replay_ratio) == (1000, 64)
        assert filled(dipo, env_id=task).batch_size == filled(dql, env_id=task).batch_size == 1000
        assert (filled(idql, env_id=task).batch_size, filled(idql, env_id=task).n_critic_warmup_itr) == (1000, 5)
        a = filled(qsm, env_id=task)
        assert (a.batch_size, a.replay_ratio, a.n_critic_warmup_itr, a.q_grad_coeff) == (1000, 16, 5, 10.0)
