"""Checks shared by the script tests."""

import csv
import os

import torch


def assert_resumed_run_matches(full: dict, resumed: dict, n_eval_rows: int, key: str = "actor_ft") -> None:
    """A resumed run wrote the same eval.csv and the same final weights (`key`: actor_ft, or actor for the
    whole-network fine-tuning scripts) as an uninterrupted one."""
    def read(out: dict) -> list[dict]:
        with open(os.path.join(out["run_dir"], "eval.csv")) as f:
            return list(csv.DictReader(f))

    assert read(full) == read(resumed) and len(read(full)) == n_eval_rows
    a = torch.load(full["checkpoint"], weights_only=True)[key]
    b = torch.load(resumed["checkpoint"], weights_only=True)[key]
    assert all(torch.equal(a[k], b[k]) for k in a)


class WiringRecorder:
    """Records what a fine-tuning script's `main` hands to its parts, by wrapping the names it imported:
    every env step and reset, the evaluation seeds, the reward scaler's inputs, the GAE call (with the
    next values recomputed from the finished episodes' final observations) and, per backward pass,
    whether each critic parameter started from a zeroed gradient."""

    def __init__(self, module, monkeypatch, normalization: dict) -> None:
        import numpy as np

        from common.normalizer import Normalizer
        self.normalizer = Normalizer.from_state_dict(normalization)
        self.steps, self.resets, self.eval_seeds, self.firsts, self.gae = [], [], [], [], []
        self.fresh_grads: list[bool] = []
        self.critic = None
        rec = self
        import common.runs
        # the evaluation: the script's own import of it, or (scripts on `common.runs.Run`) the one `Run` calls
        eval_owner = module if hasattr(module, "evaluate") else common.runs
        real_make, real_eval, real_scaler, real_critic = (module.make_vec_env, eval_owner.evaluate,
                                                          module.RunningRewardScaler, module.ObsCritic)
        real_gae = module.compute_gae

        def make(*a, **kw):
            envs = real_make(*a, **kw)
            step, reset = envs.step, envs.reset

            def recording_step(action):
                out = step(action)
                rec.steps.append(dict(action=np.array(action), reward=np.array(out[1]), term=np.array(out[2]),
                                      trunc=np.array(out[3]), final_obs=np.array(out[4]["final_obs"])))
                return out

            def recording_reset(seed=None):
                rec.resets.append(seed)
                return reset(seed=seed)
            envs.step, envs.reset = recording_step, recording_reset
            return envs

        def evaluate(*a, **kw):
            rec.eval_seeds.append(kw.get("seed"))
            return real_eval(*a, **kw)

        class Scaler(real_scaler):
            def __call__(self, rewards, firsts):
                rec.firsts.append((rewards.copy(), firsts.copy()))
                return super().__call__(rewards, firsts)

        class Critic(real_critic):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                rec.critic = self
                for p in self.parameters():
                    p.register_hook(lambda g, p=p: setattr(p, "_incoming", g.clone()))
                    p.register_post_accumulate_grad_hook(
                        lambda p: rec.fresh_grads.append(torch.equal(p.grad, p._incoming)))

        def compute_gae(rewards, values, next_values, cut, dones, gamma, gae_lambda):
            out = real_gae(rewards, values, next_values, cut, dones, gamma, gae_lambda)
            final = torch.as_tensor(np.stack([s["final_obs"] for s in rec.steps[-rewards.shape[0]:]]), dtype=torch.float32)
            with torch.no_grad():  # V now of each step's next observation (the final one where an episode ended)
                expected = rec.critic(rec.normalizer.normalize_obs(final).flatten(0, 1)).view(rewards.shape)
            rec.gae.append(dict(rewards=rewards, values=values, next_values=next_values, cut=cut, dones=dones,
                                gamma=gamma, gae_lambda=gae_lambda, advantages=out[0], expected_next_values=expected))
            return out
        for name, f in (("make_vec_env", make), ("RunningRewardScaler", Scaler), ("ObsCritic", Critic),
                        ("compute_gae", compute_gae)):
            monkeypatch.setattr(module, name, f)
        monkeypatch.setattr(eval_owner, "evaluate", evaluate)

    def check_first_iteration(self, n_steps: int, gamma: float, gae_lambda: float, bootstrap_truncated: bool,
                              seed: int, num_envs: int) -> None:
        """Iteration 0 (the first n_steps env steps) was wired into the scaler and GAE as the reference does."""
        import numpy as np
        steps = self.steps[:n_steps]
        term = np.stack([s["term"] for s in steps]).astype(np.float64)
        dones = np.stack([s["term"] | s["trunc"] for s in steps]).astype(np.float64)
        assert dones[:-1].all(1).any() and (term != dones).any()  # episodes truncated inside the iteration
        rewards, firsts = self.firsts[0]
        np.testing.assert_array_equal(rewards, np.stack([s["reward"] for s in steps]))
        np.testing.assert_array_equal(firsts[0], np.ones(num_envs))  # after the reset
        np.testing.assert_array_equal(firsts[1:], dones[:-1])  # then the previous step's done
        actions = torch.as_tensor(np.stack([s["action"] for s in steps]), dtype=torch.float32)
        executed = self.normalizer.normalize_action(actions)
        assert executed.abs().max() > 1.001  # final_action_clip is off (the Avoid default): nothing clamps the chunk
        g = self.gae[0]
        assert (g["gamma"], g["gae_lambda"]) == (gamma, gae_lambda)
        np.testing.assert_array_equal(g["dones"].numpy(), dones)
        np.testing.assert_array_equal(g["cut"].numpy(), term if bootstrap_truncated else dones)
        torch.testing.assert_close(g["next_values"], g["expected_next_values"])
        train_seeds = {s for s in self.resets if s not in self.eval_seeds}
        assert self.eval_seeds  # the hook saw the evaluations
        assert seed in train_seeds and not set(self.eval_seeds) & train_seeds  # evaluation episodes are not training's
        assert self.fresh_grads and all(self.fresh_grads)  # every backward starts from zeroed critic gradients


