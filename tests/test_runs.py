"""common/runs.py: the run plumbing every script shares."""

import dataclasses
import math
import os
import typing
from typing import Annotated

import pytest
import torch

from common import runs
from common.errors import DatasetError, NonFiniteError, UsageError
from common.pretraining import release_checkpoint
from common.runs import (CHECKPOINT_FORMAT, apply_defaults, check_finite, check_output_path, load_checkpoint, new_run_dir,
                         refuse_flags, resume_args, save_checkpoint, script_name)


@dataclasses.dataclass
class Toy:
    env_id: str = "avoid-m2"
    exp_name: str = "toy"
    seed: int = 1
    n_train_itr: int | None = None
    batch_size: int | None = None
    gamma: float | None = None
    resume: str | None = None
    eval_only: bool = False
    dims: tuple[int, ...] = (4, 4)


@dataclasses.dataclass
class Named:
    n_train_itr: Annotated[int | None, runs.POSITIVE] = None
    gae_lambda: Annotated[float, runs.FRACTION] = 0.95


@dataclasses.dataclass
class Limited:
    n: Annotated[int | None, runs.POSITIVE] = None
    lr: Annotated[float, runs.POSITIVE] = 1e-3
    kl: Annotated[float | None, runs.POSITIVE_OR_INF] = 1.0
    coef: Annotated[float, runs.NON_NEGATIVE] = 0.5
    gamma: Annotated[float, runs.FRACTION] = 0.99
    seed: Annotated[int, runs.SEED] = 1
    rate: float = 3.0  # no Limits: any finite number
    flag: bool = True
    name: str = "x"


@pytest.mark.parametrize("field,value,message", [
    ("n", 0, "--n must be positive (got 0)"), ("n", -3, "--n must be positive (got -3)"),
    ("lr", math.nan, "--lr must be positive (got nan)"), ("lr", math.inf, "--lr must be a finite number > 0 (got inf)"),
    ("kl", -1.0, "--kl must be positive (got -1.0)"), ("coef", -0.5, "--coef must be a finite number >= 0 (got -0.5)"),
    ("coef", math.inf, "--coef must be a finite number >= 0 (got inf)"),
    ("gamma", math.nan, "--gamma must be in [0.0, 1.0] (got nan)"), ("gamma", 1.5, "--gamma must be in [0.0, 1.0] (got 1.5)"),
    ("seed", -1, "--seed must be in [0, 2147483647] (got -1)"), ("seed", 2**31, "--seed must be in [0, 2147483647]"),
    ("rate", math.inf, "--rate must be a finite number (got inf)"), ("rate", -math.inf, "--rate must be a finite number"),
    ("rate", math.nan, "--rate must be a finite number (got nan)")])
def test_check_args_refuses_what_the_fields_limits_refuse(field, value, message):
    with pytest.raises(UsageError) as e:
        runs.check_args(Limited(**{field: value}))
    assert str(e.value).startswith(message)


def test_check_args_allows_the_limits_edges_none_and_declared_inf():
    runs.check_args(Limited())
    for kw in (dict(n=None, kl=None), dict(n=1, kl=math.inf), dict(coef=0.0, gamma=0.0), dict(gamma=1.0, seed=0),
               dict(seed=2**31 - 1, rate=-1e30, lr=1e-12)):
        runs.check_args(Limited(**kw))


def test_dppo_finetune_declares_its_limits():
    """Every number of dppo_finetune.Args is checked: a flag without declared Limits may be any finite number, so the
    ones a run needs positive, non-negative or in [0, 1] are declared (as fill_defaults' lists were)."""
    import dppo_finetune as ft
    hints = typing.get_type_hints(ft.Args, include_extras=True)
    limits = {f.name: next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, runs.Limits)), None)
              for f in dataclasses.fields(ft.Args)}
    positive = {"n_train_itr", "num_envs", "n_steps", "n_workers", "ft_denoising_steps", "ddim_steps", "horizon_steps",
                "act_steps", "batch_size", "update_epochs", "save_every", "torch_threads", "eval_n_steps", "actor_lr",
                "actor_lr_min", "critic_lr", "lr_cycle_itr", "clip_coef", "clip_coef_base", "min_logprob_denoising_std",
                "min_sampling_denoising_std", "randn_clip_value", "clip_coef_rate", "update_chunk"}
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == positive
    assert {k for k, v in limits.items() if v is runs.POSITIVE_OR_INF} == {"target_kl", "max_grad_norm"}
    assert {k for k, v in limits.items() if v is runs.FRACTION} == {"gamma", "gae_lambda", "gamma_denoising"}
    assert {k for k, v in limits.items() if v is runs.NON_NEGATIVE} == {"obs_noise_std", "action_noise_std", "val_freq",
                                                                        "lr_warmup_itr", "n_critic_warmup_itr", "vf_coef",
                                                                        "bc_coef"}
    assert limits["seed"] is runs.SEED
    with pytest.raises(UsageError, match=r"--clip-coef must be a finite number > 0 \(got inf\)"):
        ft.fill_defaults(ft.Args(clip_coef=math.inf))
    ft.fill_defaults(ft.Args(target_kl=math.inf))  # inf: no limit


