"""exact_likelihood_pg.py: the probability-flow log-likelihood against closed forms, the divergence
estimators, the PPO loss by hand, reference vectors from the reference's own model code, and a smoke run."""

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_pretrain as pt
import exact_likelihood_pg as el
from common.errors import UsageError
from common.networks import DiffusionMLP, ObsCritic
from tests.helpers import WiringRecorder
from tests.test_reference_vectors import load_by_order, ref_weights

REF = Path(__file__).parent / "reference"
SMALL = dict(mlp_dims=(64, 64, 64), batch_size=128, learning_rate=1e-3, min_lr=1e-4, n_eval_envs=8)


def make_agent(net: torch.nn.Module, K: int = 20, T_a: int = 4, D_a: int = 2, step: float = 0.05, scale: float = 1.0,
               exact_max: int = 8, critic: torch.nn.Module | None = None, probes: int = 2,
               randn_clip: float = 3.0) -> el.ExactLikelihoodPG:
    return el.ExactLikelihoodPG(net, critic or torch.nn.Identity(), K, T_a, D_a, 0.1, randn_clip, 1e-4, step, 1e-10,
                                probes, exact_max, scale)


class GaussianEps(torch.nn.Module):
    """The exact ε-prediction for data x0 ~ N(0, s²I): ε(x_t, t) = √(1-ᾱ_t)·x_t / (ᾱ_t s² + 1 - ᾱ_t)."""

    def __init__(self, sigma: torch.Tensor, s2: float) -> None:
        super().__init__()
        self.sigma, self.s2 = sigma, s2

    def forward(self, x, t, cond):
        sig = self.sigma[t].view(-1, 1, 1)
        ab = 1 - sig**2
        return sig * x / (ab * self.s2 + 1 - ab)


def gaussian_bits(x0: torch.Tensor, var: float) -> torch.Tensor:
    """log N(x0; 0, var·I) in bits per dimension."""
    N = x0[0].numel()
    return (-0.5 * N * math.log(2 * math.pi * var) - (x0.double() ** 2).sum((1, 2)) / (2 * var)) / (math.log(2) * N)


def test_ode_likelihood_of_a_gaussian_flow_matches_its_closed_form():
    """With the exact ε of N(0, s²I) data the drift is linear, f = -a(t)·x with a(t) = ½β_i(1 - 1/(ᾱ_i s² + 1 - ᾱ_i)),
    i = round(t·K): the flow scales x by g = exp(-∫a dt) and the model density is N(0, g⁻²I). At the reference's
    settings (K 20, Euler step 0.05, β(t) = β_i) the Euler log-likelihood agrees within its first-order error."""
    s2, K = 0.3, 20
    torch.manual_seed(0)
    x0 = torch.randn(64, 4, 2) * math.sqrt(s2)
    agent = make_agent(torch.nn.Identity(), K)
    agent.actor = GaussianEps(agent.sde_sigma, s2)
    assert agent.exact_divergence and agent.ode_idx == list(range(K))  # T_a·D_a = 8; one Euler step per denoising step
    with torch.no_grad():
        lp = agent.log_likelihood(torch.zeros(64, 1, 3), x0, *agent.probes(64, x0.device))
    beta, sig = agent.sde_beta.double(), agent.sde_sigma.double()
    a = 0.5 * beta * (1 - 1 / ((1 - sig**2) * s2 + sig**2))
    i = torch.arange(K)
    length = (i + 0.5).div(K).clamp(max=1.0) - (i - 0.5).div(K).clamp(min=1e-4)  # the t where round(t·K) = i
    var = math.exp(2 * (a * length).sum().item())
    err = (lp.double() - gaussian_bits(x0, var)).abs().max().item()
    assert err < 1e-3  # Euler error at step 0.05 (measured 3e-4); a sign or scale error is > 0.05
    # the reference's time scale integrates only ∫β dt = Σβ_i/K ≈ 0.24: the density stays near N(0, 0.95), not N(0, s²)
    assert 0.9 < var < 1.0


def test_consistent_time_scale_recovers_the_data_density():
    """β(t) = K·β_i (`--sde-beta-scale K`) with one Euler step per denoising step of a fine schedule (K = 1000):
    the ODE carries N(0, s²I) data to ≈ N(0, I), and the log-likelihood is the data's Gaussian log-density."""
    s2, K = 0.3, 1000
    torch.manual_seed(1)
    x0 = torch.randn(32, 4, 2) * math.sqrt(s2)
    agent = make_agent(torch.nn.Identity(), K, step=1 / K, scale=K)
    agent.actor = GaussianEps(agent.sde_sigma, s2)
    with torch.no_grad():
        lp = agent.log_likelihood(torch.zeros(32, 1, 3), x0, *agent.probes(32, x0.device))
    assert (lp.double() - gaussian_bits(x0, s2)).abs().max().item() < 0.02  # measured 0.009


