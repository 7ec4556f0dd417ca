"""scripts/baselines_comparison.py: the plans it makes, checked against the scripts' own defaults and a
re-count of their iteration loops; no training run."""

import importlib
import json
import math
import shutil
import subprocess
import sys

import pytest

from common.tasks import get_task
from scripts import baselines_comparison as bc

METHODS = list(bc.MODULES)


def filled(task, method, **flags):
    module = importlib.import_module(bc.MODULES[method])
    args = module.Args(env_id=task, **flags)
    module.fill_defaults(args)
    return args


def loop_count(a, deterministic):
    """What the scripts' loop does with these Args (`for itr ...: if eval_deterministic and val_freq > 0 and itr %
    val_freq == 0: continue` ... `if itr >= n_critic_warmup_itr:` actor steps): env steps collected before the
    actor's first update, and the training iterations at or after it."""
    warmup = getattr(a, "n_critic_warmup_itr", 0) or 0
    before, after = 0, 0
    for itr in range(a.n_train_itr):
        if deterministic and a.val_freq > 0 and itr % a.val_freq == 0:
            continue
        if itr >= warmup:
            after += 1
        else:
            before += a.n_steps * a.num_envs * a.act_steps
    return before, after


def harness(*argv):
    return subprocess.run([sys.executable, "scripts/baselines_comparison.py", *argv], capture_output=True, text=True,
                          cwd=bc.ROOT, timeout=120)


@pytest.fixture(scope="module")
def cpu_plans():
    return bc.plans(bc.Args())


def test_cpu_budget_keeps_the_warm_up_in_env_steps(cpu_plans):
    hopper = {p.method: p for p in cpu_plans if p.task == "hopper"}
    assert set(hopper) == set(METHODS)
    for method, p in hopper.items():
        a = filled("hopper", method, **p.flags)  # what the script runs with the harness's flags
        ref = filled("hopper", method)
        assert a.n_steps * a.act_steps >= get_task("hopper").max_episode_steps  # Hopper: a whole episode per iteration
        assert a.n_steps < ref.n_steps  # the iteration is shorter than the reference's ...
        before, after = loop_count(a, True)
        ref_before, _ = loop_count(ref, True)
        if (getattr(ref, "n_critic_warmup_itr", 0) or 0) == 0:
            assert before == 0 and p.warmup_itr == 0
            continue
        assert ref_before == 320_000  # reference Hopper: iterations 1-4 of 80k (iteration 0 evaluates)
        assert before >= ref_before  # ... yet the critic learns alone on at least the reference's env steps
        one_less = filled("hopper", method, **{**p.flags, "n_critic_warmup_itr": a.n_critic_warmup_itr - 1})
        assert loop_count(one_less, True)[0] < ref_before  # and the warm-up is the shortest that does
        assert (p.warmup_itr, p.warmup_env_steps, p.reference_warmup_env_steps) == (a.n_critic_warmup_itr, before,
                                                                                    ref_before)
        # evaluations as far apart in env steps as the reference's
        assert a.val_freq * a.n_steps == ref.val_freq * ref.n_steps


@pytest.mark.parametrize("n_steps", [100, 300])
def test_other_iteration_lengths_keep_the_warm_up(n_steps):
    methods = [m for m in METHODS if n_steps * 4 >= 1000 or m not in bc.WHOLE_EPISODES]
    args = bc.Args(tasks=["hopper"], methods=methods, n_steps=n_steps, n_train_itr=400, min_actor_updates=1)
    for p in bc.plans(args):
        a = filled("hopper", p.method, **p.flags)
        before, after = loop_count(a, True)
        assert before == p.warmup_env_steps
        if p.warmup_itr:
            assert before >= 320_000 and before - 320_000 < p.iteration_env_steps
            assert p.actor_updates == after * p.updates_per_iteration


