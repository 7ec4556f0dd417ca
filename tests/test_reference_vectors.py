"""This project's numbers against vectors produced by the reference implementation's own model code
(irom-princeton/dppo; how the vectors were made: tests/reference/README.md).

The reference networks' weights are stored in the npz files in the reference's state_dict order and
are loaded here into this project's networks by order and shape. Everything is compared at 1e-5
absolute, or 1e-6 relative for values above 10 in magnitude (`check`; tests/reference/README.md,
"Tolerances"): the noise schedule and denoising coefficients, element-wise log-probs of stored chains,
sampled chains (same seed), and one PPO loss evaluation per case, wired as the update loop of each
script's `main` wires it (mirrored by the `_*_update_terms` helpers below).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_finetune as ft
import dppo_pretrain as pt
import gaussian_ppo as gp
import gmm_ppo as gm
from common.networks import ChunkMLP, DiffusionMLP, ObsCritic
from tests.helpers import load_by_order, ref_weights

REF = Path(__file__).parent / "reference"
ATOL = 1e-5
RTOL = 1e-6


def load(name: str) -> dict:
    with np.load(REF / name) as f:
        return {k: f[k] for k in f.files}


def check(name: str, ours, ref, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Element-wise |ours - ref| <= max(atol, rtol·|ref|): 1e-5 absolute up to magnitude 10, and above it
    1e-6 relative (8-16 float32 ulps), since float32 transcendentals and sums differ between CPUs by
    a few ulps (tests/reference/README.md, "Tolerances")."""
    ours = torch.as_tensor(ours).detach().double()
    ref = torch.as_tensor(np.asarray(ref)).double()
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    if not ours.numel():
        return
    excess = ((ours - ref).abs() / torch.clamp(rtol * ref.abs(), min=atol)).max().item()
    print(f"REFDIFF {name} {(ours - ref).abs().max().item():.3e} ({excess:.2f} of the bound)")
    assert excess <= 1, f"{name}: difference {excess:.2f}x max({atol}, {rtol}·|ref|)"


# ---- the diffusion agents of the two reference configurations (small widths) ----

CONFIGS = {
    # Hopper fine-tuning config: K 20, K' 10, T_a = T_e = 4, ReLU [32]*3 actor, Mish [32]*3 critic
    "ddpm": dict(file="ddpm_hopper.npz", obs_dim=11, action_dim=3, T_a=4, K=20, K_ft=10, use_ddim=False,
                 min_sampling_std=0.1, gamma_denoising=0.99,
                 net=dict(time_dim=16, mlp_dims=(32, 32, 32), activation="relu")),
    # furniture one_leg_low MLP config: K 100, 5 DDIM steps all fine-tuned, T_a = T_e = 8, Mish, obs encoder, LayerNorm
    "ddim": dict(file="ddim_furniture.npz", obs_dim=58, action_dim=10, T_a=8, K=100, K_ft=5, use_ddim=True,
                 min_sampling_std=0.04, gamma_denoising=0.9,
                 net=dict(time_dim=32, mlp_dims=(24,) * 7, cond_mlp_dims=(32, 16), activation="mish", use_layernorm=True)),
}


def make_agent(name: str) -> tuple[ft.DiffusionPPO, dict, dict]:
    c = CONFIGS[name]
    d = load(c["file"])
    base = DiffusionMLP(c["action_dim"], c["T_a"], c["obs_dim"], 1, residual=True, **c["net"])
    load_by_order(base, ref_weights(d, "actor" if "actor.names" in d else "actor_ft"))
    critic = ObsCritic(c["obs_dim"], 1, mlp_dims=(32, 32, 32))
    load_by_order(critic, ref_weights(d, "critic"))
    agent = ft.DiffusionPPO(base, critic, c["K"], c["K_ft"], c["T_a"], c["action_dim"], c["use_ddim"], 5,
                            c["min_sampling_std"], 0.1, 3.0)
    load_by_order(agent.actor_ft, ref_weights(d, "actor_ft"))
    return agent, d, c


