"""common/: the task registry, chunked env wrappers and vector envs, evaluation, network blocks."""

import importlib.util
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.envs import eval_horizon, evaluate, make_vec_env
from common.errors import TaskError
from common.networks import DiffusionMLP, DoubleQCritic, ObsCritic, ResidualBlock, ResidualMLP
from common.tasks import Task, get_task, missing_packages, require_simulator, task_ids
from common.vecenv import MultiStep, ProcessChunkVecEnv, SyncChunkVecEnv


# ---------------------------------------------------------------- registry
@pytest.mark.parametrize("name,tid", [("hopper", "hopper"), ("Hopper-v5", "hopper"), ("HOPPER", "hopper"),
                                      ("walker2d", "walker2d"), ("halfcheetah", "halfcheetah"),
                                      ("Square", "square"), ("PickPlaceCan", "can"), ("transport", "transport"),
                                      ("avoid-m1", "avoid-m1"), ("Avoid-M3", "avoid-m3"),
                                      ("one-leg-low", "one-leg-low"), ("round-table-med", "round-table-med")])
def test_registry_lookup(name, tid):
    assert get_task(name).id == tid


def test_registry_dims_and_unknown_ids():
    dims = {t: (get_task(t).obs_dim, get_task(t).action_dim) for t in task_ids()}
    assert dims["hopper"] == (11, 3) and dims["walker2d"] == (17, 6) and dims["halfcheetah"] == (17, 6)
    assert dims["lift"] == (19, 7) and dims["can"] == (23, 7) and dims["square"] == (23, 7)
    assert dims["transport"] == (59, 14) and dims["avoid-m2"] == (4, 2)
    assert dims["one-leg-low"] == (58, 10) and dims["lamp-med"] == (44, 10)
    assert get_task("transport").horizon_steps == 8 and get_task("square").max_episode_steps == 400
    with pytest.raises(TaskError) as e:
        get_task("hoper")
    assert "hopper" in str(e.value) and "avoid-m2" in str(e.value) and "round-table-med" in str(e.value)


def test_missing_simulator_is_one_line():
    task = get_task("one-leg-low")
    if importlib.util.find_spec("isaacgym") is not None:
        pytest.skip("isaacgym is installed here")
    assert missing_packages(task)
    with pytest.raises(TaskError) as e:
        require_simulator(task)
    assert "isaacgym" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TaskError):
        make_vec_env(task, 2)


# ---------------------------------------------------------------- wrappers
class Counter(gym.Env):
    """obs = [t, id]; reward = t; terminates at `end` (or truncates, if `truncate`)."""

    def __init__(self, end=5, truncate=False, ident=0.0):
        self.end, self.truncate, self.ident = end, truncate, ident
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, self.ident], np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.end
        return (np.array([self.t, self.ident], np.float32), float(self.t),
                done and not self.truncate, done and self.truncate, {})


def test_multistep_sums_rewards_stops_at_done_and_stacks():
    env = MultiStep(Counter(end=6), act_steps=4, cond_steps=3)
    obs, _ = env.reset()
    assert obs.shape == (3, 2) and (obs[:, 0] == 0).all()  # the first observation repeated
    obs, r, term, trunc, _ = env.step(np.zeros((4, 1)))
    assert r == 1 + 2 + 3 + 4 and not term and obs[:, 0].tolist() == [2, 3, 4]
    obs, r, term, trunc, _ = env.step(np.zeros((4, 1)))
    assert r == 5 + 6 and term and not trunc and obs[:, 0].tolist() == [4, 5, 6]  # stopped early at done


def test_sync_vec_env_same_step_autoreset_with_final_obs():
    envs = SyncChunkVecEnv([lambda: MultiStep(Counter(end=4, truncate=True), 4),
                            lambda: MultiStep(Counter(end=100), 4)])
    obs = envs.reset(seed=0)
    obs, r, term, trunc, info = envs.step(np.zeros((2, 4, 1)))
    assert trunc.tolist() == [True, False] and term.tolist() == [False, False]
    assert obs[0, -1, 0] == 0 and info["final_obs"][0, -1, 0] == 4  # reset at once; final obs kept
    assert np.array_equal(info["final_obs"][1], obs[1]) and r.tolist() == [10, 10]


