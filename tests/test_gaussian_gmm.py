"""gaussian_ppo.py and gmm_ppo.py: log-probs against torch.distributions, std rules, the BC regulariser
(eq. A14), smoke runs through `main(args)` for both backbones, resume, errors, and learning from scratch."""

import csv
import dataclasses
import math
import os
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from torch import distributions as D

import gaussian_ppo as gauss
import gmm_ppo as gmm
from common import runs
from common.errors import DatasetError, UsageError
from common.networks import ChunkMLP, ChunkTransformer, ObsCritic
from loaders.datasets import load_train_npz
from scripts import collect_dataset
from tests.helpers import WiringRecorder, assert_resumed_run_matches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(mlp_dims=(64, 64, 64), n_emb=32, n_heads=2, pretrain_batch_size=128, learning_rate=1e-3, min_lr=1e-4,
             n_eval_envs=8)


def _gauss_policy(backbone="mlp", T_a=4, D_a=2, D_o=3):
    net = ChunkMLP(D_o, T_a, D_a, mlp_dims=(32, 32, 32)) if backbone == "mlp" else ChunkTransformer(D_o, T_a, D_a, n_emb=16,
                                                                                                    n_heads=2)
    return gauss.GaussianPolicy(net, D_a, 0.1, 0.01, 0.2)


def _gmm_policy(M=5, T_a=4, D_a=2, D_o=3):
    return gmm.GMMPolicy(ChunkMLP(D_o, T_a, M * D_a, n_extra=M, mlp_dims=(32, 32, 32)), D_a, M, 0.1, 0.01, 0.2)


def test_gaussian_logprob_matches_torch_normal():
    torch.manual_seed(0)
    x, mean, std = torch.randn(6, 4, 2), torch.randn(6, 4, 2), torch.tensor([0.05, 0.2])
    expected = D.Normal(mean, std).log_prob(x).mean(dim=(1, 2))  # averaged over T_a·D_a (paper App. D.6)
    torch.testing.assert_close(gauss.gaussian_logprob(x, mean, std), expected)


def test_gmm_logprob_matches_mixture_same_family():
    torch.manual_seed(0)
    B, M, T_a, D_a = 6, 5, 4, 2
    x, means, logits = torch.randn(B, T_a, D_a) * 0.3, torch.randn(B, M, T_a, D_a) * 0.3, torch.randn(B, M)
    std = torch.rand(M, D_a) * 0.2 + 0.05
    scale = std[None, :, None, :].expand(B, M, T_a, D_a).reshape(B, M, -1)
    mix = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(means.reshape(B, M, -1), scale), 1))
    torch.testing.assert_close(gmm.gmm_logprob(x, means, std, logits), mix.log_prob(x.reshape(B, -1)))
    # through the policy: tanh means over the chunk, logits from the obs
    policy, cond = _gmm_policy(), torch.randn(B, 1, 3)
    m, s, lg = policy(cond)
    assert m.shape == (B, M, T_a, D_a) and s.shape == (M, D_a) and lg.shape == (B, M) and m.abs().max() <= 1


@pytest.mark.parametrize("backbone", ["mlp", "transformer"])
def test_gaussian_std_clamps_sampling_bounds_and_deterministic(backbone):
    torch.manual_seed(0)
    policy, cond = _gauss_policy(backbone), torch.randn(64, 1, 3)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([np.log(1.0), np.log(1e-4)]))
    mean, std = policy(cond)
    assert mean.shape == (64, 4, 2) and mean.abs().max() <= 1
    torch.testing.assert_close(std, torch.tensor([0.2, 0.01]))  # clamped to [0.01, 0.2]
    with torch.no_grad():
        policy.log_std.fill_(np.log(0.1))  # initial value
        x = gauss.sample_actions(policy, cond, False, 3.0)
        dev = ((x - mean) / 0.1).abs()
        assert dev.max() <= 3 + 1e-4 and dev.max() > 2  # clamped to μ ± 3σ, and it is noise
        x_det = gauss.sample_actions(policy, cond, True, 3.0)
        assert (x_det - mean).abs().max() <= 3e-4  # σ = 1e-4
    # std is shared across the chunk: one parameter per action dimension
    assert policy.log_std.shape == (2,)


