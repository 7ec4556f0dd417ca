"""D3IL Avoid (paper §6, App. D.8) as a fast vectorised numpy simulator, plus the real demos' loader.

The real task is a Franka whose rod end-effector (radius 0.01) is dragged through six cylinders by
a Cartesian impedance controller (D3IL's MuJoCo avoiding env). We replace MuJoCo with a grey-box
model of "desired position -> end-effector position" identified from the 96 real demos:

    u_t   = clamp_disc(des_t, centre c, radius R_des)       # the arm cannot reach further
    q_t   = clip(ee_t, workspace box) - (0.5, 0.1)           # configuration for the gains
    z_t   = [u_t - ee_t, vel_t, h_t, u_t - u_{t-1}]          # (8,) error, velocity, 2 hidden, feed-fwd
    vel_{t+1} = (W0 + q_x Wx + q_y Wy) z_t                   # gains depend (affinely) on position
    h_{t+1}   = Nh z_t
    ee_{t+1}  = clamp_disc(ee_t + vel_{t+1}, c, R_ee)         # reach limit of the stretched arm

i.e. a coupled 6-state linear model (position, velocity, 2 hidden states per plane) whose gains
vary with the arm configuration, plus the workspace limit (the recorded arm stalls at ~0.81 m
from its base). Index convention of the recordings: ee_{t+1} depends on des up to t (the returned
observation is taken before the physics of that step runs). At reset the model is at rest at the
start, desired = ee.

Fit (`python scripts/avoid_sysid.py --fit avoid_demos.npz`): all constants minimise the open-loop
replay error of all 96 demos (Adam with autograd through the rollout, 1500 iterations, cosine lr
from 5e-3, seed 0, float64).
Measured fidelity (`python scripts/avoid_sysid.py --validate avoid_demos.npz`), replaying each demo's
recorded desired positions open-loop from its recorded start: planar end-effector RMSE 4.1 mm
(worst demo 9 mm), row modes identical for 96/96 demos, 0/96 demos collide (recordings: 0).
A prototype fit of the same model on the even demos only (constant lr) replays the odd,
held-out demos at 4.0 mm with 0 collisions
(train 3.8 mm). The frozen-gain linear part has spectral radius < 1 everywhere inside the reach
disc (it reaches 1.01 only at x > 0.77, y < -0.15, which the disc clamps make unreachable).
"""

from __future__ import annotations

import numpy as np

START = np.array([0.525, -0.28])
# obstacle centre x, y and radius; collision: planar distance < r + rod radius 0.01
OBSTACLES = np.array([[0.5, -0.10, 0.03], [0.425, 0.08, 0.025], [0.575, 0.08, 0.025],
                      [0.35, 0.26, 0.025], [0.50, 0.26, 0.025], [0.65, 0.26, 0.025]])
ROD_RADIUS = 0.01
# mode rows: row 1 |y + 0.1| <= 0.03, row 2 |y - 0.08| <= 0.03, row 3 y >= 0.26
ROW_BOUNDS = ((0.5,), (0.425, 0.575), (0.35, 0.5, 0.65))
ROW_FIRST_MODE = (0, 2, 5)
ACTION_LOW, ACTION_HIGH = np.array([-0.0125, 0.0]), np.array([0.0125, 0.0125])  # demo ranges

# ---- fitted dynamics constants (see module docstring; refit: scripts/avoid_sysid.py --fit) ----
_GAIN_CENTRE = np.array([0.5, 0.1])
_GAIN_BOX = (np.array([0.2, -0.3]), np.array([0.8, 0.5]))
# velocity gains (3, 2, 8) for features [1, q_x, q_y] x z
_W = np.array([
    [[ 0.207038,  0.037139,  0.454387, -0.028229,  0.090982, -0.002466,  0.337114,  0.044873],
     [ 0.032892,  0.066651,  0.111177,  0.856228, -0.033676, -0.050323, -0.033924,  0.090819]],
    [[ 0.224105,  0.083832,  0.069847,  0.088807, -0.036977, -0.432614,  0.120492, -0.038812],
     [-0.004083, -0.142988,  0.275518, -0.038844, -0.336757,  0.210334, -0.134907, -0.127413]],
    [[ 0.076942,  0.294773, -0.120218, -0.500852,  0.188384, -0.116824, -0.112769,  0.397264],
     [ 0.014190,  0.089474,  0.170703, -0.188861, -0.379414, -0.175436,  0.398914, -0.137239]],
])
# hidden-state update (2, 8)
_NH = np.array([[-0.001155, -0.035214,  0.348444, -0.181060,  0.693221, -0.172025,  0.174467, -0.012219],
                [ 0.143034,  0.035770,  0.123710,  0.139787,  0.073747,  0.703543,  0.042780, -0.051001]])
_DISC_C = np.array([-0.052137, 0.115466])  # centre of the reach disc
_R_DES, _R_EE = 0.809299, 0.846979


def _in_bands(xy: np.ndarray) -> np.ndarray:
    """(..., 2) -> (..., 3) bool: is the point inside each mode row's band."""
    y = xy[..., 1]
    return np.stack([np.abs(y + 0.1) <= 0.03, np.abs(y - 0.08) <= 0.03, y >= 0.26], -1)


