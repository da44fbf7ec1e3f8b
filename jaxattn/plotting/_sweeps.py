"""The overview figure of a parameter sweep (`jaxattn sweep`, `jaxattn.sweep`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


def sweep_overview(result: dict, axes: list[str], summaries: list[str], path, *, title=None):
    """One panel per scalar summary: its median over every grid axis but the first,
    against time, one line per value of the first axis (band: 25–75 % quantiles).
    Failed points (non-zero status) are left out."""
    scalar = [s for s in summaries if np.asarray(result[s]).ndim == len(axes) + 1]
    if not scalar:
        return False
    ts = np.asarray(result["ts"])
    first = axes[0]
    values = list(np.asarray(result[f"grid_{first}"]))
    ok = np.asarray(result["status"]) == 0
    fig, panels = plt.subplots(1, len(scalar), figsize=(4.6 * len(scalar), 3.6), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
    for ax, name in zip(panels[0], scalar):
        a = np.where(ok[..., None], np.asarray(result[name], np.float64), np.nan)
        for k, v in enumerate(values):
            rows = a[k].reshape(-1, ts.size)
            rows = rows[np.all(np.isfinite(rows), axis=1)]
            if not rows.size:
                continue
            q25, med, q75 = np.percentile(rows, [25, 50, 75], axis=0)
            if name in ("divergence", "hausdorff"):  # log axis: zero (t = 0) left out
                q25, med, q75 = (np.where(q > 0, q, np.nan) for q in (q25, med, q75))
            label = (
                f"{first} = {v:.3g}" if isinstance(v, (float, np.floating)) else f"{first} = {v}"
            )
            ax.plot(ts, med, color=colors[k], lw=1.3, label=label)
            if rows.shape[0] > 1:
                ax.fill_between(ts, q25, q75, color=colors[k], alpha=0.2, lw=0)
        if name in ("divergence", "hausdorff") and np.nanmax(a) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if panels[0][0].get_legend_handles_labels()[0]:  # a panel with nothing drawn has none
        panels[0][0].legend(fontsize=7)
    others = list(axes[1:])
    fig.suptitle(
        title or ("median over " + (", ".join(others) if others else "—") + " (band: 25–75 %)"),
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True
