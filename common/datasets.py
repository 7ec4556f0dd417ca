"""Demonstration datasets: loaders for every format the paper uses, min-max normalisation, windows.

Every loader returns a list of trajectories `{"obs": float32 (L, D_o), "actions": float32 (L, D_a)}`
(+ `"rewards"` (L,) when the file has them). Formats:
- `train.npz` of the reference implementation: `states`, `actions`, `traj_lengths` (+ `rewards`, `images`);
- D4RL v2 hdf5 (gym locomotion): flat arrays split at `terminals | timeouts`;
- robomimic hdf5: `data/demo_N/{actions, rewards, obs/<key>}`, `mask/<name>` demo lists;
- D3IL Avoid: real demos (`des_c_pos` npz, via `common.avoid`) or the built-in scripted demos shipped as
  `train.npz` files in `builtin-data/` (written by `scripts/generate_avoid_demos.py`).
`Normalizer`: per-dimension min-max to [-1, 1] (paper App. D.4); `WindowDataset`: the pre-training windows (paper App. D.1).
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ROBOT_KEYS = ["eef_pos", "eef_quat", "gripper_qpos"]  # 3 + 4 + 2 per arm
ROBOMIMIC_OBS_KEYS: dict[str, list[str]] = {
    "lift": [f"robot0_{k}" for k in ROBOT_KEYS] + ["object"],  # 9 + 10 = 19
    "can": [f"robot0_{k}" for k in ROBOT_KEYS] + ["object"],  # 9 + 14 = 23
    "square": [f"robot0_{k}" for k in ROBOT_KEYS] + ["object"],  # 9 + 14 = 23
    "transport": [f"robot{i}_{k}" for i in (0, 1) for k in ROBOT_KEYS] + ["object"],  # 18 + 41 = 59
}
AVOID_N_DEMOS = 96  # the size of the real D3IL Avoid dataset, and of each shipped built-in subset
# the built-in Avoid demos, one train.npz per subset (not importable by design: a `datasets/` folder at the
# repository root, which is on sys.path, would shadow the `datasets` package)
AVOID_DEMO_DIR = REPO_ROOT / "builtin-data"
Traj = dict[str, np.ndarray]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or has the wrong keys or dimensions."""


def _shape_error(path: str, key: str, found: tuple[int, ...], expected: str, fix: str) -> DatasetError:
    return DatasetError(f"{path}: '{key}' has shape {tuple(found)}, expected {expected}; {fix}")


def _require(path: str, keys: Any, key: str, what: str = "key") -> None:
    if key not in keys:
        raise DatasetError(f"{path}: missing {what} '{key}' (found: {', '.join(sorted(keys)) or 'none'}); "
                           "is this the right dataset file?")


def _check_2d(path: str, key: str, arr: np.ndarray, dim: int, rows: int | None = None) -> None:
    if arr.ndim != 2 or arr.shape[1] != dim or (rows is not None and arr.shape[0] != rows):
        expected = f"({rows if rows is not None else 'N'}, {dim})"
        raise _shape_error(path, key, arr.shape, expected, "use the dataset made for this task")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise DatasetError("reading .hdf5 datasets needs h5py; pip install h5py") from e
    return h5py


def load_train_npz(path: str, obs_dim: int, action_dim: int, with_images: bool = False) -> list[Traj]:
    """The reference `train.npz`; `with_images=True` also slices `images` (N, C, H, W) per trajectory."""
    with np.load(path, allow_pickle=False) as f:
        for key in ("states", "actions", "traj_lengths"):
            _require(path, f.files, key)
        states, actions = f["states"], f["actions"]
        lengths = f["traj_lengths"].astype(np.int64).reshape(-1)
        n = int(lengths.sum())
        _check_2d(path, "states", states, obs_dim, n)
        _check_2d(path, "actions", actions, action_dim, n)
        extra = {k: f[k] for k in ("rewards",) + (("images",) if with_images else ()) if k in f.files}
    for k, v in extra.items():
        if v.shape[0] != n:
            raise _shape_error(path, k, v.shape, f"({n}, ...) = sum(traj_lengths) rows", "regenerate the file")
    trajs = []
    for start, length in zip(np.cumsum(lengths) - lengths, lengths):
        sl = slice(int(start), int(start + length))
        traj = {"obs": states[sl].astype(np.float32), "actions": actions[sl].astype(np.float32)}
        if "rewards" in extra:
            traj["rewards"] = extra["rewards"][sl].reshape(-1).astype(np.float32)
        if "images" in extra:
            traj["images"] = extra["images"][sl]
        trajs.append(traj)
    return trajs


