"""The task registry: every task of the paper by the names users type.

`get_task("hopper")`, `get_task("Hopper-v5")` and `get_task("avoid-m2")` return a `Task`; an
unknown id raises `TaskError` listing the valid ids. `require_simulator(task)` raises `TaskError`
with one line naming the missing package when the task's simulator is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from common.errors import TaskError


@dataclass(frozen=True)
class Task:
    id: str
    """canonical id, e.g. `hopper`, `square`, `avoid-m2`, `one-leg-low`"""
    suite: str
    """`gym` | `robomimic` | `robomimic-img` | `avoid` | `furniture` | `kitchen`"""
    env_name: str
    """the simulator's own name (`Hopper-v5`, `NutAssemblySquare`, `avoid`, `one_leg`)"""
    obs_dim: int
    action_dim: int
    max_episode_steps: int
    horizon_steps: int
    """T_a used in fine-tuning (paper App. D.9)"""
    act_steps: int
    """T_e"""
    cond_steps: int = 1
    """T_o"""
    requires: tuple[str, ...] = ()
    """importable modules the simulator needs, each with the pip name after a colon"""
    data: str = ""
    """where demonstrations come from (URL, or `built-in`)"""
    success_chunk_reward: float | None = None
    """an episode succeeds if some executed chunk has mean reward >= this (None: no success rate)"""
    success_return: float | None = None
    """an episode succeeds if its return (sum of rewards) >= this (furniture: every part pair assembled)"""
    reset_every_iteration: bool = True
    """envs are reset at the start of every fine-tuning iteration (False for gym locomotion)"""
    ref_scores: tuple[float, float] | None = None
    """(random, expert) returns for the D4RL normalised score"""
    aliases: tuple[str, ...] = field(default=())
    options: tuple[tuple[str, str], ...] = ()
    """extra simulator settings (e.g. furniture randomness, avoid data subset)"""

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


_D4RL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{}_medium-v2.hdf5"
_ROBOMIMIC = "http://downloads.cs.stanford.edu/downloads/rt_benchmark/{}/mh/low_dim_v141.hdf5"
_ROBOMIMIC_IMG = "http://downloads.cs.stanford.edu/downloads/rt_benchmark/{}/mh/image_v141.hdf5"
_MUJOCO = ("mujoco:gymnasium[mujoco]==1.4.0",)
_ROBOSUITE = ("robosuite:robosuite==1.4.1", "mujoco:mujoco==3.9.0")
_KITCHEN = ("gymnasium_robotics:gymnasium-robotics==1.4.2", "mujoco:mujoco==3.9.0")
_ISAAC = ("isaacgym:isaacgym (NVIDIA Isaac Gym Preview 4, not on PyPI: https://developer.nvidia.com/isaac-gym)",
          "furniture_bench:furniture-bench (the fork: https://github.com/ankile/furniture-bench)")

