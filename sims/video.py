"""Evaluation videos (`--capture-video`, CleanRL's flag): a few episodes of every evaluation as MP4.

`make_vec_env(..., capture_video=True)` builds envs that can render (gym locomotion: MuJoCo
`rgb_array`; robomimic: robosuite's offscreen `agentview` camera; Avoid: drawn here from the
end-effector path, no renderer). `common.envs.evaluate` then records the first episode of envs
0..VIDEO_EPISODES-1 that ends inside the evaluation into temporary MP4 files (streamed, one frame every
`stride` env steps, ~30 frames/s of simulated time), and the run plumbing moves them to
`runs/<run>/videos/itr_0010_ep0_return_85.9_success_1.mp4` (`save_videos`; no `_success_` part for
tasks without a success rule). Rendering reads the simulator and never steps it or draws random
numbers, so an evaluation returns the same numbers with and without recording (tests/test_video.py).
"""

from __future__ import annotations

import atexit
import ctypes.util
import os
import shutil
import tempfile
from typing import Any

import gymnasium as gym
import numpy as np

from common.errors import TaskError
from common.tasks import Task

VIDEO_EPISODES = 3
"""episodes recorded per evaluation: the first one that ends in each of envs 0, 1, 2"""
VIDEO_SIZE = 256
"""rendered frame width and height (gym, robomimic)"""
TARGET_FPS = 30.0
"""frames kept per second of simulated time, about (every `stride`-th env step)"""
AVOID_DT = 0.035  # Avoid's control period (sims/avoid.py `physics_step`)
GL_HINT = ("on a machine without a display set MUJOCO_GL=egl (libEGL: `apt install libegl1`, software Mesa works) "
           "or MUJOCO_GL=osmesa (`apt install libosmesa6`)")