def tiny_net(seed: int = 0, T_a: int = 2, D_a: int = 2) -> DiffusionMLP:
    torch.manual_seed(seed)
    return DiffusionMLP(D_a, T_a, 3, 1, time_dim=8, mlp_dims=(16, 16, 16), activation="mish")


def test_exact_divergence_and_hutchinson_mean_match_the_jacobian_trace():
    """One Euler step (step 1 covers [ε, 1]): log p·ln2·N = prior(x + Δt·f) + Δt·∇·f. The basis-probe path gives
    the Jacobian's trace exactly; Hutchinson's Rademacher estimate averaged over many probes converges to it."""
    net, B, T_a, D_a = tiny_net(), 3, 2, 2
    agent = make_agent(net, 20, T_a, D_a, step=1.0, exact_max=4)
    assert agent.ode_idx == [0] and len(agent.ode_dt) == 1
    torch.manual_seed(2)
    x0, cond = torch.rand(B, T_a, D_a) * 2 - 1, torch.rand(B, 1, 3)
    traces = []
    for b in range(B):  # independent: the trace of the autograd Jacobian of the drift
        jac = torch.autograd.functional.jacobian(lambda x: agent.drift(x.view(1, T_a, D_a), 0, cond[b:b + 1]), x0[b])
        traces.append(jac.reshape(T_a * D_a, T_a * D_a).trace())
    traces = torch.stack(traces)
    dt, scale = agent.ode_dt[0], math.log(2) * T_a * D_a
    with torch.no_grad():
        exact = agent.log_likelihood(cond, x0, *agent.probes(B, x0.device))
        P = 4000
        rad = torch.randint(0, 2, (B * P, T_a, D_a)).float() * 2 - 1
        hutch = agent.log_likelihood(cond, x0, rad, 1.0 / P)
        single = agent.log_likelihood(cond, x0, rad.view(B, P, T_a, D_a)[:, :2].reshape(B * 2, T_a, D_a), 0.5)
    x1 = x0 + dt * agent.drift(x0, 0, cond).detach()
    prior = -T_a * D_a / 2 * math.log(2 * math.pi) - (x1**2).sum((1, 2)) / 2
    torch.testing.assert_close(exact * scale, prior + dt * traces, atol=1e-5, rtol=1e-5)
    # Hutchinson: unbiased; its per-probe spread gives the tolerance (4 standard errors of the mean)
    est = ((torch.autograd.functional.jvp(lambda x: agent.drift(x, 0, cond.repeat_interleave(P, 0)),
                                          x0.repeat_interleave(P, 0), rad)[1]) * rad).sum((1, 2)).view(B, P)
    tol = 4 * est.std(1) / math.sqrt(P) * dt
    assert ((hutch - exact).abs() * scale <= tol + 1e-6).all()
    assert (est.std(1) > 1e-3).all()  # the estimator is noisy per probe (so the test can tell mean from draw)
    assert ((single - exact).abs() > 0).any()


def log_likelihood_repeated(agent: el.ExactLikelihoodPG, cond: torch.Tensor, x0: torch.Tensor, probes: torch.Tensor,
                            weight: float) -> torch.Tensor:
    """The earlier formulation, kept as the reference: every sample repeated P times (one row per probe) through the
    network, one vjp of the (B·P)-row drift with all probes at once."""
    B, P = x0.shape[0], probes.shape[0] // x0.shape[0]
    build_graph = torch.is_grad_enabled()
    rep = lambda z: z.unsqueeze(1).expand(B, P, *z.shape[1:]).reshape(B * P, *z.shape[1:])  # noqa: E731
    cond_p, x, delta = rep(cond), x0, x0.new_zeros(B)
    for i, dt in zip(agent.ode_idx, agent.ode_dt):
        with torch.enable_grad():
            x_p = rep(x) if build_graph else rep(x).detach()
            if not x_p.requires_grad:
                x_p.requires_grad_(True)
            f = agent.drift(x_p, i, cond_p)
            (vjp,) = torch.autograd.grad((f * probes).sum(), x_p, create_graph=build_graph)
        div = (vjp * probes).sum(dim=(1, 2)).view(B, P).sum(1) * weight
        drift = f.view(B, P, *f.shape[1:])[:, 0]
        if not build_graph:
            drift, div = drift.detach(), div.detach()
        x, delta = x + dt * drift, delta + dt * div
    prior = -agent.dim / 2.0 * math.log(2 * math.pi) - (x**2).sum(dim=(1, 2)) / 2.0
    return (prior + delta) / (math.log(2) * agent.dim)


