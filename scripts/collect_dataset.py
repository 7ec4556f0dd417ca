"""Roll a Gaussian or GMM policy checkpoint and save what it does as a `train.npz` dataset (the
reference implementation's format: `states`, `actions`, `rewards`, `traj_lengths`).

Used to build a D4RL-style "medium" dataset without a download (`scripts/hopper_data.sh`): the
stochastic policy runs one env step at a time; each env re-plans a chunk every T_e steps and at
episode starts. Unfinished episodes at the end are kept, as D4RL keeps its time-outs.

    python scripts/collect_dataset.py --checkpoint runs/<run>/checkpoint.pt --env-id hopper --n-env-steps 1000000 \
        --out data/hopper/train.npz
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gaussian_ppo  # noqa: E402
import gmm_ppo  # noqa: E402
from common import runs  # noqa: E402
from common.envs import make_vec_env  # noqa: E402
from common.normalizer import Normalizer  # noqa: E402
from loaders.datasets import save_train_npz  # noqa: E402

SCRIPTS = {"gaussian": gaussian_ppo, "gmm": gmm_ppo}
Positive, NUMPY_SEED = runs.POSITIVE, runs.Limits(0, 2**32 - 1)  # numpy's seed range


@dataclass
class Args:
    # experiment
    checkpoint: str  # a Gaussian or GMM checkpoint (pre-trained, fine-tuned or from scratch)
    out: str  # the train.npz to write
    env_id: str | None = None  # task id (None: the checkpoint's task)
    # collection
    n_env_steps: Annotated[int, Positive] = 1_000_000  # env steps to collect (rounded up to a multiple of num_envs)
    num_envs: Annotated[int, Positive] = 40  # parallel environments
    act_steps: Annotated[int | None, Positive] = None  # T_e: actions executed per chunk (None: the task's, at most T_a)
    seed: Annotated[int, NUMPY_SEED] = 1  # seed of the envs and of the policy's noise
    n_workers: Annotated[int | None, Positive] = None  # worker processes for slow simulators (robomimic)


def collect(args: Args) -> dict:
    runs.check_args(args)  # every number within the Limits of its field
    runs.check_output_path(args.out, "--out")  # a folder, or a path under a file, is refused before any work
    try:
        policy_type = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("policy") or "gaussian"
    except Exception:  # noqa: BLE001 - runs.load_checkpoint below gives the one-line answer
        policy_type = "gaussian"
    if policy_type not in SCRIPTS:
        raise runs.DatasetError(f"checkpoint {args.checkpoint!r} holds a {policy_type} policy; "
                                "this script rolls gaussian or gmm ones")
    script = SCRIPTS[policy_type]
    task = gaussian_ppo.resolve_task(args.env_id) if args.env_id else None
    ckpt = runs.load_checkpoint(args.checkpoint, policy_type, f"python {policy_type}_ppo.py --pretrain", task,
                                conversion=lambda: importlib.import_module("loaders.convert"))
    task = task or gaussian_ppo.resolve_task(ckpt["task"])
    device = runs.seed_everything(args.seed, True, 1, cuda=False)
    if args.act_steps is not None and args.act_steps > ckpt["horizon_steps"]:
        raise runs.UsageError(f"--act-steps {args.act_steps} exceeds the checkpoint's chunk T_a = {ckpt['horizon_steps']}")
    policy = script.policy_from_checkpoint(ckpt, script.Args(), "actor_ft" if "actor_ft" in ckpt else "ema",
                                           args.checkpoint).to(device)
    normalizer = Normalizer.from_state_dict(ckpt["normalization"]).to(device)
    saved = ckpt.get("args", {})
    final_clip = bool(saved.get("final_action_clip") or saved.get("from_scratch"))
    N, T_e = args.num_envs, min(args.act_steps or task.act_steps, ckpt["horizon_steps"])
    envs = make_vec_env(task, N, seed=args.seed, act_steps=1, cond_steps=ckpt["cond_steps"], n_workers=args.n_workers)
    obs = envs.reset(seed=args.seed)
    current = [{"obs": [], "actions": [], "rewards": []} for _ in range(N)]
    trajs, pos, plan = [], np.zeros(N, int), None
    for _ in tqdm(range(-(-args.n_env_steps // N)), desc="collecting"):
        with torch.no_grad():
            x = script.sample_actions(policy, normalizer.normalize_obs(torch.as_tensor(obs, device=device)), False, 3.0)
        x = x.clamp(-1, 1) if final_clip else x
        chunk = normalizer.unnormalize_action(x).cpu().numpy()
        plan = chunk if plan is None else np.where((pos == 0)[:, None, None], chunk, plan)
        action = plan[np.arange(N), pos]
        next_obs, reward, term, trunc, _ = envs.step(action[:, None])
        for i in range(N):
            current[i]["obs"].append(obs[i, -1])
            current[i]["actions"].append(action[i])
            current[i]["rewards"].append(reward[i])
            if term[i] or trunc[i]:
                trajs.append(current[i])
                current[i] = {"obs": [], "actions": [], "rewards": []}
        pos = np.where(term | trunc, 0, (pos + 1) % T_e)
        obs = next_obs
    envs.close()
    trajs += [c for c in current if c["actions"]]  # the unfinished tails, as D4RL keeps timeouts
    trajs = [{k: np.asarray(v, np.float32) for k, v in t.items()} for t in trajs]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_train_npz(args.out, trajs)
    returns = [float(t["rewards"].sum()) for t in trajs]
    print(f"wrote {args.out}: {len(trajs)} trajectories, {sum(len(t['actions']) for t in trajs)} steps, "
          f"mean return {np.mean(returns):.1f}")
    return {"dataset": args.out, "n_trajectories": len(trajs), "returns": returns}


if __name__ == "__main__":
    runs.cli(collect, Args)