def test_gmm_std_clamps_and_samples_come_from_one_mode():
    torch.manual_seed(0)
    policy, cond = _gmm_policy(), torch.randn(32, 1, 3)
    with torch.no_grad():
        policy.log_std[0].fill_(np.log(5.0))
        policy.log_std[1].fill_(np.log(1e-5))
        means, std, logits = policy(cond)
    assert torch.allclose(std[0], torch.full((2,), 0.2)) and torch.allclose(std[1], torch.full((2,), 0.01))
    with torch.no_grad():
        x = gmm.sample_actions(policy, cond, False, 3.0)
        dev = ((x[:, None] - means) / std[None, :, None, :]).abs().amax(dim=(2, 3))  # (B, M)
        assert (dev.min(dim=1).values <= 3 + 1e-4).all()  # within μ_m ± 3σ_m of some mode m
        x_det = gmm.sample_actions(policy, cond, True, 3.0)
        best = means[torch.arange(32), logits.argmax(-1)]
        assert (x_det - best).abs().max() <= 3e-4


@pytest.mark.parametrize("module", [gauss, gmm])
def test_bc_regulariser_step_increases_base_likelihood(module):
    """Eq. A14: a gradient step on −log π_BC(a_new) makes the current policy's samples more likely under π_BC."""
    torch.manual_seed(0)
    policy = _gauss_policy() if module is gauss else _gmm_policy()
    agent = (module.GaussianPPO if module is gauss else module.GMMPPO)(policy, ObsCritic(3, mlp_dims=(16, 16, 16)), 3.0)
    with torch.no_grad():  # move actor_ft away from the frozen BC policy
        for p in agent.actor_ft.network.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cond = torch.randn(256, 1, 3)
    opt = torch.optim.SGD(agent.actor_ft.parameters(), lr=1e-3)
    torch.manual_seed(1)
    before = agent.bc_loss(cond)
    opt.zero_grad()
    before.backward()
    assert all(p.grad is None for p in agent.actor.parameters())  # π_BC is frozen
    assert agent.actor_ft.network.net.net[0].weight.grad.abs().sum() > 0  # gradient reaches μ_θ (reparameterised)
    opt.step()
    torch.manual_seed(1)  # the same noise (and modes)
    after = agent.bc_loss(cond)
    assert after.item() < before.item()


# ---------------------------------------------------------------- the scripts through main(args)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Small Avoid M2 Gaussian / GMM policies (3 epochs), one per script and backbone."""
    os.chdir(tmp_path_factory.mktemp("runs"))
    out = {}
    for name, module in (("gaussian", gauss), ("gmm", gmm)):
        for backbone in ("mlp", "transformer"):
            # own exp_name: the run folder is named to the second, and these 3-epoch runs can share one
            out[name, backbone] = module.main(module.Args(pretrain=True, env_id="avoid-m2", n_epochs=3, eval_every=3,
                                                          seed=0, backbone=backbone, exp_name=f"{name}_{backbone}",
                                                          **SMALL))
    return out


def _finetune(module, ckpt, **kw):
    base = dict(env_id="avoid-m2", checkpoint=ckpt, n_train_itr=3, num_envs=8, n_steps=25, val_freq=1, seed=0, plot=False)
    return module.main(module.Args(**{**base, **kw}))


@pytest.mark.parametrize("name,backbone", [("gaussian", "mlp"), ("gaussian", "transformer"), ("gmm", "mlp"),
                                           ("gmm", "transformer")])
def test_pretrain_and_finetune_smoke(pretrained, name, backbone):
    module = gauss if name == "gaussian" else gmm
    pre = pretrained[name, backbone]
    assert len(pre["losses"]) == 3 and all(np.isfinite(pre["losses"])) and pre["losses"][-1] < pre["losses"][0]
    assert pre["eval"]["n_episodes"] == 8 and set(pre["eval"]["mode_fractions"]) == {5, 6, 7, 8}
    ckpt = torch.load(pre["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["policy"] == name and ckpt["backbone"] == backbone and ckpt["task"] == "avoid-m2"
    assert ckpt["obs_dim"] == 4 and ckpt["action_dim"] == 2 and ckpt["horizon_steps"] == 4
    policy = module.policy_from_checkpoint(ckpt, module.Args(), "ema")  # rebuilt from the checkpoint alone
    assert policy(torch.zeros(2, 1, 4))[0].shape[-2:] == (4, 2)

    out = _finetune(module, pre["checkpoint"], bc_coef=0.1)
    h = out["history"]
    assert len(h) == 3 and all(np.isfinite(x[k]) for x in h for k in ("pg_loss", "v_loss", "bc_loss", "approx_kl"))
    assert all(x["n_episodes"] == 8 for x in h)
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "eval.csv"))))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3] and all(r["mode"] == "stochastic" for r in rows)
    post = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert all(torch.equal(post["base"][k], v) for k, v in ckpt["ema"].items())  # the frozen BC policy
    assert any(not torch.equal(post["actor_ft"][k], v) for k, v in ckpt["ema"].items()) and post["itr"] == 3
    again = _finetune(module, out["checkpoint"], n_train_itr=1, n_critic_warmup_itr=0, val_freq=0)  # a fine-tuned one reloads
    assert len(again["history"]) == 1