@pytest.mark.parametrize("exact_max, n_probes", [(0, 3), (8, 2)])  # Hutchinson, 3 probes; exact, 4 basis probes
def test_one_forward_per_step_matches_the_repeated_rows(exact_max, n_probes):
    """log_likelihood (one forward on B rows, P vjps) equals the B·P-row formulation: values without and with grad
    mode, and the network gradients of a loss on them (the PPO update's double backward)."""
    T_a, D_a, B = 2, 2, 5
    agent = make_agent(tiny_net(3, T_a, D_a), 20, T_a, D_a, exact_max=exact_max, probes=n_probes)
    assert agent.exact_divergence == (exact_max == 8) and len(agent.ode_idx) == 20
    torch.manual_seed(4)
    x0, cond, coef = torch.rand(B, T_a, D_a) * 2 - 1, torch.rand(B, 1, 3), torch.randn(B)
    probes, w = agent.probes(B, x0.device)
    assert probes.shape[0] == B * (T_a * D_a if agent.exact_divergence else n_probes)
    if not agent.exact_divergence:
        assert (probes.abs() == 1).all() and w == 1 / n_probes
    with torch.no_grad():
        new, ref = agent.log_likelihood(cond, x0, probes, w), log_likelihood_repeated(agent, cond, x0, probes, w)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    assert not new.requires_grad
    params = list(agent.actor.parameters())
    grads = []
    for fn in (agent.log_likelihood, lambda *a: log_likelihood_repeated(agent, *a)):
        lp = fn(cond, x0, probes, w)
        torch.testing.assert_close(lp.detach(), ref, rtol=1e-5, atol=1e-6)
        grads.append(torch.autograd.grad((coef * lp).sum(), params))
    for g_new, g_ref in zip(*grads):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in grads[0]) > 0


def test_ppo_loss_by_hand():
    new = torch.tensor([-1.0, -0.9, -6.0, 2.5])
    old = torch.tensor([-1.05, -1.0, -5.5, 2.0])
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    a = (adv - adv.mean()) / (adv.std() + 1e-8)  # as the loop normalises the minibatch's advantages
    pg, kl, cf = el.ppo_loss(new, old, a, 0.02)
    # clamped to [-5, 2]: log-ratios 0.05, 0.1, 0, 0; advantages normalised with the unbiased std sqrt(5/3)
    r = [math.exp(0.05), math.exp(0.1), 1.0, 1.0]
    a_hand = [(x - 0.5) / (math.sqrt(5 / 3) + 1e-8) for x in (1.0, -1.0, 2.0, 0.0)]
    torch.testing.assert_close(a, torch.tensor(a_hand))
    terms = [max(-ai * ri, -ai * min(max(ri, 0.98), 1.02)) for ai, ri in zip(a_hand, r)]
    assert pg.item() == pytest.approx(sum(terms) / 4, abs=1e-6)
    assert kl.item() == pytest.approx((math.exp(0.05) - 1 - 0.05 + math.exp(0.1) - 1 - 0.1) / 4, abs=1e-6)
    assert cf.item() == pytest.approx(0.5)
    pieces = [el.ppo_loss(new[j], old[j], a[j], 0.02, n=4) for j in (slice(0, 3), slice(3, 4))]  # shares of the mean
    for k, whole in enumerate((pg, kl, cf)):
        assert (pieces[0][k] + pieces[1][k]).item() == pytest.approx(whole.item(), abs=1e-7)


# ---- reference vectors: irom-princeton/dppo PPOExactDiffusion with the hopper / can configs' sde settings ----

