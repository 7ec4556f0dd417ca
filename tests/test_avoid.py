"""Tests for sims/avoid.py and its tooling: fidelity to the real D3IL demos (scripts/avoid_sysid.py),
task semantics, the vec env, the scripted demos (scripts/generate_avoid_demos.py) and their shipped files."""

from pathlib import Path

import numpy as np
import pytest

from common.tasks import get_task
from loaders.datasets import AVOID_DEMO_DIR, AVOID_N_DEMOS, avoid_demo_file, load_task_trajectories
from sims import avoid
from scripts import avoid_sysid
from scripts import generate_avoid_demos as gen

DEMOS = Path(__file__).resolve().parents[2] / "shared/data/d3il_avoid/avoid_demos.npz"
needs_demos = pytest.mark.skipif(not DEMOS.exists(), reason=f"real D3IL Avoid demos not found at {DEMOS}")


@needs_demos
def test_replay_fidelity_on_real_demos():
    res = avoid_sysid.validate_simulator(str(DEMOS))
    assert res["n_demos"] == 96
    assert res["mode_agreement"] >= 0.95
    assert res["collisions"] <= 2
    assert res["rmse_mm"] <= 5.0  # measured 4.11 mm


@needs_demos
def test_real_subsets_and_demo_format():
    everything = avoid.load_avoid_demos(str(DEMOS), None)
    assert len(everything) == 96
    for subset, modes in avoid.SUBSETS.items():
        demos = avoid.load_avoid_demos(str(DEMOS), subset)
        assert len(demos) > 0
        for d in demos:
            assert d["obs"].dtype == np.float32 and d["obs"].shape[1] == 4
            assert d["actions"].shape == (len(d["obs"]), 2)
            des = d["obs"][:, :2]
            np.testing.assert_allclose(des[1:] - des[:-1], d["actions"][:-1], atol=1e-6)
            assert avoid.row_modes(des)[:2] == (1, 2) and avoid.row_modes(des)[2] in modes
            # the recorded end-effector path has the same modes and never collides
            assert avoid.row_modes(d["obs"][:, 2:])[2] in modes and not avoid.collided(d["obs"][:, 2:])
    with pytest.raises(ValueError):
        avoid.load_avoid_demos(str(DEMOS), "M4")


def _line(x0: float, y0: float, x1: float, y1: float, n: int = 200) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return np.array([x0, y0]) + t * np.array([x1 - x0, y1 - y0])


def test_modes_and_collisions_on_hand_made_paths():
    # right of obstacle 1, left of row 2, far left at row 3 (modes 1, 2, 5)
    path = np.concatenate([_line(0.6, -0.28, 0.6, -0.05), _line(0.6, -0.05, 0.3, 0.0),
                           _line(0.3, 0.0, 0.3, 0.45)])
    assert avoid.row_modes(path) == (1, 2, 5)
    assert not avoid.collided(path)
    # modes latch: wandering across boundaries after entering a band does not change them
    latched = np.concatenate([_line(0.45, -0.2, 0.45, -0.1), _line(0.45, -0.1, 0.7, -0.09)])
    assert avoid.row_modes(latched) == (0, -1, -1)
    # straight up x = 0.5 hits the first obstacle; 0.5 + r + 0.01 - 1e-4 collides, + 1e-4 does not
    assert avoid.collided(_line(0.5, -0.28, 0.5, 0.0))
    assert avoid.collided(np.array([[0.5 + 0.04 - 1e-4, -0.1]]))
    assert not avoid.collided(np.array([[0.5 + 0.04 + 1e-4, -0.1]]))
    assert avoid.row_modes(np.array([[0.7, 0.3]])) == (-1, -1, 8)


