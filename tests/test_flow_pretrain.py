"""flow_pretrain.py: the velocity network, interpolation, loss and Euler sampling against ReinFlow's own `FlowMLP` /
`ReFlow` (tests/reference/README.md, `reflow.npz`); a smoke run whose checkpoint the loaders accept as a flow policy;
resume equal to an uninterrupted run; bad input in one line; the other scripts refusing a flow checkpoint."""

import csv
import glob
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import deploy_franka
import dppo_finetune as ft
import dppo_pretrain as pt
import flow_pretrain as fp
import gaussian_ppo as gauss
from common import runs
from common.errors import DatasetError, UsageError
from common.networks import DiffusionMLP
from loaders import convert
from tests.helpers import load_by_order, ref_weights

REF = Path(__file__).parent / "reference"
ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(env_id="avoid-m2", mlp_dims=(64, 64, 64), batch_size=128, n_eval_envs=8, seed=0)


def check(name: str, ours, ref, atol: float = 1e-5, rtol: float = 1e-6) -> None:
    """|ours - ref| <= max(1e-5, 1e-6·|ref|) element-wise (tests/reference/README.md, "Tolerances")."""
    ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(np.asarray(ref)).double()
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    excess = ((ours - ref).abs() / torch.clamp(rtol * ref.abs(), min=atol)).max().item()
    assert excess <= 1, f"{name}: difference {excess:.2f}x max({atol}, {rtol}·|ref|)"


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(REF / "reflow.npz") as f:
        return {k: f[k] for k in f.files}


def reference_policy(ref: dict, case: str) -> fp.FlowPolicy:
    """Our FlowPolicy over a DiffusionMLP holding the weights of ReinFlow's FlowMLP of `case`, loaded by order."""
    s = json.loads(str(ref[f"{case}.settings"]))
    net = DiffusionMLP(s["action_dim"], s["horizon_steps"], s["cond_dim"], 1, time_dim=s["time_dim"],
                       mlp_dims=tuple(s["mlp_dims"]), cond_mlp_dims=s["cond_mlp_dims"],
                       activation=s["activation_type"].lower(), residual=s["residual_style"],
                       use_layernorm=s["use_layernorm"])
    load_by_order(net, ref_weights(ref, f"{case}.net"))
    return fp.FlowPolicy(net, s["horizon_steps"], s["action_dim"]).eval()


@pytest.mark.parametrize("case", ["hopper", "kitchen"])
def test_velocity_network_and_loss_match_reinflow(ref, case, monkeypatch):
    """DiffusionMLP with a float time is ReinFlow's FlowMLP (t = 0 and 1 included); the loss at ReFlow's x_t, t and
    target v is ReFlow.loss."""
    policy = reference_policy(ref, case)
    x, t, obs = (torch.from_numpy(ref[f"{case}.{k}"]) for k in ("x", "t", "obs"))
    assert t[0] == 0 and t[1] == 1
    with torch.no_grad():
        check(f"{case}.vel", policy.network(x, t, obs), ref[f"{case}.vel"])
    x1, x0 = torch.from_numpy(ref[f"{case}.x1"]), torch.from_numpy(ref[f"{case}.x0"])
    monkeypatch.setattr(policy, "sample_time", lambda n, device: t)
    monkeypatch.setattr(torch, "randn_like", lambda a: x0.clone())
    seen = []  # the network's inputs (x_t, t, obs)
    policy.network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs))
    with torch.no_grad():
        check(f"{case}.loss", policy.loss(obs, x1), ref[f"{case}.loss"])
    check(f"{case}.xt", seen[0][0], ref[f"{case}.xt"])


