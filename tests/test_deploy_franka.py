"""deploy_franka.py and hardware/robot.py: rotations, the safety limits, stops and the episode log on the in-process
fake robot, sampling equal to the training scripts', and the real protocol against franky-sim (MuJoCo FR3)."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import deploy_franka as deploy
from common.errors import NonFiniteError, UsageError
from common.networks import ChunkMLP, DiffusionMLP
from common.normalizer import Normalizer
from common.runs import CHECKPOINT_FORMAT, save_checkpoint
from hardware.robot import (FakeRobot, FilePoseSource, RobotError, axis_angle_to_matrix, matrix_to_axis_angle, matrix_to_quat,
                            matrix_to_rot6d, quat_to_matrix, rot6d_to_matrix, rotation_angle)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # gripper pointing down: 180° about x (x, y, z, w)


def reach_checkpoint(path, target_pos, target_quat=DOWN, gripper=-1.0, n_objects=0, horizon=4, act_steps=4,
                     action_scale=0.5):
    """A Gaussian checkpoint in this project's format whose mean is one fixed absolute pose whatever it observes:
    zero weights, zero output bias, and action statistics centred on the target (normalised 0 -> the target)."""
    target = np.concatenate([target_pos, matrix_to_rot6d(quat_to_matrix(np.asarray(target_quat))), [gripper]])
    obs_dim = 16 + 7 * n_objects
    arch = dict(obs_dim=obs_dim, horizon_steps=horizon, out_dim=10, cond_steps=1, mlp_dims=[8], activation="relu",
                residual=False)
    net = ChunkMLP(**arch)
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    sd = {f"network.{k}": v for k, v in net.state_dict().items()} | {"log_std": torch.full((10,), math.log(0.1))}
    norm = Normalizer(-2 * np.ones(obs_dim), 2 * np.ones(obs_dim), target - action_scale, target + action_scale)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "policy": "gaussian", "backbone": "mlp", "arch": arch,
                           "task": "franka-reach", "obs_dim": obs_dim, "action_dim": 10, "horizon_steps": horizon,
                           "cond_steps": 1, "std_limits": [0.01, 0.2], "normalization": norm.state_dict(),
                           "args": {"act_steps": act_steps}, "ema": sd})
    return path


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def fake_args(tmp_path, ckpt, **kw):
    return deploy.Args(**{"checkpoint": ckpt, "robot": "fake", "yes": True, "control_hz": 200.0, "max_steps": 8,
                          "log": str(tmp_path / "episode.jsonl"), "max_speed": 100.0, **kw})


# ---- rotations ----

def test_rotation_conversions_round_trip_and_match_scipy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(200, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    R = quat_to_matrix(q)
    assert np.allclose(R, Rotation.from_quat(q).as_matrix(), atol=1e-12)  # scipy: (x, y, z, w) too
    q_back = matrix_to_quat(R)
    assert np.allclose(q_back, q * np.sign(q[:, 3:]), atol=1e-9)  # same rotation, w >= 0
    d6 = matrix_to_rot6d(R)
    assert np.allclose(d6, R[:, :2, :].reshape(-1, 6))  # first two rows (furniture-bench convention)
    assert np.allclose(rot6d_to_matrix(d6), R, atol=1e-12)
    # a network's 6D output is not orthonormal: Gram-Schmidt still gives a rotation, close to the nearby one
    noisy = rot6d_to_matrix(d6 + 0.01 * rng.normal(size=d6.shape))
    assert np.allclose(noisy @ np.swapaxes(noisy, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(noisy), 1.0) and np.abs(noisy - R).max() < 0.1
    for Ri in R[:20]:
        rv = matrix_to_axis_angle(Ri)
        assert np.allclose(axis_angle_to_matrix(rv), Ri, atol=1e-9)
        assert np.isclose(rotation_angle(Ri), np.linalg.norm(rv), atol=1e-7)
    with pytest.raises(ValueError):
        rot6d_to_matrix(np.array([1.0, 0, 0, 2.0, 0, 0]))


def test_deployment_observation_equals_the_furniture_envs():
    """The robot part of the observation built here (numpy, float64) equals the one the furniture env feeds the
    policy in training (sims/furniture.py, torch): same order, same quaternion order, same 6D rows."""
    from common import rotations
    from hardware.robot import RobotState
    from sims import furniture
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.normal(size=4)
        state = RobotState(rng.normal(size=3), q / np.linalg.norm(q), rng.normal(size=3), rng.normal(size=3),
                           float(rng.uniform(0, 0.08)))
        raw = np.concatenate([state.ee_pos, state.ee_quat, state.ee_lin_vel, state.ee_ang_vel, [state.gripper_width]])
        train = furniture.robot_state_to_6d(torch.as_tensor(raw, dtype=torch.float64)).numpy()
        assert np.allclose(deploy.robot_obs(state), train, atol=1e-12)
        d6 = train[3:9] + 0.05 * rng.normal(size=6)  # an action's (not orthonormal) 6D: same rotation both ways
        ours = quat_to_matrix(matrix_to_quat(rot6d_to_matrix(d6)))
        theirs = rotations.quat_to_matrix(rotations.rot6d_to_quat(torch.as_tensor(d6))).numpy()
        assert np.allclose(ours, theirs, atol=1e-9)


# ---- the loop on the fake robot ----

def test_fixed_target_is_reached_and_everything_is_logged(tmp_path):
    target = np.array([0.50, 0.05, 0.30])
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), target)
    robot = FakeRobot(pos=(0.45, 0.0, 0.35))
    out = deploy.main(fake_args(tmp_path, ckpt, max_steps=12), robot=robot)
    log = read_log(out["log"])
    assert [r["type"] for r in log][0] == "header" and log[-1]["type"] == "end" and log[-1]["stop_reason"] == "done"
    steps = [r for r in log if r["type"] == "step"]
    chunks = [r for r in log if r["type"] == "chunk"]
    assert len(steps) == 12 and len(chunks) == 3  # T_e = 4
    assert np.allclose(robot.pos, target, atol=1e-5)  # the statistics put the target at 5e-7 off
    assert np.allclose(quat_to_matrix(robot.quat), quat_to_matrix(DOWN), atol=1e-6)
    assert all(len(s["obs"]) == 16 and np.isfinite(s["obs"]).all() for s in steps)
    # the observation is the furniture robot state: position, 6D of the measured quaternion, velocities, gripper
    s = steps[5]
    assert np.allclose(s["obs"][:3], s["state"]["ee_pos"]) and np.allclose(s["obs"][3:9], matrix_to_rot6d(
        quat_to_matrix(np.array(s["state"]["ee_quat"]))))
    assert s["obs"][15] == s["state"]["gripper_width"]
    assert not [c for c in robot.sent if c[0] == "gripper"]  # open at the start, the policy says open: nothing sent
    # velocity feedforward: (sent - measured) x control rate, zero rotation here
    twist = robot.twists[0]
    assert np.allclose(twist[:3], (np.array(steps[0]["command"]["pos"]) - steps[0]["state"]["ee_pos"]) * 200.0)
    assert np.allclose(twist[3:], 0, atol=1e-3) and np.linalg.norm(twist[:3]) == pytest.approx(0.03 * 200)
    robot = FakeRobot()
    deploy.main(fake_args(tmp_path, ckpt, velocity_feedforward=False, log=str(tmp_path / "noff.jsonl")), robot=robot)
    assert robot.twists == [None] * 8


def test_gripper_toggles_once_when_the_sign_flips(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "grasp.pt"), np.array([0.45, 0.0, 0.35]), gripper=0.8)
    robot = FakeRobot()
    out = deploy.main(fake_args(tmp_path, ckpt, gripper_force=15.0), robot=robot)
    assert [c for c in robot.sent if c[0] == "gripper"] == [("gripper", True, 15.0, 0.1)]
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert [s["command"]["gripper_sent"] for s in steps] == [True] + [False] * 7
    assert all(s["command"]["gripper_close"] for s in steps) and robot.gripper_width == 0.0
    ckpt = reach_checkpoint(str(tmp_path / "tiny.pt"), np.array([0.45, 0.0, 0.35]), gripper=0.01)  # inside the margin
    robot = FakeRobot()
    deploy.main(fake_args(tmp_path, ckpt, log=str(tmp_path / "tiny.jsonl")), robot=robot)
    assert not [c for c in robot.sent if c[0] == "gripper"]


def test_limits_clip_and_log(tmp_path):
    # target 20 cm away, below the workspace floor, and turned 90° about z: every limit is hit
    quat = Rotation.from_euler("z", 90, degrees=True) * Rotation.from_quat(DOWN)
    ckpt = reach_checkpoint(str(tmp_path / "far.pt"), np.array([0.45, 0.20, 0.0]), quat.as_quat())
    robot = FakeRobot(pos=(0.45, 0.0, 0.35))
    args = fake_args(tmp_path, ckpt, max_steps=4, max_step=0.02, max_rotation_step=0.2, workspace_min=(0.25, -0.4, 0.3))
    out = deploy.main(args, robot=robot)
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert out["clipped_steps"] == 4
    poses = [c for c in robot.sent if c[0] == "pose"]
    assert len(poses) == 4
    for s, (_, pos, q) in zip(steps, poses):
        assert "translation_step" in s["clipped"] and "rotation_step" in s["clipped"]
        assert np.allclose(s["command"]["pos"], pos) and np.allclose(s["action"][:3], [0.45, 0.20, 0.0], atol=1e-5)
        here = np.array(s["state"]["ee_pos"])
        assert np.linalg.norm(pos - here) <= 0.02 + 1e-9 and pos[2] >= 0.3
        turn = rotation_angle(quat_to_matrix(np.array(s["state"]["ee_quat"])).T @ quat_to_matrix(q))
        assert turn == pytest.approx(0.2, abs=1e-6)
    for s, twist in zip(steps, robot.twists):  # angular feedforward: the base-frame rotation vector to the target, x Hz
        R_now, R_cmd = Rotation.from_quat(s["state"]["ee_quat"]), Rotation.from_quat(s["command"]["quat"])
        np.testing.assert_allclose(twist[3:], (R_cmd * R_now.inv()).as_rotvec() * 200.0, atol=1e-6)
        assert twist[5] == pytest.approx(0.2 * 200.0, abs=1e-4)  # +z: the target is turned +90° about the base's z
    assert any("workspace" in s["clipped"] for s in steps)  # z: 0.35 -> floor 0.3 after a few steps
    # speed limit: max_speed / control_hz is the step when it is the smaller one
    out = deploy.main(fake_args(tmp_path, ckpt, max_steps=2, max_speed=0.5, control_hz=100.0, max_step=0.03,
                                log=str(tmp_path / "speed.jsonl")), robot=FakeRobot())
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert np.linalg.norm(np.array(steps[0]["command"]["pos"]) - steps[0]["state"]["ee_pos"]) == pytest.approx(0.005)


@pytest.mark.parametrize("dt,stops", [(0.0045, True), (0.0055, False)])
def test_measured_speed_above_twice_the_limit_stops(tmp_path, dt, stops):
    """Straight down (z only): --max-speed 0.25 at 100 Hz allows 2.5 mm per step; the fake robot covers the step in
    `dt` seconds, so it measures 2.5e-3 / dt m/s at the next observation: 0.556 m/s (over 2 x 0.25) stops the
    robot after one command, 0.455 m/s runs on, every step limited in z as well."""
    ckpt = reach_checkpoint(str(tmp_path / "down.pt"), np.array([0.45, 0.0, 0.25]))
    robot = FakeRobot(pos=(0.45, 0.0, 0.35), dt=dt)
    args = fake_args(tmp_path, ckpt, max_steps=4, max_speed=0.25, control_hz=100.0)
    speed = 2.5e-3 / dt
    if stops:
        with pytest.raises(RobotError, match=f"speed {speed:.3f} m/s exceeds 2 x --max-speed 0.25"):
            deploy.main(args, robot=robot)
        log = read_log(args.log)
        assert robot.stopped and log[-1]["type"] == "end" and log[-1]["steps"] == 1 and len(robot.sent) == 1
        return
    out = deploy.main(args, robot=robot)
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert out["stop_reason"] == "done" and len(steps) == 4
    for s in steps:  # each command 2.5 mm below the measured position, straight down
        move = np.array(s["command"]["pos"]) - s["state"]["ee_pos"]
        assert np.allclose(move, [0.0, 0.0, -2.5e-3], atol=1e-9) and s["clipped"] == ["translation_step"]
    assert np.linalg.norm(steps[1]["obs"][9:12]) == pytest.approx(speed)  # the observation's measured velocity


def test_workspace_floor_and_step_limit_in_z_alone(tmp_path):
    """A target straight below the workspace floor: the command stops at the floor (z), and each step down is at most
    --max-step (z alone, no x/y motion to trip the limit)."""
    ckpt = reach_checkpoint(str(tmp_path / "floor.pt"), np.array([0.45, 0.0, 0.10]))
    robot = FakeRobot(pos=(0.45, 0.0, 0.35))
    out = deploy.main(fake_args(tmp_path, ckpt, max_steps=8, max_step=0.02, workspace_min=(0.25, -0.4, 0.30)), robot=robot)
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    z = [s["command"]["pos"][2] for s in steps]
    assert z == pytest.approx([0.33, 0.31, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30], abs=1e-9)
    assert [s["clipped"] for s in steps[:2]] == [["workspace", "translation_step"]] * 2
    assert steps[2]["clipped"] == ["workspace"] and robot.pos[2] == pytest.approx(0.30)


def test_policy_sees_observations_clamped_to_five_normalised_units(tmp_path, monkeypatch):
    """Observation statistics much narrower than the arm's state (position 0..0.01): the normalised observation the
    policy receives is clamped to [-5, 5], as the furniture envs clamp it in training."""
    path = reach_checkpoint(str(tmp_path / "narrow.pt"), np.array([0.45, 0.0, 0.35]))
    ckpt = torch.load(path, weights_only=True)
    norm = Normalizer.from_state_dict(ckpt["normalization"])
    norm = Normalizer(np.zeros(16), np.full(16, 0.01), norm.action_min.numpy(), norm.action_max.numpy())
    save_checkpoint(path, {**ckpt, "normalization": norm.state_dict()})
    seen, real = [], deploy.ChunkPolicy.forward
    monkeypatch.setattr(deploy.ChunkPolicy, "forward",
                        lambda self, cond, *a: seen.append(cond.clone()) or real(self, cond, *a))
    out = deploy.main(fake_args(tmp_path, path, max_steps=4), robot=FakeRobot())
    first = [r for r in read_log(out["log"]) if r["type"] == "step"][0]
    expected = np.clip(norm.normalize_obs(torch.tensor(first["obs"], dtype=torch.float32)).numpy(), -5, 5)
    assert len(seen) == 1 and (expected == 5).any() and (expected == -5).any()  # both bounds act
    np.testing.assert_allclose(seen[0].reshape(-1).numpy(), expected, rtol=1e-6)


def test_start_outside_the_workspace_is_refused_even_within_the_tracking_margin(tmp_path):
    """The tracking margin (2 cm) applies once the robot moves; at the start the end-effector must be inside the box:
    1 cm above it, nothing is sent."""
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.45, 0.0, 0.55]))
    robot = FakeRobot(pos=(0.45, 0.0, 0.61))
    with pytest.raises(RobotError, match="outside the workspace box.*at the start: move it inside first"):
        deploy.main(fake_args(tmp_path, ckpt), robot=robot)
    assert robot.sent == [] and robot.stopped


def test_franky_state_splits_the_twist_into_linear_then_angular(monkeypatch):
    """FrankyRobot.observe on a stand-in for franky: the end-effector twist is the zero Jacobian (6 x 7, libfranka:
    linear rows first, then angular) times dq; the observation carries the linear velocity at 9:12, the angular at
    12:15, as the furniture envs' robot state."""
    import types

    from hardware import robot as robot_mod
    rng = np.random.default_rng(2)
    J, dq = rng.normal(size=(6, 7)), rng.normal(size=7)
    state = types.SimpleNamespace(O_T_EE=types.SimpleNamespace(translation=[0.4, 0.1, 0.3], quaternion=[1.0, 0, 0, 0]),
                                  q=np.zeros(7), dq=dq)

    class Robot:
        def __init__(self, host, realtime_config=None):
            self.state = state
            self.model = types.SimpleNamespace(zero_jacobian=lambda frame, s: J)
    franky = types.SimpleNamespace(Robot=Robot, Gripper=lambda host: types.SimpleNamespace(width=0.05),
                                   RealtimeConfig=types.SimpleNamespace(Ignore=0), Frame=types.SimpleNamespace(EndEffector=0))
    monkeypatch.setattr(robot_mod, "_import_franky", lambda: franky)
    s = robot_mod.FrankyRobot("stand-in").observe()
    twist = [sum(J[r, c] * dq[c] for c in range(7)) for r in range(6)]
    assert np.abs(np.subtract(twist[:3], twist[3:])).min() > 0.1  # the two halves differ in every component
    np.testing.assert_allclose(s.ee_lin_vel, twist[:3], rtol=1e-12)
    np.testing.assert_allclose(s.ee_ang_vel, twist[3:], rtol=1e-12)
    obs = deploy.robot_obs(s)
    np.testing.assert_allclose(obs[9:12], twist[:3], rtol=1e-12)
    np.testing.assert_allclose(obs[12:15], twist[3:], rtol=1e-12)
    assert obs[15] == 0.05 and np.allclose(obs[:3], [0.4, 0.1, 0.3])


