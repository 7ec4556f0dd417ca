"""Furniture-Bench without Isaac Gym: the rotation conversions, the chunked adapter (`sims/furniture.py`)
driven by a fake `FurnitureRLSimEnv`, the missing-simulator errors, the launcher, and a DPPO smoke run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import dppo_finetune as ft
import dppo_pretrain as pt
import gaussian_ppo as gauss
import gmm_ppo as gmm
import sims.furniture as fur
from common import rotations
from common.envs import make_vec_env
from common.errors import NonFiniteError, TaskError, UsageError
from common.normalizer import Normalizer
from common.tasks import get_task
from loaders.datasets import save_train_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LEG = get_task("one-leg-low")


# ---------------------------------------------------------------- a fake FurnitureRLSimEnv
class FakeFurnitureSim:
    """The fork's `FurnitureRLSimEnv` surface on CPU tensors: `reset(env_idxs=None)`, `step(action (N, 10))` ->
    (obs dict, reward (N, 1), done (N, 1), info), `env_steps` (N,), `num_envs`, `device`.

    robot_state (N, 14): position = the action's, quaternion (xyzw) = the action's 6D rotation (the first two
    rows of the matrix, Gram-Schmidt, as the fork reads `rot_6d` actions) converted by scipy, linear velocity =
    (t, env, 0), angular velocity 0, gripper = the action's. parts_poses (N, 7·(parts + 1)) = t / 100 + env.
    Env i gets reward 1 at each of its steps in `assemble_at[i]`; `nan_at` holds (env, step) pairs whose observation turns NaN
    (once each, until that env is reset);
    `nan_resets` makes that many resets in a row return NaN for every reset env."""

    def __init__(self, num_envs, n_pose=6, assemble_at=None, nan_at=(), nan_resets=0):
        self.num_envs, self.device, self.n_pose = num_envs, "cpu", n_pose
        self.env_steps = torch.zeros(num_envs, dtype=torch.int32)
        self.assemble_at = assemble_at or {}
        self.nan_at, self.nan_resets = set(nan_at), nan_resets
        self.actions, self.resets = [], []
        self.pos = torch.zeros(num_envs, 3)
        self.quat = torch.tensor([[0.0, 0.0, 0.0, 1.0]]).repeat(num_envs, 1)
        self.gripper = torch.zeros(num_envs, 1)
        self.poisoned = torch.zeros(num_envs, dtype=torch.bool)

    def _obs(self):
        t = self.env_steps.float()[:, None]
        env = torch.arange(self.num_envs).float()[:, None]
        rs = torch.cat([self.pos, self.quat, t, env, torch.zeros(self.num_envs, 4), self.gripper], 1)
        parts = (t / 100 + env).repeat(1, 7 * self.n_pose)
        rs[self.poisoned] = float("nan")
        return {"robot_state": rs, "parts_poses": parts}

    def reset(self, env_idxs=None):
        idx = torch.arange(self.num_envs) if env_idxs is None else env_idxs.long()
        self.resets.append(None if env_idxs is None else sorted(idx.tolist()))
        self.env_steps[idx] = 0
        self.pos[idx], self.gripper[idx] = 0.0, 0.0
        self.quat[idx] = torch.tensor([0.0, 0.0, 0.0, 1.0])
        self.poisoned[idx] = self.nan_resets > 0
        self.nan_resets = max(0, self.nan_resets - 1)
        return self._obs()

    def step(self, action):
        assert action.shape == (self.num_envs, 10) and action.dtype == torch.float32
        self.actions.append(action.clone())
        self.env_steps += 1
        self.pos, self.gripper = action[:, :3].clone(), action[:, 9:].clone()
        a, b = action[:, 3:6].double().numpy(), action[:, 6:9].double().numpy()
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b - (a * b).sum(1, keepdims=True) * a
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        mats = np.stack([a, b, np.cross(a, b)], 1)
        self.quat = torch.as_tensor(Rotation.from_matrix(mats).as_quat(), dtype=torch.float32)  # scalar last
        reward = torch.tensor([[float(int(s) in self.assemble_at.get(i, ()))] for i, s in enumerate(self.env_steps)])
        for i, s in enumerate(self.env_steps.tolist()):
            if (i, s) in self.nan_at:
                self.poisoned[i] = True
                self.nan_at.discard((i, s))
        return self._obs(), reward, torch.zeros(self.num_envs, 1, dtype=torch.bool), {}


def identity_6d_actions(n, steps, pos=0.1):
    """(n, steps, 10) raw actions: position pos + env/100 + k/1000, identity rotation, gripper 0.5."""
    a = np.zeros((n, steps, 10), np.float32)
    a[..., :3] = pos + np.arange(n)[:, None, None] / 100 + np.arange(steps)[None, :, None] / 1000
    a[..., 3], a[..., 7], a[..., 9] = 1.0, 1.0, 0.5
    return a


# ---------------------------------------------------------------- rotations (common/rotations.py)
def test_quaternion_to_6d_against_a_known_rotation_and_scipy():
    s = np.sqrt(0.5)
    q = torch.tensor([0.0, 0.0, s, s], dtype=torch.float32)  # 90° about z, xyzw
    torch.testing.assert_close(rotations.quat_to_matrix(q), torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))
    torch.testing.assert_close(rotations.quat_to_rot6d(q), torch.tensor([0.0, -1, 0, 1, 0, 0]))  # the first two rows
    qs = torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3  # any norm
    ref = Rotation.from_quat(qs.numpy()).as_matrix()
    np.testing.assert_allclose(rotations.quat_to_matrix(qs).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(rotations.quat_to_rot6d(qs).numpy(), ref[:, :2].reshape(-1, 6), atol=1e-12)


def test_6d_to_quaternion_round_trip_and_gram_schmidt():
    g = torch.Generator().manual_seed(1)
    qs = torch.nn.functional.normalize(torch.randn(2000, 4, generator=g, dtype=torch.float64), dim=-1)
    qs = torch.cat([qs, torch.eye(4, dtype=torch.float64), -torch.eye(4, dtype=torch.float64)])  # 180° turns: w = 0
    back = rotations.rot6d_to_quat(rotations.quat_to_rot6d(qs))
    canon = torch.where(qs[:, 3:] < 0, -qs, qs)
    close = (back - canon).abs().amax(-1) < 1e-9
    flipped = (back + canon).abs().amax(-1) < 1e-9  # w = 0: q and -q are both canonical
    assert (close | (flipped & (canon[:, 3] < 1e-12))).all()
    assert (back[:, 3] >= 0).all()
    # every branch of matrix_to_quat is taken (largest of w, x, y, z)
    assert set(qs.abs().argmax(-1).tolist()) == {0, 1, 2, 3}
    # a perturbed 6D still maps to a proper rotation whose first row has the first 3-vector's direction
    d6 = rotations.quat_to_rot6d(qs[:100]) + 0.1 * torch.randn(100, 6, generator=g, dtype=torch.float64)
    m = rotations.rot6d_to_matrix(d6)
    torch.testing.assert_close(m @ m.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(100, 3, 3))
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(100, dtype=torch.float64))
    torch.testing.assert_close(m[:, 0], torch.nn.functional.normalize(d6[:, :3], dim=-1))


def test_robot_state_to_6d_layout():
    rs = torch.arange(14.0)[None]
    rs[0, 3:7] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # identity, unnormalised
    out = fur.robot_state_to_6d(rs)[0]
    assert out.shape == (16,)
    torch.testing.assert_close(out[:3], torch.tensor([0.0, 1, 2]))
    torch.testing.assert_close(out[3:9], torch.tensor([1.0, 0, 0, 0, 1, 0]))
    torch.testing.assert_close(out[9:], torch.tensor([7.0, 8, 9, 10, 11, 12, 13]))


# ---------------------------------------------------------------- the adapter
def make_env(sim, **kw):
    logs = []
    kw = {"act_steps": 8, "max_episode_steps": 20, "log": logs.append, **kw}
    env = fur.FurnitureChunkVecEnv(sim, ONE_LEG, **kw)
    env.logs = logs
    return env


def test_chunking_rewards_and_truncation_at_the_limit():
    """Chunks of T_e = 8, rewards summed, truncation at step 20 (inside the third chunk): the steps after the
    limit earn nothing, the final observation is the one at step 20, the env restarts in the same step."""
    sim = FakeFurnitureSim(4, assemble_at={0: (3,), 1: (19,), 2: (22,), 3: (5, 12)})
    env = make_env(sim)
    obs = env.reset(seed=0)
    assert obs.shape == (4, 1, 58) and obs.dtype == np.float32 and sim.resets == [None]
    rewards, truncs, executed = [], [], []
    for c in range(3):
        chunk = identity_6d_actions(4, 16)  # T_a = 16 > T_e = 8: only the first 8 are executed
        before = len(sim.actions)
        obs, r, term, trunc, info = env.step(chunk)
        executed.append(len(sim.actions) - before)
        np.testing.assert_allclose(torch.stack(sim.actions[before:], 1).numpy(), chunk[:, :executed[-1]])
        rewards.append(r)
        truncs.append(trunc)
        assert not term.any()
    assert executed == [8, 8, 4]  # every env reached its limit at step 20: the rest of the chunk is not simulated
    np.testing.assert_array_equal(np.stack(rewards), [[1, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(np.stack(truncs), [[False] * 4, [False] * 4, [True] * 4])
    assert sim.resets == [None, [0, 1, 2, 3]]
    final = info["final_obs"][:, 0]
    np.testing.assert_array_equal(final[:, 9], [20.0] * 4)  # linear velocity x = the env's step count
    np.testing.assert_allclose(final[:, :3], chunk[:, 3, :3], atol=1e-7)  # position of step 20 (4th of chunk 3)
    np.testing.assert_array_equal(obs[:, 0, 9], [0.0] * 4)  # the new episode's first observation
    np.testing.assert_array_equal(obs[:, 0, 3:9], np.tile([1.0, 0, 0, 0, 1, 0], (4, 1)))
    np.testing.assert_array_equal(obs[:, 0, 16:], np.repeat(np.arange(4.0), 42).reshape(4, 42))
    assert env.nonfinite_resets == 0 and not env.logs


def test_observation_is_the_executed_rotation_in_6d_and_history_stacks():
    """The action's 6D rotation goes to the sim, comes back as a quaternion (scipy) and is converted back."""
    sim = FakeFurnitureSim(3)
    env = make_env(sim, cond_steps=2, act_steps=4)
    obs = env.reset()
    assert obs.shape == (3, 2, 58) and (obs[:, 0] == obs[:, 1]).all()
    chunk = identity_6d_actions(3, 4)
    rot = Rotation.from_rotvec(np.random.default_rng(0).normal(size=(3, 3))).as_matrix()
    chunk[:, -1, 3:9] = rot[:, :2].reshape(3, 6)
    chunk[:, -1, 3:6] *= 2.0  # the sim normalises rows (Gram-Schmidt), so does the observation
    obs, *_ = env.step(chunk)
    np.testing.assert_allclose(obs[:, 1, 3:9], rot[:, :2].reshape(3, 6), atol=1e-6)
    np.testing.assert_allclose(obs[:, 1, :3], chunk[:, -1, :3], atol=1e-7)
    np.testing.assert_array_equal(obs[:, 0, 9], [3.0] * 3)  # T_o = 2: the previous step, then this one
    np.testing.assert_array_equal(obs[:, 1, 9], [4.0] * 3)


