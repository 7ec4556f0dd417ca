"""Every number of every script and tool, and the rules between flags that decide whether a run can do its work at all.

1. Each numeric field of each `Args` (introspected: `dataclasses.fields`, `typing.get_type_hints(include_extras=True)`)
   is given a non-finite, zero, negative and too-large value and handed to `runs.check_args` alone (no run): it either
   raises `runs.UsageError` in one line naming the flag, or the value is valid by the table RANGES below, which is the
   specification (a new flag must be added to it). `inf` is accepted exactly where `--help` says "inf: no limit".
2. Each script and tool calls `runs.check_args` before any work: with it replaced by a refusal, `main` ends at once and
   nothing is written.
3. The cross-flag rules, written once in common/runs.py (`check_gradient_steps`, `check_minibatch`, `check_warmup`):
   their boundaries, and every script that has the flags refusing a tiny set-up that breaks one, with the same line,
   before a run folder exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import typing

import pytest
import tyro

from common import runs
from common.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "avoid-m2_diffusion.pt")  # Avoid M2, MLP, T_a = 4, K = 20
MODULES = ("dppo_pretrain", "dppo_pretrain_pixel", "dppo_finetune", "dppo_critic_ablation", "dppo_finetune_pixel",
           "gaussian_ppo", "gmm_ppo", "drwr", "dawr", "dipo", "idql", "dql", "qsm", "exact_likelihood_pg", "deploy_franka",
           "scripts.collect_dataset", "scripts.baselines_comparison", "scripts.avoid_comparison", "flow_pretrain", "reinflow",
           "scripts.appendix_ablations")

# ---- the specification: what each flag accepts (by name; the same name means the same range in every script)
POSITIVE = {  # > 0 and finite; no upper bound (a huge count only costs time, a huge rate diverges and is stopped by
    # runs.check_finite); the bounds set by another flag (act_steps <= horizon_steps, ...) are the scripts' own checks
    "act_steps", "action_grad_norm_coef", "action_gradient_steps", "action_lr", "actor_lr", "actor_lr_min", "batch_size",
    "buffer_size", "clip_coef", "clip_coef_base", "clip_coef_rate", "cond_mlp_dims", "cond_steps",
    "critic_lr", "critic_update_ratio", "ddim_steps", "denoising_steps", "ema_every", "embed_dim", "eval_n_steps",
    "ft_denoising_steps", "grad_accumulate", "gripper_force", "gripper_speed", "horizon_steps", "jobs", "learning_rate",
    "logprob_batch_size", "lr_cycle_itr", "max_episode_steps", "max_speed",
    "max_step", "max_steps", "min_actor_updates", "min_logprob_denoising_std", "min_lr", "min_sampling_denoising_std",
    "max_n_episodes", "lr_cycle_epochs", "min_std", "max_std", "noise_hidden_dims", "denoised_clip_value", "critic_lr_min",
    "repeat_samples", "episodes",
    "mlp_dims", "n_demos", "n_emb", "n_env_steps", "n_epochs", "n_eval_envs", "n_heads", "n_layers", "n_modes", "n_steps",
    "n_train_itr", "n_workers", "num_envs", "num_heads", "num_sample", "pretrain_batch_size", "pretrain_save_every",
    "q_grad_coeff", "randn_clip_value", "replay_ratio", "reward_scale", "rotational_stiffness", "save_every",
    "sde_beta_scale", "sde_min_beta", "sde_num_probes", "spatial_emb", "std_init", "std_max", "std_min",
    "time_dim", "torch_threads", "translational_stiffness", "unet_dim", "unet_dim_mults", "unet_groupnorm_eps",
    "update_chunk", "update_epochs"}
NO_LIMIT = {"max_grad_norm", "max_weight", "target_kl"}  # > 0; inf: no limit (said in --help)
# NON_NEGATIVE: 0 is a valid choice: off, none, only the final evaluation, ...
NON_NEGATIVE = {"action_noise_std", "bc_coef", "beta", "ema_start_epoch", "eta", "eval_every", "exact_divergence_max_dim",
                "lr_warmup_itr", "n_critic_warmup_itr", "critic_weight_decay", "ent_coef", "obs_noise_std",
                "scale_reward_factor", "val_freq", "vf_coef", "warmup_epochs", "weight_decay"}
FRACTION = {"critic_tau", "ema_decay", "expectile", "gae_lambda", "gamma", "gamma_denoising", "sample_weight",
            "target_ema_rate", "td_alpha", "td_lambda", "noise_hold_ratio", "noise_decay_ratio"}
# FRACTION: in [0, 1] (the EMA rates of a target network in (0, 1])
RATES = {"critic_tau", "target_ema_rate"}  # 0 would leave the target network where it started
# seed 0 is valid (collect_dataset's seed goes to 2**32 - 1)
BOUNDED = {"seed": (0, 2**31 - 1), "seeds": (0, 2**31 - 1), "sde_eps": (1e-12, 0.5),
           "sde_step_size": (1e-6, 1.0), "control_hz": (0.1, 1000.0),  # a step of the ODE's [0, 1]; the arm's loop rate
           "max_rotation_step": (0, math.pi), "max_gripper_force": (0, 70.0)}  # (0, high]: 0 would never move or grip
OPEN_AT_ZERO = {"max_rotation_step", "max_gripper_force"}
ANY_FINITE = {"workspace_min", "workspace_max",  # coordinates [m], negative ones included; min < max is deploy's check
              "logprob_min", "logprob_max"}  # reinflow.py's log-prob clamp; min < max is its own check
PROBES = ("nan", "inf", "-inf", "zero", "negative", "too-large")
REQUIRED = {"deploy_franka": dict(checkpoint="x.pt", robot="fake"), "scripts.collect_dataset": dict(checkpoint="x.pt",
            out="d/train.npz"), "gaussian_ppo": dict(checkpoint="x.pt"), "gmm_ppo": dict(checkpoint="x.pt"),
            "scripts.appendix_ablations": dict(experiment="critic")}


def default_args(module_name: str) -> typing.Any:
    """The module's Args at their defaults (with the fields that have none, and a checkpoint where one is required)."""
    return importlib.import_module(module_name).Args(**REQUIRED.get(module_name, {}))