def test_process_vec_env_matches_sync():
    fns = [lambda i=i: MultiStep(Counter(end=3 + i, ident=i), 2) for i in range(5)]
    sync, proc = SyncChunkVecEnv(fns), ProcessChunkVecEnv(fns, n_workers=2)
    try:
        np.testing.assert_array_equal(sync.reset(seed=0), proc.reset(seed=0))
        for _ in range(4):
            a, b = sync.step(np.zeros((5, 2, 1))), proc.step(np.zeros((5, 2, 1)))
            for x, y in zip(a[:4], b[:4]):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(a[4]["final_obs"], b[4]["final_obs"])
    finally:
        proc.close()


def test_gym_vec_env_seeding_is_reproducible():
    task = get_task("hopper")
    a, b = make_vec_env(task, 3, seed=0, backend="gymnasium"), make_vec_env(task, 3, seed=0, backend="gymnasium")
    np.testing.assert_array_equal(a.reset(seed=7), b.reset(seed=7))
    act = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.step(act)[0], b.step(act)[0])


@pytest.mark.skipif(importlib.util.find_spec("envpool") is None, reason="envpool is optional and not installed")
def test_envpool_chunks_match_single_steps():
    task = get_task("hopper")
    chunked = make_vec_env(task, 4, seed=3, act_steps=4, cond_steps=2)
    single = make_vec_env(task, 4, seed=3, act_steps=1, cond_steps=2)
    assert type(chunked).__name__ == "EnvpoolChunkVecEnv"
    np.testing.assert_array_equal(chunked.reset(seed=3), single.reset(seed=3))
    rng = np.random.default_rng(0)
    for _ in range(30):
        act = rng.uniform(-1, 1, (4, 4, 3)).astype(np.float32)
        obs, r, term, trunc, info = chunked.step(act)
        total, done, last = np.zeros(4), np.zeros(4, bool), None
        for k in range(4):  # the same actions one at a time; finished envs stop contributing
            o, r1, t1, tr1, i1 = single.step(act[:, k:k + 1])
            total += np.where(done, 0, r1)
            last = np.where(done[:, None, None], last, i1["final_obs"]) if last is not None else i1["final_obs"]
            done |= t1 | tr1
        np.testing.assert_allclose(r, total, rtol=1e-5)
        np.testing.assert_array_equal(term | trunc, done)
        np.testing.assert_allclose(info["final_obs"], last, rtol=1e-6)
        if done.any():
            break


def _counter_task(success: float, max_episode_steps: int = 8) -> Task:
    return Task("counter", "gym", "counter", 1, 1, max_episode_steps, 4, 4, success_chunk_reward=success)


def test_evaluate_counts_finished_episodes():
    envs = SyncChunkVecEnv([lambda: MultiStep(Counter(end=8), 4) for _ in range(3)])
    zero = lambda obs: np.zeros((len(obs), 4, 1))  # noqa: E731
    out = evaluate(envs, zero, _counter_task(5.0), act_steps=4, seed=0, index=0, n_steps=5)
    # 8-step episodes are 2 chunks (rewards 10 and 26): each env finishes two in 5 chunk-steps, not the third
    assert out["n_episodes"] == 6 and out["return_mean"] == 36.0 and out["success_rate"] == 1.0  # 26/4 >= 5
    assert out["episode_length"] == 2.0
    out = evaluate(envs, zero, _counter_task(7.0), act_steps=4, seed=0, index=0, n_steps=5)
    assert out["success_rate"] == 0.0


def test_evaluate_refuses_non_finite_actions():
    from common.errors import NonFiniteError
    envs = SyncChunkVecEnv([lambda: MultiStep(Counter(end=8), 4) for _ in range(2)])
    with pytest.raises(NonFiniteError, match="non-finite actions"):
        evaluate(envs, lambda obs: np.full((len(obs), 4, 1), np.nan), _counter_task(5.0), act_steps=4, seed=0, index=0)


def test_evaluate_default_horizon_is_one_episode():
    """Every script evaluates on the same horizon: ⌈max_episode_steps / T_e⌉ chunk-steps."""
    envs = SyncChunkVecEnv([lambda: MultiStep(Counter(end=8), 4) for _ in range(3)])
    zero = lambda obs: np.zeros((len(obs), 4, 1))  # noqa: E731
    assert eval_horizon(_counter_task(5.0, 8), 4) == 2 and eval_horizon(_counter_task(5.0, 9), 4) == 3
    assert evaluate(envs, zero, _counter_task(5.0, 8), act_steps=4, seed=0, index=0)["n_episodes"] == 3
    # 3 chunk-steps: no second episode
    assert evaluate(envs, zero, _counter_task(5.0, 9), act_steps=4, seed=0, index=0)["n_episodes"] == 3


