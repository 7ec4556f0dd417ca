"""The speed paths of the on-policy baselines (gaussian_ppo, gmm_ppo, drwr, dawr, exact_likelihood_pg) give the
numbers of the plain formulation, and the code path of benchmarks/baselines_iteration.py (tiny sizes; timings are
measured by the benchmark, never asserted here)."""


import numpy as np
import pytest
import torch

import dawr
import drwr
import exact_likelihood_pg as el
import gaussian_ppo as gauss
import gmm_ppo as gmm
from benchmarks import baselines_iteration as bench
from common import runs
from common.errors import UsageError
from common.networks import DiffusionMLP, ObsCritic
from common.tasks import get_task


@pytest.fixture
def restore_matmul_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def chunk_agent(module, tmp_path):
    """gaussian_ppo / gmm_ppo's fine-tuning agent with the Hopper architecture (random weights)."""
    path = str(tmp_path / f"{module.POLICY}.pt")
    bench.gaussian_checkpoint(module, "hopper", path)
    args = module.Args(env_id="hopper")
    module.fill_defaults(args)
    policy = module.policy_from_checkpoint(torch.load(path, weights_only=True), args, "ema")
    agent_type = module.GaussianPPO if module.POLICY == "gaussian" else module.GMMPPO
    return agent_type(policy, ObsCritic(11, 1, mlp_dims=(256,) * 3), 3.0)


@pytest.mark.parametrize("module", [gauss, gmm])
def test_old_logprobs_in_pieces_are_the_whole_pass(module, tmp_path):
    """The old log-probs in pieces of 4096 (or 999) rows are those of one pass over 10 000 Hopper env-steps."""
    torch.manual_seed(0)
    agent = chunk_agent(module, tmp_path)
    obs = torch.randn(10_000, 1, 11)
    act = agent.get_action(obs)
    with torch.no_grad():
        whole = agent.get_logprobs(obs, act)
    pieces = module.old_logprobs(agent, obs, act, 4096)
    assert not pieces.requires_grad and pieces.shape == whole.shape
    assert whole.std() > 0.1  # the rows differ, so a misaligned piece would show
    # the same up to float rounding (a GEMM of another row count may pick another kernel): rtol 1e-5
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.old_logprobs(agent, obs, act, 999), whole, rtol=1e-5, atol=1e-6)


def exact_agent(T_a: int = 4, D_a: int = 3):
    """A small Hopper-shaped ε-network (T_a·D_a = 12 > 8: Hutchinson probes) in exact_likelihood_pg's agent."""
    net = DiffusionMLP(action_dim=D_a, horizon_steps=T_a, obs_dim=11, mlp_dims=(64, 64, 64))
    return el.ExactLikelihoodPG(net, ObsCritic(11, 1, mlp_dims=(32,) * 2), 20, T_a, D_a, 0.1, 3.0, 1e-4, 0.05, 1e-10, 2, 8)


@pytest.mark.parametrize("chunk", [64, 100, 300])
def test_exact_likelihood_update_in_pieces_matches_the_whole_minibatch(chunk):
    """The update of `exact_likelihood_pg.main` over pieces of `chunk` env-steps (advantages normalised over the whole
    minibatch first, each piece's `ppo_loss` share of the mean back-propagated) = `ppo_loss` of the whole minibatch and
    its backward: the same loss, KL and clip fraction (rtol 1e-5) and gradients (rtol 1e-4), through the ODE
    integration and its divergence (2 Rademacher probes per sample, the same for both)."""
    torch.manual_seed(0)
    agent = exact_agent()
    B = 300
    obs, act = torch.randn(B, 1, 11), torch.rand(B, 4, 3) * 1.6 - 0.8
    probes, w = agent.probes(B, torch.device("cpu"))
    adv = torch.randn(B) * 3 + 1
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # as the loop normalises the minibatch's advantages
    with torch.no_grad():
        old = agent.log_likelihood(obs, act, probes, w) + 0.02 * torch.randn(B)  # ratios on both sides of the clip

    def params():
        return [p for p in agent.actor.parameters()]

    agent.zero_grad()
    new = agent.log_likelihood(obs, act, probes, w)
    pg, kl, cf = el.ppo_loss(new, old, adv, 0.01)
    pg.backward()
    whole = [p.grad.clone() for p in params()]
    assert 0.05 < cf.item() < 0.95

    agent.zero_grad()
    totals = torch.zeros(3)
    for a in range(0, B, chunk):  # as `main`: pieces of the minibatch, their gradients accumulated
        p = slice(a, a + chunk)
        pg_p, kl_p, cf_p = el.ppo_loss(agent.log_likelihood(obs[p], act[p], probes[2 * a:2 * (a + chunk)], w), old[p],
                                       adv[p], 0.01, B)
        pg_p.backward()
        assert not kl_p.requires_grad and not cf_p.requires_grad
        totals += torch.stack([pg_p.detach(), kl_p, cf_p])
    for ours, ref in zip(totals, (pg, kl, cf)):
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-7)
    scale = max(g.abs().max().item() for g in whole)
    assert scale > 1e-6
    for p, ref in zip(params(), whole):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5 * scale)


