"""The observation and action normalisation of every policy (paper App. D.4): per-dimension min-max to [-1, 1].

A checkpoint stores its statistics (`Normalizer.state_dict`); pre-training computes them from the demonstrations
(`from_trajectories`) or reads the reference's files (`loaders.datasets.read_normalization`)."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class Normalizer:
    """Per-dimension min-max to [-1, 1] (paper App. D.4): 2·(x−min)/(max−min+1e-6) − 1; back with (x+1)/2·(max−min) + min,
    as the reference's env wrappers map actions back (the inverse within 1e-6·(x+1)/2). A constant dimension (min == max)
    maps to -1 and back to itself; min > max (mirrored) is refused by every checkpoint load (`runs.check_policy_numbers`)."""

    KEYS = ("obs_min", "obs_max", "action_min", "action_max")

    def __init__(self, obs_min: Any, obs_max: Any, action_min: Any, action_max: Any) -> None:
        stats = (obs_min, obs_max, action_min, action_max)
        self.obs_min, self.obs_max, self.action_min, self.action_max = (
            torch.as_tensor(v, dtype=torch.float32).detach().clone() for v in stats)
        self._np = {k: getattr(self, k).detach().cpu().numpy() for k in self.KEYS}

    @classmethod
    def from_trajectories(cls, trajs: list[dict[str, np.ndarray]]) -> Normalizer:
        obs = np.concatenate([t["obs"] for t in trajs])
        act = np.concatenate([t["actions"] for t in trajs])
        return cls(obs.min(0), obs.max(0), act.min(0), act.max(0))

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Normalizer:
        return cls(*(d[k] for k in cls.KEYS))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().clone() for k in self.KEYS}

    def to(self, device: str | torch.device) -> Normalizer:
        for k in self.KEYS:
            setattr(self, k, getattr(self, k).to(device))
        return self

    def _apply(self, x: ArrayT, lo_key: str, hi_key: str, inverse: bool) -> ArrayT:
        if isinstance(x, torch.Tensor):
            lo = getattr(self, lo_key).to(x.device, x.dtype)
            hi = getattr(self, hi_key).to(x.device, x.dtype)
        else:
            x = np.asarray(x)
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
            lo, hi = self._np[lo_key].astype(dtype), self._np[hi_key].astype(dtype)
        # the reference's env wrappers: normalise with (max - min + 1e-6), map actions back with (max - min)
        # (irom-princeton/dppo, env/gym_utils/wrapper/robomimic_lowdim.py, normalize_obs / unnormalize_action)
        return (x + 1) / 2 * (hi - lo) + lo if inverse else 2 * (x - lo) / (hi - lo + 1e-6) - 1

    def normalize_obs(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "obs_min", "obs_max", inverse=False)

    def unnormalize_obs(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "obs_min", "obs_max", inverse=True)

    def normalize_action(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "action_min", "action_max", inverse=False)

    def unnormalize_action(self, x: ArrayT) -> ArrayT:
        return self._apply(x, "action_min", "action_max", inverse=True)
