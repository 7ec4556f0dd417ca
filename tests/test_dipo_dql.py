"""dipo.py and dql.py: losses and targets by hand, reference vectors, smoke runs, wiring and resume."""

import csv
import dataclasses
import math
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dipo
import dppo_pretrain as pt
import dql
from common import runs
from common.errors import UsageError
from common.networks import DiffusionMLP, DoubleQCritic
from common.normalizer import Normalizer
from tests.helpers import assert_resumed_run_matches, policy_action

REF = Path(__file__).parent / "reference"
SMALL = dict(mlp_dims=(64, 64, 64), batch_size=128, learning_rate=1e-3, min_lr=1e-4, n_eval_envs=8)
# tiny runs: 8 envs x 25 chunk-steps = 200 transitions per iteration, 200 / 50 x 2 = 8 updates, actor from iteration 1
TINY = dict(env_id="avoid-m2", num_envs=8, n_steps=25, batch_size=50, replay_ratio=2, n_critic_warmup_itr=1,
            val_freq=1, seed=0, plot=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small Avoid M2 diffusion policy (3 epochs) and its run."""
    os.chdir(tmp_path_factory.mktemp("runs"))
    return pt.main(pt.Args(env_id="avoid-m2", n_epochs=3, eval_every=0, seed=0, **SMALL))


def _load(out: dict) -> dict:
    return torch.load(out["checkpoint"], map_location="cpu", weights_only=True)


def _rows(out: dict) -> list[dict]:
    with open(os.path.join(out["run_dir"], "eval.csv")) as f:
        return list(csv.DictReader(f))


# ---- losses and targets against hand computations ----

class FixedQ(nn.Module):
    """A 'critic' that returns given Q values (and a gradient path through a scale parameter)."""

    def __init__(self, q1, q2):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.q1, self.q2 = torch.tensor(q1), torch.tensor(q2)

    def forward(self, obs, action):
        return self.w * self.q1, self.w * self.q2


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_td_target_terminal_vs_truncated(module):
    """y = r + γ(1 - cut)·min(Q̄1, Q̄2)(s', a'); loss = mean(Q1 - y)² + mean(Q2 - y)². Row 1 is terminal (cut 1);
    row 2 is a truncated transition (stored with cut 0, so it bootstraps from its final observation)."""
    critic, target = FixedQ([1.0, 0.0, 4.0], [2.0, -1.0, 5.0]), FixedQ([1.0, 2.0, 3.0], [0.5, 1.0, 5.0])
    r, cut, gamma = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0, 0.0]), 0.9
    loss = module.critic_loss(critic, target, None, None, r, None, None, cut, gamma)
    y = [0.5 + 0.9 * 0.5, -1.0, 2.0 + 0.9 * 3.0]
    expected = (sum((q - t) ** 2 for q, t in zip([1.0, 0.0, 4.0], y))
                + sum((q - t) ** 2 for q, t in zip([2.0, -1.0, 5.0], y))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert critic.w.grad is not None and target.w.grad is None  # the target network gets no gradient


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_ema_update(module):
    target, source = nn.Linear(2, 1), nn.Linear(2, 1)
    for p, q in zip(target.parameters(), source.parameters()):
        nn.init.constant_(p, 1.0), nn.init.constant_(q, 3.0)
    module.ema_update(target, source, 0.25)
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in target.parameters())  # 0.75·1 + 0.25·3
    assert all(torch.equal(q, torch.full_like(q, 3.0)) for q in source.parameters())


def test_dql_q_loss_normalisation():
    """-mean Q1 / mean|Q2| (or the swap), the normaliser detached."""
    q1 = torch.tensor([1.0, -3.0], requires_grad=True)
    q2 = torch.tensor([2.0, -4.0], requires_grad=True)
    a = dql.q_loss(q1, q2, torch.tensor(True))
    assert a.item() == pytest.approx(-(-1.0) / 3.0)
    a.backward()
    assert torch.equal(q2.grad, torch.zeros(2)) and torch.allclose(q1.grad, torch.full((2,), -1 / 6))
    b = dql.q_loss(q1.detach(), q2.detach(), torch.tensor(False))
    assert b.item() == pytest.approx(-(-1.0) / 2.0)


class QuadraticQ(nn.Module):
    """Q1 = -Σ(a - c1)², Q2 = -Σ(a - c2)² + k: with k = (+10, -10) the min is Q1 in row 0 and Q2 in row 1."""

    def __init__(self, c1, c2, k):
        super().__init__()
        self.c1, self.c2, self.k = torch.tensor(c1), torch.tensor(c2), torch.tensor(k)

    def forward(self, obs, a):
        return -((a - self.c1) ** 2).sum(1), -((a - self.c2) ** 2).sum(1) + self.k


@pytest.mark.parametrize("max_norm", [100.0, 1e-6])
def test_dipo_action_gradient_on_a_quadratic_q(max_norm):
    """Two Adam steps (β 0.9/0.999, eps 1e-5) on -Σ_b min(Q1, Q2) with the whole batch's gradient norm capped,
    then a clamp to [-1, 1], by hand; with the tiny cap the steps are ~lr·g/eps, far from Adam's ~lr."""
    critic = QuadraticQ([2.0, 0.0], [0.0, -0.5], [10.0, -10.0])
    a0 = torch.tensor([[[0.9, 0.1]], [[0.2, 0.3]]])  # (B=2, T_e=1, D_a=2)
    lr = 0.3
    got = dipo.action_gradient(critic, None, a0, lr, 2, max_norm)
    a, m, v = a0.view(2, 2).clone(), torch.zeros(2, 2), torch.zeros(2, 2)
    clipped = []
    for step in (1, 2):
        g = torch.stack([2 * (a[0] - critic.c1), 2 * (a[1] - critic.c2)])  # d(-min Q)/da per row
        coef = min(1.0, max_norm / (g.norm().item() + 1e-6))
        clipped.append(coef < 1)
        g = g * coef
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        a = (a - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-5)).clamp(-1, 1)
    torch.testing.assert_close(got, a.view(2, 1, 2), rtol=1e-5, atol=1e-6)
    if max_norm > 1:
        assert not any(clipped) and got[0, 0, 0] == 1.0  # row 0 ran into the clamp
    else:
        assert all(clipped) and (got - a0).abs().max() < 0.1
    assert got.abs().max() <= 1


