"""`--onednn-matmul auto|on|off` (`common.runs.apply_matmul_flags`): oneDNN's float32 matmuls taken by default only
where a start-up check on the run's own layer shapes finds them float32. The check's measurements
(`runs.measure_onednn`) are replaced here by fixed values, so no test depends on the CPU that runs it."""

import json
import os

import numpy as np
import pytest
import torch

import dppo_finetune as ft
from common import pretraining, runs
from common.errors import UsageError

CPU = torch.device("cpu")
FT = dict(env_id="avoid-m2", n_train_itr=1, n_critic_warmup_itr=0, num_envs=2, n_steps=5, val_freq=0, plot=False, seed=0)


@pytest.fixture
def restore_matmul_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def measured(monkeypatch, err: float, t_default: float = 1.0, t_onednn: float = 0.5) -> list:
    """`runs.measure_onednn` answering (err, times) as if measured; returns the calls (shapes, timed) it got."""
    calls = []

    def fake(shapes, timed):
        calls.append((shapes, timed))
        return err, *((t_default, t_onednn) if timed else (float("nan"), float("nan")))
    monkeypatch.setattr(runs, "measure_onednn", fake)
    return calls


def test_auto_takes_onednn_where_it_stays_float32(monkeypatch, capsys, restore_matmul_precision):
    """Whatever its speed (a timing would make the choice differ between two runs on one machine): not timed."""
    calls = measured(monkeypatch, 1.2e-6, 1.0, 2.0)
    assert runs.apply_matmul_flags("highest", "auto", CPU, ((40, 512, 512),)) == "on"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # torch's switch that routes float32 to oneDNN
    assert calls == [(((40, 512, 512),), False)]
    line = capsys.readouterr().out.strip()
    assert line == ("--onednn-matmul auto: on (oneDNN kernels; float32 kept: relative deviation 1.2e-06 <= 1e-05 on the "
                    "run's layers)")


@pytest.mark.parametrize("err, why", [(3.1e-3, "oneDNN would not compute in float32 on this CPU: relative deviation "
                                                "3.1e-03 > 1e-05"),
                                      (float("nan"), "would not compute in float32")])
def test_auto_keeps_the_default_kernels_otherwise(err, why, monkeypatch, capsys, restore_matmul_precision):
    """Not float32 (bf16 inputs on AMX CPUs; a NaN deviation counts as not float32): off, the default kernels
    untouched, and the line says why."""
    measured(monkeypatch, err)
    assert runs.apply_matmul_flags("highest", "auto", CPU) == "off"
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    line = capsys.readouterr().out.strip()
    assert line.startswith("--onednn-matmul auto: off (default kernels; ") and why in line


def test_on_uses_onednn_if_float32_whatever_its_speed_and_else_refuses(monkeypatch, capsys, restore_matmul_precision):
    calls = measured(monkeypatch, 1.2e-6, 1.0, 2.0)
    assert runs.apply_matmul_flags("highest", True, CPU) == "on"  # True: a run saved before auto, as `on`
    assert calls[0][1] is False and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert "--onednn-matmul on: on (oneDNN kernels; float32 kept" in capsys.readouterr().out
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    measured(monkeypatch, 3.1e-3)
    with pytest.raises(UsageError, match=r"^--onednn-matmul on: oneDNN would not compute in float32 on this CPU "
                                         r"\(relative deviation 3.1e-03 .*\); use --onednn-matmul off$"):
        runs.apply_matmul_flags("highest", "on", CPU)
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    with pytest.raises(UsageError, match="for CPU runs and this one runs on meta"):
        runs.apply_matmul_flags("highest", "on", torch.device("meta"))
    with pytest.raises(UsageError, match="does not combine with --float32-matmul-precision medium"):
        runs.apply_matmul_flags("medium", "on", CPU)


def test_off_and_the_cases_auto_does_not_measure(monkeypatch, capsys, restore_matmul_precision):
    calls = measured(monkeypatch, 1e-7)
    assert runs.apply_matmul_flags("highest", "off", CPU) == "off"
    assert runs.apply_matmul_flags("highest", False, CPU) == "off"
    assert runs.apply_matmul_flags("highest", "auto", torch.device("meta")) == "off"
    assert runs.apply_matmul_flags("medium", "auto", CPU) == "off"  # the precision flag sets the CPU kernels
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # ... as `medium` asked
    assert calls == []
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--onednn-matmul off: off (default kernels; as asked)"
    assert "the device is meta, not a CPU" in out[2] and "--float32-matmul-precision medium" in out[3]
    with pytest.raises(UsageError, match="takes auto, on or off"):
        runs.apply_matmul_flags("highest", "yes", CPU)


