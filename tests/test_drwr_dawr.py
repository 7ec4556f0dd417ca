"""drwr.py and dawr.py: their losses and targets by hand, reference vectors, smoke runs through `main`, resume."""

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dawr
import dppo_pretrain as pt
import drwr
from common.errors import UsageError
from common.networks import DiffusionMLP, ObsCritic
from tests.helpers import assert_resumed_run_matches, policy_action

REF = Path(__file__).parent / "reference"
SMALL = dict(mlp_dims=(64, 64, 64), batch_size=128, learning_rate=1e-3, min_lr=1e-4, n_eval_envs=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small Avoid M2 diffusion policy (3 epochs) and its run."""
    os.chdir(tmp_path_factory.mktemp("runs"))
    return pt.main(pt.Args(env_id="avoid-m2", n_epochs=3, eval_every=3, seed=0, **SMALL))


# ---- DRWR: samples, return-to-go and weights by hand ----

def test_reward_to_go_keeps_only_finished_episodes_of_two_or_more_steps():
    r = np.arange(1.0, 19.0).reshape(6, 3)  # (n_steps 6, N 3), every reward different
    firsts = np.zeros((7, 3))
    firsts[[0, 3, 6], 0] = 1  # env 0: reset; episodes at steps 0-2 and 3-5 (the second ends at the last step)
    firsts[[2, 5], 1] = 1  # env 1: continues from the last iteration (steps 0-1: its episode began before); 2-4; 5 runs on
    firsts[[0, 1, 4], 2] = 1  # env 2: a one-step episode (step 0, dropped as in the reference), 1-3, then 4-5 unfinished
    steps, envs, R = drwr.reward_to_go(r, firsts, gamma=0.5)
    got = {(int(s), int(e)): float(v) for s, e, v in zip(steps, envs, R)}
    g = 0.5
    expected = {
        (2, 0): r[2, 0], (1, 0): r[1, 0] + g * r[2, 0], (0, 0): r[0, 0] + g * r[1, 0] + g**2 * r[2, 0],
        (5, 0): r[5, 0], (4, 0): r[4, 0] + g * r[5, 0], (3, 0): r[3, 0] + g * r[4, 0] + g**2 * r[5, 0],
        (4, 1): r[4, 1], (3, 1): r[3, 1] + g * r[4, 1], (2, 1): r[2, 1] + g * r[3, 1] + g**2 * r[4, 1],
        (3, 2): r[3, 2], (2, 2): r[2, 2] + g * r[3, 2], (1, 2): r[1, 2] + g * r[2, 2] + g**2 * r[3, 2],
    }
    assert got.keys() == expected.keys() and len(steps) == len(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)
    empty = drwr.reward_to_go(r, np.zeros((7, 3)), 0.5)
    assert all(len(a) == 0 for a in empty)


def test_rwr_weights_standardise_with_the_population_std_and_clip():
    R = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    w = drwr.rwr_weights(R, beta=0.5, max_weight=20.0)
    mean, std = 16.0 / 5, math.sqrt(sum((x - 16.0 / 5) ** 2 for x in R) / 5)  # population std, as numpy's default
    expected = [min(math.exp(0.5 * (x - mean) / (std + 1e-3)), 20.0) for x in R]
    assert w.dtype == torch.float32 and w.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[-1] < 20.0  # not clipped here; with β = 10 it is
    w10 = drwr.rwr_weights(R, beta=10.0, max_weight=100.0)
    assert w10[-1].item() == 100.0 and w10[0].item() == pytest.approx(math.exp(10 * (0 - mean) / (std + 1e-3)), rel=1e-5)


def test_weighted_eps_loss_by_hand():
    """The network returns its input x_t, so ε̂ - ε = √ᾱ_t x0 + (√(1-ᾱ_t) - 1) ε, averaged over (T_a, D_a),
    weighted per sample, averaged over the batch."""
    class Echo(torch.nn.Module):
        def forward(self, x, t, cond):
            return x
    policy = drwr.DiffusionPolicy(Echo(), denoising_steps=20, horizon_steps=2, action_dim=1, min_sampling_std=0.1,
                                  randn_clip=3.0)
    x0 = torch.tensor([[[0.5], [-1.0]], [[0.2], [0.3]]])
    noise = torch.tensor([[[1.0], [2.0]], [[-1.0], [0.0]]])
    t, w = torch.tensor([0, 19]), torch.tensor([2.0, 0.5])
    ac = torch.cumprod(1 - drwr.cosine_beta_schedule(20).float(), 0)
    per = [sum(((ac[t[b]].sqrt() * x0[b, i, 0] + ((1 - ac[t[b]]).sqrt() - 1) * noise[b, i, 0]) ** 2).item()
               for i in range(2)) / 2 for b in range(2)]
    expected = (w[0].item() * per[0] + w[1].item() * per[1]) / 2
    assert policy.weighted_loss(x0, torch.zeros(2, 1, 1), w, t, noise).item() == pytest.approx(expected, rel=1e-6)


# ---- DAWR: TD(λ) targets and weights by hand ----

def test_td_lambda_targets_by_hand_with_termination_truncation_and_cut():
    g, lam, a = 0.9, 0.5, 0.95
    # one env, 4 steps: step 1 truncated (bootstraps from V(s'_1), ends the recursion), step 3 terminated
    r = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    v = torch.tensor([[0.5], [1.5], [-1.0], [2.0]])
    nv = torch.tensor([[1.5], [7.0], [2.0], [9.0]])  # V(s'_t); 7.0 is the truncated episode's final observation's
    cut = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    ends = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    y = dawr.td_lambda_targets(r, v, nv, cut, ends, g, lam, a)
    d = [1 + g * 1.5 - 0.5, 2 + g * 7.0 - 1.5, 3 + g * 2.0 + 1.0, 4 - 2.0]
    G3 = a * d[3]
    G2 = a * d[2] + g * lam * G3
    G1 = a * d[1]
    G0 = a * d[0] + g * lam * G1
    assert y.flatten().tolist() == pytest.approx([0.5 + G0, 1.5 + G1, -1.0 + G2, 2.0 + G3], rel=1e-6)


def test_awr_weights_normalise_per_batch_and_clip():
    adv = torch.tensor([0.0, 0.1, 0.2, 3.0])
    mean = sum(adv.tolist()) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in adv.tolist()) / 3)  # torch's unbiased std, as the reference
    w = dawr.awr_weights(adv, beta=10.0, max_weight=100.0)
    expected = [min(math.exp(10 * (x - mean) / (std + 1e-6)), 100.0) for x in adv.tolist()]
    assert w.tolist() == pytest.approx(expected, rel=1e-5)
    assert w[-1].item() == 100.0 and w[0].item() < 1  # the clip is active
    assert dawr.awr_weights(adv * 7 + 3, 10.0, 100.0).tolist() == pytest.approx(w.tolist(), rel=1e-4)  # scale-free


@pytest.mark.parametrize("module", [drwr, dawr])
def test_sampling_is_dppos_ddpm_sampler_with_every_step_fine_tuned(module):
    """The same chunks, seed for seed, as dppo_finetune.py's DDPM sampler (checked against the reference in
    tests/test_reference_vectors.py) with K' = K, in training (σ floor, ±3 noise clamp) and deterministic mode."""
    import dppo_finetune as ft
    torch.manual_seed(3)
    net = DiffusionMLP(2, 4, 4, 1, mlp_dims=(16, 16, 16))
    ours = module.DiffusionPolicy(net, 20, 4, 2, 0.1, 3.0)
    dppo = ft.DiffusionPPO(net, ObsCritic(4, mlp_dims=(8, 8, 8)), 20, 20, 4, 2, False, 5, 0.1, 0.1, 3.0)
    cond = torch.rand(256, 1, 4) * 2 - 1
    for deterministic in (False, True):
        torch.manual_seed(0)
        a = ours.get_action(cond, deterministic)
        torch.manual_seed(0)
        b, _ = dppo.get_action(cond, deterministic)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- reference vectors (tests/reference/README.md, rwr_awr.npz) ----