def test_hopper_buffer_fits_in_memory():
    """1e6 Hopper transitions (obs 11, T_a = T_e = 4, D_a = 3): obs, next obs, chunk, reward, cut in float32."""
    mb = dipo.ReplayBuffer(1_000_000, 1, 11, 4, 3, torch.device("meta")).megabytes()
    assert mb == pytest.approx((11 + 11 + 12 + 2) * 4 * 1e6 / 2**20) and mb < 150
    print(f"Hopper replay buffer of 1e6 transitions: {mb:.1f} MB")


def test_defaults_follow_the_reference_configs():
    a = dipo.Args(env_id="hopper")
    dipo.fill_defaults(a)
    assert (a.replay_ratio, a.batch_size, a.buffer_size, a.n_critic_warmup_itr, a.reward_scale, a.actor_lr) == \
        (64, 1000, 1_000_000, 5, 0.01, 1e-4)
    assert int(a.n_steps * a.num_envs / a.batch_size * a.replay_ratio) == 1280 and a.bootstrap_truncated
    a = dql.Args(env_id="hopper")
    dql.fill_defaults(a)
    assert (a.replay_ratio, a.eta, a.target_ema_rate, a.n_critic_warmup_itr) == (16, 1.0, 0.005, 5)
    for module, task, expected in ((dipo, "can", (300, 2, 300, 1e-5, 1.0)), (dipo, "lift", (300, 5, 300, 1e-5, 1.0)),
                                   (dql, "lift", (81, 5, 300, 1e-5, 1.0)), (dql, "transport", (201, 5, 400, 1e-5, 1.0))):
        a = module.Args(env_id=task)
        module.fill_defaults(a)
        assert (a.n_train_itr, a.n_critic_warmup_itr, a.n_steps, a.actor_lr, a.reward_scale) == expected
    a = dipo.Args()
    dipo.fill_defaults(a)
    assert (a.n_train_itr, a.num_envs, a.n_steps, a.bootstrap_truncated, a.replay_ratio) == (51, 50, 25, False, 64)
    for module in (dipo, dql):
        with pytest.raises(UsageError, match="no furniture setup"):
            module.fill_defaults(module.Args(env_id="one-leg-low"))


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_every_number_has_its_declared_limits(module):
    """Every number of Args is checked (runs.check_args): a flag without declared Limits may be any finite number, so
    the ones a run needs positive, non-negative or in [0, 1] are declared (as fill_defaults' lists were); τ is in
    (0, 1]."""
    hints = typing.get_type_hints(module.Args, include_extras=True)
    limits = {f.name: next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, runs.Limits)), None)
              for f in dataclasses.fields(module.Args)}
    positive = {"n_train_itr", "num_envs", "n_steps", "n_workers", "horizon_steps", "act_steps", "save_every",
                "torch_threads", "eval_n_steps", "actor_lr", "actor_lr_min", "critic_lr", "lr_cycle_itr", "buffer_size",
                "batch_size", "replay_ratio", "min_sampling_denoising_std", "randn_clip_value", "reward_scale"}
    if module is dipo:
        positive |= {"action_lr", "action_gradient_steps", "action_grad_norm_coef"}
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == positive
    assert {k for k, v in limits.items() if v is runs.POSITIVE_OR_INF} == {"max_grad_norm"}
    assert {k for k, v in limits.items() if v is runs.FRACTION} == {"gamma"}
    assert {k for k, v in limits.items() if v is runs.NON_NEGATIVE} == \
        {"val_freq", "lr_warmup_itr", "n_critic_warmup_itr"} | ({"eta"} if module is dql else set())
    assert limits["seed"] is runs.SEED and limits["target_ema_rate"] is runs.RATE
    for tau in (0.0, 1.5, math.nan):
        with pytest.raises(UsageError, match=rf"--target-ema-rate must be in \(0.0, 1.0\] \(got {tau}\)"):
            module.fill_defaults(module.Args(target_ema_rate=tau))
    module.fill_defaults(module.Args(target_ema_rate=1.0, max_grad_norm=math.inf))  # τ = 1 copies; inf: no clip