def normalizer(obs_lo=-1.0, obs_hi=1.0):
    return Normalizer(np.full(58, obs_lo), np.full(58, obs_hi), np.full(10, -1.0), np.linspace(1.0, 3.0, 10))


def test_observations_clamped_to_five_normalised_units():
    """The reference clamps normalised observations to [-5, 5]; here the raw values whose normalisation is ±5."""
    sim = FakeFurnitureSim(4)
    norm = Normalizer(np.full(58, 0.0), np.full(58, 0.2), np.full(10, -1.0), np.full(10, 1.0))
    raw, clamped = make_env(FakeFurnitureSim(4)).reset(), make_env(sim, normalizer=norm).reset()
    n_raw, n_clamped = norm.normalize_obs(raw), norm.normalize_obs(clamped)
    assert n_raw.max() > 20  # parts poses = env index: far outside the dataset's range for envs 1 to 3
    np.testing.assert_allclose(n_clamped, np.clip(n_raw, -5, 5), atol=1e-4)
    # a dataset range above most raw values: the lower bound acts too (zeros normalise to -21)
    norm = Normalizer(np.full(58, 2.0), np.full(58, 2.2), np.full(10, -1.0), np.full(10, 1.0))
    n_raw, n_clamped = norm.normalize_obs(raw), norm.normalize_obs(make_env(FakeFurnitureSim(4), normalizer=norm).reset())
    assert n_raw.min() < -20 and n_raw.max() > 5
    np.testing.assert_allclose(n_clamped, np.clip(n_raw, -5, 5), atol=1e-4)
    assert (n_clamped < -4.999).sum() > 100 and (n_clamped > 4.999).any()


