"""idql.py and qsm.py: losses and targets by hand, the reference's numbers, wiring, smoke, resume."""

import csv
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dppo_pretrain as pt
import idql
import qsm
from common import runs
from common.errors import UsageError
from common.networks import DiffusionMLP, DoubleQCritic, ObsCritic
from common.normalizer import Normalizer
from tests.helpers import assert_resumed_run_matches, policy_action

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "tests", "reference", "idql_qsm.npz")
SMALL = dict(mlp_dims=(64, 64, 64), batch_size=128, learning_rate=1e-3, min_lr=1e-4, n_eval_envs=8)
TINY = dict(env_id="avoid-m2", n_train_itr=2, num_envs=4, n_steps=25, buffer_size=40, batch_size=20, replay_ratio=2,
            n_critic_warmup_itr=1, val_freq=1, seed=0, plot=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small Avoid M2 diffusion policy (3 epochs) and its run."""
    os.chdir(tmp_path_factory.mktemp("runs"))
    return pt.main(pt.Args(env_id="avoid-m2", n_epochs=3, eval_every=0, seed=0, **SMALL))


# ---- hand computations on tiny tensors ----

class StubQ(nn.Module):
    """Q1(s, a) = s0 + Σa, Q2(s, a) = s0 - Σa + c (one weight, so the optimiser has something to move)."""

    def __init__(self, c: float = 0.0) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, obs, a):
        s0, sa = obs[:, 0, 0], a.flatten(1).sum(1)
        return s0 + sa, s0 - sa + self.c


class StubV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, obs):
        return self.w * obs[:, 0, 0]


def tiny_actor():
    torch.manual_seed(0)
    return DiffusionMLP(action_dim=1, horizon_steps=2, obs_dim=1, mlp_dims=(8, 8, 8))


def idql_agent(critic_q=None, critic_v=None):
    return idql.IDQLDiffusion(tiny_actor(), critic_q or StubQ(), critic_v or StubV(), 20, 2, 1, 2, 0.1, 3.0)


def test_expectile_loss_by_hand():
    diff = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    expected = torch.tensor([0.2 * 4, 0.2 * 0.25, 0.0, 0.8 * 1, 0.8 * 9])
    torch.testing.assert_close(idql.expectile_loss(diff, 0.8), expected)
    agent = idql_agent()
    obs, a = torch.tensor([[[1.0]], [[-1.0]]]), torch.tensor([[[0.5], [0.5]], [[-2.0], [1.0]]])
    # min target Q: row 0 min(2, -0) = 0, V 2 -> diff -2; row 1 min(-2, 0) = -2, V -2 -> diff 0
    assert agent.loss_critic_v(obs, a, 0.8).item() == pytest.approx((0.2 * 4 + 0) / 2)


def test_td_targets_terminal_vs_truncated():
    """A terminal transition drops γ·V(s'); a truncated one (stored with terminal 0 and its final obs) keeps it."""
    obs = torch.tensor([[[1.0]], [[0.5]], [[-1.0]]])
    next_obs = torch.tensor([[[2.0]], [[3.0]], [[4.0]]])      # the final observations
    a = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]], [[1.0], [1.0]]])
    r, terminal, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0]), 0.9
    agent = idql_agent()
    q1, q2 = obs[:, 0, 0] + a.flatten(1).sum(1), obs[:, 0, 0] - a.flatten(1).sum(1)
    target = torch.tensor([1.0, 2.0 + 0.9 * 6.0, 3.0 + 0.9 * 8.0])  # IDQL: r + γ(1 - terminal)·V(s'), V = 2·s0
    expected = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    torch.testing.assert_close(agent.loss_critic_q(obs, next_obs, a, r, terminal, g), expected)
    # QSM: r + γ(1 - terminal)·min(target Q1, Q2)(s', a'), a' a noisy sample of the current policy at s'
    agent = qsm.QSMDiffusion(tiny_actor(), StubQ(), 20, 2, 1, 2, 0.1, 3.0)
    next_a = torch.tensor([[[1.0], [1.0]], [[-1.0], [0.0]], [[0.5], [0.0]]])
    calls = []
    agent.sample = lambda cond, deterministic=False: calls.append((cond, deterministic)) or next_a
    nq = torch.minimum(next_obs[:, 0, 0] + next_a.flatten(1).sum(1), next_obs[:, 0, 0] - next_a.flatten(1).sum(1))
    target = r + g * (1 - terminal) * nq
    expected = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
    torch.testing.assert_close(agent.loss_critic(obs, next_obs, a, r, terminal, g), expected)
    assert torch.equal(calls[0][0], next_obs) and calls[0][1] is False


