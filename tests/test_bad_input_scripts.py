"""Bad input to specific spots of the scripts (issue 27, second round): `gaussian_ppo.py --from-scratch` on a task of
another suite, `exact_likelihood_pg.py`'s ODE step size and a non-finite likelihood, `deploy_franka.py` with the
reference's checkpoints and every number it sends to the arm, and furniture pre-training asked for evaluation rollouts.

Each refusal ends in exit code 2 with one line `error: ...` on stderr (through `common.runs.cli`), and writes nothing.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch
import tyro

import deploy_franka as deploy
import dppo_pretrain as pt
import exact_likelihood_pg as exact
import gaussian_ppo as gauss
import gmm_ppo as gmm
import loaders.chunk_pretrain as chunk_pretrain
from common import runs
from common.errors import UsageError
from hardware.robot import FakeRobot
from tests.test_deploy_franka import fake_args, reach_checkpoint

INF, NAN = math.inf, math.nan
PT = dict(env_id="avoid-m2", n_epochs=1, seed=0, mlp_dims=(64, 64, 64), batch_size=128)
BC = dict(pretrain=True, env_id="avoid-m2", n_epochs=1, seed=0, mlp_dims=(64, 64, 64), pretrain_batch_size=128)


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**"), recursive=True))


def refused(main, args, monkeypatch, capsys, tmp_path) -> str:
    """`main(args)` through `runs.cli` in the empty folder `tmp_path`: exit 2, one `error:` line, nothing written; returns
    the line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    before = files_under(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(main, type(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert files_under(tmp_path) == before
    return err[0]


# ---------------------------------------------------------------- gaussian_ppo.py --from-scratch

@pytest.mark.parametrize("env_id", ["one-leg-low", "lift", "avoid-m2"])
def test_from_scratch_on_a_task_of_another_suite_is_one_line(env_id, monkeypatch, capsys, tmp_path):
    """App. B.2's PPO from scratch makes gymnasium envs: a furniture, robomimic or Avoid id was gymnasium's NameNotFound
    traceback; it is one line naming the pre-training command."""
    line = refused(gauss.main, gauss.Args(env_id=env_id, from_scratch=True), monkeypatch, capsys, tmp_path)
    assert "--from-scratch runs gymnasium ids" in line and f"python gaussian_ppo.py --pretrain --env-id {env_id}" in line


# ---------------------------------------------------------------- exact_likelihood_pg.py

@pytest.mark.parametrize("step", [1e-30, 1e308, 1.5, 0.0, INF, NAN])
def test_exact_ode_step_size_out_of_range_is_one_line(step, monkeypatch, capsys, tmp_path):
    """1e-30 was an OverflowError and 1e308 an empty-grid RuntimeError, both raw tracebacks."""
    line = refused(exact.main, exact.Args(sde_step_size=step), monkeypatch, capsys, tmp_path)
    assert line.startswith(r"error: --sde-step-size must be in [1e-06, 1.0]"), line


def test_exact_ode_step_size_edges():
    """1.0 is one Euler step over [ε, 1]; a step in range but below ~1/K is refused against the checkpoint's K."""
    idx, dt = exact.ode_grid(20, 1e-4, 1.0)
    assert idx == [0] and dt == pytest.approx([1 - 1e-4])
    with pytest.raises(UsageError, match="use a step of at least 0.05"):
        exact.ode_grid(20, 1e-4, 1e-6)


def test_exact_non_finite_likelihood_stops_in_one_line_before_saving(monkeypatch, capsys, tmp_path):
    """A β scale that overflows the ODE makes the log-likelihoods non-finite: the run stops at that iteration in one
    line, and no checkpoint of it is written."""
    args = exact.Args(env_id="avoid-m2", n_train_itr=1, num_envs=2, n_steps=5, batch_size=10, val_freq=0, plot=False,
                      seed=0, sde_beta_scale=1e30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(exact.main, exact.Args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err[-1].startswith("error: non-finite") and "old_logprob_mean" in err[-1], err
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))


# ---------------------------------------------------------------- deploy_franka.py

@pytest.mark.parametrize("name, kind", [("paper", ""), ("paper-unet", " --kind diffusion_unet")])
def test_deploy_paper_checkpoint_names_the_converter(name, kind, monkeypatch, capsys, tmp_path):
    """deploy_franka.py has no --env-id: the line names the converter command, not a flag the script lacks."""
    line = refused(deploy.main, deploy.Args(checkpoint=name, robot="fake", yes=True), monkeypatch, capsys, tmp_path)
    assert "--env-id" not in line.split("python -m loaders.convert")[0]
    assert f"python -m loaders.convert paper --env-id one-leg-low{kind}," in line


def test_deploy_reference_checkpoint_file_names_the_converter(monkeypatch, capsys, tmp_path):
    path = str(tmp_path / "state_8000.pt")
    torch.save({"epoch": 1, "model": {"network.w": torch.zeros(2)}}, path)  # what the reference's pre-training saves
    line = refused(deploy.main, deploy.Args(checkpoint=path, robot="fake", yes=True), monkeypatch, capsys, tmp_path)
    assert f"convert it first: python -m loaders.convert {path} --env-id TASK" in line


@pytest.mark.parametrize("field, value, match", [
    ("control_hz", INF, r"--control-hz must be in \[0.1, 1000.0\]"),
    ("control_hz", 1e9, r"--control-hz must be in \[0.1, 1000.0\]"),  # the feed-forward twist is the step x control_hz
    ("control_hz", 1e-9, r"--control-hz must be in \[0.1, 1000.0\]"),
    ("max_rotation_step", 4.0, r"--max-rotation-step must be in \(0, 3.14"),
    ("max_rotation_step", 0.0, r"--max-rotation-step must be in \(0, 3.14"),
    ("max_gripper_force", 100.0, r"--max-gripper-force must be in \(0, 70.0\]"),
    ("workspace_min", (-INF, -INF, -INF), "--workspace-min must be a finite number"),
    ("workspace_max", (INF, 0.4, 0.6), "--workspace-max must be a finite number"),
    ("workspace_min", (NAN, -0.4, 0.02), "--workspace-min must be a finite number"),
])
def test_deploy_numbers_out_of_range_are_refused_before_the_arm_moves(field, value, match, tmp_path):
    """An infinite corner used to disable the workspace box, and --control-hz 1e9 to command huge velocities."""
    args, robot = fake_args(tmp_path, reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3])),
                            **{field: value}), FakeRobot()
    with pytest.raises(UsageError, match=match):
        deploy.check_args(args)  # first alone: an unchecked 1e-9 Hz would sleep through the episode
    with pytest.raises(UsageError, match=match):
        deploy.main(args, robot=robot)
    assert robot.sent == [] and not robot.started and not (tmp_path / "episode.jsonl").exists()


