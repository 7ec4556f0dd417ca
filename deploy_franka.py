"""Deploy a policy of this project on a Franka arm (paper §5.3 "Sim-to-real transfer", App. D.7 "Hardware setup").

The paper runs a state policy on a Franka at 10 Hz: each chunk of T_a absolute end-effector poses
(position, 6D rotation, gripper) is sampled from the current observation, its first T_e poses are
sent one per control period to an impedance controller running at 1 kHz, and the objects' poses come
from AprilTags. This script does that for any checkpoint of this project whose actions are absolute
end-effector poses (action_dim 10) and whose observation is the furniture layout (16 + 7·n_objects):

| paper | here | shape / value |
|---|---|---|
| s (robot) | `robot_obs` | (16,): ee pos 3, ee 6D rotation 6, ee linear velocity 3, ee angular velocity 3, gripper width 1 |
| s (objects) | `pose_source.read()` | (n_objects, 7): position, quaternion (x, y, z, w) |
| a | `chunk[k]` | (10,): ee position 3, ee 6D rotation 6, gripper 1 (its sign flipping past ±0.019 closes / opens) |
| T_o, T_a, T_e | `cond_steps`, `horizon_steps`, `act_steps` | from the checkpoint; --act-steps overrides T_e |
| K, K' | `denoising_steps`, `ft_denoising_steps` | from the checkpoint (DDPM, or DDIM `ddim_steps`) |
| control rate | `control_hz` | 10 Hz (furniture, App. D.7) |

Safety, before anything reaches the arm: every commanded position is clipped to the workspace box and
to a maximum translation per step (--max-step, and --max-speed / control_hz), every rotation to
--max-rotation-step; a clipped command is logged with what the policy asked for. A measured
end-effector speed above 2·--max-speed, a lost connection or robot fault, stale object poses, or a
policy output that is not finite stops the robot; so do Ctrl-C and SIGTERM. The episode file (JSON
lines: a header, one line per control step with observation, action, sent command, clips and
timings, one line per chunk with the policy latency, a last `end` line with the reason) is flushed
line by line, so it is complete whatever ends the episode. `--dry-run` prints what would be sent and
sends nothing; a prompt asks before the first motion unless `--yes`.

Deviations from the paper's hardware setup (docs/deviations.md, docs/deployment.md):
- Tracking is franky's Cartesian impedance controller, not joint impedance after differential IK
  (Polymetis, App. D.7); neither the paper's nor the reference's deployment code was released.
- Normalised observations are clamped to [-5, 5] as the reference furniture wrapper does
  (`irom-princeton/dppo` `env/gym_utils/wrapper/furniture.py`, `process_obs`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn as nn

from common import runs
from common.networks import ChunkMLP, ChunkTransformer, build_diffusion_network
from common.normalizer import Normalizer
from common.tasks import TASKS
from hardware.robot import (AprilTagPoseSource, FakeRobot, FilePoseSource, FrankyRobot, RobotError, RobotState, UDPPoseSource,
                            axis_angle_to_matrix, matrix_to_axis_angle, matrix_to_quat, matrix_to_rot6d, quat_to_matrix,
                            rot6d_to_matrix, rotation_angle)

ROBOT_OBS_DIM, POSE_DIM, ACTION_DIM = 16, 7, 10
MAX_CLIP_PRINTS = 5
WORKSPACE_MARGIN = 0.02  # [m] how far tracking may overshoot the box before the robot is stopped
GRASP_MARGIN = 0.02 - 0.001  # furniture-bench's `grasp_margin` (its sim env's step), against open/close chatter
Positive, Angle = runs.POSITIVE, runs.Limits(0, math.pi, strict=True)  # an angle in (0, π]


@dataclass
class Args:
    # experiment
    checkpoint: str | None = None  # a checkpoint of this project: diffusion (pre-trained or fine-tuned), Gaussian or GMM
    robot: Literal["franky", "fake"] = "franky"  # franky: a Franka (or franky-sim) via franky-control; fake: a stand-in
    robot_ip: str | None = None  # the robot's FCI address (franky-sim: 127.0.0.1)
    object_poses: str | None = None  # file:PATH, udp:HOST:PORT or apriltag:CALIBRATION.json (docs/deployment.md)
    log: str | None = None  # episode file (JSON lines); None: runs/deploy_franka__{task}__{time}.jsonl
    seed: Annotated[int, runs.SEED] = 0  # seed of the policy's sampling noise
    torch_threads: Annotated[int, Positive] = 1  # CPU threads for the policy
    dry_run: bool = False  # read the robot, run the policy, print every command instead of sending it
    yes: bool = False  # skip the confirmation prompt before the first motion
    # controller (docs/deployment.md "What the script does each control period")
    control_hz: Annotated[float, runs.Limits(0.1, 1000.0)] = 10.0  # one pose per period (furniture: 10 Hz; torque loop: 1 kHz)
    act_steps: Annotated[int | None, Positive] = None  # T_e: poses of each chunk that are sent (None: the checkpoint's)
    max_steps: Annotated[int | None, Positive] = None  # control steps of the episode (None: the task's episode, else 100)
    deterministic: bool = True  # sample without exploration noise (DDPM σ floor 1e-3, DDIM η = 0, Gaussian/GMM mean, flow)
    use_ddim: bool | None = None  # pre-trained diffusion: DDIM (None: on furniture); fine-tuned ones sample as trained
    ddim_steps: Annotated[int | None, Positive] = None  # pre-trained diffusion checkpoints: DDIM steps (None: 5)
    velocity_feedforward: bool = True  # the target's velocity: (target - measured pose) x control_hz (App. D.7; off: none)
    translational_stiffness: Annotated[float, Positive] = 1000.0  # impedance controller stiffness [N/m]
    rotational_stiffness: Annotated[float, Positive] = 100.0  # impedance controller stiffness [Nm/rad]
    # safety (docs/deployment.md "Safety")
    workspace_min: tuple[float, float, float] = (0.25, -0.40, 0.02)  # lower corner of the end-effector box, base frame [m]
    workspace_max: tuple[float, float, float] = (0.80, 0.40, 0.60)  # upper corner of the end-effector box [m]
    max_speed: Annotated[float, Positive] = 0.25  # [m/s]: steps <= max_speed/control_hz; a measured speed > 2x stops the arm
    max_step: Annotated[float, Positive] = 0.03  # largest translation between the measured position and a commanded one [m]
    max_rotation_step: Annotated[float, Angle] = 0.3  # largest rotation between the measured and a commanded pose [rad]
    gripper_force: Annotated[float, Positive] = 10.0  # grasping force [N]
    max_gripper_force: Annotated[float, runs.Limits(0, 70.0, strict=True)] = 20.0  # bound on --gripper-force [N] (Hand: 70)
    gripper_speed: Annotated[float, Positive] = 0.1  # finger speed [m/s]


# ---- the policy (sampling as in dppo_finetune.py / gaussian_ppo.py / gmm_ppo.py, evaluation mode) ----

def cosine_beta_schedule(K: int, s: float = 0.008) -> torch.Tensor:
    """β_1..β_K of the cosine schedule, float64 (reference `model/diffusion/sampling.py`; as in dppo_finetune.py)."""
    i = torch.linspace(0, K + 1, K + 1, dtype=torch.float64) / (K + 1)
    alphas_cumprod = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


class DiffusionSampler(nn.Module):
    """DDPM or DDIM sampling of a chunk (reference `model/diffusion/diffusion.py`, `DiffusionModel.forward`);
    `base` runs the first K - K' visited steps, `ft` the last K' (DPPO fine-tuning, §4.1). The same float32
    coefficients and operations as `dppo_finetune.DiffusionPPO` (a test checks equal samples)."""

    def __init__(self, base: nn.Module, ft: nn.Module, K: int, K_ft: int, use_ddim: bool, ddim_steps: int,
                 horizon_steps: int, action_dim: int, min_std: float, randn_clip: float) -> None:
        super().__init__()
        self.base, self.ft, self.use_ddim, self.T_a, self.D_a = base, ft, use_ddim, horizon_steps, action_dim
        self.min_std, self.randn_clip = min_std, randn_clip
        betas = cosine_beta_schedule(K).float()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        one = torch.ones(1)
        if use_ddim:
            ts = (torch.arange(0, ddim_steps) * (K // ddim_steps)).flip(0)
            a, a_prev = ac[ts], torch.cat([ac[ts[1:]], one])
            sigma = (1.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)
            sigma0 = (0.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5).clamp(min=1e-10)
            self.c = dict(sqrt_a=a**0.5, sqrt_1ma=(1.0 - a) ** 0.5, sqrt_a_prev=a_prev**0.5,
                          dir=(1.0 - a_prev - sigma**2).clamp(min=0).sqrt(),
                          dir0=(1.0 - a_prev - sigma0**2).clamp(min=0).sqrt(), std=torch.exp(0.5 * torch.log(sigma**2)))
        else:
            ts = torch.arange(K - 1, -1, -1)
            ac_prev = torch.cat([one, ac[:-1]])
            var = betas * (1.0 - ac_prev) / (1.0 - ac)
            self.c = dict(sqrt_recip_ac=torch.sqrt(1.0 / ac)[ts], sqrt_recipm1_ac=torch.sqrt(1.0 / ac - 1)[ts],
                          c1=(betas * torch.sqrt(ac_prev) / (1.0 - ac))[ts],
                          c2=((1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac))[ts],
                          std=torch.exp(0.5 * torch.log(torch.clamp(var, min=1e-20)))[ts])
        self.ts, self.first_ft = ts, len(ts) - K_ft

    @torch.no_grad()
    def forward(self, cond: torch.Tensor, deterministic: bool) -> torch.Tensor:
        B, c = cond.shape[0], self.c
        x = torch.randn(B, self.T_a, self.D_a)
        for j in range(len(self.ts)):
            net = self.base if j < self.first_ft else self.ft
            eps = net(x, self.ts[j].expand(B), cond)
            if self.use_ddim:
                x0 = ((x - c["sqrt_1ma"][j] * eps) / c["sqrt_a"][j]).clamp(-1, 1)
                eps = (x - c["sqrt_a"][j] * x0) / c["sqrt_1ma"][j]
                mean = c["sqrt_a_prev"][j] * x0 + c["dir0" if deterministic else "dir"][j] * eps
            else:
                x0 = (c["sqrt_recip_ac"][j] * x - c["sqrt_recipm1_ac"][j] * eps).clamp(-1, 1)
                mean = c["c1"][j] * x0 + c["c2"][j] * x
            std = c["std"][j]
            if deterministic:  # DDPM: σ floored at 1e-3 and none at the last step; DDIM: η = 0
                std = torch.zeros_like(std) if (self.use_ddim or j == len(self.ts) - 1) else std.clamp(min=1e-3)
            else:
                std = std.clamp(min=self.min_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
        return x


class FlowSampler(nn.Module):
    """The noise-free K-step Euler chain of a flow policy (`flow_pretrain.py`; fine-tuned: `reinflow.py`'s velocity
    network) from x_0 ~ N(0, I): x <- clamp(x + v(x, k/K, s)/K, -1, 1), the grid and clamps of both scripts'
    evaluation. A flow policy has no exploration noise to deploy (reinflow.py's noise network is for training)."""

    def __init__(self, network: nn.Module, K: int, horizon_steps: int, action_dim: int) -> None:
        super().__init__()
        self.network, self.K, self.T_a, self.D_a = network, K, horizon_steps, action_dim
        self.register_buffer("t", torch.linspace(0, 1 - 1 / K, K), persistent=False)

    @torch.no_grad()
    def forward(self, cond: torch.Tensor, deterministic: bool) -> torch.Tensor:
        x = torch.randn(cond.shape[0], self.T_a, self.D_a)
        for k in range(self.K):
            x = (x + self.network(x, self.t[k].expand(x.shape[0]), cond) * (1 / self.K)).clamp(-1, 1)
        return x


class ChunkPolicy(nn.Module):
    """Gaussian (n_modes 0) or GMM policy head over `network` (paper App. D.6): means tanh(μ), σ = exp(log_std)
    clamped to the checkpoint's std limits; evaluation takes the mean (of the most likely mode)."""

    def __init__(self, network: nn.Module, action_dim: int, n_modes: int, std_limits: list[float]) -> None:
        super().__init__()
        self.network, self.n_modes = network, n_modes
        self.log_std = nn.Parameter(torch.zeros((n_modes, action_dim) if n_modes else (action_dim,)))
        self.log_std_limits = (math.log(std_limits[0]), math.log(std_limits[1]))

    @torch.no_grad()
    def forward(self, cond: torch.Tensor, deterministic: bool) -> torch.Tensor:
        h, logits = self.network(cond)
        std = self.log_std.clamp(*self.log_std_limits).exp()
        if self.n_modes:
            B, T_a = h.shape[:2]
            means = torch.tanh(h.view(B, T_a, self.n_modes, -1).transpose(1, 2))
            m = logits.argmax(-1) if deterministic else torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
            mean, std = means[torch.arange(B), m], std[m][:, None]
        else:
            mean = torch.tanh(h)
        return mean if deterministic else mean + std * torch.randn_like(mean).clamp(-3, 3)


def load_policy(args: Args) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The policy of `args.checkpoint`, its checkpoint and what sampling uses (T_a, T_e, DDIM, ...)."""
    path = args.checkpoint
    ckpt = runs.load_checkpoint(path, None, "python dppo_pretrain.py, then dppo_finetune.py")  # any kind of this project
    kind = ckpt["policy"]
    if kind == "flow" and not args.deterministic:
        raise runs.UsageError("--no-deterministic: a flow policy deploys its noise-free Euler chain (reinflow.py's noise "
                              "network explores in training only)")
    if ckpt["action_dim"] != ACTION_DIM or (ckpt["obs_dim"] - ROBOT_OBS_DIM) % POSE_DIM or ckpt["obs_dim"] < ROBOT_OBS_DIM:
        raise runs.UsageError(f"checkpoint {path!r} (task {ckpt['task']}, obs {ckpt['obs_dim']}, action "
                              f"{ckpt['action_dim']}) does not act in absolute end-effector poses: deploy_franka.py needs "
                              f"action {ACTION_DIM} (position, 6D rotation, gripper) and obs {ROBOT_OBS_DIM} + "
                              f"{POSE_DIM}·n_objects")
    saved = ckpt.get("args", {}) or {}
    task = TASKS.get(ckpt["task"])
    info: dict[str, Any] = {"kind": kind, "cond_steps": ckpt["cond_steps"],
                            "n_objects": (ckpt["obs_dim"] - ROBOT_OBS_DIM) // POSE_DIM}
    if kind == "diffusion":
        finetuned = "actor_ft" in ckpt
        if finetuned and (args.use_ddim is not None or args.ddim_steps is not None):
            raise runs.UsageError("--use-ddim/--ddim-steps: a DPPO fine-tuned checkpoint samples as it was fine-tuned")
        use_ddim = saved.get("use_ddim") if finetuned else args.use_ddim
        use_ddim = bool(use_ddim if use_ddim is not None else (task is not None and task.suite == "furniture"))
        ddim_steps = (saved.get("ddim_steps") if finetuned else args.ddim_steps) or 5
        K = ckpt["denoising_steps"]
        if use_ddim and K % ddim_steps:
            raise runs.UsageError(f"DDIM with {ddim_steps} steps needs K divisible by it (checkpoint K = {K})")
        horizon = saved.get("horizon_steps") or ckpt["horizon_steps"]
        base = build_diffusion_network(ckpt, horizon)
        runs.load_weights(base, ckpt["base"] if finetuned else runs.whole_network_weights(ckpt, path), path)
        ft = base
        K_ft = 0
        if finetuned:
            ft, K_ft = build_diffusion_network(ckpt, horizon), int(saved.get("ft_denoising_steps") or 0)
            runs.load_weights(ft, ckpt["actor_ft"], path)
        policy: nn.Module = DiffusionSampler(base.eval(), ft.eval(), K, K_ft, use_ddim, ddim_steps, horizon, ACTION_DIM,
                                             saved.get("min_sampling_denoising_std") or 0.1,
                                             saved.get("randn_clip_value") or 3.0)
        info.update(use_ddim=use_ddim, ddim_steps=ddim_steps if use_ddim else None, denoising_steps=K, ft_denoising_steps=K_ft)
    elif kind == "flow":  # pre-trained (ema) or fine-tuned by reinflow.py (actor_ft, its K)
        horizon, K = ckpt["horizon_steps"], ckpt["denoising_steps"]
        network = build_diffusion_network(ckpt, horizon)
        runs.load_weights(network, ckpt["actor_ft"] if "actor_ft" in ckpt else runs.whole_network_weights(ckpt, path), path)
        policy = FlowSampler(network.eval(), K, horizon, ACTION_DIM)
        info.update(denoising_steps=K)
    else:
        horizon = ckpt["horizon_steps"]
        arch = dict(ckpt["arch"])
        if ckpt["backbone"] not in ("mlp", "transformer"):
            raise runs.DatasetError(f"checkpoint {path!r}: unknown backbone {ckpt['backbone']!r}")
        network = ChunkMLP(**arch) if ckpt["backbone"] == "mlp" else ChunkTransformer(**arch)
        policy = ChunkPolicy(network, ACTION_DIM, arch.get("n_extra", 0) if kind == "gmm" else 0,
                             ckpt.get("std_limits", [0.01, 0.2]))
        runs.load_weights(policy, ckpt["actor_ft"] if "actor_ft" in ckpt else ckpt["ema"], path)
    info["horizon_steps"] = horizon
    info["act_steps"] = args.act_steps or saved.get("act_steps") or (task.act_steps if task else horizon)
    info["final_action_clip"] = bool(saved.get("final_action_clip"))
    info["max_steps"] = args.max_steps or (task.max_episode_steps if task else 100)
    if info["act_steps"] > horizon:
        raise runs.UsageError(f"--act-steps {info['act_steps']} exceeds the checkpoint's chunk T_a = {horizon}")
    return policy.eval(), ckpt, info


# ---- observation, limits, log ----

def robot_obs(state: RobotState) -> np.ndarray:
    """The furniture tasks' proprioception (16,): ee position, 6D rotation, linear and angular velocity, gripper width
    (furniture-bench's robot-state order with the quaternion turned into 6D, reference `furniture.py` `process_obs`)."""
    return np.concatenate([state.ee_pos, matrix_to_rot6d(quat_to_matrix(state.ee_quat)), state.ee_lin_vel,
                           state.ee_ang_vel, [state.gripper_width]])


def limit_pose(pos: np.ndarray, R: np.ndarray, state: RobotState, args: Args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clip a target pose against the measured one and the workspace; returns the pose to send and the limits hit."""
    clipped = []
    inside = np.clip(pos, args.workspace_min, args.workspace_max)
    if not np.array_equal(inside, pos):
        pos = inside
        clipped.append("workspace")
    step = pos - state.ee_pos  # the measured position is inside the box (checked), so the cut step stays inside
    max_step = min(args.max_step, args.max_speed / args.control_hz)
    if np.linalg.norm(step) > max_step:
        pos = state.ee_pos + step * (max_step / np.linalg.norm(step))
        clipped.append("translation_step")
    R_now = quat_to_matrix(state.ee_quat)
    rel = R_now.T @ R
    if rotation_angle(rel) > args.max_rotation_step:  # same axis, angle cut to the limit
        rv = matrix_to_axis_angle(rel)
        R = R_now @ axis_angle_to_matrix(rv * (args.max_rotation_step / np.linalg.norm(rv)))
        clipped.append("rotation_step")
    return pos, R, clipped


class EpisodeLog:
    """JSON lines, one record per line, flushed as written (a killed run keeps every line before the kill)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.f = path, open(path, "x")  # never overwrite an earlier episode

    def write(self, kind: str, /, **record: Any) -> None:
        def plain(v: Any) -> Any:  # numpy arrays and scalars, at any depth
            return v.tolist() if isinstance(v, (np.ndarray, np.generic)) else str(v)
        self.f.write(json.dumps({"type": kind, **record}, default=plain) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def make_pose_source(spec: str | None, n_objects: int) -> Any:
    if n_objects == 0:
        if spec is not None:
            raise runs.UsageError("--object-poses: this policy observes no objects (obs 16: the robot only)")
        return None
    if spec is None:
        raise runs.UsageError(f"the policy observes {n_objects} object poses: give --object-poses file:PATH, "
                              "udp:HOST:PORT or apriltag:CALIBRATION.json")
    kind, _, rest = spec.partition(":")
    sources = {"file": FilePoseSource, "udp": UDPPoseSource, "apriltag": AprilTagPoseSource}
    if kind not in sources or not rest:
        raise runs.UsageError(f"--object-poses {spec!r}: give file:PATH, udp:HOST:PORT or apriltag:CALIBRATION.json")
    return sources[kind](rest, n_objects)


def check_args(args: Args) -> None:
    if args.checkpoint is None:
        raise runs.UsageError("--checkpoint is required")
    runs.check_args(args)  # every number within the Limits of its field (each workspace corner finite: a box)
    if args.gripper_force > args.max_gripper_force:
        raise runs.UsageError(f"--gripper-force {args.gripper_force} exceeds --max-gripper-force {args.max_gripper_force}")
    if not all(lo < hi for lo, hi in zip(args.workspace_min, args.workspace_max)):
        raise runs.UsageError(f"--workspace-min {args.workspace_min} must be below --workspace-max "
                              f"{args.workspace_max} on every axis")
    if args.robot == "franky" and args.robot_ip is None:
        raise runs.UsageError("--robot-ip is required for a real robot (franky-sim: 127.0.0.1; or --robot fake)")
    runs.check_output_path(args.log, "--log")
    if args.log is not None and os.path.exists(args.log):
        raise runs.UsageError(f"--log {args.log} exists; episode files are never overwritten")


# ---- the loop ----

class Terminated(Exception):
    """SIGTERM (a supervisor, `kill`, `timeout`): the episode stops as on Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(args: Args, robot: Any = None, pose_source: Any = None) -> dict:
    """Run one episode; `robot`/`pose_source` replace what the flags would build (tests pass a FakeRobot)."""
    check_args(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    policy, ckpt, info = load_policy(args)
    normalizer = Normalizer.from_state_dict(ckpt["normalization"])
    T_o, T_e, period = info["cond_steps"], info["act_steps"], 1.0 / args.control_hz
    pose_source = pose_source or make_pose_source(args.object_poses, info["n_objects"])
    if robot is None:
        robot = FakeRobot() if args.robot == "fake" else FrankyRobot(
            args.robot_ip, args.translational_stiffness, args.rotational_stiffness)
    log_path = args.log or os.path.join("runs", f"deploy_franka__{ckpt['task']}__{int(time.time())}.jsonl")
    log = EpisodeLog(log_path)
    log.write("header", checkpoint=os.path.abspath(args.checkpoint), task=ckpt["task"], args=vars(args) | {
        "workspace_min": list(args.workspace_min), "workspace_max": list(args.workspace_max)}, **info)
    print(f"{info['kind']} policy for {ckpt['task']}: T_o {T_o}, T_a {info['horizon_steps']}, T_e {T_e}, "
          f"{args.control_hz:g} Hz, {info['max_steps']} steps; log {log_path}")

    step, reason, error, latencies, lateness, n_clipped = 0, "done", None, [], [], 0
    last_grasp = -1.0  # the gripper starts open, as in furniture-bench's reset
    hist: deque = deque(maxlen=T_o)
    started = False
    on_main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C and SIGTERM stop the robot however the process was started (a shell starts background jobs with SIGINT
    # ignored, and Python then raises no KeyboardInterrupt): both handlers are set explicitly, and restored at the end
    previous_handlers = ({sig: signal.signal(sig, handler) for sig, handler in
                          ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated))}
                         if on_main_thread else {})
    try:
        while step < info["max_steps"]:
            for k in range(T_e):
                if step >= info["max_steps"]:
                    break
                t_obs = time.perf_counter()
                state = robot.observe()
                poses = pose_source.read() if pose_source is not None else np.zeros((0, POSE_DIM))
                obs = np.concatenate([robot_obs(state), poses.ravel()])
                if not np.isfinite(obs).all():
                    raise RobotError(f"non-finite observation at step {step}: {np.round(obs, 4).tolist()}")
                hist.append(obs)
                speed = float(np.linalg.norm(state.ee_lin_vel))
                if speed > 2 * args.max_speed:
                    raise RobotError(f"measured end-effector speed {speed:.3f} m/s exceeds 2 x --max-speed {args.max_speed}")
                outside = np.maximum(np.subtract(args.workspace_min, state.ee_pos),
                                     np.subtract(state.ee_pos, args.workspace_max))
                if outside.max() > (0.0 if step == 0 else WORKSPACE_MARGIN):
                    raise RobotError(f"the end-effector {np.round(state.ee_pos, 3).tolist()} is outside the workspace box "
                                     f"{list(args.workspace_min)}..{list(args.workspace_max)}"
                                     + (" at the start: move it inside first" if step == 0 else ""))
                if k == 0:  # a new chunk from the latest T_o observations (the first one repeated at the start)
                    cond = np.stack([hist[0]] * (T_o - len(hist)) + list(hist))
                    t0 = time.perf_counter()
                    ncond = torch.as_tensor(normalizer.normalize_obs(cond.astype(np.float32)))[None].clamp(-5, 5)
                    x = policy(ncond, args.deterministic)
                    x = x.clamp(-1, 1) if info["final_action_clip"] else x
                    chunk = normalizer.unnormalize_action(x)[0].numpy().astype(np.float64)
                    latencies.append(time.perf_counter() - t0)
                    log.write("chunk", step=step, latency=latencies[-1], actions=chunk)
                    if not np.isfinite(chunk).all():
                        raise runs.NonFiniteError(f"the policy returned a non-finite action at step {step}; robot stopped")
                action = chunk[k]
                try:
                    R = rot6d_to_matrix(action[3:9])
                except ValueError as e:
                    raise runs.NonFiniteError(f"the policy returned an invalid rotation at step {step} ({e}); "
                                              "robot stopped") from None
                pos, R, clipped = limit_pose(action[:3], R, state, args)
                quat = matrix_to_quat(R)
                # furniture-bench's rule: the gripper toggles only when the sign of a[9] flips with |a[9]| > margin
                toggle = np.sign(action[9]) != np.sign(last_grasp) and abs(action[9]) > GRASP_MARGIN
                if toggle:
                    last_grasp = float(action[9])
                close = last_grasp > 0
                n_clipped += bool(clipped)
                if clipped and n_clipped <= MAX_CLIP_PRINTS:  # every clip is in the log; the first few on screen
                    print(f"step {step}: clipped ({', '.join(clipped)}): asked {np.round(action[:3], 4).tolist()}, "
                          f"sending {np.round(pos, 4).tolist()}" + (" (further clips only in the log)"
                                                                    if n_clipped == MAX_CLIP_PRINTS else ""))
                if args.dry_run:
                    print(f"step {step}: would send position {np.round(pos, 4).tolist()} quaternion "
                          f"{np.round(quat, 4).tolist()} gripper {'close' if close else 'open'}")
                else:
                    if not started:
                        if not args.yes:
                            try:
                                answer = input(f"about to move the robot toward {np.round(pos, 3).tolist()}; type yes: ")
                            except EOFError:
                                answer = ""
                            if answer.strip().lower() != "yes":
                                reason = "not confirmed"
                                print(f"not confirmed: nothing was sent; log {log_path}")
                                return {"log": log_path, "steps": step, "stop_reason": reason}
                        robot.start()
                        started = True
                    twist = None
                    if args.velocity_feedforward:  # base frame; bounded by the step limits x control_hz
                        R_now = quat_to_matrix(state.ee_quat)
                        twist = np.concatenate([pos - state.ee_pos, R_now @ matrix_to_axis_angle(R_now.T @ R)])
                        twist *= args.control_hz
                    robot.command_pose(pos, quat, twist)
                    if toggle:
                        robot.command_gripper(close, args.gripper_force, args.gripper_speed)
                t_sent = time.perf_counter()
                log.write("step", step=step, t=t_obs, obs=obs, state=state.as_dict(), action=action, clipped=clipped,
                          command={"pos": pos, "quat": quat, "gripper_close": close, "gripper_sent": toggle},
                          sent=not args.dry_run,
                          t_sent=t_sent)
                step += 1
                # pace: one command per period, measured against the schedule of the episode's first observation
                if step == 1:
                    t_start = t_obs
                t_next = t_start + step * period
                time.sleep(max(0.0, t_next - time.perf_counter()))
                lateness.append(time.perf_counter() - t_next)
                if lateness[-1] > period / 2:  # a late step shifts the schedule: no burst of commands to catch up
                    t_start += lateness[-1]
    except KeyboardInterrupt:
        reason = "interrupted"
    except Terminated:
        reason = "terminated"
    except (RobotError, runs.NonFiniteError) as e:
        reason, error = f"{type(e).__name__}: {e}", e
    except BaseException as e:  # a bug or SystemExit: still stop, still log why, then let it through
        reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        robot.stop()  # also when never started (dry run, refused): a no-op there
        robot.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        lat = np.array(latencies) if latencies else np.zeros(1)
        late = np.array(lateness) if lateness else np.zeros(1)
        summary = dict(steps=step, stop_reason=reason, clipped_steps=n_clipped, policy_latency_mean=float(lat.mean()),
                       policy_latency_max=float(lat.max()), period_lateness_mean=float(late.mean()),
                       period_lateness_std=float(late.std()), period_lateness_max=float(late.max()))
        log.write("end", **summary)
        log.close()
    print(f"stopped after {step} steps ({reason}); {n_clipped} clipped; policy latency "
          f"{summary['policy_latency_mean']*1e3:.1f} ms mean, {summary['policy_latency_max']*1e3:.1f} max; "
          f"loop lateness {summary['period_lateness_mean']*1e3:.2f} "
          f"± {summary['period_lateness_std']*1e3:.2f} ms; log {log_path}")
    if error is not None:
        raise error
    return {"log": log_path, **summary}


if __name__ == "__main__":
    runs.cli(main, Args)