def test_actor_updates_match_the_scripts_update_counts(cpu_plans):
    for p in cpu_plans:
        a = filled(p.task, p.method, **p.flags)
        samples = a.n_steps * a.num_envs
        if p.method == "dppo":  # `for start in range(0, S * K_ft - batch_size + 1, batch_size)` per epoch
            per_itr = a.update_epochs * len(range(0, samples * a.ft_denoising_steps - a.batch_size + 1, a.batch_size))
        elif p.method == "exact":
            per_itr = a.update_epochs * len(range(0, samples - a.batch_size + 1, a.batch_size))
        elif p.method == "drwr":  # every chunk-step in a finished episode: the most there can be
            per_itr = a.update_epochs * max(1, samples // a.batch_size)
        else:  # reference `num_batch`
            per_itr = int(samples / a.batch_size * a.replay_ratio)
        _, after = loop_count(a, p.task == "hopper")
        assert p.actor_updates == per_itr * after


def test_cpu_budget_gives_every_actor_its_minimum_and_no_more_iterations(cpu_plans):
    hopper = [p for p in cpu_plans if p.task == "hopper"]
    assert len({p.n_train_itr for p in hopper}) == 1  # one budget for every method
    assert min(p.actor_updates for p in hopper) >= 200
    shorter = bc.Args(tasks=["hopper"], n_train_itr=hopper[0].n_train_itr - 1)
    with pytest.raises(bc.Refused):
        bc.plans(shorter)
    # minibatches of the per-iteration epoch methods scale with the iteration: same number per epoch
    for p in hopper:
        ref = filled("hopper", p.method)
        if p.method in bc.ITERATION_EPOCHS:
            assert p.flags["batch_size"] * ref.n_steps == ref.batch_size * p.n_steps
        else:
            assert "batch_size" not in p.flags


def test_paper_budget_is_the_reference_unchanged():
    for p in bc.plans(bc.Args(budget="paper")):
        ref = filled(p.task, p.method)
        assert {k: v for k, v in p.flags.items() if k != "checkpoint"} == {}
        assert (p.n_train_itr, p.n_steps, p.num_envs, p.val_freq, p.warmup_itr) == (
            ref.n_train_itr, ref.n_steps, ref.num_envs, ref.val_freq, getattr(ref, "n_critic_warmup_itr", 0) or 0)
        assert p.warmup_env_steps == p.reference_warmup_env_steps


def test_avoid_runs_the_scripts_defaults_under_both_budgets(cpu_plans):
    for p in cpu_plans:
        if p.task == "avoid-m2":
            assert p.flags == {} and p.n_steps * p.act_steps >= get_task("avoid-m2").max_episode_steps


def test_refusal_names_the_iterations_that_suffice():
    with pytest.raises(bc.Refused, match=r"^refused: dql on hopper: its actor would take 160 updates after the critic "
                                         r"warm-up \(320k env steps\), fewer than --min-actor-updates 200; raise "
                                         r"--n-train-itr to at least 11$"):
        bc.plans(bc.Args(tasks=["hopper"], methods=["dql"], n_train_itr=10))
    assert bc.plans(bc.Args(tasks=["hopper"], methods=["dql"], n_train_itr=11))[0].actor_updates == 320
    with pytest.raises(bc.Refused, match="would take 0 updates after the critic warm-up"):
        bc.plans(bc.Args(tasks=["hopper"], methods=["qsm"], n_train_itr=9))


def test_refused_in_one_line_with_a_non_zero_exit():
    r = harness("--tasks", "hopper", "--methods", "drwr", "--n-steps", "50", "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "refused: drwr on hopper: an iteration of 50 chunk-steps (200 env steps per env) is shorter than an episode "
        "(1000) and drwr learns only from episodes that start and end inside one iteration; raise --n-steps to at "
        "least 250"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dppo", "sac"], "error: unknown method 'sac'; valid: dppo, drwr, dawr, exact, dipo, idql, dql, qsm"),
    (["--tasks", "walker2d"], "error: unknown task 'walker2d'; valid: avoid-m2, hopper"),
    (["--n-train-itr", "0"], "error: --n-train-itr must be positive (got 0)"),
])
def test_bad_input_ends_in_one_line(argv, message):
    r = harness(*argv, "--dry-run")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [message]


def test_dry_run_prints_each_plan(capsys):
    bc.main(bc.Args(tasks=["hopper"], methods=["dppo", "dql"], dry_run=True, out="/nonexistent/never-written"))
    out = capsys.readouterr().out
    assert ("hopper:dql: python dql.py --env-id hopper --checkpoint data/hopper/diffusion_medium.pt --n-steps 250 "
            "--val-freq 20 --n-critic-warmup-itr 9 --n-train-itr 11") in out
    assert "warm-up 9 itr = 320,000 env steps (reference 320,000); actor updates after it: 320 (160/itr)" in out
    assert "--batch-size 25000" in out and "no warm-up; actor updates after it: 200 (20/itr)" in out
    assert out.count("estimated ") == 3  # two runs and the total
    assert "estimated CPU time" in out


def test_estimate_counts_warm_up_training_and_evaluations():
    p = bc.plans(bc.Args(tasks=["hopper"], methods=["dql"]))[0]
    roll, warm, full = 0.01, 0.1, 1.0
    # itr 0 evaluates; 1-8 warm up; 9-10 train the actor; then the final evaluation
    expected = 8 * 250 * (roll + warm) + 2 * 250 * (roll + full) + 2 * 250 * roll
    assert math.isclose(bc.estimate_s(p, {"hopper": {"dql": (roll, warm, full)}}), expected)
    assert bc.wall_s([3.0, 2.0, 2.0, 1.0], 2) == 4.0


def test_one_tiny_run_writes_its_plan_and_the_table(tmp_path):
    out = tmp_path / "cmp"
    r = harness("--tasks", "avoid-m2", "--methods", "drwr", "--n-train-itr", "1", "--min-actor-updates", "1",
                "--out", str(out), "--jobs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "avoid-m2__drwr.json") as f:
        result = json.load(f)
    shutil.rmtree(result["run_dir"])  # the run folder goes to the repository's runs/, as every run of the harness
    assert result["flags"] == {"n_train_itr": 1} and result["plan"]["actor_updates"] == 16
    assert len(result["history"]) == 1 and result["history"][0]["env_steps"] == 5000
    table = (out / "table.md").read_text()
    assert "| DRWR |" in table and "| ≤ 16 |" in table and (out / "comparison.png").is_file()
