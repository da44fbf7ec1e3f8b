"""The overview figure of a parameter sweep (`jaxattn sweep`, `jaxattn.sweep`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


def sweep_overview(result: dict, axes: list[str], summaries: list[str], path, *, title=None):
    """One column per scalar summary. Top row: its median over every grid axis but the
    first, against time, one line per value of the first axis (band: 25–75 % quantiles;
    the legend beside the figure). Bottom row, when the first axis is numeric with
    several values: the summary at the final time against that axis (median and 25–75 %
    band over the other axes), e.g. the number of clusters against ε. Failed points
    (non-zero status) are left out."""
    scalar = [s for s in summaries if np.asarray(result[s]).ndim == len(axes) + 1]
    if not scalar:
        return False
    ts = np.asarray(result["ts"])
    first = axes[0]
    values = list(np.asarray(result[f"grid_{first}"]))
    numeric = len(values) > 1 and all(
        isinstance(v, (int, float, np.integer, np.floating)) for v in values
    )
    ok = np.asarray(result["status"]) == 0
    rows_n = 2 if numeric else 1
    fig, panels = plt.subplots(
        rows_n,
        len(scalar),
        figsize=(4.6 * len(scalar) + 1.6, 3.4 * rows_n),
        squeeze=False,
        layout="constrained",
    )
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
    for col, name in enumerate(scalar):
        ax = panels[0][col]
        a = np.where(ok[..., None], np.asarray(result[name], np.float64), np.nan)
        log = name in ("divergence", "hausdorff")
        final = []
        for k, v in enumerate(values):
            rows = a[k].reshape(-1, ts.size)
            rows = rows[np.all(np.isfinite(rows), axis=1)]
            if not rows.size:
                final.append((np.nan, np.nan, np.nan))
                continue
            q25, med, q75 = np.percentile(rows, [25, 50, 75], axis=0)
            final.append((q25[-1], med[-1], q75[-1]))
            if log:  # log axis: zero (t = 0) left out
                q25, med, q75 = (np.where(q > 0, q, np.nan) for q in (q25, med, q75))
            label = (
                f"{first} = {v:.3g}" if isinstance(v, (float, np.floating)) else f"{first} = {v}"
            )
            ax.plot(ts, med, color=colors[k], lw=1.3, label=label)
            if rows.shape[0] > 1:
                ax.fill_between(ts, q25, q75, color=colors[k], alpha=0.2, lw=0)
        if log and np.nanmax(a) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if numeric:
            _final_panel(panels[1][col], values, np.asarray(final), first, name, ts[-1], log)
    handles, labels = panels[0][0].get_legend_handles_labels()
    if handles:  # a panel with nothing drawn has none
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    others = list(axes[1:])
    fig.suptitle(
        title or ("median over " + (", ".join(others) if others else "—") + " (band: 25–75 %)"),
        fontsize=10,
    )
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def _final_panel(ax, values, final, first: str, name: str, t1: float, log: bool) -> None:
    """The summary at the final time against the first axis: median and 25–75 % band."""
    x = np.asarray(values, np.float64)
    q25, med, q75 = final[:, 0], final[:, 1], final[:, 2]
    ax.plot(x, med, "o-", color="k", ms=3, lw=1.2, label="median")
    ax.fill_between(x, q25, q75, color="k", alpha=0.15, lw=0, label="25–75 %")
    if np.all(x > 0) and x.max() / x.min() >= 10:
        ax.set_xscale("log")
    if log and np.nanmax(med) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(first)
    ax.set_ylabel(f"{name} at t = {t1:g}")
    ax.grid(alpha=0.3, which="both")