def test_action_and_observation_noise_in_normalised_units():
    n, steps, std = 250, 10, 0.03
    norm = normalizer(-300.0, 300.0)  # wide enough that the ±5 clamp never acts
    noisy_sim, clean_sim = FakeFurnitureSim(n), FakeFurnitureSim(n)
    noisy = make_env(noisy_sim, normalizer=norm, action_noise_std=std, obs_noise_std=0.05, max_episode_steps=1000)
    clean = make_env(clean_sim, normalizer=norm, max_episode_steps=1000)
    o_noisy, o_clean = noisy.reset(seed=3), clean.reset(seed=3)
    sent = identity_6d_actions(n, 8)
    for _ in range(steps):
        o_noisy, *_ = noisy.step(sent)
        o_clean, *_ = clean.step(sent)
    got = torch.stack(noisy_sim.actions, 1).numpy().reshape(n, steps, 8, 10)
    diff = norm.normalize_action(got) - norm.normalize_action(np.broadcast_to(sent[:, None], got.shape))
    assert abs(diff.std() - std) < 0.05 * std and abs(diff.mean()) < 0.05 * std  # 200k draws: s.e. of the std 0.2 %
    per_dim = diff.reshape(-1, 10).std(0)  # the same normalised std in every dimension (their raw ranges differ 1:2)
    assert np.all(np.abs(per_dim - std) < 0.05 * std)
    d_obs = norm.normalize_obs(o_noisy) - norm.normalize_obs(o_clean)
    mask = np.ones(58, bool)
    mask[:9] = mask[15] = False  # position, rotation and gripper also carry the action noise
    assert abs(d_obs[..., mask].std() - 0.05) < 0.05 * 0.05
    # the same seed gives the same noise; another seed, other noise
    again_sim = FakeFurnitureSim(n)
    again = make_env(again_sim, normalizer=norm, action_noise_std=std, obs_noise_std=0.05, max_episode_steps=1000)
    again.reset(seed=3)
    again.step(sent)
    torch.testing.assert_close(again_sim.actions[0], noisy_sim.actions[0])
    again.reset(seed=4)
    again.step(sent)
    assert not torch.equal(again_sim.actions[8], noisy_sim.actions[0])
    with pytest.raises(ValueError, match="normaliser"):
        make_env(FakeFurnitureSim(2), action_noise_std=0.03)