def test_schedule_and_ddpm_coefficients():
    s = load("schedule.npz")
    for K in (20, 100):
        check(f"K{K}.betas_float64", ft.cosine_beta_schedule(K), s[f"K{K}.betas_float64"], atol=1e-12, rtol=0.0)
        check(f"K{K}.betas", ft.cosine_beta_schedule(K).float(), s[f"K{K}.betas"])
        assert torch.equal(pt.cosine_beta_schedule(K), ft.cosine_beta_schedule(K))
        pol = pt.DiffusionPolicy(torch.nn.Identity(), K, 4, 3)
        for ours, ref in (("betas", "betas"), ("alphas_cumprod", "alphas_cumprod"),
                          ("sqrt_alphas_cumprod", "sqrt_alphas_cumprod"),
                          ("sqrt_one_minus_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"),
                          ("sqrt_recip_alphas_cumprod", "sqrt_recip_alphas_cumprod"),
                          ("sqrt_recipm1_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"),
                          ("posterior_var", "ddpm_var"), ("mu_coef1", "ddpm_mu_coef1"), ("mu_coef2", "ddpm_mu_coef2")):
            ref_v = s[f"K{K}.{ref}"]
            if ours == "posterior_var":
                ref_v = np.maximum(ref_v, 1e-20)
            check(f"K{K}.pretrain.{ours}", getattr(pol, ours), ref_v)
        agent = ft.DiffusionPPO(DiffusionMLP(3, 4, 11, mlp_dims=(8, 8, 8)), ObsCritic(11, mlp_dims=(8, 8, 8)), K, 10, 4, 3,
                                False, 5, 0.1, 0.1, 3.0)
        ts = agent.ts.numpy()  # visited steps K-1 ... 0
        for ours, ref in (("sqrt_recip_ac", "sqrt_recip_alphas_cumprod"), ("sqrt_recipm1_ac", "sqrt_recipm1_alphas_cumprod"),
                          ("c1", "ddpm_mu_coef1"), ("c2", "ddpm_mu_coef2"), ("std", "ddpm_std")):
            check(f"K{K}.finetune.{ours}", getattr(agent, ours), s[f"K{K}.{ref}"][ts])


def test_ddim_coefficients():
    s = load("schedule.npz")
    agent = ft.DiffusionPPO(DiffusionMLP(3, 4, 11, mlp_dims=(8, 8, 8)), ObsCritic(11, mlp_dims=(8, 8, 8)), 100, 5, 4, 3,
                            True, 5, 0.1, 0.1, 3.0)
    assert agent.ts.tolist() == s["ddim.t"].tolist() == [80, 60, 40, 20, 0]
    assert s["ddim.eta"] == 1.0
    check("ddim.alphas", agent.ddim_a, s["ddim.alphas"])
    check("ddim.alphas_prev", agent.ddim_a_prev, s["ddim.alphas_prev"])
    check("ddim.sqrt_one_minus_alphas", agent.ddim_sqrt_1ma, s["ddim.sqrt_one_minus_alphas"])
    check("ddim.sigmas_eta1", agent.std, s["ddim.sigmas_eta1"])
    check("ddim.dir_xt_coef_eta1", agent.ddim_dir, s["ddim.dir_xt_coef_eta1"])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_critic_values(name):
    agent, d, _ = make_agent(name)
    with torch.no_grad():
        check(f"{name}.values", agent.get_value(torch.from_numpy(d["obs"])), d["values"])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_diffusion_logprobs_of_stored_chains(name):
    agent, d, c = make_agent(name)
    obs, chains = torch.from_numpy(d["obs"]), torch.from_numpy(d["chains"])
    B, K = obs.shape[0], c["K_ft"]
    s = torch.arange(B).repeat_interleave(K)  # the reference's order: per sample, fine-tuned steps noisiest first
    i = torch.arange(K).repeat(B)
    with torch.no_grad():
        lp = agent.get_logprobs(obs[s], chains[s, i], chains[s, i + 1], i)
    check(f"{name}.logprobs", lp, d["logprobs"])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_diffusion_sampling_same_seed(name):
    agent, d, _ = make_agent(name)
    torch.manual_seed(int(d["sample_seed"]))
    x, chain = agent.get_action(torch.from_numpy(d["obs"]))
    check(f"{name}.chains", chain, d["chains"])
    check(f"{name}.trajectories", x, d["trajectories"])


