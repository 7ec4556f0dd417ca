"""Evaluation draws from its own random stream (`common.envs.own_rng`, `stream_seed`, `evaluate`), and a new
run's training stream is seeded before the loop (`common.runs.Run.start`): every diffusion script reports the same
first row for the same checkpoint, and training does not depend on how much evaluation drew."""

import csv
import os

import numpy as np
import pytest
import torch

import dawr
import dipo
import dppo_critic_ablation
import dppo_finetune
import dppo_pretrain as pt
import dql
import drwr
import exact_likelihood_pg
import idql
import qsm
from benchmarks.finetune_iteration import random_checkpoint
from common.envs import evaluate
from common.envs import EVAL_STREAM, TRAINING_STREAM, own_rng, stream_seed
from common.errors import UsageError
from common.tasks import Task
from common.vecenv import MultiStep, SyncChunkVecEnv
from tests.test_common import Counter

SCRIPTS = (dppo_finetune, dppo_critic_ablation, drwr, dawr, exact_likelihood_pg, dipo, idql, dql, qsm)
# per script: what keeps a tiny run valid (batch within one iteration, a small buffer); IDQL: one candidate, so no
# selection by its untrained critic (evaluation: argmax; training on Avoid: a multinomial draw, off with exploration)
# (the off-policy scripts' critic warm-up, 5 iterations by default, off: a 1-iteration run must be one the actor may step in)
NO_WARMUP = dict(n_critic_warmup_itr=0)
TINY = {dppo_finetune: dict(batch_size=6), dppo_critic_ablation: dict(batch_size=6, critic="q"), drwr: dict(batch_size=6),
        dawr: dict(batch_size=6, buffer_size=40),
        exact_likelihood_pg: dict(batch_size=6), dipo: dict(batch_size=6, buffer_size=40, **NO_WARMUP),
        idql: dict(batch_size=6, buffer_size=40, num_sample=1, use_expectile_exploration=False, **NO_WARMUP),
        dql: dict(batch_size=6, buffer_size=40, **NO_WARMUP), qsm: dict(batch_size=6, buffer_size=40, **NO_WARMUP)}
# Avoid: one iteration of 4 envs x 25 chunk-steps, and few updates after it
AVOID = {dppo_finetune: dict(batch_size=100, **NO_WARMUP), dppo_critic_ablation: dict(batch_size=100, critic="q", **NO_WARMUP),
         drwr: {}, dawr: dict(buffer_size=40),
         exact_likelihood_pg: {}, dipo: dict(batch_size=50, replay_ratio=1, **NO_WARMUP),
         idql: dict(buffer_size=40, batch_size=20, replay_ratio=1, num_sample=1, use_expectile_exploration=False, **NO_WARMUP),
         dql: dict(batch_size=50, replay_ratio=1, **NO_WARMUP),
         qsm: dict(buffer_size=40, batch_size=20, replay_ratio=1, **NO_WARMUP)}
HOPPER = dict(env_id="hopper", num_envs=2, eval_n_steps=25, env_backend="gymnasium", seed=0)  # 25 chunks: episodes end


