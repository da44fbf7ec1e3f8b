"""Figures of token trajectories and their divergence under a LoRA perturbation (the
`lora-divergence` experiment): snapshots, e(t) against the bounds, per-target
comparison, an animated GIF."""

from __future__ import annotations

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


def snapshots_side_by_side(
    ts,
    runs: dict[str, np.ndarray],
    times,
    path,
    *,
    title=None,
    trail: bool = True,
    axis_labels: tuple[str, str] = ("x₁", "x₂"),
):
    """Rows = runs (e.g. original / LoRA), columns = snapshot times; 2-D tokens.

    `runs[name]` has shape `(T, n, 2)`. Each token keeps one colour, set by its first
    coordinate at the first snapshot (the colour bar), so a cluster's colours say where
    its tokens came from. With `trail`, faint lines show each token's path since the
    previous snapshot (not since t = 0: later panels would all look alike).
    `axis_labels`: the coordinates' names (`z₁, z₂` for the rescaled variable).
    """
    ts = np.asarray(ts)
    idx = [int(np.argmin(np.abs(ts - t))) for t in times]
    names = list(runs)
    fig, axes = plt.subplots(
        len(names),
        len(idx),
        figsize=(2.6 * len(idx) + 0.9, 2.7 * len(names)),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    allpts = np.concatenate([np.asarray(r).reshape(-1, 2) for r in runs.values()])
    allpts = allpts[np.all(np.isfinite(allpts), axis=1)]
    lo, hi = allpts.min(0), allpts.max(0)
    pad = 0.05 * (hi - lo).max()
    first = np.asarray(runs[names[0]])[idx[0], :, 0]
    norm = matplotlib.colors.Normalize(float(np.nanmin(first)), float(np.nanmax(first)))
    colors = plt.cm.viridis(norm(first))
    for r, name in enumerate(names):
        xs = np.asarray(runs[name])
        for c, k in enumerate(idx):
            ax = axes[r, c]
            start = idx[c - 1] if c > 0 else 0
            if trail and k > start:
                for i in range(xs.shape[1]):
                    ax.plot(
                        xs[start : k + 1, i, 0],
                        xs[start : k + 1, i, 1],
                        color=colors[i],
                        lw=0.5,
                        alpha=0.4,
                    )
            ax.scatter(
                xs[k, :, 0], xs[k, :, 1], s=10, c=colors, edgecolors="k", linewidths=0.3, zorder=3
            )
            ax.set_xlim(lo[0] - pad, hi[0] + pad)
            ax.set_ylim(lo[1] - pad, hi[1] + pad)
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(f"t = {ts[k]:g}")
            if r == len(names) - 1:
                ax.set_xlabel(axis_labels[0])
            if c == 0:
                ax.set_ylabel(f"{name}\n{axis_labels[1]}")
    sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
    fig.colorbar(
        sm,
        ax=axes.ravel().tolist(),
        fraction=0.025,
        pad=0.02,
        label=f"{axis_labels[0]} at t = {ts[idx[0]]:g}",
    )
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def divergence_with_bounds(
    ts, e, bounds: dict[str, np.ndarray], path, *, eta=None, horizon=None, zoom=None, title=None
):
    """`e(t)` on a log axis with bound curves; optional second panel `zoom = (ts, e,
    bounds)` for the short-time window where the bounds are informative."""
    panels = [(np.asarray(ts), np.asarray(e), bounds, "whole run")]
    if zoom is not None:
        panels.append((np.asarray(zoom[0]), np.asarray(zoom[1]), zoom[2], "short times"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    styles = ["--", ":", "-."]
    for ax, (t, ee, bb, sub) in zip(axes[0], panels):
        pos = ee > 0
        # the axis ends a decade above the data (or η): bounds beyond it are vacuous
        top = max(ee[pos].max() * 10 if pos.any() else 1.0, 10 * (eta or 0))
        ax.semilogy(t[pos], ee[pos], "k-", lw=1.6, label="measured e(t)")
        for s, (name, b) in zip(styles, bb.items()):
            b = np.asarray(b)
            ok = np.isfinite(b) & (b > 0) & (b <= 10 * top)  # past the axis: vacuous
            if ok.any():
                ax.semilogy(t[ok], b[ok], s, lw=1.4, label=name)
        if eta is not None:
            ax.axhline(eta, color="tab:red", lw=0.8, alpha=0.7, label=f"η = {eta:g}")
        if horizon is not None and np.isfinite(horizon) and horizon <= t[-1]:
            span = float(t[-1] - t[0])
            if horizon - t[0] >= 0.02 * span:
                ax.axvline(
                    horizon,
                    color="tab:green",
                    lw=1.2,
                    label=f"certified horizon {horizon:.3g}",
                )
            else:  # a line at the left edge would be invisible: point at it instead
                ax.annotate(
                    f"certified horizon {horizon:.3g}",
                    xy=(horizon, eta if eta is not None else top / 100),
                    xytext=(t[0] + 0.12 * span, (eta if eta is not None else top / 100) * 30),
                    color="tab:green",
                    fontsize=8,
                    arrowprops={"arrowstyle": "->", "color": "tab:green"},
                )
        finite = ee[pos]
        if finite.size:
            ax.set_ylim(max(finite.min() / 10, 1e-16), top)
        ax.set_xlabel("t")
        ax.set_ylabel("max_i |x_i − x̃_i|")
        ax.set_title(sub)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def target_comparison(ts, e_by_target, short_ts, short_by_target, path, *, eta=None, title=None):
    """Left: e(t) over the whole run for each perturbed weight. Right: short times, with
    each target's bound (dashed, same colour)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"Q": "tab:blue", "K": "tab:orange", "V": "tab:green"}
    for name, e in e_by_target.items():
        e = np.asarray(e)
        pos = e > 0
        a1.semilogy(np.asarray(ts)[pos], e[pos], color=colors.get(name), label=f"LoRA on {name}")
    for name, (e, b) in short_by_target.items():
        e, b = np.asarray(e), np.asarray(b)
        st = np.asarray(short_ts)
        pos = e > 0
        a2.semilogy(st[pos], e[pos], color=colors.get(name), label=f"{name}: measured")
        top = max(e[pos].max() * 1e3 if pos.any() else 1.0, 10 * (eta or 0))
        ok = np.isfinite(b) & (b > 0) & (b <= 10 * top)
        a2.semilogy(st[ok], b[ok], "--", color=colors.get(name), label=f"{name}: bound")
        a2.set_ylim(top=top)
    for ax, sub in ((a1, "whole run"), (a2, "short times, with the one-sided bound")):
        if eta is not None:
            ax.axhline(eta, color="tab:red", lw=0.8, alpha=0.7)
        ax.set_xlabel("t")
        ax.set_ylabel("max_i |x_i − x̃_i|")
        ax.set_title(sub)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def animate_side_by_side(ts, runs: dict[str, np.ndarray], path, *, frames: int = 80, fps: int = 12):
    """Animated GIF of 2-D token runs side by side (Pillow writer, written atomically)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    from .._base import atomic_path

    ts = np.asarray(ts)
    names = list(runs)
    idx = np.unique(np.linspace(0, ts.shape[0] - 1, frames).round().astype(int))
    allpts = np.concatenate([np.asarray(r).reshape(-1, 2) for r in runs.values()])
    lo, hi = allpts.min(0), allpts.max(0)
    pad = 0.05 * (hi - lo).max()
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    n = np.asarray(runs[names[0]]).shape[1]
    colors = plt.cm.viridis(np.linspace(0, 1, n))
    scats = []
    for ax, name in zip(axes[0], names):
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal")
        ax.set_title(name)
        scats.append(
            ax.scatter(
                np.asarray(runs[name])[0, :, 0],
                np.asarray(runs[name])[0, :, 1],
                s=12,
                c=colors,
                edgecolors="k",
                linewidths=0.3,
            )
        )
    label = fig.suptitle("")

    def update(k):
        for sc, name in zip(scats, names):
            sc.set_offsets(np.asarray(runs[name])[k])
        label.set_text(f"t = {ts[k]:.1f}")
        return scats

    anim = FuncAnimation(fig, update, frames=idx, blit=False)
    with atomic_path(path) as tmp:
        anim.save(tmp, writer=PillowWriter(fps=fps))
    plt.close(fig)
