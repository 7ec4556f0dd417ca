"""Franka Kitchen (`kitchen-complete`, `kitchen-partial`, `kitchen-mixed`) on gymnasium-robotics' FrankaKitchen-v1: D4RL's
60-dim observation and reward, a small Minari kitchen dataset written with Minari's own writer and read through
`load_task_dataset`, the reference's fine-tuning defaults, and a 2-iteration DPPO run on the real simulator."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch

from common.envs import EpisodeTracker, make_env
from common.errors import DatasetError, UsageError
from common.tasks import get_task
from loaders.datasets import load_task_dataset

pytest.importorskip("gymnasium_robotics")
from sims.kitchen import kitchen_tasks, make_kitchen_env  # noqa: E402

MKLS = ["microwave", "kettle", "light switch", "slide cabinet"]
GOALS = {"microwave": [-0.75], "kettle": [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06], "light switch": [-0.69, -0.05],
         "slide cabinet": [0.37], "bottom burner": [-0.88, -0.01]}
INDICES = {"microwave": [22], "kettle": list(range(23, 30)), "light switch": [17, 18], "slide cabinet": [19],
           "bottom burner": [11, 12]}  # D4RL's OBS_ELEMENT_INDICES, in the 30 joint positions


@pytest.fixture
def minari_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("DPPO_OFFLINE", "1")
    return tmp_path / "minari"


def test_registry_and_the_reference_finetuning_defaults():
    import dppo_finetune as ft

    for name, tasks in (("complete", MKLS), ("partial", MKLS), ("mixed", ["microwave", "kettle", "bottom burner",
                                                                           "light switch"])):
        task = get_task(f"kitchen-{name}-v0")
        assert task.id == f"kitchen-{name}" and (task.obs_dim, task.action_dim, task.max_episode_steps) == (60, 9, 280)
        assert (task.horizon_steps, task.act_steps, task.success_return) == (4, 4, 4.0) and kitchen_tasks(task) == tasks
        assert task.data == f"minari:D4RL/kitchen/{name}-v2" and not task.reset_every_iteration
        args = ft.Args(env_id=task.id, checkpoint="unused.pt")
        ft.fill_defaults(args)  # cfg/gym/finetune/kitchen-*-v0/ft_ppo_diffusion_mlp.yaml
        assert (args.n_train_itr, args.num_envs, args.n_steps, args.batch_size, args.update_epochs) == (301, 40, 70, 5600, 10)
        assert (args.ft_denoising_steps, args.act_steps, args.gamma, args.gamma_denoising) == (10, 4, 0.99, 0.99)
        assert (args.actor_lr, args.actor_lr_min, args.critic_lr, args.clip_coef, args.clip_coef_base) == (
            1e-4, 1e-4, 1e-3, 0.01, 0.01)
        assert (args.n_critic_warmup_itr, args.min_sampling_denoising_std, args.use_ddim) == (0, 0.1, False)


def test_observation_is_d4rl_layout_and_reward_counts_subtasks_once():
    task = get_task("kitchen-complete")
    env = make_env(task, seed=0)
    obs, _ = env.reset(seed=0)
    data = env.unwrapped.data
    assert obs.shape == (60,) and obs.dtype == np.float32 and env.observation_space.shape == (60,)
    np.testing.assert_allclose(obs[:30], data.qpos[:30], atol=0.02)  # joint positions (with the env's small noise)
    goal = np.zeros(30)
    for name in MKLS:
        goal[INDICES[name]] = GOALS[name]
    np.testing.assert_array_equal(obs[30:], goal.astype(np.float32))  # bottom burner (not a subtask here): zeros
    zero = np.zeros(9)
    assert env.step(zero)[1] == 0.0
    data.qpos[22] = -0.75  # the microwave opened: one subtask done, counted at that step only
    mujoco.mj_forward(env.unwrapped.model, data)
    rewards = [env.step(zero)[1] for _ in range(3)]
    assert rewards == [1.0, 0.0, 0.0]
    for name in ("light switch", "slide cabinet", "kettle"):  # the other three at once: 3, and the episode terminates
        data.qpos[INDICES[name]] = GOALS[name]
    mujoco.mj_forward(env.unwrapped.model, data)
    _, reward, terminated, truncated, _ = env.step(zero)
    assert (reward, terminated, truncated) == (3.0, True, False)
    tracker = EpisodeTracker(1, 4, task.success_chunk_reward, task.success_return)  # success: all four (return 4)
    tracker.step(np.array([1.0]), np.array([False]))
    tracker.step(np.array([3.0]), np.array([True]))
    tracker.step(np.array([3.0]), np.array([True]))
    assert tracker.pop()["success_rate"] == 0.5
    env.close()


def kitchen_episodes(tasks: list[str], lengths: tuple[int, ...] = (12, 9, 10)) -> tuple[list[dict], gym.Env]:
    """Random-action FrankaKitchen-v1 episodes (dict observations, as Minari stores them); episode 1 keeps its zero
    return (the positive-return filter drops it), the others get a completion reward at their last step."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("FrankaKitchen-v1", tasks_to_complete=tasks, disable_env_checker=True)
    env.action_space.seed(0)
    episodes = []
    for i, n in enumerate(lengths):
        obs, _ = env.reset(seed=i)
        steps = [obs]
        actions = [env.action_space.sample() for _ in range(n)]
        steps += [env.step(a)[0] for a in actions]
        stacked = {"observation": np.stack([s["observation"] for s in steps]),
                   **{key: {t: np.stack([s[key][t] for s in steps]) for t in tasks} for key in ("achieved_goal",
                                                                                            "desired_goal")}}
        rewards = np.zeros(n)
        rewards[-1] = 0.0 if i == 1 else 1.0
        episodes.append(dict(observations=stacked, actions=np.array(actions), rewards=rewards,
                             terminations=np.zeros(n, bool), truncations=np.eye(n, dtype=bool)[-1]))
    return episodes, env


