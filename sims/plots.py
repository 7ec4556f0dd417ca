"""Pictures of rollouts. Matplotlib is imported lazily so training never needs a display."""

from __future__ import annotations

import numpy as np


def plot_avoid_paths(panels: dict[str, list[np.ndarray]], out: str) -> None:
    """Avoid end-effector paths (each (L, 2)) over the six obstacles, one panel per entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sims.avoid import OBSTACLES

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), squeeze=False)
    for ax, (title, paths) in zip(axes[0], panels.items()):
        for x, y, r in OBSTACLES:
            ax.add_patch(plt.Circle((x, y), r, color="tab:red", alpha=0.6))
        for p in paths:
            ax.plot(p[:, 0], p[:, 1], lw=0.8, alpha=0.6, color="tab:blue")
        ax.axhline(0.4, ls="--", lw=0.8, color="gray")
        ax.set(xlim=(0.2, 0.8), ylim=(-0.35, 0.5), aspect="equal", title=f"{title} ({len(paths)} episodes)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