def test_non_finite_observations_end_the_episode_and_reset_the_env():
    """Env 1's observation turns NaN at its step 5: it earns nothing after that (its part would have been
    assembled at step 6), its episode ends truncated with the step-4 observation as the final one, it is
    reset at the end of the chunk, and the count is logged; env 0 is untouched."""
    sim = FakeFurnitureSim(3, assemble_at={0: (6,), 1: (6,)}, nan_at={(1, 5)})
    env = make_env(sim)
    env.reset()
    obs, r, term, trunc, info = env.step(identity_6d_actions(3, 8))
    np.testing.assert_array_equal(r, [1, 0, 0])
    np.testing.assert_array_equal(trunc, [False, True, False])
    assert not term.any() and np.isfinite(obs).all() and np.isfinite(info["final_obs"]).all()
    assert info["final_obs"][1, 0, 9] == 4.0 and obs[1, 0, 9] == 0.0 and obs[0, 0, 9] == 8.0
    assert sim.resets == [None, [1]] and env.nonfinite_resets == 1 and info["nonfinite_resets"] == 1
    assert len(env.logs) == 1 and "1 env(s)" in env.logs[0] and "non-finite" in env.logs[0]
    _, r, _, trunc, info = env.step(identity_6d_actions(3, 8))  # the next chunk runs normally
    assert not trunc.any() and info["nonfinite_resets"] == 0 and env.nonfinite_resets == 1


