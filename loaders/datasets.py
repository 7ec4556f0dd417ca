"""Demonstration datasets: loaders for every format the paper uses, their normalisation, windows.

Every loader returns a list of trajectories `{"obs": float32 (L, D_o), "actions": float32 (L, D_a)}`
(+ `"rewards"` (L,) when the file has them). Formats:
- `train.npz` of the reference implementation: `states`, `actions`, `traj_lengths` (+ `rewards`, `images`);
- D4RL v2 hdf5 (gym locomotion): flat arrays split at `terminals | timeouts`;
- Minari datasets (gym locomotion, Franka Kitchen, `minari:<dataset id>`): episodes read with Minari's own reader
  (imported lazily); the kitchen's dict observations flattened to D4RL's 60 (`sims.kitchen.flat_obs`);
- robomimic hdf5: `data/demo_N/{actions, rewards, obs/<key>}`, `mask/<name>` demo lists;
- D3IL Avoid: real demos (`des_c_pos` npz, via `sims.avoid`) or the built-in scripted demos shipped as
  `train.npz` files in `builtin-data/` (written by `scripts/generate_avoid_demos.py`).
`load_task_dataset` also returns the `common.normalizer.Normalizer` to train with (paper App. D.4): the reference's
statistics beside its normalised `train.npz`, else the data's min/max; a paper dataset without its statistics, or data
that is normalised already (`looks_normalised`) with none beside it, is refused, never normalised twice; with
`max_n_episodes` it keeps the first N trajectories only (`first_episodes`: the reference's cut). `WindowDataset`:
the pre-training windows (paper App. D.1). Opening, format checks and downloads: `loaders/files.py`.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from common.errors import DatasetError, UsageError
from common.normalizer import Normalizer
from loaders.files import REPO_ROOT, download, npz_array, one_line, open_hdf5, open_npz, read_normalization, require_key

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


def _shape_error(path: str, key: str, found: tuple[int, ...], expected: str, fix: str) -> DatasetError:
    return DatasetError(f"{path}: '{key}' has shape {tuple(found)}, expected {expected}; {fix}")


def _check_2d(path: str, key: str, arr: np.ndarray, dim: int, rows: int | None = None) -> None:
    if arr.ndim != 2 or arr.shape[1] != dim or (rows is not None and arr.shape[0] != rows):
        expected = f"({rows if rows is not None else 'N'}, {dim})"
        raise _shape_error(path, key, arr.shape, expected, "use the dataset made for this task")


def _check_lengths(path: str, key: str, lengths: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
    """`lengths` as int64 after checking it: whole numbers > 0 that sum to the row count of every array in `rows`."""
    lengths = lengths.reshape(-1)
    if lengths.size == 0:
        raise DatasetError(f"{path}: '{key}' is empty, so the file holds no trajectories; write at least one")
    if lengths.dtype.kind == "f":
        whole = np.isfinite(lengths) & (lengths == np.round(lengths))
        if not whole.all():
            i = int(np.argmin(whole))
            raise DatasetError(f"{path}: '{key}'[{i}] = {lengths[i]} is not a whole number; trajectory lengths "
                               "count rows: save them as integers")
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"{path}: '{key}'[{i}] = {lengths[i]:g}, but every trajectory needs at least one row "
                           f"({bad.size} of {lengths.size} entries are <= 0); drop the empty trajectories and "
                           "write the file again")
    lengths = lengths.astype(np.int64)
    n = int(lengths.sum())
    (first, a), *others = rows.items()
    for other, b in others:
        if b.ndim and a.ndim and b.shape[0] != a.shape[0]:
            raise DatasetError(f"{path}: '{first}' has {a.shape[0]} rows but '{other}' has {b.shape[0]}; "
                               "they need one row per step each: write the file again")
    if a.ndim and a.shape[0] != n:
        raise DatasetError(f"{path}: '{key}' sums to {n} rows but '{first}' has {a.shape[0]}; "
                           f"'{key}' must split the rows exactly: write the file again")
    return lengths


def load_train_npz(path: str, obs_dim: int, action_dim: int, with_images: bool = False) -> list[Traj]:
    """The reference `train.npz`; `with_images=True` also slices `images` (N, C, H, W) per trajectory."""
    with open_npz(path) as f:
        for key in ("states", "actions", "traj_lengths"):
            require_key(path, f.files, key)
        states, actions = npz_array(path, f, "states"), npz_array(path, f, "actions")
        raw_lengths = npz_array(path, f, "traj_lengths")
        extra = {k: npz_array(path, f, k) for k in ("rewards",) + (("images",) if with_images else ()) if k in f.files}
    lengths = _check_lengths(path, "traj_lengths", raw_lengths, {"states": states, "actions": actions})
    n = int(lengths.sum())
    _check_2d(path, "states", states, obs_dim, n)
    _check_2d(path, "actions", actions, action_dim, n)
    for k, v in extra.items():
        if v.ndim == 0 or v.shape[0] != n:
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
    try:
        with open(path + ".part", "wb") as fh:
            (np.savez_compressed if compressed else np.savez)(fh, **data)
        os.replace(path + ".part", path)
    except BaseException:  # a full disk or an interrupt: no half-written file is left beside the data
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
        raise


def load_d4rl_hdf5(path: str, obs_dim: int, action_dim: int, positive_return_only: bool = True) -> list[Traj]:
    """Flat D4RL v2 hdf5 split at `terminals | timeouts` (the done step stays in its trajectory)."""
    with open_hdf5(path) as f:
        for key in ("observations", "actions", "rewards", "terminals"):
            require_key(path, f.keys(), key)
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


MINARI_PREFIX = "minari:"  # --dataset minari:<dataset id>, e.g. minari:mujoco/hopper/medium-v0
MINARI_REQUIREMENT = "minari==0.5.4"


def minari_root() -> str:
    """Where Minari keeps its datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets (Minari's own rule)."""
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")


def _minari_missing(dataset_id: str, why: str) -> DatasetError:
    where = os.path.join(minari_root(), dataset_id)
    return DatasetError(f"Minari dataset {dataset_id!r} is not at {where} and {why}; get it where there is internet with "
                        f"pip install 'minari[hf]' && minari download {dataset_id}, then copy the folder there "
                        "(or point MINARI_DATASETS_PATH at the folder that holds it)")


def _minari_download(minari: Any, dataset_id: str) -> None:
    """Minari's own client (hf://farama-minari, or $MINARI_REMOTE); a failed download leaves no new folder."""
    if os.environ.get("DPPO_OFFLINE"):
        raise _minari_missing(dataset_id, "DPPO_OFFLINE is set, so it is not downloaded")
    folder = os.path.join(minari_root(), dataset_id)
    existed = os.path.exists(folder)
    try:
        minari.download_dataset(dataset_id)
    except BaseException as e:
        if not existed and os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        raise _minari_missing(dataset_id, f"its download failed ({one_line(e)})") from e


# the Minari datasets of the gym tasks: the medium datasets of Minari's `mujoco` namespace (D4RL's successors,
# https://minari.farama.org/datasets/mujoco/), by the env name of the task
MINARI_DATASETS = {"Hopper": "mujoco/hopper/medium-v0", "Walker2d": "mujoco/walker2d/medium-v0",
                   "HalfCheetah": "mujoco/halfcheetah/medium-v0"}


def minari_fix(env_name: str | None) -> str:
    """What to use instead of a Minari dataset that does not fit the task simulating `env_name`: the task's Minari
    dataset where Minari has one (gym locomotion), else the task's own demonstrations."""
    base = (env_name or "").split("-v")[0]
    if base in MINARI_DATASETS:
        return f"use the dataset of this task (e.g. {MINARI_PREFIX}{MINARI_DATASETS[base]})"
    if base == "FrankaKitchen":
        return "use minari:D4RL/kitchen/<complete|partial|mixed>-v2 with the kitchen task of the same name"
    if base == "avoid":
        return ("Minari has no D3IL Avoid dataset: leave --dataset out for the built-in demos (builtin-data/, written "
                "by python scripts/generate_avoid_demos.py) or pass the real D3IL demos")
    if env_name is None:
        return "use the dataset of this task"
    return f"Minari has no dataset of {env_name}: leave --dataset out for the task's own (README \"Tasks\")"


def _space(space: Any) -> str:
    """`Box(11,)`-like text of a gymnasium space for messages."""
    shape = getattr(space, "shape", None)
    return f"{type(space).__name__}{tuple(shape) if shape is not None else ''}"


def load_minari(dataset_id: str, obs_dim: int, action_dim: int, env_name: str | None = None,
                positive_return_only: bool = True, kitchen: Any = None) -> list[Traj]:
    """A Minari dataset (the maintained successor of D4RL; e.g. `mujoco/hopper/medium-v0`), downloaded with Minari's own
    client when it is not under `minari_root()`.

    A Minari episode holds L actions, rewards and L + 1 observations (the last one after the final step); the first L
    pair with the actions, as in D4RL's flat arrays. Its observation and action spaces must be flat Boxes of the task's
    sizes, and the env it was recorded in (its EnvSpec) must be the task's (`env_name`; another version is accepted with
    a note). As for D4RL, only episodes with positive total reward are kept (irom-princeton/dppo,
    script/dataset/get_d4rl_dataset.py), so both sources go through the same filter. `kitchen`: the kitchen task whose
    Minari dataset (FrankaKitchen-v1's dict observations, for its subtasks) is flattened to D4RL's 60 (`sims/kitchen.py`)."""
    name = f"{MINARI_PREFIX}{dataset_id}"
    if not dataset_id.strip():
        raise DatasetError(f"--dataset {name}: give a Minari dataset id after '{MINARI_PREFIX}', "
                           f"e.g. {MINARI_PREFIX}mujoco/hopper/medium-v0")
    try:
        import minari
    except ImportError as e:
        raise DatasetError(f"reading Minari datasets needs minari; pip install {MINARI_REQUIREMENT}") from e
    if not os.path.isdir(os.path.join(minari_root(), dataset_id, "data")):
        _minari_download(minari, dataset_id)
    try:
        dataset = minari.load_dataset(dataset_id)
        obs_space, act_space, spec = dataset.observation_space, dataset.action_space, dataset.env_spec
    except ImportError as e:  # e.g. a dataset stored as arrow needs pyarrow
        raise DatasetError(f"{name} needs {e.name or 'a package'} to be read ({one_line(e)}); "
                           "pip install 'minari[arrow]' for arrow datasets") from e
    except Exception as e:  # noqa: BLE001 - any unreadable dataset gets the same one-line answer
        raise DatasetError(f"{name}: not a readable Minari dataset ({one_line(e)}); download it again") from e
    fix, flatten = minari_fix(env_name), np.asarray
    if kitchen is not None and type(obs_space).__name__ == "Dict":  # FrankaKitchen-v1's dict -> D4RL's flat 60
        from sims.kitchen import check_dataset_space, flat_obs

        check_dataset_space(name, obs_space, kitchen)
        flatten, obs_space = flat_obs, type(act_space)(-np.inf, np.inf, (obs_dim,))
    if env_name is not None:
        import gymnasium

        _, env, version = gymnasium.envs.registration.parse_env_id(env_name)
    wanted = (obs_dim,), (action_dim,)
    found = getattr(obs_space, "shape", None), getattr(act_space, "shape", None)
    if found != wanted or type(obs_space).__name__ != "Box" or type(act_space).__name__ != "Box":
        raise DatasetError(f"{name} has observations {_space(obs_space)} and actions {_space(act_space)}, the task needs "
                           f"Box{wanted[0]} and Box{wanted[1]}; {fix}")
    if spec is not None and env_name is not None:
        if spec.name != env:
            raise DatasetError(f"{name} was recorded in {spec.id}, not in the task's {env_name}; {fix}")
        if spec.version != version:
            print(f"note: {name} was recorded in {spec.id}; the task simulates {env_name}")
    trajs = []
    try:
        for i, episode in enumerate(dataset.iterate_episodes()):
            obs, actions = flatten(episode.observations), np.asarray(episode.actions)
            rewards = np.asarray(episode.rewards).reshape(-1)
            n = actions.shape[0]
            _check_2d(name, f"episode {i} observations", obs, obs_dim, n + 1)
            _check_2d(name, f"episode {i} actions", actions, action_dim)
            if rewards.shape[0] != n:
                raise _shape_error(name, f"episode {i} rewards", rewards.shape, f"({n},)", "download the dataset again")
            if n and (not positive_return_only or rewards.sum() > 0):  # paper: positive return only
                trajs.append({"obs": obs[:n].astype(np.float32), "actions": actions.astype(np.float32),
                              "rewards": rewards.astype(np.float32)})
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{name}: corrupt Minari data ({one_line(e)}); download it again") from e
    return trajs


def load_robomimic_hdf5(path: str, obs_keys: list[str], action_dim: int, filter_key: str | None = None,
                        max_demos: int | None = None, image_keys: list[str] | None = None) -> list[Traj]:
    """robomimic hdf5: obs = concat(obs/<key> for key in obs_keys); demos in order of their index N.
    `image_keys`: also `images` = the cameras' HWC uint8 frames as (L, 3·cameras, H, W), in the keys' order."""
    with open_hdf5(path) as f:
        require_key(path, f.keys(), "data", "group")
        if filter_key is None:
            names = [k for k in f["data"].keys() if k.startswith("demo_") and k[5:].isdigit()]
        else:
            require_key(path, f["mask"].keys() if "mask" in f else [], filter_key, "mask")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]]
            for name in names:
                if not (name.startswith("demo_") and name[5:].isdigit()):
                    raise DatasetError(f"{path}: mask/{filter_key} lists {name!r}, not a demo_N name; "
                                       "is this a robomimic file?")
        names = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))[:max_demos]
        trajs = []
        for name in names:
            require_key(path, f["data"].keys(), name, "demo")
            demo = f["data"][name]
            require_key(f"{path}:data/{name}", demo.keys(), "actions")
            require_key(f"{path}:data/{name}", demo.keys(), "obs", "group")
            actions = demo["actions"][()]
            _check_2d(path, f"data/{name}/actions", actions, action_dim)
            parts = []
            for key in obs_keys:
                require_key(f"{path}:data/{name}/obs", demo["obs"].keys(), key)
                part = demo["obs"][key][()]
                part = part.reshape(part.shape[0], -1)
                if part.shape[0] != actions.shape[0]:
                    raise _shape_error(path, f"data/{name}/obs/{key}", part.shape, f"({actions.shape[0]}, ...)",
                                       "every obs key needs one row per action")
                parts.append(part)
            traj = {"obs": np.concatenate(parts, axis=1).astype(np.float32), "actions": actions.astype(np.float32)}
            if image_keys:
                frames = []
                for key in image_keys:
                    require_key(f"{path}:data/{name}/obs", demo["obs"].keys(), key, fix="is this an image dataset "
                             "(image_v141.hdf5, or scripts/robomimic_demos.py --images)?")
                    img = demo["obs"][key][()]
                    if img.ndim != 4 or img.shape[-1] != 3 or img.dtype != np.uint8 or len(img) != len(actions):
                        raise _shape_error(path, f"data/{name}/obs/{key}", img.shape, f"({len(actions)}, H, W, 3) uint8",
                                           "is this an image dataset?")
                    frames.append(img.transpose(0, 3, 1, 2))
                traj["images"] = np.ascontiguousarray(np.concatenate(frames, axis=1))
            if "rewards" in demo:
                traj["rewards"] = demo["rewards"][()].reshape(-1).astype(np.float32)
            trajs.append(traj)
    return trajs


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
    (None: all of them, `AVOID_N_DEMOS`). Every file is checked to hold only finite numbers (a value beyond the
    float32 range becomes inf, which is reported, not warned about).
    """
    return _load_checked(task, path, n_demos)[1]


def load_task_dataset(task: Any, path: str | None = None, n_demos: int | None = None,
                      max_n_episodes: int | None = None) -> tuple[list[Traj], Normalizer]:
    """`load_task_trajectories` and the normalisation to pre-train with: the reference's `normalization.npz` when it
    sits beside a `train.npz` (the statistics the reference normalises that dataset with, so a policy trained here sees
    the observations a reference policy saw), else the min/max of the trajectories. `max_n_episodes`: only the first
    N trajectories are returned (`first_episodes`), normalised with the statistics of the whole dataset."""
    path, trajs = _load_checked(task, path, n_demos)
    folder = os.path.dirname(os.path.abspath(path))
    found = [os.path.join(folder, n) for n in ("normalization.npz", "normalization.pth")
             if os.path.exists(os.path.join(folder, n))]
    if os.path.basename(path) != "train.npz" or not found:
        normalizer = Normalizer.from_trajectories(trajs)
        _refuse_normalised(path, task, normalizer)
        return first_episodes(trajs, max_n_episodes, path), normalizer
    # The reference's layout (script/dataset/process_robomimic_dataset.py, get_d4rl_dataset.py, process_d3il_dataset.py):
    # train.npz holds states and actions already normalised, 2·(x − min)/(max − min + 1e-6) − 1, with normalization.npz;
    # furniture's with a LinearNormalizer normalization.pth, 2·(x − min)/(max − min) − 1
    # (env/gym_utils/furniture_normalizer.py).
    beside = found[0]
    eps = 0.0 if beside.endswith(".pth") else 1e-6
    normalizer = read_normalization(beside)
    dims = (normalizer.obs_min.numel(), normalizer.action_min.numel())
    if dims != (task.obs_dim, task.action_dim):
        raise DatasetError(f"{beside} normalises {dims[0]} observation and {dims[1]} action dimensions, {task.id} has "
                           f"{task.obs_dim} and {task.action_dim}: move it away from {path} or replace it")
    peak = max(float(np.abs(t[k]).max()) for t in trajs for k in ("obs", "actions"))
    if peak > (5.0 if eps == 0 else 1.5):  # furniture observations are clamped to ±5 after normalising
        raise DatasetError(f"{path} holds values up to {peak:.3g}, so it is not normalised with {beside} (the reference's "
                           f"layout: a train.npz beside its {os.path.basename(beside)} holds normalised data); move "
                           f"{os.path.basename(beside)} away to train on the raw values")
    stats = {k: v.astype(np.float64) for k, v in normalizer._np.items()}
    for t in trajs:  # back to env units with the exact inverse of that formula; WindowDataset normalises them again
        for key, lo, hi in (("obs", "obs_min", "obs_max"), ("actions", "action_min", "action_max")):
            scale = stats[hi] - stats[lo] + eps
            t[key] = ((t[key].astype(np.float64) + 1) / 2 * scale + stats[lo]).astype(np.float32)
    print(f"dataset in the reference's normalised layout; statistics: {beside}")
    return first_episodes(trajs, max_n_episodes, path), normalizer


def first_episodes(trajs: list[Traj], n: int | None, source: str) -> list[Traj]:
    """The first `n` trajectories as loaded, in the file's order (after the loaders' own filters: D4RL and Minari keep
    the positive-return episodes), None: all of them. The reference's `max_n_episodes`
    (irom-princeton/dppo, agent/dataset/sequence.py, `StitchedSequenceDataset`: `traj_lengths[:n]` and the rows they
    span, not a random sample), the paper's expert-data ablation (App. B.2, Fig. A5). The normalisation is left to the
    caller, which computes it on the whole dataset before this cut: the reference normalises with the
    `normalization.npz` its pre-processing scripts computed over the whole file, so every N of an ablation sees the
    same observation scale. More than `source` holds is refused, where the reference silently takes all: a run
    recorded as N episodes must have trained on N."""
    if n is None:
        return trajs
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # trajs[:-2] would silently drop the last two
        raise UsageError(f"--max-n-episodes must be a whole number > 0 (got {n!r})")
    if n > len(trajs):
        raise UsageError(f"--max-n-episodes {n}: {source} has {len(trajs)} episodes; pass at most {len(trajs)} "
                         "(or leave --max-n-episodes out for all of them)")
    if n < len(trajs):
        print(f"pre-training on the first {n} of the {len(trajs)} episodes of {source} (normalised as all {len(trajs)})")
    return trajs[:n]


NORMALISED_TOL = 1e-3


def looks_normalised(normalizer: Normalizer, tol: float = NORMALISED_TOL) -> bool:
    """Whether data with these per-dimension min/max was min-max normalised already (the reference's `train.npz`,
    2·(x − min)/(max − min + 1e-6) − 1): every observation and every action dimension has its minimum within `tol` of
    −1, and its maximum within `tol` of +1 or, for a dimension that was constant, of −1 too. (The 1e-6 puts a
    normalised maximum 2e-6/(max − min) below 1: within 1e-3 for any dimension that spans more than 0.002.) Raw
    observations do not (every position, velocity and quaternion dimension spanning exactly [−1, 1] at once), raw
    actions often do (clipped to ±1: robomimic, D4RL), so both must."""
    spans = []
    for lo, hi in ((normalizer.obs_min, normalizer.obs_max), (normalizer.action_min, normalizer.action_max)):
        lo, hi = lo.double(), hi.double()
        spans.append((hi - 1).abs() <= tol)
        if not bool((((lo + 1).abs() <= tol) & (spans[-1] | ((hi + 1).abs() <= tol))).all()):
            return False
    return bool(spans[0].any())  # (not when every observation is constant)


def _refuse_normalised(path: str, task: Any, normalizer: Normalizer) -> None:
    """DatasetError when the data to be normalised with its own min/max looks normalised already (`looks_normalised`):
    it would be trained on as if raw, and the policy would then read raw observations as normalised ones."""
    if looks_normalised(normalizer):
        name = "normalization.pth" if task.suite == "furniture" else "normalization.npz"
        raise DatasetError(f"{path}: every observation and action dimension spans exactly [-1, 1], so it holds data "
                           "normalised already (the reference's layout) and would be normalised twice; put the "
                           f"{name} it was normalised with beside it (the pair named train.npz and {name}; "
                           "--dataset paper fetches both)")


def _load_checked(task: Any, path: str | None, n_demos: int | None) -> tuple[str, list[Traj]]:
    with np.errstate(over="ignore"):
        path, trajs = _load_task_file(task, path, n_demos)
    if not trajs:
        raise DatasetError(f"{path}: no trajectories for task {task.id!r}; check the file and its filters")
    for i, t in enumerate(trajs):
        for key, dim in (("obs", task.obs_dim), ("actions", task.action_dim)):
            arr = t[key]
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise _shape_error(path, f"{key}[{i}]", arr.shape, f"({len(arr)}, {dim}) for task {task.id!r}",
                                   "is this the dataset of another task?")
    _check_finite(path, trajs)
    return path, trajs


def _load_task_file(task: Any, path: str | None, n_demos: int | None) -> tuple[str, list[Traj]]:
    """The file `load_task_trajectories` reads (downloaded if needed) and its trajectories, before the checks."""
    if path is None and task.data.startswith(MINARI_PREFIX):  # the task's own data is a Minari dataset (kitchen)
        path = task.data
    if path is not None and path.startswith(MINARI_PREFIX):  # a Minari dataset id, not a file
        return path, load_minari(path[len(MINARI_PREFIX):], task.obs_dim, task.action_dim, task.env_name,
                                 kitchen=task if task.suite == "kitchen" else None)
    if path == "paper":  # the reference implementation's own train.npz (+ normalization.npz), downloaded once
        from loaders.convert import paper_dataset

        path = paper_dataset(task)
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
            root = os.environ.get("DPPO_DATA_DIR")
            if root and os.path.exists(root) and not os.path.isdir(root):
                raise DatasetError(f"DPPO_DATA_DIR={root} is a file, not a folder; point DPPO_DATA_DIR at a folder "
                                   "(datasets go to <folder>/<task>/) or unset it")
            path = default_data_path(task)
            if not os.path.exists(path):
                if not _is_url(task.data):
                    from loaders.convert import DRIVE_FOLDER, PAPER_FILES

                    where = (f"--dataset paper downloads the reference's ({DRIVE_FOLDER.format(PAPER_FILES[task.id][0])})"
                             if task.id in PAPER_FILES else f"get it from {task.data}")
                    raise DatasetError(f"no dataset for task {task.id!r} at {path}; {where}, or put a train.npz there "
                                       "(or pass the path)")
                download(task.data, path)
        if not os.path.exists(path):
            raise DatasetError(f"dataset file {path} does not exist; check the path")
        trajs = _load_file(task, path)
    return path, trajs


def _check_finite(path: str, trajs: list[Traj]) -> None:
    """DatasetError naming the trajectory, row and column of the first NaN/inf in obs or actions (one pass each)."""
    for key in ("obs", "actions"):
        data = np.concatenate([t[key] for t in trajs])
        bad_rows = np.flatnonzero(~np.isfinite(data).all(axis=1))
        if bad_rows.size:
            row = int(bad_rows[0])
            ends = np.cumsum([len(t[key]) for t in trajs])
            i = int(np.searchsorted(ends, row, side="right"))
            col = int(np.flatnonzero(~np.isfinite(data[row]))[0])
            raise DatasetError(f"{path}: '{key}' of trajectory {i}, row {row - (ends[i] - len(trajs[i][key]))}, column "
                               f"{col} is {data[row, col]} ({bad_rows.size} of {len(data)} rows hold NaN or inf); training "
                               "on it gives a NaN model: remove or repair those rows (NaN, inf, or values too large for "
                               "float32) and run again")


def _load_file(task: Any, path: str) -> list[Traj]:
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a folder, not a dataset file; pass the file inside it")
    if path.endswith(".npz"):
        with open_npz(path) as f:
            keys = set(f.files)
        if {"traj_lengths", "states"} <= keys:
            if task.suite == "robomimic-img" and "images" not in keys:
                raise DatasetError(f"{path} has no 'images' (N, C, H, W); task {task.id!r} needs the pixel dataset")
            return load_train_npz(path, task.obs_dim, task.action_dim, with_images=task.suite == "robomimic-img")
        if "des_c_pos" in keys:
            _check_d3il_avoid(path)
            from sims.avoid import load_avoid_demos

            return load_avoid_demos(path, task.option("subset"))
        if any(k.endswith("data.pkl") for k in keys):  # torch.save's zip archive, renamed
            raise DatasetError(f"{path}: a PyTorch checkpoint (torch.save), not a dataset; give the train.npz (--dataset), "
                               "or pass this file as --checkpoint")
        raise DatasetError(f"{path}: unknown .npz layout (keys: {', '.join(sorted(keys))}); expected "
                           "'states', 'actions', 'traj_lengths' (train.npz) or D3IL Avoid 'des_c_pos'")
    if path.endswith((".hdf5", ".h5")):
        with open_hdf5(path) as f:
            is_robomimic, keys = "data" in f, set(f.keys())
        if not is_robomimic and "observations" not in keys:
            raise DatasetError(f"{path}: neither a robomimic file (group 'data') nor a D4RL file (key 'observations') "
                               f"(found: {', '.join(sorted(keys)) or 'none'}); is this the right dataset file?")
        if not is_robomimic:
            return load_d4rl_hdf5(path, task.obs_dim, task.action_dim)
        if task.suite == "robomimic-img":  # proprio + camera images (sims/robomimic.py)
            from sims.robomimic import image_keys, obs_keys
            return load_robomimic_hdf5(path, obs_keys(task), task.action_dim, image_keys=image_keys(task))
        if task.id not in ROBOMIMIC_OBS_KEYS:
            raise DatasetError(f"{path} is a robomimic dataset but task {task.id!r} is not a robomimic task")
        return load_robomimic_hdf5(path, ROBOMIMIC_OBS_KEYS[task.id], task.action_dim)
    raise DatasetError(f"{path}: unknown dataset format; expected .npz, .hdf5 or .h5")


def _check_d3il_avoid(path: str) -> None:
    """The checks `sims.avoid.load_avoid_demos` leaves out: keys, numeric dtypes, row counts, traj_lengths, finite."""
    fix = "a D3IL Avoid file needs 'des_c_pos', 'c_pos' (N, 3) and 'traj_lengths'"
    with open_npz(path) as f:
        for key in ("des_c_pos", "c_pos", "traj_lengths"):
            require_key(path, f.files, key, fix=fix)
        arrays = {k: npz_array(path, f, k) for k in ("des_c_pos", "c_pos")}
        lengths = npz_array(path, f, "traj_lengths")
    for key, arr in arrays.items():
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise _shape_error(path, key, arr.shape, "(N, 3)", fix)
    _check_lengths(path, "traj_lengths", lengths, arrays)
    for key, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr[:, :2]).all(axis=1))
        if bad.size:
            raise DatasetError(f"{path}: '{key}' row {bad[0]} is not finite ({bad.size} rows hold NaN or inf); "
                               "remove or repair those demos and run again")


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
