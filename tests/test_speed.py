"""The opt-in speed paths of dppo_finetune.py and the code paths of the speed benchmarks (tiny sizes; the timings
themselves are measured by the benchmarks, never asserted here)."""

import os
import subprocess
import sys

import pytest
import torch

import dppo_finetune as ft
from benchmarks import finetune_iteration, reference_compare
from common.networks import DiffusionMLP, ObsCritic
from common import runs


@pytest.fixture
def restore_matmul_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def test_onednn_matmul_is_kept_only_where_it_stays_float32(restore_matmul_precision):
    """Whatever this CPU does with oneDNN's reduced-precision switch (bf16 inputs on AMX CPUs, float32 elsewhere),
    after `--onednn-matmul auto` a float32 matmul is float32-accurate; `off` leaves the default kernels."""
    if runs.apply_matmul_flags("highest", "auto", torch.device("cpu")) == "off":
        assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(777, 300, generator=gen), torch.randn(300, 400, generator=gen)
    exact = x.double() @ w.double()
    assert ((x @ w).double() - exact).abs().max() / exact.abs().max() < 1e-5  # bf16 inputs: ~1e-3
    assert runs.apply_matmul_flags("highest", "auto", torch.device("meta")) == "off"


def test_matmul_precision_flag_round_trip(restore_matmul_precision):
    """--float32-matmul-precision sets torch's per-backend settings only, so torch can still report the precision,
    and `highest` gives float32 products again."""
    from common.runs import set_float32_matmul_precision
    x, w = torch.randn(500, 300), torch.randn(300, 200)
    exact = x.double() @ w.double()
    set_float32_matmul_precision("medium")
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    set_float32_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest"
    assert ((x @ w).double() - exact).abs().max() / exact.abs().max() < 1e-5


def test_finetune_iteration_benchmark_code_path(tmp_path, monkeypatch, capsys):
    """The benchmark's own path (dppo_finetune.main, 2 iterations, the phase table) at a tiny Hopper size; `--device
    cuda` without a GPU prints the paper-size plan and stops with an error instead of running on the CPU."""
    monkeypatch.chdir(tmp_path)
    out = finetune_iteration.main(finetune_iteration.Bench(env_id="hopper", n_steps=3, num_envs=2, update_chunk=7))
    assert {"env", "sampling", "update"} <= set(out["times"]) and "old_logprobs" not in out["times"] and out["total"] > 0
    assert set(out["cpu"]) == set(out["times"]) and out["cpu"]["update"] > 0  # Run's timer keeps the CPU time too
    assert out["env_steps"] == 3 * 2 * 4
    text = capsys.readouterr().out
    assert "hopper: 2 envs x 3 chunk-steps" in text and "update pieces of 7 pairs" in text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            finetune_iteration.main(finetune_iteration.Bench(env_id="hopper", device="cuda"))
        text = capsys.readouterr().out
        assert "40 envs x 500 chunk-steps" in text and "batch 50000" in text and "update pieces of 50000 pairs" in text


def test_reference_compare_without_a_reference(tmp_path, capsys):
    med = reference_compare.main(reference_compare.Bench(n_steps=2, num_envs=3, batch_size=20, update_epochs=1,
                                                         repeats=1, variants=("reference", "before", "ours:7")))
    assert set(med) == {"before", "ours:7"} and all(m["total"] > 0 for m in med.values())
    assert "reference not timed: give --reference" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a checkout of irom-princeton/dppo"):
        reference_compare.main(reference_compare.Bench(reference=str(tmp_path), repeats=1, variants=("reference",)))


@pytest.mark.slow
def test_compiled_sampling_draws_the_chains_of_eager():
    """--compile (~1 minute of compilation here): the same seed gives the same chains as the eager path."""
    torch.manual_seed(0)
    agent = ft.DiffusionPPO(DiffusionMLP(2, 4, 3, mlp_dims=(32, 32, 32)), ObsCritic(3, mlp_dims=(16, 16, 16)), 20, 10, 4,
                            2, False, 5, 0.1, 0.1, 3.0)
    cond = torch.randn(5, 1, 3)
    compiled = runs.compile_sampling(agent.get_action, torch.device("cpu"))
    torch.manual_seed(1)
    x, chain = agent.get_action(cond)
    torch.manual_seed(1)
    xc, chain_c = compiled(cond)
    torch.testing.assert_close(chain_c, chain, rtol=1e-5, atol=1e-5)


def test_onednn_matmul_refuses_reduced_precision(tmp_path, monkeypatch, restore_matmul_precision):
    from common.errors import UsageError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="does not combine with --float32-matmul-precision medium"):
        ft.main(ft.Args(onednn_matmul="on", float32_matmul_precision="medium", n_train_itr=2))
    assert not (tmp_path / "runs").exists()


HEAP = """
import ctypes, sys, torch
from common.runs import keep_freed_memory
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(4 << 20)  # 16 MB, an activation's size
held = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(applied, held.hblkhd >> 20, freed.fordblks >> 20)  # MB mapped apart from the heap while held; MB free in the heap
"""


def test_keep_freed_memory_serves_big_tensors_from_the_heap_and_keeps_them():
    """With `keep_freed_memory` (every script calls it in seed_everything) a 16 MB tensor comes from the heap and its
    memory stays there when freed, ready for the next one (no fresh pages, no page faults); glibc's default maps it
    apart and hands it back to the kernel on free (docs/results.md "Speed": ~-7 % update time)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {mode: subprocess.run([sys.executable, "-c", HEAP, mode], cwd=root, capture_output=True, text=True)
           for mode in ("keep", "default")}
    if out["keep"].returncode or out["keep"].stdout.split()[0] != "True":
        pytest.skip("not glibc >= 2.33 (mallopt / mallinfo2): keep_freed_memory does nothing or cannot be observed here")
    (kept_mapped, kept_free), (default_mapped, default_free) = (
        [int(v) for v in out[m].stdout.split()[1:]] for m in ("keep", "default"))
    assert kept_mapped < 16 <= default_mapped, out     # the default maps the tensor apart, kept memory serves it
    assert default_free < 16 <= kept_free, out         # ... and hands it back on free; kept memory stays in the heap
