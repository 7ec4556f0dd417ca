"""Dataset loaders on small files written here in the real formats, windows, normaliser, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.errors import DatasetError
from common.normalizer import Normalizer
from common.tasks import get_task
from loaders import datasets
from loaders.datasets import (ROBOMIMIC_OBS_KEYS, WindowDataset, default_data_path, load_d4rl_hdf5, load_robomimic_hdf5,
                              load_task_trajectories, load_train_npz, save_train_npz)
from loaders.files import download, read_normalization

# ---------------------------------------------------------------- writers for the real formats


def write_train_npz(path: Path, lengths: list[int], obs_dim: int = 4, action_dim: int = 2) -> dict:
    n = sum(lengths)
    data = {"states": np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
            "actions": -np.arange(n * action_dim, dtype=np.float32).reshape(n, action_dim),
            "traj_lengths": np.array(lengths), "rewards": np.arange(n, dtype=np.float32),
            "terminals": np.zeros(n, dtype=bool)}
    np.savez(path, **data)
    return data


def write_d4rl(path: Path, obs_dim: int = 11, action_dim: int = 3) -> None:
    # A: 4 steps ending in a terminal; B: 3 steps ending in a timeout; C: 2 steps, negative return,
    # timeout; D: 2 trailing steps with no done flag.
    rewards = np.array([1, 1, 1, 1, 2, 2, 2, -1, -1, 3, 3], dtype=np.float32)
    terminals = np.zeros(11, dtype=bool)
    timeouts = np.zeros(11, dtype=bool)
    terminals[3] = timeouts[6] = timeouts[8] = True
    obs = np.repeat(np.arange(11, dtype=np.float64)[:, None], obs_dim, axis=1)
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["next_observations"] = obs + 1
        f["actions"] = np.repeat(np.arange(11, dtype=np.float32)[:, None] / 10, action_dim, axis=1)
        f["rewards"], f["terminals"], f["timeouts"] = rewards, terminals, timeouts
        f["infos/qpos"] = np.zeros((11, 6))
        f["metadata/algorithm"] = "SAC"


def robomimic_obs(n: int, demo: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    return {k: np.full((n, d), demo * 100 + i, dtype=np.float64) for i, (k, d) in enumerate(dims.items())}


LIFT_DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10,
             "robot0_joint_pos": 7}  # the extra key must be ignored


def write_robomimic(path: Path, lengths: tuple[int, ...] = (5, 3, 4), action_dim: int = 7) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(lengths)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}})
        for i in (2, 0, 1):  # written out of order on purpose
            n = lengths[i]
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = n
            demo.attrs["model_file"] = "<mujoco/>"
            demo["states"] = np.zeros((n, 32))
            demo["actions"] = np.full((n, action_dim), i / 10)
            demo["rewards"] = np.arange(n, dtype=np.float64)
            demo["dones"] = np.eye(n)[-1].astype(np.int64)
            for k, v in robomimic_obs(n, i, LIFT_DIMS).items():
                demo[f"obs/{k}"] = v
                demo[f"next_obs/{k}"] = v + 1
        f["mask/train"] = np.array([b"demo_2", b"demo_0"])
        f["mask/valid"] = np.array([b"demo_1"])


# ---------------------------------------------------------------- loaders


def test_load_train_npz_splits_by_traj_lengths(tmp_path: Path) -> None:
    data = write_train_npz(tmp_path / "train.npz", [3, 5])
    trajs = load_train_npz(str(tmp_path / "train.npz"), 4, 2)
    assert [len(t["obs"]) for t in trajs] == [3, 5]
    np.testing.assert_array_equal(trajs[1]["obs"], data["states"][3:])
    np.testing.assert_array_equal(trajs[1]["actions"], data["actions"][3:])
    np.testing.assert_array_equal(trajs[0]["rewards"], [0, 1, 2])
    assert trajs[0]["obs"].dtype == np.float32 and "images" not in trajs[0]


def test_train_npz_images_hook_and_save_round_trip(tmp_path: Path) -> None:
    trajs = [{"obs": np.random.rand(n, 4).astype(np.float32), "actions": np.random.rand(n, 2).astype(np.float32),
              "rewards": np.random.rand(n).astype(np.float32),
              "images": np.random.randint(0, 255, (n, 3, 8, 8), dtype=np.uint8)} for n in (2, 6)]
    save_train_npz(str(tmp_path / "sub" / "train.npz"), trajs)
    assert sorted(os.listdir(tmp_path / "sub")) == ["train.npz"]
    back = load_train_npz(str(tmp_path / "sub" / "train.npz"), 4, 2, with_images=True)
    for a, b in zip(trajs, back):
        for key in ("obs", "actions", "rewards", "images"):
            np.testing.assert_array_equal(a[key], b[key])


def test_load_d4rl_splits_at_terminals_and_timeouts_and_drops_negative_returns(tmp_path: Path) -> None:
    write_d4rl(tmp_path / "hopper.hdf5")
    trajs = load_d4rl_hdf5(str(tmp_path / "hopper.hdf5"), 11, 3)
    assert [t["obs"][:, 0].tolist() for t in trajs] == [[0, 1, 2, 3], [4, 5, 6], [9, 10]]
    assert [float(t["rewards"].sum()) for t in trajs] == [4, 6, 6]
    assert trajs[0]["obs"].dtype == np.float32 and trajs[0]["actions"].shape == (4, 3)
    everything = load_d4rl_hdf5(str(tmp_path / "hopper.hdf5"), 11, 3, positive_return_only=False)
    assert [len(t["obs"]) for t in everything] == [4, 3, 2, 2]


def test_load_robomimic_concatenates_keys_in_order_and_sorts_demos(tmp_path: Path) -> None:
    path = str(tmp_path / "low_dim.hdf5")
    write_robomimic(tmp_path / "low_dim.hdf5")
    trajs = load_robomimic_hdf5(path, ROBOMIMIC_OBS_KEYS["lift"], 7)
    assert [len(t["obs"]) for t in trajs] == [5, 3, 4]  # demo_0, demo_1, demo_2
    obs = trajs[1]["obs"]
    assert obs.shape == (3, 19) and obs.dtype == np.float32
    # robot0_eef_pos (3) = 100, eef_quat (4) = 101, gripper (2) = 102, object (10) = 103
    np.testing.assert_array_equal(obs[0], [100] * 3 + [101] * 4 + [102] * 2 + [103] * 10)
    np.testing.assert_allclose(trajs[2]["actions"], 0.2)
    np.testing.assert_array_equal(trajs[0]["rewards"], np.arange(5))
    train = load_robomimic_hdf5(path, ROBOMIMIC_OBS_KEYS["lift"], 7, filter_key="train")
    assert [len(t["obs"]) for t in train] == [5, 4]  # demo_0 then demo_2
    assert len(load_robomimic_hdf5(path, ROBOMIMIC_OBS_KEYS["lift"], 7, max_demos=2)) == 2


@pytest.mark.parametrize("task_id, object_dim", [("lift", 10), ("can", 14), ("square", 14), ("transport", 41)])
def test_robomimic_obs_keys_give_task_dims(task_id: str, object_dim: int) -> None:
    per_key = {"eef_pos": 3, "eef_quat": 4, "gripper_qpos": 2}
    dims = [object_dim if k == "object" else per_key[k.split("_", 1)[1]] for k in ROBOMIMIC_OBS_KEYS[task_id]]
    assert sum(dims) == get_task(task_id).obs_dim
    assert ROBOMIMIC_OBS_KEYS[task_id][-1] == "object"


def test_load_task_trajectories_dispatches_on_format(tmp_path: Path) -> None:
    write_train_npz(tmp_path / "train.npz", [3, 5], obs_dim=11, action_dim=3)
    write_d4rl(tmp_path / "d4rl.h5")
    write_robomimic(tmp_path / "robomimic.hdf5")
    hopper = get_task("hopper")
    assert [len(t["obs"]) for t in load_task_trajectories(hopper, str(tmp_path / "train.npz"))] == [3, 5]
    assert [len(t["obs"]) for t in load_task_trajectories(hopper, str(tmp_path / "d4rl.h5"))] == [4, 3, 2]
    lift = load_task_trajectories(get_task("Lift"), str(tmp_path / "robomimic.hdf5"))
    assert [t["obs"].shape for t in lift] == [(5, 19), (3, 19), (4, 19)]
    with pytest.raises(DatasetError, match="not a robomimic task"):
        load_task_trajectories(hopper, str(tmp_path / "robomimic.hdf5"))


# ---------------------------------------------------------------- errors


def test_errors_name_the_key_and_both_shapes(tmp_path: Path) -> None:
    write_train_npz(tmp_path / "train.npz", [3, 5])
    with pytest.raises(DatasetError) as e:
        load_train_npz(str(tmp_path / "train.npz"), 5, 2)
    assert "'states'" in str(e.value) and "(8, 4)" in str(e.value) and "(8, 5)" in str(e.value)
    np.savez(tmp_path / "broken.npz", states=np.zeros((3, 4)), actions=np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="missing key 'traj_lengths'"):
        load_train_npz(str(tmp_path / "broken.npz"), 4, 2)
    write_d4rl(tmp_path / "d4rl.hdf5")  # hopper data (11, 3) loaded for walker2d (17, 6)
    with pytest.raises(DatasetError) as e:
        load_task_trajectories(get_task("walker2d"), str(tmp_path / "d4rl.hdf5"))
    assert "'observations'" in str(e.value) and "(11, 11)" in str(e.value) and "(N, 17)" in str(e.value)
    write_robomimic(tmp_path / "lift.hdf5")  # lift data (19-d obs) for square (23-d)
    with pytest.raises(DatasetError) as e:
        load_task_trajectories(get_task("square"), str(tmp_path / "lift.hdf5"))
    assert "obs[0]" in str(e.value) and "(5, 19)" in str(e.value) and "(5, 23)" in str(e.value)
    with pytest.raises(DatasetError, match="missing key 'robot1_eef_pos'"):
        load_robomimic_hdf5(str(tmp_path / "lift.hdf5"), ROBOMIMIC_OBS_KEYS["transport"], 7)
    with pytest.raises(DatasetError, match="'data/demo_0/actions' has shape \\(5, 7\\), expected \\(N, 14\\)"):
        load_robomimic_hdf5(str(tmp_path / "lift.hdf5"), ROBOMIMIC_OBS_KEYS["lift"], 14)
    with pytest.raises(DatasetError, match="missing mask 'better'"):
        load_robomimic_hdf5(str(tmp_path / "lift.hdf5"), ROBOMIMIC_OBS_KEYS["lift"], 7, filter_key="better")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="unknown .npz layout"):
        load_task_trajectories(get_task("hopper"), str(tmp_path / "other.npz"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_task_trajectories(get_task("hopper"), str(tmp_path / "nope.hdf5"))


def test_download_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, dest = "http://127.0.0.1:9/x.hdf5", str(tmp_path / "d" / "e" / "x.hdf5")
    with pytest.raises(DatasetError) as e:
        download(url, dest)
    assert f"could not download {url}" in str(e.value) and f"put the file at {dest}" in str(e.value)
    assert os.listdir(tmp_path) == []  # the folders it made are gone again
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError):
        download(url, dest)
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []  # one that existed stays
    # the same through the task: default path under DPPO_DATA_DIR, download attempted, nothing left
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    task = dataclasses.replace(get_task("hopper"), data=url)
    with pytest.raises(DatasetError, match="could not download"):
        load_task_trajectories(task)
    assert not (tmp_path / "data").exists()


def test_download_file_url_and_default_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    write_d4rl(tmp_path / "src.hdf5")
    task = dataclasses.replace(get_task("hopper"), data=(tmp_path / "src.hdf5").as_uri())
    assert default_data_path(task) == str(tmp_path / "data" / "hopper" / "src.hdf5")
    assert len(load_task_trajectories(task)) == 3  # downloaded via file://, then loaded
    assert os.listdir(tmp_path / "data" / "hopper") == ["src.hdf5"]
    assert default_data_path(get_task("square")) == str(tmp_path / "data" / "square" / "low_dim_v141.hdf5")
    assert default_data_path(get_task("one-leg-low")).endswith(os.path.join("one-leg-low", "train.npz"))
    with pytest.raises(DatasetError, match="no dataset for task 'one-leg-low'"):
        load_task_trajectories(get_task("one-leg-low"))
    monkeypatch.delenv("DPPO_DATA_DIR")
    repo = Path(__file__).resolve().parent.parent
    assert default_data_path(get_task("hopper")) == str(repo / "data" / "hopper" / "hopper_medium-v2.hdf5")


# ---------------------------------------------------------------- avoid dispatch


def test_avoid_dispatch_with_stub_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path: the subset's shipped train.npz (first n_demos of it); a D3IL npz: sims.avoid's loader."""
    calls = []
    demo = [{"obs": np.zeros((6, 4), np.float32), "actions": np.zeros((6, 2), np.float32)}]
    stub = types.ModuleType("sims.avoid")
    stub.load_avoid_demos = lambda path, subset: calls.append(("load", path, subset)) or demo
    monkeypatch.setitem(sys.modules, "sims.avoid", stub)
    monkeypatch.setattr(datasets, "AVOID_DEMO_DIR", tmp_path / "builtin")
    task = get_task("avoid-m2")
    with pytest.raises(DatasetError, match="built-in Avoid demos .*avoid-m2.npz are missing"):
        load_task_trajectories(task)
    rng = np.random.default_rng(0)
    shipped = [{"obs": rng.normal(size=(n, 4)).astype(np.float32),
                "actions": rng.normal(size=(n, 2)).astype(np.float32)} for n in range(5, 14)]
    save_train_npz(str(tmp_path / "builtin" / "avoid-m2.npz"), shipped, compressed=True)
    got = load_task_trajectories(task, n_demos=7)
    assert len(got) == 7 and all(np.array_equal(g[k], t[k]) for g, t in zip(got, shipped) for k in ("obs", "actions"))
    assert len(load_task_trajectories(task)) == 9  # None: the whole file
    with pytest.raises(DatasetError, match="has 9 demos, not 96"):
        load_task_trajectories(task, n_demos=96)
    np.savez(tmp_path / "avoid_demos.npz", des_c_pos=np.zeros((6, 3)), c_pos=np.zeros((6, 3)), traj_lengths=[2, 4])
    assert load_task_trajectories(task, str(tmp_path / "avoid_demos.npz")) == demo
    assert calls == [("load", str(tmp_path / "avoid_demos.npz"), "M2")]
    stub.load_avoid_demos = lambda path, subset: [{"obs": np.zeros((6, 3)), "actions": np.zeros((6, 2))}]
    with pytest.raises(DatasetError, match="'obs\\[0\\]' has shape \\(6, 3\\), expected \\(6, 4\\)"):
        load_task_trajectories(task, str(tmp_path / "avoid_demos.npz"))


