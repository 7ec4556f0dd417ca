"""reinflow.py: ReinFlow's model code matched number for number (tests/reference/reinflow.npz, how it was made:
tests/reference/README.md), and the script through `main(args)`: smoke, resume, --eval-only, bad input."""

import csv
import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import flow_pretrain as fp
import reinflow as rf
from common.errors import DatasetError, UsageError
from common.networks import DiffusionMLP, ObsCritic
from tests.helpers import assert_resumed_run_matches, load_by_order, ref_weights

REF = os.path.join(os.path.dirname(__file__), "reference", "reinflow.npz")


def check(ours, ref, what: str) -> None:
    """|ours - ref| <= max(1e-5, 1e-6·|ref|) element-wise (tests/reference/README.md, "Tolerances")."""
    ours = ours.detach().numpy() if torch.is_tensor(ours) else np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref) - np.maximum(1e-5, 1e-6 * np.abs(ref))
    assert (err <= 0).all(), f"{what}: off by up to {np.abs(ours - ref).max():.3g}"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


def ref_agent(d: dict, K: int, weights: str) -> rf.ReinFlowAgent:
    """Our agent with ReinFlow's weights (`weights`: velocity/noise after the perturbation, or *_base before it)."""
    base = DiffusionMLP(action_dim=3, horizon_steps=4, obs_dim=11, time_dim=16, mlp_dims=(32, 32, 32), activation="relu")
    load_by_order(base, ref_weights(d, f"K{K}.velocity{weights}"))
    critic = ObsCritic(11, 1, mlp_dims=(32, 32, 32))
    load_by_order(critic, ref_weights(d, f"K{K}.critic"))
    agent = rf.ReinFlowAgent(base, critic, K, (16, 16), 4, 3, (1, 11), 0.10, 0.24, 3.0, 1.0)
    load_by_order(agent.actor_ft, ref_weights(d, f"K{K}.velocity{weights}"))
    load_by_order(agent.noise_net, ref_weights(d, f"K{K}.noise{weights}"))
    return agent


def sampling_grid(K: int) -> torch.Tensor:
    """The time grid ReinFlow's `PPOFlow.get_actions` (and `ReFlow.sample`) samples on, linspace(0, 1, K); its
    `get_logprobs`, and reinflow.py throughout, use t_k = k/K (docs/deviations.md)."""
    return torch.linspace(0, 1, K)


@pytest.mark.parametrize("K", [4, 1])
def test_sampling_chain_and_its_logprobs_match_reinflow(ref, K):
    d, p = ref, f"K{K}"
    agent = ref_agent(d, K, "_base")
    assert torch.equal(agent.t, torch.linspace(0, 1 - 1 / K, K))  # ours: get_logprobs' grid
    agent.t = sampling_grid(K)
    obs, chains = torch.from_numpy(d[f"{p}.obs"]), torch.from_numpy(d[f"{p}.chains"])
    torch.manual_seed(2)  # ReinFlow drew x_0 and every step's noise from this seed
    x, chain, lp = agent.sample(obs)
    check(chain, chains, "chain")
    check(x, d[f"{p}.actions"], "actions")
    check(lp, d[f"{p}.logprobs_sample"], "get_actions log-probs")
    torch.manual_seed(2)
    x, chain, _ = agent.sample(obs, deterministic=True)  # the noise-free Euler chain
    check(chain, d[f"{p}.chains_det"], "deterministic chain")
    check(x, d[f"{p}.actions_det"], "deterministic actions")
    # recomputed on the same grid, the log-probs are the sampling ones: PPO's first ratio is 1
    check(agent.get_logprobs(obs, chains)[0], d[f"{p}.logprobs_sample"], "log-probs recomputed on the sampling grid")


