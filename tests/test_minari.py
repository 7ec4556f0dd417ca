"""Minari datasets (`--dataset minari:<id>`): written with Minari's own writer in a temporary MINARI_DATASETS_PATH, read
through `load_task_dataset`, and compared with the same episodes passed through the D4RL hdf5 path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from common.errors import DatasetError
from common.tasks import get_task
from loaders.datasets import WindowDataset, load_task_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def minari_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MINARI_DATASETS_PATH; nothing reaches the network (DPPO_OFFLINE)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    return tmp_path / "minari"


def hopper_episodes(n_steps: tuple[int, ...] = (12, 30, 9, 30)) -> list[dict[str, np.ndarray]]:
    """Random-action Hopper-v5 episodes of at most `n_steps[i]` steps (some end by falling); episode 2's rewards are
    shifted below zero, so the positive-return filter has something to drop."""
    env = gym.make("Hopper-v5")
    env.action_space.seed(0)
    episodes = []
    for i, cap in enumerate(n_steps):
        obs, _ = env.reset(seed=i)
        ep: dict[str, list] = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        for k in range(cap):
            action = env.action_space.sample()
            obs, reward, term, trunc, _ = env.step(action)
            for key, v in zip(ep, (obs, action, reward, term, trunc or k == cap - 1)):
                ep[key].append(v)
            if term:
                break
        episodes.append({k: np.array(v) for k, v in ep.items()})
    env.close()
    episodes[2]["rewards"] = episodes[2]["rewards"] - 10.0
    return episodes


def write_minari(dataset_id: str, episodes: list[dict[str, np.ndarray]], env_id: str) -> None:
    """Minari's own writer (`create_dataset_from_buffers`; `DataCollector` would need jax, `minari[create]`)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(episodes)]
    with pytest.warns(UserWarning):  # Minari asks for author, e-mail, code link and description
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, algorithm_name="random")