def test_env_backend_is_explicit():
    task = get_task("hopper")
    envs = make_vec_env(task, 2, seed=0, backend="gymnasium")
    assert envs.backend == "gymnasium"
    with pytest.raises(TaskError, match="gym locomotion"):
        make_vec_env(get_task("avoid-m2"), 2, backend="envpool")
    with pytest.raises(TaskError, match="choose one of"):
        make_vec_env(task, 2, backend="mujoco")
    if importlib.util.find_spec("envpool") is None:
        with pytest.raises(TaskError, match="pip install envpool"):
            make_vec_env(task, 2, backend="envpool")


# ---------------------------------------------------------------- networks
def test_residual_mlp_block_counts():
    count = lambda m: sum(isinstance(x, ResidualBlock) for x in m.modules())  # noqa: E731
    assert count(ResidualMLP(10, [512] * 3, 4)) == 1 and count(ResidualMLP(10, [1024] * 7, 4)) == 3
    m = ResidualMLP(10, [32] * 3, 4, activation="mish", use_layernorm=True)
    assert m(torch.randn(5, 10)).shape == (5, 4)


def test_network_shapes():
    net = DiffusionMLP(7, 4, 23, cond_steps=2, mlp_dims=(64, 64, 64), cond_mlp_dims=(32, 16), activation="mish")
    out = net(torch.randn(3, 4, 7), torch.tensor([0, 5, 19]), torch.randn(3, 2, 23))
    assert out.shape == (3, 4, 7)
    out2 = net(torch.randn(3, 4, 7), torch.tensor([1, 5, 19]), torch.randn(3, 2, 23))
    assert not torch.allclose(out, out2)  # depends on the inputs
    assert ObsCritic(23, 2)(torch.randn(3, 2, 23)).shape == (3,)
    q1, q2 = DoubleQCritic(23, 7, 4)(torch.randn(3, 1, 23), torch.randn(3, 4, 7))
    assert q1.shape == q2.shape == (3,) and not torch.allclose(q1, q2)


def _reference_lr_trace(max_lr, min_lr, first_cycle, warmup, n):
    """Plain transcription of `irom-princeton/dppo` `util/scheduler.py` `CosineAnnealingWarmupRestarts`
    (gamma 1, cycle_mult 1): the LR after construction (init_lr: min_lr), then after each step()."""
    lrs, step_in_cycle = [min_lr], 0
    for _ in range(n - 1):
        step_in_cycle += 1
        if step_in_cycle >= first_cycle:
            step_in_cycle -= first_cycle
        if step_in_cycle < warmup:
            lrs.append((max_lr - min_lr) * step_in_cycle / warmup + min_lr)
        else:
            cos = math.cos(math.pi * (step_in_cycle - warmup) / (first_cycle - warmup))
            lrs.append(min_lr + (max_lr - min_lr) * (1 + cos) / 2)
    return lrs


@pytest.mark.parametrize("max_lr,min_lr,first_cycle,warmup", [(1e-5, 1e-6, 10000, 10), (1e-3, 1e-4, 20, 5),
                                                              (1e-3, 1e-4, 12, 0), (1e-4, 1e-4, 1000, 10)])
def test_lr_schedule_matches_reference_cosine_annealing_warmup(max_lr, min_lr, first_cycle, warmup):
    from common.runs import cosine_annealing_warmup
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_annealing_warmup(max_lr, min_lr, first_cycle, warmup))
    got = []
    for _ in range(30):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, _reference_lr_trace(max_lr, min_lr, first_cycle, warmup, 30), rtol=1e-12)
    if min_lr == max_lr:  # constant configs: the LR is the flag's value, bit for bit
        assert all(x == max_lr for x in got)
    if first_cycle == 10000:  # furniture: starts at 1e-6, 5.5e-6 half-way through the warm-up, 1e-5 after it
        assert got[0] == pytest.approx(1e-6) and got[5] == pytest.approx(5.5e-6) and got[10] == pytest.approx(1e-5)
