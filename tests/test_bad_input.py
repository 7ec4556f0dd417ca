"""Bad input to every script (dppo_pretrain.py, dppo_finetune.py, gaussian_ppo.py, gmm_ppo.py, the
diffusion RL baselines drwr.py, dawr.py, exact_likelihood_pg.py, dipo.py, idql.py, dql.py, qsm.py, and
scripts/collect_dataset.py): numbers out of range, wrong types, unknown choices and flags, flags of
another mode, bad or foreign checkpoints and run folders, output paths that cannot be written.

Each case must end in exit code 2 with one line `error: ...` on stderr, and leave every file as it was:
no new run folder, no output file, no `*.tmp`. Most cases run in-process through `common.runs.cli`
(with the parsed arguments given directly); a representative subset runs through the real command
line in subprocesses, started together. Bad datasets are covered by tests/test_bad_input_data.py.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
import torch
import tyro

import dawr
import dipo
import dppo_finetune as ft
import dppo_pretrain as pt
import dql
import drwr
import exact_likelihood_pg as exact
import gaussian_ppo as gauss
import gmm_ppo as gmm
import idql
import qsm
from common import runs
from common.errors import DatasetError, TaskError, UsageError
from common.runs import load_checkpoint, load_resume
from scripts import collect_dataset as collect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = math.nan
PT = dict(env_id="avoid-m2", n_epochs=1, eval_every=0, seed=0, mlp_dims=(64, 64, 64), batch_size=128)
BC = dict(pretrain=True, env_id="avoid-m2", n_epochs=1, eval_every=0, seed=0, mlp_dims=(64, 64, 64), pretrain_batch_size=128)
# a budget past every default critic warm-up (at most 5 iterations), so that each case meets the refusal it is about
FT = dict(env_id="avoid-m2", n_train_itr=6, num_envs=2, n_steps=5, val_freq=0, plot=False, seed=0)
BL = dict(FT, batch_size=10)  # the baselines: a minibatch that one iteration of 2 envs x 5 chunk-steps fills
SCRIPTS = {"pt": (pt, pt.main, "dppo_pretrain.py"), "ft": (ft, ft.main, "dppo_finetune.py"),
           "gauss": (gauss, gauss.main, "gaussian_ppo.py"), "gmm": (gmm, gmm.main, "gmm_ppo.py"),
           "collect": (collect, collect.collect, "scripts/collect_dataset.py"),
           **{name: (m, m.main, f"{m.__name__}.py") for name, m in (("drwr", drwr), ("dawr", dawr), ("exact", exact),
                                                                   ("dipo", dipo), ("idql", idql), ("dql", dql),
                                                                   ("qsm", qsm))}}
BASELINES = ("drwr", "dawr", "exact", "dipo", "idql", "dql", "qsm")


class Ordered(collections.OrderedDict):
    """A class outside torch's allow-list: a file holding one is a pickle payload that `weights_only=True` refuses."""


@dataclasses.dataclass
class World:
    """What the cases point at (absolute paths), made once per module."""
    root: str
    pre: str  # diffusion pre-training checkpoint (1 epoch) and its run folder
    pre_run: str
    gauss: str
    gauss_run: str
    gmm: str
    gmm_run: str
    ft_run: str  # a dppo_finetune.py run folder (1 iteration)
    files: str  # folder of broken files

    def f(self, name: str) -> str:
        return os.path.join(self.files, name)


def _variant(src: str, dst: str, change: Callable[[dict], Any]) -> str:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def _narrow(ckpt: dict, where: str = "arch") -> None:
    ckpt[where]["mlp_dims"] = [32, 32, 32]  # the same header, another network: the weights no longer fit


