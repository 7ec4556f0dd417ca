"""Bad numbers in what the converter writes and in every checkpoint loaded (issue 27): K (`denoising_steps`) < 1,
non-finite or swapped (min > max) normalisation statistics, a bad converter flag, and a write that fails.

The converter (`python -m loaders.convert`, run in-process through `loaders.convert.main`) refuses each in one line
naming the user's file (never a temp file) with exit code 2 and writes nothing; `common.runs.load_checkpoint` refuses
a checkpoint with the same numbers (the one check, `runs.check_policy_numbers`), so `--eval-only` of a 0-step
checkpoint is refused instead of reporting the returns of pure noise.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_finetune as ft
from common import runs
from common.errors import DatasetError
from common.normalizer import Normalizer
from common.tasks import get_task
from loaders import convert
from tests.test_convert import state_dict, write_reference

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "checkpoints" / "avoid-m2_diffusion.pt"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No download: the paper's files fail at once (DPPO_OFFLINE), into tmp_path."""
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))


def run_converter(capsys, tmp_path: Path, *flags: str, output: Path | None = None) -> tuple[int, str]:
    """The converter on the reference square MLP checkpoint (its normalization.npz beside it); (exit code, stderr)."""
    path = write_reference(tmp_path, "square_mlp")
    out = output or tmp_path / "square.pt"
    capsys.readouterr()
    try:
        code = convert.main([str(path), "--env-id", "square", "--output", str(out), *flags])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *names: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert ".tmp" not in err and all(n in err for n in names), err


def statistics_file(tmp_path: Path, change) -> Path:
    """The square case's normalization.npz with `change(stats)` applied, as another file."""
    stats = {k: v.copy() for k, v in np.load(write_reference(tmp_path, "square_mlp").parent / "normalization.npz").items()}
    change(stats)
    np.savez(tmp_path / "stats.npz", **stats)
    return tmp_path / "stats.npz"


def saved_variant(tmp_path: Path, change) -> str:
    """The built-in Avoid checkpoint with `change(ckpt)` applied, saved as another file."""
    ckpt = torch.load(BUILTIN, map_location="cpu", weights_only=True)
    change(ckpt)
    path = str(tmp_path / "variant.pt")
    runs.save_checkpoint(path, ckpt)
    return path


# ---- the converter ----

@pytest.mark.parametrize("value,why", [("0", "must be positive"), ("-3", "must be positive"),
                                       ("inf", "invalid int value: 'inf'"), ("nan", "invalid int value: 'nan'")])
def test_converter_refuses_denoising_steps_below_one_in_one_line(capsys, tmp_path, value, why):
    code, err = run_converter(capsys, tmp_path, "--denoising-steps", value)
    assert_refused(code, err, "--denoising-steps", why)
    assert not (tmp_path / "square.pt").exists()