def test_non_finite_policy_output_stops_and_flushes(tmp_path, monkeypatch):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    real = deploy.ChunkPolicy.forward
    calls = []

    def second_chunk_nan(self, cond, deterministic):
        calls.append(1)
        x = real(self, cond, deterministic)
        return x * float("nan") if len(calls) == 2 else x
    monkeypatch.setattr(deploy.ChunkPolicy, "forward", second_chunk_nan)
    robot = FakeRobot()
    with pytest.raises(NonFiniteError, match="non-finite action at step 4"):
        deploy.main(fake_args(tmp_path, ckpt), robot=robot)
    log = read_log(str(tmp_path / "episode.jsonl"))
    assert robot.stopped and len([c for c in robot.sent if c[0] == "pose"]) == 4
    assert log[-1]["type"] == "end" and log[-1]["stop_reason"].startswith("NonFiniteError") and log[-1]["steps"] == 4


def test_non_finite_from_bad_statistics_sends_nothing(tmp_path):
    path = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    ckpt = torch.load(path, weights_only=True)
    ckpt["normalization"]["action_min"][:] = -3e38  # finite numbers whose range overflows float32
    ckpt["normalization"]["action_max"][:] = 3e38
    torch.save(ckpt, path)
    robot = FakeRobot()
    with pytest.raises(NonFiniteError):
        deploy.main(fake_args(tmp_path, path), robot=robot)
    assert robot.sent == [] and not robot.started and read_log(str(tmp_path / "episode.jsonl"))[-1]["type"] == "end"