@pytest.mark.parametrize("tag,obs_dim,action_dim,activation", [("hopper", 11, 3, "relu"), ("can", 23, 7, "mish")])
def test_reference_vectors(tag, obs_dim, action_dim, activation):
    with np.load(REF / "exact_likelihood.npz") as f:
        d = {k: f[k] for k in f.files if k.startswith(tag + ".")}
    g = lambda k: torch.from_numpy(d[f"{tag}.{k}"])  # noqa: E731
    net = DiffusionMLP(action_dim, 4, obs_dim, 1, time_dim=16, mlp_dims=(24, 24, 24), activation=activation)
    load_by_order(net, ref_weights(d, f"{tag}.actor"))
    critic = ObsCritic(obs_dim, 1, mlp_dims=(24, 24, 24))
    load_by_order(critic, ref_weights(d, f"{tag}.critic"))
    # the reference's exact-likelihood configs leave randn_clip_value at its code default, 10 (ours: 3)
    agent = make_agent(net, 20, 4, action_dim, critic=critic, randn_clip=10.0)
    assert not agent.exact_divergence  # T_a·D_a = 12 or 28: Hutchinson, 2 Rademacher probes, as the reference
    obs, B = g("obs"), g("obs").shape[0]
    torch.manual_seed(2)
    torch.testing.assert_close(agent.get_action(obs), g("samples"), atol=1e-5, rtol=0)  # whole-network DDPM sampling
    samples = g("samples")
    torch.manual_seed(4)
    probes, w = agent.probes(B, samples.device)
    assert torch.equal(probes, g("probes_old")) and w == 0.5  # drawn as the reference draws them
    with torch.no_grad():
        old = agent.log_likelihood(obs, samples, probes, w)
    torch.testing.assert_close(old, g("logprobs_old"), atol=1e-5, rtol=0)
    new = agent.log_likelihood(obs, samples, g("probes_new"), 0.5)
    torch.testing.assert_close(new.detach(), g("logprobs_new"), atol=1e-5, rtol=0)
    adv = g("advantages")  # normalised over the minibatch, as the reference's loss and our loop do
    pg, kl, cf = el.ppo_loss(new, old, (adv - adv.mean()) / (adv.std() + 1e-8), 0.01)
    v_loss = 0.5 * ((critic(obs) - g("returns")) ** 2).mean()
    for name, ours in (("pg_loss", pg), ("approx_kl", kl), ("clipfrac", cf), ("v_loss", v_loss),
                       ("ratio_mean", (new.clamp(-5, 2) - old.clamp(-5, 2)).exp().mean())):
        assert abs(ours.item() - g(name).item()) < 1e-5, name
    # the gradient through the ODE, divergence included: the reference's grad(frozen) + grad(actor_ft) with equal weights
    pg.backward()
    grads = [p.grad for p in net.parameters()]
    ref = [g(f"pg_grad.{i:03d}") for i in range(len(grads))]
    scale = max(r.abs().max().item() for r in ref)
    assert scale > 1e-4
    for ours, r in zip(grads, ref):
        torch.testing.assert_close(ours, r, atol=1e-5 * max(1.0, scale), rtol=1e-4)