def test_deploy_limits_at_their_edges_run(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    out = deploy.main(fake_args(tmp_path, ckpt, control_hz=1000.0, max_rotation_step=math.pi, max_gripper_force=70.0,
                                max_steps=2), robot=FakeRobot())
    assert out["steps"] == 2 and out["stop_reason"] == "done"


# ---------------------------------------------------------------- furniture pre-training with --eval-every

@pytest.mark.parametrize("script", ["pt", "gauss", "gmm"])
def test_furniture_pretraining_with_evaluations_is_one_line(script, monkeypatch, capsys, tmp_path):
    """Furniture pre-training makes no Isaac Gym envs: a non-zero --eval-every was silently never honoured. Refused
    before the dataset is read (offline: a download attempt would be another error)."""
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    main, args = {"pt": (pt.main, pt.Args(env_id="one-leg-low", eval_every=5)),
                  "gauss": (gauss.main, gauss.Args(pretrain=True, env_id="one-leg-low", eval_every=5)),
                  "gmm": (gmm.main, gmm.Args(pretrain=True, env_id="one-leg-low", eval_every=5))}[script]
    line = refused(main, args, monkeypatch, capsys, tmp_path)
    assert "--eval-every 5: furniture pre-training runs no evaluation rollouts; drop it" in line


@pytest.mark.parametrize("script", ["pt", "gauss"])
def test_pretraining_without_the_simulator_says_once_that_it_does_not_evaluate(script, monkeypatch, capsys, tmp_path):
    """A task whose simulator is not installed pre-trains without rollouts, and says so once at the start."""
    monkeypatch.chdir(tmp_path)
    module = pt if script == "pt" else chunk_pretrain
    monkeypatch.setattr(module, "missing_packages", lambda task: ["some-simulator==1.0"])
    capsys.readouterr()
    out = pt.main(pt.Args(**PT, eval_every=1)) if script == "pt" else gauss.main(gauss.Args(**BC, eval_every=1))
    printed = capsys.readouterr().out
    assert printed.count("no evaluation rollouts: avoid-m2 needs some-simulator==1.0, which is not installed") == 1
    assert os.path.isfile(out["checkpoint"])