class InterruptedRobot(FakeRobot):
    """Ctrl-C arrives during the n-th observation."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def observe(self):
        if self.n_observe + 1 == self.n:
            raise KeyboardInterrupt
        return super().observe()


def test_keyboard_interrupt_stops_and_leaves_a_complete_log(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    robot = InterruptedRobot(6)
    out = deploy.main(fake_args(tmp_path, ckpt, max_steps=50), robot=robot)
    log = read_log(out["log"])
    assert out["stop_reason"] == "interrupted" and robot.stopped and robot.closed
    assert [r["step"] for r in log if r["type"] == "step"] == [0, 1, 2, 3, 4]
    assert log[-1] == {"type": "end", **{k: out[k] for k in log[-1] if k != "type"}} and log[-1]["steps"] == 5


@pytest.mark.parametrize("sig,reason", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_signals_to_the_script_leave_a_complete_log(tmp_path, sig, reason):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    log = tmp_path / "signal.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "deploy_franka.py"), "--checkpoint", ckpt, "--robot", "fake",
                             "--yes", "--max-steps", "100000", "--control-hz", "50", "--log", str(log)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count('"type": "step"') < 5):
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=30)
    records = read_log(log)
    steps = [r for r in records if r["type"] == "step"]
    assert proc.returncode == 0, output
    assert records[-1]["type"] == "end" and records[-1]["stop_reason"] == reason and records[-1]["steps"] == len(steps) >= 5
    assert [s["step"] for s in steps] == list(range(len(steps))) and f"({reason})" in output


def test_lost_connection_stops_and_leaves_a_complete_log(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    robot = FakeRobot(fail_after=3)
    with pytest.raises(RobotError, match="connection"):
        deploy.main(fake_args(tmp_path, ckpt), robot=robot)
    log = read_log(str(tmp_path / "episode.jsonl"))
    assert robot.stopped and log[-1]["type"] == "end" and log[-1]["steps"] == 3 and "RobotError" in log[-1]["stop_reason"]


def test_dry_run_sends_nothing(tmp_path, capsys):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    robot = FakeRobot()
    out = deploy.main(fake_args(tmp_path, ckpt, dry_run=True, yes=False), robot=robot)
    assert robot.sent == [] and not robot.started and out["steps"] == 8
    printed = capsys.readouterr().out
    assert printed.count("would send position") == 8
    assert all(not s["sent"] for s in read_log(out["log"]) if s["type"] == "step")


def test_confirmation_is_required_before_the_first_motion(tmp_path, monkeypatch):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    robot = FakeRobot()
    out = deploy.main(fake_args(tmp_path, ckpt, yes=False), robot=robot)
    assert out["stop_reason"] == "not confirmed" and robot.sent == [] and not robot.started
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    robot = FakeRobot()
    out = deploy.main(fake_args(tmp_path, ckpt, yes=False, log=str(tmp_path / "b.jsonl")), robot=robot)
    assert out["stop_reason"] == "done" and len(robot.sent) == 8 and robot.started


def test_object_poses_from_a_file_enter_the_observation(tmp_path):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]), n_objects=2)
    poses = tmp_path / "poses.json"
    first = [[0.5, 0.1, 0.02, 0, 0, 0, 1], [0.6, -0.1, 0.02, 0, 0, 1, 0]]
    poses.write_text(json.dumps(first))
    with pytest.raises(UsageError, match="object poses"):
        deploy.main(fake_args(tmp_path, ckpt), robot=FakeRobot())
    out = deploy.main(fake_args(tmp_path, ckpt, object_poses=f"file:{poses}", max_steps=3), robot=FakeRobot())
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert all(np.allclose(s["obs"][16:], np.ravel(first)) for s in steps)
    source = FilePoseSource(str(poses), 2)
    time.sleep(0.01)
    poses.write_text(json.dumps(first[:1]))
    os.utime(poses, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    with pytest.raises(RobotError, match="expected 2"):
        source.read()


def test_udp_poses_newest_wins_and_stale_stops():
    import socket
    from hardware.robot import UDPPoseSource
    source = UDPPoseSource("127.0.0.1:0", 1, max_age=0.3)
    address = source.sock.getsockname()
    with pytest.raises(RobotError, match="no object poses"):
        source.read()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for x in (0.1, 0.2):
        tx.sendto(json.dumps([[x, 0, 0, 0, 0, 0, 1]]).encode(), address)
    time.sleep(0.05)
    assert np.allclose(source.read(), [[0.2, 0, 0, 0, 0, 0, 1]])
    time.sleep(0.35)
    with pytest.raises(RobotError, match="no object poses"):
        source.read()
    tx.sendto(json.dumps([[0.1, 0, 0]]).encode(), address)
    time.sleep(0.05)
    with pytest.raises(RobotError, match="expected 1"):
        source.read()


@pytest.mark.skipif(importlib.util.find_spec("pupil_apriltags") is None, reason="pupil-apriltags is not installed")
def test_apriltag_source_transforms_averages_and_filters(tmp_path):
    """The detector and camera are stand-ins (no camera here): what is tested is base_T_camera @ camera_T_tag @
    tag_T_object, the average over an object's tags, the moving average, and the refusal of a never-seen object."""
    from types import SimpleNamespace

    from hardware.robot import AprilTagPoseSource

    def T(R, t):
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = R, t
        return M
    base_T_cam = T(Rotation.from_euler("xyz", [180, 0, 30], degrees=True).as_matrix(), [0.5, 0.0, 0.8])
    tag_T_obj = T(np.eye(3), [0.0, 0.0, -0.01])
    cal = {"intrinsics": [600, 600, 320, 240], "tag_size": 0.02, "base_T_camera": base_T_cam.tolist(),
           "objects": [{"3": tag_T_obj.tolist(), "4": tag_T_obj.tolist()}, {"7": np.eye(4).tolist()}]}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    source = AprilTagPoseSource(str(tmp_path / "cal.json"), 2, alpha=0.5)
    source.cap = SimpleNamespace(read=lambda: (True, np.zeros((480, 640, 3), np.uint8)))
    R_tag = Rotation.from_euler("z", 20, degrees=True).as_matrix()
    seen = [SimpleNamespace(tag_id=3, pose_R=R_tag, pose_t=np.array([[0.1], [0.0], [0.6]])),
            SimpleNamespace(tag_id=4, pose_R=R_tag, pose_t=np.array([[0.1], [0.02], [0.6]]))]
    source.detector = SimpleNamespace(detect=lambda *a, **k: seen)
    with pytest.raises(RobotError, match="never seen"):
        source.read()  # object 2 (tag 7) not seen yet
    seen.append(SimpleNamespace(tag_id=7, pose_R=np.eye(3), pose_t=np.array([[0.0], [0.0], [0.5]])))
    source._poses = None
    poses = source.read()
    expect = base_T_cam @ T(R_tag, [0.1, 0.01, 0.6]) @ tag_T_obj  # the two tags' mean
    assert np.allclose(poses[0, :3], expect[:3, 3]) and np.allclose(quat_to_matrix(poses[0, 3:]), expect[:3, :3])
    assert np.allclose(poses[1, :3], (base_T_cam @ T(np.eye(3), [0, 0, 0.5]))[:3, 3])
    seen[2] = SimpleNamespace(tag_id=7, pose_R=np.eye(3), pose_t=np.array([[0.0], [0.0], [0.6]]))  # moved 10 cm
    moved = source.read()
    assert np.allclose(moved[1, :3], (poses[1, :3] + (base_T_cam @ T(np.eye(3), [0, 0, 0.6]))[:3, 3]) / 2)  # EMA 0.5
    del seen[2]
    assert np.allclose(source.read()[1], moved[1])  # hidden: keeps its last pose


