"""Evaluation videos (`--capture-video`, sims/video.py): recording never changes an evaluation's numbers,
files appear with their episode's return and success in the name and the right number of frames."""

import csv
import ctypes.util
import glob
import importlib
import json
import os
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import dppo_finetune as ft
from common.envs import evaluate, make_vec_env
from common.errors import TaskError, UsageError
from common.tasks import get_task
from sims.avoid import path_reward

imageio = pytest.importorskip("imageio")
pytest.importorskip("imageio_ffmpeg")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "avoid-m2_diffusion.pt")
NAME = re.compile(r"^(itr_\d{4}|eval_only_(deterministic|stochastic))_ep(\d+)_return_(-?\d+\.\d)(_success_[01])?\.mp4$")


def _frames(path: str) -> list[np.ndarray]:
    with imageio.get_reader(path) as r:
        return [f for f in r]


def _noisy_avoid_policy(seed: int):
    """Random increments of the desired position (a fresh seeded stream per evaluation): episodes differ by env."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform([-0.012, 0.0], [0.012, 0.012], size=(obs.shape[0], 4, 2))


def test_avoid_recording_keeps_the_numbers_and_names_each_episode(tmp_path):
    task = get_task("avoid-m2")
    results = {}
    for capture in (False, True):
        envs = make_vec_env(task, 5, seed=0, capture_video=capture)
        results[capture] = evaluate(envs, _noisy_avoid_policy(3), task, 4, seed=7, index=0)
    plain, rec = results[False], results[True]
    assert "videos" not in plain and len(rec["videos"]) == 3  # VIDEO_EPISODES of the 5 envs
    for k in ("return_mean", "return_std", "success_rate", "n_episodes", "mode_fractions", "collision_rate"):
        assert plain[k] == rec[k]
    assert all(np.array_equal(a, b) for a, b in zip(plain["paths"], rec["paths"]))
    for v in rec["videos"]:
        path = rec["paths"][v["env"]]  # every Avoid episode ends at step 100: paths are in env order
        assert v["return"] == pytest.approx(path_reward(path), abs=1e-4) and v["success"] in (True, False)
        frames = _frames(v["file"])
        assert v["frames"] == len(frames) == 101 and frames[0].shape == (352, 256, 3)  # the start + 100 steps
        assert not np.array_equal(frames[0], frames[-1])  # the path is drawn as it grows
    assert len({v["return"] for v in rec["videos"]}) > 1  # the three episodes are different ones
    from sims.video import save_videos
    saved = save_videos(rec["videos"], str(tmp_path / "videos"), "itr_0007")
    for v, p in zip(rec["videos"], saved):
        m = NAME.match(os.path.basename(p))
        assert m and m.group(1) == "itr_0007" and int(m.group(3)) == v["env"]
        assert float(m.group(4)) == pytest.approx(v["return"], abs=0.05) and m.group(5) == f"_success_{int(v['success'])}"


def test_finetune_with_and_without_videos_writes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = dict(env_id="avoid-m2", checkpoint=SHIPPED, n_train_itr=1, n_critic_warmup_itr=0, num_envs=4, n_steps=25,
                val_freq=1, seed=0)
    outs = {c: ft.main(ft.Args(exp_name=f"cap{int(c)}", capture_video=c, **base)) for c in (False, True)}

    def rows(out):
        with open(os.path.join(out["run_dir"], "eval.csv")) as f:
            return list(csv.DictReader(f))
    assert rows(outs[False]) == rows(outs[True]) and len(rows(outs[True])) == 2
    assert outs[False]["final_eval"]["return_mean"] == outs[True]["final_eval"]["return_mean"]
    assert not os.path.exists(os.path.join(outs[False]["run_dir"], "videos"))
    names = sorted(os.listdir(os.path.join(outs[True]["run_dir"], "videos")))
    # the policy before fine-tuning (the Avoid picture's rollouts, itr 0) and the final evaluation (itr 1)
    assert [n[:12] for n in names] == ["itr_0000_ep0", "itr_0000_ep1", "itr_0000_ep2",
                                       "itr_0001_ep0", "itr_0001_ep1", "itr_0001_ep2"]
    assert all(NAME.match(n) for n in names)
    assert sorted(map(os.path.basename, outs[True]["final_eval"]["videos"])) == names[3:]


def test_eval_only_videos_go_to_a_new_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ft.main(ft.Args(env_id="avoid-m2", checkpoint=SHIPPED, num_envs=3, eval_only=True, capture_video=True, seed=0))
    (run,) = glob.glob("runs/avoid-m2__dppo_finetune__0__*")
    assert sorted(os.listdir(run)) == ["videos"]  # only the videos: no eval.csv, no checkpoint
    names = sorted(os.listdir(os.path.join(run, "videos")))
    assert len(names) == 6 and all(NAME.match(n) for n in names)
    assert sum(n.startswith("eval_only_stochastic") for n in names) == 3
    assert len(out["eval"]["deterministic"]["videos"]) == 3
    ft.main(ft.Args(env_id="avoid-m2", checkpoint=SHIPPED, num_envs=3, eval_only=True, seed=0))
    assert len(glob.glob("runs/*")) == 1  # without --capture-video eval-only still writes nothing


SCRIPTS = ["dppo_finetune", "dppo_critic_ablation", "drwr", "dawr", "exact_likelihood_pg", "dipo", "idql", "dql", "qsm"]


class _Made(Exception):
    pass


@pytest.mark.parametrize("name", SCRIPTS + ["dppo_pretrain", "gaussian_ppo", "gmm_ppo", "flow_pretrain", "reinflow"])
def test_every_script_passes_the_flag_to_its_envs(name, tmp_path, monkeypatch):
    """--capture-video reaches make_vec_env (fine-tuning and --eval-only envs; pre-training's evaluation envs)."""
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    seen = []

    def make(*a, **kw):
        seen.append(kw.get("capture_video"))
        raise _Made
    small = dict(env_id="avoid-m2", seed=0, capture_video=True)
    if name in SCRIPTS:
        runs = [module.Args(checkpoint=SHIPPED, eval_only=True, num_envs=2, **small)]
    elif name in ("dppo_pretrain", "flow_pretrain"):
        runs = [module.Args(n_epochs=1, eval_every=1, mlp_dims=(16, 16), output=str(tmp_path / "o.pt"), **small)]
    elif name == "reinflow":  # from the shipped flow checkpoint
        runs = [module.Args(eval_only=True, num_envs=2, **small)]
    else:  # pre-training's evaluation envs, then fine-tuning's envs (from a 1-epoch policy)
        pre = module.main(module.Args(pretrain=True, env_id="avoid-m2", n_epochs=1, eval_every=0, mlp_dims=(16, 16)))
        runs = [module.Args(pretrain=True, n_epochs=1, eval_every=1, mlp_dims=(16, 16), **small),
                module.Args(checkpoint=pre["checkpoint"], eval_only=True, num_envs=2, **small)]
    monkeypatch.setattr(module, "make_vec_env", make)
    if name in ("gaussian_ppo", "gmm_ppo"):  # their --pretrain loop (and its evaluation envs): loaders/chunk_pretrain.py
        from loaders import chunk_pretrain
        monkeypatch.setattr(chunk_pretrain, "make_vec_env", make)
    for args in runs:
        with pytest.raises(_Made):
            module.main(args)
    assert seen == [True] * len(runs)


def test_pretrain_without_evaluations_refuses_the_flag(tmp_path, monkeypatch):
    import dppo_pretrain as pt
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--capture-video"):
        pt.main(pt.Args(env_id="avoid-m2", n_epochs=1, eval_every=0, capture_video=True))
    assert not os.path.exists("runs")


def test_missing_renderer_or_writer_is_one_line(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(TaskError, match="MUJOCO_GL=egl") as e:
        make_vec_env(get_task("hopper"), 1, capture_video=True)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    with pytest.raises(TaskError, match="pip install imageio==.* imageio-ffmpeg=="):
        make_vec_env(get_task("avoid-m2"), 1, capture_video=True)


HOPPER = r"""
import json, sys, time
import gymnasium as gym
import numpy as np
from common.envs import evaluate, make_vec_env
from common.tasks import get_task
from sims.video import save_videos
task = get_task("hopper")
out = {}
for capture in (False, True):
    envs = make_vec_env(task, 3, seed=0, max_episode_steps=40, backend="gymnasium", capture_video=capture)
    rng = np.random.default_rng(5)
    t = time.time()
    r = evaluate(envs, lambda o: rng.uniform(-1, 1, (o.shape[0], 4, 3)), task, 4, seed=11, index=0, n_steps=12)
    r["seconds"] = time.time() - t
    envs.close()
    if capture:  # out of the temporary folder, which goes at exit
        for v, path in zip(r["videos"], save_videos(r["videos"], "videos", "itr_0000")):
            v["file"] = path
    out[capture] = r
json.dump({str(k): v for k, v in out.items()}, sys.stdout)
"""


@pytest.mark.skipif(ctypes.util.find_library("EGL") is None, reason="no libEGL here for MuJoCo's offscreen rendering")
def test_hopper_recording_keeps_the_numbers(tmp_path):
    """MuJoCo offscreen rendering (MUJOCO_GL=egl, in its own process: the GL backend is chosen at import)."""
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HOPPER], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    plain, rec = out["False"], out["True"]
    for k in ("return_mean", "return_std", "episode_length", "n_episodes"):
        assert plain[k] == rec[k]
    assert len(rec["videos"]) == 3
    for v in rec["videos"]:
        frames = _frames(os.path.join(tmp_path, v["file"]))
        # random actions: an episode falls before the 40-step limit or is truncated at it; a frame after
        # reset, one every 4 steps (125 Hz -> 31.25 frames/s) and the last one
        assert 2 <= v["frames"] == len(frames) <= 11 and frames[0].shape == (256, 256, 3)
        assert v["success"] is None and frames[0].std() > 5  # a picture, not a blank frame
        with imageio.get_reader(os.path.join(tmp_path, v["file"])) as r:
            assert r.get_meta_data()["fps"] == pytest.approx(31.25)
    print(f"hopper: {rec['seconds']:.1f} s with 3 recorded episodes vs {plain['seconds']:.1f} s without")


LIFT = r"""
import json, sys
import gymnasium as gym
import numpy as np
from common.envs import make_vec_env
from common.tasks import get_task
out = {}
for capture in (False, True):
    envs = make_vec_env(get_task("lift"), 2, seed=0, capture_video=capture, n_workers=2)  # 2 worker processes
    if capture:
        envs.set_recording([1])  # env 1 lives in the second worker
    rng = np.random.default_rng(0)
    obs, frames = [envs.reset(seed=3).tolist()], []
    for _ in range(3):
        o, r, term, trunc, info = envs.step(rng.uniform(-1, 1, (2, 4, 7)))
        obs.append(o.tolist())
        frames += info.get("frames", {}).get(1, [])
    envs.close()
    out[capture] = {"obs": obs, "n_frames": len(frames), "shape": list(frames[0].shape) if frames else None,
                    "std": float(np.std(frames[-1])) if frames else None, "fps": envs.video_fps}
json.dump({str(k): v for k, v in out.items()}, sys.stdout)
"""


@pytest.mark.skipif(ctypes.util.find_library("EGL") is None, reason="no libEGL here for robosuite's offscreen rendering")
def test_robomimic_frames_from_worker_processes_keep_the_numbers(tmp_path):
    pytest.importorskip("robosuite")
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LIFT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["False"]["obs"] == out["True"]["obs"]  # the offscreen renderer leaves the physics alone
    rec = out["True"]
    # 20 Hz control: every env step is a frame (stride 1); the frame after reset + 3 chunks x 4 steps
    assert rec["n_frames"] == 13 and rec["shape"] == [256, 256, 3] and rec["std"] > 5 and rec["fps"] == 20.0


def test_resume_may_switch_recording_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    part = ft.main(ft.Args(env_id="avoid-m2", checkpoint=SHIPPED, n_train_itr=1, n_critic_warmup_itr=0, num_envs=3, n_steps=25,
                           seed=0))
    out = ft.main(ft.Args(resume=part["run_dir"], n_train_itr=2, capture_video=True))
    names = sorted(os.listdir(os.path.join(out["run_dir"], "videos")))
    assert out["run_dir"] == part["run_dir"] and [n[:12] for n in names] == ["itr_0002_ep0", "itr_0002_ep1", "itr_0002_ep2"]


class _NoGL(gym.Env):
    """A one-number env whose renderer is missing, as on a machine without libEGL."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    render_mode = "rgb_array"

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}

    def render(self):
        raise RuntimeError("no EGL display")


def test_a_render_failure_in_a_worker_process_is_one_line_in_the_parent():
    from common.vecenv import MultiStep, ProcessChunkVecEnv
    from sims.video import RenderFrames
    envs = ProcessChunkVecEnv([lambda: MultiStep(RenderFrames(_NoGL(), 1), 2)] * 2, 2)
    try:
        envs.set_recording([1])
        with pytest.raises(TaskError, match="rendering failed .*no EGL display.*MUJOCO_GL=egl"):
            envs.reset(seed=0)
        envs.set_recording([])
        assert envs.reset(seed=0).shape == (2, 1, 1)  # the workers are still there
    finally:
        envs.close()