def accepted(name: str) -> set[str]:
    """The probes the specification accepts for the flag `name`."""
    if name in POSITIVE:
        return {"too-large"}
    if name in NO_LIMIT:
        return {"inf", "too-large"}
    if name in NON_NEGATIVE:
        return {"zero", "too-large"}
    if name in FRACTION:
        return set() if name in RATES else {"zero"}
    if name in BOUNDED:
        return {"zero"} if BOUNDED[name][0] == 0 and name not in OPEN_AT_ZERO else set()
    if name in ANY_FINITE:
        return {"zero", "negative", "too-large"}
    raise AssertionError(f"--{name.replace('_', '-')}: a numeric flag without a range in this test's specification")


def probe_value(name: str, probe: str, is_int: bool) -> float:
    if probe == "too-large":  # past the upper bound where there is one, else a huge request
        return 1.5 if name in FRACTION else 2**62 if name == "seed" else 0.6 if name == "sde_eps" else (
            10**18 if is_int else 1e30)
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0, "negative": -1}[probe]


def numeric_fields(module_name: str) -> list[tuple[str, bool, bool]]:
    """(name, an int field, a tuple field) for every field of the module's Args that holds numbers."""
    args_type = importlib.import_module(module_name).Args
    hints = typing.get_type_hints(args_type, include_extras=True)
    out = []
    for f in dataclasses.fields(args_type):
        hint = hints[f.name]
        base = str(typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint)
        if "int" in base or "float" in base:
            out.append((f.name, "float" not in base, "tuple" in base))
    return out


FIELDS = [(m, name, is_int, is_tuple) for m in MODULES for name, is_int, is_tuple in numeric_fields(m)]


def with_value(module_name: str, name: str, value: float, is_tuple: bool) -> typing.Any:
    """The module's default Args with field `name` set to `value` (a tuple field: its second entry)."""
    args = default_args(module_name)
    if is_tuple:
        default = list(getattr(args, name) or (64, 64))
        default[1] = value
        value = tuple(default)
    setattr(args, name, value)
    return args


@pytest.mark.parametrize("module_name", MODULES)
def test_the_defaults_pass_the_checks(module_name):
    runs.check_args(default_args(module_name))


