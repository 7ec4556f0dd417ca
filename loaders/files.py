"""Reading and fetching data files safely, for every loader: a file is recognised by its first bytes, opened with one
clear error when it is not what it should be (an HTML page, a truncated archive, a pickle), and downloaded so that a
failure leaves nothing behind. `read_normalization`: the reference's normalisation statistics."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import DatasetError
from common.normalizer import Normalizer

REPO_ROOT = Path(__file__).resolve().parent.parent
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first 8 bytes of every (userblock-free) HDF5 file
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive (the second: an empty one)


def one_line(e: object) -> str:
    """An exception's text on one line (library messages may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def read_head(path: str, n: int = 64) -> bytes:
    """The first `n` bytes of a file (DatasetError if it cannot be read at all)."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a folder, not a dataset file; pass the file inside it")
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({one_line(e.strerror or e)}); check the path and its permissions") from e


def describe(head: bytes) -> str:
    """What a file that starts with `head` looks like, for messages about files of the wrong format."""
    text = head.lstrip().lower()
    if not head:
        return "an empty file (0 bytes)"
    if text.startswith(b"<"):  # <!doctype html>, <html>, <?xml ...>: a web page, not data
        return "an HTML page (a login, error or captive-portal page saved in place of the data?)"
    if head.startswith(HDF5_SIGNATURE):
        return "an HDF5 file"
    if head.startswith(ZIP_SIGNATURES):
        return "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array (written by np.save; np.savez writes an .npz)"
    if head.startswith(b"\x80"):
        return "a Python pickle, which is never loaded (allow_pickle=False)"
    return f"a file that starts with {head[:8]!r}"


def require_key(path: str, keys: Any, key: str, what: str = "key", fix: str = "is this the right dataset file?") -> None:
    if key not in keys:
        raise DatasetError(f"{path}: missing {what} '{key}' (found: {', '.join(sorted(keys)) or 'none'}); {fix}")


def import_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise DatasetError("reading .hdf5 datasets needs h5py; pip install h5py") from e
    return h5py


@contextmanager
def open_hdf5(path: str) -> Iterator[Any]:
    """`h5py.File(path, "r")`; a file that is not HDF5, truncated or corrupt ends in one DatasetError."""
    h5py = import_h5py()
    head = read_head(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        what = (f"truncated or corrupt HDF5 ({one_line(e)})" if head.startswith(HDF5_SIGNATURE)
                else f"not an HDF5 file but {describe(head)}")
        raise DatasetError(f"{path}: {what}; download the file again") from e
    try:
        with f:
            yield f
    except OSError as e:  # raised by h5py while reading a damaged dataset
        raise DatasetError(f"{path}: corrupt HDF5 data ({one_line(e)}); download the file again") from e


@contextmanager
def open_npz(path: str) -> Iterator[Any]:
    """`np.load(path, allow_pickle=False)` of an .npz archive; anything else ends in one DatasetError."""
    head = read_head(path)
    if not head.startswith(ZIP_SIGNATURES):
        raise DatasetError(f"{path}: not an .npz archive but {describe(head)}; write or download the file again")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: truncated or corrupt .npz ({one_line(e)}); write or download the file again") from e
    with f:
        yield f


def npz_array(path: str, f: Any, key: str) -> np.ndarray:
    """`f[key]` of an open .npz, which must be numeric: object arrays are refused, never unpickled."""
    try:
        arr = f[key]
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DatasetError(f"{path}: '{key}' is an object array, which would need pickle to load and is refused "
                               "(allow_pickle=False); save it as a numeric array") from e
        raise DatasetError(f"{path}: '{key}' is corrupt ({one_line(e)}); write or download the file again") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{path}: '{key}' is truncated or corrupt ({one_line(e)}); "
                           "write or download the file again") from e
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: '{key}' has dtype {arr.dtype}, expected numbers; save it as a numeric array")
    return arr


def read_normalization(path: str) -> Normalizer:
    """The reference's normalisation statistics: a `normalization.npz` (obs_min, obs_max, action_min, action_max), or its
    furniture `normalization.pth` (a `LinearNormalizer` state dict with `stats.observations.min/max`,
    `stats.actions.min/max`; env/gym_utils/furniture_normalizer.py), checked as every checkpoint's statistics are
    (`common.runs.check_policy_numbers`: finite, min <= max), so NaN or swapped ones never reach the data."""
    from common.runs import check_policy_numbers

    if not path.endswith((".pth", ".pt")):
        with open_npz(path) as f:
            for key in Normalizer.KEYS:
                require_key(path, f.files, key)
            stats = [npz_array(path, f, k) for k in Normalizer.KEYS]
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise DatasetError(f"{path}: not a readable normalisation file ({type(e).__name__})") from None
        keys = [f"stats.{g}.{m}" for g in ("observations", "actions") for m in ("min", "max")]
        if not isinstance(sd, dict) or any(k not in sd for k in keys):
            raise DatasetError(f"{path}: expected the reference's LinearNormalizer state dict with {', '.join(keys)}")
        stats = [sd[k] for k in keys]
    check_policy_numbers({"normalization": dict(zip(Normalizer.KEYS, stats))}, path)
    return Normalizer(*stats)


def _make_folders(folder: str, dest: str) -> list[str]:
    """Create `folder` and its missing parents; returns the folders made, deepest first."""
    created = []
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise DatasetError(f"cannot save {dest}: {folder} is a file, not a folder; move it away or choose another path")
        created.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(created):
        os.mkdir(folder)
    return created


def _download_problem(part: str, dest: str, sha256: str | None, digest: str) -> str | None:
    """Why the downloaded `part` must not become `dest` (None: it may): checksum, then format signature."""
    if sha256 is not None and digest != sha256.lower():
        return f"its sha256 is {digest}, expected {sha256.lower()}"
    head = read_head(part)
    ext = os.path.splitext(dest)[1].lower()
    if ext in (".hdf5", ".h5"):
        if not head.startswith(HDF5_SIGNATURE):
            return f"the server sent {describe(head)}, not an HDF5 file"
        try:
            with open_hdf5(part):
                pass
        except DatasetError as e:
            if isinstance(e.__cause__, OSError):  # (without h5py only the signature is checked)
                return f"the HDF5 file is truncated or corrupt ({one_line(e.__cause__)})"
    elif ext in (".npz", ".pt"):  # both are zip archives (torch.save's format since PyTorch 1.6)
        what = "an .npz (zip) archive" if ext == ".npz" else "a PyTorch checkpoint (zip archive)"
        if not head.startswith(ZIP_SIGNATURES):
            return f"the server sent {describe(head)}, not {what}"
        try:
            with zipfile.ZipFile(part) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, zlib.error) as e:
            return f"the {ext} archive is truncated or corrupt ({one_line(e)})"
        if bad is not None:
            return f"the {ext} archive is corrupt (member {bad} fails its CRC check)"
    elif describe(head).startswith(("an HTML page", "an empty file")):
        return f"the server sent {describe(head)}"
    return None


def download(url: str, dest: str, sha256: str | None = None) -> None:
    """Fetch `url` to `dest` with a progress line; a failure leaves no file and no new folder behind.

    Before the file is moved into place its format is checked against `dest`'s extension (the HDF5 signature
    for .hdf5/.h5, a complete zip archive for .npz; never an HTML page), and against `sha256` when the source
    publishes one: a captive-portal page or a cut-off transfer is refused, not saved as the dataset.
    """
    if os.environ.get("DPPO_OFFLINE") and urllib.parse.urlparse(url).scheme in ("http", "https"):
        raise DatasetError(f"DPPO_OFFLINE is set, so {url} is not downloaded; put the file at {dest} and run again")
    part = dest + ".part"
    created = _make_folders(os.path.dirname(os.path.abspath(dest)), dest)
    saved = False
    try:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                try:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        size = f"/{total / 1e6:.1f}" if total else ""
                        print(f"\rdownloading {url}: {done / 1e6:.1f}{size} MB", end="", file=sys.stderr, flush=True)
                finally:
                    if done:
                        print(file=sys.stderr)
                if total and done != total:
                    raise OSError(f"got {done} of {total} bytes")
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            reason = getattr(e, "reason", None) or e
            raise DatasetError(f"could not download {url} ({one_line(reason)}); put the file at {dest} and run again") from e
        problem = _download_problem(part, dest, sha256, digest.hexdigest())
        if problem:
            raise DatasetError(f"refused the download of {url}: {problem}; nothing was saved: get the file by hand, "
                               f"put it at {dest} and run again")
        os.replace(part, dest)
        saved = True
    finally:  # also on KeyboardInterrupt
        if os.path.exists(part):
            os.remove(part)
        if not saved:
            for folder in created:  # deepest first
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