def test_reward_m5():
    no, yes = np.array(-1), np.array(5)
    f = np.array(False)
    assert avoid.step_reward(np.array([0.5, 0.0]), no, f) == 0.0
    assert avoid.step_reward(np.array([0.5, 0.3]), yes, f) == 1.0
    assert avoid.step_reward(np.array([0.3, 0.45]), yes, f) == 2.0
    assert avoid.step_reward(np.array([0.3, 0.45]), np.array(6), f) == 1.0
    assert avoid.step_reward(np.array([0.85, 0.45]), yes, f) == np.float32(-0.1)  # x outside
    assert avoid.step_reward(np.array([0.3, 0.45]), yes, np.array(True)) == np.float32(-0.1)
    # latched collision: one touching step poisons the rest of the path
    path = np.concatenate([_line(0.3, 0.0, 0.3, 0.45, 50), [[0.35, 0.26]], _line(0.3, 0.41, 0.3, 0.45, 10)])
    assert avoid.path_reward(path) == pytest.approx(-0.1 * 11 + avoid.path_reward(path[:50]))


def test_vec_env_protocol():
    n, te = 5, 4
    env = avoid.AvoidVecEnv(n, act_steps=te, cond_steps=2)
    obs = env.reset(seed=0)
    assert obs.shape == (n, 2, 4) and obs.dtype == np.float32
    np.testing.assert_allclose(obs[:, 0], obs[:, 1])  # first obs repeated
    np.testing.assert_allclose(obs[0, 0], np.array([0.525, -0.28, 0.525, -0.28]), atol=1e-7)
    # drive straight up through the gap left of obstacle 1 and compare with a plain replay
    act = np.zeros((n, te, 2))
    act[:, :, 0], act[:, :, 1] = -0.0065, 0.0125
    des = avoid.START + np.cumsum(np.concatenate([np.zeros((1, 2)), act[0].repeat(25, 0)]), 0)
    ee_ref = avoid.replay(des[None], avoid.START[None])[0]
    total = np.zeros(n)
    for k in range(25):
        obs, rew, term, trunc, info = env.step(act)
        assert rew.shape == (n,) and rew.dtype == np.float32 and term.dtype == bool and not term.any()
        assert info["ee_pos"].shape == (n, te, 2) and info["mode"].shape == (n, 3)
        np.testing.assert_allclose(info["ee_pos"][0], ee_ref[4 * k + 1: 4 * k + 5], atol=1e-6)
        total += rew
        if k < 24:
            assert not trunc.any()
            np.testing.assert_allclose(obs, info["final_obs"])
            np.testing.assert_allclose(obs[:, 1, :2], np.tile(des[4 * k + 4], (n, 1)), atol=1e-6)  # desired_{t}
            np.testing.assert_allclose(obs[:, 1, 2:], np.tile(ee_ref[4 * k + 4], (n, 1)), atol=1e-6)
    assert np.allclose(total, avoid.path_reward(ee_ref[1:]), atol=1e-4)
    assert trunc.all()  # 100 steps
    assert tuple(info["mode"][0]) == avoid.row_modes(ee_ref) and not info["collided"].any()
    np.testing.assert_allclose(info["final_obs"][:, 1, 2:], np.tile(ee_ref[100], (n, 1)), atol=1e-6)
    np.testing.assert_allclose(obs[:, 0], obs[:, 1])  # reset: new episode's first obs, repeated
    np.testing.assert_allclose(obs[:, 1], np.tile([0.525, -0.28, 0.525, -0.28], (n, 1)), atol=1e-7)


def test_vec_env_episode_end_inside_chunk():
    env = avoid.AvoidVecEnv(3, act_steps=3, max_episode_steps=7)
    env.reset()
    act = np.tile([0.0, 0.01], (3, 3, 1))
    env.step(act)
    env.step(act)
    obs, rew, _, trunc, info = env.step(act)  # steps 7, (8, 9 ignored)
    assert trunc.all()
    np.testing.assert_allclose(info["final_obs"][:, 0, :2], np.tile(avoid.START + [0, 0.07], (3, 1)), atol=1e-6)
    np.testing.assert_allclose(info["ee_pos"][:, 1], info["ee_pos"][:, 0])  # frozen after the end
    np.testing.assert_allclose(obs[:, 0], np.tile([0.525, -0.28, 0.525, -0.28], (3, 1)), atol=1e-7)