def test_script_name_is_the_file_name():
    assert script_name("/a/b/dppo_finetune.py") == "dppo_finetune"


def test_run_folders_are_unique_within_one_second(tmp_path):
    root = str(tmp_path / "runs")
    dirs = {new_run_dir("avoid-m2", "x", 1, root=root) for _ in range(5)}
    assert len(dirs) == 5 and all(os.path.isdir(d) for d in dirs)


def test_run_folder_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(UsageError, match="is a file"):
        new_run_dir("avoid-m2", "x", 1, root=str(tmp_path / "runs"))


def test_checkpoints_are_atomic_readable_and_leave_no_temp_files(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"a": torch.ones(2)})
    save_checkpoint(path, {"a": torch.zeros(2)})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["c.pt"] and os.stat(path).st_mode & 0o044  # no *.tmp left, not private


def _policy_ckpt(**weights):
    return {"format": CHECKPOINT_FORMAT, "policy": "diffusion", "backbone": "mlp", "arch": {}, "task": "avoid-m2",
            "obs_dim": 4,
            "action_dim": 2, "horizon_steps": 4, "cond_steps": 1, "normalization": {}, "args": {},
            "ema": weights, "model": weights, "optimizer": {"state": {}}}


def test_load_checkpoint_refuses_missing_keys_and_non_finite_weights(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "policy": "diffusion"})
    with pytest.raises(DatasetError, match="lacks backbone"):
        load_checkpoint(path, "diffusion", "hint")
    save_checkpoint(path, _policy_ckpt(w=torch.tensor([1.0, float("nan")])))
    with pytest.raises(DatasetError, match="non-finite values in ema.w"):
        load_checkpoint(path, "diffusion", "hint")
    save_checkpoint(path, _policy_ckpt(w=torch.ones(2)))
    assert load_checkpoint(path, "diffusion", "hint")["ema"]["w"].sum() == 2
    with pytest.raises(DatasetError, match="not a gaussian one; use dppo_finetune.py"):
        load_checkpoint(path, "gaussian", "hint")


def test_release_checkpoint_keeps_what_fine_tuning_reads():
    rel = release_checkpoint(_policy_ckpt(w=torch.ones(2)))
    assert "ema" in rel and "model" not in rel and "optimizer" not in rel and rel["task"] == "avoid-m2"
    ckpt = {**_policy_ckpt(w=torch.ones(2)), "model": {"w": torch.zeros(2)}}
    assert torch.equal(release_checkpoint(ckpt)["ema"]["w"], torch.ones(2))  # the EMA weights, not the raw model's


def test_numeric_checks_name_the_flag():
    with pytest.raises(UsageError, match="--n-train-itr must be positive"):
        runs.check_args(Named(n_train_itr=0))
    with pytest.raises(UsageError, match="--gae-lambda must be in"):
        runs.check_args(Named(gae_lambda=float("nan")))
    runs.check_args(Named())  # None: not set, filled later


def declared_limits(args_type: type) -> dict:
    hints = typing.get_type_hints(args_type, include_extras=True)
    return {f.name: next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, runs.Limits)), None)
            for f in dataclasses.fields(args_type)}


POSITIVE_BEFORE = {  # the check_positive lists these scripts had before their Limits were declared on the fields
    "dppo_pretrain": {"denoising_steps", "horizon_steps", "cond_steps", "time_dim", "unet_dim", "unet_groupnorm_eps",
                      "n_epochs", "batch_size", "learning_rate", "min_lr", "ema_every", "n_eval_envs", "save_every",
                      "torch_threads", "mlp_dims", "cond_mlp_dims", "unet_dim_mults", "max_n_episodes"},  # widths: each entry
    "dppo_pretrain_pixel": {"denoising_steps", "horizon_steps", "cond_steps", "time_dim", "embed_dim", "num_heads",
                            "spatial_emb", "unet_dim", "n_epochs", "batch_size", "learning_rate", "min_lr", "ema_every",
                            "n_eval_envs", "n_workers", "save_every", "torch_threads", "n_demos", "mlp_dims",
                            "unet_dim_mults", "max_n_episodes"},
}