def test_the_check_draws_no_random_numbers_and_restores_the_kernels(restore_matmul_precision):
    """The real measurement, whatever this CPU answers: the global RNG and torch's kernel setting are as before (a run
    where auto decides off computes what it computed before auto), the deviation is a number, the times positive."""
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    err, t_default, t_onednn = runs.measure_onednn(((3, 8, 16), (2000, 16, 8)), timed=True)
    assert torch.equal(torch.get_rng_state(), rng) and torch.backends.mkldnn.matmul.fp32_precision == "none"
    assert err >= 0 and t_default > 0 and t_onednn > 0
    assert np.isnan(runs.measure_onednn(((3, 8, 16),), timed=False)[1])


def test_the_run_layer_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    assert runs.linear_shapes((40, 500, 40), net, torch.nn.Linear(3, 8)) == (
        (40, 3, 8), (40, 8, 8), (500, 3, 8), (500, 8, 8))
    assert pretraining.mlp_shapes(128, (64, 64, 32)) == ((128, 64, 64), (128, 64, 32))
    assert pretraining.mlp_shapes(128, (64,)) == ((128, 64, 64),)
    assert pretraining.mlp_shapes(128, None) == runs.ONEDNN_SHAPES


def test_the_decision_is_recorded_and_off_changes_no_number(tmp_path, monkeypatch, restore_matmul_precision):
    """dppo_finetune.py by default: the check gets the run's own layers (actor 512 wide, critic 256) at its sampling
    and minibatch rows (2 envs, Avoid's batch 50), and
    args.json records what was used; where auto decides off the run computes exactly what `off` computes."""
    monkeypatch.chdir(tmp_path)
    calls = measured(monkeypatch, 3.1e-3)
    auto = ft.main(ft.Args(exp_name="auto", **FT))
    shapes = calls[0][0]
    assert {r for r, _, _ in shapes} == {2, 50} and {(2, 512, 512), (50, 256, 256)} <= set(shapes)  # envs, batch
    off = ft.main(ft.Args(exp_name="off", onednn_matmul="off", **FT))
    for out, want in ((auto, "off"), (off, "off")):
        with open(os.path.join(out["run_dir"], "args.json")) as f:
            assert json.load(f)["onednn_matmul"] == want
    assert auto["history"][0]["pg_loss"] == off["history"][0]["pg_loss"]
    a, b = (torch.load(o["checkpoint"], weights_only=True) for o in (auto, off))
    assert a["args"]["onednn_matmul"] == "off" and all(torch.equal(a["actor_ft"][k], b["actor_ft"][k]) for k in a["actor_ft"])
    measured(monkeypatch, 1.2e-6, 1.0, 0.5)
    on = ft.main(ft.Args(exp_name="on", **FT))
    with open(os.path.join(on["run_dir"], "args.json")) as f:
        assert json.load(f)["onednn_matmul"] == "on"


def test_a_resumed_run_keeps_its_decision_unless_told(tmp_path, monkeypatch, capsys, restore_matmul_precision):
    """The run's recorded `on` is not decided again on resume (refused in one line where oneDNN is not float32);
    `--onednn-matmul off` may then override it, visibly."""
    monkeypatch.chdir(tmp_path)
    measured(monkeypatch, 1.2e-6, 1.0, 0.5)
    first = ft.main(ft.Args(exp_name="on", **FT))
    measured(monkeypatch, 3.1e-3)
    with pytest.raises(UsageError, match="--onednn-matmul on: oneDNN would not compute in float32"):
        ft.main(ft.Args(resume=first["run_dir"], n_train_itr=2))
    capsys.readouterr()
    resumed = ft.main(ft.Args(resume=first["run_dir"], n_train_itr=2, onednn_matmul="off"))
    assert "resume: --onednn-matmul off (the run had on)" in capsys.readouterr().out
    with open(os.path.join(resumed["run_dir"], "resumes.jsonl")) as f:  # args.json keeps how the run started
        assert json.loads(f.read().splitlines()[-1])["changed"]["onednn_matmul"] == "off"
    assert torch.load(resumed["checkpoint"], weights_only=True)["args"]["onednn_matmul"] == "off"


def test_onednn_check_benchmark_code_path(capsys, restore_matmul_precision):
    """benchmarks/onednn_check.py at tiny rows: a line per round and the decision line; the kernels are left as found."""
    from benchmarks import onednn_check
    out = onednn_check.main(onednn_check.Bench(rounds=1, num_envs=2, batch_size=8))
    assert len(out["rounds"]) == 1 and out["decided"] in ("on", "off")
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    text = capsys.readouterr().out
    assert "round 1: deviation" in text and "--onednn-matmul auto: " + out["decided"] in text