@pytest.mark.parametrize("module_name, name, is_int, is_tuple", FIELDS, ids=[f"{m}-{n}" for m, n, _, _ in FIELDS])
def test_every_number_of_every_flag(module_name, name, is_int, is_tuple):
    """nan, ±inf, 0, -1 and a too-large value: a one-line UsageError naming the flag, or valid by the specification."""
    ok = accepted(name)
    for probe in PROBES:
        args = with_value(module_name, name, probe_value(name, probe, is_int), is_tuple)
        if probe in ok:
            runs.check_args(args)
            continue
        with pytest.raises(UsageError) as e:
            runs.check_args(args)
        message = str(e.value)
        assert message.startswith(f"--{name.replace('_', '-')} must be ") and "\n" not in message, (probe, message)


def help_of_each_flag(module_name: str, capsys, monkeypatch) -> dict[str, str]:
    """{field name: its text in `--help`}, from tyro's own help output (box characters and line breaks removed)."""
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        tyro.cli(importlib.import_module(module_name).Args, args=["--help"])
    text = re.sub(r"[│╭╮╰╯─\s]+", " ", capsys.readouterr().out)
    flags = [(m.start(), m.group(1)) for m in re.finditer(r" --([a-z0-9-]+)", text)]
    return {flag.replace("-", "_"): text[start:end] for (start, flag), (end, _) in zip(flags, flags[1:] + [(len(text), "")])}


@pytest.mark.parametrize("module_name", MODULES)
def test_inf_is_accepted_only_where_help_says_no_limit(module_name, capsys, monkeypatch):
    helps = help_of_each_flag(module_name, capsys, monkeypatch)
    for name, is_int, is_tuple in numeric_fields(module_name):
        capsys.readouterr()
        try:
            runs.check_args(with_value(module_name, name, math.inf, is_tuple))
            takes_inf = True
        except UsageError:
            takes_inf = False
        assert takes_inf == ("inf: no limit" in helps[name]), (name, helps[name])
        if takes_inf:  # and a run says so when it starts
            assert f"--{name.replace('_', '-')} inf: no limit" in capsys.readouterr().out


# ---- every script and tool checks its numbers before any work

def _main_of(module_name: str) -> tuple[typing.Callable, typing.Any]:
    module = importlib.import_module(module_name)
    return module.collect if module_name == "scripts.collect_dataset" else module.main, default_args(module_name)


@pytest.mark.parametrize("module_name", [m for m in MODULES if m != "dppo_finetune_pixel"])
def test_every_script_checks_its_numbers_before_any_work(module_name, tmp_path, monkeypatch):
    """With `runs.check_args` replaced by a refusal, main ends in it and nothing is written (dppo_finetune_pixel.py
    checks after reading its checkpoint, whose backbone sets a default: below)."""
    class Checked(Exception):
        pass

    def refuse(args):
        raise Checked(type(args).__module__)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "check_args", refuse)
    main, args = _main_of(module_name)
    with pytest.raises(Checked):
        main(args)
    assert os.listdir(tmp_path) == []


def test_the_pixel_finetuning_checks_its_numbers_with_its_defaults():
    import dppo_finetune_pixel as ftp
    with pytest.raises(UsageError, match=r"^--gamma must be in \[0.0, 1.0\] \(got inf\)$"):
        ftp.fill_defaults(ftp.Args(gamma=math.inf), "vit-mlp")


# ---- the cross-flag rules, once in common/runs.py

def test_gradient_steps_rule():
    runs.check_gradient_steps(1, 5, 2, 10, 1)
    with pytest.raises(UsageError) as e:
        runs.check_gradient_steps(0, 2, 4, 20, 2)
    assert str(e.value) == ("no gradient step per iteration: --n-steps 2 x --num-envs 4 / --batch-size 20 x --replay-ratio "
                            "2 < 1; lower --batch-size or raise --replay-ratio, --n-steps or --num-envs")


