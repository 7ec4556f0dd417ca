"""The robot hardware interface used by `deploy_franka.py` (paper §5.3, App. D.7 "Hardware setup"): what a
deployment reads from a Franka arm and what it sends to it, with two implementations of one small surface:

- `FrankyRobot`: a real arm (or `franky-sim`) over `franky-control` (PyPI), which bundles libfranka and
  streams Cartesian impedance targets to a 1 kHz torque loop (`franky.CartesianImpedanceTracker`).
  franky's wheels are built per robot server version: the default PyPI wheel speaks the protocol of the
  Franka Research 3 (FR3) on current system images (libfranka >= 0.10); a Franka Emika Robot / Panda
  (FER, libfranka < 0.10) or older FR3 firmware needs the wheel built for its server version (franky's FAQ
  "server version mismatch"), or `panda-python` (panda-py), whose PyPI wheel ships libfranka 0.9.2 for the
  Panda, behind this same interface (docs/deployment.md).
- `FakeRobot`: in-process, for unit tests: it records what it was sent and moves its end-effector toward
  the last target by a fixed fraction per observation.

Also the object-pose sources that complete a state observation (App. D.7 "state estimation"): a file or a
UDP socket (motion capture, tests), and AprilTags from a camera via `pupil-apriltags`.

Conventions: positions in metres in the robot base frame, quaternions (x, y, z, w) as franky and Isaac
Gym write them, 6D rotations as the first two rows of the rotation matrix (see `matrix_to_rot6d`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from common import rotations
from common.errors import UsageError


class RobotError(OSError):
    """The robot stopped being controllable: lost connection, a robot fault, stale object poses (an OSError, so
    `common.runs.cli` ends the script with one line)."""


# ---- rotations (quaternion x, y, z, w <-> matrix <-> 6D) ----

# One implementation of the conversions, batched in torch (common/rotations.py, which the furniture env uses), so that
# deployment builds exactly the observation and reads exactly the action the policy was trained with; here in float64.

def _np(f: Any, x: Any) -> np.ndarray:
    return f(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) (..., 4) in (x, y, z, w) order -> rotation matrices (..., 3, 3); q is normalised first."""
    return _np(rotations.quat_to_matrix, q)


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) (x, y, z, w) with w >= 0."""
    return _np(rotations.matrix_to_quat, R)


def matrix_to_rot6d(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> 6D (..., 6): the first two ROWS, flattened (Zhou et al., CVPR 2019, as the
    furniture-bench code of the reference's furniture env writes it; see common/rotations.py)."""
    return _np(rotations.matrix_to_rot6d, R)


def rot6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """6D (..., 6) -> rotation matrices (..., 3, 3) by Gram-Schmidt; a degenerate 6D vector (a half ~ 0, or the two
    halves parallel), which has no rotation, raises ValueError instead of giving one."""
    d6 = np.asarray(d6, dtype=np.float64)
    a1, a2 = d6[..., :3], d6[..., 3:6]
    n1 = np.linalg.norm(a1, axis=-1, keepdims=True)
    ortho = a2 - (a1 / np.maximum(n1, 1e-12) * a2).sum(-1, keepdims=True) * a1 / np.maximum(n1, 1e-12)
    if (n1 < 1e-6).any() or (np.linalg.norm(ortho, axis=-1) < 1e-6).any():
        raise ValueError("degenerate 6D rotation (its two halves are zero or parallel)")
    return _np(rotations.rot6d_to_matrix, d6)


def rotation_angle(R: np.ndarray) -> float:
    """The angle (rad, in [0, π]) of one rotation matrix."""
    return float(math.acos(max(-1.0, min(1.0, (np.trace(R) - 1) / 2))))