def test_an_env_past_its_limit_earns_nothing_while_the_others_run_on():
    """Env 1 restarts after a NaN in the first chunk, so in the third chunk env 0 reaches its limit (step 20)
    while env 1 still runs: the batched sim steps env 0 on to step 24, but its reward at step 22 does not
    count and its final observation is the one at step 20."""
    sim = FakeFurnitureSim(2, assemble_at={0: (22,)}, nan_at={(1, 5)})
    env = make_env(sim)
    env.reset()
    for _ in range(3):
        obs, r, _, trunc, info = env.step(identity_6d_actions(2, 8))
    assert len(sim.actions) == 24 and sim.env_steps.tolist() == [0, 16]  # env 0 was reset after the chunk
    np.testing.assert_array_equal(r, [0, 0])
    np.testing.assert_array_equal(trunc, [True, False])
    assert info["final_obs"][0, 0, 9] == 20.0 and obs[0, 0, 9] == 0.0 and obs[1, 0, 9] == 16.0


def test_a_zero_quaternion_counts_as_non_finite():
    env = make_env(FakeFurnitureSim(2))
    raw = FakeFurnitureSim(2).reset()
    raw["robot_state"][1, 3:7] = 0.0
    obs, finite = env._process(raw)
    assert finite.tolist() == [True, False] and torch.isfinite(obs[0]).all()


def test_non_finite_after_a_reset_is_retried_then_refused():
    sim = FakeFurnitureSim(2, nan_resets=2)
    env = make_env(sim)
    obs = env.reset()
    assert np.isfinite(obs).all() and sim.resets == [None, [0, 1], [0, 1]] and len(env.logs) == 2
    with pytest.raises(NonFiniteError, match="after 4 resets of 2 env"):
        make_env(FakeFurnitureSim(2, nan_resets=10)).reset()


def test_wrong_observation_size_is_one_line():
    with pytest.raises(TaskError, match="gives 51-d observations, the task has 58"):
        make_env(FakeFurnitureSim(2, n_pose=5)).reset()


# ---------------------------------------------------------------- without Isaac Gym
def test_missing_isaac_gym_is_one_line_naming_what_to_install(monkeypatch):
    if fur.install_error() is None:
        pytest.skip("Isaac Gym and the fork are installed here")
    with pytest.raises(TaskError) as e:
        make_vec_env(get_task("lamp-med"), 2, act_steps=8)
    msg = str(e.value)
    assert "\n" not in msg and "lamp-med" in msg and "https://developer.nvidia.com/isaac-gym" in msg
    assert "github.com/ankile/furniture-bench" in msg
    with pytest.raises(TaskError, match="observation / action noise is the Furniture-Bench"):
        make_vec_env(get_task("avoid-m2"), 2, action_noise_std=0.03)


