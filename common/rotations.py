"""Rotations of the furniture tasks' observations and actions, batched in torch: quaternions are (x, y, z, w), real
part last (Isaac Gym's order); the 6D rotation is the first two rows of the rotation matrix, row by row, as the fork's
`proprioceptive_quat_to_6d_rotation` writes it in the observations and as the datasets store actions (Zhou et al.,
CVPR 2019, continuity of rotation representations).

One implementation for the simulator (`sims/furniture.py`) and the robot (`hardware/robot.py`), so that deployment builds
exactly the observation and reads exactly the action the policy was trained with."""

from __future__ import annotations

import torch


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzw quaternions (any norm > 0) -> (..., 3, 3) rotation matrices."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    rows = (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y))
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_rot6d(m: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): rows 0 and 1."""
    return m[..., :2, :].reshape(*m.shape[:-2], 6)


def rot6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3): Gram-Schmidt on the two rows, the third row their cross product."""
    r0 = torch.nn.functional.normalize(d6[..., :3], dim=-1)
    r1 = d6[..., 3:] - (r0 * d6[..., 3:]).sum(-1, keepdim=True) * r0
    r1 = torch.nn.functional.normalize(r1, dim=-1)
    return torch.stack((r0, r1, torch.linalg.cross(r0, r1, dim=-1)), dim=-2)


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit xyzw quaternions with w >= 0.

    Each of the four candidate formulas divides by one of 4w², 4x², 4y², 4z² (the largest, for precision)."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.reshape(*m.shape[:-2], 9).unbind(-1)
    s = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)
    r = 2 * s.clamp(min=1e-12).sqrt()  # 4|w|, 4|x|, 4|y|, 4|z|
    cand = torch.stack((
        torch.stack(((m21 - m12), (m02 - m20), (m10 - m01), s[..., 0]), -1) / r[..., 0:1],
        torch.stack((s[..., 1], (m01 + m10), (m02 + m20), (m21 - m12)), -1) / r[..., 1:2],
        torch.stack(((m01 + m10), s[..., 2], (m12 + m21), (m02 - m20)), -1) / r[..., 2:3],
        torch.stack(((m02 + m20), (m12 + m21), s[..., 3], (m10 - m01)), -1) / r[..., 3:4]), -2)
    q = cand.gather(-2, s.argmax(-1)[..., None, None].expand(*s.shape[:-1], 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., 3:] < 0, -q, q)


def quat_to_rot6d(q: torch.Tensor) -> torch.Tensor:
    return matrix_to_rot6d(quat_to_matrix(q))


def rot6d_to_quat(d6: torch.Tensor) -> torch.Tensor:
    return matrix_to_quat(rot6d_to_matrix(d6))
