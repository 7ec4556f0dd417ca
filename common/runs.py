"""Run-folder plumbing shared by the scripts (STYLE.md conventions): self-describing checkpoints
written atomically and loaded as data, the `eval.csv` log that survives `--resume`, and per-phase
timing of an iteration."""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import torch

from common.datasets import DatasetError
from common.tasks import Task

CHECKPOINT_FORMAT = "dppo-checkpoint-v1"
FINETUNE_SCRIPTS = {"diffusion": "dppo_finetune.py", "gaussian": "gaussian_ppo.py", "gmm": "gmm_ppo.py"}


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write atomically so a run killed at any moment leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, task: Task, policy: str, pretrain_command: str) -> dict[str, Any]:
    """Load a checkpoint as data (`weights_only=True`) and check it holds a `policy` for `task`;
    anything else is refused with one line naming the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found (pre-train one: {pretrain_command})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DatasetError(f"checkpoint {path!r} is not a readable DPPO checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DatasetError(f"checkpoint {path!r} is not a DPPO checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if ckpt["policy"] != policy:
        script = FINETUNE_SCRIPTS.get(ckpt["policy"], "another script")
        raise DatasetError(f"checkpoint {path!r} holds a {ckpt['policy']} policy, not a {policy} one; use {script}")
    if ckpt["task"] != task.id or ckpt["obs_dim"] != task.obs_dim or ckpt["action_dim"] != task.action_dim:
        raise DatasetError(f"checkpoint {path!r} is for task {ckpt['task']!r} (obs {ckpt['obs_dim']}, action "
                           f"{ckpt['action_dim']}), not {task.id!r} (obs {task.obs_dim}, action {task.action_dim})")
    return ckpt


class EvalLog:
    """`eval.csv`: one row per evaluation. On resume, rows from iterations the checkpoint had not
    reached are dropped, so a resumed run writes the same file as an uninterrupted one."""

    FIELDS = ["iteration", "env_steps", "mode", "return_mean", "return_std", "success_rate", "n_episodes"]

    def __init__(self, run_dir: str, resume_itr: int | None = None) -> None:
        self.path = os.path.join(run_dir, "eval.csv")
        self.rows: list[dict[str, Any]] = []
        if resume_itr is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) < resume_itr]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, itr: int, env_steps: int, mode: str, result: dict[str, Any]) -> None:
        row = dict(iteration=itr, env_steps=env_steps, mode=mode, **{k: result[k] for k in self.FIELDS[3:]})
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)


class PhaseTimer:
    """Wall time per phase of an iteration (env, sampling, update, ...). On CUDA it synchronises
    only at phase boundaries, where the rollout syncs anyway to hand actions to the envs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._last = device, {}, time.perf_counter()

    def reset(self) -> None:
        self.times.clear()
        self.lap("other")

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now