@pytest.mark.parametrize("t_type", ["uniform", "logitnormal", "beta"])
def test_time_and_noise_draws_match_reflow_generate_target(ref, t_type):
    """After the same seed the loss draws t, then x₀, as ReFlow.generate_target does (same values, same x_t)."""
    policy = reference_policy(ref, "hopper")
    policy.sample_t_type = t_type
    x1, obs = torch.from_numpy(ref["hopper.x1"]), torch.from_numpy(ref["hopper.obs"])
    seen = []  # the network's inputs (x_t, t, obs)
    policy.network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs))
    torch.manual_seed(7)
    with torch.no_grad():
        policy.loss(obs, x1)
    check(f"{t_type}.t", seen[0][1], ref[f"hopper.target.{t_type}.t"])
    check(f"{t_type}.xt", seen[0][0], ref[f"hopper.target.{t_type}.xt"])


@pytest.mark.parametrize("case", ["hopper", "kitchen"])
@pytest.mark.parametrize("K", [4, 1])
@pytest.mark.parametrize("clip", [True, False])
def test_euler_sampling_matches_reflow_sample(ref, case, K, clip):
    """K Euler steps at ReFlow.sample's times linspace(0, 1, K) with step 1/K, clamped after every step or only the
    last: ReFlow.sample's trajectories and FlowMLP.sample_action's chains, from the same z. (The scripts' own grid,
    k/K, is held to reinflow.py's chain in tests/test_reinflow.py.)"""
    policy = reference_policy(ref, case)
    obs, z = torch.from_numpy(ref[f"{case}.obs"]), torch.from_numpy(ref[f"{case}.z"])
    tag = f"{case}.K{K}.{'clip' if clip else 'noclip'}"
    x, chain = policy.sample(obs, K, clip, z=z.clone(), return_chain=True, times=torch.linspace(0, 1, K))
    check(f"{tag}.trajectories", x, ref[f"{tag}.trajectories"])
    check(f"{tag}.chains", chain, ref[f"{tag}.chains"])
    if K == 4:  # the intermediate clamp acts on these inputs (z·1.5 leaves [-1, 1])
        other = ref[f"{case}.K4.{'noclip' if clip else 'clip'}.chains"]
        assert not np.allclose(chain.numpy(), other, atol=1e-3)


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 2-epoch flow run (evaluated at epoch 2) and a 1-epoch diffusion run, in their own folder."""
    root = tmp_path_factory.mktemp("flow")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        flow = fp.main(fp.Args(n_epochs=2, eval_every=2, output=str(root / "flow.pt"), **SMALL))
        diffusion = pt.main(pt.Args(n_epochs=1, eval_every=0, **SMALL))
    finally:
        os.chdir(cwd)
    return dict(root=root, flow=flow, diffusion=diffusion)


def test_smoke_run_writes_a_flow_checkpoint_the_loaders_accept(world):
    out = world["flow"]
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
    assert out["eval"]["n_episodes"] == 8 and set(out["eval"]["mode_fractions"]) == {5, 6, 7, 8}
    task = fp.get_task("avoid-m2")
    for path in (out["checkpoint"], out["output"]):
        ckpt = runs.load_checkpoint(path, "flow", "python flow_pretrain.py", task)
        assert (ckpt["policy"], ckpt["backbone"], ckpt["denoising_steps"], ckpt["horizon_steps"]) == ("flow", "mlp", 4, 4)
        assert set(runs.HEADER_KEYS) <= set(ckpt)
        net = DiffusionMLP(**ckpt["arch"])  # rebuilt from the header alone
        net.load_state_dict(ckpt["ema"])
    release = torch.load(out["output"], weights_only=True)
    assert "optimizer" not in release and release["args"]["denoising_steps"] == 4
    with open(os.path.join(out["run_dir"], "eval.csv")) as f:
        assert [r["iteration"] for r in csv.DictReader(f)] == ["2"]


def test_release_checkpoint_defaults_to_where_reinflow_looks(tmp_path, monkeypatch):
    """Without --output the release checkpoint is runs.default_flow_checkpoint(task): checkpoints/<task>_flow.pt."""
    assert runs.default_flow_checkpoint("avoid-m2") == str(ROOT / "checkpoints" / "avoid-m2_flow.pt")
    target = tmp_path / "checkpoints" / "avoid-m2_flow.pt"
    monkeypatch.setattr(runs, "default_flow_checkpoint", lambda task_id: str(tmp_path / "checkpoints" / f"{task_id}_flow.pt"))
    monkeypatch.chdir(tmp_path)
    out = fp.main(fp.Args(n_epochs=1, eval_every=0, **SMALL))
    assert out["output"] == str(target) and runs.load_checkpoint(str(target), "flow", "")["task"] == "avoid-m2"


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped after the epoch-2 checkpoint of 3 and resumed: the same eval.csv, weights and EMA (an EMA that starts at
    epoch 1 and moves every step) as the run that was not stopped."""
    monkeypatch.chdir(tmp_path)
    kw = dict(n_epochs=3, eval_every=1, save_every=1, ema_every=1, ema_start_epoch=1, ema_decay=0.5,
              output=str(tmp_path / "release.pt"), **SMALL)
    full = fp.main(fp.Args(exp_name="full", **kw))
    real = runs.save_checkpoint

    def save_then_stop(path, payload):
        real(path, payload)
        if payload["epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fp.main(fp.Args(exp_name="part", **kw))
    monkeypatch.setattr(runs, "save_checkpoint", real)
    resumed = fp.main(fp.Args(resume=glob.glob("runs/avoid-m2__part__*")[0]))
    a, b = (torch.load(o["checkpoint"], map_location="cpu", weights_only=True) for o in (full, resumed))
    assert b["epoch"] == 3 and len(resumed["losses"]) == 1 and resumed["losses"] == full["losses"][2:]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], v) for k, v in b[key].items())
    assert not all(torch.equal(b["model"][k], v) for k, v in b["ema"].items())  # the EMA is not the model

    def rows(out):
        with open(os.path.join(out["run_dir"], "eval.csv")) as f:
            return list(csv.DictReader(f))
    assert rows(full) == rows(resumed) and len(rows(full)) == 3


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _snapshot(*folders) -> dict:
    return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for folder in folders
            for p in glob.glob(os.path.join(str(folder), "**"), recursive=True)}