def save_train_npz(path: str, trajs: list[Traj], compressed: bool = False) -> None:
    """Write trajectories in the reference `train.npz` format (atomically: `.part` then rename)."""
    data = {
        "states": np.concatenate([t["obs"] for t in trajs]).astype(np.float32),
        "actions": np.concatenate([t["actions"] for t in trajs]).astype(np.float32),
        "traj_lengths": np.array([len(t["actions"]) for t in trajs], dtype=np.int64),
    }
    for key in ("rewards", "images"):
        if trajs and all(key in t for t in trajs):
            data[key] = np.concatenate([t[key] for t in trajs])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".part", "wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **data)
    os.replace(path + ".part", path)


def load_d4rl_hdf5(path: str, obs_dim: int, action_dim: int, positive_return_only: bool = True) -> list[Traj]:
    """Flat D4RL v2 hdf5 split at `terminals | timeouts` (the done step stays in its trajectory)."""
    with _h5py().File(path, "r") as f:
        for key in ("observations", "actions", "rewards", "terminals"):
            _require(path, f.keys(), key)
        obs, actions = f["observations"][()], f["actions"][()]
        rewards = f["rewards"][()].reshape(-1)
        done = f["terminals"][()].reshape(-1).astype(bool)
        if "timeouts" in f:
            done |= f["timeouts"][()].reshape(-1).astype(bool)
    n = obs.shape[0]
    _check_2d(path, "observations", obs, obs_dim)
    _check_2d(path, "actions", actions, action_dim, n)
    for key, arr in (("rewards", rewards), ("terminals", done)):
        if arr.shape[0] != n:
            raise _shape_error(path, key, arr.shape, f"({n},)", "the file is corrupt; download it again")
    ends = np.flatnonzero(done) + 1
    bounds = zip(np.concatenate([[0], ends]), np.concatenate([ends, [n]]))
    trajs = []
    for a, b in bounds:
        if b > a and (not positive_return_only or rewards[a:b].sum() > 0):  # paper: positive return only
            trajs.append({"obs": obs[a:b].astype(np.float32), "actions": actions[a:b].astype(np.float32),
                          "rewards": rewards[a:b].astype(np.float32)})
    return trajs


def load_robomimic_hdf5(path: str, obs_keys: list[str], action_dim: int, filter_key: str | None = None,
                        max_demos: int | None = None) -> list[Traj]:
    """robomimic hdf5: obs = concat(obs/<key> for key in obs_keys); demos in order of their index N."""
    with _h5py().File(path, "r") as f:
        _require(path, f.keys(), "data", "group")
        if filter_key is None:
            names = [k for k in f["data"].keys() if k.startswith("demo_")]
        else:
            _require(path, f["mask"].keys() if "mask" in f else [], filter_key, "mask")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]]
        names = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))[:max_demos]
        trajs = []
        for name in names:
            _require(path, f["data"].keys(), name, "demo")
            demo = f["data"][name]
            _require(f"{path}:data/{name}", demo.keys(), "actions")
            _require(f"{path}:data/{name}", demo.keys(), "obs", "group")
            actions = demo["actions"][()]
            _check_2d(path, f"data/{name}/actions", actions, action_dim)
            parts = []
            for key in obs_keys:
                _require(f"{path}:data/{name}/obs", demo["obs"].keys(), key)
                part = demo["obs"][key][()]
                part = part.reshape(part.shape[0], -1)
                if part.shape[0] != actions.shape[0]:
                    raise _shape_error(path, f"data/{name}/obs/{key}", part.shape, f"({actions.shape[0]}, ...)",
                                       "every obs key needs one row per action")
                parts.append(part)
            traj = {"obs": np.concatenate(parts, axis=1).astype(np.float32), "actions": actions.astype(np.float32)}
            if "rewards" in demo:
                traj["rewards"] = demo["rewards"][()].reshape(-1).astype(np.float32)
            trajs.append(traj)
    return trajs