def test_apriltag_source_without_its_package_is_one_line(tmp_path, monkeypatch):
    from hardware.robot import AprilTagPoseSource
    monkeypatch.setitem(sys.modules, "pupil_apriltags", None)
    with pytest.raises(UsageError, match="pip install pupil-apriltags"):
        AprilTagPoseSource(str(tmp_path / "cal.json"), 1)


def test_bad_input_is_refused_in_one_line(tmp_path, monkeypatch):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.5, 0.0, 0.3]))
    with pytest.raises(UsageError, match="gripper-force"):
        deploy.main(fake_args(tmp_path, ckpt, gripper_force=50.0))
    with pytest.raises(UsageError, match="workspace"):
        deploy.main(fake_args(tmp_path, ckpt, workspace_min=(0.5, 0, 0), workspace_max=(0.4, 1, 1)))
    with pytest.raises(UsageError, match="robot-ip"):
        deploy.main(fake_args(tmp_path, ckpt, robot="franky"))
    (tmp_path / "episode.jsonl").write_text("earlier episode\n")
    with pytest.raises(UsageError, match="never overwritten"):
        deploy.main(fake_args(tmp_path, ckpt))
    assert (tmp_path / "episode.jsonl").read_text() == "earlier episode\n"
    other = torch.load(ckpt, weights_only=True) | {"action_dim": 7}
    other["normalization"] |= {k: other["normalization"][k][:7] for k in ("action_min", "action_max")}  # lift's 7
    torch.save(other, tmp_path / "lift.pt")
    with pytest.raises(UsageError, match="absolute end-effector poses"):
        deploy.main(fake_args(tmp_path, str(tmp_path / "lift.pt"), log=str(tmp_path / "x.jsonl")))
    robot = FakeRobot(pos=(0.1, 0.0, 0.35))  # starts outside the box: refused before any motion
    with pytest.raises(RobotError, match="outside the workspace box .* at the start"):
        deploy.main(fake_args(tmp_path, ckpt, log=str(tmp_path / "z.jsonl")), robot=robot)
    assert robot.sent == [] and not robot.started
    monkeypatch.setitem(sys.modules, "franky", None)
    with pytest.raises(UsageError, match="pip install franky-control"):
        deploy.main(fake_args(tmp_path, ckpt, robot="franky", robot_ip="127.0.0.1", log=str(tmp_path / "y.jsonl")))