def test_losses_weights_and_td_targets_match_the_reference():
    with np.load(REF / "rwr_awr.npz") as f:
        d = {k: f[k] for k in f.files}
    from tests.test_reference_vectors import load_by_order, ref_weights
    net = DiffusionMLP(3, 4, 11, 1, mlp_dims=(32, 32, 32))
    load_by_order(net, ref_weights(d, "actor"))
    critic = ObsCritic(11, 1, mlp_dims=(32, 32, 32))
    load_by_order(critic, ref_weights(d, "critic"))
    x0, obs = torch.from_numpy(d["x0"]), torch.from_numpy(d["obs"])
    for module in (drwr, dawr):
        policy = module.DiffusionPolicy(net, 20, 4, 3, 0.1, 3.0)
        for tag in ("rwr", "awr"):
            loss = policy.weighted_loss(x0, obs, torch.from_numpy(d[f"{tag}.weights"]), torch.from_numpy(d[f"{tag}.t"]),
                                        torch.from_numpy(d[f"{tag}.noise"]))
            assert abs(loss.item() - d[f"{tag}.loss"]) <= 1e-5 * max(1.0, abs(float(d[f"{tag}.loss"])))
    w_rwr = drwr.rwr_weights(d["rwr.returns"], 10.0, 100.0)
    torch.testing.assert_close(w_rwr, torch.from_numpy(d["rwr.weights"]), rtol=1e-5, atol=1e-6)
    w_awr = dawr.awr_weights(torch.from_numpy(d["awr.adv"]), 10.0, 100.0)
    torch.testing.assert_close(w_awr, torch.from_numpy(d["awr.weights"]), rtol=1e-5, atol=1e-6)
    assert (w_rwr == 100).any() and (w_awr == 100).any()  # the clip acts in both cases
    with torch.no_grad():
        values, targets = critic(obs), torch.from_numpy(d["awr.critic_targets"])
    torch.testing.assert_close(values, torch.from_numpy(d["awr.values"]).squeeze(-1), rtol=0, atol=1e-5)
    # the reference's `AWRDiffusion.loss_critic` subtracts (B,) targets from (B, 1) values: the mean over all B²
    # (value, target) pairs (docs/deviations.md); dawr.main regresses each value on its own target
    all_pairs = ((values[:, None] - targets[None, :]) ** 2).mean()
    assert abs(all_pairs.item() - d["awr.critic_loss"]) <= 1e-5
    assert abs(((values - targets) ** 2).mean().item() - d["awr.critic_loss"]) > 0.1
    # the reference's td_values equals ours when its conventions are passed in: next value V(s_{t+1}) (the last
    # step: its own V(s_t)), bootstrap and recursion both cut only at terminations
    v, term = torch.from_numpy(d["td.values"]), torch.from_numpy(d["td.terminated"]).float()
    nv = torch.cat([v[1:], v[-1:]])
    y = dawr.td_lambda_targets(torch.from_numpy(d["td.rewards"]), v, nv, term, term, 0.99, 0.95, 0.95)
    torch.testing.assert_close(y, torch.from_numpy(d["td.targets"]), rtol=0, atol=1e-5)


