"""The math of dppo_pretrain.py / dppo_finetune.py against independent computations (eqs. 4.4-4.7 and the reference's
`PPODiffusion`)."""

import io
import math

import numpy as np
import pytest
import torch

import dppo_finetune as ft
import dppo_pretrain as pt
from common import runs
from common.envs import EpisodeTracker
from common.networks import DiffusionMLP, ObsCritic


def test_cosine_schedule_check_values():
    b20 = ft.cosine_beta_schedule(20)
    assert b20[0] == pytest.approx(0.008, abs=1.5e-3)  # cosine schedule: β from ≈0.008 ...
    assert b20[-1] == pytest.approx(0.999)             # ... up to 0.999
    assert torch.cumprod(1 - b20, 0)[-1] == pytest.approx(6e-6, rel=0.2)
    b100 = ft.cosine_beta_schedule(100)
    assert b100[0] == pytest.approx(6e-4, rel=0.15)
    # an independent evaluation of the formula at one step
    s, K, i = 0.008, 20, 7
    f = lambda j: math.cos(((j / K) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert b20[i].item() == pytest.approx(1 - f(i + 1) / f(i), rel=1e-9)
    assert torch.equal(pt.cosine_beta_schedule(20), b20)


def _agent(use_ddim=False, K=20, K_ft=10, T_a=4, D_a=2, D_o=3):
    torch.manual_seed(0)
    base = DiffusionMLP(D_a, T_a, D_o, mlp_dims=(32, 32, 32))
    return ft.DiffusionPPO(base, ObsCritic(D_o, mlp_dims=(16, 16, 16)), K, K_ft, T_a, D_a, use_ddim, 5, 0.1, 0.1, 3.0)


def test_ddpm_step_matches_hand_computation():
    agent = _agent()
    betas = ft.cosine_beta_schedule(20)
    ac = torch.cumprod(1 - betas, 0)
    x, cond = torch.randn(5, 4, 2), torch.randn(5, 1, 3)
    for j in (0, 12, 19):
        t = 19 - j
        eps = agent.actor(x, torch.full((5,), t), cond).double()
        a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64))
        x0 = (math.sqrt(1 / a_t) * x.double() - math.sqrt(1 / a_t - 1) * eps).clamp(-1, 1)
        c1 = betas[t] * a_prev.sqrt() / (1 - a_t)
        c2 = (1 - betas[t]).sqrt() * (1 - a_prev) / (1 - a_t)
        var = max((betas[t] * (1 - a_prev) / (1 - a_t)).item(), 1e-20)
        mean, std = agent.p_mean_std(agent.actor, x, torch.full((5,), j), cond)
        torch.testing.assert_close(mean.double(), c1 * x0 + c2 * x.double(), atol=1e-5, rtol=1e-5)
        assert std.flatten()[0].item() == pytest.approx(math.sqrt(var), rel=1e-5, abs=1e-12)