def test_avoid_dispatch_with_real_module() -> None:
    trajs = load_task_trajectories(get_task("avoid-m1"), n_demos=4)
    assert len(trajs) == 4 and all(t["obs"].shape[1] == 4 and t["actions"].shape[1] == 2 for t in trajs)
    assert all(t["obs"].dtype == np.float32 and t["actions"].dtype == np.float32 for t in trajs)
    assert len(load_task_trajectories(get_task("avoid-m3"))) == 96
    real = Path("/work/shared/data/d3il_avoid/avoid_demos.npz")
    if real.exists():
        assert all(t["obs"].shape[1] == 4 for t in load_task_trajectories(get_task("avoid-m1"), str(real)))


# ---------------------------------------------------------------- normaliser


def test_normalizer_round_trip_and_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    trajs = [{"obs": rng.normal(3, 5, (n, 4)).astype(np.float32), "actions": rng.uniform(-2, 7, (n, 2)).astype(np.float32)}
             for n in (10, 20)]
    norm = Normalizer.from_trajectories(trajs)
    obs = np.concatenate([t["obs"] for t in trajs])
    y = norm.normalize_obs(obs)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.min() >= -1 and y.max() <= 1 and np.allclose(y.min(0), -1) and np.allclose(y.max(0), 1, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize_obs(y), obs, atol=1e-5)
    # against an independent computation of the min-max normalisation
    lo, hi = obs.min(0), obs.max(0)
    np.testing.assert_allclose(y, 2 * (obs - lo) / (hi - lo + 1e-6) - 1, atol=1e-6)
    acts = torch.as_tensor(np.stack([t["actions"][:8] for t in trajs]))  # (2, 8, 2): leading dims
    z = norm.normalize_action(acts)
    assert isinstance(z, torch.Tensor) and z.shape == (2, 8, 2) and z.abs().max() <= 1
    torch.testing.assert_close(norm.unnormalize_action(z), acts, atol=1e-5, rtol=0)
    x64 = obs.astype(np.float64)
    assert norm.unnormalize_obs(norm.normalize_obs(x64)).dtype == np.float64