def write_kitchen_minari(dataset_id: str, tasks: list[str]) -> list[dict]:
    import minari
    from minari.data_collector import EpisodeBuffer

    episodes, env = kitchen_episodes(tasks)
    with pytest.warns(UserWarning):  # Minari asks for author, e-mail, code link and description
        minari.create_dataset_from_buffers(dataset_id, [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(episodes)],
                                           env=env, algorithm_name="random")
    env.close()
    return episodes


def test_minari_kitchen_dataset_is_flattened_like_the_env(minari_path):
    episodes = write_kitchen_minari("test/kitchen/tiny-v0", MKLS)
    task = get_task("kitchen-complete")
    trajs, norm = load_task_dataset(task, "minari:test/kitchen/tiny-v0")
    assert len(trajs) == 2  # episode 1 (zero return) dropped, as the reference's get_d4rl_dataset.py does
    env = make_kitchen_env(task)
    for t, i in zip(trajs, (0, 2)):  # observation s_k with action a_k: the final observation is left out
        ep, L = episodes[i], len(episodes[i]["actions"])
        o = ep["observations"]["observation"][:L]
        expected = np.concatenate([o[:, :9], o[:, 18:39], np.stack([env.observation({
            "observation": o[k], "desired_goal": {n: ep["observations"]["desired_goal"][n][k] for n in MKLS}})[30:]
            for k in range(L)])], 1)
        assert t["obs"].shape == (L, 60) and t["obs"].dtype == np.float32
        np.testing.assert_array_equal(t["obs"], expected.astype(np.float32))
        np.testing.assert_array_equal(t["actions"], ep["actions"].astype(np.float32))
    env.close()
    assert norm.obs_min.shape == (60,) and norm.action_min.shape == (9,)
    with pytest.raises(DatasetError) as e:  # the complete/partial subtasks are not kitchen-mixed's
        load_task_dataset(get_task("kitchen-mixed"), "minari:test/kitchen/tiny-v0")
    assert "bottom burner" in str(e.value) and "minari:D4RL/kitchen/mixed-v2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="Box"):  # a kitchen dataset for Hopper
        load_task_dataset(get_task("hopper"), "minari:test/kitchen/tiny-v0")


