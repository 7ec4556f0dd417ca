"""The speed changes of dql.py, idql.py, dipo.py and qsm.py against their straightforward formulations, the
--float32-matmul-precision / --onednn-matmul wiring, and the code path of benchmarks/offpolicy_iteration.py (tiny
sizes; the timings themselves are measured by the benchmark, never asserted here)."""

import copy

import pytest
import torch

import dipo
import dql
import idql
import qsm
from benchmarks import offpolicy_iteration
from common.errors import UsageError
from common.networks import DiffusionMLP, DoubleQCritic, ObsCritic

MODULES = [dql, idql, dipo, qsm]
IDS = [m.__name__ for m in MODULES]


@pytest.fixture
def restore_matmul_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


@torch.no_grad()
def ema_loop(target, source, tau):
    """The per-tensor formulation the scripts used before."""
    for tp, sp in zip(target.parameters(), source.parameters()):
        tp.copy_(tp * (1.0 - tau) + sp * tau)


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_ema_update_is_bit_identical_to_the_loop(module):
    """The foreach EMA does the loop's float operations: targets equal bit for bit over several updates, for the
    actor and the Q-critic shapes, with the source moving between updates."""
    torch.manual_seed(0)
    for net in (DiffusionMLP(3, 4, 11, mlp_dims=(64, 64, 64)), DoubleQCritic(11, 3, 4, mlp_dims=(32, 32, 32))):
        a, b = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn_like(p))
            b.load_state_dict(a.state_dict())
        for _ in range(5):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            module.ema_update(a, net, 0.005)
            ema_loop(b, net, 0.005)
        for pa, pb, pn in zip(a.parameters(), b.parameters(), net.parameters()):
            assert torch.equal(pa, pb) and not torch.equal(pa, pn)


def idql_get_action_loop(agent, cond, num_sample, weight):
    """IDQL's training-time candidate choice with V evaluated on every candidate's copy of the state (as the scripts
    did before): the straightforward formulation."""
    B, S = cond.shape[0], num_sample
    cond_rep = cond.repeat(S, 1, 1)
    x = agent.sample(cond_rep)
    q = agent.q_min(agent.target_q, cond_rep, x).view(S, B)
    w = idql.candidate_weights(q, agent.critic_v(cond_rep).view(S, B), weight)
    pick = torch.multinomial(w.T, 1).squeeze(1)
    return x.view(S, B, *x.shape[1:])[pick, torch.arange(B)]


@pytest.mark.parametrize("B", [40, 7])
@torch.no_grad()
def test_idql_candidates_use_v_once_per_state(B):
    """V(s) once per state instead of once per candidate: the same values (rtol 1e-5; MKL gives the same rows at some
    batch sizes bit for bit, not at all) and, with the same seed, the same chosen chunks."""
    torch.manual_seed(0)
    actor = DiffusionMLP(3, 4, 11, mlp_dims=(64, 64, 64))
    q = DoubleQCritic(11, 3, 4, mlp_dims=(64, 64, 64), activation="mish", residual=False)
    v = ObsCritic(11, mlp_dims=(64, 64, 64), activation="mish", residual=True)
    agent = idql.IDQLDiffusion(actor, q, v, 20, 4, 3, 4, 0.1, 3.0).eval()
    with torch.no_grad():
        for p in agent.target_q.parameters():  # Q - V of both signs, so both weights occur
            p.add_(0.3 * torch.randn_like(p))
    cond = torch.randn(B, 1, 11)
    cond_rep = cond.repeat(20, 1, 1)
    diff = agent.q_min(agent.target_q, cond_rep, agent.sample(cond_rep)).view(20, B) - v(cond)[None]
    assert (diff > 0).any() and (diff < 0).any()
    torch.testing.assert_close(v(cond)[None].expand(20, B), v(cond.repeat(20, 1, 1)).view(20, B), rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    new = agent.get_action(cond, False, 20, 0.7, True)
    torch.manual_seed(5)
    old = idql_get_action_loop(agent, cond, 20, 0.7)
    assert torch.equal(new, old)
    torch.manual_seed(5)
    other = agent.get_action(cond, False, 20, 0.7, True)
    assert torch.equal(other, new)
    torch.manual_seed(6)
    assert not torch.equal(agent.get_action(cond, False, 20, 0.7, True), new)  # the seed matters, so the test can fail


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_matmul_flags_reach_the_script(module, restore_matmul_precision, tmp_path, monkeypatch):
    """Each script takes --float32-matmul-precision / --onednn-matmul and sets them before any training work (scripts on
    `common.runs.Run`: in their speed block, before the Run; the others: common.runs.apply_matmul_flags, before the
    envs): the refused combination ends in a UsageError, and `medium` sets torch's CPU precision."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--onednn-matmul keeps float32 products"):
        module.main(module.Args(env_id="avoid-m2", onednn_matmul="on", float32_matmul_precision="medium"))
    seen = []

    def stop(*args, **kwargs):  # what comes after the flags: stop there and look at the precision in force
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        raise RuntimeError("stop")

    monkeypatch.setattr(*((module.runs, "Run") if hasattr(module, "runs") else (module, "make_vec_env")), stop)
    with pytest.raises(RuntimeError, match="stop"):
        module.main(module.Args(env_id="avoid-m2", float32_matmul_precision="medium"))
    assert seen == ["bf16"]
    with pytest.raises(RuntimeError, match="stop"):
        module.main(module.Args(env_id="avoid-m2"))
    assert seen[-1] != "bf16"  # the default goes back to float32 products


def test_offpolicy_iteration_benchmark_code_path(tmp_path, monkeypatch, capsys):
    """The benchmark's own path (each script's main, 2 iterations, the phase table) at a tiny Hopper size."""
    monkeypatch.chdir(tmp_path)
    out = offpolicy_iteration.main(offpolicy_iteration.Bench(n_steps=3, num_envs=2, batch_size=6))
    assert list(out) == ["dql", "idql", "dipo", "qsm"]
    assert [r["updates"] for r in out.values()] == [16, 128, 64, 16]  # replay ratios 16 / 128 / 64 / 16
    for r in out.values():
        assert {"env", "sampling", "update"} <= set(r["times"]) == set(r["cpu"]) and r["total"] > 0 < r["cpu_total"]
        assert r["scale"] == 500 * 40 / (3 * 2)
    text = capsys.readouterr().out
    assert "| dipo | 2 x 3 | 64 (6) |" in text