def _row_mode(x: np.ndarray, row: int) -> np.ndarray:
    return ROW_FIRST_MODE[row] + np.searchsorted(np.array(ROW_BOUNDS[row]), x, side="right")


def row_modes(xy: np.ndarray) -> tuple[int, int, int]:
    """Latched mode of each row along a path (L, 2); -1 where the row was never reached."""
    xy = np.asarray(xy, dtype=np.float64)
    inb = _in_bands(xy)
    out = []
    for r in range(3):
        idx = np.flatnonzero(inb[:, r])
        out.append(int(_row_mode(xy[idx[0], 0], r)) if len(idx) else -1)
    return tuple(out)


def clearance(xy: np.ndarray) -> np.ndarray:
    """(..., 2) -> (...,) distance to the nearest obstacle surface minus the rod radius."""
    d = np.linalg.norm(np.asarray(xy)[..., None, :] - OBSTACLES[:, :2], axis=-1)
    return (d - OBSTACLES[:, 2] - ROD_RADIUS).min(-1)


def collided(xy: np.ndarray) -> bool:
    """Whether a path (L, 2) ever comes within r + 0.01 of an obstacle centre."""
    return bool((clearance(xy) < 0).any())


def step_reward(xy: np.ndarray, mode3: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Reward "m5": -0.1 once collided or while x outside [0.2, 0.8]; else
    +1 if row 3 was passed in mode 5, +1 if y > 0.4. Shapes broadcast: xy (..., 2)."""
    bad = hit | (xy[..., 0] < 0.2) | (xy[..., 0] > 0.8)
    good = (mode3 == 5).astype(np.float32) + (xy[..., 1] > 0.4)
    return np.where(bad, np.float32(-0.1), good).astype(np.float32)


def path_reward(xy: np.ndarray) -> float:
    """Undiscounted m5 return of an end-effector path (L, 2), positions after each step."""
    hit = np.cumsum(clearance(xy) < 0) > 0
    inb = _in_bands(xy)[:, 2]
    mode3 = np.where(np.cumsum(inb) > 0, _row_mode(xy[np.argmax(inb), 0], 2), -1)
    return float(step_reward(xy, mode3, hit).sum())


# ---------------------------------------------------------------- dynamics
def _clamp_disc(xy: np.ndarray, radius: float) -> np.ndarray:
    d = xy - _DISC_C
    r = np.linalg.norm(d, axis=-1, keepdims=True)
    return _DISC_C + d * np.minimum(1.0, radius / np.maximum(r, 1e-9))


def physics_step(state: dict[str, np.ndarray], des: np.ndarray) -> np.ndarray:
    """Advance the model one control period (35 ms) in place under desired position des (N, 2);
    state: ee, vel, h, u_prev, each (N, 2). Returns the new ee (N, 2)."""
    u = _clamp_disc(des, _R_DES)
    p = state["ee"]
    z = np.concatenate([u - p, state["vel"], state["h"], u - state["u_prev"]], -1)
    q = np.clip(p, *_GAIN_BOX) - _GAIN_CENTRE
    vel = z @ _W[0].T + (q[:, :1] * z) @ _W[1].T + (q[:, 1:] * z) @ _W[2].T
    state["h"] = z @ _NH.T
    state["ee"] = _clamp_disc(p + vel, _R_EE)
    state["vel"] = state["ee"] - p
    state["u_prev"] = u
    return state["ee"]


def rest_state(ee: np.ndarray) -> dict[str, np.ndarray]:
    """Model at rest at ee (N, 2) with desired = ee."""
    ee = np.array(ee, dtype=np.float64)
    return {"ee": ee, "vel": np.zeros_like(ee), "h": np.zeros_like(ee), "u_prev": ee.copy()}


def replay(des: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Open-loop replay: desired positions (B, L, 2) from ee start (B, 2) -> ee path (B, L, 2),
    ee[:, 0] = start and ee[:, t + 1] = f(des[:, :t + 1])."""
    state = rest_state(start)
    out = [state["ee"].copy()]
    for t in range(des.shape[1] - 1):
        out.append(physics_step(state, des[:, t]).copy())
    return np.stack(out, 1)


def _demo_arrays(path: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-demo desired and end-effector xy paths from the real npz (README beside it)."""
    d = np.load(path)
    cuts = np.cumsum(d["traj_lengths"])[:-1]
    return np.split(d["des_c_pos"][:, :2], cuts), np.split(d["c_pos"][:, :2], cuts)


# ---------------------------------------------------------------- data
SUBSETS = {"M1": (5, 6), "M2": (5, 7), "M3": (5, 8)}  # row-3 modes; rows 1, 2 must be modes 1, 2
BAND = 0.01  # the subset filter's ±0.01 bands around the mode boundaries (see subset_mode)


def subset_mode(des_xy: np.ndarray, subset: str) -> int | None:
    """Row-3 mode if a desired path (L, 2) belongs to subset, else None. Reading of the ±0.01
    bands: each row's mode is latched at the path's first point inside the row band (as in the
    env); the demo is ambiguous, hence excluded, if x there is within 0.01 of one of that row's
    mode boundaries (= obstacle centres)."""
    inb = _in_bands(des_xy)
    modes = []
    for r in range(3):
        idx = np.flatnonzero(inb[:, r])
        if not len(idx) or np.min(np.abs(des_xy[idx[0], 0] - np.array(ROW_BOUNDS[r]))) < BAND:
            return None
        modes.append(int(_row_mode(des_xy[idx[0], 0], r)))
    ok = modes[0] == 1 and modes[1] == 2 and modes[2] in SUBSETS[subset]
    return modes[2] if ok else None


def _to_demo(des: np.ndarray, ee: np.ndarray) -> dict:
    # obs_t = [desired_t, ee_t], action_t = desired_{t+1} - desired_t; the last recorded step has
    # no next desired position, so it is dropped (L - 1 transitions per demo).
    return {"obs": np.concatenate([des[:-1], ee[:-1]], 1).astype(np.float32),
            "actions": np.diff(des, axis=0).astype(np.float32)}


def load_avoid_demos(path: str, subset: str | None = None) -> list[dict]:
    """Real demos as dicts of obs (L-1, 4) and actions (L-1, 2), filtered to subset M1/M2/M3."""
    if subset is not None and subset not in SUBSETS:
        raise ValueError(f"unknown Avoid subset {subset!r}; use one of {sorted(SUBSETS)} or None")
    des, ee = _demo_arrays(path)
    return [_to_demo(d, e) for d, e in zip(des, ee) if subset is None or subset_mode(d, subset)]


# ---------------------------------------------------------------- vector env
class AvoidVecEnv:
    """N Avoid envs stepped in chunks of act_steps actions (same-step autoreset, see step)."""

    obs_dim = 4
    action_dim = 2

    def __init__(self, num_envs: int, act_steps: int = 4, cond_steps: int = 1,
                 max_episode_steps: int = 100, seed: int | None = None) -> None:
        self.num_envs, self.act_steps, self.cond_steps = num_envs, act_steps, cond_steps
        self.max_episode_steps = max_episode_steps
        self.rng = np.random.default_rng(seed)  # the D3IL start is fixed: nothing random yet
        self.reset(seed)

    def _reset_envs(self, idx: np.ndarray) -> None:
        rest = rest_state(np.broadcast_to(START, (self.num_envs, 2)))
        for k, v in rest.items():
            self.state[k][idx] = v[idx]
        self.des[idx], self.t[idx], self.modes[idx], self.hit[idx] = START, 0, -1, False
        self.hist[idx] = np.concatenate([START, START]).astype(np.float32)

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        n = self.num_envs
        self.state = rest_state(np.broadcast_to(START, (n, 2)))
        self.des, self.t = np.zeros((n, 2)), np.zeros(n, np.int64)
        self.modes, self.hit = np.zeros((n, 3), np.int64), np.zeros(n, bool)
        self.hist = np.zeros((n, self.cond_steps, 4), np.float32)
        self._reset_envs(np.ones(n, bool))
        return self.hist.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """actions (N, T_e, 2): increments of the desired position, executed in order."""
        n, te = self.num_envs, self.act_steps
        actions = np.asarray(actions, np.float64).reshape(n, te, 2)
        reward, ee_pos = np.zeros(n, np.float32), np.zeros((n, te, 2), np.float32)
        active = self.t < self.max_episode_steps
        for k in range(te):
            frozen = None if active.all() else {a: v[~active].copy() for a, v in self.state.items()}
            # physics runs with the previous desired position; obs is taken before it (as recorded)
            ee = physics_step(self.state, self.des)
            if frozen is not None:
                for a, v in frozen.items():
                    self.state[a][~active] = v
                ee = self.state["ee"]
            self.des += actions[:, k] * active[:, None]
            x = ee[:, :1]
            row = np.concatenate([x >= 0.5, 2 + (x >= 0.425) + (x >= 0.575),
                                  5 + (x >= 0.35) + (x >= 0.5) + (x >= 0.65)], 1)
            latch = _in_bands(ee) & (self.modes < 0) & active[:, None]
            self.modes = np.where(latch, row, self.modes)
            self.hit |= (clearance(ee) < 0) & active
            reward += np.where(active, step_reward(ee, self.modes[:, 2], self.hit), 0.0)
            self.t += active
            obs = np.concatenate([self.des, ee], 1).astype(np.float32)[:, None]
            new_hist = np.concatenate([self.hist[:, 1:], obs], 1)
            self.hist = new_hist if active.all() else np.where(active[:, None, None], new_hist, self.hist)
            ee_pos[:, k] = ee
            active &= self.t < self.max_episode_steps
        truncated = self.t >= self.max_episode_steps
        info = {"final_obs": self.hist.copy(), "mode": self.modes.copy(), "collided": self.hit.copy(),
                "ee_pos": ee_pos}
        if truncated.any():
            self._reset_envs(truncated)
        return self.hist.copy(), reward, np.zeros(n, bool), truncated, info

    def close(self) -> None:
        pass