# ---- sampling equals the training scripts' ----

def diffusion_checkpoint(path, K=20, horizon=4, finetuned=None):
    torch.manual_seed(0)
    arch = dict(action_dim=10, horizon_steps=horizon, obs_dim=16, cond_steps=1, time_dim=8, mlp_dims=(32, 32, 32))
    net = DiffusionMLP(**arch)
    norm = Normalizer(-np.ones(16), np.ones(16), np.r_[0.3, -0.3, 0.1, -np.ones(7)], np.r_[0.7, 0.3, 0.5, np.ones(7)])
    ckpt = {"format": CHECKPOINT_FORMAT, "policy": "diffusion", "backbone": "mlp", "arch": arch, "task": "franka-reach",
            "obs_dim": 16, "action_dim": 10, "horizon_steps": horizon, "cond_steps": 1, "denoising_steps": K,
            "normalization": norm.state_dict(), "args": {}, "ema": net.state_dict()}
    if finetuned:
        ft = DiffusionMLP(**arch)
        ckpt = {**{k: v for k, v in ckpt.items() if k != "ema"}, "base": net.state_dict(), "actor_ft": ft.state_dict(),
                "args": finetuned}
    save_checkpoint(path, ckpt)
    return path


@pytest.mark.parametrize("use_ddim,K,ft", [(False, 20, None), (True, 100, None), (False, 20, 10), (True, 100, 5)])
def test_diffusion_samples_equal_dppo_finetune(tmp_path, use_ddim, K, ft):
    import dppo_finetune
    from common.networks import build_diffusion_network
    saved = dict(use_ddim=use_ddim, ddim_steps=5, ft_denoising_steps=ft, act_steps=4) if ft else None
    path = diffusion_checkpoint(str(tmp_path / "d.pt"), K=K, finetuned=saved)
    args = deploy.Args(checkpoint=path, robot="fake", use_ddim=None if ft else use_ddim)
    policy, ckpt, info = deploy.load_policy(args)
    base = build_diffusion_network(ckpt, 4)
    base.load_state_dict(ckpt["base"] if ft else ckpt["ema"])
    agent = dppo_finetune.DiffusionPPO(base, torch.nn.Identity(), K, ft or (5 if use_ddim else 10), 4, 10, use_ddim, 5,
                                       0.1, 0.1, 3.0)
    agent.actor_ft.load_state_dict(ckpt["actor_ft"] if ft else ckpt["ema"])
    cond = torch.rand(3, 1, 16) * 2 - 1
    for deterministic in (True, False):
        torch.manual_seed(1)
        ours = policy(cond, deterministic)
        torch.manual_seed(1)
        theirs, _ = agent.get_action(cond, deterministic)
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert info["use_ddim"] == use_ddim and info["act_steps"] == 4