def axis_angle_to_matrix(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues' formula for one rotation vector (3,) -> (3, 3)."""
    v = np.asarray(axis_angle, dtype=np.float64)
    theta = float(np.linalg.norm(v))
    if theta < 1e-12:
        return np.eye(3)
    k = v / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * K + (1 - math.cos(theta)) * K @ K


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """One rotation matrix -> its rotation vector (3,) (angle times unit axis), via the quaternion."""
    q = matrix_to_quat(R)
    s = float(np.linalg.norm(q[:3]))
    return np.zeros(3) if s < 1e-12 else q[:3] / s * 2 * math.atan2(s, q[3])


# ---- the robot ----

@dataclass
class RobotState:
    """One reading of the arm, in the base frame: the furniture tasks' proprioception (App. D.7) and the joints."""
    ee_pos: np.ndarray
    """(3,) end-effector position [m]"""
    ee_quat: np.ndarray
    """(4,) end-effector orientation (x, y, z, w)"""
    ee_lin_vel: np.ndarray
    """(3,) end-effector linear velocity [m/s]"""
    ee_ang_vel: np.ndarray
    """(3,) end-effector angular velocity [rad/s]"""
    gripper_width: float
    """distance between the fingers [m]"""
    q: np.ndarray = field(default_factory=lambda: np.zeros(7))
    """(7,) joint positions [rad]"""
    dq: np.ndarray = field(default_factory=lambda: np.zeros(7))
    """(7,) joint velocities [rad/s]"""

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


class Robot(Protocol):
    """What a deployment needs from an arm. Every method raises RobotError when the arm is not controllable."""

    def start(self) -> None:
        """Take control: from here on the arm holds the last target (initially where it is)."""

    def observe(self) -> RobotState: ...

    def command_pose(self, pos: np.ndarray, quat: np.ndarray, twist: np.ndarray | None = None) -> None:
        """New end-effector target (position (3,), quaternion (4,) x, y, z, w), tracked by the impedance loop;
        `twist` (6,): an optional velocity feedforward (linear, angular) in the base frame."""

    def command_gripper(self, close: bool, force: float, speed: float) -> None:
        """Grasp with `force` [N] (close) or open the gripper, both at `speed` [m/s]; returns at once."""

    def stop(self) -> None:
        """Bring the arm to rest and release control (safe to call more than once, and after a fault)."""

    def close(self) -> None:
        """Drop the connection (after `stop`), so that another client can connect at once."""


class FakeRobot:
    """In-process stand-in for unit tests: every `observe` moves the end-effector a fraction `tracking` of the
    way to the last target (its velocity is that displacement over `dt` seconds); everything sent is kept in
    `sent`. `fail_after`: the observation after that many raises RobotError, as a lost connection would."""

    def __init__(self, pos: tuple[float, ...] = (0.45, 0.0, 0.35), quat: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0),
                 tracking: float = 1.0, gripper_width: float = 0.08, fail_after: int | None = None, dt: float = 0.1) -> None:
        self.pos, self.quat = np.array(pos, dtype=np.float64), np.array(quat, dtype=np.float64)
        self.target_pos, self.target_quat = self.pos.copy(), self.quat.copy()
        self.tracking, self.gripper_width, self.fail_after, self.dt = tracking, gripper_width, fail_after, dt
        self.sent: list[tuple] = []
        self.twists: list[np.ndarray | None] = []
        self.started = self.stopped = self.closed = False
        self.n_observe = 0

    def start(self) -> None:
        self.started = True

    def observe(self) -> RobotState:
        self.n_observe += 1
        if self.fail_after is not None and self.n_observe > self.fail_after:
            raise RobotError("connection to the fake robot lost")
        before = self.pos.copy()
        if self.started and not self.stopped:
            self.pos = self.pos + self.tracking * (self.target_pos - self.pos)
            self.quat = self.target_quat.copy()
        return RobotState(self.pos.copy(), self.quat.copy(), (self.pos - before) / self.dt, np.zeros(3),
                          self.gripper_width)

    def command_pose(self, pos: np.ndarray, quat: np.ndarray, twist: np.ndarray | None = None) -> None:
        if not self.started or self.stopped:
            raise RobotError("the fake robot is not under control")
        self.sent.append(("pose", np.array(pos, dtype=np.float64), np.array(quat, dtype=np.float64)))
        self.twists.append(None if twist is None else np.array(twist, dtype=np.float64))
        self.target_pos, self.target_quat = np.array(pos, dtype=np.float64), np.array(quat, dtype=np.float64)

    def command_gripper(self, close: bool, force: float, speed: float) -> None:
        self.sent.append(("gripper", close, force, speed))
        self.gripper_width = 0.0 if close else 0.08

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