@pytest.mark.parametrize("K", [4, 1])
def test_elementwise_logprobs_entropy_and_noise_std_match_reinflow(ref, K):
    d, p = ref, f"K{K}"
    agent = ref_agent(d, K, "_base")
    obs, chains = torch.from_numpy(d[f"{p}.obs"]), torch.from_numpy(d[f"{p}.chains"])
    with torch.no_grad():
        lp, entropy, std_mean = agent.get_logprobs(obs, chains)
        steps = [agent.step(chains[:, i], i, obs) for i in range(K)]
    mean, std = torch.stack([m for m, _ in steps], 1).flatten(2), torch.stack([s for _, s in steps], 1).flatten(2)
    check(mean, d[f"{p}.means_base"], "means")
    check(std, d[f"{p}.stds_base"], "noise stds")
    assert std.min() >= 0.1 - 1e-7 and std.max() <= 0.24 + 1e-7
    check(rf.gaussian_logprob(chains[:, 1:].flatten(2), mean, std), d[f"{p}.elem_logprob_base"], "element-wise log-probs")
    check(rf.gaussian_logprob(chains[:, 0].flatten(1), 0.0, 1.0), d[f"{p}.elem_logprob_init"], "log N(x_0; 0, I)")
    check(lp, d[f"{p}.logprobs_base"], "get_logprobs")
    check(entropy, d[f"{p}.entropy_base"], "entropy")
    check(std_mean, d[f"{p}.noise_std_mean_base"], "mean noise std")


@pytest.mark.parametrize("K", [4, 1])
@pytest.mark.parametrize("case", ["loss_a", "loss_b", "loss_c"])
def test_ppo_loss_matches_reinflow(ref, K, case):
    """`PPOFlow.loss` on a minibatch: actor_ft perturbed, old log-probs from sampling; loss_b a decayed σ_max 0.20 and
    clip 0.1, loss_c a std range [0.01, 0.03] whose log-probs hit the [-1, 1] clamp."""
    d, p = ref, f"K{K}"
    q = f"{p}.{case}"
    agent = ref_agent(d, K, "")
    agent.min_std, agent.max_std = float(d[f"{q}.min_std"]), float(d[f"{q}.max_std"])
    i = torch.from_numpy(d[f"{q}.inds"])
    obs, chains = torch.from_numpy(d[f"{p}.obs"])[i], torch.from_numpy(d[f"{p}.chains"])[i]
    old_lp, adv, ret = (torch.from_numpy(d[f"{p}.{k}"])[i] for k in ("logprobs_sample", "advantages", "returns"))
    new_lp, entropy, std_mean = agent.get_logprobs(obs, chains)
    clip = float(d[f"{q}.clip"])
    pg_loss, approx_kl, clipfrac = rf.ppo_loss(new_lp, old_lp, adv, clip, -1.0, 1.0)
    v_loss = 0.5 * ((agent.critic(obs) - ret) ** 2).mean()
    check(new_lp, d[f"{q}.newlogprobs"], "new log-probs")
    ratio = (new_lp.clamp(-1, 1) - old_lp.clamp(-1, 1)).exp()
    for name, ours in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy_loss", -entropy.mean()), ("approx_kl", approx_kl),
                       ("clipfrac", clipfrac), ("noise_std", std_mean), ("ratio_mean", ratio.mean())):
        check(ours, d[f"{q}.{name}"], f"{case} {name}")
    assert 0 < float(d[f"{q}.clipfrac"]) or case == "loss_b"  # the clip acts in a and c
    if case == "loss_c":
        assert (new_lp.abs() > 1).any()  # the clamp acts
    if case != "loss_b":  # the gradients of TrainPPOFlowAgent's loss (ent_coef 0.03, vf_coef 0.5), one backward
        (pg_loss + 0.03 * -entropy.mean() + 0.5 * v_loss).backward()
        for part, module in (("velocity", agent.actor_ft), ("noise", agent.noise_net), ("critic", agent.critic)):
            for j, prm in enumerate(module.parameters()):
                check(prm.grad, d[f"{q}.grad_{part}.{j:03d}"], f"{case} gradient of {part} parameter {j}")


def test_noise_bound_schedule_matches_reinflow(ref):
    """learn_decay's σ_max: iteration itr samples with the schedule's value at itr - 1 (set after each iteration)."""
    for n in (1000, 51):
        ours = [rf.max_std_at(itr + 1, n, 0.10, 0.24, 0.35, 0.7) for itr in range(n)]
        check(np.array(ours), ref[f"schedule.n{n}"], f"schedule n={n}")
    assert rf.max_std_at(0, 51, 0.10, 0.24, 0.35, 0.7) == 0.24 and math.isclose(rf.max_std_at(51, 51, 0.1, 0.24, 0.35, 0.7),
                                                                                 0.3 * 0.10 + 0.7 * 0.24)