@pytest.mark.parametrize("module", list(POSITIVE_BEFORE))
def test_pretrain_scripts_declare_their_limits(module):
    """Every number of the pre-training scripts' Args is checked (`runs.check_args` in fill_defaults) with the limits
    their check_positive / check_range lists had: positive, [0, inf), EMA decay in [0, 1], the seed's range."""
    import importlib
    mod = importlib.import_module(module)
    limits = declared_limits(mod.Args)
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == POSITIVE_BEFORE[module]
    assert {k for k, v in limits.items() if v is runs.NON_NEGATIVE} == {"warmup_epochs", "weight_decay", "ema_start_epoch",
                                                                        "eval_every"}
    assert {k for k, v in limits.items() if v is runs.FRACTION} == {"ema_decay"}
    assert limits["seed"] is runs.SEED and not {v for v in limits.values()} - {None, runs.POSITIVE, runs.NON_NEGATIVE,
                                                                              runs.FRACTION, runs.SEED}
    env = {"dppo_pretrain_pixel": dict(env_id="lift-img")}.get(module, {})
    with pytest.raises(UsageError, match=r"--learning-rate must be a finite number > 0 \(got inf\)"):
        mod.fill_defaults(mod.Args(learning_rate=math.inf, **env))
    with pytest.raises(UsageError, match=r"--weight-decay must be a finite number >= 0 \(got -1.0\)"):
        mod.fill_defaults(mod.Args(weight_decay=-1.0, **env))


def test_deploy_and_collect_declare_their_limits():
    import deploy_franka
    from scripts import collect_dataset
    limits = declared_limits(deploy_franka.Args)
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == {
        "act_steps", "max_steps", "max_speed", "max_step", "gripper_speed", "gripper_force", "translational_stiffness",
        "rotational_stiffness", "ddim_steps", "torch_threads"}
    assert limits["seed"] is runs.SEED
    assert limits["control_hz"] == runs.Limits(0.1, 1000.0)  # franky's torque loop runs at 1 kHz
    assert limits["max_rotation_step"] == runs.Limits(0, math.pi, strict=True)
    assert limits["max_gripper_force"] == runs.Limits(0, 70.0, strict=True)  # what the Franka Hand holds
    limits = declared_limits(collect_dataset.Args)
    assert {k for k, v in limits.items() if v is runs.POSITIVE} == {"n_env_steps", "num_envs", "act_steps", "n_workers"}
    assert limits["seed"] == runs.Limits(0, 2**32 - 1)  # numpy's seed range


def test_apply_defaults_fills_only_unset_flags():
    args = Toy(batch_size=7)
    filled = apply_defaults(args, {"batch_size": 100, "n_train_itr": 5})
    assert args.batch_size == 7 and args.n_train_itr == 5 and filled == {"n_train_itr": 5}


def test_refuse_flags_of_another_mode():
    refuse_flags(Toy(), ("batch_size",), "is not used here")
    with pytest.raises(UsageError, match="--batch-size is not used here"):
        refuse_flags(Toy(batch_size=3), ("batch_size",), "is not used here")


def test_resume_uses_the_runs_arguments(capsys):
    saved = dataclasses.asdict(Toy(n_train_itr=3, batch_size=16, dims=(8, 8), exp_name="mine"))
    saved["dims"] = list(saved["dims"])
    args = resume_args(Toy(), saved, "runs/r")  # nothing given: the run's own budget and settings
    assert args.n_train_itr == 3 and args.batch_size == 16 and args.dims == (8, 8) and args.resume == "runs/r"
    args = resume_args(Toy(n_train_itr=6, eval_only=True), saved, "runs/r")  # an extension wins visibly
    assert args.n_train_itr == 6 and args.eval_only and "--n-train-itr 6 (the run had 3)" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--batch-size 32 differs"):
        resume_args(Toy(batch_size=32), saved, "runs/r")


def test_output_path_checked_before_work(tmp_path):
    check_output_path(str(tmp_path / "new" / "deeper" / "p.pt"))
    with pytest.raises(UsageError, match="is a folder"):
        check_output_path(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="cannot write under"):
        check_output_path(str(tmp_path / "f" / "p.pt"))


def test_check_finite_names_what_broke():
    net = torch.nn.Linear(2, 2)
    check_finite("iteration 3", {"pg_loss": 0.1}, net)
    with pytest.raises(NonFiniteError, match="non-finite pg_loss at iteration 3"):
        check_finite("iteration 3", {"pg_loss": float("nan")}, net)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="Linear weights"):
        check_finite("iteration 3", {"pg_loss": 0.1}, net)