# ---- reference vectors (irom-princeton/dppo DIPODiffusion / DQLDiffusion; tests/reference/README.md) ----

def _ref() -> dict:
    with np.load(REF / "dipo_dql.npz") as f:
        return {k: f[k] if f[k].dtype.kind == "U" else torch.from_numpy(f[k]) for k in f.files}


def _weights(module: nn.Module, d: dict, prefix: str) -> nn.Module:
    sd = module.state_dict()
    names = d[f"{prefix}.names"]
    assert len(sd) == len(names)
    module.load_state_dict({k: d[f"{prefix}.{i:03d}"].view_as(v) for i, (k, v) in enumerate(sd.items())})
    return module


def _nets(d: dict, method: str):
    net = lambda: DiffusionMLP(3, 4, 11, 1, time_dim=16, mlp_dims=(16, 16, 16), activation="relu")  # noqa: E731
    critic = lambda: DoubleQCritic(11, 3, 4, 1, mlp_dims=(16, 16, 16), residual=False)  # noqa: E731
    return (_weights(net(), d, "base.actor"), _weights(net(), d, f"{method}.actor"),
            _weights(critic(), d, "base.critic"), _weights(critic(), d, f"{method}.critic"))


def test_dipo_matches_the_reference():
    d = _ref()
    target_actor, actor, target_critic, critic = _nets(d, "dipo")
    agent = dipo.DiffusionDIPO(actor, critic, dipo.Diffusion(20, 4, 3, 0.1, 3.0))
    _weights(agent.actor_target, d, "base.actor"), _weights(agent.critic_target, d, "base.critic")
    obs, next_obs = d["obs"], d["next_obs"]
    torch.manual_seed(2)
    next_action = agent.get_action(next_obs)  # the EMA target actor samples the TD action
    torch.testing.assert_close(next_action, d["dipo.next_actions"], atol=1e-5, rtol=0)
    loss = dipo.critic_loss(agent.critic, agent.critic_target, obs, d["actions"], d["rewards"], next_obs, next_action,
                            d["terminated"], float(d["gamma"]))
    assert abs(loss.item() - d["dipo.critic_loss"].item()) < 1e-5
    for tag in ("ag_a", "ag_b", "ag_c"):
        got = dipo.action_gradient(agent.critic, obs, d["dipo.ag_actions"], float(d[f"dipo.{tag}.lr"]), 10,
                                   float(d[f"dipo.{tag}.max_norm"]))
        torch.testing.assert_close(got, d[f"dipo.{tag}.out"], atol=1e-5, rtol=0)
    torch.manual_seed(3)
    loss = agent.diffusion.eps_loss(agent.actor, d["dipo.ag_b.out"], obs)
    assert abs(loss.item() - d["dipo.actor_loss"].item()) < 1e-5