def _import_franky() -> Any:
    try:
        import franky
    except ImportError:
        raise UsageError("the real robot needs franky-control, which is not installed: pip install franky-control "
                         "(FR3; for a Panda see docs/deployment.md)") from None
    return franky


class FrankyRobot:
    """A Franka arm (FR3, or a Panda with a matching franky wheel) or `franky-sim` through `franky-control`:
    end-effector targets stream into franky's Cartesian impedance tracker (a torque loop at 1 kHz on the
    control box side; the paper's setup used joint impedance with differential IK, App. D.7), the gripper is
    the Franka Hand through `franky.Gripper`. `stiffness`: translational [N/m] and rotational [Nm/rad]."""

    def __init__(self, host: str, translational_stiffness: float = 1000.0, rotational_stiffness: float = 100.0,
                 gripper: bool = True) -> None:
        self.franky = _import_franky()
        self.stiffness = (translational_stiffness, rotational_stiffness)
        try:
            self.robot = self.franky.Robot(host, realtime_config=self.franky.RealtimeConfig.Ignore)
            self.gripper = self.franky.Gripper(host) if gripper else None
        except Exception as e:  # noqa: BLE001 - franky raises its own exception types, all mean "cannot connect"
            raise RobotError(f"cannot connect to the robot at {host} ({type(e).__name__}: {e})") from None
        self.tracker: Any = None
        self._model: Any = None
        self._gripper_busy: Any = None

    def start(self) -> None:
        try:
            self.robot.recover_from_errors()
            self.tracker = self.franky.CartesianImpedanceTracker(
                self.robot, translational_stiffness=self.stiffness[0], rotational_stiffness=self.stiffness[1])
        except Exception as e:  # noqa: BLE001
            raise RobotError(f"cannot start the impedance controller ({type(e).__name__}: {e})") from None

    def observe(self) -> RobotState:
        """One libfranka state snapshot: the measured pose O_T_EE, joints q, dq, and the end-effector twist
        J(q)·dq in the base frame (the `_c`/`_d` twists of the state are commands, not measurements)."""
        try:
            s = self.robot.state
            if self._model is None:
                self._model = self.robot.model
            twist = self._model.zero_jacobian(self.franky.Frame.EndEffector, s) @ np.asarray(s.dq, dtype=np.float64)
            width = float(self.gripper.width) if self.gripper is not None else 0.0
        except Exception as e:  # noqa: BLE001
            raise RobotError(f"lost the robot ({type(e).__name__}: {e})") from None
        pose = s.O_T_EE
        return RobotState(np.array(pose.translation, dtype=np.float64), np.array(pose.quaternion, dtype=np.float64),
                          twist[:3], twist[3:], width, np.array(s.q, dtype=np.float64), np.array(s.dq, dtype=np.float64))

    def command_pose(self, pos: np.ndarray, quat: np.ndarray, twist: np.ndarray | None = None) -> None:
        try:
            if self.tracker is None or not self.robot.is_in_control:
                self.robot.poll_motion()  # raises the fault that ended control, if any
                raise RobotError("the robot left the impedance controller")
            target = self.franky.Affine(np.asarray(pos, dtype=np.float64), np.asarray(quat, dtype=np.float64))
            if twist is None:
                self.tracker.set_target(target)
            else:
                twist = np.asarray(twist, dtype=np.float64)
                self.tracker.set_target(target, self.franky.Twist(twist[:3], twist[3:]))
        except RobotError:
            raise
        except Exception as e:  # noqa: BLE001
            raise RobotError(f"robot fault ({type(e).__name__}: {e})") from None

    def command_gripper(self, close: bool, force: float, speed: float) -> None:
        if self.gripper is None:
            return
        try:
            if close:  # any width counts as a grasp (epsilons cover the whole stroke)
                self._gripper_busy = self.gripper.grasp_async(0.0, speed, force, epsilon_inner=0.1, epsilon_outer=0.1)
            else:
                self._gripper_busy = self.gripper.move_async(self.gripper.max_width, speed)
        except Exception as e:  # noqa: BLE001
            raise RobotError(f"gripper fault ({type(e).__name__}: {e})") from None

    def stop(self) -> None:
        """Ramp the torque into pure damping until the arm rests (franky `TorqueStopMotion`), else libfranka's stop."""
        try:
            if self.tracker is not None:
                self.tracker.stop()
        except Exception:  # noqa: BLE001 - stopping after a fault: fall back to the plain stop
            try:
                self.robot.stop()
            except Exception:  # noqa: BLE001
                pass
        self.tracker = None

    def close(self) -> None:
        """Release franky's objects: their destructors close the libfranka connections (a traceback that keeps
        this object alive then does not keep the robot connected)."""
        self.tracker = self._model = self._gripper_busy = self.gripper = self.robot = None