# ---- the scripts through main ----

TINY = dict(env_id="avoid-m2", n_train_itr=2, num_envs=4, n_steps=25, batch_size=40, val_freq=1, seed=0, plot=False)


def _rows(out):
    with open(os.path.join(out["run_dir"], "eval.csv")) as f:
        return list(csv.DictReader(f))


def _moved(out, pretrained, key="actor"):
    post = torch.load(out["checkpoint"], weights_only=True)
    pre = torch.load(pretrained["checkpoint"], weights_only=True)["ema"]
    return post, any(not torch.equal(post[key][k], v) for k, v in pre.items())


def test_drwr_smoke(pretrained):
    out = drwr.main(drwr.Args(checkpoint=pretrained["checkpoint"], update_epochs=2, **TINY))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["loss"]) for x in h)
    assert all(x["n_samples"] == 100 and x["n_episodes"] == 4 for x in h)  # one 25-chunk-step episode per env
    assert all(x["time_sampling"] > 0 and x["time_update"] > 0 for x in h)
    assert [int(r["iteration"]) for r in _rows(out)] == [0, 1, 2]
    post, moved = _moved(out, pretrained)
    assert moved and post["itr"] == 2 and post["method"] == "drwr"
    again = drwr.main(drwr.Args(checkpoint=out["checkpoint"], eval_only=True, env_id="avoid-m2", num_envs=4))
    assert set(again["eval"]) == {"deterministic", "stochastic"}  # the saved actor reloads