def test_normalizer_state_dict_weights_only_and_npz(tmp_path: Path) -> None:
    norm = Normalizer(np.array([0.0, -1.0]), np.array([2.0, 1.0]), np.array([-3.0]), np.array([3.0]))
    torch.save({"normalizer": norm.state_dict()}, tmp_path / "ckpt.pt")
    d = torch.load(tmp_path / "ckpt.pt", weights_only=True)["normalizer"]
    back = Normalizer.from_state_dict(d).to("cpu")
    for key in Normalizer.KEYS:
        assert getattr(back, key).dtype == torch.float32
        torch.testing.assert_close(getattr(back, key), getattr(norm, key))
    np.savez(tmp_path / "normalization.npz", **{k: v.numpy() for k, v in d.items()})
    x = torch.tensor([[1.0, 0.5]])
    torch.testing.assert_close(read_normalization(str(tmp_path / "normalization.npz")).normalize_obs(x),
                               norm.normalize_obs(x))
    np.savez(tmp_path / "bad.npz", obs_min=np.zeros(2))
    with pytest.raises(DatasetError, match="missing key 'obs_max'"):
        read_normalization(str(tmp_path / "bad.npz"))


# ---------------------------------------------------------------- windows


def two_short_trajs() -> list[dict]:
    return [{"obs": np.array([[0.0], [1.0], [2.0]], np.float32), "actions": np.array([[10.0], [11.0], [12.0]], np.float32)},
            {"obs": np.array([[100.0], [101.0], [102.0], [103.0]], np.float32),
             "actions": np.array([[110.0], [111.0], [112.0], [113.0]], np.float32)},
            {"obs": np.array([[500.0]], np.float32), "actions": np.array([[510.0]], np.float32)}]  # too short