def test_dql_matches_the_reference():
    d = _ref()
    _, actor, target_critic, critic = _nets(d, "dql")
    agent = dql.DiffusionDQL(actor, critic, dql.Diffusion(20, 4, 3, 0.1, 3.0))
    _weights(agent.critic_target, d, "base.critic")
    obs, next_obs = d["obs"], d["next_obs"]
    torch.manual_seed(4)
    next_action = agent.get_action(next_obs)  # the current actor samples the TD action
    loss = dql.critic_loss(agent.critic, agent.critic_target, obs, d["actions"], d["rewards"], next_obs, next_action,
                           d["terminated"], float(d["gamma"]))
    assert abs(loss.item() - d["dql.critic_loss"].item()) < 1e-5
    torch.manual_seed(5)  # replay our draws to know the coin: sample (1 + K), ε-MSE t and ε, then the coin
    for _ in range(21):
        torch.randn(16, 4, 3)
    torch.randint(0, 20, (16,)), torch.randn(16, 4, 3)
    use_q1 = bool(torch.rand(()) > 0.5)
    torch.manual_seed(5)
    loss, bc, ql = dql.actor_loss(agent, obs, 1.0, 4)
    ref = d["dql.actor_loss_q1" if use_q1 else "dql.actor_loss_q2"].item()
    other = d["dql.actor_loss_q2" if use_q1 else "dql.actor_loss_q1"].item()
    assert abs(loss.item() - ref) < 1e-5 and abs(ref - other) > 0.1
    assert not use_q1  # the branch whose gradients were stored
    loss.backward()  # the gradient through all K denoising steps, the critic and the ε-MSE of the own sample
    for i, p in enumerate(agent.actor.parameters()):
        torch.testing.assert_close(p.grad, d[f"dql.actor_loss_q2_grad.{i:03d}"].view_as(p), atol=1e-5, rtol=1e-4)


# ---- smoke runs, wiring, resume ----

def _run(module, ckpt, **kw):
    return module.main(module.Args(**{**TINY, "checkpoint": ckpt, **kw}))


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_smoke_two_iterations(pretrained, module):
    out = _run(module, pretrained["checkpoint"], n_train_itr=2, buffer_size=300, exp_name=f"smoke_{module.__name__}")
    h = out["history"]
    assert len(h) == 2 and all(math.isfinite(x["critic_loss"]) for x in h)
    assert "actor_loss" not in h[0] and math.isfinite(h[1]["actor_loss"])  # the actor learns after the warm-up
    assert all(k in h[1] for k in ("time_sampling", "time_env", "time_update", "env_steps", "return_mean"))
    assert [int(r["iteration"]) for r in _rows(out)] == [0, 1, 2]
    post, pre = _load(out), torch.load(pretrained["checkpoint"], weights_only=True)
    assert post["method"] == module.__name__ and post["itr"] == 2
    assert post["buffer"]["reward"].shape[0] == 300 and post["buffer"]["ptr"] == 100  # the ring wrapped (400 > 300)
    assert any(not torch.equal(post["actor"][k], v) for k, v in pre["ema"].items())  # the acting network moved
    if module is dipo:
        assert any(not torch.equal(post["actor"][k], v) for k, v in post["actor_online"].items())  # EMA lags
    ev = module.main(module.Args(checkpoint=out["checkpoint"], eval_only=True, num_envs=8, seed=0))
    assert ev["eval"]["stochastic"]["n_episodes"] == 8  # the saved checkpoint reloads as a policy