def download(url: str, dest: str) -> None:
    """Fetch `url` to `dest` with a progress line; a failure leaves no file and no new folder behind."""
    part = dest + ".part"
    folder = os.path.dirname(os.path.abspath(dest))
    created = []  # the folders this call makes, removed again if the download fails
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(created):
        os.mkdir(folder)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                size = f"/{total / 1e6:.1f}" if total else ""
                print(f"\rdownloading {url}: {done / 1e6:.1f}{size} MB", end="", file=sys.stderr, flush=True)
            if total and done != total:
                raise OSError(f"got {done} of {total} bytes")
        print(file=sys.stderr)
        os.replace(part, dest)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        reason = getattr(e, "reason", None) or e
        if os.path.exists(part):
            os.remove(part)
        for folder in created:  # deepest first
            if not os.listdir(folder):
                os.rmdir(folder)
        raise DatasetError(f"could not download {url} ({reason}); put the file at {dest} and run again") from e
    finally:  # also on KeyboardInterrupt
        if os.path.exists(part):
            os.remove(part)


def _is_url(data: str) -> bool:
    return data.startswith(("http://", "https://", "file://")) and " " not in data


def default_data_path(task: Any) -> str:
    """`<DPPO_DATA_DIR or repo/data>/<task.id>/<file name of task.data>` (`train.npz` when not a URL)."""
    root = os.environ.get("DPPO_DATA_DIR") or str(REPO_ROOT / "data")
    name = os.path.basename(urllib.parse.urlparse(task.data).path) if _is_url(task.data) else ""
    return os.path.join(root, task.id, name or "train.npz")


def avoid_demo_file(subset: str) -> str:
    """File name of an Avoid subset's built-in demos in `AVOID_DEMO_DIR`: `avoid-m1.npz`, ..."""
    return f"avoid-{subset.lower()}.npz"


def load_task_trajectories(task: Any, path: str | None = None, n_demos: int | None = None) -> list[Traj]:
    """Load (downloading if needed) the task's demonstrations and check them against the task's dims.

    `n_demos` is only used for the built-in Avoid demos: the first `n_demos` of the shipped file
    (None: all of them, `AVOID_N_DEMOS`).
    """
    if path is None and task.suite == "avoid":
        path = str(AVOID_DEMO_DIR / avoid_demo_file(task.option("subset")))
        if not os.path.exists(path):
            raise DatasetError(f"the built-in Avoid demos {path} are missing; restore them from git or "
                               "run python scripts/generate_avoid_demos.py")
        trajs = load_train_npz(path, task.obs_dim, task.action_dim)
        if n_demos is not None and n_demos > len(trajs):
            raise DatasetError(f"{path} has {len(trajs)} demos, not {n_demos}; write more with "
                               f"python scripts/generate_avoid_demos.py --n-demos {n_demos} --out-dir DIR "
                               "and pass DIR/<file> as the dataset")
        trajs = trajs[:n_demos]
    else:
        if path is None:
            path = default_data_path(task)
            if not os.path.exists(path):
                if not _is_url(task.data):
                    raise DatasetError(f"no dataset for task {task.id!r} at {path}; get it from {task.data} "
                                       "and put it there (or pass the path)")
                download(task.data, path)
        if not os.path.exists(path):
            raise DatasetError(f"dataset file {path} does not exist; check the path")
        trajs = _load_file(task, path)
    if not trajs:
        raise DatasetError(f"{path}: no trajectories for task {task.id!r}; check the file and its filters")
    for i, t in enumerate(trajs):
        for key, dim in (("obs", task.obs_dim), ("actions", task.action_dim)):
            arr = t[key]
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise _shape_error(path, f"{key}[{i}]", arr.shape, f"({len(arr)}, {dim}) for task {task.id!r}",
                                   "is this the dataset of another task?")
    return trajs


def _load_file(task: Any, path: str) -> list[Traj]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
        if {"traj_lengths", "states"} <= keys:
            return load_train_npz(path, task.obs_dim, task.action_dim)
        if "des_c_pos" in keys:
            from common.avoid import load_avoid_demos

            return load_avoid_demos(path, task.option("subset"))
        raise DatasetError(f"{path}: unknown .npz layout (keys: {', '.join(sorted(keys))}); expected "
                           "'states', 'actions', 'traj_lengths' (train.npz) or D3IL Avoid 'des_c_pos'")
    if path.endswith((".hdf5", ".h5")):
        with _h5py().File(path, "r") as f:
            is_robomimic = "data" in f
        if not is_robomimic:
            return load_d4rl_hdf5(path, task.obs_dim, task.action_dim)
        if task.id not in ROBOMIMIC_OBS_KEYS:
            raise DatasetError(f"{path} is a robomimic dataset but task {task.id!r} is not a robomimic task")
        return load_robomimic_hdf5(path, ROBOMIMIC_OBS_KEYS[task.id], task.action_dim)
    raise DatasetError(f"{path}: unknown dataset format; expected .npz, .hdf5 or .h5")