@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_gaussian_and_gmm_means_equal_the_training_scripts(tmp_path, kind):
    import gaussian_ppo
    import gmm_ppo
    torch.manual_seed(0)
    n_modes = 3 if kind == "gmm" else 0
    arch = dict(obs_dim=16, horizon_steps=4, out_dim=10 * max(n_modes, 1), cond_steps=1, mlp_dims=[32, 32],
                activation="relu", residual=False, **({"n_extra": n_modes} if n_modes else {}))
    if kind == "gmm":
        pol = gmm_ppo.GMMPolicy(ChunkMLP(**arch), 10, n_modes, 0.1, 0.01, 0.2)
    else:
        pol = gaussian_ppo.GaussianPolicy(ChunkMLP(**arch), 10, 0.1, 0.01, 0.2)
    norm = Normalizer(-np.ones(16), np.ones(16), -np.ones(10), np.ones(10))
    save_checkpoint(str(tmp_path / "p.pt"), {"format": CHECKPOINT_FORMAT, "policy": kind, "backbone": "mlp", "arch": arch,
                                             "task": "franka-reach", "obs_dim": 16, "action_dim": 10, "horizon_steps": 4,
                                             "cond_steps": 1, "std_limits": [0.01, 0.2], "normalization": norm.state_dict(),
                                             "args": {}, "ema": pol.state_dict()})
    policy, _, _ = deploy.load_policy(deploy.Args(checkpoint=str(tmp_path / "p.pt"), robot="fake"))
    cond = torch.rand(5, 1, 16) * 2 - 1
    script = gmm_ppo if kind == "gmm" else gaussian_ppo
    torch.manual_seed(2)
    theirs = script.sample_actions(pol, cond, True, 3.0)  # deterministic: σ = 1e-4 around the mean
    assert torch.allclose(policy(cond, True), theirs, atol=5e-4)
    assert not torch.allclose(policy(cond, True), policy(cond, False))