# ---- object poses ----

class PoseSource(Protocol):
    """The poses of the task's objects, (n_objects, 7): position and quaternion (x, y, z, w) in the base frame."""

    def read(self) -> np.ndarray: ...


def _check_poses(poses: Any, n_objects: int, where: str) -> np.ndarray:
    try:
        arr = np.asarray(poses, dtype=np.float64)
    except (TypeError, ValueError):  # a JSON object, strings, ragged lists
        raise RobotError(f"{where}: expected {n_objects} object poses of 7 numbers (x y z qx qy qz qw), got "
                         f"{json.dumps(poses)[:60]}") from None
    if arr.size != 7 * n_objects or not np.isfinite(arr).all():
        raise RobotError(f"{where}: expected {n_objects} finite object poses of 7 numbers (x y z qx qy qz qw), "
                         f"got {np.size(poses)} numbers")
    return arr.reshape(n_objects, 7)


class FilePoseSource:
    """Poses from a JSON file (a list of n_objects lists of 7 numbers), re-read whenever it changes, so a
    motion-capture bridge can overwrite it (atomically: write a temp file, then rename)."""

    def __init__(self, path: str, n_objects: int) -> None:
        if not os.path.isfile(path):
            raise UsageError(f"--object-poses file {path!r} not found")
        self.path, self.n_objects, self._mtime, self._poses = path, n_objects, -1.0, np.zeros((n_objects, 7))
        self.read()

    def read(self) -> np.ndarray:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self._mtime:
                with open(self.path) as f:
                    self._poses = _check_poses(json.load(f), self.n_objects, self.path)
                self._mtime = mtime
        except (OSError, ValueError) as e:
            raise RobotError(f"object poses {self.path!r}: {e}") from None
        return self._poses.copy()


class UDPPoseSource:
    """Poses from UDP datagrams on `host:port`, each a JSON list of n_objects lists of 7 numbers; the newest
    datagram counts. No datagram for `max_age` seconds ends the episode (RobotError), since a stale pose is
    a wrong observation."""

    def __init__(self, address: str, n_objects: int, max_age: float = 0.5) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise UsageError(f"--object-poses udp:{address}: give udp:HOST:PORT")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host or "127.0.0.1", int(port)))
        self.sock.setblocking(False)
        self.n_objects, self.max_age, self._poses, self._t = n_objects, max_age, None, -math.inf

    def read(self) -> np.ndarray:
        while True:  # drain: keep the newest
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            try:
                self._poses, self._t = _check_poses(json.loads(data), self.n_objects, "udp poses"), time.monotonic()
            except ValueError as e:
                raise RobotError(f"udp poses: {e}") from None
        if self._poses is None or time.monotonic() - self._t > self.max_age:
            raise RobotError(f"no object poses on udp in the last {self.max_age} s")
        return self._poses.copy()


