"""dppo_critic_ablation.py (App. B.1 item 1, Fig. A1): `--critic value` is dppo_finetune.py number for number; each
critic variant runs, fits a fixed batch, resumes exactly; bad flags end in one line with nothing written."""

import csv
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dppo_critic_ablation as ab
import dppo_finetune as ft
from common import runs
from common.errors import DatasetError, UsageError
from common.tasks import get_task
from tests.helpers import assert_resumed_run_matches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "avoid-m2_diffusion.pt")  # Avoid M2, MLP, T_a = 4, K = 20
# 4 envs x 5 chunk-steps x K' 10 = 200 pairs, minibatches of 50, 2 epochs: a few seconds per iteration
TINY = dict(env_id="avoid-m2", checkpoint=SHIPPED, num_envs=4, n_steps=5, batch_size=50, update_epochs=2, val_freq=1,
            seed=0, plot=False, n_critic_warmup_itr=0)
VARIANTS = ("value", "denoising-value", "q")


def _rows(out: dict) -> list[dict]:
    with open(os.path.join(out["run_dir"], "eval.csv")) as f:
        return list(csv.DictReader(f))


def _ckpt(out: dict) -> dict:
    return torch.load(out["checkpoint"], map_location="cpu", weights_only=True)


def test_value_is_dppo_finetune_number_for_number(tmp_path, monkeypatch):
    """The default critic: the same eval.csv and the same actor_ft and critic weights as dppo_finetune.py, same seed."""
    monkeypatch.chdir(tmp_path)
    a = ft.main(ft.Args(n_train_itr=2, **TINY))
    b = ab.main(ab.Args(n_train_itr=2, **TINY))
    assert _rows(a) == _rows(b) and len(_rows(a)) == 3
    ca, cb = _ckpt(a), _ckpt(b)
    for key in ("actor_ft", "critic"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    assert cb["method"] == "dppo_critic_ablation" and cb["args"]["critic"] == "value"


@pytest.mark.parametrize("critic", ["denoising-value", "q"])
def test_each_variant_runs_two_iterations(critic, tmp_path, monkeypatch):
    """Two iterations with finite losses; actor_ft moved off the base; Q's target heads follow Q (τ = 1: are Q)."""
    monkeypatch.chdir(tmp_path)
    out = ab.main(ab.Args(critic=critic, n_train_itr=2, **TINY, **({"critic_tau": 1.0} if critic == "q" else {})))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["pg_loss"]) and np.isfinite(x["v_loss"]) for x in h)
    ckpt = _ckpt(out)
    assert any(not torch.equal(ckpt["actor_ft"][k], v) for k, v in ckpt["base"].items())
    assert ("target_q" in ckpt) == (critic == "q")
    if critic == "q":  # the trained Q, not the copy of its initial weights
        assert set(ckpt["target_q"]) == set(ckpt["critic"]) and any(k.startswith("q2.") for k in ckpt["critic"])
        for k, v in ckpt["critic"].items():
            torch.testing.assert_close(ckpt["target_q"][k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("critic", VARIANTS)
def test_critic_loss_is_finite_and_decreases_on_a_fixed_batch(critic):
    """`critic_loss` on one fixed minibatch of pairs, 100 Adam steps of the critic alone: its loss falls below a third."""
    torch.manual_seed(0)
    T_o, T_a, T_e, K_ft, S = 1, 4, 2, 10, 16
    net = ab.build_critic(critic, get_task("avoid-m2"), T_o, T_a, T_e, K_ft)
    b_obs, b_chain = torch.randn(S, T_o, 4), torch.randn(S, K_ft + 1, T_a, 2)
    b_act, b_ret = b_chain[:, -1, :T_e], torch.randn(S)
    s, i = torch.arange(S).repeat_interleave(K_ft), torch.arange(K_ft).repeat(S)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = ab.critic_loss(critic, net, b_obs, b_chain, b_act, b_ret, s, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] / 3


def test_the_denoising_value_sees_the_chunk_and_the_position():
    """V(s, x, i) is a function of all three (a critic that dropped x or i would give a second critic's V(s))."""
    torch.manual_seed(0)
    net = ab.build_critic("denoising-value", get_task("avoid-m2"), 1, 4, 4, 10)
    obs, x = torch.randn(3, 1, 4), torch.randn(3, 4, 2)
    i0, i5 = torch.zeros(3, dtype=torch.long), torch.full((3,), 5)
    v = net(obs, x, i0)
    assert v.shape == (3,) and not torch.allclose(v, net(obs, x + 1, i0)) and not torch.allclose(v, net(obs, x, i5))


def _record_one_update(critic: str, network: type, monkeypatch) -> tuple[list, list, list]:
    """One iteration, one epoch, one minibatch of all 200 pairs, γ_denoise 1: the critic's no-grad calls (module, inputs,
    output), compute_gae's results and the advantages `ppo_loss` receives (a permutation of the normalised pair ones)."""
    calls, gae, advs = [], [], []
    real_forward, real_gae, real_ppo = network.forward, ab.compute_gae, ab.ppo_loss

    def forward(self, *a):
        out = real_forward(self, *a)
        if not torch.is_grad_enabled():
            calls.append((self, *a, out))
        return out
    monkeypatch.setattr(network, "forward", forward)
    monkeypatch.setattr(ab, "compute_gae", lambda *a: gae.append(real_gae(*a)) or gae[-1])
    monkeypatch.setattr(ab, "ppo_loss", lambda new_lp, old_lp, adv, *a: advs.append(adv.detach()) or real_ppo(
        new_lp, old_lp, adv, *a))
    ab.main(ab.Args(critic=critic, n_train_itr=1, gamma_denoising=1.0, **{**TINY, "batch_size": 200, "update_epochs": 1}))
    return calls, gae, advs


def _normalised_sorted(x: torch.Tensor) -> torch.Tensor:
    return ((x - x.mean()) / (x.std() + 1e-8)).sort().values


def test_denoising_value_gives_each_pair_its_own_baseline(tmp_path, monkeypatch):
    """GAE runs on V(s_t, x_t^0, 0); pair (t, i) gets R_t - V(s_t, x_t^i, i), x_t^i the chunk entering fine-tuned step i."""
    monkeypatch.chdir(tmp_path)
    calls, gae, advs = _record_one_update("denoising-value", ab.DenoisingStateCritic, monkeypatch)
    (_, obs, x, i, v), _, (_, p_obs, p_x, p_i, p_v) = calls  # V(s_t, x^0), V(s'_t, x'^0), then every pair's V
    S, K = 20, 10
    assert torch.equal(i, torch.zeros(S, dtype=torch.long)) and torch.equal(p_i, torch.arange(K).repeat(S))
    assert torch.equal(p_obs, obs.repeat_interleave(K, 0)) and torch.equal(p_x.view(S, K, 4, 2)[:, 0], x)
    assert not torch.equal(p_x.view(S, K, 4, 2)[:, -1], x)  # the last fine-tuned step's input, not the noisiest
    (advantages, returns), = gae
    torch.testing.assert_close(returns - advantages, v.view(returns.shape))
    expected = returns.flatten().repeat_interleave(K) - p_v
    torch.testing.assert_close(expected.view(S, K)[:, 0], advantages.flatten())  # i = 0: the GAE advantage
    torch.testing.assert_close(advs[0].sort().values, _normalised_sorted(expected), rtol=1e-5, atol=1e-5)


def test_q_advantage_is_q_of_the_action_minus_q_of_a_fresh_one(tmp_path, monkeypatch):
    """y from the target heads at s'; A_t = min Q(s_t, a_t) - min Q(s_t, ã), ã another sample at s_t; no GAE."""
    from common.networks import DoubleQCritic
    monkeypatch.chdir(tmp_path)
    calls, gae, advs = _record_one_update("q", DoubleQCritic, monkeypatch)
    (target, next_obs, _, _), (q, obs, a, (q1, q2)), (q_again, obs_again, a_fresh, (b1, b2)) = calls
    assert gae == [] and target is not q and q is q_again and torch.equal(obs, obs_again)
    assert a.shape == a_fresh.shape == (20, 4, 2) and not torch.equal(a, a_fresh)
    expected = (torch.min(q1, q2) - torch.min(b1, b2)).repeat_interleave(10)
    torch.testing.assert_close(advs[0].sort().values, _normalised_sorted(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("critic", VARIANTS)
def test_resume_matches_uninterrupted(critic, tmp_path, monkeypatch):
    """Stopped after iteration 2 of 3 and resumed: the same eval.csv, actor_ft, critic (and Q's target heads)."""
    monkeypatch.chdir(tmp_path)
    full = ab.main(ab.Args(critic=critic, n_train_itr=3, exp_name="full", **TINY))
    part = ab.main(ab.Args(critic=critic, n_train_itr=2, exp_name="part", **TINY))
    resumed = ab.main(ab.Args(resume=part["run_dir"], n_train_itr=3))
    for key in ("actor_ft", "critic") + (("target_q",) if critic == "q" else ()):
        assert_resumed_run_matches(full, resumed, n_eval_rows=4, key=key)
    assert _ckpt(resumed)["args"]["critic"] == critic


def test_a_fine_tuned_checkpoint_with_another_critic_starts_a_fresh_one(tmp_path, monkeypatch):
    """dppo_finetune.py's V(s) cannot be Q: `--critic q` from its checkpoint loads actor_ft only; `value` loads both."""
    monkeypatch.chdir(tmp_path)
    first = ft.main(ft.Args(n_train_itr=1, **TINY))
    kw = {**TINY, "checkpoint": first["checkpoint"], "n_train_itr": 1, "eval_only": True}
    q, value = (ab.main(ab.Args(critic=c, **kw))["eval"] for c in ("q", "value"))
    assert [q[m]["return_mean"] for m in q] == [value[m]["return_mean"] for m in value] and len(q) == 2
    with pytest.raises(DatasetError, match="does not fit the network"):  # what the kind check keeps away
        runs.load_weights(ab.build_critic("q", get_task("avoid-m2"), 1, 4, 4, 10), _ckpt(first)["critic"], "x.pt")


def test_bad_critic_flags_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dppo_critic_ablation.py"), "--critic", "advantage"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--critic" in r.stderr, r.stderr
    with pytest.raises(UsageError, match=r"^--critic-tau is the target-Q rate of --critic q only$"):
        ab.main(ab.Args(critic_tau=0.01, n_train_itr=2, **TINY))  # a value critic has no target network
    with pytest.raises(UsageError, match=r"^--critic-tau must be in \(0\.0, 1\.0\]"):
        ab.main(ab.Args(critic="q", critic_tau=0.0, n_train_itr=2, **TINY))
    assert os.listdir(tmp_path) == []


def test_a_run_of_dppo_finetune_is_resumed_by_it_only(tmp_path, monkeypatch):
    """Its checkpoint has no target heads nor `method`: refused in one line naming the script, the folder unchanged."""
    monkeypatch.chdir(tmp_path)
    run_dir = ft.main(ft.Args(n_train_itr=1, **TINY))["run_dir"]
    files = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}
    with pytest.raises(UsageError, match=r"is a run of dppo_finetune\.py, not of dppo_critic_ablation\.py; resume it with "
                                         r"dppo_finetune\.py$"):
        ab.main(ab.Args(resume=run_dir, n_train_itr=2))
    assert {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)} == files
    assert len(glob.glob("runs/*")) == 1
