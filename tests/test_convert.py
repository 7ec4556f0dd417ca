"""Importing the reference implementation's checkpoints and datasets (loaders/convert.py, issue 14).

The reference checkpoints here are rebuilt from `tests/reference/ref_checkpoints.npz`: state dicts written by the
reference's own model code (random weights), the normalisation, raw observations and the actions the reference
policy took (see tests/reference/README.md). A round trip is: write the reference layout to a `.pt`, convert it,
and take the same actions for the same noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_finetune as ft
import gaussian_ppo as gp
from common.errors import DatasetError, TaskError, UsageError
from common.networks import ObsCritic, build_diffusion_network
from common.normalizer import Normalizer
from common import runs
from common.tasks import get_task
from loaders import convert
from loaders.datasets import load_task_dataset, save_train_npz
from loaders.files import download

ROOT = Path(__file__).resolve().parent.parent
REF = np.load(ROOT / "tests" / "reference" / "ref_checkpoints.npz")
TASKS = {"hopper_mlp": "hopper", "square_mlp": "square", "furniture_mlp_ddim": "one-leg-low", "lift_unet": "lift",
         "can_gaussian": "can", "avoid_gmm": "avoid-m2", "gaussian_transformer": "can"}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No test here reaches the network: downloads of the paper's files fail at once (DPPO_OFFLINE), into tmp_path."""
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))


def state_dict(case: str, which: str) -> dict[str, torch.Tensor]:
    names = REF[f"{case}.{which}.names"]
    return {str(n): torch.from_numpy(REF[f"{case}.{which}.{i:03d}"].copy()) for i, n in enumerate(names)}


def write_reference(tmp_path: Path, case: str, with_normalization: bool = True) -> Path:
    """The case as the reference's pre-training agent saves it, with its normalization.npz beside it."""
    folder = tmp_path / case
    folder.mkdir(exist_ok=True)
    ckpt = {"epoch": int(REF[f"{case}.epoch"]) if f"{case}.epoch" in REF else 0, "model": state_dict(case, "model")}
    if f"{case}.ema.names" in REF:
        ckpt["ema"] = state_dict(case, "ema")
    torch.save(ckpt, folder / "state_8000.pt")
    if with_normalization and f"{case}.obs_min" in REF:
        np.savez(folder / "normalization.npz", **{k: REF[f"{case}.{k}"] for k in Normalizer.KEYS})
    return folder / "state_8000.pt"


def load_checkpoint(path: str, policy: str | None, hint: str, task=None) -> dict:
    """`common.runs.load_checkpoint` as the scripts call it: reference checkpoints converted by `loaders.convert`."""
    return runs.load_checkpoint(path, policy, hint, task, conversion=lambda: convert)


def settings(case: str) -> dict:
    return json.loads(str(REF[f"{case}.settings"]))


@pytest.mark.parametrize("case", ["hopper_mlp", "square_mlp", "furniture_mlp_ddim", "lift_unet"])
def test_diffusion_round_trip_same_actions_for_same_noise(tmp_path, case):
    task = get_task(TASKS[case])
    path = write_reference(tmp_path, case)
    ckpt = load_checkpoint(str(path), "diffusion", "", task)  # converted in memory
    s = settings(case)["model"]
    assert ckpt["denoising_steps"] == s["denoising_steps"] and ckpt["horizon_steps"] == s["horizon_steps"]
    net = build_diffusion_network(ckpt, ckpt["horizon_steps"])
    net.load_state_dict(ckpt["ema"])
    with torch.no_grad():  # the ε-network alone
        eps = net(*(torch.from_numpy(REF[f"{case}.eps_{k}"]) for k in ("x", "t", "cond")))
    np.testing.assert_allclose(eps.numpy(), REF[f"{case}.eps_out"], atol=1e-5)
    normalizer = Normalizer.from_state_dict(ckpt["normalization"])
    obs = normalizer.normalize_obs(torch.from_numpy(REF[f"{case}.obs"]))
    np.testing.assert_allclose(obs.numpy(), REF[f"{case}.obs_norm"], atol=1e-6)
    K, T_a, D_a = ckpt["denoising_steps"], ckpt["horizon_steps"], ckpt["action_dim"]
    use_ddim = bool(s["use_ddim"])
    agent = ft.DiffusionPPO(net, ObsCritic(task.obs_dim, mlp_dims=(8,)), K, s["ddim_steps"] if use_ddim else K, T_a, D_a,
                            use_ddim, s["ddim_steps"] or 1, 0.1, 0.1, float(s["randn_clip_value"]))
    torch.manual_seed(int(REF[f"{case}.sample_seed"]))
    with torch.no_grad():  # the reference's `DiffusionModel.forward` (pre-trained policy evaluation)
        x, _ = agent.get_action(obs, deterministic=True)
    # 20 DDPM steps of a random-weight UNet amplify the ε-network's float32 rounding (equal to 1e-5 above) to ~4e-5
    atol = 1e-4 if case == "lift_unet" else 1e-5
    np.testing.assert_allclose(x.numpy(), REF[f"{case}.actions_norm"], atol=atol)
    np.testing.assert_allclose(normalizer.unnormalize_action(x).numpy(), REF[f"{case}.actions"], atol=atol)
    assert not np.allclose(REF[f"{case}.actions_norm"], REF[f"{case}.actions_norm_model"], atol=1e-3)  # ema != model