def test_resume_matches_uninterrupted_and_eval_only(pretrained):
    ckpt = pretrained["gaussian", "mlp"]["checkpoint"]
    full = _finetune(gauss, ckpt, n_train_itr=4, exp_name="full")
    part = _finetune(gauss, ckpt, n_train_itr=2, exp_name="part")
    resumed = gauss.main(gauss.Args(resume=part["run_dir"], n_train_itr=4, env_id="avoid-m2"))
    assert_resumed_run_matches(full, resumed, n_eval_rows=5)
    ev = _finetune(gmm, pretrained["gmm", "mlp"]["checkpoint"], eval_only=True)["eval"]
    assert set(ev) == {"deterministic", "stochastic"} and ev["stochastic"]["n_episodes"] == 8


def test_refuses_wrong_checkpoints(pretrained):
    with pytest.raises(DatasetError, match="holds a gmm policy.*use gmm_ppo.py"):
        _finetune(gauss, pretrained["gmm", "mlp"]["checkpoint"])
    with pytest.raises(DatasetError, match="holds a gaussian policy.*use gaussian_ppo.py"):
        _finetune(gmm, pretrained["gaussian", "mlp"]["checkpoint"])
    with pytest.raises(DatasetError, match="avoid-m2.*not 'avoid-m1'"):
        _finetune(gauss, pretrained["gaussian", "mlp"]["checkpoint"], env_id="avoid-m1")
    with pytest.raises(UsageError, match="batch-size"):
        _finetune(gmm, pretrained["gmm", "mlp"]["checkpoint"], batch_size=10**6)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gaussian_ppo.py"), "--checkpoint",
                        pretrained["gmm", "mlp"]["checkpoint"]], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "use gmm_ppo.py" in r.stderr


def test_from_scratch_learns_inverted_pendulum_and_collects_a_dataset(tmp_path):
    """App. B.2 path on a cheap MuJoCo task outside the registry: 6 iterations of 2048 env steps (~15 s), at the sizes
    of CleanRL's PPO for MuJoCo (the reference's scratch defaults, 10 envs x 1000 steps, learn too slowly for a test)."""
    pytest.importorskip("mujoco")
    os.chdir(tmp_path)
    torch.set_num_threads(1)
    out = gauss.main(gauss.Args(env_id="InvertedPendulum-v5", from_scratch=True, n_train_itr=6, val_freq=0, seed=0,
                                num_envs=8, n_steps=256, batch_size=64, actor_lr=3e-4, mlp_dims=(64, 64), activation="tanh",
                                std_init=0.5, clip_coef=0.2, max_grad_norm=0.5, final_action_clip=True))
    h = out["history"]
    assert h[0]["return_mean"] < 15  # a random policy falls within a few steps
    assert h[-1]["return_mean"] > h[0]["return_mean"] + 25 and out["final_eval"]["return_mean"] > 40
    ckpt = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["horizon_steps"] == 1 and ckpt["std_limits"] == [0.01, 1.0]
    data = collect_dataset.collect(collect_dataset.Args(checkpoint=out["checkpoint"], n_env_steps=400, num_envs=4,
                                                        out=str(tmp_path / "medium" / "train.npz")))
    trajs = load_train_npz(str(tmp_path / "medium" / "train.npz"), 4, 1)
    assert sum(len(t["actions"]) for t in trajs) == 400 and len(trajs) == data["n_trajectories"]
    # clipped to the bounds and all("rewards" in t for t in trajs)
    assert all(np.abs(t["actions"]).max() <= 3 + 1e-4 for t in trajs)


# ---- wiring as in the reference (irom-princeton/dppo agent/finetune/train_ppo_gaussian_agent.py `run`) ----