# ---- the real protocol: franky-sim ----

HAVE_SIM = importlib.util.find_spec("franky") is not None and importlib.util.find_spec("franky_sim") is not None
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="franky-control and franky-sim are not installed "
                                                    "(pip install -r requirements-franka.txt)")
# measured on this project's CPU machine (docs/deployment.md): final position error ~1-4 mm, orientation < 0.01 rad
POS_TOL, ROT_TOL = 0.010, 0.03


@pytest.fixture(scope="module")
def franky_sim_server():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-u", "-c", "from franky_sim.run_server import main; main()",
                             "--simulator", "mujoco"],  # the first free loopback address: 127.0.0.1, .2, ...
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 90
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Connect to the server" in line:  # "... using '127.0.0.1' as the robot IP address"
            host = line.split("'")[1]
            break
        if proc.poll() is not None:
            pytest.fail("franky-sim did not start: " + "".join(lines)[-2000:])
    else:
        proc.kill()
        pytest.fail("franky-sim did not start within 90 s")
    yield host
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def sim_args(tmp_path, ckpt, name, host, **kw):
    return deploy.Args(**{"checkpoint": ckpt, "robot_ip": host, "yes": True, "max_steps": 30,
                          "log": str(tmp_path / name), **kw})


@needs_sim
def test_franky_sim_tracks_the_commanded_pose(tmp_path, franky_sim_server):
    target = np.array([0.50, 0.06, 0.45])
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), target, gripper=1.0)  # and grasp (nothing there)
    out = deploy.main(sim_args(tmp_path, ckpt, "track.jsonl", franky_sim_server))
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert out["stop_reason"] == "done" and len(steps) == 30
    final = steps[-1]["state"]
    pos_err = np.linalg.norm(np.array(final["ee_pos"]) - target)
    rot_err = rotation_angle(quat_to_matrix(np.array(final["ee_quat"])).T @ quat_to_matrix(DOWN))
    # every command respected the per-step limit against the measured pose
    assert all(np.linalg.norm(np.array(s["command"]["pos"]) - s["state"]["ee_pos"]) <= 0.025 + 1e-9 for s in steps)
    print(f"franky-sim: final position error {pos_err * 1e3:.2f} mm, orientation {rot_err:.4f} rad, "
          f"policy latency {out['policy_latency_mean'] * 1e3:.2f} ms, lateness {out['period_lateness_mean'] * 1e3:.2f}"
          f" ± {out['period_lateness_std'] * 1e3:.2f} ms (max {out['period_lateness_max'] * 1e3:.2f})")
    assert pos_err < POS_TOL and rot_err < ROT_TOL
    widths = [s["state"]["gripper_width"] for s in steps]
    assert widths[-1] < widths[0] - 0.02, widths  # the Franka Hand of franky-sim closed