_TASKS: list[Task] = [
    # Gym locomotion (paper App. D.9): T_a = T_e = 4, envs continue across iterations.
    Task("hopper", "gym", "Hopper-v5", 11, 3, 1000, 4, 4, requires=_MUJOCO,
         data=_D4RL.format("hopper"), reset_every_iteration=False,
         ref_scores=(-20.272305, 3234.3), aliases=("Hopper-v5", "hopper-medium-v2")),
    Task("walker2d", "gym", "Walker2d-v5", 17, 6, 1000, 4, 4, requires=_MUJOCO,
         data=_D4RL.format("walker2d"), reset_every_iteration=False,
         ref_scores=(1.629008, 4592.3), aliases=("Walker2d-v5", "walker2d-medium-v2")),
    Task("halfcheetah", "gym", "HalfCheetah-v5", 17, 6, 1000, 4, 4, requires=_MUJOCO,
         data=_D4RL.format("halfcheetah"), reset_every_iteration=False,
         ref_scores=(-280.178953, 12135.0), aliases=("HalfCheetah-v5", "halfcheetah-medium-v2")),
    # Robomimic state: sparse reward, success = solved for a whole executed chunk.
    Task("lift", "robomimic", "Lift", 19, 7, 300, 4, 4, requires=_ROBOSUITE,
         data=_ROBOMIMIC.format("lift"), success_chunk_reward=1.0, aliases=("Lift",)),
    Task("can", "robomimic", "PickPlaceCan", 23, 7, 300, 4, 4, requires=_ROBOSUITE,
         data=_ROBOMIMIC.format("can"), success_chunk_reward=1.0, aliases=("Can", "PickPlaceCan")),
    Task("square", "robomimic", "NutAssemblySquare", 23, 7, 400, 4, 4, requires=_ROBOSUITE,
         data=_ROBOMIMIC.format("square"), success_chunk_reward=1.0,
         aliases=("Square", "NutAssemblySquare")),
    Task("transport", "robomimic", "TwoArmTransport", 59, 14, 800, 8, 8, requires=_ROBOSUITE,
         data=_ROBOMIMIC.format("transport"), success_chunk_reward=1.0,
         aliases=("Transport", "TwoArmTransport")),
    # Robomimic pixel (paper §5.3, App. D.5): obs = proprio (eef pos, quat, gripper per arm) + uint8 camera images;
    # the reference's cameras (cfg/robomimic/finetune/*/ft_ppo_diffusion_mlp_img.yaml, `image_keys`).
    *[Task(f"{name}-img", "robomimic-img", env, 9 * arms, 7 * arms, steps, ta, ta, requires=_ROBOSUITE,
           data=_ROBOMIMIC_IMG.format(name), success_chunk_reward=1.0,
           aliases=(f"{name}_img", f"{name.capitalize()}-img"), options=(("cameras", cams),))
      for name, env, arms, steps, ta, cams in (
          ("lift", "Lift", 1, 300, 4, "robot0_eye_in_hand"), ("can", "PickPlaceCan", 1, 300, 4, "robot0_eye_in_hand"),
          ("square", "NutAssemblySquare", 1, 400, 4, "agentview"),
          ("transport", "TwoArmTransport", 2, 800, 8, "shouldercamera0,shouldercamera1"))],
    # D3IL Avoid (paper §6, App. D.8): our own vectorised simulator, no extra package.
    *[Task(f"avoid-m{m}", "avoid", "avoid", 4, 2, 100, 4, 4, data="built-in",
           success_chunk_reward=2.0, aliases=(f"Avoid-M{m}", f"avoid_m{m}", f"M{m}"),
           options=(("subset", f"M{m}"),)) for m in (1, 2, 3)],
    # Furniture-Bench (paper §5.3): needs Isaac Gym on an NVIDIA GPU.
    *[Task(f"{name}-{rand}", "furniture", name.replace("-", "_"), obs, 10, steps, 8, 8,
           requires=_ISAAC, data="the reference's furniture datasets (--dataset paper downloads them)",
           options=(("randomness", rand), ("n_parts", str(parts))),
           success_return=float(parts),  # all part pairs assembled (reference: len(pairs_to_assemble))
           aliases=(f"{name.replace('-', '_')}_{rand}",))
      for name, obs, steps, parts in (("one-leg", 58, 700, 1), ("lamp", 44, 1000, 2),
                                      ("round-table", 44, 1000, 2))
      for rand in ("low", "med")],
    # Franka Kitchen (the reference's cfg/gym/finetune/kitchen-*-v0) on gymnasium-robotics, D4RL's 60-dim observation and
    # reward (subtasks completed; success: all four): sims/kitchen.py. Data: Minari's D4RL/kitchen datasets.
    *[Task(f"kitchen-{name}", "kitchen", "FrankaKitchen-v1", 60, 9, 280, 4, 4, requires=_KITCHEN, success_return=4.0,
           data=f"minari:D4RL/kitchen/{name}-v2", reset_every_iteration=False, options=(("tasks", tasks),),
           aliases=(f"kitchen-{name}-v0", f"kitchen_{name}"))  # D4RL's subtasks of each dataset:
      for name, tasks in (("complete", "microwave,kettle,light switch,slide cabinet"),
                          ("partial", "microwave,kettle,light switch,slide cabinet"),
                          ("mixed", "microwave,kettle,bottom burner,light switch"))],
]

TASKS: dict[str, Task] = {t.id: t for t in _TASKS}
_LOOKUP: dict[str, str] = {}
for _t in _TASKS:
    for _name in (_t.id, *_t.aliases):
        _LOOKUP[_name.lower()] = _t.id


def task_ids() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    """Look a task up by any of its names (case-insensitive)."""
    key = _LOOKUP.get(name.strip().lower())
    if key is None:
        raise TaskError(f"unknown task {name!r}; valid ids: {', '.join(TASKS)}")
    return TASKS[key]


def missing_packages(task: Task) -> list[str]:
    """The pip names of the simulator packages this task needs that are not importable."""
    missing = []
    for req in task.requires:
        module, pip_name = req.split(":", 1)
        if importlib.util.find_spec(module) is None:
            missing.append(pip_name)
    return missing


def require_simulator(task: Task) -> None:
    """Raise TaskError naming the missing package(s) if the task cannot be simulated here."""
    missing = missing_packages(task)
    if missing:
        raise TaskError(f"task {task.id!r} needs {' and '.join(missing)}, which is not installed")


def refuse_pixel_task(task: Task) -> None:
    """TaskError for a pixel task given to a script of state observations: one line naming the pixel scripts."""
    if task.suite == "robomimic-img":
        raise TaskError(f"--env-id {task.id} is a pixel task: pre-train with dppo_pretrain_pixel.py and fine-tune with "
                        "dppo_finetune_pixel.py")


# what MuJoCo's `import mujoco` (and robosuite's import) accepts in MUJOCO_GL on Linux; anything else is a RuntimeError
# there (mujoco/rendering/classic/gl_context.py) or, in robosuite, silently replaced by egl
MUJOCO_GL_VALUES = ("egl", "osmesa", "glfw", "glx", "", "enable", "enabled", "on", "true", "1",
                    "disable", "disabled", "off", "false", "0")


def check_mujoco_gl(task: Task | None = None) -> None:
    """TaskError naming the allowed values when MUJOCO_GL holds one MuJoCo does not know (a typo such as `eggl`), for
    `task` if it is simulated with MuJoCo (gym locomotion, robomimic, kitchen; None: always): one line before any env."""
    gl, mujoco = os.environ.get("MUJOCO_GL"), task is None or task.suite not in ("avoid", "furniture")
    if mujoco and gl is not None and gl.lower().strip() not in MUJOCO_GL_VALUES:
        raise TaskError(f"MUJOCO_GL={gl!r} is not a MuJoCo rendering backend: set MUJOCO_GL=egl (no display), osmesa "
                        "(software rendering) or glfw (a display), or unset it")