def ref_weights(d: dict, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """A reference network's state_dict stored in an npz as `<prefix>.000`, ... and `<prefix>.names`, in its order."""
    return [(str(n), torch.from_numpy(d[f"{prefix}.{i:03d}"])) for i, n in enumerate(d[f"{prefix}.names"])]


def load_by_order(module: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Copy the reference tensors into `module`'s state_dict entries, in order; shapes must agree."""
    sd = module.state_dict()
    assert len(sd) == len(weights), (list(sd), [n for n, _ in weights])
    for (k, v), (n, w) in zip(sd.items(), weights):
        assert v.shape == w.shape, f"{k} {tuple(v.shape)} vs reference {n} {tuple(w.shape)}"
    module.load_state_dict({k: w for k, (_, w) in zip(sd, weights)})


def policy_action(norm, executed: torch.Tensor) -> torch.Tensor:
    """The policy-space action an env executed: the exact inverse of `Normalizer.unnormalize_action`, which maps back
    with (max − min) as the reference's env wrappers do (normalize_action divides by max − min + 1e-6)."""
    lo, hi = norm.action_min.to(executed), norm.action_max.to(executed)
    return 2 * (executed - lo) / (hi - lo) - 1


def float64_forward(module: torch.nn.Module, *args):
    """`module(*args)` evaluated in float64 on a double copy of the module (float tensors among `args`, and in dicts
    among them, cast to float64, and tensors the forward creates, e.g. a time embedding's frequencies, made in float64 too).

    float64 kernels agree across CPUs to ~1e-15, so comparing a stored float32 reference vector with this
    value tests the function our code computes without depending on this CPU's float32 kernels."""
    import copy

    def cast(a):
        if isinstance(a, dict):
            return {k: cast(v) for k, v in a.items()}
        return a.double() if torch.is_tensor(a) and a.is_floating_point() else a

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            return copy.deepcopy(module).double()(*(cast(a) for a in args))
    finally:
        torch.set_default_dtype(default)
