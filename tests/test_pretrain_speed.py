"""Pre-training's fast paths (multi-tensor AdamW and EMA, the matmul flags, opt-in fused AdamW) keep its numbers, and
the code path of benchmarks/pretrain_iteration.py (tiny sizes; timings are measured by the benchmark, never asserted)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dppo_pretrain as pt
from common.errors import UsageError
from common.pretraining import ema_update, warmup_then_cosine
from common.runs import seed_everything
from common.tasks import get_task
from loaders.datasets import WindowDataset, load_task_dataset, save_train_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 14 steps per epoch on the 7479 M2 windows; the EMA runs from epoch 1 every 2nd step, so it is a real average
RUN = dict(env_id="avoid-m2", n_epochs=3, eval_every=0, seed=0, mlp_dims=(64, 64, 64), batch_size=512, ema_every=2,
           ema_start_epoch=1)


@pytest.fixture
def restore_matmul_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def plain_pretraining(**kw) -> tuple[list[float], dict, dict]:
    """dppo_pretrain's recipe written out with one Python loop per tensor: torch's per-tensor AdamW (`foreach=False`)
    and an EMA that lerps (or, before its start, copies) one tensor at a time; same seeds and draws as `main`.
    Returns the epochs' mean losses and the final model and EMA weights."""
    args = pt.Args(**kw)
    pt.fill_defaults(args)
    task = get_task(args.env_id)
    seed_everything(args.seed, True, 1, False)
    trajs, normalizer = load_task_dataset(task, args.dataset)
    data = WindowDataset(trajs, normalizer, args.horizon_steps, args.cond_steps)
    arch = pt.network_arch(args, task.obs_dim, task.action_dim)
    policy = pt.DiffusionPolicy(pt.build_network("mlp", arch), args.denoising_steps, args.horizon_steps, task.action_dim)
    ema = pt.DiffusionPolicy(pt.build_network("mlp", arch), args.denoising_steps, args.horizon_steps, task.action_dim)
    ema.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(args.learning_rate, args.min_lr,
                                                                                args.warmup_epochs, args.n_epochs))
    generator = torch.Generator().manual_seed(args.seed)
    losses, step = [], 0
    for epoch in range(args.n_epochs):
        total, n = torch.zeros(()), 0
        for obs, actions in data.iterate(args.batch_size, generator):
            loss = policy.loss(obs, actions)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
            n, step = n + 1, step + 1
            if step % args.ema_every == 0:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), policy.parameters()):
                        if epoch < args.ema_start_epoch:
                            p_ema.copy_(p)
                        else:
                            p_ema.lerp_(p, 1 - args.ema_decay)
        scheduler.step()
        losses.append((total / n).item())
    return losses, policy.network.state_dict(), ema.network.state_dict()


def test_pretraining_equals_the_per_tensor_loops(tmp_path, monkeypatch):
    """`main` (multi-tensor AdamW and EMA) gives the per-tensor formulation's losses and weights bit for bit; the
    opt-in fused AdamW the same within float rounding (drift 1e-7 relative after these 42 steps)."""
    monkeypatch.chdir(tmp_path)
    out = pt.main(pt.Args(exp_name="default", **RUN))
    ckpt = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["foreach"] is True  # two different implementations are compared
    losses, model, ema = plain_pretraining(**RUN)
    assert out["losses"] == losses
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.items())
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in ema.items())
    assert not all(torch.equal(ckpt["model"][k], v) for k, v in ckpt["ema"].items())  # the EMA averaged

    fused = pt.main(pt.Args(exp_name="fused", fused_adam=True, **RUN))
    f = torch.load(fused["checkpoint"], map_location="cpu", weights_only=True)
    assert f["optimizer"]["param_groups"][0]["fused"] is True
    np.testing.assert_allclose(fused["losses"], losses, rtol=1e-5)
    flat = lambda sd: torch.cat([v.flatten() for v in sd.values()])  # noqa: E731
    assert (flat(f["model"]) - flat(model)).norm() <= 1e-5 * flat(model).norm()