@pytest.mark.parametrize("subset", ["M1", "M2", "M3"])
def test_generated_demos(subset):
    demos = gen.generate_avoid_demos(subset, n_demos=40, seed=1)
    again = gen.generate_avoid_demos(subset, n_demos=40, seed=1)
    assert all(np.array_equal(a["obs"], b["obs"]) for a, b in zip(demos, again))
    modes = []
    for d in demos:
        des, ee = d["obs"][:, :2], d["obs"][:, 2:]
        assert 55 <= len(des) <= 110 and not avoid.collided(ee)
        tol = 1e-6  # actions are differences of float32 positions clipped at the bounds
        assert (d["actions"].min(0) >= np.array([-0.0125, 0]) - tol).all() and (d["actions"].max(0) <= 0.0125 + tol).all()
        modes.append(avoid.subset_mode(des, subset))
        assert modes[-1] is not None and avoid.row_modes(ee) == (1, 2, modes[-1])
        assert ee[-1, 1] > 0.4
        assert np.abs(np.diff(d["actions"], axis=0)).mean() < 0.0015  # smooth (real demos: 0.00055)
    counts = [modes.count(m) for m in avoid.SUBSETS[subset]]
    assert abs(counts[0] - counts[1]) <= 2


@pytest.mark.parametrize("subset", ["M1", "M2", "M3"])
def test_shipped_demos_are_the_generators(subset, tmp_path):
    """The built-in demos in builtin-data/ are exactly what scripts/generate_avoid_demos.py writes (~1 s)."""
    shipped = AVOID_DEMO_DIR / avoid_demo_file(subset)
    assert shipped.stat().st_size < 250_000
    demos = gen.write_avoid_demos(subset, str(tmp_path / "demos.npz"), n_demos=AVOID_N_DEMOS, seed=0)
    with np.load(shipped) as a, np.load(tmp_path / "demos.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["actions", "states", "traj_lengths"]
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # and the task's default data are the generator's demos, bit for bit (same float32 arrays)
    trajs = load_task_trajectories(get_task(f"avoid-{subset.lower()}"))
    assert len(trajs) == len(demos) == 96
    for t, d in zip(trajs, demos):
        assert set(t) == set(d) == {"obs", "actions"}
        for k in d:
            assert t[k].dtype == d[k].dtype == np.float32 and np.array_equal(t[k], d[k])
    # fewer demos are the first ones (the generator draws demo by demo from one stream)
    first = gen.generate_avoid_demos(subset, n_demos=3, seed=0)
    assert all(np.array_equal(t["obs"], d["obs"]) for t, d in zip(load_task_trajectories(
        get_task(f"avoid-{subset.lower()}"), n_demos=3), first))


@needs_demos
def test_sysid_fit_runs_and_cli():
    """Two iterations of the refit (the full fit takes ~4 min): it runs and returns the module's constants."""
    fit = avoid_sysid.fit_dynamics(str(DEMOS), iters=2)
    assert fit["W"].shape == avoid._W.shape and fit["NH"].shape == avoid._NH.shape
    assert fit["DISC_C"].shape == (2,) and 0.5 < fit["R_DES"] < 1.0 and 0.5 < fit["R_EE"] < 1.0
    with pytest.raises(SystemExit):
        avoid_sysid.main([])


def test_env_speed():
    import time

    env = avoid.AvoidVecEnv(50)
    env.reset()
    act = np.tile([0.0, 0.01], (50, 4, 1))
    t0 = time.perf_counter()
    for _ in range(100):
        env.step(act)
    assert 50 * 4 * 100 / (time.perf_counter() - t0) > 50_000  # ~300k steps/s measured