@pytest.mark.parametrize("bootstrap_truncated", [False, True])
def test_dipo_buffer_wiring(pretrained, monkeypatch, bootstrap_truncated):
    """One iteration into a large buffer: s' = the normalised final observation, r × 0.01, cut = the time limit
    only without the truncation bootstrap; the actor step writes improved executed actions (within [-1, 1]) back."""
    steps = []
    real = dipo.make_vec_env

    def make(*a, **kw):
        envs = real(*a, **kw)
        step = envs.step

        def recording_step(action):
            out = step(action)
            steps.append((np.array(action), out[1].copy(), out[2].copy(), out[3].copy(), out[4]["final_obs"].copy()))
            return out
        envs.step = recording_step
        return envs
    monkeypatch.setattr(dipo, "make_vec_env", make)
    out = _run(dipo, pretrained["checkpoint"], n_train_itr=1, n_critic_warmup_itr=0, val_freq=0,
               bootstrap_truncated=bootstrap_truncated, buffer_size=1000, exp_name=f"wiring{bootstrap_truncated}")
    buf = _load(out)["buffer"]
    norm = Normalizer.from_state_dict(_load(out)["normalization"])
    n = 25 * 8
    action, reward, term, trunc, final = (np.concatenate(x) for x in zip(*steps[:25]))
    assert trunc.sum() == 8 and not term.any()  # every episode hits the 100-step limit at chunk-step 25
    torch.testing.assert_close(buf["next_obs"], norm.normalize_obs(torch.as_tensor(final, dtype=torch.float32)))
    torch.testing.assert_close(buf["reward"], torch.as_tensor(reward * 0.01, dtype=torch.float32))
    assert torch.equal(buf["cut"], torch.as_tensor(trunc if not bootstrap_truncated else term, dtype=torch.float32))
    executed = policy_action(norm, torch.as_tensor(action, dtype=torch.float32))
    moved = (buf["action"] - executed).abs().amax(dim=(1, 2)) > 1e-4
    assert buf["reward"].shape[0] == n and 0 < moved.sum() < n and buf["action"][moved].abs().max() <= 1


def test_dipo_resume_is_bit_identical(pretrained):
    """Stopped after 2 of 3 iterations and resumed: the same eval.csv and the same actor, target actor, critics
    and replay buffer (the ring wraps in iteration 1) as an uninterrupted run."""
    kw = dict(buffer_size=300)
    full = _run(dipo, pretrained["checkpoint"], n_train_itr=3, exp_name="full", **kw)
    part = _run(dipo, pretrained["checkpoint"], n_train_itr=2, exp_name="part", **kw)
    resumed = dipo.main(dipo.Args(resume=part["run_dir"], n_train_itr=3))
    assert_resumed_run_matches(full, resumed, n_eval_rows=4, key="actor")
    a, b = _load(full), _load(resumed)
    for key in ("actor_online", "critic", "critic_target", "buffer"):
        assert a[key].keys() == b[key].keys(), key
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key] if k != "ptr"), key
    assert a["buffer"]["ptr"] == b["buffer"]["ptr"] and len(resumed["history"]) == 1


def test_resume_refuses_another_method(pretrained):
    part = _run(dql, pretrained["checkpoint"], n_train_itr=1, n_critic_warmup_itr=0, buffer_size=300, exp_name="other")
    with pytest.raises(UsageError, match="is a run of dql.py, not of dipo.py; resume it with dql.py"):
        dipo.main(dipo.Args(resume=part["run_dir"]))


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_td_action_is_the_acting_policys_sample_at_the_next_observation(pretrained, monkeypatch, module):
    """Each critic update gets buffer rows (s, executed chunk, r, s', cut) and a' = the first T_e actions the acting
    network (DIPO: the EMA target actor; DQL: the actor) samples at exactly those s'."""
    samples, calls = [], []
    cls = module.DiffusionDIPO if module is dipo else module.DiffusionDQL
    real_get, real_loss = cls.get_action, module.critic_loss

    def get_action(self, cond, deterministic=False):
        x = real_get(self, cond, deterministic)
        samples.append((cond, x))
        return x
    monkeypatch.setattr(cls, "get_action", get_action)
    monkeypatch.setattr(module, "critic_loss", lambda *a: calls.append((a, samples[-1])) or real_loss(*a))
    _run(module, pretrained["checkpoint"], n_train_itr=1, n_critic_warmup_itr=0, act_steps=2, val_freq=0, buffer_size=1000,
         exp_name="td")
    assert len(calls) == int(25 * 8 / 50 * 2)
    for (critic, target, obs, action, reward, next_obs, next_action, cut, gamma), (cond, x) in calls:
        assert action.shape[1:] == (2, 2) and next_action.shape[1:] == (2, 2) and gamma == 0.99
        assert torch.equal(cond, next_obs) and torch.equal(next_action, x[:, :2])


