"""Resume never rewrites history, and a checkpoint save that fails or was killed (issue 27): a budget below what the run
has done (or equal to it, with nothing left) is refused in one line before anything in the run folder is written;
a resumed run only adds to `eval.csv` (what it redoes moves to `eval_superseded.csv`), never rewrites `args.json`
(`resumes.jsonl` records each resume), and removes the temp files a killed save left; a save that fails (a full disk)
ends in one line naming the checkpoint, never the temp file, and the previous checkpoint is intact."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
import tyro

import dppo_finetune as ft
import dppo_pretrain as pt
from common import runs
from common.errors import DatasetError

PT = dict(env_id="avoid-m2", eval_every=0, seed=0, mlp_dims=(64, 64, 64), batch_size=128)
FT = dict(env_id="avoid-m2", num_envs=2, n_steps=5, val_freq=1, n_critic_warmup_itr=0, plot=False, seed=0)
STALE = "checkpoint.pt.k3j_x9a1.tmp"  # what a save killed mid-write leaves (save_checkpoint's mkstemp pattern)
NOT_STALE = ("checkpoint.pt.tmp", "notes.tmp", "other.pt.abcd1234.tmp", "checkpoint.pt.abcd1234.tmp.bak")


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A 2-epoch pre-training run (tiny network) that wrote an --output release file too."""
    root = tmp_path_factory.mktemp("resume")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return pt.main(pt.Args(**PT, n_epochs=2, exp_name="pre", output=str(root / "release.pt")))
    finally:
        os.chdir(cwd)


def _finetune(pre: dict, tmp_path, monkeypatch, n: int, **kw) -> dict:
    monkeypatch.chdir(tmp_path)
    return ft.main(ft.Args(checkpoint=pre["checkpoint"], n_train_itr=n, exp_name="ft", **{**FT, **kw}))