def test_gaussian_round_trip(tmp_path):
    case, task = "can_gaussian", get_task("can")
    ckpt = load_checkpoint(str(write_reference(tmp_path, case)), "gaussian", "", task)
    assert ckpt["std_limits"] == pytest.approx([0.01, 1.0])  # the pre-training checkpoint's logvar_min/max (see convert)
    policy = gp.GaussianPolicy(gp.build_network(ckpt["backbone"], ckpt["arch"]), 7, 0.1, *ckpt["std_limits"])
    policy.load_state_dict(ckpt["ema"])
    normalizer = Normalizer.from_state_dict(ckpt["normalization"])
    with torch.no_grad():
        mean, std = policy(normalizer.normalize_obs(torch.from_numpy(REF[f"{case}.obs"])))
    # the reference fine-tunes (and evaluates) its Gaussian policies from the `model` weights
    np.testing.assert_allclose(mean.flatten(1).numpy(), REF[f"{case}.mean_model"], atol=1e-6)
    np.testing.assert_allclose(std.expand(8, 4, 7).flatten(1).numpy(), REF[f"{case}.scale_model"], atol=1e-6)


def test_gaussian_with_a_learned_std_takes_half_its_log_variance(tmp_path):
    """A reference Gaussian_MLP with `learn_fixed_std` stores a `logvar` parameter (action_dim,): the imported policy's
    std is exp(logvar / 2) per action dimension (within the checkpoint's limits 0.01..1), its mean unchanged."""
    case, task = "can_gaussian", get_task("can")
    path = write_reference(tmp_path, case)
    ref = torch.load(path, weights_only=True)
    stds = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
    ref["model"]["network.logvar"] = torch.tensor([math.log(s * s) for s in stds])
    torch.save(ref, path)
    ckpt = load_checkpoint(str(path), "gaussian", "", task)
    policy = gp.GaussianPolicy(gp.build_network(ckpt["backbone"], ckpt["arch"]), 7, 0.1, *ckpt["std_limits"])
    policy.load_state_dict(ckpt["ema"])
    normalizer = Normalizer.from_state_dict(ckpt["normalization"])
    with torch.no_grad():
        mean, std = policy(normalizer.normalize_obs(torch.from_numpy(REF[f"{case}.obs"])))
    np.testing.assert_allclose(std.expand(8, 4, 7).numpy(), np.broadcast_to(stds, (8, 4, 7)), rtol=1e-6)
    np.testing.assert_allclose(mean.flatten(1).numpy(), REF[f"{case}.mean_model"], atol=1e-6)