def test_ddim_step_matches_hand_computation():
    agent = _agent(use_ddim=True, K=100, K_ft=5)
    assert agent.ts.tolist() == [80, 60, 40, 20, 0] and agent.first_ft == 0
    ac = torch.cumprod(1 - ft.cosine_beta_schedule(100), 0)
    x, cond = torch.randn(5, 4, 2), torch.randn(5, 1, 3)
    for j, (t, t_prev) in enumerate([(80, 60), (60, 40), (40, 20), (20, 0), (0, None)]):
        a = ac[t].item()
        a_prev = ac[t_prev].item() if t_prev is not None else 1.0
        eps = agent.actor(x, torch.full((5,), t), cond).double()
        x0 = ((x.double() - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps2 = (x.double() - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = max(math.sqrt(max((1 - a_prev) / (1 - a) * (1 - a / a_prev), 0)), 1e-10)
        mu = math.sqrt(a_prev) * x0 + math.sqrt(max(0, 1 - a_prev - sigma**2)) * eps2
        mean, std = agent.p_mean_std(agent.actor, x, torch.full((5,), j), cond)
        torch.testing.assert_close(mean.double(), mu, atol=1e-5, rtol=1e-5)
        assert std.flatten()[0].item() == pytest.approx(sigma, rel=1e-5)
        mu0 = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps2  # η = 0 in evaluation
        mean0, std0 = agent.p_mean_std(agent.actor, x, torch.full((5,), j), cond, deterministic=True)
        torch.testing.assert_close(mean0.double(), mu0, atol=1e-5, rtol=1e-5)
        assert std0.abs().max() == 0


def test_logprob_matches_torch_normal():
    agent = _agent()
    cond, x_t, x_prev = torch.randn(6, 1, 3), torch.randn(6, 4, 2), torch.randn(6, 4, 2)
    i = torch.tensor([0, 1, 5, 9, 9, 3])
    lp = agent.get_logprobs(cond, x_t, x_prev, i)
    mean, std = agent.p_mean_std(agent.actor_ft, x_t, agent.first_ft + i, cond)
    ref = torch.distributions.Normal(mean, std.clamp(min=0.1).expand_as(mean)).log_prob(x_prev)
    torch.testing.assert_close(lp, ref)


def test_sampling_chain_and_frozen_split():
    agent = _agent()
    cond = torch.randn(7, 1, 3)
    x, chain = agent.get_action(cond)
    assert chain.shape == (7, 11, 4, 2) and torch.equal(chain[:, -1], x)
    # the last K' steps run actor_ft: perturbing it changes the samples, perturbing nothing else does not
    torch.manual_seed(3)
    _, c1 = agent.get_action(cond)
    with torch.no_grad():
        for p in agent.actor_ft.parameters():
            p.add_(0.1)
    torch.manual_seed(3)
    _, c2 = agent.get_action(cond)
    torch.testing.assert_close(c1[:, 0], c2[:, 0])          # input of the first fine-tuned step: base only
    assert not torch.allclose(c1[:, 1], c2[:, 1])
    # deterministic DDPM sampling has no noise at t = 0: x_0 equals the mean of the last step
    torch.manual_seed(4)
    x_det, chain_det = agent.get_action(cond, deterministic=True)
    mean, _ = agent.p_mean_std(agent.actor_ft, chain_det[:, -2], torch.full((7,), 19), cond)
    torch.testing.assert_close(x_det, mean)


@pytest.mark.parametrize("use_ddim,K,K_ft", [(False, 20, 10), (False, 10, 10), (True, 20, 5)])
def test_old_logprobs_taken_while_sampling_equal_the_second_pass(use_ddim, K, K_ft):
    """`rollout_action` draws the chain `get_action` draws (same noise) and its log-probs are `pair_logprobs` of the
    chain's pairs recomputed afterwards by actor_ft (what the reference does after the rollout): float rounding apart.
    actor_ft is moved off the base network so that a log-prob taken with the wrong network would show."""
    agent = _agent(use_ddim, K, K_ft)
    with torch.no_grad():
        for p in agent.actor_ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = torch.randn(9, 1, 3)
    torch.manual_seed(5)
    x, chain = agent.get_action(cond)
    torch.manual_seed(5)
    x2, chain2, lp = agent.rollout_action(cond, 3)
    assert torch.equal(x, x2) and torch.equal(chain, chain2) and lp.shape == (9, K_ft)
    i = torch.arange(K_ft).repeat(9)
    s = torch.arange(9).repeat_interleave(K_ft)
    with torch.no_grad():
        again = ft.pair_logprobs(agent, cond[s], chain[s, i], chain[s, i + 1], i, 3).view(9, K_ft)
    torch.testing.assert_close(lp, again, rtol=0, atol=1e-5)
    assert lp.std() > 0.1  # not a constant (e.g. everything clamped)


def test_clip_schedule_and_denoising_discount():
    eps = ft.clip_schedule(10, 0.001, 0.01, 3.0)
    u = np.arange(10) / 9
    expected = 0.001 + 0.009 * (np.exp(3 * u) - 1) / (np.exp(3) - 1)
    np.testing.assert_allclose(eps.numpy(), expected, rtol=1e-6)
    assert eps[0].item() == pytest.approx(0.001) and eps[-1].item() == pytest.approx(0.01)
    one = ft.clip_schedule(1, 0.001, 0.01, 3.0)
    assert torch.isfinite(one).all() and one.item() == pytest.approx(0.01)
    assert torch.allclose(ft.clip_schedule(4, 0.1, 0.1, 3.0), torch.full((4,), 0.1))
    d = ft.denoising_discount(4, 0.9)
    torch.testing.assert_close(d, torch.tensor([0.9**3, 0.9**2, 0.9, 1.0]))


def _gae_loop(r, v, nv, term, done, gamma, lam):
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        a = 0.0
        for t in reversed(range(T)):
            delta = r[t, n] + gamma * (0.0 if term[t, n] else nv[t, n]) - v[t, n]
            a = delta + gamma * lam * (0.0 if done[t, n] else a)
            adv[t, n] = a
    return adv


def test_gae_truncation_bootstraps_and_termination_does_not():
    rng = np.random.default_rng(0)
    T, N = 6, 3
    r, v, nv = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    term, trunc = np.zeros((T, N)), np.zeros((T, N))
    term[2, 0] = 1   # env 0 terminates at t=2
    trunc[3, 1] = 1  # env 1 is truncated at t=3: bootstrap from its final observation nv[3, 1]
    done = np.maximum(term, trunc)
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    adv, ret = ft.compute_gae(as_t(r), as_t(v), as_t(nv), as_t(term), as_t(done), 0.99, 0.95)
    np.testing.assert_allclose(adv.numpy(), _gae_loop(r, v, nv, term, done, 0.99, 0.95), atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), adv.numpy() + v)
    assert adv[3, 1].item() == pytest.approx(r[3, 1] + 0.99 * nv[3, 1] - v[3, 1])  # truncated: bootstrap, no carry
    assert adv[2, 0].item() == pytest.approx(r[2, 0] - v[2, 0])                     # terminated: no bootstrap


def test_ppo_loss_by_hand():
    new = torch.tensor([0.0, 0.5, -0.5, 0.02])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    a = torch.tensor([1.0, 2.0, -1.0, -0.5])  # advantages as the loss gets them (normalised and discounted)
    eps = torch.tensor([0.1, 0.1, 0.2, 0.01])
    pg, kl, clipfrac = ft.ppo_loss(new, old, a, eps)
    r = new.exp()
    terms = [max(-a[k] * r[k], -a[k] * min(max(r[k], 1 - eps[k]), 1 + eps[k])) for k in range(4)]
    assert pg.item() == pytest.approx(float(sum(terms) / 4), rel=1e-6)
    assert kl.item() == pytest.approx(float(((r - 1) - new).mean()), rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.75)  # pairs 1, 2 and 3 are outside their clip range
    pieces = [ft.ppo_loss(new[j], old[j], a[j], eps[j], n=4) for j in (slice(0, 3), slice(3, 4))]  # shares of the mean
    for k, whole in enumerate((pg, kl, clipfrac)):
        assert (pieces[0][k] + pieces[1][k]).item() == pytest.approx(whole.item(), rel=1e-6)
    lp = new.clone().requires_grad_(True)
    ft.ppo_loss(lp, old, a, eps)[0].backward()  # through pair 0 (inside its range) and 3 (worse than clipped)
    expected = [(-a[k] * r[k] / 4).item() if abs(r[k] - 1) <= eps[k] or (a[k] > 0) == (r[k] < 1) else 0.0 for k in range(4)]
    torch.testing.assert_close(lp.grad, torch.tensor(expected))
    assert lp.grad[0] != 0 and lp.grad[3] != 0 and lp.grad[1] == lp.grad[2] == 0


def test_running_reward_scaler_against_plain_computation():
    """Reference order (`util/reward_scaling.py` `RunningRewardScaler.__call__`): all of an iteration's
    discounted returns update the running statistics in one batch, then every reward is scaled."""
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(2, 20, 3)) + 1  # two iterations of (n_steps, N)
    firsts = np.zeros((2, 20, 3))
    firsts[0, 0] = 1
    firsts[0, 7, 1] = 1
    firsts[1, 3, 2] = 1
    sc = ft.RunningRewardScaler(3)
    # plain computation: ret per env, pooled moments merged into (count 1e-4, mean 0, var 1), var = M2 / (count - 1)
    ret, mean, var, count = np.zeros(3), 0.0, 1.0, 1e-4
    for it in range(2):
        rets = []
        for t in range(20):
            ret = rewards[it, t] + 0.99 * (1 - firsts[it, t]) * ret
            rets.append(ret.copy())
        x = np.concatenate(rets)
        bm, bv, n = x.mean(), x.var(), x.size
        delta, tot = bm - mean, count + n
        m2 = var * count + bv * n + delta**2 * count * n / tot
        mean, var, count = mean + delta * n / tot, m2 / (tot - 1), tot
        expected = np.clip(rewards[it] / np.sqrt(var + 1e-8), -10, 10)
        out = sc(rewards[it], firsts[it])
        assert out.shape == (20, 3)
        np.testing.assert_allclose(out, expected, rtol=1e-12)  # every step scaled with the variance after the update
    assert sc.var == pytest.approx(var, rel=1e-12) and sc.count == pytest.approx(count)
    buf = io.BytesIO()  # through a checkpoint: the run saves it by its attributes (`runs.object_state`)
    torch.save(runs.object_state(sc), buf)
    buf.seek(0)
    sc2 = ft.RunningRewardScaler(3)
    runs.load_object_state(sc2, torch.load(buf, weights_only=True))
    assert isinstance(sc2.ret, np.ndarray) and isinstance(sc2.var, float)
    np.testing.assert_allclose(sc2(rewards[0], firsts[0]), sc(rewards[0], firsts[0]))
    assert sc2.var == sc.var

    spike = np.zeros((200, 2))
    spike[100, 0] = 1e3  # one reward ~20 running stds above the rest: clipped to +10
    out = ft.RunningRewardScaler(2)(spike, np.ones((200, 2)))
    assert out.max() == 10.0 and (out[spike == 0] == 0).all()


def test_episode_tracker_counts_every_episode_that_ends():
    tracker = EpisodeTracker(2, act_steps=4, success_chunk_reward=1.0)
    rewards = np.array([[1.0, 0.0], [4.0, 0.0], [0.0, 8.0], [2.0, 0.0]])
    dones = np.array([[0, 0], [1, 0], [0, 0], [0, 0]], bool)
    for r, d in zip(rewards, dones):
        tracker.step(r, d)
    s = tracker.pop()  # only env 0's first episode ended in this iteration
    assert s["n_episodes"] == 1 and s["return_mean"] == 5.0 and s["success_rate"] == 1.0 and s["episode_length"] == 2
    # the next iteration continues the running episodes: env 1's began 4 chunk-steps ago
    tracker.step(np.array([0.0, 1.0]), np.array([False, True]))
    s = tracker.pop()
    assert s["n_episodes"] == 1 and s["return_mean"] == 9.0 and s["episode_length"] == 5 and s["success_rate"] == 1.0
    assert np.isnan(tracker.pop()["return_mean"])  # no episode ended since the last pop: nan, not a made-up number
    tracker.reset()  # the envs were reset: env 0's running episode (return 2) is dropped
    tracker.step(np.array([1.0, 1.0]), np.array([True, False]))
    s = tracker.pop()
    assert s["return_mean"] == 1.0 and s["success_rate"] == 0.0  # 1 / 4 < 1


def _update_gradients(agent, b_obs, b_chain, b_adv, b_ret, idx, old_lp, fast, chunk=None):
    """One minibatch's losses and gradients: `fast` as `dppo_finetune.main` computes them (pieces of `chunk` pairs, the
    value and BC terms with the first, the critic once per env-step); else the whole minibatch in one piece with the
    critic once per pair. BC coefficient 0.1."""
    K_ft, B = agent.ft_steps, idx.numel()
    S = b_obs.shape[0]
    pos, sample = torch.arange(K_ft).repeat(S), torch.arange(S).repeat_interleave(K_ft)
    disc, eps = ft.denoising_discount(K_ft, 0.9), ft.clip_schedule(K_ft, 0.01, 0.1, 3.0)
    s, i = sample[idx], pos[idx]
    adv = (b_adv[s] - b_adv[s].mean()) / (b_adv[s].std() + 1e-8) * disc[i]
    values = ft.minibatch_values(agent.critic, b_obs, s) if fast else agent.get_value(b_obs[s])
    v_loss = 0.5 * ((values - b_ret[s]) ** 2).mean()
    torch.manual_seed(7)
    bc_loss = agent.bc_loss(b_obs[s])
    agent.zero_grad(set_to_none=True)
    totals = torch.zeros(3)
    for a in range(0, B, chunk if fast else B):
        p = slice(a, a + (chunk if fast else B))
        new_lp = ft.pair_logprobs(agent, b_obs[s[p]], b_chain[s[p], i[p]], b_chain[s[p], i[p] + 1], i[p], 3)
        pg, kl, cf = ft.ppo_loss(new_lp, old_lp[idx[p]], adv[p], eps[i[p]], B)
        (pg + (0.5 * v_loss + 0.1 * bc_loss if a == 0 else 0.0)).backward()
        totals += torch.stack([pg.detach(), kl, cf])
    grads = {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
    return torch.stack([totals[0], v_loss.detach(), totals[1], totals[2]]), grads


@pytest.mark.parametrize("S,B,chunk", [(30, 120, 50), (30, 120, 1000), (60, 37, 8)])
def test_critic_once_per_env_step_and_chunked_backward_give_the_same_loss_and_gradient(S, B, chunk):
    """The fast update of `dppo_finetune.main` (critic once per env-step, all env-steps when S <= B or the distinct ones;
    the minibatch back-propagated in pieces) against the whole-minibatch formulation on a fixed minibatch: the same
    losses, approx KL, clip fraction and gradients of actor_ft (PPO and BC terms) and the critic, up to float rounding."""
    torch.manual_seed(0)
    agent = _agent()
    with torch.no_grad():  # actor_ft away from the chains' policy, so that ratios differ from 1 and some clip
        for p in agent.actor_ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b_obs = torch.randn(S, 1, 3)
    with torch.no_grad():
        _, b_chain = agent.get_action(b_obs)
    b_adv, b_ret = torch.randn(S), torch.randn(S)
    K_ft = agent.ft_steps
    pos, sample = torch.arange(K_ft).repeat(S), torch.arange(S).repeat_interleave(K_ft)
    with torch.no_grad():  # old log-probs in pieces equal those in one pass (the frozen copy's policy)
        def lp(j):
            s, i = sample[j], pos[j]
            return ft.pair_logprobs(agent, b_obs[s], b_chain[s, i], b_chain[s, i + 1], i, 3)
        whole = lp(torch.arange(S * K_ft))
        old_lp = torch.cat([lp(j) for j in torch.arange(S * K_ft).split(7)])
        torch.testing.assert_close(old_lp, whole, rtol=0, atol=1e-6)
        old_lp = old_lp + 0.02 * torch.randn_like(old_lp)
    idx = torch.randperm(S * K_ft)[:B]
    ref, g_ref = _update_gradients(agent, b_obs, b_chain, b_adv, b_ret, idx, old_lp, fast=False)
    got, g_got = _update_gradients(agent, b_obs, b_chain, b_adv, b_ret, idx, old_lp, fast=True, chunk=chunk)
    assert 0 < ref[3] < 1  # some pairs clip, some do not
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert set(g_got) == set(g_ref) and any(n.startswith("critic") for n in g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-6 * g_ref[n].abs().max().item(), msg=n)


def test_minibatch_values_runs_the_critic_on_each_env_step_once():
    critic, calls = ObsCritic(3, 1), []
    critic.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    b_obs = torch.randn(50, 1, 3)
    s = torch.tensor([4, 4, 9, 4, 17, 9])  # 3 distinct env-steps of 50, 6 pairs: the distinct rows only
    torch.testing.assert_close(ft.minibatch_values(critic, b_obs, s), critic(b_obs[s]))
    s = torch.randint(0, 50, (80,))  # more pairs than env-steps: every env-step once
    torch.testing.assert_close(ft.minibatch_values(critic, b_obs, s), critic(b_obs[s]))
    assert calls == [3, 6, 50, 80]