def test_minibatch_rule():
    runs.check_minibatch(10, 5, 2)  # one minibatch of the whole iteration
    runs.check_minibatch(100, 5, 2, 10)
    with pytest.raises(UsageError, match=r"^--batch-size 11 exceeds the 10 samples of one iteration \(--n-steps 5 x "
                                         r"--num-envs 2\); lower --batch-size or raise --n-steps or --num-envs$"):
        runs.check_minibatch(11, 5, 2)
    with pytest.raises(UsageError, match=r"^--batch-size 101 exceeds the 100 samples of one iteration \(--n-steps 5 x "
                                         r"--num-envs 2 x K' 10\); "):
        runs.check_minibatch(101, 5, 2, 10)


def test_warmup_rule():
    runs.check_warmup(0, 1)
    runs.check_warmup(4, 5)  # the actor steps in the last iteration
    with pytest.raises(UsageError, match=r"^--n-critic-warmup-itr 5 leaves no iteration of --n-train-itr 5 in which the "
                                         r"actor steps; lower --n-critic-warmup-itr or raise --n-train-itr$"):
        runs.check_warmup(5, 5)


WARMUP = ("dppo_finetune", "dppo_critic_ablation", "dppo_finetune_pixel", "gaussian_ppo", "gmm_ppo", "exact_likelihood_pg",
          "dawr", "dipo", "dql", "idql", "qsm")  # every script with a critic warm-up (in iterations in all of them)
GRADIENT_STEPS = ("dawr", "dipo", "dql", "idql", "qsm")  # int(n_steps·num_envs / batch_size · replay_ratio) updates
MINIBATCH = ("dppo_finetune", "dppo_critic_ablation", "gaussian_ppo", "gmm_ppo",
             "exact_likelihood_pg")  # PPO minibatches (pixel: below)
GRADIENT_STEPS_LINE = "^no gradient step per iteration: --n-steps 1 x --num-envs 2 / --batch-size 1000 x --replay-ratio 1"


def _refused_before_a_run_folder(module_name: str, match: str, tmp_path, monkeypatch, **kw) -> None:
    module = importlib.import_module(module_name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=match):
        module.main(module.Args(**kw))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module_name", [m for m in WARMUP if m != "dppo_finetune_pixel"])
def test_a_warmup_as_long_as_the_budget_is_refused(module_name, tmp_path, monkeypatch):
    """The actor would never step: refused before the checkpoint is even read (here it does not exist)."""
    _refused_before_a_run_folder(module_name, "^--n-critic-warmup-itr 2 leaves no iteration of --n-train-itr 2 ", tmp_path,
                                 monkeypatch, env_id="avoid-m2", checkpoint=str(tmp_path / "missing.pt"), n_train_itr=2,
                                 n_critic_warmup_itr=2)
    module = importlib.import_module(module_name)  # --eval-only trains nothing: no rule about training
    module.fill_defaults(module.Args(env_id="avoid-m2", n_train_itr=2, n_critic_warmup_itr=2, eval_only=True))


def test_the_pixel_finetuning_refuses_a_warmup_as_long_as_the_budget():
    import dppo_finetune_pixel as ftp
    with pytest.raises(UsageError, match="^--n-critic-warmup-itr 3 leaves no iteration of --n-train-itr 2 "):
        ftp.fill_defaults(ftp.Args(n_train_itr=2, n_critic_warmup_itr=3), "vit-mlp")


@pytest.mark.parametrize("module_name", GRADIENT_STEPS)
def test_a_setup_without_a_gradient_step_is_refused(module_name, tmp_path, monkeypatch):
    """2 transitions per iteration / 1000 per batch x 1: no update; the same line in every off-policy script."""
    _refused_before_a_run_folder(module_name, GRADIENT_STEPS_LINE, tmp_path, monkeypatch, env_id="avoid-m2",
                                 checkpoint=SHIPPED, num_envs=2, n_steps=1, batch_size=1000, replay_ratio=1,
                                 n_critic_warmup_itr=0, **({"buffer_size": 1000} if module_name != "dipo" else {}))


def test_dawr_refuses_a_setup_without_a_critic_step(tmp_path, monkeypatch):
    """DAWR's critic takes n_batch // critic_update_ratio steps (reference): 2 actor steps / 4 would leave it untrained."""
    _refused_before_a_run_folder("dawr", r"^no critic step per iteration: 2 actor steps / --critic-update-ratio 4 < 1",
                                 tmp_path, monkeypatch, env_id="avoid-m2", checkpoint=SHIPPED, num_envs=2, n_steps=10,
                                 batch_size=10, replay_ratio=1, critic_update_ratio=4)