def test_dawr_smoke(pretrained):
    out = dawr.main(dawr.Args(checkpoint=pretrained["checkpoint"], replay_ratio=4, buffer_size=40, **TINY))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["actor_loss"]) and np.isfinite(x["critic_loss"]) for x in h)
    assert [x["buffer_steps"] for x in h] == [25, 40]  # FIFO: 25 vector steps, then the last 40 of 50
    assert all(x["n_episodes"] == 4 for x in h)  # one 25-chunk-step episode per env, each counted where it ends
    assert all(x["time_critic"] > 0 and x["time_actor"] > 0 for x in h)
    assert [int(r["iteration"]) for r in _rows(out)] == [0, 1, 2]
    post, moved = _moved(out, pretrained)
    assert moved and post["method"] == "dawr" and post["buffer_ptr"] == 10 and post["buffer_count"] == 40
    end = post["buffer"]["end"]  # rows 0-24: iteration 0 (24 = its episodes' last step), 25-39 then 0-9: iteration 1
    assert post["buffer"]["obs"].shape == (40, 4, 1, 4) and end[24].all() and end[9].all() and end.sum() == 8


def test_drwr_resume_matches_uninterrupted(pretrained):
    kw = dict(TINY, checkpoint=pretrained["checkpoint"], update_epochs=2)
    full = drwr.main(drwr.Args(**{**kw, "n_train_itr": 3, "exp_name": "full"}))
    part = drwr.main(drwr.Args(**{**kw, "exp_name": "part"}))
    resumed = drwr.main(drwr.Args(resume=part["run_dir"], n_train_itr=3))
    assert_resumed_run_matches(full, resumed, n_eval_rows=4, key="actor")
    with pytest.raises(UsageError, match="is a run of drwr.py, not of dawr.py; resume it with drwr.py"):
        dawr.main(dawr.Args(resume=part["run_dir"], n_train_itr=3))


def test_dawr_resume_matches_uninterrupted(pretrained):
    kw = dict(TINY, checkpoint=pretrained["checkpoint"], replay_ratio=2, buffer_size=30)
    full = dawr.main(dawr.Args(**{**kw, "n_train_itr": 3, "exp_name": "full"}))
    part = dawr.main(dawr.Args(**{**kw, "exp_name": "part"}))
    resumed = dawr.main(dawr.Args(resume=part["run_dir"], n_train_itr=3))
    assert_resumed_run_matches(full, resumed, n_eval_rows=4, key="actor")
    assert_resumed_run_matches(full, resumed, n_eval_rows=4, key="critic")
    with pytest.raises(UsageError, match="is a run of dawr.py, not of drwr.py; resume it with dawr.py"):
        drwr.main(drwr.Args(resume=part["run_dir"], n_train_itr=3))


@pytest.mark.parametrize("module", [drwr, dawr])
def test_furniture_and_bad_numbers_are_refused(module):
    with pytest.raises(UsageError, match="no .* config for furniture"):
        module.fill_defaults(module.Args(env_id="one-leg-low"))
    with pytest.raises(UsageError, match="beta"):
        module.fill_defaults(module.Args(beta=-1.0))
    defaults = module.Args(env_id="hopper")
    module.fill_defaults(defaults)
    assert (defaults.n_train_itr, defaults.num_envs, defaults.n_steps, defaults.actor_lr) == (1000, 40, 500, 1e-4)
    square = module.Args(env_id="square")
    module.fill_defaults(square)
    assert (square.n_train_itr, square.num_envs, square.n_steps, square.actor_lr) == (201, 50, 400, 1e-5)