# ---------------------------------------------------------------- the script through main(args)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(env_id="avoid-m2", num_envs=4, n_steps=25, batch_size=50, repeat_samples=2, update_epochs=2,
             noise_hidden_dims=(8, 8), val_freq=1, plot=False, seed=0)


def flow_checkpoint(path: str, K: int = 4) -> str:
    """A small flow checkpoint written by flow_pretrain.py itself (1 epoch, narrow network): the join of the two
    scripts is what these tests run."""
    fp.main(fp.Args(env_id="avoid-m2", n_epochs=1, eval_every=0, mlp_dims=(32, 32, 32), batch_size=128, seed=0,
                    denoising_steps=K, output=path, exp_name="flow_pre"))
    return path


def test_reinflow_samples_on_flow_pretrains_grid():
    """Without noise, reinflow.py's chain from a pre-trained policy is flow_pretrain.py's evaluation chain from the same
    x_0 (one time grid, k/K, and the same clamps), for K = 4 and K = 1: the "before" of a fine-tuning run is the policy
    that pre-training evaluated."""
    torch.manual_seed(0)
    net = DiffusionMLP(action_dim=2, horizon_steps=4, obs_dim=4, mlp_dims=(32, 32, 32), activation="relu")
    cond = torch.rand(16, 1, 4) * 2 - 1
    for K in (4, 1):
        agent = rf.ReinFlowAgent(net, ObsCritic(4, 1, mlp_dims=(8, 8)), K, (8,), 4, 2, (1, 4), 0.1, 0.24, 3.0, 1.0)
        torch.manual_seed(1)
        x_rf, chain_rf, _ = agent.sample(cond, deterministic=True)
        torch.manual_seed(1)
        x_fp, chain_fp = fp.FlowPolicy(net, 4, 2).sample(cond, K, clip_intermediate=True, return_chain=True)
        assert torch.equal(x_rf, x_fp) and torch.equal(chain_rf, chain_fp), K


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reinflow"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ckpt = flow_checkpoint(os.path.join(root, "flow.pt"))
        run = rf.main(rf.Args(checkpoint=ckpt, n_train_itr=2, exp_name="smoke", **SMALL))
    finally:
        os.chdir(cwd)
    return dict(root=root, ckpt=ckpt, run=run)


def _in(root: str, f, *a, **kw):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return f(*a, **kw)
    finally:
        os.chdir(cwd)


def _snapshot(folder: str) -> dict:
    out = {}
    for path, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(path, name), "rb") as fh:
                out[os.path.join(path, name)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def test_smoke_two_iterations_update_the_velocity_and_noise_networks(world):
    out, pre = world["run"], torch.load(world["ckpt"], weights_only=True)
    h = out["history"]
    assert len(h) == 2 and [x["env_steps"] for x in h] == [400, 800]  # 4 envs x 25 chunk-steps x T_e = 4
    assert all(x["n_episodes"] == 4 for x in h)  # Avoid: one 100-step episode per env and iteration
    assert all(np.isfinite(x[k]) for x in h for k in ("pg_loss", "v_loss", "entropy_loss", "approx_kl", "noise_std"))
    assert all(0.10 <= x["noise_std"] <= x["max_std"] <= 0.24 for x in h)
    post = torch.load(out["checkpoint"], weights_only=True)
    assert post["policy"] == "flow" and post["denoising_steps"] == 4 and post["itr"] == 2
    assert all(torch.equal(post["base"][k], v) for k, v in pre["ema"].items())  # the frozen copy is the pre-trained one
    assert any(not torch.equal(post["actor_ft"][k], v) for k, v in pre["ema"].items())  # it stepped after the warm-up
    rows = list(csv.DictReader(open(os.path.join(out["run_dir"], "eval.csv"))))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2] and all(r["mode"] == "stochastic" for r in rows)