def test_converter_command_writes_a_checkpoint_once(tmp_path):
    path = write_reference(tmp_path, "square_mlp")
    out = tmp_path / "square.pt"
    r = subprocess.run([sys.executable, "-m", "loaders.convert", str(path), "--env-id", "Square", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cond_mlp_dims=[24, 8]" in r.stdout and "activation=mish" in r.stdout and "denoising_steps=20" in r.stdout
    ckpt = load_checkpoint(str(out), "diffusion", "", get_task("square"))  # now this project's format
    assert ckpt["format"] == "dppo-checkpoint-v1" and ckpt["source"]["kind"] == "diffusion_mlp"
    assert ckpt["arch"]["mlp_dims"] == [48, 48, 48] and ckpt["arch"]["time_dim"] == 32
    r = subprocess.run([sys.executable, "-m", "loaders.convert", str(path), "--env-id", "hopper"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "normalises 23 observation" in r.stderr


def test_refusals_are_one_line(tmp_path):
    def refused(case, task_id, match, policy="diffusion"):
        with pytest.raises((DatasetError, TaskError)) as e:
            load_checkpoint(str(write_reference(tmp_path, case)), policy, "", get_task(task_id))
        assert "\n" not in str(e.value) and match in str(e.value)

    refused("avoid_gmm", "avoid-m2", "GMM policy", policy="gmm")
    refused("gaussian_transformer", "can", "Transformer policy", policy="gaussian")
    refused("hopper_mlp", "can", "normalises 11 observation")  # the task's own normalisation does not fit
    refused("can_gaussian", "can", "holds a gaussian policy, not a diffusion one")
    # weights of another task, with a normalisation file that fits the task: the width of the input is refused
    path = write_reference(tmp_path, "square_mlp")
    np.savez(path.parent / "normalization.npz", obs_min=np.zeros(19, np.float32), obs_max=np.ones(19, np.float32),
             action_min=-np.ones(7, np.float32), action_max=np.ones(7, np.float32))
    with pytest.raises(DatasetError, match="not a multiple of lift's observation size 19"):
        load_checkpoint(str(path), "diffusion", "", get_task("lift"))
    # a tensor of the wrong shape: named
    sd = state_dict("hopper_mlp", "ema")
    sd["network.mlp_mean.layers.1.l2.weight"] = sd["network.mlp_mean.layers.1.l2.weight"][:, :16]
    with pytest.raises(DatasetError, match=r"network\.mlp_mean\.layers\.1\.l2\.weight \(32, 16\) does not fit"):
        convert.convert({"epoch": 1, "model": sd, "ema": sd}, "x.pt", get_task("hopper"),
                        Normalizer(np.zeros(11), np.ones(11), -np.ones(3), np.ones(3)), log=lambda *_: None)
    # pixel and fine-tuning checkpoints of the reference
    with pytest.raises(DatasetError, match="pixel"):
        convert.detect_kind({"network.backbone.vit.w": torch.zeros(1)})
    with pytest.raises(DatasetError, match="fine-tuning checkpoint"):
        convert.detect_kind({"actor_ft.network.x": torch.zeros(1)})
    # non-finite weights
    sd = state_dict("hopper_mlp", "ema")
    sd["network.time_embedding.1.bias"][0] = float("nan")
    with pytest.raises(DatasetError, match="non-finite values in network.time_embedding.1.bias"):
        convert.convert({"model": sd, "ema": sd}, "x.pt", get_task("hopper"),
                        Normalizer(np.zeros(11), np.ones(11), -np.ones(3), np.ones(3)), log=lambda *_: None)


def test_the_run_plumbing_converts_only_through_the_conversion_it_is_handed(tmp_path):
    """`common.runs` never imports `loaders`: without `conversion` a reference checkpoint is refused in one line naming
    the fix (the task, or the converter command), and `--checkpoint paper` too."""
    path = str(write_reference(tmp_path, "hopper_mlp"))
    with pytest.raises(DatasetError, match=f"convert it first: python -m loaders.convert {path} --env-id TASK"):
        runs.load_checkpoint(path, None, "")  # deploy_franka.py and resumed runs pass no task
    with pytest.raises(DatasetError, match=f"convert it first: python -m loaders.convert {path} --env-id hopper"):
        runs.load_checkpoint(path, "diffusion", "", get_task("hopper"))
    with pytest.raises(UsageError, match="does not import the reference's checkpoints"):
        runs.load_checkpoint("paper", "diffusion", "", get_task("hopper"))
    assert runs.load_checkpoint(path, "diffusion", "", get_task("hopper"), conversion=lambda: convert)["task"] == "hopper"


def test_normalization_found_beside_else_the_papers_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    path = write_reference(tmp_path, "hopper_mlp", with_normalization=False)
    with pytest.raises(DatasetError) as e:
        load_checkpoint(str(path), "diffusion", "", get_task("hopper"))
    dest = tmp_path / "data" / "hopper" / "paper" / "normalization.npz"
    assert f"put the file at {dest}" in str(e.value) and "1HHZ2X6r5io6hjG-MHVFFoPMJV2fJ3lis" in str(e.value)
    assert not (tmp_path / "data").exists()  # nothing left behind
    dest.parent.mkdir(parents=True)
    np.savez(dest, **{k: REF[f"hopper_mlp.{k}"] for k in Normalizer.KEYS})
    assert load_checkpoint(str(path), "diffusion", "", get_task("hopper"))["source"]["epoch"] == int(REF["hopper_mlp.epoch"])


def test_paper_checkpoint_keyword(tmp_path, monkeypatch):
    """`--checkpoint paper`: the task's published policy, fetched once into the paper folder (here: put there by hand)."""
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    task = get_task("hopper")
    with pytest.raises(DatasetError, match="hopper-medium-v2_pre_diffusion_mlp_ta4_td20_state_3000.pt"):
        load_checkpoint("paper", "diffusion", "", task)
    folder = Path(convert.paper_dir(task))
    folder.mkdir(parents=True)
    src = write_reference(tmp_path, "hopper_mlp")
    os.replace(src, folder / "hopper-medium-v2_pre_diffusion_mlp_ta4_td20_state_3000.pt")
    os.replace(src.parent / "normalization.npz", folder / "normalization.npz")
    assert load_checkpoint("paper", "diffusion", "", task)["arch"]["activation"] == "relu"
    with pytest.raises(TaskError, match="no diffusion unet checkpoint for hopper"):
        load_checkpoint("paper-unet", "diffusion", "", task)
    with pytest.raises(UsageError, match="pre-train one"):
        load_checkpoint("paper", "gmm", "python gmm_ppo.py --pretrain", task)
    assert set(convert.PAPER_FILES) == {t for t in map(lambda i: get_task(i).id, convert.PAPER_FILES)}  # ids are canonical


def test_download_refuses_an_html_page_saved_as_a_checkpoint(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>")
    dest = tmp_path / "d" / "x.pt"
    with pytest.raises(DatasetError, match="not a PyTorch checkpoint"):
        download(page.as_uri(), str(dest))
    assert not (tmp_path / "d").exists()
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(3)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        download(cut.as_uri(), str(dest))
    download(good.as_uri(), str(dest))
    assert torch.load(dest, weights_only=True)["a"].shape == (3,)


def test_reference_dataset_layout_is_denormalised_once(tmp_path, monkeypatch):
    """A train.npz beside its normalization.npz holds normalised data (the reference's layout): pre-training gets the
    reference's statistics and windows equal to the stored numbers."""
    task = get_task("avoid-m2")
    rng = np.random.default_rng(0)
    stats = dict(obs_min=np.array([0.2, -0.3, 0.2, -0.3], np.float32), obs_max=np.array([0.8, 0.5, 0.8, 0.5], np.float32),
                 action_min=np.full(2, -0.0125, np.float32), action_max=np.full(2, 0.0125, np.float32))
    trajs = [{"obs": rng.uniform(-1, 1, (20, 4)).astype(np.float32), "actions": rng.uniform(-1, 1, (20, 2)).astype(np.float32)}
             for _ in range(3)]
    save_train_npz(str(tmp_path / "train.npz"), trajs)
    np.savez(tmp_path / "normalization.npz", **stats)
    loaded, normalizer = load_task_dataset(task, str(tmp_path / "train.npz"))
    assert torch.equal(normalizer.obs_max, torch.from_numpy(stats["obs_max"]))
    assert 0.19 < loaded[0]["obs"][:, 0].min() and loaded[0]["obs"][:, 0].max() < 0.81  # env units
    np.testing.assert_allclose(normalizer.normalize_obs(loaded[1]["obs"]), trajs[1]["obs"], atol=1e-6)
    np.testing.assert_allclose(normalizer.normalize_action(loaded[2]["actions"]), trajs[2]["actions"], atol=1e-5)
    # raw data beside a normalization.npz is refused, not normalised twice
    save_train_npz(str(tmp_path / "train.npz"), [{"obs": t["obs"] * 5, "actions": t["actions"]} for t in trajs])
    with pytest.raises(DatasetError, match="not normalised with"):
        load_task_dataset(task, str(tmp_path / "train.npz"))
    # without the statistics file: min/max of the data
    os.remove(tmp_path / "normalization.npz")
    _, normalizer = load_task_dataset(task, str(tmp_path / "train.npz"))
    assert np.isclose(float(normalizer.obs_max[0]), float(max(t["obs"][:, 0].max() for t in trajs)) * 5)


def test_paper_dataset_lists_the_folder_and_checks_each_file(tmp_path, monkeypatch):
    """`--dataset paper`: gdown lists the reference's Drive folder; each file goes through the checked download."""
    import types

    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    task = get_task("avoid-m2")
    src = tmp_path / "src"
    src.mkdir()
    save_train_npz(str(src / "train.npz"), [{"obs": np.zeros((8, 4), np.float32), "actions": np.zeros((8, 2), np.float32)}])
    np.savez(src / "normalization.npz", obs_min=-np.ones(4), obs_max=np.ones(4), action_min=-np.ones(2), action_max=np.ones(2))
    listed = [types.SimpleNamespace(id="ID-train", path="train.npz"),
              types.SimpleNamespace(id="ID-norm", path="normalization.npz")]
    fake = types.SimpleNamespace(download_folder=lambda **kw: listed if kw.get("skip_download") else None)
    monkeypatch.setitem(sys.modules, "gdown", fake)
    monkeypatch.setattr(convert, "DRIVE_FILE", src.as_uri() + "/{}")  # the real, checked download, from file://
    os.rename(src / "train.npz", src / "ID-train")
    os.rename(src / "normalization.npz", src / "ID-norm")
    trajs, normalizer = load_task_dataset(task, "paper")
    assert len(trajs) == 1 and sorted(os.listdir(convert.paper_dir(task))) == ["normalization.npz", "train.npz"]

    def offline(**kw):
        raise ConnectionError("Failed to resolve drive.google.com")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download_folder=offline))
    with pytest.raises(DatasetError, match="could not list the Google Drive folder .* by hand and put them in"):
        convert.paper_dataset(get_task("avoid-m1"))


def test_furniture_normalization_pth(tmp_path):
    """The reference's furniture statistics are a LinearNormalizer state dict (normalization.pth), found beside the file."""
    from collections import OrderedDict

    task = get_task("one-leg-low")
    path = write_reference(tmp_path, "furniture_mlp_ddim", with_normalization=False)
    sd = OrderedDict((f"stats.{g}.{m}", torch.from_numpy(REF[f"furniture_mlp_ddim.{k}_{m}"]))
                     for g, k in (("observations", "obs"), ("actions", "action")) for m in ("min", "max"))
    torch.save(sd, path.parent / "normalization.pth")
    ckpt = load_checkpoint(str(path), "diffusion", "", task)
    assert torch.equal(ckpt["normalization"]["obs_max"], torch.from_numpy(REF["furniture_mlp_ddim.obs_max"]))
    torch.save({"stats.observations.min": torch.zeros(58)}, path.parent / "normalization.pth")
    with pytest.raises(DatasetError, match="LinearNormalizer state dict"):
        load_checkpoint(str(path), "diffusion", "", task)
    assert convert.normalization_name(task) == "normalization.pth"


def test_furniture_dataset_layout_and_missing_dataset(tmp_path):
    """The reference's furniture data: train.npz normalised with the LinearNormalizer of normalization.pth beside it
    (no 1e-6); obs 58, action 10. A missing dataset names `--dataset paper` and the Drive folder."""
    task = get_task("one-leg-low")
    rng = np.random.default_rng(1)
    lo, hi = rng.uniform(-2, 0, 58).astype(np.float32), rng.uniform(0.5, 2, 58).astype(np.float32)
    alo, ahi = -np.ones(10, np.float32), np.ones(10, np.float32) * 3
    trajs = [{"obs": rng.uniform(-1, 1, (30, 58)).astype(np.float32),
              "actions": rng.uniform(-1, 1, (30, 10)).astype(np.float32)} for _ in range(2)]
    save_train_npz(str(tmp_path / "train.npz"), trajs)
    torch.save({"stats.observations.min": torch.from_numpy(lo), "stats.observations.max": torch.from_numpy(hi),
                "stats.actions.min": torch.from_numpy(alo), "stats.actions.max": torch.from_numpy(ahi)},
               tmp_path / "normalization.pth")
    loaded, normalizer = load_task_dataset(task, str(tmp_path / "train.npz"))
    raw = (trajs[0]["obs"].astype(np.float64) + 1) / 2 * (hi - lo) + lo  # the LinearNormalizer's inverse
    np.testing.assert_allclose(loaded[0]["obs"], raw, atol=1e-5)
    np.testing.assert_allclose(normalizer.normalize_obs(loaded[0]["obs"]), trajs[0]["obs"], atol=1e-5)
    lamp = [{"obs": np.zeros((5, 44), np.float32), "actions": np.zeros((5, 10), np.float32)}]
    save_train_npz(str(tmp_path / "train.npz"), lamp)
    with pytest.raises(DatasetError, match=r"\(5, 58\)"):  # a Lamp file given for One-leg
        load_task_dataset(task, str(tmp_path / "train.npz"))
    with pytest.raises(DatasetError) as e:
        load_task_dataset(task)
    folder = "https://drive.google.com/drive/folders/1v4LG2D1fS8id5hqE7Jjt7MYNFUEBNyh4"
    assert f"--dataset paper downloads the reference's ({folder})" in str(e.value)
    assert str(tmp_path / "data" / "one-leg-low" / "train.npz") in str(e.value)


def test_reinflow_checkpoints_are_refused_in_one_line_naming_the_flow_scripts(tmp_path):
    """A ReFlow's `network.*` tensors have a DiffusionMLP's names: without this check ReinFlow's pre-trained flow policy
    would be imported as a diffusion ε-network (silently wrong). Its three layouts are refused, by the converter command
    and by a fine-tuning script's in-memory conversion, in one line naming flow_pretrain.py / reinflow.py."""
    sd = state_dict("hopper_mlp", "ema")
    pre = {"epoch": 40, "model": sd, "ema": sd, "optimizer": {"state": {}, "param_groups": []},
           "lr_scheduler": {"last_epoch": 40}}  # ReinFlow's agent/pretrain/train_agent.py save_model
    ft_full = {"itr": 10, "model": {f"actor_ft.policy.{k[len('network.'):]}": v for k, v in sd.items()}}
    ft_policy = {"itr": 10, "cnt_train_steps": 100, "policy": sd}  # save_model(only_save_policy_network=True)
    (tmp_path / "hopper_mlp").mkdir()
    np.savez(tmp_path / "hopper_mlp" / "normalization.npz", **{k: REF[f"hopper_mlp.{k}"] for k in Normalizer.KEYS})
    for name, ckpt in (("pre", pre), ("ft_full", ft_full), ("ft_policy", ft_policy)):
        path = tmp_path / "hopper_mlp" / f"{name}.pt"
        torch.save(ckpt, path)
        assert convert.is_reinflow_checkpoint(ckpt)
        r = subprocess.run([sys.executable, "-m", "loaders.convert", str(path), "--env-id", "hopper"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, (name, r.stderr)
        assert "saved by ReinFlow's code" in r.stderr and "python flow_pretrain.py" in r.stderr, (name, r.stderr)
        if name != "ft_policy":  # the reference layout (`model`): a fine-tuning script converts it in memory
            with pytest.raises(DatasetError, match="saved by ReinFlow's code"):
                load_checkpoint(str(path), "diffusion", "", get_task("hopper"))
    # the DPPO reference's own layout is not mistaken for ReinFlow's
    assert not convert.is_reinflow_checkpoint({"epoch": 1, "model": sd, "ema": sd})
    assert not convert.is_reinflow_checkpoint({"model": {"actor_ft.network.x": torch.zeros(1)}})