def test_convert_itself_refuses_zero_denoising_steps(tmp_path):
    """`convert` called directly (as the run plumbing does in memory) checks what it returns."""
    sd = state_dict("hopper_mlp", "ema")
    with pytest.raises(DatasetError, match=r"converted from 'x.pt' has denoising_steps 0; .* at least 1"):
        convert.convert({"model": sd, "ema": sd}, "x.pt", get_task("hopper"),
                        Normalizer(np.zeros(11), np.ones(11), -np.ones(3), np.ones(3)), dict(denoising_steps=0),
                        log=lambda *_: None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_converter_refuses_non_finite_statistics_naming_the_file_and_key(capsys, tmp_path, bad):
    def change(stats):
        stats["obs_max"][3] = bad
    stats = statistics_file(tmp_path, change)
    code, err = run_converter(capsys, tmp_path, "--normalization", str(stats))
    assert_refused(code, err, str(stats), "obs_max", "dimension 3", "must be finite")
    assert not (tmp_path / "square.pt").exists()


def test_converter_refuses_swapped_min_max_and_takes_a_constant_dimension(capsys, tmp_path):
    def swap(stats):
        stats["action_min"], stats["action_max"] = stats["action_max"].copy(), stats["action_min"].copy()
    stats = statistics_file(tmp_path, swap)
    code, err = run_converter(capsys, tmp_path, "--normalization", str(stats))
    assert_refused(code, err, str(stats), "action_min > action_max in dimension 0", "swapped")
    assert not (tmp_path / "square.pt").exists()

    def constant(stats):  # min == max: the normaliser maps it to -1 and back (common/normalizer.py)
        stats["obs_max"][5] = stats["obs_min"][5]
    stats = statistics_file(tmp_path, constant)
    code, err = run_converter(capsys, tmp_path, "--normalization", str(stats))
    assert code == 0, err
    ckpt = runs.load_checkpoint(str(tmp_path / "square.pt"), "diffusion", "", get_task("square"))
    norm = Normalizer.from_state_dict(ckpt["normalization"])
    x = norm.obs_min[None].clone()
    assert norm.normalize_obs(x)[0, 5] == -1 and norm.unnormalize_obs(norm.normalize_obs(x))[0, 5] == x[0, 5]


def test_converter_makes_the_output_folder_and_names_the_output_when_writing_fails(capsys, tmp_path, monkeypatch):
    """`--output` in a folder that does not exist yet is written there, as every script's `--output`
    (`runs.check_output_path`: a folder that can be made); a write that fails names the path given, not the temp file
    `save_checkpoint` writes first, and leaves nothing."""
    out = tmp_path / "new" / "deeper" / "square.pt"
    code, err = run_converter(capsys, tmp_path, output=out)
    assert code == 0 and out.is_file(), err

    def full_disk(obj, f, *a, **kw):  # the disk fills while the converted checkpoint is written
        if hasattr(f, "write"):  # save_checkpoint writes its temp file through a file object
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        save(obj, f, *a, **kw)
    save = torch.save
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "other" / "square.pt"
    code, err = run_converter(capsys, tmp_path, output=out)
    assert_refused(code, err, f"cannot save the checkpoint {out} (No space left on device); nothing was written")
    assert os.listdir(out.parent) == []


# ---- every checkpoint load ----

@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_load_checkpoint_refuses_fewer_than_one_denoising_step(tmp_path, steps):
    path = saved_variant(tmp_path, lambda c: c.update(denoising_steps=steps))
    with pytest.raises(DatasetError, match=f"checkpoint '{path}' has denoising_steps {steps!r}; .* at least 1") as e:
        runs.load_checkpoint(path, "diffusion", "", get_task("avoid-m2"))
    assert "\n" not in str(e.value)


def test_load_checkpoint_refuses_swapped_or_unusable_statistics(tmp_path):
    def swap(c):
        n = c["normalization"]
        n["obs_min"], n["obs_max"] = n["obs_max"], n["obs_min"]
    path = saved_variant(tmp_path, swap)
    with pytest.raises(DatasetError, match=f"checkpoint '{path}': normalisation statistic obs_min > obs_max in dimension 0"):
        runs.load_checkpoint(path, None, "")
    path = saved_variant(tmp_path, lambda c: c["normalization"].update(action_max=torch.ones(3)))
    with pytest.raises(DatasetError, match="action_min and action_max have 2 and 3 values"):
        runs.load_checkpoint(path, None, "")
    path = saved_variant(tmp_path, lambda c: c["normalization"].pop("action_max"))
    with pytest.raises(DatasetError, match="have no action_min and action_max arrays"):
        runs.load_checkpoint(path, None, "")
    # non-finite statistics: refused by the tensor check before (named), and by check_policy_numbers on its own
    with pytest.raises(DatasetError, match=r"'here': normalisation statistic obs_min is inf in dimension 1"):
        runs.check_policy_numbers({"normalization": {"obs_min": [0.0, float("inf")], "obs_max": [1.0, 1.0]}}, "'here'")
    shutil.copy(BUILTIN, tmp_path / "fine.pt")  # the built-in checkpoint itself passes
    assert runs.load_checkpoint(str(tmp_path / "fine.pt"), "diffusion", "")["denoising_steps"] == 20


def test_eval_only_of_a_zero_step_checkpoint_is_refused(tmp_path):
    path = saved_variant(tmp_path, lambda c: c.update(denoising_steps=0))
    with pytest.raises(DatasetError, match="has denoising_steps 0"):
        ft.main(ft.Args(env_id="avoid-m2", checkpoint=path, eval_only=True, num_envs=2, seed=0))