@pytest.fixture(scope="module")
def gaussian_checkpoints(tmp_path_factory) -> dict[str, str]:
    """1-epoch Avoid M2 pre-trained Gaussian and GMM policies (tiny MLPs)."""
    import gaussian_ppo
    import gmm_ppo
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("gaussian"))
    try:
        return {m.__name__: m.main(m.Args(pretrain=True, env_id="avoid-m2", n_epochs=1, eval_every=0, seed=0,
                                          mlp_dims=(32, 32), pretrain_batch_size=128))["checkpoint"]
                for m in (gaussian_ppo, gmm_ppo)}
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("module_name", MINIBATCH)
def test_a_minibatch_larger_than_the_iteration_is_refused(module_name, tmp_path, monkeypatch, request):
    """2 envs x 1 step = 2 samples (DPPO: x K' 10 = 20 pairs) and a minibatch of one more: the same line everywhere."""
    ckpt = request.getfixturevalue("gaussian_checkpoints")[module_name] if module_name in ("gaussian_ppo", "gmm_ppo") \
        else SHIPPED
    pairs = 20 if module_name in ("dppo_finetune", "dppo_critic_ablation") else 2
    _refused_before_a_run_folder(module_name, rf"^--batch-size {pairs + 1} exceeds the {pairs} samples of one iteration "
                                 r"\(--n-steps 1 x --num-envs 2" + (r" x K' 10\)" if pairs == 20 else r"\)"),
                                 tmp_path, monkeypatch, env_id="avoid-m2", checkpoint=ckpt, num_envs=2, n_steps=1,
                                 batch_size=pairs + 1, n_critic_warmup_itr=0)


def test_the_pixel_finetuning_refuses_a_minibatch_larger_than_the_iteration():
    import dppo_finetune_pixel as ftp
    args = ftp.Args(num_envs=2, n_steps=1, batch_size=11, ddim_steps=5)
    ftp.fill_defaults(args, "vit-mlp")
    with pytest.raises(UsageError, match=r"^--batch-size 11 exceeds the 10 samples of one iteration \(--n-steps 1 x "
                                         r"--num-envs 2 x K' 5\)"):
        ftp.fill_from_checkpoint(args, {"denoising_steps": 100, "horizon_steps": 4})


def test_a_refused_rule_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """Through the command line's own path (`runs.cli`): one `error:` line, exit code 2."""
    import dipo
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: dipo.Args(checkpoint=SHIPPED, n_train_itr=3, n_critic_warmup_itr=3))
    with pytest.raises(SystemExit) as e:
        runs.cli(dipo.main, dipo.Args)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: --n-critic-warmup-itr 3 leaves no iteration of --n-train-itr 3 in which the actor steps; lower "
        "--n-critic-warmup-itr or raise --n-train-itr"]
    assert os.listdir(tmp_path) == []


# ---- the argparse tools: the same Limits through runs.check_number

@pytest.mark.parametrize("argv, message", [(["--n-demos", "0"], "error: --n-demos must be positive (got 0)"),
                                           (["--seed", "-1"], r"error: --seed must be in [0, 2147483647] (got -1)")])
def test_avoid_demo_tool_checks_its_numbers(argv, message, tmp_path, capsys):
    """They ended in a numpy traceback (no demo to concatenate; a negative seed)."""
    from scripts import generate_avoid_demos
    assert generate_avoid_demos.main(["--subsets", "M2", "--out-dir", str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [message] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [(["--n-demos", "-2"], "error: --n-demos must be positive (got -2)"),
                                           (["--hold-steps", "0"], "error: --hold-steps must be positive (got 0)"),
                                           (["--images", "--image-size", "0"], "error: --image-size must be positive")])
def test_robomimic_demo_tool_checks_its_numbers(argv, message, tmp_path, capsys):
    """--hold-steps 0 would end every demo at its first step, solved or not."""
    pytest.importorskip("robosuite")
    from scripts import robomimic_demos
    assert robomimic_demos.main(["--task", "lift", "--out", str(tmp_path / "d.hdf5"), *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(message) and os.listdir(tmp_path) == []  # (after robosuite's)