def test_windows_at_episode_boundaries() -> None:
    trajs = two_short_trajs()
    norm = Normalizer.from_trajectories(trajs)
    ds = WindowDataset(trajs, norm, horizon_steps=2, cond_steps=2)
    assert len(ds) == 5 and ds.obs.shape == (5, 2, 1) and ds.actions.shape == (5, 2, 1)
    obs = norm.unnormalize_obs(ds.obs)[..., 0]
    act = norm.unnormalize_action(ds.actions)[..., 0]
    expected_obs = [[0, 0], [0, 1], [100, 100], [100, 101], [101, 102]]  # first obs repeated
    expected_act = [[10, 11], [11, 12], [110, 111], [111, 112], [112, 113]]
    torch.testing.assert_close(obs, torch.tensor(expected_obs, dtype=torch.float32), atol=1e-3, rtol=0)
    torch.testing.assert_close(act, torch.tensor(expected_act, dtype=torch.float32), atol=1e-3, rtol=0)
    # cond_steps=1, horizon 3: one window per trajectory of length >= 3 plus one more for the 4-step one
    ds1 = WindowDataset(trajs, norm, horizon_steps=3)
    assert ds1.obs.shape == (3, 1, 1)
    torch.testing.assert_close(norm.unnormalize_obs(ds1.obs)[:, 0, 0], torch.tensor([0.0, 100.0, 101.0]),
                               atol=1e-3, rtol=0)
    with pytest.raises(DatasetError, match="horizon_steps"):
        WindowDataset(trajs, norm, horizon_steps=5)


