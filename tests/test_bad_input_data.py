"""Bad data files end in one DatasetError line naming the file, the key and the fix; never in a silently wrong run.

Every bad file is written here in its real format (np.savez, h5py, raw bytes for corrupt ones).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.errors import DatasetError
from common.tasks import get_task
from loaders.datasets import load_task_trajectories, load_train_npz
from loaders.files import download

REPO_ROOT = Path(__file__).resolve().parent.parent
AVOID = get_task("avoid-m2")  # obs 4, actions 2


def refused(call: Callable[[], object], *needles: str) -> str:
    """The DatasetError message of `call()`: one line, containing every needle."""
    with pytest.raises(DatasetError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg and msg == msg.strip(), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def train_npz(path: Path, lengths: list[int] | np.ndarray = (3, 5), obs_dim: int = 4, action_dim: int = 2,
              **override: np.ndarray) -> str:
    n = int(np.sum(lengths))
    data = {"states": np.linspace(0, 1, n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
            "actions": np.linspace(-1, 1, n * action_dim, dtype=np.float32).reshape(n, action_dim),
            "traj_lengths": np.asarray(lengths)}
    data.update(override)
    np.savez(path, **data)
    return str(path)


def d4rl_hdf5(path: Path, obs: np.ndarray | None = None) -> str:
    n = 6
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((n, 11)) if obs is None else obs
        f["actions"] = np.zeros((n, 3), np.float32)
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = np.eye(n, dtype=bool)[2]
        f["timeouts"] = np.zeros(n, bool)
    return str(path)


# ---------------------------------------------------------------- 1. non-finite values


@pytest.mark.parametrize("key, value, expect", [("states", np.nan, "'obs' of trajectory 1, row 2, column 3 is nan"),
                                                ("actions", -np.inf, "'actions' of trajectory 1, row 2, column 1 is -inf"),
                                                ("states", 1e300, "'obs' of trajectory 1, row 2, column 3 is inf")])
def test_nonfinite_train_npz_names_trajectory_and_row(tmp_path: Path, key: str, value: float, expect: str) -> None:
    arr = np.zeros((8, 4 if key == "states" else 2), np.float64)
    arr[5, 3 if key == "states" else 1] = value  # row 5 = trajectory 1 (lengths 3, 5), its row 2
    path = train_npz(tmp_path / "train.npz", **{key: arr})
    refused(lambda: load_task_trajectories(AVOID, path), path, expect, "1 of 8 rows hold NaN or inf", "remove or repair")


def test_nonfinite_d4rl_and_robomimic_hdf5(tmp_path: Path) -> None:
    obs = np.zeros((6, 11))
    obs[4, 7] = np.nan  # second trajectory (rows 3..5), row 1
    path = d4rl_hdf5(tmp_path / "hopper.hdf5", obs)
    refused(lambda: load_task_trajectories(get_task("hopper"), path), path, "'obs' of trajectory 1, row 1, column 7 is nan")
    path = str(tmp_path / "lift.hdf5")
    with h5py.File(path, "w") as f:
        for i in range(2):
            f[f"data/demo_{i}/actions"] = np.zeros((4, 7))
            for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 10)):
                f[f"data/demo_{i}/obs/{key}"] = np.zeros((4, dim))
        f["data/demo_1/actions"][3, 6] = np.inf
    refused(lambda: load_task_trajectories(get_task("lift"), path), path, "'actions' of trajectory 1, row 3, column 6 is inf")


def test_d3il_avoid_npz_missing_keys_and_nonfinite(tmp_path: Path) -> None:
    path = str(tmp_path / "avoid_demos.npz")
    np.savez(path, des_c_pos=np.zeros((6, 3)), traj_lengths=np.array([6]))
    refused(lambda: load_task_trajectories(AVOID, path), path, "missing key 'c_pos'", "a D3IL Avoid file needs")
    c_pos = np.zeros((6, 3))
    c_pos[4, 0] = np.nan
    np.savez(path, des_c_pos=np.zeros((6, 3)), c_pos=c_pos, traj_lengths=np.array([6]))
    refused(lambda: load_task_trajectories(AVOID, path), path, "'c_pos' row 4 is not finite")
    np.savez(path, des_c_pos=np.zeros((6, 3)), c_pos=np.zeros((5, 3)), traj_lengths=np.array([6]))
    refused(lambda: load_task_trajectories(AVOID, path), path, "'des_c_pos' has 6 rows but 'c_pos' has 5")


# ---------------------------------------------------------------- 2. traj_lengths and row counts


@pytest.mark.parametrize("lengths, override, expect", [
    ([3, 0, 5], {}, "'traj_lengths'[1] = 0, but every trajectory needs at least one row"),
    ([3, -2, 7], {}, "'traj_lengths'[1] = -2"),
    ([2.5, 5.5], {}, "'traj_lengths'[0] = 2.5 is not a whole number"),
    ([3, 5], {"traj_lengths": np.array([3, 6])}, "'traj_lengths' sums to 9 rows but 'states' has 8"),
    ([3, 5], {"actions": np.zeros((7, 2))}, "'states' has 8 rows but 'actions' has 7"),
    ([], {}, "'traj_lengths' is empty, so the file holds no trajectories"),  # an all-zero-length dataset
])
def test_bad_traj_lengths(tmp_path: Path, lengths: list, override: dict, expect: str) -> None:
    path = train_npz(tmp_path / "train.npz", np.array(lengths), **override)
    refused(lambda: load_task_trajectories(AVOID, path), path, expect)
    refused(lambda: load_train_npz(path, 4, 2), expect)  # the loader on its own, too


# ---------------------------------------------------------------- 3. unreadable npz


def test_corrupt_npz_files(tmp_path: Path) -> None:
    good = Path(train_npz(tmp_path / "good.npz"))
    raw = good.read_bytes()
    cases = {"empty.npz": (b"", "not an .npz archive but an empty file (0 bytes)"),
             "truncated.npz": (raw[:len(raw) // 2], "truncated or corrupt .npz"),
             "html.npz": (b"<!DOCTYPE html><html>Sign in to the network</html>", "an HTML page"),
             "pickled.npz": (pickle.dumps({"states": [1.0]}), "a Python pickle, which is never loaded (allow_pickle=False)")}
    flipped = bytearray(raw)
    start = raw.index(b"\x93NUMPY") + 130  # inside the first member's data (after its 128-byte header)
    flipped[start:start + 40] = b"x" * 40
    cases["crc.npz"] = (bytes(flipped), "'states' is truncated or corrupt (Bad CRC-32")
    for name, (content, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        refused(lambda: load_task_trajectories(AVOID, str(path)), str(path), expect, "again")
    np.save(tmp_path / "single.npy", np.zeros((8, 4)))
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    refused(lambda: load_task_trajectories(AVOID, str(tmp_path / "single.npz")), "a single .npy array (written by np.save")
    refused(lambda: load_task_trajectories(AVOID, str(tmp_path)), "is a folder, not a dataset file")


def test_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    states = np.empty(8, dtype=object)
    states[:] = [np.zeros(4)] * 8
    path = train_npz(tmp_path / "train.npz", states=states)
    refused(lambda: load_task_trajectories(AVOID, path), path, "'states' is an object array", "allow_pickle=False")
    path = train_npz(tmp_path / "strings.npz", traj_lengths=np.array(["3", "5"]))
    refused(lambda: load_task_trajectories(AVOID, path), path, "'traj_lengths' has dtype <U1, expected numbers")


# ---------------------------------------------------------------- 4. corrupt hdf5


def test_corrupt_hdf5_files(tmp_path: Path) -> None:
    good = Path(d4rl_hdf5(tmp_path / "good.hdf5"))
    raw = good.read_bytes()
    cases = {"html.hdf5": (b"<html><body>captive portal</body></html>", "not an HDF5 file but an HTML page"),
             "empty.hdf5": (b"", "not an HDF5 file but an empty file (0 bytes)"),
             "truncated.hdf5": (raw[:len(raw) // 2], "truncated or corrupt HDF5 (")}
    for name, (content, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        refused(lambda: load_task_trajectories(get_task("hopper"), str(path)), str(path), expect, "download the file again")
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w") as f:
        f["something"] = np.zeros(3)
    refused(lambda: load_task_trajectories(get_task("hopper"), path), path,
            "neither a robomimic file (group 'data') nor a D4RL file (key 'observations')", "found: something")
    with h5py.File(path, "w") as f:
        f["data/demo_0/actions"] = np.zeros((4, 7))
    refused(lambda: load_task_trajectories(get_task("lift"), path), path, "missing group 'obs'")


# ---------------------------------------------------------------- 5. DPPO_DATA_DIR


def test_data_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").write_text("not a folder")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    refused(lambda: load_task_trajectories(get_task("hopper")), f"DPPO_DATA_DIR={tmp_path / 'data'} is a file, not a folder")
    assert os.listdir(tmp_path) == ["data"]
    # a file in the way below a folder: the download refuses before fetching anything
    refused(lambda: download("http://127.0.0.1:9/x.hdf5", str(tmp_path / "data" / "hopper" / "x.hdf5")),
            f"{tmp_path / 'data'} is a file, not a folder")


# ---------------------------------------------------------------- 6. downloads


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/short/"):  # announces more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_format_before_saving(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, root = server
    d4rl_hdf5(root / "hopper.hdf5")
    raw = (root / "hopper.hdf5").read_bytes()
    (root / "portal.hdf5").write_text("<!DOCTYPE html><html><body>Please log in</body></html>")
    (root / "cut.hdf5").write_bytes(raw[:len(raw) // 2])
    (root / "portal.npz").write_text("<html>log in</html>")
    train_npz(root / "train.npz")
    (root / "cut.npz").write_bytes((root / "train.npz").read_bytes()[:300])
    out = tmp_path / "out"

    def nothing_left() -> None:
        assert not out.exists()  # no file, no .part, no folder it made

    for name, expect in [("portal.hdf5", "the server sent an HTML page"), ("cut.hdf5", "the HDF5 file is truncated"),
                         ("portal.npz", "not an .npz (zip) archive"), ("cut.npz", "the .npz archive is truncated")]:
        dest = str(out / "task" / name)
        refused(lambda: download(f"{url}/{name}", dest), f"refused the download of {url}/{name}", expect,
                f"put it at {dest}")
        nothing_left()
    refused(lambda: download(f"{url}/short/x.hdf5", str(out / "x.hdf5")), "could not download", "x.hdf5")
    nothing_left()
    refused(lambda: download((root / "portal.hdf5").as_uri(), str(out / "x.hdf5")), "an HTML page")  # file:// too
    nothing_left()
    digest = hashlib.sha256(raw).hexdigest()
    refused(lambda: download(f"{url}/hopper.hdf5", str(out / "h.hdf5"), sha256="0" * 64), f"its sha256 is {digest}")
    nothing_left()
    download(f"{url}/hopper.hdf5", str(out / "h.hdf5"), sha256=digest.upper())  # the real file passes
    download(f"{url}/train.npz", str(out / "train.npz"))
    assert sorted(os.listdir(out)) == ["h.hdf5", "train.npz"] and (out / "h.hdf5").read_bytes() == raw


def test_task_download_of_html_page_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   server: tuple[str, Path]) -> None:
    url, root = server
    (root / "hopper_medium-v2.hdf5").write_text("<html>captive portal</html>")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path / "data"))
    task = dataclasses.replace(get_task("hopper"), data=f"{url}/hopper_medium-v2.hdf5")
    refused(lambda: load_task_trajectories(task), "an HTML page")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- through the command line


def test_cli_bad_data_exit_2_one_line_no_run_folder(tmp_path: Path) -> None:
    nan_states = np.zeros((8, 4))
    nan_states[6, 0] = np.nan
    files = {"nan.npz": (train_npz(tmp_path / "nan.npz", states=nan_states), "'obs' of trajectory 1, row 3, column 0 is nan"),
             "lengths.npz": (train_npz(tmp_path / "lengths.npz", traj_lengths=np.array([3, 6])), "sums to 9 rows"),
             "empty.npz": (str(tmp_path / "empty.npz"), "an empty file (0 bytes)")}
    (tmp_path / "empty.npz").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for name, (path, expect) in files.items():
        r = subprocess.run([sys.executable, str(REPO_ROOT / "dppo_pretrain.py"), "--env-id", "avoid-m2",
                            "--dataset", path, "--n-epochs", "1"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and path in lines[0] and expect in lines[0], r.stderr
        assert not (tmp_path / "runs").exists()