def require_video(task: Task) -> None:
    """TaskError naming what to install when this task's evaluations cannot be recorded here."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise TaskError("--capture-video writes MP4 with imageio and its ffmpeg plugin: "
                        "pip install imageio==2.38.1 imageio-ffmpeg==0.8.1") from None
    if task.suite not in ("gym", "robomimic", "robomimic-img", "avoid"):
        raise TaskError(f"--capture-video: no renderer for {task.suite} tasks ({task.id!r}) yet")
    if task.suite == "avoid":
        return  # drawn with pillow
    gl = os.environ.get("MUJOCO_GL")
    libs = {"egl": ("EGL", "libegl1"), "osmesa": ("OSMesa", "libosmesa6")}
    if gl is None and not os.environ.get("DISPLAY"):
        raise TaskError(f"--capture-video renders {task.id} with MuJoCo and there is no display: {GL_HINT}")
    if gl in libs and ctypes.util.find_library(libs[gl][0]) is None:
        raise TaskError(f"--capture-video: MUJOCO_GL={gl} but lib{libs[gl][0]} is not installed: apt install {libs[gl][1]}")


def video_timing(env_fps: float) -> tuple[int, float]:
    """(stride, video fps): keep every stride-th env step so the video runs at ~TARGET_FPS in real time."""
    stride = max(1, round(env_fps / TARGET_FPS))
    return stride, env_fps / stride


def plain_lighting(model: Any) -> None:
    """No shadows, no reflections: 4x faster offscreen rendering on software GL (Mesa), same physics
    (these are visual-only model fields)."""
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0


class RenderFrames(gym.Wrapper):
    """Keeps the frame after reset and every `stride`-th (and the last) env step's frame while `recording`;
    `pop_frames()` hands them over. Goes inside `MultiStep`, so frames follow the env steps of a chunk."""

    def __init__(self, env: gym.Env, stride: int) -> None:
        super().__init__(env)
        self.stride, self.recording, self.frames, self._t = stride, False, [], 0

    def _grab(self) -> None:
        try:
            frame = self.env.render()
        except Exception as e:  # noqa: BLE001 - any GL failure gets the same one-line answer
            raise TaskError(f"--capture-video: rendering failed ({type(e).__name__}: {e}); {GL_HINT}") from None
        self.frames.append(np.ascontiguousarray(frame, dtype=np.uint8))

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        out = self.env.reset(**kwargs)
        self._t = 0
        if self.recording:
            self._grab()
        return out

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        self._t += 1
        if self.recording and (self._t % self.stride == 0 or out[2] or out[3]):
            self._grab()
        return out

    def pop_frames(self) -> list[np.ndarray]:
        frames, self.frames = self.frames, []
        return frames


# ---- Avoid: frames drawn from the end-effector path ----

_AVOID_VIEW = (0.1, -0.38, 320.0)  # world x, y of the bottom-left corner, pixels per metre: x 0.1..0.9, y -0.38..0.72
_AVOID_SIZE = (256, 352)


def draw_avoid_frames(path: np.ndarray) -> list[np.ndarray]:
    """(L, 2) end-effector positions (the first one the start) -> L frames (352, 256, 3) uint8: the six
    obstacles, the goal line y = 0.4, the path so far and the end-effector (red once it has collided)."""
    from PIL import Image, ImageDraw

    from sims.avoid import OBSTACLES, ROD_RADIUS, clearance

    x0, y0, s = _AVOID_VIEW
    w, h = _AVOID_SIZE
    px = np.stack([(path[:, 0] - x0) * s, h - (path[:, 1] - y0) * s], 1)
    base = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(base)
    gy = h - (0.4 - y0) * s
    for x in range(0, w, 8):
        draw.line([(x, gy), (x + 4, gy)], fill=(150, 150, 150))
    for ox, oy, r in OBSTACLES:
        cx, cy = (ox - x0) * s, h - (oy - y0) * s
        draw.ellipse([cx - r * s, cy - r * s, cx + r * s, cy + r * s], fill=(230, 120, 110))
    hit = np.cumsum(clearance(path) < 0) > 0
    frames, rr = [], ROD_RADIUS * s
    for t in range(len(px)):
        if t:
            draw.line([tuple(px[t - 1]), tuple(px[t])], fill=(40, 90, 200), width=2)  # the path persists on `base`
        img = base.copy()
        cx, cy = px[t]
        ImageDraw.Draw(img).ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(200, 0, 0) if hit[t] else (20, 20, 20))
        frames.append(np.asarray(img))
    return frames


# ---- one evaluation's recording ----

_TMP: list[str] = []


def _tmp_dir() -> str:
    """A private folder for videos being written; removed at exit (finished ones are moved out first)."""
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="dppo-videos-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


class EvalVideos:
    """Records the first episode that ends in each of envs 0..n-1 during one `evaluate` call.

    `step(info, ended)` after every chunk-step (`ended`: env -> (return, success or None) of the episodes
    that just ended); `finish()` stops recording and returns one dict per recorded episode: `file` (a
    temporary MP4), `env`, `return`, `success`, `frames`. Rendered envs (gym, robomimic) are switched on
    with `envs.set_recording`; Avoid's frames are drawn from `info["ee_pos"]`."""

    def __init__(self, envs: Any, n_episodes: int = VIDEO_EPISODES) -> None:
        self.envs, self.fps = envs, envs.video_fps
        self.todo = list(range(min(n_episodes, envs.num_envs)))
        self.drawn = not hasattr(envs, "set_recording")
        self.writers: dict[int, Any] = {}
        self.files: dict[int, str] = {}
        self.counts = dict.fromkeys(self.todo, 0)
        self.points: dict[int, list[np.ndarray]] = {}
        self.done: list[dict[str, Any]] = []
        if self.drawn:
            from sims.avoid import START
            self.points = {i: [START.copy()] for i in self.todo}
        else:
            envs.set_recording(self.todo)

    def _write(self, i: int, frames: list[np.ndarray]) -> None:
        if not frames:
            return
        if i not in self.writers:
            import imageio

            fd, self.files[i] = tempfile.mkstemp(suffix=".mp4", dir=_tmp_dir())
            os.close(fd)
            self.writers[i] = imageio.get_writer(self.files[i], format="FFMPEG", fps=self.fps, codec="libx264",
                                                 macro_block_size=16, ffmpeg_log_level="error")
        for frame in frames:
            self.writers[i].append_data(frame)
        self.counts[i] += len(frames)

    def step(self, info: dict[str, Any], ended: dict[int, tuple[float, bool | None]]) -> None:
        finished = []
        for i in self.todo:
            if self.drawn:
                self.points[i].extend(info["ee_pos"][i])
            else:
                self._write(i, info["frames"].get(i, []))
            if i in ended:
                if self.drawn:
                    self._write(i, draw_avoid_frames(np.array(self.points[i])))
                self.writers.pop(i).close()
                ret, success = ended[i]
                self.done.append({"file": self.files.pop(i), "env": i, "return": ret, "success": success,
                                  "frames": self.counts[i]})
                finished.append(i)
        if finished:
            self.todo = [i for i in self.todo if i not in finished]
            if not self.drawn:
                self.envs.set_recording(self.todo)

    def finish(self) -> list[dict[str, Any]]:
        for i, writer in self.writers.items():  # episodes still running when the evaluation ended
            writer.close()
            os.remove(self.files[i])
        self.writers.clear()
        if not self.drawn:
            self.envs.set_recording([])
        return sorted(self.done, key=lambda v: v["env"])


def save_videos(videos: list[Any], folder: str, prefix: str) -> list[str]:
    """Move an evaluation's recorded episodes (`EvalVideos.finish`) to `folder` as
    `{prefix}_ep{env}_return_{return:.1f}[_success_{0|1}].mp4`; returns the paths (already saved ones
    are passed through)."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for v in videos:
        if isinstance(v, str):
            out.append(v)
            continue
        success = "" if v["success"] is None else f"_success_{int(v['success'])}"
        path = os.path.join(folder, f"{prefix}_ep{v['env']}_return_{v['return']:.1f}{success}.mp4")
        shutil.move(v["file"], path)
        out.append(path)
    return out