def test_flush_denormal(tmp_path, monkeypatch):
    """Denormals are flushed by default (x86), --no-flush-denormal keeps them, each run sets the mode either way (no
    leak from the previous run in the process), and a run without any denormals (these 42 steps) is the same bit for
    bit."""
    monkeypatch.chdir(tmp_path)
    try:
        flushed = pt.main(pt.Args(exp_name="flush", **RUN))
        assert (torch.tensor([1e-39]) * 1.0).item() == 0.0  # flushed (x86 with SSE3)
        plain = pt.main(pt.Args(exp_name="plain", flush_denormal=False, **RUN))
        assert (torch.tensor([1e-39]) * 1.0).item() > 0  # kept
    finally:
        torch.set_flush_denormal(False)
    a, b = (torch.load(o["checkpoint"], map_location="cpu", weights_only=True) for o in (flushed, plain))
    assert flushed["losses"] == plain["losses"] and all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_ema_update_one_op_equals_per_tensor():
    torch.manual_seed(0)
    a, b = pt.build_network("mlp", dict(action_dim=2, horizon_steps=4, obs_dim=3, mlp_dims=[32, 32, 32])), \
        pt.build_network("mlp", dict(action_dim=2, horizon_steps=4, obs_dim=3, mlp_dims=[32, 32, 32]))
    expected = [q.detach().clone().lerp_(p, 1 - 0.9) for q, p in zip(b.parameters(), a.parameters())]
    ema_update(b, a, 0.9, reset=False)
    assert all(torch.equal(q, e) for q, e in zip(b.parameters(), expected))
    ema_update(b, a, 0.9, reset=True)
    assert all(torch.equal(q, p) for q, p in zip(b.parameters(), a.parameters()))


def test_onednn_with_reduced_precision_is_refused_in_one_line(tmp_path, monkeypatch, restore_matmul_precision):
    """The bad combination, in each pre-training script and dppo_finetune_pixel.py: one line, exit 2, nothing written."""
    bad = ["--onednn-matmul", "on", "--float32-matmul-precision", "medium"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dppo_pretrain.py"), *bad], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --onednn-matmul keeps float32 products; it does not combine with --float32-matmul-precision medium"]
    assert not (tmp_path / "runs").exists()

    import dppo_finetune_pixel as ftp
    import dppo_pretrain_pixel as ptp
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    trajs = [{"obs": rng.standard_normal((n, 9)).astype(np.float32), "actions": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
              "images": rng.integers(0, 256, (n, 3, 20, 20)).astype(np.uint8)} for n in (9, 11)]
    save_train_npz(str(tmp_path / "train.npz"), trajs)
    tiny = dict(dataset=str(tmp_path / "train.npz"), n_epochs=1, batch_size=4, mlp_dims=(16, 16, 16), embed_dim=16,
                spatial_emb=8, denoising_steps=10, seed=0)
    with pytest.raises(UsageError, match="does not combine with --float32-matmul-precision high"):
        ptp.main(ptp.Args(onednn_matmul="on", float32_matmul_precision="high", **tiny))
    assert not (tmp_path / "runs").exists()
    out = ptp.main(ptp.Args(output=str(tmp_path / "pre.pt"), fused_adam=True, **tiny))  # the pixel script still trains
    assert np.isfinite(out["losses"]).all()
    runs = sorted(os.listdir(tmp_path / "runs"))
    with pytest.raises(UsageError, match="does not combine with --float32-matmul-precision medium"):
        ftp.main(ftp.Args(checkpoint=str(tmp_path / "pre.pt"), onednn_matmul="on", float32_matmul_precision="medium"))
    assert sorted(os.listdir(tmp_path / "runs")) == runs


def test_pretrain_benchmark_code_path(tmp_path, monkeypatch, capsys):
    """benchmarks/pretrain_iteration.py at a tiny Hopper size: the phases of the middle epoch, its steps, the full
    epoch's extrapolation, and the same final loss as a plain `main` run of the same settings."""
    from benchmarks import pretrain_iteration as bench
    monkeypatch.chdir(tmp_path)
    extra = dict(mlp_dims=(32, 32, 32))
    out = bench.main(bench.Bench(env_id="hopper", n_windows=1000, repeats=1, eval=False), extra)
    assert set(out["per_step"]) == {"data", "forward+backward", "optimizer+EMA"} and out["logging"] > 0
    assert out["steps"] == 1000 // 128
    assert out["epoch"] >= out["step"] * out["steps"] > 0 and out["full_epoch"] > out["epoch"]
    assert "full hopper-medium-v2 epoch (993442 windows, 7761 steps)" in capsys.readouterr().out
    dataset = tmp_path / "data" / "train.npz"
    dataset.parent.mkdir()
    assert bench.hopper_like_dataset(str(dataset), 1000) == 1000
    plain = pt.main(pt.Args(env_id="hopper", dataset=str(dataset), n_epochs=3, eval_every=0, exp_name="bench",
                            torch_deterministic=True, **extra))
    assert plain["losses"][-1] == out["loss"]