# ---- the script ----

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small Avoid M2 diffusion policy (3 epochs) and its run."""
    os.chdir(tmp_path_factory.mktemp("runs"))
    return pt.main(pt.Args(env_id="avoid-m2", n_epochs=3, eval_every=0, seed=0, **SMALL))


def test_smoke_two_iterations(pretrained):
    out = el.main(el.Args(env_id="avoid-m2", checkpoint=pretrained["checkpoint"], n_train_itr=2, num_envs=4,
                          n_steps=25, val_freq=1, seed=0, plot=False))
    h = out["history"]
    assert [x["iteration"] for x in h] == [0, 1] and [x["env_steps"] for x in h] == [400, 800]
    for x in h:
        assert all(np.isfinite(x[k]) for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "old_logprob_mean"))
        assert {"time_sampling", "time_env", "time_old_logprobs", "time_update"} <= set(x)
        assert x["n_episodes"] == 4 and -5 < x["old_logprob_mean"] < 2
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "eval.csv"))))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2] and all(r["mode"] == "stochastic" for r in rows)
    pre = torch.load(pretrained["checkpoint"], weights_only=True)
    post = torch.load(out["checkpoint"], weights_only=True)
    assert post["method"] == "exact_likelihood_pg" and post["itr"] == 2 and "base" not in post
    assert any(not torch.equal(post["actor"][k], v) for k, v in pre["ema"].items())  # the whole network moved
    el.main(el.Args(resume=out["run_dir"], n_train_itr=3, plot=False))  # the checkpoint reloads and continues
    assert torch.load(out["checkpoint"], weights_only=True)["itr"] == 3
    ev = el.main(el.Args(checkpoint=out["checkpoint"], eval_only=True, num_envs=4, seed=0))  # its `actor` evaluates
    assert ev["eval"]["stochastic"]["n_episodes"] == 4


@pytest.mark.parametrize("exact_max,fixed,noisy", [(8, False, False), (0, False, True), (0, True, False)])
def test_ratio_is_one_before_the_actor_steps(pretrained, exact_max, fixed, noisy):
    """During the critic warm-up the actor does not move, so each minibatch's new log-likelihoods equal the old ones
    of the same samples: no clipping with the exact divergence or with fixed probes; fresh Hutchinson probes (the
    reference's way) already clip by estimator noise alone."""
    out = el.main(el.Args(env_id="avoid-m2", checkpoint=pretrained["checkpoint"], n_train_itr=2, num_envs=4,
                          n_steps=25, seed=0, plot=False, n_critic_warmup_itr=1, update_epochs=1,
                          exact_divergence_max_dim=exact_max, fixed_probes=fixed, exp_name=f"ratio{exact_max}{fixed}"))
    h = out["history"][0]
    if noisy:
        assert h["clipfrac"] > 0.05 and h["approx_kl"] > 1e-6
    else:
        assert h["clipfrac"] == 0 and h["approx_kl"] < 1e-9


def test_defaults_and_refusals():
    args = el.Args(env_id="hopper")
    el.fill_defaults(args)
    assert (args.batch_size, args.update_epochs, args.n_steps, args.num_envs, args.actor_lr, args.clip_coef) == (
        5000, 5, 500, 40, 1e-5, 0.01)
    args = el.Args(env_id="can")
    el.fill_defaults(args)
    assert (args.batch_size, args.update_epochs, args.gamma, args.n_critic_warmup_itr, args.n_train_itr) == (
        7500, 10, 0.999, 2, 300)
    args = el.Args()
    el.fill_defaults(args)
    assert (args.batch_size, args.num_envs, args.n_steps, args.bootstrap_truncated) == (625, 50, 25, False)
    with pytest.raises(UsageError, match="furniture"):
        el.fill_defaults(el.Args(env_id="one-leg-low"))
    with pytest.raises(UsageError, match="past the last denoising step"):
        el.ode_grid(20, 1e-4, 0.01)


def test_wiring_of_rewards_gae_and_the_loss(pretrained, monkeypatch):
    """What `main` hands to its parts in one 60-chunk-step Avoid iteration with T_e = 2 (50-step episodes truncated in
    the middle), --bootstrap-truncated, γ 0.97, λ 0.9, one minibatch of all 120 env-steps: firsts, the bootstrap
    observation, γ and λ (tests/helpers.py, WiringRecorder); the PPO loss gets the GAE advantages with their sign,
    normalised over the minibatch, and the clip range, and the critic regresses each sample on its GAE return
    (advantage + V(s))."""
    ckpt = torch.load(pretrained["checkpoint"], map_location="cpu", weights_only=True)
    rec = WiringRecorder(el, monkeypatch, ckpt["normalization"])
    losses, fits = [], []
    real_loss, recorded_critic = el.ppo_loss, el.ObsCritic
    monkeypatch.setattr(el, "ppo_loss", lambda new_lp, old_lp, adv, clip, n:
                        losses.append((n, adv, clip)) or real_loss(new_lp, old_lp, adv, clip, n))

    class Critic(recorded_critic):  # V(s) of the update's batch and d loss / d V(s)
        def forward(self, obs):
            v = super().forward(obs)
            if torch.is_grad_enabled():
                v.register_hook(lambda g, v=v.detach(): fits.append((v, g)))
            return v
    monkeypatch.setattr(el, "ObsCritic", Critic)
    N, n_steps = 2, 60
    el.main(el.Args(env_id="avoid-m2", checkpoint=pretrained["checkpoint"], n_train_itr=1, num_envs=N, n_steps=n_steps,
                    act_steps=2, val_freq=0, seed=0, plot=False, batch_size=N * n_steps, update_epochs=1,
                    n_critic_warmup_itr=0, bootstrap_truncated=True, gamma=0.97, gae_lambda=0.9, clip_coef=0.05,
                    vf_coef=0.5, exp_name="wiring"))
    rec.check_first_iteration(n_steps, 0.97, 0.9, True, seed=0, num_envs=N)
    assert {(n, clip) for n, _, clip in losses} == {(N * n_steps, 0.05)}  # every piece: its share of the minibatch
    adv = torch.cat([a for _, a, _ in losses])  # the pieces of the one minibatch
    g = rec.gae[0]
    gae = g["advantages"].flatten()
    torch.testing.assert_close(adv.sort().values, ((gae - gae.mean()) / (gae.std() + 1e-8)).sort().values)
    (v, dv), = fits  # v_loss = 0.5 mean (V - R)², times vf_coef: dL/dV = 0.5 (V - R) / B
    returns = (g["advantages"] + g["values"]).flatten()
    torch.testing.assert_close((v - dv * N * n_steps / 0.5).sort().values, returns.sort().values, atol=1e-4, rtol=1e-4)