def test_the_default_kitchen_dataset_offline_is_one_line_naming_minari_download(minari_path):
    with pytest.raises(DatasetError) as e:
        load_task_dataset(get_task("kitchen-complete"))  # no --dataset: the task's minari:D4RL/kitchen/complete-v2
    msg = str(e.value)
    assert "minari download D4RL/kitchen/complete-v2" in msg and "\n" not in msg and not minari_path.exists()


def test_pretrain_and_two_finetuning_iterations_on_the_real_simulator(minari_path, tmp_path, monkeypatch):
    import dppo_finetune as ft
    import dppo_pretrain as pt

    write_kitchen_minari("test/kitchen/tiny-v0", MKLS)
    monkeypatch.chdir(tmp_path)
    pre = pt.main(pt.Args(env_id="kitchen-complete", dataset="minari:test/kitchen/tiny-v0", n_epochs=1, batch_size=8,
                          mlp_dims=(32, 32), cond_mlp_dims=(16,), eval_every=0, seed=0))
    ckpt = torch.load(pre["checkpoint"], weights_only=True)
    assert ckpt["horizon_steps"] == 4 and ckpt["denoising_steps"] == 20
    out = ft.main(ft.Args(env_id="kitchen-complete", checkpoint=pre["checkpoint"], n_train_itr=2, num_envs=2, n_steps=4,
                          batch_size=40, update_epochs=1, val_freq=0, eval_n_steps=3, seed=0))
    h = out["history"]
    assert len(h) == 2 and all(np.isfinite(x["pg_loss"]) and np.isfinite(x["v_loss"]) for x in h)
    assert [x["env_steps"] for x in h] == [32, 64]  # 2 envs x 4 chunk-steps x T_e = 4 per iteration
    post = torch.load(out["checkpoint"], weights_only=True)
    assert any(not torch.equal(post["actor_ft"][k], v) for k, v in ckpt["ema"].items())
    assert os.path.isfile(os.path.join(out["run_dir"], "eval.csv"))


def test_the_reference_kitchen_files_are_known_and_offline_is_one_line(tmp_path, monkeypatch):
    """`--checkpoint paper` / `--dataset paper` name the reference's kitchen files (script/download_url.py); its
    observations are D4RL's 60, this layout, and its diffusion network is Mish with K = 20 (pre_diffusion_mlp.yaml)."""
    from common import runs
    from loaders import convert

    monkeypatch.setenv("DPPO_OFFLINE", "1")
    monkeypatch.setenv("DPPO_DATA_DIR", str(tmp_path))
    task = get_task("kitchen-mixed")
    assert convert.config_path(task, "diffusion_mlp") == "cfg/gym/pretrain/kitchen-mixed-v0/pre_diffusion_mlp.yaml"
    assert convert.reference_config(task, "diffusion_mlp") == {"denoising_steps": 20, "activation": "mish"}
    with pytest.raises(DatasetError) as e:
        runs.load_checkpoint("paper", "diffusion", "", task, conversion=lambda: convert)
    assert "1X24Hqbn4b4xyLK_1A3D6zhSgsN7frVCG" in str(e.value) and "\n" not in str(e.value)
    assert "kitchen-mixed-v0_pre_diffusion_mlp_ta4_td20_state_8000.pt" in str(e.value)


@pytest.mark.parametrize("module_name", ["gaussian_ppo", "gmm_ppo", "exact_likelihood_pg"])
def test_a_script_without_kitchen_defaults_refuses_it_in_one_line(module_name):
    """No KeyError: the scripts whose method has no kitchen configuration here say so and name the ones that do."""
    module = importlib.import_module(module_name)
    with pytest.raises(UsageError, match="kitchen-complete: .*kitchen tasks.*dppo_finetune.py"):
        module.fill_defaults(module.Args(env_id="kitchen-complete"))


def test_the_critic_ablation_takes_dppos_kitchen_defaults():
    import dppo_critic_ablation as ab
    args = ab.Args(env_id="kitchen-complete")
    ab.fill_defaults(args)
    assert (args.n_train_itr, args.n_steps, args.batch_size, args.update_epochs) == (301, 70, 5600, 10)
