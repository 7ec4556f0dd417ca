"""The env worker pool (`common.vecenv.ProcessChunkVecEnv`): how many workers by default, gym locomotion through it
with the same numbers as in-process, and `benchmarks/env_throughput.py`'s IPC measurement and projection."""

import importlib.util
import math
import os

import numpy as np
import pytest

import common.envs
from benchmarks.env_throughput import main, measure_ipc, measure_throughput, project
from common.envs import make_vec_env
from common.tasks import get_task
from common.vecenv import ProcessChunkVecEnv, SyncChunkVecEnv, default_n_workers

needs_mujoco = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="mujoco is not installed")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_default_workers_follow_the_cpu_affinity():
    mask = os.sched_getaffinity(0)
    assert default_n_workers() == len(mask)
    os.sched_setaffinity(0, {min(mask)})  # as `taskset -c 0` or a 1-CPU container would
    try:
        assert default_n_workers() == 1
    finally:
        os.sched_setaffinity(0, mask)


@needs_mujoco
def test_gym_workers_only_when_asked_and_same_numbers_as_in_process():
    task = get_task("hopper")
    local = make_vec_env(task, 3, seed=3, backend="gymnasium")
    pool = make_vec_env(task, 3, seed=3, backend="gymnasium", n_workers=2)
    try:
        assert isinstance(local, SyncChunkVecEnv) and local.backend == "gymnasium"
        assert isinstance(pool, ProcessChunkVecEnv) and pool.backend == "gymnasium (2 worker processes)"
        np.testing.assert_array_equal(local.reset(seed=3), pool.reset(seed=3))
        rng, dones = np.random.default_rng(0), 0
        for _ in range(40):  # random actions topple Hopper: episodes end and reset inside the window
            act = rng.uniform(-1, 1, (3, 4, 3)).astype(np.float32)
            a, b = local.step(act), pool.step(act)
            for x, y in zip(a[:4], b[:4]):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(a[4]["final_obs"], b[4]["final_obs"])
            dones += int((a[2] | a[3]).sum())
        assert dones >= 2
    finally:
        local.close()
        pool.close()


@pytest.mark.skipif(importlib.util.find_spec("robosuite") is None, reason="robosuite is not installed")
@pytest.mark.parametrize("cores", [1, 3])
def test_robomimic_default_is_one_worker_per_available_core(monkeypatch, cores):
    monkeypatch.setattr(common.envs, "default_n_workers", lambda: cores)
    envs = make_vec_env(get_task("lift"), 4, seed=0)
    try:
        if cores == 1:
            assert isinstance(envs, SyncChunkVecEnv)
        else:
            assert len(envs.worker_pids) == cores and envs.backend == f"gymnasium ({cores} worker processes)"
        assert envs.reset(seed=0).shape == (4, 1, 19)
    finally:
        envs.close()


def test_ipc_measurement_and_projection():
    r = measure_ipc((0, 1, 2), round_trips=20)
    assert sorted(r) == [0, 1, 2]
    for x in r.values():
        assert 0 < x["parent_cpu_us"] and 0 < x["wall_us"] < 1e6
    # 50 envs over 16 workers: the busiest worker steps ceil(50 / 16) = 4 envs
    p = project(0.02, 50, 1e-4, 2e-5, 3e-5, (1, 16, 64))
    t16 = 4 * 0.02 + 1e-4 + 2e-5 + 16 * 3e-5
    assert p[16]["chunk_step_s"] == pytest.approx(t16)
    assert p[16]["speedup"] == pytest.approx(50 * 0.02 / t16)
    assert p[16]["parent_share"] == pytest.approx((2e-5 + 16 * 3e-5) / t16)
    assert p[64]["chunk_step_s"] == pytest.approx(0.02 + 1e-4 + 2e-5 + 50 * 3e-5)  # no more workers start than envs
    assert p[1]["speedup"] < 1 and math.isclose(p[1]["chunk_step_s"], 50 * 0.02 + 1e-4 + 5e-5)


@needs_mujoco
def test_throughput_benchmark_takes_gym_tasks_and_worker_lists(capsys):
    r = measure_throughput("hopper", num_envs=2, chunk_steps=2, workers=(1, 2))
    assert sorted(r) == [1, 2]
    for rates in r.values():
        assert 0 < rates["steps_per_s"] < np.inf and 0 < rates["steps_per_cpu_s"] < np.inf
        assert rates["paper_iteration_s"] == pytest.approx(80_000 / rates["steps_per_s"])  # 40 envs x 500 x T_e 4
    assert main(["--workers", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["hopper", "--num-envs", "2", "--chunk-steps", "1", "--workers", "1", "--round-trips", "5",
                 "--project", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert "no-op round trip, 2 workers" in out and "bare pipe (nothing pickled)" in out
    for label in ("pool as it is", "bare-pipe floor"):
        assert f"PROJECTION ({label}) hopper, 40 envs, 4 workers" in out