def test_no_window_crosses_trajectories() -> None:
    rng = np.random.default_rng(1)
    trajs = [{"obs": np.full((n, 3), i, np.float32), "actions": np.full((n, 2), i, np.float32) + rng.uniform(0, 0.1, (n, 2))}
             for i, n in enumerate((7, 4, 9, 5))]
    norm = Normalizer.from_trajectories(trajs)
    ds = WindowDataset(trajs, norm, horizon_steps=4, cond_steps=3)
    assert len(ds) == sum(n - 4 + 1 for n in (7, 4, 9, 5))
    traj_of_obs = norm.unnormalize_obs(ds.obs).round()  # each value is its trajectory index
    traj_of_act = norm.unnormalize_action(ds.actions).floor()
    first = traj_of_obs[:, :1, :1]
    assert (traj_of_obs == first).all() and (traj_of_act == first[:, :, :1]).all()


def test_iterate_permutes_and_batches() -> None:
    trajs = two_short_trajs()
    ds = WindowDataset(trajs, Normalizer.from_trajectories(trajs), horizon_steps=2)
    batches = list(ds.iterate(2, torch.Generator().manual_seed(0)))
    assert [b[0].shape[0] for b in batches] == [2, 2]  # 5 windows: partial last batch dropped
    seen = torch.cat([b[1][:, 0, 0] for b in batches])
    assert len(set(seen.tolist())) == 4  # no window repeated
    whole = list(ds.iterate(8, torch.Generator().manual_seed(0)))
    assert len(whole) == 1 and whole[0][0].shape == (5, 1, 1) and whole[0][1].shape == (5, 2, 1)
    assert sorted(whole[0][1][:, 0, 0].tolist()) == sorted(ds.actions[:, 0, 0].tolist())
    again = list(ds.iterate(2, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(ds.iterate(5, torch.Generator().manual_seed(1)))[0][1]
    assert not torch.equal(other, ds.iterate(5, torch.Generator().manual_seed(0)).__next__()[1])


def test_save_train_npz_leaves_no_part_file_when_the_write_fails(tmp_path, monkeypatch):
    """A full disk (or an interrupt) while writing: the error propagates, and neither the file nor a `.part` is left."""
    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    path = tmp_path / "train.npz"
    with pytest.raises(OSError):
        save_train_npz(str(path), [{"obs": np.zeros((3, 2), np.float32), "actions": np.zeros((3, 1), np.float32)}])
    assert list(tmp_path.iterdir()) == []