class AprilTagPoseSource:
    """Object poses from AprilTags seen by one camera (App. D.7): `pupil-apriltags` detects tags (family
    tag36h11) and their camera-frame poses; a calibration JSON gives the camera intrinsics (fx, fy, cx, cy),
    the tag size [m], the camera pose in the base frame (`base_T_camera`, 4x4) and, per object, its tag ids
    and each tag's offset to the object centre (`tag_T_object`, 4x4). Several tags of one object are
    averaged; each object's pose is low-pass filtered (EMA `alpha`, paper App. D.7). Tested with stand-in
    detections only (no camera here)."""

    def __init__(self, calibration: str, n_objects: int, camera: int = 0, alpha: float = 0.5) -> None:
        try:
            import cv2
            from pupil_apriltags import Detector
        except ImportError:
            raise UsageError("--object-poses apriltag needs pupil-apriltags: pip install pupil-apriltags") from None
        try:  # a missing, truncated or binary file, or another layout: one line naming the file
            with open(calibration) as f:
                cal = json.load(f)
            self.intrinsics = tuple(float(x) for x in cal["intrinsics"])
            self.tag_size, self.base_T_cam = float(cal["tag_size"]), np.array(cal["base_T_camera"], dtype=np.float64)
            self.objects = [{int(k): np.array(v, dtype=np.float64) for k, v in obj.items()} for obj in cal["objects"]]
            ok = (len(self.intrinsics) == 4 and self.base_T_cam.shape == (4, 4)
                  and all(v.shape == (4, 4) for obj in self.objects for v in obj.values()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise UsageError(f"--object-poses apriltag:{calibration}: not a calibration file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}); see AprilTagPoseSource for its layout") from None
        if not ok:
            raise UsageError(f"--object-poses apriltag:{calibration}: intrinsics must be 4 numbers (fx, fy, cx, cy) and "
                             "base_T_camera and each tag_T_object a 4x4 matrix")
        if len(self.objects) != n_objects:
            raise UsageError(f"{calibration}: {len(self.objects)} objects, the policy needs {n_objects}")
        self.cap, self.cv2 = cv2.VideoCapture(camera), cv2
        self.detector, self.alpha = Detector(families="tag36h11"), alpha
        self._poses: np.ndarray | None = None

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok:
            raise RobotError("the camera returned no frame")
        gray = self.cv2.cvtColor(frame, self.cv2.COLOR_BGR2GRAY)
        seen = {d.tag_id: d for d in self.detector.detect(gray, estimate_tag_pose=True, camera_params=self.intrinsics,
                                                          tag_size=self.tag_size)}
        poses = self._poses.copy() if self._poses is not None else np.full((len(self.objects), 7), np.nan)
        for i, tags in enumerate(self.objects):
            estimates = []
            for tag_id, tag_T_obj in tags.items():
                if tag_id in seen:
                    cam_T_tag = np.eye(4)
                    cam_T_tag[:3, :3], cam_T_tag[:3, 3] = seen[tag_id].pose_R, seen[tag_id].pose_t.ravel()
                    estimates.append(self.base_T_cam @ cam_T_tag @ tag_T_obj)
            if not estimates:
                continue  # keep the last estimate (a hidden tag); never seen -> NaN -> refused below
            pos = np.mean([T[:3, 3] for T in estimates], axis=0)
            quats = np.array([matrix_to_quat(T[:3, :3]) for T in estimates])
            quats *= np.sign(quats @ quats[0])[:, None]  # one hemisphere before averaging
            quat = quats.mean(0) / np.linalg.norm(quats.mean(0))
            if self._poses is not None and np.isfinite(self._poses[i]).all():
                old = self._poses[i]
                pos = self.alpha * pos + (1 - self.alpha) * old[:3]
                quat = self.alpha * quat + (1 - self.alpha) * old[3:] * np.sign(old[3:] @ quat)
                quat /= np.linalg.norm(quat)
            poses[i] = np.concatenate([pos, quat])
        self._poses = poses
        return _check_poses(poses, len(self.objects), "apriltag (an object was never seen)")