def test_pypi_furniture_bench_is_not_the_fork(tmp_path, monkeypatch):
    (tmp_path / "furniture_bench" / "envs").mkdir(parents=True)
    (tmp_path / "furniture_bench" / "__init__.py").write_text("")
    (tmp_path / "furniture_bench" / "envs" / "furniture_sim_env.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "lacks FurnitureRLSimEnv" in fur.install_error()
    (tmp_path / "furniture_bench" / "envs" / "furniture_rl_sim_env.py").write_text("")
    assert "lacks" not in (fur.install_error() or "")


def test_torch_before_isaac_gym_names_the_launcher(monkeypatch):
    monkeypatch.setattr(fur, "install_error", lambda: None)
    monkeypatch.delitem(sys.modules, "isaacgym", raising=False)
    monkeypatch.setattr(sys, "argv", ["dppo_finetune.py", "--env-id", "one-leg-low"])
    with pytest.raises(TaskError, match=r"before torch.*python -m sims.furniture dppo_finetune.py --env-id one-leg-low"):
        fur.make_sim(ONE_LEG, 2, 700)


def test_launcher_imports_isaac_gym_before_torch_then_runs_the_script(tmp_path):
    """With a stand-in `isaacgym` that records whether torch was already imported, and a stand-in fork."""
    (tmp_path / "isaacgym").mkdir()
    (tmp_path / "isaacgym" / "__init__.py").write_text("import sys\nTORCH_FIRST = 'torch' in sys.modules\n")
    (tmp_path / "furniture_bench" / "envs").mkdir(parents=True)
    (tmp_path / "furniture_bench" / "__init__.py").write_text("")
    (tmp_path / "furniture_bench" / "envs" / "furniture_rl_sim_env.py").write_text("")
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nimport isaacgym\nimport torch\n"
                     "print('torch first:', isaacgym.TORCH_FIRST, 'argv:', sys.argv[1:], 'name:', __name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    out = subprocess.run([sys.executable, "-m", "sims.furniture", str(probe), "--env-id", "one-leg-low"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch first: False argv: ['--env-id', 'one-leg-low'] name: __main__" in out.stdout


def test_launcher_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    usage = subprocess.run([sys.executable, "-m", "sims.furniture"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "usage" in usage.stderr
    if fur.install_error() is None:
        return
    out = subprocess.run([sys.executable, "-m", "sims.furniture", "dppo_finetune.py", "--env-id", "one-leg-low"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: Furniture-Bench needs")


# ---------------------------------------------------------------- defaults and flags of dppo_finetune.py
@pytest.mark.parametrize("env_id,n_steps,batch", [("one-leg-low", 88, 17600), ("one-leg-med", 88, 8800),
                                                  ("lamp-low", 125, 8800), ("round-table-med", 125, 8800)])
def test_furniture_finetune_defaults_are_the_reference_configs(env_id, n_steps, batch):
    """cfg/furniture/finetune/*/ft_ppo_diffusion_mlp.yaml: n_steps = round(max_episode_steps / 8)."""
    args = ft.Args(env_id=env_id, checkpoint="x.pt")
    ft.fill_defaults(args)
    assert (args.n_steps, args.batch_size, args.num_envs, args.n_train_itr) == (n_steps, batch, 1000, 1000)
    assert args.use_ddim and (args.ddim_steps, args.ft_denoising_steps) == (5, 5)
    assert (args.gamma, args.gamma_denoising, args.clip_coef, args.clip_coef_base) == (0.999, 0.9, 0.001, 0.001)
    assert (args.actor_lr, args.actor_lr_min, args.lr_cycle_itr, args.update_epochs) == (1e-5, 1e-6, 10000, 5)
    assert (args.min_sampling_denoising_std, args.n_critic_warmup_itr, args.bootstrap_truncated) == (0.04, 1, False)
    assert (args.obs_noise_std, args.action_noise_std, args.final_action_clip) == (0.0, 0.0, False)


@pytest.mark.parametrize("flag,value,match", [("action_noise_std", -0.1, "finite number >= 0"),
                                              ("obs_noise_std", float("nan"), "finite number >= 0"),
                                              ("obs_noise_std", float("inf"), "finite number >= 0")])
def test_noise_flags_refuse_bad_values(flag, value, match):
    with pytest.raises(UsageError, match=match):
        ft.fill_defaults(ft.Args(env_id="one-leg-low", **{flag: value}))
    with pytest.raises(UsageError, match="sim-to-real option; avoid-m2 has none"):
        ft.fill_defaults(ft.Args(env_id="avoid-m2", action_noise_std=0.03))


# ---------------------------------------------------------------- a DPPO run on the fake simulator
@pytest.fixture(scope="module")
def furniture_data(tmp_path_factory):
    """4 synthetic One-leg demos in the train.npz format, and a folder for the pre-training runs."""
    d = tmp_path_factory.mktemp("furniture")
    rng = np.random.default_rng(0)
    trajs = [{"obs": rng.normal(size=(40, 58)).astype(np.float32), "actions": rng.uniform(-1, 1, (40, 10)).astype(np.float32)}
             for _ in range(4)]
    save_train_npz(str(d / "train.npz"), trajs)
    return d


def pretrain_in(d, module, args):
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return os.path.join(d, module.main(args)["checkpoint"])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def furniture_checkpoint(furniture_data):
    """A tiny K = 100 MLP pre-trained for one epoch on the synthetic demos."""
    return pretrain_in(furniture_data, pt, pt.Args(env_id="one-leg-low", dataset=str(furniture_data / "train.npz"),
                                                   n_epochs=1, denoising_steps=100, mlp_dims=(32, 32, 32),
                                                   cond_mlp_dims=(16,), time_dim=8, batch_size=64, seed=0))


def fake_furniture(monkeypatch, module):
    """The furniture tasks of `module` run on FakeFurnitureSim with 16-step episodes: envs 0 and 2 assemble
    One-leg's one part inside each episode, env 3 one step after its end. Returns the list of sims made."""
    sims = []
    schedule = {0: (5,), 2: (16,), 3: (17,)}
    def make_sim(task, num_envs, max_episode_steps):
        sims.append(FakeFurnitureSim(num_envs, assemble_at=schedule))
        return sims[-1]
    monkeypatch.setattr(fur, "make_sim", make_sim)
    real_make = module.make_vec_env
    monkeypatch.setattr(module, "make_vec_env", lambda *a, **kw: real_make(*a, **{**kw, "max_episode_steps": 16}))
    return sims


def test_dppo_finetune_two_iterations_on_the_fake_simulator(furniture_checkpoint, tmp_path, monkeypatch):
    """Envs 0 and 2 assemble One-leg's one part inside their 16-step episodes: success 0.5 in every iteration."""
    monkeypatch.chdir(tmp_path)
    sims = fake_furniture(monkeypatch, ft)
    out = ft.main(ft.Args(env_id="one-leg-low", checkpoint=furniture_checkpoint, n_train_itr=2, num_envs=4, n_steps=3,
                          batch_size=20, val_freq=0, eval_n_steps=2, seed=0, action_noise_std=0.03, cuda=False))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["pg_loss"]) and np.isfinite(x["v_loss"]) for x in h)
    assert all(x["n_episodes"] == 4 and x["success_rate"] == 0.5 and x["return_mean"] == 0.5 for x in h)
    assert len(sims) == 1 and sims[0].resets.count(None) == 3  # reset at both iterations and the final evaluation
    assert len(sims[0].actions) == 8 * (3 * 2 + 2)
    post = torch.load(out["checkpoint"], weights_only=True)
    a = post["args"]
    assert a["use_ddim"] and a["ft_denoising_steps"] == 5 and a["ddim_steps"] == 5 and not a["bootstrap_truncated"]
    assert a["action_noise_std"] == 0.03 and a["obs_noise_std"] == 0.0
    saved = json.load(open(os.path.join(out["run_dir"], "args.json")))
    assert saved["action_noise_std"] == 0.03 and saved["obs_noise_std"] == 0.0
    assert any(v.ndim == 2 and v.shape[0] == 512 for v in post["critic"].values())  # the furniture critic, [512] x 3


@pytest.mark.parametrize("module", [gauss, gmm])
def test_gaussian_and_gmm_ppo_on_the_fake_simulator(module, furniture_data, tmp_path, monkeypatch):
    """The same adapter, success rule and furniture defaults serve gaussian_ppo.py and gmm_ppo.py."""
    ckpt = pretrain_in(furniture_data, module, module.Args(env_id="one-leg-low", pretrain=True, n_epochs=1, seed=0,
                                                           dataset=str(furniture_data / "train.npz"), mlp_dims=(32, 32, 32),
                                                           pretrain_batch_size=64, exp_name=module.__name__))
    monkeypatch.chdir(tmp_path)
    sims = fake_furniture(monkeypatch, module)
    out = module.main(module.Args(env_id="one-leg-low", checkpoint=ckpt, n_train_itr=2, num_envs=4, n_steps=3, batch_size=4,
                                  val_freq=0, eval_n_steps=2, seed=0, cuda=False))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["pg_loss"]) for x in h)
    assert all(x["n_episodes"] == 4 and x["success_rate"] == 0.5 for x in h) and len(sims[0].actions) == 8 * 8
    assert not torch.load(out["checkpoint"], weights_only=True)["args"]["bootstrap_truncated"]



def test_unet_checkpoint_takes_the_reference_unet_batch(furniture_data, tmp_path, monkeypatch):
    """cfg/furniture/finetune/one_leg_low/ft_ppo_diffusion_unet.yaml: T_a 16, batch 30000; an explicit --batch-size wins."""
    ckpt = pretrain_in(furniture_data, pt, pt.Args(env_id="one-leg-low", dataset=str(furniture_data / "train.npz"),
                                                   backbone="unet", horizon_steps=16, unet_dim=8, n_epochs=1,
                                                   denoising_steps=100, batch_size=64, seed=0, exp_name="unet"))
    monkeypatch.chdir(tmp_path)
    fake_furniture(monkeypatch, ft)
    small = dict(env_id="one-leg-low", checkpoint=ckpt, n_train_itr=1, n_critic_warmup_itr=0, num_envs=4, n_steps=3,
                 val_freq=0, eval_n_steps=1, cuda=False)
    with pytest.raises(UsageError, match="--batch-size 30000 exceeds"):
        ft.main(ft.Args(**small))
    out = ft.main(ft.Args(**small, batch_size=20))
    a = torch.load(out["checkpoint"], weights_only=True)["args"]
    assert (a["batch_size"], a["horizon_steps"], a["act_steps"]) == (20, 16, 8) and np.isfinite(out["history"][0]["pg_loss"])


def test_command_line_without_isaac_gym_is_one_line_and_writes_nothing(furniture_checkpoint, tmp_path):
    if fur.install_error() is None:
        pytest.skip("Isaac Gym and the fork are installed here")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "dppo_finetune.py")
    for argv, match in ((["--action-noise-std", "-1"], "error: --action-noise-std must be a finite number >= 0 (got -1.0)"),
                        (["--checkpoint", furniture_checkpoint, "--num-envs", "2", "--n-steps", "2", "--batch-size", "4",
                          "--action-noise-std", "0.03"], "error: task 'one-leg-low': Furniture-Bench needs Isaac Gym")):
        out = subprocess.run([sys.executable, script, "--env-id", "one-leg-low", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=180)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(match), out.stderr
    assert os.listdir(tmp_path) == []  # no run folder