def test_ema_update_by_hand():
    target, source = nn.Linear(2, 1), nn.Linear(2, 1)
    for p, q in zip(target.parameters(), source.parameters()):
        nn.init.constant_(p, 1.0), nn.init.constant_(q, 3.0)
    idql.ema_update(target, source, 0.1)
    assert all(torch.allclose(p, torch.full_like(p, 1.2)) for p in target.parameters())
    qsm.ema_update(target, source, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), source.parameters()))


class ConstV(nn.Module):
    def __init__(self, v: float) -> None:
        super().__init__()
        self.v = v

    def forward(self, obs):
        return torch.full((obs.shape[0],), self.v)


class CandidateQ(nn.Module):
    """Scores candidate k (encoded in a[:, 0, 0]) with fixed tables: Q1 = q1[k], Q2 = q2[k]."""

    def __init__(self, q1, q2) -> None:
        super().__init__()
        self.q1, self.q2 = torch.tensor(q1), torch.tensor(q2)

    def forward(self, obs, a):
        k = a[:, 0, 0].round().long()
        return self.q1[k], self.q2[k]


def test_candidate_selection_argmax_and_probabilities():
    w = idql.candidate_weights(torch.tensor([[1.0], [-1.0], [0.5], [0.0]]), torch.zeros(4, 1), 0.7)
    torch.testing.assert_close(w, torch.tensor([[0.35], [0.15], [0.35], [0.15]]))
    B, S = 4000, 4
    agent = idql_agent()
    # target Q: min per candidate (1, 3, 2, 0.5): argmax is candidate 1; Q1 alone would pick 3, Q2 alone 0
    agent.target_q = CandidateQ([1.0, 3.0, 2.0, 9.0], [5.0, 4.0, 2.0, 0.5])
    agent.critic_q = CandidateQ([9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0])  # the online Q would pick 0
    agent.critic_v = ConstV(1.5)  # Q - V > 0 for candidates 1 and 2
    agent.sample = lambda cond, deterministic=False: (torch.arange(S).repeat_interleave(cond.shape[0] // S)
                                                      .float().view(-1, 1, 1).expand(-1, 2, 1).clone())
    cond = torch.zeros(B, 1, 1)
    pick = agent.get_action(cond, deterministic=True, num_sample=S)[:, 0, 0]
    assert (pick == 1).all()
    torch.manual_seed(0)
    pick = agent.get_action(cond, deterministic=False, num_sample=S, weight=0.7)[:, 0, 0].long()
    freq = torch.bincount(pick, minlength=S).float() / B
    expected = torch.tensor([0.3, 0.7, 0.7, 0.3]) / 2.0
    assert (freq - expected).abs().max() < 0.03  # ~4 standard deviations at B = 4000
    pick = agent.get_action(cond, deterministic=False, num_sample=S, expectile_exploration=False)[:, 0, 0]
    assert (pick == 1).all()


class QuadQ(nn.Module):
    """Q1 = Σ c·x², Q2 = Σ d·x (+ a weight that must get no gradient): ∇ mean = c·x + d/2."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(1.5))
        self.d = torch.tensor([[0.5], [-1.0]])

    def forward(self, obs, x):
        return (self.c * x**2).flatten(1).sum(1), (self.d * x).flatten(1).sum(1)


def test_qsm_actor_target_from_a_known_q_gradient():
    agent = qsm.QSMDiffusion(tiny_actor(), QuadQ(), 20, 2, 1, 2, 0.1, 3.0)
    obs, a = torch.rand(6, 1, 1), torch.rand(6, 2, 1) * 2 - 1
    x = torch.randn(6, 2, 1)
    torch.testing.assert_close(qsm.q_score(agent.critic_q, obs, x), 1.5 * x + 0.5 * agent.critic_q.d)
    torch.manual_seed(3)
    loss = agent.loss_actor(obs, a, 10.0)
    torch.manual_seed(3)  # the same draws: ε first, then t (reference `QSMDiffusion.loss_actor`)
    noise = torch.randn_like(a)
    t = torch.randint(0, 20, (6,))
    ac = torch.cumprod(1 - qsm.cosine_beta_schedule(20).float(), 0)
    x_t = ac[t].sqrt().view(-1, 1, 1) * a + (1 - ac[t]).sqrt().view(-1, 1, 1) * noise
    expected = F.mse_loss(-agent.actor(x_t, t, obs), 10.0 * (1.5 * x_t + 0.5 * agent.critic_q.d))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert agent.critic_q.c.grad is None and any(p.grad is not None for p in agent.actor.parameters())


# ---- the reference's IDQLDiffusion / QSMDiffusion on fixed tensors (tests/reference/README.md) ----

def load_by_order(module, d, prefix):
    sd = module.state_dict()
    names = d[f"{prefix}.names"]
    assert len(sd) == len(names), (list(sd), list(names))
    module.load_state_dict({k: torch.from_numpy(d[f"{prefix}.{i:03d}"]) for i, k in enumerate(sd)})


def ref_nets(d, target_prefix):
    actor = DiffusionMLP(action_dim=3, horizon_steps=4, obs_dim=11, time_dim=16, mlp_dims=(32, 32, 32), activation="relu")
    critic_q = DoubleQCritic(11, 3, 4, 1, mlp_dims=(16,) * 3, activation="mish", residual=False)
    load_by_order(actor, d, "actor")
    load_by_order(critic_q, d, "critic_q")
    return actor, critic_q


def test_idql_matches_reference():
    d = np.load(REF)
    actor, critic_q = ref_nets(d, "target_q")
    critic_v = ObsCritic(11, 1, mlp_dims=(16,) * 3, activation="mish", residual=True)
    load_by_order(critic_v, d, "critic_v")
    agent = idql.IDQLDiffusion(actor, critic_q, critic_v, 20, 4, 3, 4, 0.1, 3.0)
    load_by_order(agent.target_q, d, "target_q")
    obs, next_obs, a, r, term = (torch.from_numpy(d[k]) for k in ("obs", "next_obs", "actions", "rewards", "terminated"))
    torch.testing.assert_close(agent.loss_critic_v(obs, a, 0.8), torch.tensor(d["v_loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agent.loss_critic_q(obs, next_obs, a, r, term, 0.99), torch.tensor(d["q_loss"]),
                               rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    torch.testing.assert_close(agent.loss_actor(obs, a), torch.tensor(d["actor_loss"]), rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    torch.testing.assert_close(agent.get_action(obs, True, num_sample=5), torch.from_numpy(d["act_det"]), atol=1e-5, rtol=0)
    torch.manual_seed(7)
    torch.testing.assert_close(agent.get_action(obs, False, num_sample=5, weight=0.7), torch.from_numpy(d["act_stoch"]),
                               atol=1e-5, rtol=0)
    idql.ema_update(agent.target_q, agent.critic_q, 0.001)
    after = DoubleQCritic(11, 3, 4, 1, mlp_dims=(16,) * 3, activation="mish", residual=False)
    load_by_order(after, d, "target_q_after")
    for p, q in zip(agent.target_q.parameters(), after.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_qsm_matches_reference():
    d = np.load(REF)
    actor, critic_q = ref_nets(d, "qsm.target_q")
    agent = qsm.QSMDiffusion(actor, critic_q, 20, 4, 3, 4, 0.1, 3.0)
    load_by_order(agent.target_q, d, "qsm.target_q")
    obs, next_obs, a, r, term = (torch.from_numpy(d[k]) for k in ("obs", "next_obs", "actions", "rewards", "terminated"))
    torch.manual_seed(8)
    torch.testing.assert_close(agent.loss_critic(obs, next_obs, a, r, term, 0.99), torch.tensor(d["qsm.q_loss"]),
                               rtol=1e-5, atol=1e-6)
    torch.manual_seed(9)
    torch.testing.assert_close(agent.loss_actor(obs, a, 10.0), torch.tensor(d["qsm.actor_loss"]), rtol=1e-5, atol=1e-6)
    torch.manual_seed(10)
    torch.testing.assert_close(agent.get_action(obs, True), torch.from_numpy(d["qsm.act_det"]), atol=1e-5, rtol=0)
    qsm.ema_update(agent.target_q, agent.critic_q, 0.005)
    after = DoubleQCritic(11, 3, 4, 1, mlp_dims=(16,) * 3, activation="mish", residual=False)
    load_by_order(after, d, "qsm.target_q_after")
    for p, q in zip(agent.target_q.parameters(), after.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


# ---- defaults ----

@pytest.mark.parametrize("module", [idql, qsm])
def test_suite_defaults_and_refusals(module):
    args = module.Args(env_id="hopper")
    module.fill_defaults(args)
    assert (args.n_train_itr, args.num_envs, args.n_steps, args.gamma, args.actor_lr, args.buffer_size,
            args.scale_reward_factor, args.bootstrap_truncated) == (1000, 40, 500, 0.99, 1e-4, 25000, 0.01, True)
    args = module.Args(env_id="square")
    module.fill_defaults(args)
    assert (args.n_train_itr, args.n_steps, args.gamma, args.actor_lr, args.buffer_size, args.scale_reward_factor) == (
        201, 400, 0.999, 1e-5, 5000, 1.0)
    args = module.Args()
    module.fill_defaults(args)
    assert (args.n_train_itr, args.num_envs, args.n_steps, args.bootstrap_truncated, args.batch_size) == (51, 50, 25, False,
                                                                                                         1000)
    assert (args.replay_ratio, args.critic_tau) == ((128, 0.001) if module is idql else (16, 0.005))
    if module is idql:
        assert (args.num_sample, module.Args(env_id="lift").num_sample) == (20, None)
    with pytest.raises(UsageError, match="no furniture settings"):
        module.fill_defaults(module.Args(env_id="one-leg-low"))
    with pytest.raises(UsageError, match="critic-tau"):
        module.fill_defaults(module.Args(critic_tau=1.5))


@pytest.mark.parametrize("module", [idql, qsm])
def test_actor_lr_schedule_is_held_during_the_critic_warmup(module):
    steps = []

    class Sched:
        def __init__(self, name):
            self.name = name

        def step(self):
            steps.append(self.name)
    schedulers = {"actor": Sched("actor"), "critic_q": Sched("critic_q")}
    for itr in range(4):
        module.step_lr_schedules(schedulers, itr, 2)
    assert steps == ["critic_q", "critic_q", "actor", "critic_q", "actor", "critic_q"]


# ---- main: wiring, smoke, resume ----

@pytest.mark.parametrize("module", [idql, qsm])
def test_buffer_wiring_truncation_and_rewards(pretrained, monkeypatch, module):
    """What goes into the buffer: normalised obs, executed chunk, reward × scale, the final observation of a
    truncated episode, and terminal = truncated only under --bootstrap-truncated False."""
    steps = []
    real = module.make_vec_env

    def make(*a, **kw):
        envs = real(*a, **kw)
        step = envs.step

        def recording_step(action):
            out = step(action)
            steps.append(dict(action=action.copy(), reward=out[1].copy(), trunc=out[3].copy(), obs=out[0].copy(),
                              final_obs=out[4]["final_obs"].copy()))
            return out
        envs.step = recording_step
        return envs
    monkeypatch.setattr(module, "make_vec_env", make)
    ckpt = torch.load(pretrained["checkpoint"], weights_only=True)
    norm = Normalizer.from_state_dict(ckpt["normalization"])
    for boot in (False, True):
        steps.clear()
        extra = {"num_sample": 3} if module is idql else {}
        out = module.main(module.Args(**{**TINY, "n_train_itr": 1, "n_critic_warmup_itr": 0, "n_steps": 30, "val_freq": 0,
                                         **extra, "bootstrap_truncated": boot, "scale_reward_factor": 0.5},
                                      checkpoint=pretrained["checkpoint"], exp_name=f"wiring{boot}"))
        buf = torch.load(out["checkpoint"], weights_only=True)["buffer"]
        train = steps[:30]  # the training rollout (the final evaluation follows)
        trunc = np.stack([s["trunc"] for s in train])
        assert trunc[24].all() and trunc.sum() == 4  # 100 env steps = 25 chunks, mid-iteration
        assert out["history"][0]["n_episodes"] == 4  # the truncated episodes end in the statistics too
        assert buf["size"] == 30 and buf["ptr"] == 0  # capacity: the run's 30 vector steps, all filled
        np.testing.assert_array_equal(buf["terminal"].numpy(), trunc.astype(np.float32) * (not boot))
        final = norm.normalize_obs(torch.as_tensor(np.stack([s["final_obs"] for s in train]), dtype=torch.float32))
        torch.testing.assert_close(buf["next_obs"], final)
        assert not torch.allclose(buf["next_obs"][24], norm.normalize_obs(torch.as_tensor(train[24]["obs"]).float()))
        torch.testing.assert_close(buf["obs"][25], norm.normalize_obs(torch.as_tensor(train[24]["obs"]).float()))
        torch.testing.assert_close(buf["rewards"], torch.as_tensor(np.stack([s["reward"] for s in train]) * 0.5).float())
        executed = policy_action(norm, torch.as_tensor(np.stack([s["action"] for s in train])).float())
        torch.testing.assert_close(buf["actions"], executed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", [idql, qsm])
def test_smoke_two_iterations(pretrained, module, monkeypatch):
    resets, real_make = [], module.make_vec_env

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        reset = envs.reset
        envs.reset = lambda seed=None: resets.append(seed) or reset(seed=seed)
        return envs
    monkeypatch.setattr(module, "make_vec_env", make)
    extra = {"num_sample": 4} if module is idql else {}
    out = module.main(module.Args(**TINY, checkpoint=pretrained["checkpoint"], **extra))
    assert resets == [0, 4, 1_000_000]  # Avoid resets every iteration (seed + itr·N); the final evaluation's own seed
    h = out["history"]
    losses = ("v_loss", "q_loss", "actor_loss") if module is idql else ("q_loss", "actor_loss")
    assert len(h) == 2 and all(np.isfinite(x[k]) for x in h for k in losses)
    assert all({"iteration", "env_steps", "return_mean", "success_rate", "time_sampling", "time_env", "time_update"} <= set(x)
               for x in h)
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "eval.csv"))))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2] and all(r["mode"] == "stochastic" for r in rows)
    pre = torch.load(pretrained["checkpoint"], weights_only=True)
    post = torch.load(out["checkpoint"], weights_only=True)
    assert post["method"] == module.METHOD and post["itr"] == 2
    assert any(not torch.equal(post["actor"][k], v) for k, v in pre["ema"].items())  # moved after the warm-up
    assert any(not torch.equal(post["target_q"][k], v) for k, v in post["critic_q"].items())
    assert post["buffer"]["size"] == 40 and post["buffer"]["ptr"] == 10  # 50 vector steps through a 40-row FIFO
    assert post["buffer"]["obs"].shape == (40, 4, 1, 4)
    ev = module.main(module.Args(env_id="avoid-m2", checkpoint=out["checkpoint"], eval_only=True, num_envs=4, seed=0))
    assert set(ev["eval"]) == {"deterministic", "stochastic"}  # the saved actor loads as a policy


def test_idql_resume_is_bit_identical(pretrained, monkeypatch):
    kw = dict(TINY, n_train_itr=3, checkpoint=pretrained["checkpoint"], num_sample=3, buffer_size=60)
    full = idql.main(idql.Args(exp_name="full", **kw))
    real = runs.save_checkpoint  # what `runs.Run.end_iteration` saves with

    def save_then_stop(path, payload):
        real(path, payload)
        if payload["itr"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        idql.main(idql.Args(exp_name="part", **kw))
    monkeypatch.setattr(runs, "save_checkpoint", real)
    resumed = idql.main(idql.Args(resume=glob.glob("runs/avoid-m2__part__*")[0]))
    assert_resumed_run_matches(full, resumed, n_eval_rows=4, key="actor")
    a, b = (torch.load(o["checkpoint"], weights_only=True) for o in (full, resumed))
    for key in ("critic_q", "target_q", "critic_v"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["buffer"]["size"] == 60 and a["buffer"]["ptr"] == 15  # wrapped: 75 vector steps
    assert all(torch.equal(a["buffer"][k], b["buffer"][k]) for k in ("obs", "next_obs", "actions", "rewards", "terminal"))
    assert (a["buffer"]["ptr"], a["buffer"]["size"]) == (b["buffer"]["ptr"], b["buffer"]["size"])
    with pytest.raises(UsageError, match="is a run of idql.py, not of qsm.py; resume it with idql.py"):
        qsm.main(qsm.Args(resume=resumed["run_dir"]))


@pytest.mark.parametrize("module", [idql, qsm])
def test_executed_chunk_must_be_the_whole_chunk(pretrained, module):
    with pytest.raises(UsageError, match="T_a must equal T_e"):
        module.main(module.Args(**{**TINY, "act_steps": 2}, checkpoint=pretrained["checkpoint"]))


@pytest.mark.parametrize("module", [idql, qsm])
def test_a_setup_without_a_gradient_step_is_refused(pretrained, module, tmp_path, monkeypatch):
    """n_steps·num_envs / batch_size × replay_ratio < 1 would train nothing and exit 0 with the policy unchanged: refused
    in one line before a run folder exists, as dipo.py and dql.py do; the same set-up with enough samples runs."""
    monkeypatch.chdir(tmp_path)
    few = {**TINY, "n_steps": 2, "num_envs": 4, "batch_size": 20, "replay_ratio": 2}  # 4·2/20·2 = 0.8 updates
    with pytest.raises(UsageError, match=r"no gradient step per iteration: --n-steps 2 x --num-envs 4 / --batch-size 20 x "
                                         r"--replay-ratio 2 < 1"):
        module.main(module.Args(**few, checkpoint=pretrained["checkpoint"]))
    assert not (tmp_path / "runs").exists()
    args = module.Args(**{**few, "n_steps": 3}, checkpoint=pretrained["checkpoint"])  # 1.2: one update
    module.fill_defaults(args)
    assert module.fill_from_checkpoint(args, torch.load(pretrained["checkpoint"], weights_only=True)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["idql.py", "qsm.py"])
def test_default_command_runs(script, tmp_path):
    """`python <script> --n-train-itr 2 --n-critic-warmup-itr 1` from the repo root: Avoid M2 from the shipped checkpoint,
    no other flag (the default warm-up, 5 iterations, needs a budget of at least 6)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--n-train-itr", "2", "--n-critic-warmup-itr", "1"],
                       cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "success" in r.stdout and glob.glob(str(tmp_path / "runs" / "avoid-m2__*" / "checkpoint.pt"))


def test_replay_buffer_fifo_checkpoint_and_extension():
    def filled(capacity, n):
        b = idql.ReplayBuffer(capacity, 2, dict(obs=(), rewards=()), torch.device("cpu"))
        for i in range(n):
            b.add(obs=torch.tensor([i, i + 0.5]), rewards=torch.tensor([-i, -i - 0.5]))
        return b
    b = filled(3, 5)  # rows [3, 4, 2]: the two oldest were dropped
    assert (b.ptr, b.size) == (2, 3) and b.data["obs"][:, 0].tolist() == [3, 4, 2]
    torch.manual_seed(0)
    batch = b.sample(2000)
    assert set(batch["obs"].tolist()) == {2, 2.5, 3, 3.5, 4, 4.5} and torch.equal(batch["rewards"], -batch["obs"])
    same = idql.ReplayBuffer(3, 2, dict(obs=(), rewards=()), torch.device("cpu"))
    same.load_state_dict(b.state_dict())
    assert (same.ptr, same.size) == (2, 3) and all(torch.equal(same.data[k], b.data[k]) for k in b.data)
    longer = idql.ReplayBuffer(5, 2, dict(obs=(), rewards=()), torch.device("cpu"))  # a run extended on resume
    longer.load_state_dict(b.state_dict())
    longer.add(obs=torch.tensor([5, 5.5]), rewards=torch.tensor([-5, -5.5]))
    assert (longer.ptr, longer.size) == (4, 4) and longer.data["obs"][:, 0].tolist() == [2, 3, 4, 5, 0]


@pytest.mark.parametrize("module", [idql, qsm])
def test_update_wiring_of_the_losses_and_the_target_ema(pretrained, monkeypatch, module):
    """One iteration, no warm-up, γ 0.97, τ 0.01, expectile 0.7 (IDQL), Q-gradient coefficient 3 (QSM): every update
    hands each loss the sampled batch's own tensors in their places, with these numbers, and moves the target Q by τ
    towards the online Q. IDQL's training rollout draws its candidates (not the argmax), as set."""
    cls = idql.IDQLDiffusion if module is idql else qsm.QSMDiffusion
    names = ("loss_critic_v", "loss_critic_q", "loss_actor") if module is idql else ("loss_critic", "loss_actor")
    batches, calls, emas, acts, resets = [], [], [], [], []
    real_sample, real_ema, real_make = module.ReplayBuffer.sample, module.ema_update, module.make_vec_env
    monkeypatch.setattr(module.ReplayBuffer, "sample", lambda self, n: batches.append(real_sample(self, n)) or batches[-1])
    monkeypatch.setattr(module, "ema_update", lambda t, s, tau: emas.append((t, s, tau)) or real_ema(t, s, tau))
    for name in names:
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, real=real, name=name: calls.append((name, self, a)) or real(self, *a))
    real_get = cls.get_action
    monkeypatch.setattr(cls, "get_action", lambda self, *a, **kw: acts.append((resets[-1], a[1:])) or real_get(self, *a, **kw))

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        reset = envs.reset
        envs.reset = lambda seed=None: resets.append(seed) or reset(seed=seed)
        return envs
    monkeypatch.setattr(module, "make_vec_env", make)
    extra = dict(num_sample=3, expectile=0.7, sample_weight=0.6) if module is idql else dict(q_grad_coeff=3.0)
    module.main(module.Args(**{**TINY, "n_train_itr": 1, "n_steps": 30, "val_freq": 0, "n_critic_warmup_itr": 0,
                               "gamma": 0.97, "critic_tau": 0.01, **extra},
                            checkpoint=pretrained["checkpoint"], exp_name="update_wiring"))
    n = int(30 * 4 / 20 * 2)
    assert len(batches) == n and len(calls) == len(names) * n and len(emas) == n
    agent = calls[0][1]
    for k, b in enumerate(batches):
        got = {name: a for name, _, a in calls[len(names) * k:len(names) * (k + 1)]}
        assert list(got) == list(names)
        q = got["loss_critic_q" if module is idql else "loss_critic"]
        assert all(x is b[key] for x, key in zip(q, ("obs", "next_obs", "actions", "rewards", "terminal"))) and q[5] == 0.97
        if module is idql:
            v = got["loss_critic_v"]
            assert v[0] is b["obs"] and v[1] is b["actions"] and v[2] == 0.7
            assert got["loss_actor"][0] is b["obs"] and got["loss_actor"][1] is b["actions"]
        else:
            a = got["loss_actor"]
            assert a[0] is b["obs"] and a[1] is b["actions"] and a[2] == 3.0
    assert all(t is agent.target_q and s is agent.critic_q and tau == 0.01 for t, s, tau in emas)
    if module is idql:  # the 30 rollout steps follow the training reset (seed 0)
        rollout = [a for seed, a in acts if seed == 0]
        assert len(rollout) == 30 and all(a == (False, 3, 0.6, True) for a in rollout)