@pytest.mark.parametrize("module", [dipo, dql], ids=["dipo", "dql"])
def test_update_wiring_of_targets_ema_rates_and_the_actor_loss(pretrained, monkeypatch, module):
    """T_e = 2 < T_a = 4, a target EMA rate of 0.02 and (DQL) η = 0.3, every update of one iteration: the TD target
    comes from the target critic, which (and DIPO's target actor) moves by τ towards its online network after each
    update. DIPO: the action gradient runs on the online critic at the actor batch, bounded by 0.1 · T_e · D_a, and the
    actor's ε-loss fits exactly those improved actions. DQL: the actor loss gets the critic batch's observations and η."""
    critic_calls, emas, grads, fits, actor_calls = [], [], [], [], []
    real_loss, real_ema = module.critic_loss, module.ema_update
    monkeypatch.setattr(module, "critic_loss", lambda *a: critic_calls.append(a) or real_loss(*a))
    monkeypatch.setattr(module, "ema_update", lambda t, s, tau: emas.append((t, s, tau)) or real_ema(t, s, tau))
    if module is dipo:
        real_grad, real_eps = dipo.action_gradient, dipo.Diffusion.eps_loss

        def action_gradient(*a):
            out = real_grad(*a)
            grads.append((a, out))
            return out
        monkeypatch.setattr(dipo, "action_gradient", action_gradient)
        monkeypatch.setattr(dipo.Diffusion, "eps_loss", lambda self, net, x0, cond: fits.append((net, x0, cond))
                            or real_eps(self, net, x0, cond))
        kw = dict(action_grad_norm_coef=0.1)
    else:
        real_actor = dql.actor_loss
        monkeypatch.setattr(dql, "actor_loss", lambda agent, obs, eta, T_e: actor_calls.append((agent, obs, eta, T_e))
                            or real_actor(agent, obs, eta, T_e))
        kw = dict(eta=0.3)
    _run(module, pretrained["checkpoint"], n_train_itr=1, act_steps=2, n_critic_warmup_itr=0, val_freq=0,
         buffer_size=1000, target_ema_rate=0.02, exp_name=f"update_{module.__name__}", **kw)
    n = int(25 * 8 / 50 * 2)
    assert len(critic_calls) == n
    critic, target = critic_calls[0][:2]
    assert target is not critic and all(c[0] is critic and c[1] is target for c in critic_calls)
    assert {tau for *_, tau in emas} == {0.02}
    if module is dipo:  # critic then actor targets, once per update
        actor = fits[0][0]
        assert len(emas) == 2 * n and all(e[:2] == (target, critic) for e in emas[::2])
        assert all(e[1] is actor and e[0] is not actor for e in emas[1::2])
        assert len(grads) == len(fits) == n
        for (a, guided), (net, x0, cond) in zip(grads, fits):
            assert a[0] is critic and a[5] == pytest.approx(0.1 * 2 * 2) and a[2].shape[1:] == (2, 2)
            assert cond is a[1] and torch.equal(x0[:, :2], guided) and x0.shape[1:] == (4, 2)
            assert not torch.equal(guided, a[2])  # the gradient moved the actions
    else:
        assert len(emas) == n and all(e[:2] == (target, critic) for e in emas)
        assert len(actor_calls) == n
        for c, (_, obs, eta, T_e) in zip(critic_calls, actor_calls):
            assert obs is c[2] and (eta, T_e) == (0.3, 2)