@needs_sim
def test_franky_sim_workspace_is_enforced(tmp_path, franky_sim_server):
    ckpt = reach_checkpoint(str(tmp_path / "low.pt"), np.array([0.50, 0.0, 0.20]))  # below the floor set here
    out = deploy.main(sim_args(tmp_path, ckpt, "floor.jsonl", franky_sim_server, workspace_min=(0.25, -0.4, 0.40),
                               max_steps=25))
    steps = [r for r in read_log(out["log"]) if r["type"] == "step"]
    assert all(s["command"]["pos"][2] >= 0.40 for s in steps)
    assert any("workspace" in s["clipped"] for s in steps)
    z = np.array([s["state"]["ee_pos"][2] for s in steps])
    assert z.min() > 0.40 - POS_TOL and abs(z[-1] - 0.40) < POS_TOL


@needs_sim
def test_franky_sim_sigint_stops_and_leaves_a_complete_log(tmp_path, franky_sim_server):
    ckpt = reach_checkpoint(str(tmp_path / "reach.pt"), np.array([0.45, -0.05, 0.42]))
    log = tmp_path / "sigint.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "deploy_franka.py"), "--checkpoint", ckpt,
                             "--robot-ip", franky_sim_server, "--yes", "--max-steps", "1000", "--log", str(log)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count('"type": "step"') < 10):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    records = read_log(log)
    steps = [r for r in records if r["type"] == "step"]
    assert proc.returncode == 0, output
    assert records[-1]["type"] == "end" and records[-1]["stop_reason"] == "interrupted"
    assert records[-1]["steps"] == len(steps) >= 10 and [s["step"] for s in steps] == list(range(len(steps)))
    assert "stopped after" in output


@pytest.mark.parametrize("finetuned", [False, True])
def test_flow_samples_equal_the_flow_scripts_evaluation_chain(tmp_path, finetuned):
    """A flow checkpoint deploys the noise-free Euler chain of flow_pretrain.py's evaluation (pre-trained: its EMA
    network) or of reinflow.py's (fine-tuned: `actor_ft`, not the frozen `base`), from the same x_0; the exploration
    noise is refused in one line."""
    import flow_pretrain
    import reinflow
    torch.manual_seed(0)
    arch = dict(action_dim=10, horizon_steps=4, obs_dim=16, cond_steps=1, time_dim=8, mlp_dims=(32, 32, 32))
    base, tuned = DiffusionMLP(**arch), DiffusionMLP(**arch)
    norm = Normalizer(-np.ones(16), np.ones(16), np.r_[0.3, -0.3, 0.1, -np.ones(7)], np.r_[0.7, 0.3, 0.5, np.ones(7)])
    ckpt = {"format": CHECKPOINT_FORMAT, "policy": "flow", "backbone": "mlp", "arch": arch, "task": "franka-reach",
            "obs_dim": 16, "action_dim": 10, "horizon_steps": 4, "cond_steps": 1, "denoising_steps": 4,
            "normalization": norm.state_dict(), "args": {}}
    ckpt.update({"base": base.state_dict(), "actor_ft": tuned.state_dict()} if finetuned else {"ema": base.state_dict()})
    path = str(tmp_path / "flow.pt")
    save_checkpoint(path, ckpt)
    policy, _, info = deploy.load_policy(deploy.Args(checkpoint=path, robot="fake"))
    cond = torch.rand(3, 1, 16) * 2 - 1
    agent = reinflow.ReinFlowAgent(base, torch.nn.Identity(), 4, (8,), 4, 10, (1, 16), 0.1, 0.24, 3.0, 1.0)
    agent.actor_ft.load_state_dict(tuned.state_dict())
    torch.manual_seed(1)
    ours = policy(cond, True)
    torch.manual_seed(1)
    if finetuned:
        theirs = agent.sample(cond, deterministic=True)[0]
    else:
        theirs = flow_pretrain.FlowPolicy(base, 4, 10).sample(cond, 4, clip_intermediate=True)
    assert torch.equal(ours, theirs) and info["denoising_steps"] == 4 and info["kind"] == "flow"
    with pytest.raises(UsageError, match="a flow policy deploys its noise-free Euler chain"):
        deploy.load_policy(deploy.Args(checkpoint=path, robot="fake", deterministic=False))