def _digest(folder: str) -> dict[str, str]:
    """Every file under `folder` (TensorBoard events included) by its bytes."""
    out = {}
    for path, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(path, name), "rb") as f:
                out[os.path.relpath(os.path.join(path, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _cli(module, args, monkeypatch, capsys) -> str:
    """`runs.cli` with tyro handing over `args`: exit code 2 and one `error:` line, the last on stderr (after the
    progress bar of a run that failed midway), returned."""
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(module.main, module.Args)
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and [line for line in err if "error" in line] == err[-1:], err
    assert err[-1].startswith("error: "), err
    return err[-1]


def _rows(run_dir: str, name: str = "eval.csv") -> list[dict]:
    with open(os.path.join(run_dir, name)) as f:
        return list(csv.DictReader(f))


# ---- the budget of a resume ----

def test_finetune_resume_below_or_at_the_budget_done_is_refused_with_the_folder_unchanged(pre, tmp_path, monkeypatch,
                                                                                          capsys):
    run = _finetune(pre, tmp_path, monkeypatch, 3)["run_dir"]
    open(os.path.join(run, STALE), "wb").close()  # even the clean-up of a killed save waits for the budget check
    before = _digest(run)
    err = _cli(ft, ft.Args(resume=run, n_train_itr=2), monkeypatch, capsys)
    assert re.search(r"--n-train-itr 2: the run .* has already done 3 iterations, and a resume never rewrites them "
                     r"\(nothing was changed\): give --n-train-itr above 3 to train further, or start a new run", err), err
    assert _digest(run) == before
    err = _cli(ft, ft.Args(resume=run, n_train_itr=3), monkeypatch, capsys)
    assert "has already done 3 iterations; nothing is left to do (nothing was changed)" in err, err
    assert _digest(run) == before
    assert ".tmp" not in err


def test_pretrain_resume_below_or_at_the_epochs_done_is_refused_with_the_folder_unchanged(pre, monkeypatch, capsys):
    before = _digest(pre["run_dir"])
    err = _cli(pt, pt.Args(resume=pre["run_dir"], n_epochs=1), monkeypatch, capsys)
    assert re.search("--n-epochs 1: the run .* has already done 2 epochs, and a resume never rewrites them", err), err
    err = _cli(pt, pt.Args(resume=pre["run_dir"], n_epochs=2), monkeypatch, capsys)
    assert "has already done 2 epochs; nothing is left to do" in err, err
    assert _digest(pre["run_dir"]) == before


def test_pretrain_resume_at_the_epochs_done_writes_a_missing_output_and_nothing_else(pre, tmp_path, monkeypatch, capsys):
    """Killed after its last checkpoint but before its --output: resuming with the same budget writes only that."""
    run = shutil.copytree(pre["run_dir"], tmp_path / "run")
    output = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["args"]["output"]
    os.remove(output)
    kept = [open(os.path.join(run, f), "rb").read() for f in ("eval.csv", "args.json", "checkpoint.pt")]
    out = pt.main(pt.Args(resume=str(run)))
    assert "only --output" in capsys.readouterr().out and out["losses"] == []
    assert os.path.isfile(output) and torch.load(output, weights_only=True)["ema"].keys()
    assert [open(os.path.join(run, f), "rb").read() for f in ("eval.csv", "args.json", "checkpoint.pt")] == kept


def test_finetune_run_killed_in_its_final_evaluation_completes_it_by_appending(pre, tmp_path, monkeypatch, capsys):
    """The checkpoint is at the budget but eval.csv lacks the final row: a resume with the run's own budget only adds
    that row (nothing is trained, no earlier row changes)."""
    run = _finetune(pre, tmp_path, monkeypatch, 2)["run_dir"]
    path = os.path.join(run, "eval.csv")
    lines = open(path).read().splitlines(keepends=True)
    assert lines[-1].startswith("2,")  # the final evaluation's row
    open(path, "w").write("".join(lines[:-1]))
    out = ft.main(ft.Args(resume=run))
    assert "only its final evaluation is left" in capsys.readouterr().out
    assert out["history"] == [] and open(path).read().startswith("".join(lines[:-1]))
    assert [int(r["iteration"]) for r in _rows(run)] == [0, 1, 2]


# ---- what a resume writes ----

def test_resume_appends_to_eval_csv_keeps_args_json_and_removes_only_a_killed_saves_temp(pre, tmp_path, monkeypatch,
                                                                                          capsys):
    run = _finetune(pre, tmp_path, monkeypatch, 2)["run_dir"]
    eval_text, args_json = open(os.path.join(run, "eval.csv")).read(), open(os.path.join(run, "args.json"), "rb").read()
    old_final = _rows(run)[-1]
    assert old_final["iteration"] == "2"
    for name in (STALE, *NOT_STALE):
        open(os.path.join(run, name), "wb").close()
    capsys.readouterr()
    out = ft.main(ft.Args(resume=run, n_train_itr=3))
    printed = capsys.readouterr().out
    assert f"resume: removed {STALE} (left by a checkpoint save that was killed)" in printed
    assert not os.path.exists(os.path.join(run, STALE)) and all(os.path.exists(os.path.join(run, n)) for n in NOT_STALE)
    # eval.csv: the rows before the checkpoint's iteration as they were, then the resumed run's; the final row of the
    # 2-iteration budget (iteration 2, redone as a training row) kept in eval_superseded.csv
    assert open(os.path.join(run, "eval.csv")).read().startswith("".join(eval_text.splitlines(keepends=True)[:-1]))
    assert [int(r["iteration"]) for r in _rows(run)] == [0, 1, 2, 3]
    assert _rows(run, "eval_superseded.csv") == [old_final]
    assert "resume: eval.csv rows of iterations >= 2 (redone now) moved to eval_superseded.csv" in printed
    # args.json: as the run started; the resume's changes appended to resumes.jsonl
    assert open(os.path.join(run, "args.json"), "rb").read() == args_json
    (line,) = open(os.path.join(run, "resumes.jsonl")).read().splitlines()
    assert json.loads(line)["changed"] == {"n_train_itr": 3, "resume": run}
    assert torch.load(out["checkpoint"], weights_only=True)["itr"] == 3


def test_resume_of_a_run_with_an_unreadable_eval_csv_is_refused_with_the_folder_unchanged(pre, tmp_path, monkeypatch,
                                                                                          capsys):
    run = _finetune(pre, tmp_path, monkeypatch, 1)["run_dir"]
    open(os.path.join(run, "eval.csv"), "w").write("iteration,env_steps\nabc,1\n")
    before = _digest(run)
    err = _cli(ft, ft.Args(resume=run, n_train_itr=2), monkeypatch, capsys)
    assert err.endswith("eval.csv is not a run's eval.csv (ValueError); move it aside to resume"), err
    assert _digest(run) == before
    with pytest.raises(DatasetError):
        runs.read_eval_rows(os.path.join(run, "eval.csv"))


def test_resume_of_a_run_killed_while_writing_an_eval_row_drops_the_cut_row(pre, tmp_path, monkeypatch, capsys):
    """A write killed mid-row leaves a last line without its newline, whose numbers may be cut too (an iteration 12
    cut to 1): it is never read as a row, and the resumed run's rows do not glue onto it."""
    run = _finetune(pre, tmp_path, monkeypatch, 2)["run_dir"]
    lines = open(os.path.join(run, "eval.csv")).read().splitlines(keepends=True)
    assert lines[-1].startswith("2,")
    with open(os.path.join(run, "eval.csv"), "w", newline="") as f:
        f.write("".join(lines[:-1]) + lines[-1][:6])  # the final row cut inside its numbers
    assert len(runs.read_eval_rows(os.path.join(run, "eval.csv"))) == len(lines) - 2  # header and cut row left out
    capsys.readouterr()
    ft.main(ft.Args(resume=run, n_train_itr=3))
    assert "resume: eval.csv ended inside a row" in capsys.readouterr().out
    text = open(os.path.join(run, "eval.csv")).read()
    assert text.startswith("".join(lines[:-1])) and lines[-1][:6] + "3" not in text
    assert [int(r["iteration"]) for r in _rows(run)] == [0, 1, 2, 3]
    assert all(None not in r.values() for r in _rows(run))


def test_an_eval_csv_with_a_short_row_before_the_last_is_refused(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("iteration,env_steps,mode,return_mean,return_std,success_rate,n_episodes\n1,5\n"
                    "2,10,deterministic,1.0,0.0,0.5,4\n")
    with pytest.raises(DatasetError, match="is not a run's eval.csv"):
        runs.read_eval_rows(str(path))
    path.write_text("iteration,env_steps,mode,return_mean,return_std,success_rate,n_episodes\n"
                    "1,5,deterministic,1.0,0.0,0.5,4\n12,10,determ")  # a cut last row: left out
    assert [r["iteration"] for r in runs.read_eval_rows(str(path))] == ["1"]


def test_resume_of_a_run_whose_args_json_is_a_folder_is_refused_with_the_folder_unchanged(pre, tmp_path, monkeypatch,
                                                                                         capsys):
    """A resumed run that redoes an iteration rewrites eval.csv: the args.json check comes before it."""
    run = _finetune(pre, tmp_path, monkeypatch, 2)["run_dir"]
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    ckpt["itr"] = 1  # as if killed after the first iteration's save: the resume redoes iteration 1's rows
    runs.save_checkpoint(os.path.join(run, "checkpoint.pt"), ckpt)
    os.remove(os.path.join(run, "args.json"))
    os.makedirs(os.path.join(run, "args.json"))
    before = _digest(run)
    err = _cli(ft, ft.Args(resume=run, n_train_itr=3), monkeypatch, capsys)
    assert err.endswith("its args.json is not a file; move it aside to resume"), err
    assert _digest(run) == before


# ---- a save that fails ----

def _full_disk_save(obj, f, *a, **kw):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_save_names_the_checkpoint_keeps_the_previous_and_removes_its_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    runs.save_checkpoint(path, {"w": torch.ones(3)})
    previous = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", _full_disk_save)
    with pytest.raises(OSError) as e:
        runs.save_checkpoint(path, {"w": torch.zeros(3)})
    assert str(e.value) == (f"cannot save the checkpoint {path} (No space left on device); the previous checkpoint "
                            "there is intact: free disk space or make the folder writable, then run again")
    assert e.value.errno == errno.ENOSPC and open(path, "rb").read() == previous and os.listdir(tmp_path) == ["checkpoint.pt"]
    with pytest.raises(OSError, match=r"^cannot save the checkpoint .*new\.pt \(No space left on device\); nothing was "):
        runs.save_checkpoint(str(tmp_path / "new.pt"), {"w": torch.zeros(3)})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    monkeypatch.undo()
    with pytest.raises(OSError) as e:  # a missing folder: the path the user gave, not the temp file mkstemp tried
        runs.save_checkpoint(str(tmp_path / "missing" / "out.pt"), {"w": torch.zeros(3)})
    assert str(e.value).startswith(f"cannot save the checkpoint {tmp_path / 'missing' / 'out.pt'} (No such file or "
                                   "directory); nothing was written") and ".tmp" not in str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_full_disk_is_an_oserror_not_torchs_runtimeerror(tmp_path, monkeypatch):
    """torch's own file writer fails a full disk with a RuntimeError of its internals; save_checkpoint writes through
    a Python file, whose write raises ENOSPC (here /dev/full stands in for the temp file)."""
    real_fdopen = os.fdopen

    def full(fd, mode="r", *a, **kw):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *a, **kw)
    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(OSError) as e:
        runs.save_checkpoint(str(tmp_path / "checkpoint.pt"), {"w": torch.zeros(100_000)})
    assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value) and os.listdir(tmp_path) == []


def test_a_full_disk_during_finetuning_ends_in_one_line_naming_the_runs_checkpoint(pre, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_save, saves = torch.save, []

    def second_save_fails(obj, f, *a, **kw):
        saves.append(obj["itr"])
        return _full_disk_save(obj, f) if len(saves) == 2 else real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", second_save_fails)
    err = _cli(ft, ft.Args(checkpoint=pre["checkpoint"], n_train_itr=2, save_every=1, exp_name="full", **FT),
               monkeypatch, capsys)
    (run,) = os.listdir(tmp_path / "runs")
    path = os.path.join("runs", run, "checkpoint.pt")
    assert err == (f"error: cannot save the checkpoint {path} (No space left on device); the previous checkpoint there "
                   "is intact: free disk space or make the folder writable, then run again")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["itr"] == 1 and saves == [1, 2]
    assert not [f for f in os.listdir(tmp_path / "runs" / run) if f.endswith(".tmp")]
    out = ft.main(ft.Args(resume=os.path.join("runs", run)))  # and it resumes from that checkpoint
    assert [x["iteration"] for x in out["history"]] == [1] and torch.load(path, weights_only=True)["itr"] == 2