def _copy_run(src: str, dst: str, change: Callable[[dict], Any]) -> str:
    shutil.copytree(src, dst)
    _variant(os.path.join(dst, "checkpoint.pt"), os.path.join(dst, "checkpoint.pt"), change)
    return dst


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> World:
    root = str(tmp_path_factory.mktemp("bad_input"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        d = pt.main(pt.Args(**PT, exp_name="pre"))
        g = gauss.main(gauss.Args(**BC, exp_name="gauss"))
        m = gmm.main(gmm.Args(**BC, exp_name="gmm"))
        f = ft.main(ft.Args(checkpoint=d["checkpoint"], exp_name="ft", **{**FT, "n_train_itr": 1, "n_critic_warmup_itr": 0}))
    finally:
        os.chdir(cwd)
    world = World(root, d["checkpoint"], d["run_dir"], g["checkpoint"], g["run_dir"], m["checkpoint"], m["run_dir"],
                  f["run_dir"], os.path.join(root, "files"))
    os.makedirs(world.files)
    open(world.f("empty.pt"), "wb").close()
    torch.save(Ordered(w=torch.zeros(2)), world.f("pickle.pt"))
    torch.save({"weights": torch.zeros(3)}, world.f("random.pt"))
    _variant(world.pre, world.f("no_ema.pt"), lambda c: c.pop("ema"))
    _variant(world.pre, world.f("no_normalization.pt"), lambda c: c.pop("normalization"))
    _variant(world.pre, world.f("other_arch.pt"), _narrow)
    _variant(world.gauss, world.f("gauss_other_arch.pt"), _narrow)
    _variant(world.gmm, world.f("gmm_other_arch.pt"), _narrow)
    _copy_run(world.pre_run, world.f("pre_other_arch_run"), lambda c: _narrow(c, "args"))  # resume builds from args
    _copy_run(world.ft_run, world.f("ft_other_arch_run"), _narrow)
    os.makedirs(world.f("empty_run"))
    return world


def _snapshot(*folders: str) -> dict:
    """Every folder and file under `folders`, files with mtime, size and a hash of their bytes."""
    out = {}
    for folder in folders:
        for path, _, files in os.walk(folder):
            out[path] = "folder"
            for name in files:
                p = os.path.join(path, name)
                with open(p, "rb") as fh:
                    out[p] = (os.stat(p).st_mtime_ns, os.stat(p).st_size, hashlib.sha1(fh.read()).hexdigest())
    return out


def _tmp_files(*folders: str) -> list[str]:
    return [p for folder in folders for p in glob.glob(os.path.join(folder, "**", "*.tmp"), recursive=True)]


# ---------------------------------------------------------------- the in-process table

@dataclasses.dataclass
class Case:
    id: str
    script: str
    args: Callable[[World], dict]
    error: type
    match: str
    runs_file: bool = False  # `runs` is a file in the working folder


C = Case
CASES = [
    # dppo_pretrain.py
    C("pt-n-epochs-0", "pt", lambda w: dict(n_epochs=0), UsageError, r"--n-epochs must be positive \(got 0\)"),
    C("pt-batch-size-negative", "pt", lambda w: dict(batch_size=-5), UsageError, "--batch-size must be positive"),
    C("pt-save-every-0", "pt", lambda w: dict(save_every=0), UsageError, "--save-every must be positive"),
    C("pt-torch-threads-0", "pt", lambda w: dict(torch_threads=0), UsageError, "--torch-threads must be positive"),
    C("pt-seed-negative", "pt", lambda w: dict(seed=-1), UsageError, r"--seed must be in \[0, 2147483647\]"),
    C("pt-ema-decay-nan", "pt", lambda w: dict(ema_decay=NAN), UsageError, r"--ema-decay must be in .*nan"),
    C("pt-output-is-a-folder", "pt", lambda w: dict(PT, output=w.files), UsageError, "is a folder"),
    C("pt-output-under-a-file", "pt", lambda w: dict(PT, output=os.path.join(w.f("empty.pt"), "p.pt")), UsageError,
      "cannot write under"),
    C("pt-resume-finetune-run", "pt", lambda w: dict(resume=w.ft_run), DatasetError,
      "not a pre-training run's checkpoint .*lacks.*optimizer.*resume it with dppo_finetune.py"),
    C("pt-resume-folder-without-checkpoint", "pt", lambda w: dict(resume=w.f("empty_run")), FileNotFoundError,
      "checkpoint.pt' not found"),
    C("pt-resume-missing-folder", "pt", lambda w: dict(resume=w.f("nope")), FileNotFoundError, "no such run folder"),
    C("pt-resume-gaussian-run", "pt", lambda w: dict(resume=w.gauss_run), DatasetError,
      "holds a gaussian policy.*use gaussian_ppo.py"),
    C("pt-resume-other-architecture", "pt", lambda w: dict(resume=w.f("pre_other_arch_run")), DatasetError,
      "pre_other_arch_run/checkpoint.pt' does not fit the network.*size mismatch"),
    C("pt-runs-is-a-file", "pt", lambda w: dict(PT), UsageError, "'runs' is a file", runs_file=True),
    # dppo_finetune.py
    *[C(f"ft-{flag.replace('_', '-')}-{value}", "ft", lambda w, flag=flag, value=value: dict(FT, checkpoint=w.pre,
                                                                                          **{flag: value}),
        UsageError, f"--{flag.replace('_', '-')} must be {'in' if flag in ('gamma', 'seed') else 'positive'}")
      for flag, value in (("num_envs", 0), ("n_steps", -1), ("batch_size", -5), ("update_epochs", -1), ("save_every", 0),
                          ("n_train_itr", 0), ("torch_threads", 0), ("seed", -1), ("gamma", NAN))],
    C("ft-act-steps-over-chunk", "ft", lambda w: dict(FT, checkpoint=w.pre, act_steps=5), UsageError,
      "--act-steps 5 exceeds the chunk T_a = 4"),
    C("ft-checkpoint-missing", "ft", lambda w: dict(FT, checkpoint=w.f("missing.pt")), FileNotFoundError,
      "missing.pt' not found"),
    C("ft-checkpoint-empty", "ft", lambda w: dict(FT, checkpoint=w.f("empty.pt")), DatasetError, "not a readable DPPO"),
    C("ft-checkpoint-pickle", "ft", lambda w: dict(FT, checkpoint=w.f("pickle.pt")), DatasetError,
      r"pickle.pt' is not a readable DPPO checkpoint \(UnpicklingError\)"),
    C("ft-checkpoint-not-dppo", "ft", lambda w: dict(FT, checkpoint=w.f("random.pt")), DatasetError,
      "not a DPPO checkpoint"),
    C("ft-checkpoint-no-ema", "ft", lambda w: dict(FT, checkpoint=w.f("no_ema.pt")), DatasetError, "lacks ema"),
    C("ft-checkpoint-no-normalization", "ft", lambda w: dict(FT, checkpoint=w.f("no_normalization.pt")), DatasetError,
      "lacks normalization"),
    C("ft-checkpoint-other-architecture", "ft", lambda w: dict(FT, checkpoint=w.f("other_arch.pt")), DatasetError,
      "other_arch.pt' does not fit the network its header describes .*size mismatch"),
    C("ft-checkpoint-other-task", "ft", lambda w: dict(FT, checkpoint=w.pre, env_id="avoid-m1"), DatasetError,
      "is for task 'avoid-m2'.*not 'avoid-m1'"),
    C("ft-checkpoint-gaussian", "ft", lambda w: dict(FT, checkpoint=w.gauss), DatasetError,
      "holds a gaussian policy, not a diffusion one; use gaussian_ppo.py"),
    C("ft-resume-missing-folder", "ft", lambda w: dict(resume=w.f("nope")), FileNotFoundError, "no such run folder"),
    C("ft-resume-pretrain-run", "ft", lambda w: dict(resume=w.pre_run), DatasetError,
      "not a fine-tuning checkpoint .*lacks itr"),
    C("ft-resume-other-architecture", "ft", lambda w: dict(resume=w.f("ft_other_arch_run")), DatasetError,
      "ft_other_arch_run/checkpoint.pt' does not fit"),
    C("ft-runs-is-a-file", "ft", lambda w: dict(FT, checkpoint=w.pre), UsageError, "'runs' is a file", runs_file=True),
    # gaussian_ppo.py
    C("gauss-pre-n-epochs-0", "gauss", lambda w: dict(BC, n_epochs=0), UsageError, "--n-epochs must be positive"),
    C("gauss-pre-batch-size-0", "gauss", lambda w: dict(BC, pretrain_batch_size=0), UsageError,
      "--pretrain-batch-size must be positive"),
    C("gauss-pre-seed-negative", "gauss", lambda w: dict(BC, seed=-1), UsageError, "--seed must be in"),
    C("gauss-pre-finetune-flag", "gauss", lambda w: dict(BC, num_envs=4), UsageError,
      "--num-envs is a fine-tuning flag; --pretrain does not use it"),
    C("gauss-pre-output-is-a-folder", "gauss", lambda w: dict(BC, output=w.files), UsageError, "is a folder"),
    C("gauss-pre-output-under-a-file", "gauss", lambda w: dict(BC, output=os.path.join(w.f("empty.pt"), "p.pt")),
      UsageError, "cannot write under"),
    C("gauss-pre-runs-is-a-file", "gauss", lambda w: dict(BC), UsageError, "'runs' is a file", runs_file=True),
    C("gauss-num-envs-0", "gauss", lambda w: dict(FT, checkpoint=w.gauss, num_envs=0), UsageError,
      "--num-envs must be positive"),
    C("gauss-gamma-nan", "gauss", lambda w: dict(FT, checkpoint=w.gauss, gamma=NAN), UsageError, "--gamma must be in"),
    C("gauss-pretrain-flag", "gauss", lambda w: dict(FT, checkpoint=w.gauss, n_epochs=3), UsageError,
      "--n-epochs is a pre-training flag; use it with --pretrain"),
    C("gauss-arch-flag", "gauss", lambda w: dict(FT, checkpoint=w.gauss, backbone="transformer"), UsageError,
      "--backbone sets the architecture"),
    C("gauss-from-scratch-with-checkpoint", "gauss", lambda w: dict(FT, checkpoint=w.gauss, from_scratch=True), UsageError,
      "drop --checkpoint"),
    C("gauss-act-steps-over-chunk", "gauss", lambda w: dict(FT, checkpoint=w.gauss, act_steps=5), UsageError,
      "--act-steps 5 exceeds the checkpoint's chunk T_a = 4"),
    C("gauss-checkpoint-diffusion", "gauss", lambda w: dict(FT, checkpoint=w.pre), DatasetError,
      "holds a diffusion policy, not a gaussian one; use dppo_finetune.py"),
    C("gauss-checkpoint-empty", "gauss", lambda w: dict(FT, checkpoint=w.f("empty.pt")), DatasetError, "not a readable"),
    C("gauss-checkpoint-other-architecture", "gauss", lambda w: dict(FT, checkpoint=w.f("gauss_other_arch.pt")),
      DatasetError, "gauss_other_arch.pt' does not fit"),
    C("gauss-resume-pretrain-run", "gauss", lambda w: dict(resume=w.gauss_run), DatasetError,
      "not a fine-tuning checkpoint"),
    C("gauss-resume-missing-folder", "gauss", lambda w: dict(resume=w.f("nope")), FileNotFoundError, "no such run folder"),
    # gmm_ppo.py
    C("gmm-pre-n-modes-0", "gmm", lambda w: dict(BC, n_modes=0), UsageError, r"--n-modes must be positive \(got 0\)"),
    C("gmm-pre-output-is-a-folder", "gmm", lambda w: dict(BC, output=w.files), UsageError, "is a folder"),
    C("gmm-pre-finetune-flag", "gmm", lambda w: dict(BC, batch_size=5), UsageError, "--batch-size is a fine-tuning flag"),
    C("gmm-update-epochs-negative", "gmm", lambda w: dict(FT, checkpoint=w.gmm, update_epochs=-1), UsageError,
      "--update-epochs must be positive"),
    C("gmm-pretrain-flag", "gmm", lambda w: dict(FT, checkpoint=w.gmm, pretrain_batch_size=64), UsageError,
      "--pretrain-batch-size is a pre-training flag"),
    C("gmm-n-modes-in-finetuning", "gmm", lambda w: dict(FT, checkpoint=w.gmm, n_modes=3), UsageError,
      "--n-modes sets the architecture"),
    C("gmm-act-steps-over-chunk", "gmm", lambda w: dict(FT, checkpoint=w.gmm, act_steps=5), UsageError,
      "--act-steps 5 exceeds"),
    C("gmm-checkpoint-gaussian", "gmm", lambda w: dict(FT, checkpoint=w.gauss), DatasetError,
      "holds a gaussian policy, not a gmm one; use gaussian_ppo.py"),
    C("gmm-checkpoint-pickle", "gmm", lambda w: dict(FT, checkpoint=w.f("pickle.pt")), DatasetError, "not a readable"),
    C("gmm-checkpoint-other-architecture", "gmm", lambda w: dict(FT, checkpoint=w.f("gmm_other_arch.pt")), DatasetError,
      "gmm_other_arch.pt' does not fit"),
    C("gmm-resume-pretrain-run", "gmm", lambda w: dict(resume=w.gmm_run), DatasetError, "not a fine-tuning checkpoint"),
    # scripts/collect_dataset.py
    C("collect-out-is-a-folder", "collect", lambda w: dict(checkpoint=w.gauss, out=w.files), UsageError,
      "--out .* is a folder"),
    C("collect-out-under-a-file", "collect", lambda w: dict(checkpoint=w.gauss, out=os.path.join(w.f("empty.pt"), "t.npz")),
      UsageError, "--out .*cannot write under"),
    C("collect-num-envs-0", "collect", lambda w: dict(checkpoint=w.gauss, out="d/train.npz", num_envs=0), UsageError,
      "--num-envs must be positive"),
    C("collect-n-env-steps-negative", "collect", lambda w: dict(checkpoint=w.gauss, out="d/train.npz", n_env_steps=-1),
      UsageError, "--n-env-steps must be positive"),
    C("collect-seed-negative", "collect", lambda w: dict(checkpoint=w.gauss, out="d/train.npz", seed=-1), UsageError,
      "--seed must be in"),
    C("collect-act-steps-over-chunk", "collect", lambda w: dict(checkpoint=w.gmm, out="d/train.npz", act_steps=5),
      UsageError, "--act-steps 5 exceeds the checkpoint's chunk T_a = 4"),
    C("collect-checkpoint-missing", "collect", lambda w: dict(checkpoint=w.f("missing.pt"), out="d/train.npz"),
      FileNotFoundError, "not found"),
    C("collect-checkpoint-empty", "collect", lambda w: dict(checkpoint=w.f("empty.pt"), out="d/train.npz"), DatasetError,
      "not a readable"),
    C("collect-checkpoint-not-dppo", "collect", lambda w: dict(checkpoint=w.f("random.pt"), out="d/train.npz"),
      DatasetError, "not a DPPO checkpoint"),
    C("collect-checkpoint-diffusion", "collect", lambda w: dict(checkpoint=w.pre, out="d/train.npz"), DatasetError,
      "holds a diffusion policy; this script rolls gaussian or gmm ones"),
    C("collect-checkpoint-other-architecture", "collect",
      lambda w: dict(checkpoint=w.f("gauss_other_arch.pt"), out="d/train.npz"), DatasetError, "does not fit"),
    C("collect-checkpoint-other-task", "collect", lambda w: dict(checkpoint=w.gauss, out="d/train.npz", env_id="avoid-m1"),
      DatasetError, "not 'avoid-m1'"),
    # the diffusion RL baselines: the same refusals in every one of them
    *[c for b in BASELINES for c in (
        C(f"{b}-num-envs-0", b, lambda w: dict(BL, checkpoint=w.pre, num_envs=0), UsageError, "--num-envs must be positive"),
        C(f"{b}-seed-negative", b, lambda w: dict(BL, checkpoint=w.pre, seed=-1), UsageError, "--seed must be in"),
        C(f"{b}-gamma-nan", b, lambda w: dict(BL, checkpoint=w.pre, gamma=NAN), UsageError, "--gamma must be in"),
        C(f"{b}-furniture", b, lambda w: dict(BL, env_id="one-leg-low"), UsageError, "furniture"),
        C(f"{b}-unknown-task", b, lambda w: dict(BL, env_id="no-such-task"), TaskError, "no-such-task"),
        C(f"{b}-checkpoint-missing", b, lambda w: dict(BL, checkpoint=w.f("missing.pt")), FileNotFoundError,
          "missing.pt' not found"),
        C(f"{b}-checkpoint-pickle", b, lambda w: dict(BL, checkpoint=w.f("pickle.pt")), DatasetError,
          "not a readable DPPO checkpoint"),
        C(f"{b}-checkpoint-gaussian", b, lambda w: dict(BL, checkpoint=w.gauss), DatasetError,
          "holds a gaussian policy, not a diffusion one"),
        C(f"{b}-checkpoint-other-task", b, lambda w: dict(BL, checkpoint=w.pre, env_id="avoid-m1"), DatasetError,
          "not 'avoid-m1'"),
        C(f"{b}-checkpoint-other-architecture", b, lambda w: dict(BL, checkpoint=w.f("other_arch.pt")), DatasetError,
          "other_arch.pt' does not fit"),
        C(f"{b}-checkpoint-dppo-finetuned", b, lambda w: dict(BL, checkpoint=os.path.join(w.ft_run, "checkpoint.pt")),
          DatasetError, "is a DPPO fine-tuning checkpoint .*not one network"),
        C(f"{b}-resume-dppo-run", b, lambda w: dict(resume=w.ft_run), UsageError,
          f"is a run of dppo_finetune.py, not of {SCRIPTS[b][2]}; resume it with dppo_finetune.py"),
        C(f"{b}-resume-pretrain-run", b, lambda w: dict(resume=w.pre_run), DatasetError, "not a fine-tuning checkpoint"),
        C(f"{b}-resume-missing-folder", b, lambda w: dict(resume=w.f("nope")), FileNotFoundError, "no such run folder"),
        C(f"{b}-runs-is-a-file", b, lambda w: dict(BL, checkpoint=w.pre), UsageError, "'runs' is a file", runs_file=True),
    )],
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case: Case, w: World, tmp_path, monkeypatch, capsys):
    """Through `common.runs.cli` (tyro handing over the arguments): exit 2, one `error:` line, nothing written."""
    module, main, _ = SCRIPTS[case.script]
    monkeypatch.chdir(tmp_path)
    if case.runs_file:
        (tmp_path / "runs").write_text("not a folder")
    args = module.Args(**case.args(w))
    before = _snapshot(w.root, str(tmp_path))
    raised = []

    def spy(a):
        try:
            return main(a)
        except Exception as e:
            raised.append(e)
            raise
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(spy, module.Args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and isinstance(raised[0], case.error), (type(raised[0]), raised[0])
    assert err.splitlines() == [f"error: {raised[0]}"], err
    assert re.search(case.match, err), err
    assert _snapshot(w.root, str(tmp_path)) == before and not _tmp_files(w.root, str(tmp_path))


# ---------------------------------------------------------------- the command line, in subprocesses

CLI_CASES = {  # id: (script, argv, expected message, `runs` is a file)
    "pt-n-epochs-abc": ("pt", lambda w: ["--n-epochs", "abc"], "Error parsing --n-epochs", False),
    "pt-backbone-foo": ("pt", lambda w: ["--backbone", "foo"], "invalid choice 'foo' for argument '--backbone'", False),
    "pt-runs-is-a-file": ("pt", lambda w: ["--n-epochs", "1", "--eval-every", "0", "--mlp-dims", "64", "64", "64"],
                          "'runs' is a file", True),
    "ft-unknown-flag": ("ft", lambda w: ["--no-such-flag", "1"], "Unrecognized.*--no-such-flag", False),
    "ft-gamma-nan": ("ft", lambda w: ["--checkpoint", w.pre, "--gamma", "nan"], r"--gamma must be in \[0.0, 1.0\] \(got nan\)",
                     False),
    "ft-checkpoint-pickle": ("ft", lambda w: ["--checkpoint", w.f("pickle.pt")], "not a readable DPPO checkpoint", False),
    "ft-checkpoint-other-architecture": ("ft", lambda w: ["--checkpoint", w.f("other_arch.pt"), "--no-plot"],
                                         "does not fit the network its header describes", False),
    "gauss-pre-output-is-a-folder": ("gauss", lambda w: ["--pretrain", "--output", w.files], "is a folder", False),
    "gauss-from-scratch-with-checkpoint": ("gauss", lambda w: ["--from-scratch", "--checkpoint", w.gauss],
                                           "drop --checkpoint", False),
    "gmm-n-modes-0": ("gmm", lambda w: ["--pretrain", "--n-modes", "0"], "--n-modes must be positive", False),
    "collect-out-is-a-folder": ("collect", lambda w: ["--checkpoint", w.gauss, "--out", w.files], "is a folder", False),
}


@pytest.fixture(scope="module")
def cli_results(w: World, tmp_path_factory) -> dict:
    """Every CLI case (each ~2-3 s of interpreter start-up), two at a time, each in its own empty folder."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    folders, snapshots, procs, results = {}, {}, {}, {}
    before = _snapshot(w.root)

    def finish(case_id: str) -> None:
        p, folder = procs.pop(case_id), folders[case_id]
        _, err = p.communicate(timeout=180)
        results[case_id] = (p.returncode, err, _snapshot(folder) == snapshots[case_id] and not _tmp_files(folder))

    for case_id, (script, argv, _, runs_file) in CLI_CASES.items():
        if len(procs) == 2:
            finish(next(iter(procs)))
        folder = folders[case_id] = str(tmp_path_factory.mktemp(case_id))
        if runs_file:
            with open(os.path.join(folder, "runs"), "w") as fh:
                fh.write("not a folder")
        snapshots[case_id] = _snapshot(folder)
        procs[case_id] = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPTS[script][2]), *argv(w)], cwd=folder,
                                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for case_id in list(procs):
        finish(case_id)
    assert _snapshot(w.root) == before and not _tmp_files(w.root)
    return results


@pytest.mark.parametrize("case_id", list(CLI_CASES))
def test_bad_input_on_the_command_line(case_id: str, cli_results: dict):
    returncode, err, unchanged = cli_results[case_id]
    lines = err.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(CLI_CASES[case_id][2], err), err
    assert unchanged


# ---------------------------------------------------------------- a run killed while it saves

def test_killed_finetuning_leaves_a_loadable_checkpoint(w: World, tmp_path):
    """SIGKILL a fine-tuning run that saves every iteration: its checkpoint.pt still loads (the write is
    a temp file then a rename); at most an orphan `checkpoint.pt.*.tmp` from the killed writer remains."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "dppo_finetune.py"), "--checkpoint", w.pre, "--n-train-itr",
                          "100000", "--num-envs", "2", "--n-steps", "5", "--val-freq", "0", "--no-plot", "--save-every", "1"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more saves, then kill mid-run
        assert p.poll() is None, "the run ended before it was killed"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt = load_resume(run_dir, "diffusion", "hint")  # every key a resumed run reads
    assert ckpt["itr"] >= 1 and load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), "diffusion", "hint")
    leftovers = _tmp_files(str(tmp_path))
    assert len(leftovers) <= 1 and all(re.fullmatch(r"checkpoint\.pt\..+\.tmp", os.path.basename(t)) for t in leftovers)


@pytest.mark.parametrize("module", ["dppo_pretrain", "dppo_finetune", "dppo_critic_ablation", "gaussian_ppo", "gmm_ppo",
                                    "drwr", "dawr", "exact_likelihood_pg", "dipo", "dql", "idql", "qsm"])
def test_state_scripts_refuse_pixel_tasks_in_one_line(module):
    """A pixel task (camera observations) given to a script of state observations names the pixel scripts."""
    import importlib

    from common.errors import TaskError

    mod = importlib.import_module(module)
    for extra in ({}, {"pretrain": True}) if module in ("gaussian_ppo", "gmm_ppo") else ({},):
        with pytest.raises(TaskError) as e:
            mod.fill_defaults(mod.Args(env_id="lift-img", **extra))
        assert "\n" not in str(e.value) and "dppo_finetune_pixel.py" in str(e.value)