def test_exact_likelihood_main_in_pieces_matches_whole_minibatches(tmp_path, monkeypatch):
    """The script's wiring: an iteration with minibatches back-propagated in pieces of 4 env-steps (pieces of 4 and 2)
    ends with the losses and weights of one with whole minibatches (same probes, same minibatches)."""
    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "hopper.pt")
    bench.diffusion_checkpoint(el, "hopper", ckpt)
    outs = [el.main(el.Args(env_id="hopper", checkpoint=ckpt, n_train_itr=1, val_freq=0, num_envs=2, n_steps=3,
                            batch_size=6, update_epochs=2, eval_n_steps=1, plot=False, exp_name=f"c{c}", seed=3,
                            update_chunk=c)) for c in (6, 4)]
    h = [o["history"][0] for o in outs]
    for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "old_logprob_mean"):
        assert np.isclose(h[0][k], h[1][k], rtol=1e-5, atol=1e-8), k
    w = [torch.load(o["checkpoint"], weights_only=True)["actor"] for o in outs]
    pre = torch.load(ckpt, weights_only=True)["ema"]
    assert any(not torch.equal(w[0][k], pre[k]) for k in pre)  # the actor moved
    for k in w[0]:
        torch.testing.assert_close(w[1][k], w[0][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module", [gauss, gmm, drwr, dawr, el])
def test_matmul_flags_reach_every_script(module, tmp_path, monkeypatch, restore_matmul_precision):
    """Each script applies --float32-matmul-precision / --onednn-matmul at start (`common.runs.set_float32_matmul_precision`
    and `measure_onednn`, in its speed block or through `apply_matmul_flags`): the refused combination stops it
    with a UsageError before a run folder exists, a precision is set as asked, and oneDNN is tried on the run's device."""
    monkeypatch.chdir(tmp_path)
    build = bench.SCRIPTS[module.__name__].build_args
    args = build(module, bench.Bench(n_steps=3, num_envs=2), str(tmp_path))
    args.float32_matmul_precision, args.onednn_matmul = "medium", "on"
    with pytest.raises(UsageError, match="onednn-matmul"):
        module.main(args)
    assert not (tmp_path / "runs").exists()
    args = build(module, bench.Bench(n_steps=3, num_envs=2), str(tmp_path))
    args.float32_matmul_precision = "high"
    seen = []

    class Stop(Exception):
        pass

    def record(value):  # a precision, or the device oneDNN is tried on
        seen.append(value if isinstance(value, str) else value.type)
        raise Stop

    monkeypatch.setattr(runs, "set_float32_matmul_precision", record)
    with pytest.raises(Stop):
        module.main(args)
    assert seen == ["high"]
    args = build(module, bench.Bench(n_steps=3, num_envs=2), str(tmp_path))
    args.onednn_matmul = "on"
    monkeypatch.setattr(runs, "set_float32_matmul_precision", seen.append)
    monkeypatch.setattr(runs, "measure_onednn", lambda shapes, timed: record(f"measured {len(shapes) > 0}"))
    with pytest.raises(Stop):
        module.main(args)
    assert seen == ["high", "highest", "measured True"]


def test_pretraining_applies_the_matmul_flags(tmp_path, monkeypatch, restore_matmul_precision):
    monkeypatch.chdir(tmp_path)
    for module in (gauss, gmm):
        with pytest.raises(UsageError, match="onednn-matmul"):
            module.main(module.Args(pretrain=True, env_id="avoid-m2", n_epochs=1, float32_matmul_precision="medium",
                                    onednn_matmul="on"))
    assert not (tmp_path / "runs").exists()


def test_baselines_benchmark_code_path(tmp_path, monkeypatch, capsys):
    """Every script of the table runs its own main for 2 iterations at a tiny Hopper size; the second iteration's wall
    and CPU times come back per phase, and the table is printed."""
    monkeypatch.chdir(tmp_path)
    out = bench.main(bench.Bench(n_steps=3, num_envs=2))
    assert list(out) == list(bench.SCRIPTS)
    for name, (r,) in out.items():
        assert {"env", "sampling"} <= set(r["wall"]) and r["wall"].keys() == r["cpu"].keys(), name
        assert ({"update"} <= set(r["wall"])) or ({"actor", "critic"} <= set(r["wall"])), name
        assert all(v >= 0 for v in r["wall"].values()) and sum(r["wall"].values()) > 0
        assert r["env_steps"] == 3 * 2 * get_task("hopper").act_steps
    text = capsys.readouterr().out
    assert "gaussian_ppo: 2 envs x 3 chunk-steps" in text and "exact_likelihood_pg:" in text
    with pytest.raises(SystemExit, match="unknown script"):
        bench.main(bench.Bench(scripts=("nope",)))