def _diffusion_update_terms(agent, b_obs, b_chain, b_adv, b_ret, old_lp_elementwise, idx, T_e, K_ft, disc, clip_eps):
    """Mirrors the PPO update of `dppo_finetune.main` for one minibatch `idx` of (env-step, denoising-step)
    pairs: log-probs clamped to [-5, 2], restricted to the first T_e actions and averaged; the advantages normalised
    over the minibatch and discounted per pair; `ppo_loss` with the per-pair clip range; value loss 0.5·mean((V - R)²).
    The old log-probs are the reference's element-wise ones, reduced the same way as `main` reduces its own."""
    S = b_obs.shape[0]
    pos = torch.arange(K_ft).repeat(S)
    sample = torch.arange(S).repeat_interleave(K_ft)

    def reduce(lp):
        return lp.clamp(-5, 2)[:, :T_e].mean(dim=(1, 2))

    def logprob(idx):
        s, i = sample[idx], pos[idx]
        return reduce(agent.get_logprobs(b_obs[s], b_chain[s, i], b_chain[s, i + 1], i))

    old_lp = reduce(old_lp_elementwise.flatten(0, 1))
    s, i = sample[idx], pos[idx]
    new_lp_elementwise = agent.get_logprobs(b_obs[s], b_chain[s, i], b_chain[s, i + 1], i)
    new_lp = logprob(idx)
    adv = (b_adv[s] - b_adv[s].mean()) / (b_adv[s].std() + 1e-8) * disc[i]  # over the minibatch, then discounted
    pg_loss, kl, clipfrac = ft.ppo_loss(new_lp, old_lp[idx], adv, clip_eps[i])
    v_loss = 0.5 * ((agent.get_value(b_obs[s]) - b_ret[s]) ** 2).mean()
    return dict(pg_loss=pg_loss, v_loss=v_loss, approx_kl=kl, clipfrac=clipfrac,
                ratio_mean=(new_lp - old_lp[idx]).exp().mean()), new_lp_elementwise


@pytest.mark.parametrize("name,case", [("ddpm", "loss_a"), ("ddpm", "loss_te2"), ("ddpm", "loss_b"), ("ddim", "loss_a")])
def test_diffusion_ppo_loss(name, case):
    agent, d, c = make_agent(name)
    K_ft, B = c["K_ft"], d["obs"].shape[0]
    clip_eps = ft.clip_schedule(K_ft, float(d[f"{case}.clip_ploss_coef_base"]), float(d[f"{case}.clip_ploss_coef"]),
                                float(d[f"{case}.clip_ploss_coef_rate"]))
    disc = ft.denoising_discount(K_ft, c["gamma_denoising"])
    old = torch.from_numpy(d["logprobs_base"]).view(B, K_ft, c["T_a"], c["action_dim"])
    with torch.no_grad():
        terms, new_lp = _diffusion_update_terms(
            agent, torch.from_numpy(d["obs"]), torch.from_numpy(d["chains"]), torch.from_numpy(d["advantages"]),
            torch.from_numpy(d["returns"]), old, torch.from_numpy(d[f"{case}.inds"]), int(d[f"{case}.reward_horizon"]),
            K_ft, disc, clip_eps)
    check(f"{name}.{case}.newlogprobs", new_lp, d[f"{case}.newlogprobs"])
    for k, v in terms.items():
        check(f"{name}.{case}.{k}", v, d[f"{case}.{k}"])


# ---- Gaussian and GMM baselines (robomimic Can configs, small widths) ----

def _gaussian_update_terms(module, agent, obs, act, adv, ret, old_lp, clip):
    """Mirrors the PPO update of `gaussian_ppo.main` / `gmm_ppo.main` on one minibatch (all samples):
    new and old log-probs pass the script's `clamp_logprobs` ([-5, 2], as the reference's loss)."""
    new_lp, old_lp = module.clamp_logprobs(agent.get_logprobs(obs, act)), module.clamp_logprobs(old_lp)
    pg_loss, kl, clipfrac = module.ppo_loss(new_lp, old_lp, adv, clip)
    v_loss = 0.5 * ((agent.get_value(obs) - ret) ** 2).mean()
    return dict(pg_loss=pg_loss, v_loss=v_loss, approx_kl=kl, clipfrac=clipfrac, ratio_mean=(new_lp - old_lp).exp().mean())


def test_gaussian_logprobs_and_ppo_loss():
    d = load("gaussian.npz")
    w = ref_weights(d, "actor_ft")
    logvar = dict(w)["logvar"]
    net = ChunkMLP(23, 4, 7, mlp_dims=(32, 32, 32), activation="mish", residual=True)
    load_by_order(net, [(n, t) for n, t in w if not n.startswith("logvar")])
    policy = gp.GaussianPolicy(net, 7, 0.1, 0.01, 0.2)
    with torch.no_grad():
        policy.log_std.copy_(0.5 * logvar)  # the reference learns log σ², clamped to [log 0.01², log 0.2²]
    critic = ObsCritic(23, 1, mlp_dims=(32, 32, 32))
    load_by_order(critic, ref_weights(d, "critic"))
    agent = gp.GaussianPPO(policy, critic, 3.0)
    obs, act = torch.from_numpy(d["obs"]), torch.from_numpy(d["actions"])
    with torch.no_grad():
        mean, std = policy(obs)
        check("gaussian.mean", mean.flatten(1), d["mean"])
        check("gaussian.scale", std.repeat(4).expand(obs.shape[0], -1), d["scale"])
        lp = agent.get_logprobs(obs, act)
        check("gaussian.logprobs", lp, d["logprobs"])
        old = torch.from_numpy(d["logprobs_base"])
        assert lp.min() > -5 and lp.max() < 2 and old.min() > -5 and old.max() < 2  # the reference's clamp is inactive here
        terms = _gaussian_update_terms(gp, agent, obs, act, torch.from_numpy(d["advantages"]), torch.from_numpy(d["returns"]),
                                       old, 0.01)
    for k, v in terms.items():
        check(f"gaussian.loss.{k}", v, d[f"loss.{k}"])