def _one_line(main, args, monkeypatch, capsys, *folders) -> str:
    """`main(args)` through runs.cli: exit 2, one `error:` line, nothing under `folders` changed."""
    before = _snapshot(*folders)
    monkeypatch.setattr(tyro, "cli", lambda *a, **kw: args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runs.cli(main, type(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert _snapshot(*folders) == before and not glob.glob(os.path.join(str(folders[0]), "**", "*.tmp"), recursive=True)
    return err.strip()


FLOW_CASES = {
    "denoising-steps-0": (dict(denoising_steps=0), r"--denoising-steps must be positive \(got 0\)"),
    "denoising-steps-negative": (dict(denoising_steps=-2), "--denoising-steps must be positive"),
    "learning-rate-nan": (dict(learning_rate=math.nan), r"--learning-rate must be positive \(got nan\)"),
    "ema-decay-nan": (dict(ema_decay=math.nan), r"--ema-decay must be in \[0.0, 1.0\] \(got nan\)"),
    "min-lr-inf": (dict(min_lr=math.inf), r"--min-lr must be a finite number > 0 \(got inf\)"),
    "lr-cycle-0": (dict(lr_cycle_epochs=0), "--lr-cycle-epochs must be positive"),
    "activation-foo": (dict(activation="foo"), "--activation foo: one of relu"),
    "pixel-task": (dict(env_id="lift-img"), "img"),
}


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_bad_flags_end_in_one_line(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    change, match = FLOW_CASES[case]
    args = fp.Args(**{**SMALL, "n_epochs": 1, "eval_every": 0, "output": str(tmp_path / "out.pt"), **change})
    err = _one_line(fp.main, args, monkeypatch, capsys, tmp_path, world["root"])
    assert re.search(match, err), err


def test_resume_of_the_other_kind_of_run_names_its_pretraining_script(world, tmp_path, monkeypatch, capsys):
    """A diffusion pre-training run given to flow_pretrain.py --resume, and a flow one to dppo_pretrain.py, name the
    script that resumes them; a missing folder and an output folder are one line too."""
    monkeypatch.chdir(tmp_path)
    err = _one_line(fp.main, fp.Args(resume=world["diffusion"]["run_dir"]), monkeypatch, capsys, tmp_path, world["root"])
    assert "holds a diffusion policy, not a flow one; use dppo_pretrain.py" in err
    err = _one_line(pt.main, pt.Args(resume=world["flow"]["run_dir"]), monkeypatch, capsys, tmp_path, world["root"])
    assert "holds a flow policy, not a diffusion one; use flow_pretrain.py" in err
    err = _one_line(fp.main, fp.Args(resume=str(tmp_path / "nope")), monkeypatch, capsys, tmp_path, world["root"])
    assert "no such run folder" in err
    err = _one_line(fp.main, fp.Args(**SMALL, output=str(tmp_path)), monkeypatch, capsys, tmp_path, world["root"])
    assert "is a folder" in err


def test_other_scripts_refuse_a_flow_checkpoint_in_one_line(world, tmp_path, monkeypatch, capsys):
    """dppo_finetune.py and gaussian_ppo.py name reinflow.py; deploy_franka.py takes flow policies but not Avoid's (not
    end-effector poses); the reference import refuses it."""
    monkeypatch.chdir(tmp_path)
    flow = world["flow"]["output"]
    fine = dict(env_id="avoid-m2", n_train_itr=6, num_envs=2, n_steps=5, val_freq=0, seed=0)
    err = _one_line(ft.main, ft.Args(checkpoint=flow, plot=False, **fine), monkeypatch, capsys, tmp_path, world["root"])
    assert "holds a flow policy, not a diffusion one; use reinflow.py" in err
    err = _one_line(gauss.main, gauss.Args(checkpoint=flow, **fine), monkeypatch, capsys, tmp_path, world["root"])
    assert "holds a flow policy, not a gaussian one; use reinflow.py" in err
    args = deploy_franka.Args(checkpoint=flow, robot="fake", dry_run=True)
    err = _one_line(deploy_franka.main, args, monkeypatch, capsys, tmp_path, world["root"])
    assert "does not act in absolute end-effector poses" in err
    capsys.readouterr()
    assert convert.main([flow, "--env-id", "avoid-m2", "--output", str(tmp_path / "c.pt")]) == 2
    assert "is not a checkpoint of" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()


def test_a_flow_header_with_k_below_one_is_refused(world, tmp_path):
    ckpt = torch.load(world["flow"]["output"], weights_only=True)
    for K in (0, -1, 2.5):
        ckpt["denoising_steps"] = K
        torch.save(ckpt, tmp_path / "bad.pt")
        with pytest.raises(DatasetError, match=f"has denoising_steps {K}; a diffusion or flow policy takes at least 1"):
            runs.load_checkpoint(str(tmp_path / "bad.pt"), "flow", "python flow_pretrain.py")


def test_per_task_defaults():
    """ReinFlow's Hopper config (40 epochs in a 3000-epoch cosine cycle, uniform t); Avoid: DPPO's recipe with beta t."""
    hopper, avoid = fp.Args(env_id="hopper"), fp.Args()
    fp.fill_defaults(hopper), fp.fill_defaults(avoid)
    assert (hopper.n_epochs, hopper.lr_cycle_epochs, hopper.sample_t_type, hopper.denoising_steps) == (40, 3000, "uniform", 4)
    assert (avoid.n_epochs, avoid.lr_cycle_epochs, avoid.sample_t_type, avoid.mlp_dims) == (300, 300, "beta", (512,) * 3)
    explicit = fp.Args(sample_t_type="uniform", lr_cycle_epochs=7)  # an explicit flag wins
    fp.fill_defaults(explicit)
    assert (explicit.sample_t_type, explicit.lr_cycle_epochs) == ("uniform", 7)


def test_unknown_time_distribution_is_refused_on_the_command_line():
    with pytest.raises(SystemExit):
        tyro.cli(fp.Args, args=["--sample-t-type", "gauss"])
    with pytest.raises(UsageError, match="--denoising-steps must be positive"):
        fp.fill_defaults(fp.Args(denoising_steps=0))