@pytest.mark.parametrize("bootstrap_truncated", [False, True])
def test_dawr_wiring_of_the_fifo_buffer_into_the_td_targets(pretrained, monkeypatch, bootstrap_truncated):
    """T_e = 2: 50-chunk-step Avoid episodes truncated inside 60-chunk-step iterations; a 100-step buffer that
    wraps in iteration 1. The TD(λ) call sees the last 100 vector steps in time order: scaled rewards, V(s),
    V(true final observation), the bootstrap cut (done, or terminated with --bootstrap-truncated), and the
    recursion cut at episode ends and before each iteration's reset; it gets γ, λ and α as set. The critic regresses
    each sampled row on that row's target; the actor's weights get β, w_max and, for each sampled row, the TD(λ)
    target minus V(s), both from the critic after its update."""
    from common.normalizer import Normalizer
    steps, calls, critics = [], [], []
    real_make, real_td, real_critic = dawr.make_vec_env, dawr.td_lambda_targets, dawr.ObsCritic

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        step = envs.step

        def recording_step(action):
            out = step(action)
            steps.append(dict(reward=out[1].copy(), term=out[2].copy(), done=out[2] | out[3],
                              obs=np.array(out[4]["final_obs"])))
            return out
        envs.step = recording_step
        return envs

    fits = []  # (V(s) of a critic batch, d loss / d V(s)): the regression target is V - dL/dV · B / 2

    class Critic(real_critic):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            critics.append(self)

        def forward(self, obs):
            v = super().forward(obs)
            if torch.is_grad_enabled():
                v.register_hook(lambda g, v=v.detach(): fits.append((v, g)))
            return v

    def td(rewards, values, next_values, cut, ends, *a):
        out = real_td(rewards, values, next_values, cut, ends, *a)
        calls.append(dict(rewards=rewards, values=values, next_values=next_values, cut=cut, ends=ends, n_steps=len(steps),
                          params=[p.clone() for p in critics[0].parameters()], hyper=a, targets=out, adv=out - values))
        return out
    awr, real_awr = [], dawr.awr_weights
    for name, f in (("make_vec_env", make), ("td_lambda_targets", td), ("ObsCritic", Critic),
                    ("awr_weights", lambda adv, beta, w_max: awr.append((adv, beta, w_max)) or real_awr(adv, beta, w_max))):
        monkeypatch.setattr(dawr, name, f)
    highs, drawn, real_randint = [], [], torch.randint

    def randint(*a, **kw):
        out = real_randint(*a, **kw)
        if len(a) == 2:  # randint(high, size): the buffer samples of the critic's and the actor's batches
            highs.append(a[0])
            drawn.append(out)
        return out
    monkeypatch.setattr(torch, "randint", randint)
    dawr.main(dawr.Args(**{**TINY, "num_envs": 2, "n_steps": 60, "act_steps": 2, "buffer_size": 100, "replay_ratio": 4,
                           "val_freq": 0, "checkpoint": pretrained["checkpoint"], "bootstrap_truncated": bootstrap_truncated,
                           "gamma": 0.97, "td_lambda": 0.9, "td_alpha": 0.8, "beta": 5.0, "max_weight": 50.0,
                           "exp_name": f"wiring{bootstrap_truncated}"}))
    assert len(calls) == 4 and calls[2]["n_steps"] == 120  # two per iteration (before and after the critic's steps)
    # int(60·2 / 40 · 4) = 12 actor and 12 // 4 = 3 critic steps per iteration, each drawn over all (step, env) rows
    assert highs == [60 * 2] * 15 + [100 * 2] * 15
    assert all(c["hyper"] == (0.97, 0.9, 0.8) for c in calls)
    # iteration 0's 3 critic steps (buffer rows 0-59 in time order): each sampled row's target from the first call
    assert len(fits) == 6
    for (v, g), idx in zip(fits[:3], drawn[:3]):
        torch.testing.assert_close(v - g * len(idx) / 2, calls[0]["targets"].flatten()[idx], atol=1e-5, rtol=1e-5)
    # the 12 actor steps of each iteration: advantages from the call after the critic's steps, β and w_max as set
    assert len(awr) == 24 and all((b, w) == (5.0, 50.0) for _, b, w in awr)
    for k, (adv, _, _) in enumerate(awr):
        assert torch.isin(adv, calls[2 * (k // 12) + 1]["adv"]).all()
    assert not torch.isin(awr[0][0], calls[0]["adv"]).any()  # (the critic's steps changed every advantage)
    c = calls[2]  # iteration 1, before the critic's update: rows of env steps 20 .. 119 in time order
    window = steps[20:120]
    norm = Normalizer.from_state_dict(torch.load(pretrained["checkpoint"], weights_only=True)["normalization"])
    done = torch.tensor(np.stack([s["done"] for s in window]), dtype=torch.float32)
    assert done[[29, 89]].all() and done.sum() == 4  # the episodes end at chunk-step 49 of each iteration
    ends = done.clone()
    ends[39] = 1  # the last step of iteration 0: iteration 1 resets the envs
    torch.testing.assert_close(c["ends"], ends)
    term = torch.tensor(np.stack([s["term"] for s in window]), dtype=torch.float32)
    torch.testing.assert_close(c["cut"], term if bootstrap_truncated else done)
    torch.testing.assert_close(c["rewards"], 0.01 * torch.tensor(np.stack([s["reward"] for s in window])))
    critic = real_critic(4, 1, mlp_dims=(256,) * 3)
    with torch.no_grad():
        for p, q in zip(critic.parameters(), c["params"]):
            p.copy_(q)
        final = norm.normalize_obs(torch.as_tensor(np.stack([s["obs"] for s in window]), dtype=torch.float32))
        torch.testing.assert_close(c["next_values"], critic(final.flatten(0, 1)).view(100, 2))
    assert not torch.allclose(c["values"][29], c["next_values"][29])  # V(s) and V(s') differ at an episode end


def test_drwr_wiring_of_returns_weights_and_samples(pretrained, monkeypatch):
    """T_e = 2: each env's 50-chunk-step episode ends inside a 60-chunk-step iteration, the next one is cut off.
    The weights get the unscaled discounted return-to-go of exactly the finished episodes' chunk-steps, and the
    loss sees those chunk-steps' observations and sampled chunks (whose first T_e actions the env executed), each
    with its own weight in both batches of 50."""
    from common.normalizer import Normalizer
    steps, weights_in, loss_in = [], [], []
    real_make, real_weights, real_loss = drwr.make_vec_env, drwr.rwr_weights, drwr.DiffusionPolicy.loss

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        step = envs.step

        def recording_step(action):
            out = step(action)
            steps.append(dict(action=np.array(action), reward=out[1].copy(), done=out[2] | out[3]))
            return out
        envs.step = recording_step
        return envs

    def rwr_weights(returns, beta, max_weight):
        out = real_weights(returns, beta, max_weight)
        weights_in.append((returns.copy(), beta, max_weight, out))
        return out

    def loss(self, x0, cond, weights):
        loss_in.append((x0.clone(), weights.clone()))
        return real_loss(self, x0, cond, weights)
    monkeypatch.setattr(drwr, "make_vec_env", make)
    monkeypatch.setattr(drwr, "rwr_weights", rwr_weights)
    monkeypatch.setattr(drwr.DiffusionPolicy, "loss", loss)
    out = drwr.main(drwr.Args(**{**TINY, "num_envs": 2, "n_steps": 60, "act_steps": 2, "n_train_itr": 1, "val_freq": 0,
                                 "batch_size": 50, "update_epochs": 1, "gamma": 0.9,
                                 "checkpoint": pretrained["checkpoint"], "exp_name": "wiring"}))
    done = np.stack([s["done"] for s in steps[:60]])
    assert done[49].all() and done.sum() == 2
    rewards = np.stack([s["reward"] for s in steps[:60]]).astype(np.float64)
    expected = []
    for env in range(2):  # return-to-go of steps 0..49, env by env (the reference's order)
        ret, rtg = 0.0, []
        for t in range(49, -1, -1):
            ret = rewards[t, env] + 0.9 * ret
            rtg.append(ret)
        expected += rtg[::-1]
    (returns, beta, max_weight, w), = weights_in
    np.testing.assert_allclose(returns, expected, rtol=1e-12)
    assert (beta, max_weight) == (10.0, 100.0) and out["history"][0]["n_samples"] == 100
    assert len(loss_in) == 2  # two batches of 50 cover the 100 samples
    x0, w_loss = (torch.cat(x) for x in zip(*loss_in))
    assert torch.equal(w_loss.sort().values, w.sort().values)
    norm = Normalizer.from_state_dict(torch.load(pretrained["checkpoint"], weights_only=True)["normalization"])
    executed = policy_action(norm, torch.as_tensor(np.stack([s["action"] for s in steps[:50]]), dtype=torch.float32))
    sampled = executed.transpose(0, 1).flatten(0, 1)  # (env, step) order, as the samples
    order = [int(torch.argmin((x0[:, :2] - a).abs().flatten(1).sum(1))) for a in sampled]
    assert sorted(order) == list(range(100))  # every finished chunk-step's chunk is in the batch once
    torch.testing.assert_close(x0[order, :2], sampled, atol=1e-5, rtol=1e-5)
    assert torch.equal(w_loss[order], w)  # each with its own weight


def test_drwr_episodes_carried_across_iterations_start_where_they_started(pretrained, monkeypatch):
    """Envs that continue across iterations (as gym locomotion's; Avoid made to here), T_e = 2: 50-chunk-step
    episodes in 60-chunk-step iterations. Iteration 0 holds one whole episode per env (steps 0-49); iteration 1
    holds the end of the episode that started in iteration 0 (steps 60-99) and the start of the next (100-119): no
    episode both starts and ends in it, so it has no samples and makes no update."""
    import dataclasses
    real_task = drwr.get_task
    monkeypatch.setattr(drwr, "get_task", lambda env_id: dataclasses.replace(real_task(env_id), reset_every_iteration=False))
    resets, real_make = [], drwr.make_vec_env

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        reset = envs.reset
        envs.reset = lambda seed=None: resets.append(seed) or reset(seed=seed)
        return envs
    monkeypatch.setattr(drwr, "make_vec_env", make)
    out = drwr.main(drwr.Args(**{**TINY, "num_envs": 2, "n_steps": 60, "act_steps": 2, "n_train_itr": 2, "val_freq": 0,
                                 "batch_size": 1000, "update_epochs": 1, "checkpoint": pretrained["checkpoint"],
                                 "exp_name": "carried"}))
    h = out["history"]
    assert resets.count(0) == 1 and 2 not in resets  # one training reset (seed 0): iteration 1 continues the episodes
    assert [x["n_samples"] for x in h] == [100, 0] and "loss" in h[0] and "loss" not in h[1]


@pytest.mark.parametrize("module", [drwr, dawr])
def test_lr_schedules_step_on_evaluation_iterations_too(module, tmp_path, monkeypatch):
    """Hopper (evaluated deterministically): iteration 0 is an evaluation, iteration 1 trains. The actor's cosine
    schedule (warm-up 0, cycle 4) stepped once at iteration 0, as the reference's, so iteration 1's update runs at
    step 1 of it, not at step 0 (lr_min)."""
    from benchmarks.finetune_iteration import random_checkpoint
    monkeypatch.chdir(tmp_path)
    random_checkpoint("hopper", str(tmp_path / "hopper.pt"))
    extra = dict(buffer_size=40) if module is dawr else {}
    out = module.main(module.Args(env_id="hopper", checkpoint=str(tmp_path / "hopper.pt"), n_train_itr=2, val_freq=2,
                                  num_envs=2, n_steps=3, batch_size=6, eval_n_steps=1, env_backend="gymnasium", seed=0,
                                  actor_lr=1e-4, actor_lr_min=1e-5, lr_warmup_itr=0, lr_cycle_itr=4, **extra))
    (row,) = out["history"]
    assert row["iteration"] == 1
    assert row["lr_actor"] == pytest.approx(1e-5 + (1e-4 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-9)