def write_d4rl_from(path: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    """The same episodes as one flat D4RL v2 file (observation i with action i; the final observation is not stored)."""
    steps = [len(ep["actions"]) for ep in episodes]
    with h5py.File(path, "w") as f:
        f["observations"] = np.concatenate([ep["observations"][:-1] for ep in episodes])
        f["actions"] = np.concatenate([ep["actions"] for ep in episodes])
        f["rewards"] = np.concatenate([ep["rewards"] for ep in episodes])
        f["terminals"] = np.concatenate([ep["terminations"] for ep in episodes])
        f["timeouts"] = np.concatenate([ep["truncations"] for ep in episodes])
    assert sum(steps) == len(h5py.File(path, "r")["actions"])


def test_minari_matches_the_d4rl_path(minari_path: Path, tmp_path: Path) -> None:
    episodes = hopper_episodes()
    write_minari("test/hopper/tiny-v0", episodes, "Hopper-v5")
    write_d4rl_from(tmp_path / "same.hdf5", episodes)
    task = get_task("hopper")
    trajs, norm = load_task_dataset(task, "minari:test/hopper/tiny-v0")
    d4rl_trajs, d4rl_norm = load_task_dataset(task, str(tmp_path / "same.hdf5"))

    kept = [i for i, ep in enumerate(episodes) if ep["rewards"].sum() > 0]
    assert kept == [0, 1, 3] and len(trajs) == len(d4rl_trajs) == 3  # episode 2 (negative return) dropped by both
    for t, i in zip(trajs, kept):  # observation s_k goes with action a_k: the episode's final observation is left out
        L = len(episodes[i]["actions"])
        assert t["obs"].shape == (L, 11) and t["obs"].dtype == np.float32
        np.testing.assert_array_equal(t["obs"], episodes[i]["observations"][:L].astype(np.float32))
        np.testing.assert_array_equal(t["actions"], episodes[i]["actions"].astype(np.float32))
    for a, b in zip(trajs, d4rl_trajs):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for k, v in norm.state_dict().items():
        assert torch.equal(v, d4rl_norm.state_dict()[k])
    for horizon, cond in ((4, 1), (4, 2)):
        w, w_d4rl = WindowDataset(trajs, norm, horizon, cond), WindowDataset(d4rl_trajs, d4rl_norm, horizon, cond)
        assert len(w) == sum(len(t["actions"]) - horizon + 1 for t in trajs)
        assert torch.equal(w.obs, w_d4rl.obs) and torch.equal(w.actions, w_d4rl.actions)
        assert w.actions.abs().max() <= 1 and w.obs.abs().max() <= 1


def test_minari_of_another_task_is_refused_in_one_line(minari_path: Path) -> None:
    rng = np.random.default_rng(0)
    walker = [{"observations": rng.normal(size=(6, 17)), "actions": rng.uniform(-1, 1, (5, 6)).astype(np.float32),
               "rewards": np.ones(5), "terminations": np.zeros(5, bool), "truncations": np.eye(5, dtype=bool)[-1]}]
    write_minari("test/walker2d/tiny-v0", walker, "Walker2d-v5")
    with pytest.raises(DatasetError) as e:  # sizes differ
        load_task_dataset(get_task("hopper"), "minari:test/walker2d/tiny-v0")
    assert "Box(17,)" in str(e.value) and "Box(11,)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="recorded in Walker2d-v5, not in the task's HalfCheetah-v5"):  # sizes agree
        load_task_dataset(get_task("halfcheetah"), "minari:test/walker2d/tiny-v0")
    trajs, _ = load_task_dataset(get_task("walker2d"), "minari:test/walker2d/tiny-v0")
    assert len(trajs) == 1 and trajs[0]["obs"].shape == (5, 17)


def test_missing_minari_dataset_says_how_to_get_it(minari_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import minari

    with pytest.raises(DatasetError) as e:  # offline: not even tried
        load_task_dataset(get_task("hopper"), "minari:mujoco/hopper/medium-v0")
    msg = str(e.value)
    assert "minari download mujoco/hopper/medium-v0" in msg and "MINARI_DATASETS_PATH" in msg and "\n" not in msg
    assert str(minari_path / "mujoco" / "hopper" / "medium-v0") in msg and not (minari_path / "mujoco").exists()

    def failing_download(dataset_id: str) -> None:  # a download cut off after it created the dataset's folder
        os.makedirs(minari_path / dataset_id / "data")
        raise ConnectionError("no route to host")

    monkeypatch.delenv("DPPO_OFFLINE")
    monkeypatch.setattr(minari, "download_dataset", failing_download)
    with pytest.raises(DatasetError, match=r"download failed \(no route to host\).*minari download"):
        load_task_dataset(get_task("hopper"), "minari:mujoco/hopper/medium-v0")
    assert not (minari_path / "mujoco" / "hopper" / "medium-v0").exists()
    with pytest.raises(DatasetError, match="give a Minari dataset id"):
        load_task_dataset(get_task("hopper"), "minari:")


def test_minari_is_imported_lazily_and_its_absence_is_one_line(minari_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    code = "import sys, loaders.datasets, dppo_pretrain; print('minari' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    monkeypatch.setitem(sys.modules, "minari", None)  # as if it were not installed
    with pytest.raises(DatasetError, match=r"needs minari; pip install minari==0\.5\.4"):
        load_task_dataset(get_task("hopper"), "minari:mujoco/hopper/medium-v0")


def test_pretrain_on_a_minari_dataset(minari_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dppo_pretrain as pt

    episodes = hopper_episodes()
    write_minari("test/hopper/tiny-v0", episodes, "Hopper-v5")
    monkeypatch.chdir(tmp_path)
    out = pt.main(pt.Args(env_id="hopper", dataset="minari:test/hopper/tiny-v0", n_epochs=2, batch_size=16,
                          mlp_dims=(32, 32), eval_every=0, seed=0))
    assert len(out["losses"]) == 2 and np.isfinite(out["losses"]).all()
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    obs = np.concatenate([ep["observations"][:-1] for i, ep in enumerate(episodes) if i != 2]).astype(np.float32)
    assert ckpt["args"]["dataset"] == "minari:test/hopper/tiny-v0"
    np.testing.assert_array_equal(ckpt["normalization"]["obs_min"].numpy(), obs.min(0))