@pytest.mark.parametrize("name", ["gaussian", "gmm"])
def test_ppo_loss_sees_logprobs_clamped_as_the_reference(pretrained, monkeypatch, name):
    """New and old log-probs enter `ppo_loss` clamped to [-5, 2] (`model/rl/gaussian_ppo.py`, `gmm_ppo.py`
    `loss`); Avoid's GMM log-probs (summed over the chunk) exceed 2, so the clamp is active there."""
    module = gauss if name == "gaussian" else gmm
    seen, raw = [], []
    real_loss, real_lp = module.ppo_loss, module.clamp_logprobs
    monkeypatch.setattr(module, "ppo_loss", lambda new, old, *a: seen.append((new.max().item(), old.max().item()))
                        or real_loss(new, old, *a))
    monkeypatch.setattr(module, "clamp_logprobs", lambda lp: raw.append(lp.max().item()) or real_lp(lp))
    _finetune(module, pretrained[name, "mlp"]["checkpoint"], n_train_itr=1, n_critic_warmup_itr=0, val_freq=0)
    assert seen and len(raw) == 2 * len(seen) and all(n <= 2 and o <= 2 for n, o in seen)
    if name == "gmm":
        assert max(raw) > 2  # the clamp changes the numbers here


@pytest.mark.parametrize("module", [gauss, gmm])
def test_final_action_clip_off_for_robomimic_and_furniture(module):
    for env_id in ("square", "one-leg-low"):
        args = module.Args(env_id=env_id, checkpoint="x.pt")
        module.fill_defaults(args)
        assert args.final_action_clip is False  # no reference config clamps the executed actions
        if env_id == "one-leg-low":
            assert args.lr_cycle_itr == 10000 and args.actor_lr_min == 1e-6
    if module is gauss:  # nor do the reference's scratch configs (cfg/gym/scratch/*/ppo_gaussian_mlp.yaml)
        args = gauss.Args(env_id="InvertedPendulum-v5", from_scratch=True)
        gauss.fill_defaults(args)
        assert args.final_action_clip is False


def test_firsts_carry_the_last_done_across_iterations(tmp_path, monkeypatch):
    """Envs that continue across iterations (gym): the first step's `first` is the previous step's
    done (`firsts_trajs[0] = done_venv` in the reference), 1 only after a reset."""
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)
    calls, dones = [], []
    real_scaler, real_make = gauss.RunningRewardScaler, gauss.make_vec_env

    class Recording(real_scaler):
        def __call__(self, rewards, firsts):
            calls.append(firsts.copy())
            return super().__call__(rewards, firsts)

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        step = envs.step

        def recording_step(action):
            out = step(action)
            dones.append(out[2] | out[3])
            return out
        envs.step = recording_step
        return envs
    monkeypatch.setattr(gauss, "RunningRewardScaler", Recording)
    monkeypatch.setattr(gauss, "make_vec_env", make)
    gauss.main(gauss.Args(env_id="InvertedPendulum-v5", from_scratch=True, n_train_itr=2, num_envs=8, n_steps=16,
                          batch_size=32, val_freq=0, seed=0))
    assert len(calls) == 2 and (calls[0][0] == 1).all()
    np.testing.assert_array_equal(calls[1][0], dones[15].astype(float))  # the done of iteration 0's last step
    assert calls[1][0].any() and not calls[1][0].all()  # a random pendulum falls within a few steps: both cases occur


@pytest.mark.parametrize("name", ["gaussian", "gmm"])
def test_finetune_wiring_of_rewards_gae_and_the_loss(pretrained, monkeypatch, name):
    """What `main` hands to its parts in a 50-chunk-step Avoid iteration (an episode truncated in the middle),
    one minibatch of all env-steps: firsts, the bootstrap observation, γ and λ, the advantages' sign."""
    module = gauss if name == "gaussian" else gmm
    ckpt = torch.load(pretrained[name, "mlp"]["checkpoint"], map_location="cpu", weights_only=True)
    rec = WiringRecorder(module, monkeypatch, ckpt["normalization"])
    losses, real_loss = [], module.ppo_loss
    monkeypatch.setattr(module, "ppo_loss", lambda *a: losses.append(a[2]) or real_loss(*a))
    out = _finetune(module, pretrained[name, "mlp"]["checkpoint"], n_train_itr=1, val_freq=0, n_steps=50, batch_size=400,
                    update_epochs=1, bootstrap_truncated=True, n_critic_warmup_itr=0)
    rec.check_first_iteration(50, 0.99, 0.95, True, seed=0, num_envs=8)
    post = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert any(not torch.equal(post["actor_ft"][k], v) for k, v in post["base"].items())  # no warm-up: the actor steps
    adv, = losses
    torch.testing.assert_close(adv.sort().values, rec.gae[0]["advantages"].flatten().sort().values)