def test_resume_matches_an_uninterrupted_run(world):
    root, ckpt = world["root"], world["ckpt"]
    full = _in(root, rf.main, rf.Args(checkpoint=ckpt, n_train_itr=4, exp_name="full", **SMALL))
    part = _in(root, rf.main, rf.Args(checkpoint=ckpt, n_train_itr=2, exp_name="part", **SMALL))
    resumed = _in(root, rf.main, rf.Args(resume=part["run_dir"], n_train_itr=4, env_id="avoid-m2"))
    assert_resumed_run_matches(full, resumed, n_eval_rows=5)
    a, b = (torch.load(o["checkpoint"], weights_only=True) for o in (full, resumed))
    assert all(torch.equal(a[m][k], b[m][k]) for m in ("noise_net", "critic") for k in a[m])
    assert full["history"][-1]["max_std"] < 0.24  # the σ_max decay started inside the run (4 iterations: hold 1)


def test_eval_only_evaluates_a_finetuned_checkpoint_and_writes_nothing(world):
    root = world["root"]
    before = _snapshot(root)
    out = _in(root, rf.main, rf.Args(checkpoint=world["run"]["checkpoint"], eval_only=True, **SMALL))
    assert set(out["eval"]) == {"deterministic", "stochastic"}
    assert all(r["n_episodes"] == 4 for r in out["eval"].values())
    assert _snapshot(root) == before


@pytest.mark.parametrize("change, error, match", [
    (dict(denoising_steps=0), UsageError, "--denoising-steps must be positive"),
    (dict(min_std=0.3, max_std=0.2), UsageError, "--min-std 0.3 exceeds --max-std 0.2"),
    (dict(min_std=math.nan), UsageError, "--min-std must be positive"),
    (dict(ent_coef=math.nan), UsageError, "--ent-coef must be a finite number"),
    (dict(logprob_min=1.0, logprob_max=-1.0), UsageError, "--logprob-min 1.0 must be below"),
    (dict(batch_size=10**6), UsageError, "--batch-size 1000000 exceeds"),
    (dict(checkpoint=os.path.join(ROOT, "checkpoints", "avoid-m2_diffusion.pt")), DatasetError,
     "holds a diffusion policy, not a flow one; use dppo_finetune.py"),
])
def test_bad_input_is_refused_before_anything_is_written(world, change, error, match):
    root = world["root"]
    before = _snapshot(root)
    with pytest.raises(error, match=match):
        _in(root, rf.main, rf.Args(**{**SMALL, "checkpoint": world["ckpt"], "n_train_itr": 2, **change}))
    with pytest.raises(UsageError):  # given on resume: refused in one line, the run folder left as it was
        _in(root, rf.main, rf.Args(**{"env_id": "avoid-m2", "resume": world["run"]["run_dir"], **change}))
    assert _snapshot(root) == before


def test_a_flow_checkpoint_given_to_dppo_finetune_is_refused(world):
    import dppo_finetune as ft
    with pytest.raises(DatasetError, match="holds a flow policy, not a diffusion one"):
        _in(world["root"], ft.main, ft.Args(checkpoint=world["ckpt"], env_id="avoid-m2", n_train_itr=2, plot=False))


def test_bad_flags_end_in_one_line_and_exit_2_on_the_command_line(world):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "reinflow.py"), "--checkpoint", world["ckpt"], "--min-std", "0.5"],
                       cwd=world["root"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: --min-std 0.5 exceeds --max-std 0.24")


def test_the_script_stays_readable_in_one_file():
    assert sum(1 for _ in open(os.path.join(ROOT, "reinflow.py"))) <= 600  # tests/test_layout.py checks its imports


@pytest.mark.slow
def test_default_run_fine_tunes_the_shipped_avoid_flow_policy(tmp_path, monkeypatch):
    """`python reinflow.py` (no flags: Avoid M2 from checkpoints/avoid-m2_flow.pt, which `python flow_pretrain.py`
    writes; ~8 CPU-minutes). Measured with seed 1 (docs/results.md): success 0.26 -> 0.94 with the training noise
    (App. D.8); held with margins: at least 0.85 at the end and 0.4 above the start."""
    monkeypatch.chdir(tmp_path)
    out = rf.main(rf.Args(seed=1, plot=False))
    before, after = float(out["eval_rows"][0]["success_rate"]), out["final_eval"]["success_rate"]
    assert after >= 0.85 and after >= before + 0.4, (before, after)