class Normalizer:
    """Per-dimension min-max to [-1, 1] (paper App. D.4): 2·(x−min)/(max−min+1e-6) − 1, and its exact inverse."""

    KEYS = ("obs_min", "obs_max", "action_min", "action_max")

    def __init__(self, obs_min: Any, obs_max: Any, action_min: Any, action_max: Any) -> None:
        stats = (obs_min, obs_max, action_min, action_max)
        self.obs_min, self.obs_max, self.action_min, self.action_max = (
            torch.as_tensor(v, dtype=torch.float32).detach().clone() for v in stats)
        self._np = {k: getattr(self, k).detach().cpu().numpy() for k in self.KEYS}

    @classmethod
    def from_trajectories(cls, trajs: list[Traj]) -> Normalizer:
        obs = np.concatenate([t["obs"] for t in trajs])
        act = np.concatenate([t["actions"] for t in trajs])
        return cls(obs.min(0), obs.max(0), act.min(0), act.max(0))

    @classmethod
    def from_npz(cls, path: str) -> Normalizer:
        """The reference `normalization.npz` (obs_min, obs_max, action_min, action_max)."""
        with np.load(path, allow_pickle=False) as f:
            for key in cls.KEYS:
                _require(path, f.files, key)
            return cls(*(f[k] for k in cls.KEYS))

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Normalizer:
        return cls(*(d[k] for k in cls.KEYS))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().clone() for k in self.KEYS}

    def to(self, device: str | torch.device) -> Normalizer:
        for k in self.KEYS:
            setattr(self, k, getattr(self, k).to(device))
        return self

    def _apply(self, x: ArrayT, lo_key: str, hi_key: str, inverse: bool) -> ArrayT:
        if isinstance(x, torch.Tensor):
            lo = getattr(self, lo_key).to(x.device, x.dtype)
            hi = getattr(self, hi_key).to(x.device, x.dtype)
        else:
            x = np.asarray(x)
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
            lo, hi = self._np[lo_key].astype(dtype), self._np[hi_key].astype(dtype)
        scale = hi - lo + 1e-6
        return (x + 1) / 2 * scale + lo if inverse else 2 * (x - lo) / scale - 1

    def normalize_obs(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "obs_min", "obs_max", inverse=False)

    def unnormalize_obs(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "obs_min", "obs_max", inverse=True)

    def normalize_action(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "action_min", "action_max", inverse=False)

    def unnormalize_action(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "action_min", "action_max", inverse=True)


class WindowDataset:
    """Every T_a-action window inside one trajectory with the T_o most recent observations (paper App. D.1).

    Window s of a trajectory of length L (s = 0..L−T_a): actions[s : s+T_a] and obs[s−T_o+1 .. s], the
    first observation repeated before the episode start. All windows are built once, normalised, on device.
    """

    def __init__(self, trajs: list[Traj], normalizer: Normalizer, horizon_steps: int, cond_steps: int = 1,
                 device: str | torch.device = "cpu") -> None:
        obs = np.concatenate([t["obs"] for t in trajs]).astype(np.float32)
        act = np.concatenate([t["actions"] for t in trajs]).astype(np.float32)
        obs_idx, act_idx, offset = [], [], 0
        for t in trajs:
            length = len(t["actions"])
            starts = np.arange(max(length - horizon_steps + 1, 0))[:, None]
            act_idx.append(offset + starts + np.arange(horizon_steps))
            obs_idx.append(offset + np.maximum(starts + np.arange(1 - cond_steps, 1), 0))
            offset += length
        n = sum(len(i) for i in act_idx)
        if n == 0:
            raise DatasetError(f"no trajectory has {horizon_steps} actions (horizon_steps); lower horizon_steps")
        self.device = torch.device(device)
        self.obs = torch.from_numpy(normalizer.normalize_obs(obs)[np.concatenate(obs_idx)]).to(self.device)
        self.actions = torch.from_numpy(normalizer.normalize_action(act)[np.concatenate(act_idx)]).to(self.device)

    def __len__(self) -> int:
        return self.obs.shape[0]

    def iterate(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (obs (B, T_o, D_o), actions (B, T_a, D_a)); a partial last batch is dropped."""
        n = len(self)
        perm = torch.randperm(n, generator=generator, device=generator.device).to(self.device)
        if n < batch_size:
            yield self.obs[perm], self.actions[perm]
            return
        for i in range(n // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yield self.obs[idx], self.actions[idx]