@pytest.mark.parametrize("module", [gauss, gmm])
def test_declares_its_limits(module):
    """Every number of Args is checked (`runs.check_args` in fill_defaults): the ones a run needs positive, non-negative
    or in [0, 1] are declared (as the lists of numbers fill_defaults checked were)."""
    hints = typing.get_type_hints(module.Args, include_extras=True)
    limits = {f.name: next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, runs.Limits)), None)
              for f in dataclasses.fields(module.Args)}
    positive = {"n_train_itr", "num_envs", "n_steps", "n_workers", "act_steps", "batch_size", "update_epochs", "save_every",
                "torch_threads", "eval_n_steps", "actor_lr", "actor_lr_min", "critic_lr", "lr_cycle_itr", "clip_coef",
                "randn_clip_value", "horizon_steps", "cond_steps", "n_emb", "n_heads", "n_layers", "std_init", "std_min",
                "std_max", "n_epochs", "pretrain_batch_size", "learning_rate", "min_lr", "ema_every", "n_eval_envs",
                "pretrain_save_every", "mlp_dims", "max_n_episodes"} | ({"n_modes"} if module is gmm else set())
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == positive
    assert {k for k, v in limits.items() if v is runs.POSITIVE_OR_INF} == {"target_kl", "max_grad_norm"}
    assert {k for k, v in limits.items() if v is runs.FRACTION} == {"gamma", "gae_lambda", "ema_decay"}
    assert {k for k, v in limits.items() if v is runs.NON_NEGATIVE} == {
        "val_freq", "lr_warmup_itr", "n_critic_warmup_itr", "vf_coef", "bc_coef", "warmup_epochs", "weight_decay",
        "ema_start_epoch", "eval_every"}
    assert limits["seed"] is runs.SEED
    with pytest.raises(UsageError, match=r"--clip-coef must be a finite number > 0 \(got inf\)"):
        module.fill_defaults(module.Args(checkpoint="x.pt", clip_coef=math.inf))
    with pytest.raises(UsageError, match=r"--ema-decay must be in \[0.0, 1.0\] \(got 1.5\)"):
        module.fill_defaults(module.Args(pretrain=True, ema_decay=1.5))
    module.fill_defaults(module.Args(checkpoint="x.pt", target_kl=math.inf))  # inf: no limit


@pytest.mark.parametrize("name", ["gaussian", "gmm"])
def test_lr_schedule_actor_steps_only_after_critic_warmup(pretrained, name):
    """Actor LR 1e-3 -> 1e-4 over a 3-iteration cycle with 1 warm-up step, critic warm-up 1 iteration: the actor's
    scheduler does not step in iteration 0 (the script's `step_lr_schedules`, reference `run`), so iterations 0 and 1
    run at min_lr and iteration 2 at the top of the cosine; the critic's LR is constant, bit for bit."""
    module = gauss if name == "gaussian" else gmm
    out = _finetune(module, pretrained[name, "mlp"]["checkpoint"], val_freq=0, update_epochs=1, actor_lr=1e-3,
                    actor_lr_min=1e-4, lr_cycle_itr=3, lr_warmup_itr=1, n_critic_warmup_itr=1)
    assert [x["lr_actor"] for x in out["history"]] == pytest.approx([1e-4, 1e-4, 1e-3], rel=1e-12)
    assert [x["lr_critic"] for x in out["history"]] == [1e-3] * 3


@pytest.mark.parametrize("module", [gauss, gmm])
def test_running_reward_scaler_against_plain_computation(module, monkeypatch):
    """The script's own reward scaler passes dppo_finetune's test against a plain computation (reference order,
    `util/reward_scaling.py`: an iteration's discounted returns update the statistics in one batch, then scale)."""
    from tests import test_dppo_math
    monkeypatch.setattr(test_dppo_math.ft, "RunningRewardScaler", module.RunningRewardScaler)
    test_dppo_math.test_running_reward_scaler_against_plain_computation()


@pytest.mark.parametrize("name", ["gaussian", "gmm"])
def test_every_minibatch_starts_from_zeroed_gradients(pretrained, monkeypatch, name):
    """4 minibatches x 2 epochs: every backward pass lands on zeroed critic gradients (no accumulation across
    minibatches)."""
    module = gauss if name == "gaussian" else gmm
    ckpt = torch.load(pretrained[name, "mlp"]["checkpoint"], map_location="cpu", weights_only=True)
    rec = WiringRecorder(module, monkeypatch, ckpt["normalization"])
    _finetune(module, pretrained[name, "mlp"]["checkpoint"], n_train_itr=1, val_freq=0, batch_size=50, update_epochs=2,
              n_critic_warmup_itr=0, target_kl=None)
    n_params = len(list(rec.critic.parameters()))
    assert len(rec.fresh_grads) == 8 * n_params and all(rec.fresh_grads)