def _rows(out: dict) -> list[dict]:
    with open(os.path.join(out["run_dir"], "eval.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def hopper_checkpoint(tmp_path_factory):
    """Random weights at Hopper's default architecture: a policy whose returns move with every bit of noise."""
    folder = tmp_path_factory.mktemp("eval_rng")
    os.chdir(folder)
    random_checkpoint("hopper", str(folder / "hopper.pt"))
    return str(folder / "hopper.pt")


# ---- the plumbing ----

def test_stream_seeds_are_distinct_and_own_rng_leaves_the_callers_stream_as_it_was():
    seeds = {stream_seed(s, k, i) for s in (0, 1, -1) for k in (TRAINING_STREAM, EVAL_STREAM) for i in range(50)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    assert stream_seed(3, EVAL_STREAM, 7) == stream_seed(3, EVAL_STREAM, 7)
    torch.manual_seed(5)
    plain = torch.randn(8)
    torch.manual_seed(5)
    head = torch.randn(3)
    with own_rng(123):
        inside = torch.randn(100)
    assert torch.equal(torch.cat([head, torch.randn(5)]), plain)  # the caller's stream continues as if nothing ran
    torch.manual_seed(123)
    assert torch.equal(inside, torch.randn(100))  # inside: the stream of the block's seed


def test_evaluate_draws_from_its_own_stream_of_each_index():
    task = Task("counter", "gym", "counter", 1, 1, 8, 4, 4, success_chunk_reward=5.0)
    envs = SyncChunkVecEnv([lambda: MultiStep(Counter(end=8), 4) for _ in range(2)])
    drawn = []

    def noisy(obs: np.ndarray) -> np.ndarray:
        z = torch.randn(len(obs), 4, 1)
        drawn.append(z)
        return z.numpy()

    def run(index: int) -> torch.Tensor:
        drawn.clear()
        before = torch.get_rng_state()
        evaluate(envs, noisy, task, 4, seed=10, index=index, n_steps=3)
        assert torch.equal(torch.get_rng_state(), before)  # the global stream is where it was
        return torch.cat(drawn)

    torch.manual_seed(0)
    first = run(0)
    torch.manual_seed(1)  # another global state: the same evaluation draws
    assert torch.equal(run(0), first)
    assert not torch.equal(run(1), first)  # another index, other draws
    with own_rng(stream_seed(10, EVAL_STREAM, 0)):  # the stream is the one `stream_seed` names
        assert torch.equal(torch.cat([torch.randn(2, 4, 1) for _ in range(3)]), first)


# ---- the scripts ----

def test_first_rows_agree_across_the_diffusion_scripts_and_eval_only(hopper_checkpoint):
    """Iteration 0 evaluates (val_freq 2, before any update); the row is the same in all nine scripts, whatever
    critics each built before it, and each script's --eval-only of the checkpoint gives it again. The final row
    (after iteration 1's update) evaluates with index 2: other noise, another return."""
    first = {}
    for m in SCRIPTS:
        out = m.main(m.Args(checkpoint=hopper_checkpoint, n_train_itr=2, val_freq=2, n_steps=3, plot=False,
                            exp_name=m.__name__, **HOPPER, **TINY[m]))
        rows = [r for r in _rows(out) if r["mode"] == "deterministic"]
        assert [r["iteration"] for r in rows] == ["0", "2"]
        assert int(rows[0]["n_episodes"]) > 0 and rows[1]["return_mean"] != rows[0]["return_mean"]
        first[m.__name__] = rows[0]
        ev = m.main(m.Args(checkpoint=hopper_checkpoint, eval_only=True, **HOPPER,
                           **({"num_sample": 1} if m is idql else {})))["eval"]["deterministic"]
        assert float(rows[0]["return_mean"]) == ev["return_mean"] and int(rows[0]["n_episodes"]) == ev["n_episodes"]
    assert all(r == first["dppo_finetune"] for r in first.values()), first


def test_a_run_that_would_only_evaluate_is_refused_before_writing(hopper_checkpoint, tmp_path, monkeypatch, capsys):
    """On a task evaluated deterministically an evaluation iteration takes no update: a budget whose every iteration is
    one (iteration 0 with val_freq 10, every iteration with val_freq 1) would end with the policy unchanged."""
    monkeypatch.chdir(tmp_path)
    for n_train_itr, val_freq in ((1, 10), (3, 1)):
        with pytest.raises(UsageError, match=f"--n-train-itr {n_train_itr} with --val-freq {val_freq}: every iteration "
                                             "left is an evaluation without an update on hopper"):
            dppo_finetune.main(dppo_finetune.Args(checkpoint=hopper_checkpoint, n_train_itr=n_train_itr, val_freq=val_freq,
                                                  n_steps=3, plot=False, **HOPPER, **TINY[dppo_finetune]))
    assert not (tmp_path / "runs").exists()


def test_avoid_iteration_0_rows_agree_across_the_diffusion_scripts(tmp_path, monkeypatch):
    """On Avoid the rows are the training rollouts' (App. D.8): iteration 0's are the same in all nine scripts,
    since each seeds its training stream from `stream_seed(seed, TRAINING_STREAM)` after building its networks."""
    monkeypatch.chdir(tmp_path)
    pre = pt.main(pt.Args(env_id="avoid-m2", n_epochs=3, eval_every=0, seed=0, mlp_dims=(64, 64, 64), batch_size=128,
                          learning_rate=1e-3, min_lr=1e-4))
    first = {}
    for m in SCRIPTS:
        out = m.main(m.Args(env_id="avoid-m2", checkpoint=pre["checkpoint"], n_train_itr=1, num_envs=4, n_steps=25,
                            seed=0, plot=False, exp_name=m.__name__, **AVOID[m]))
        first[m.__name__] = _rows(out)[0]
    assert first["dppo_finetune"]["mode"] == "stochastic" and int(first["dppo_finetune"]["n_episodes"]) == 4
    assert all(r == first["dppo_finetune"] for r in first.values()), first


def test_training_does_not_depend_on_what_evaluation_drew(hopper_checkpoint):
    """Iterations 0 and 2 evaluate, 1 trains: evaluations twice as long leave the training iteration and the final
    weights as they were. --eval-only of the checkpoint (saved after iteration 1: itr 2) reproduces iteration 2's row."""
    outs = {}
    for n in (10, 25):
        outs[n] = dppo_finetune.main(dppo_finetune.Args(checkpoint=hopper_checkpoint, n_train_itr=3, val_freq=2, n_steps=3,
                                                        save_every=1, plot=False, exp_name=f"eval{n}",
                                                        **{**HOPPER, "eval_n_steps": n}, **TINY[dppo_finetune]))
    trained = [{k: v for k, v in o["history"][0].items() if not k.startswith(("time_", "cpu_"))} for o in outs.values()]
    np.testing.assert_equal(trained[0], trained[1])  # (NaN equals NaN here: no training episode ended)
    assert [len(o["history"]) for o in outs.values()] == [1, 1] and np.isfinite(trained[0]["pg_loss"])
    a, b = (torch.load(outs[n]["checkpoint"], weights_only=True) for n in (10, 25))
    assert a["itr"] == 2 and all(torch.equal(a["actor_ft"][k], b["actor_ft"][k]) for k in a["actor_ft"])
    assert any(not torch.equal(a["actor_ft"][k], a["base"][k]) for k in a["base"])  # the actor moved
    rows = [r for r in _rows(outs[25]) if r["mode"] == "deterministic"]  # (and iteration 1's training row)
    assert [r["iteration"] for r in rows] == ["0", "2", "3"]
    row2 = rows[1]
    ev = dppo_finetune.main(dppo_finetune.Args(checkpoint=outs[25]["checkpoint"], eval_only=True, **HOPPER))
    assert float(row2["return_mean"]) == ev["eval"]["deterministic"]["return_mean"]
    assert rows[-1]["return_mean"] != row2["return_mean"]  # the final evaluation (index 3) of the same weights


def test_training_after_an_evaluation_iteration_starts_from_a_reset(hopper_checkpoint, monkeypatch):
    """Hopper's envs go on across training iterations; an evaluation iteration (0 and 2 of 4) resets them for itself, so
    the training iteration after it (3) starts from its own reset (seed + 3N), not from where the evaluation left them
    (docs/deviations.md, "Envs are reset after an evaluation iteration")."""
    resets, real_make = [], dppo_finetune.make_vec_env

    def make(*a, **kw):
        envs = real_make(*a, **kw)
        reset = envs.reset
        envs.reset = lambda seed=None: resets.append(seed) or reset(seed=seed)
        return envs
    monkeypatch.setattr(dppo_finetune, "make_vec_env", make)
    dppo_finetune.main(dppo_finetune.Args(checkpoint=hopper_checkpoint, n_train_itr=4, val_freq=2, n_steps=3, plot=False,
                                          exp_name="resets", **{**HOPPER, "eval_n_steps": 2}, **TINY[dppo_finetune]))
    ev, N = HOPPER["seed"] + 1_000_000, HOPPER["num_envs"]
    assert resets == [ev, HOPPER["seed"] + 1 * N, ev, HOPPER["seed"] + 3 * N, ev]  # evaluations 0, 2 and the final one


def test_pretraining_does_not_depend_on_how_often_it_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(env_id="avoid-m2", n_epochs=2, seed=0, mlp_dims=(32, 32, 32), batch_size=128, n_eval_envs=4)
    every = pt.main(pt.Args(eval_every=1, exp_name="every", **kw))  # evaluates after epochs 1 and 2
    last = pt.main(pt.Args(eval_every=2, exp_name="last", **kw))  # after epoch 2 only
    a, b = (torch.load(o["checkpoint"], weights_only=True) for o in (every, last))
    assert all(torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key])
    assert every["eval"]["return_mean"] == last["eval"]["return_mean"]  # the last evaluation: same weights, same index