def test_gmm_logprobs_and_ppo_loss():
    """The reference's GMM network differs from ours (a separate MLP for the mode weights; mean layout
    mode-major), so its weights are not loaded: the mixture log-density and the loss are checked on the
    reference network's outputs (means, stds, logits)."""
    d = load("gmm.npz")
    B, M, T_a, D_a = 32, 5, 4, 7

    def params(suffix):
        means = torch.from_numpy(d["mean" + suffix]).view(B, M, T_a, D_a)
        scale = torch.from_numpy(d["scale" + suffix]).view(B, M, T_a, D_a)
        assert torch.equal(scale, scale[:1, :, :1].expand_as(scale))  # one σ per (mode, action dim)
        return means, scale[0, :, 0], torch.from_numpy(d["logits" + suffix])

    act = torch.from_numpy(d["actions"])
    lp = gm.gmm_logprob(act, *params(""))
    check("gmm.logprobs", lp, d["logprobs"])
    old = gm.gmm_logprob(act, *params("_base"))
    check("gmm.logprobs_base", old, d["logprobs_base"])

    class Outputs(torch.nn.Module):  # the policy's outputs as a GMMPPO actor
        def forward(self, cond):
            return params("")

    critic = ObsCritic(23, 1, mlp_dims=(32, 32, 32))
    load_by_order(critic, ref_weights(d, "critic"))
    agent = gm.GMMPPO(Outputs(), critic, 3.0)
    with torch.no_grad():
        terms = _gaussian_update_terms(gm, agent, torch.from_numpy(d["obs"]), act, torch.from_numpy(d["advantages"]),
                                       torch.from_numpy(d["returns"]), old, 0.01)
    for k, v in terms.items():
        check(f"gmm.loss.{k}", v, d[f"loss.{k}"])


def test_ref_checkpoints_file():
    """`ref_checkpoints.npz` (reference pre-training checkpoints, README) is internally consistent: every
    `model`/`ema` name has its tensor, the two sets share names and shapes but differ, everything is finite,
    the raw observations lie inside the stored bounds, and the stored normalised obs / env actions follow
    the reference env wrappers' formulas from the stored raw values."""
    d = load("ref_checkpoints.npz")
    for case in map(str, d["cases"]):
        names = [str(n) for n in d[f"{case}.model.names"]]
        assert names == [str(n) for n in d[f"{case}.ema.names"]] and len(names) == len(set(names)), case
        n_stored = sum(k.startswith(f"{case}.model.") for k in d) - 1
        assert n_stored == len(names), (case, n_stored, len(names))
        pairs = [(d[f"{case}.model.{i:03d}"], d[f"{case}.ema.{i:03d}"]) for i in range(len(names))]
        assert all(m.shape == e.shape and np.isfinite(m).all() and np.isfinite(e).all() for m, e in pairs), case
        assert sum(not np.array_equal(m, e) for m, e in pairs) > len(pairs) // 2, case
        if f"{case}.obs" not in d:
            continue
        lo, hi, obs = d[f"{case}.obs_min"], d[f"{case}.obs_max"], d[f"{case}.obs"]
        assert obs.shape == (8, 1, lo.size) and (hi > lo).all() and ((obs >= lo) & (obs <= hi)).all(), case
        obs_norm = 2 * ((obs.astype(np.float64) - lo) / (hi.astype(np.float64) - lo + 1e-6) - 0.5)
        np.testing.assert_allclose(d[f"{case}.obs_norm"], obs_norm, atol=1e-6)
        alo, ahi = d[f"{case}.action_min"], d[f"{case}.action_max"]
        for suffix in ("", "_model", "_det"):
            if f"{case}.actions{suffix}" in d:
                a = d[f"{case}.actions_norm{suffix}" if suffix != "_det" else f"{case}.actions_det_norm"]
                assert a.shape[0] == 8 and a.shape[2] == alo.size and np.isfinite(a).all(), case
                np.testing.assert_allclose(d[f"{case}.actions{suffix}"], (a + 1) / 2 * (ahi - alo) + alo, atol=1e-6)
