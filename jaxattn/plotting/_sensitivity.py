"""Figures of the worst-case LoRA experiment (`worst-case-lora`): worst against random
directions, the worst direction's structure, linear response, the cluster change."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure

_COLORS = {"Q": "tab:blue", "K": "tab:orange", "V": "tab:green"}


def worst_vs_random(times, p: dict, targets, path, *, title=None):
    """Top: |δx(T)| of the worst unit ΔW, the best rank-1 ΔW and random ones (median over
    initial conditions; band = 10–90 % of random directions). Bottom: worst / mean random,
    one thin line per initial condition."""
    times = np.asarray(times)
    fig, axes = plt.subplots(
        2, len(targets), figsize=(4.2 * len(targets), 6.4), squeeze=False, sharex=True
    )
    for g, t in enumerate(targets):
        ax = axes[0, g]
        c = _COLORS.get(t, "k")
        ax.semilogy(
            times,
            np.median(p["sig"][:, g], 0),
            "-o",
            color=c,
            ms=3,
            label="worst (top singular value)",
        )
        ax.semilogy(
            times, np.median(p["sig_r"][:, g], 0), "--", color=c, label="best rank-1 (LoRA)"
        )
        rnd = p["rnd"][:, g]  # (S, R, T)
        ax.semilogy(times, np.median(rnd.mean(1), 0), ":", color="k", label="random, mean")
        lo = np.median(np.quantile(rnd, 0.1, axis=1), 0)
        hi = np.median(np.quantile(rnd, 0.9, axis=1), 0)
        ax.fill_between(times, lo, hi, color="0.8", alpha=0.7, label="random, 10–90 %")
        ax.semilogy(
            times,
            np.median(p["rnd_r"][:, g].mean(1), 0),
            "-.",
            color="0.4",
            label="random rank-1, mean",
        )
        ax.set_title(f"ΔW on {t}")
        ax.set_ylabel("|δx(T)| per unit ‖ΔW‖")
        if g == 0:
            ax.legend(fontsize=7)
        ax2 = axes[1, g]
        ratio = p["sig"][:, g] / p["rnd"][:, g].mean(1)
        for r in ratio:
            ax2.plot(times, r, color=c, lw=0.6, alpha=0.5)
        ax2.plot(times, ratio.mean(0), "-o", color=c, ms=3, lw=2, label="worst / mean random")
        ax2.axhline(1.0, color="k", lw=0.5)
        ax2.set_xlabel("T")
        ax2.set_ylabel("ratio")
        ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def direction_structure(times, p: dict, targets, path):
    """Worst unit ΔW at the last T for each target (heat map) and its singular values;
    for d = 2 also the tokens at T with the worst response δx(T) as arrows."""
    G = len(targets)
    d = p["d"]
    rows = 3 if d == 2 else 2
    fig, axes = plt.subplots(rows, G, figsize=(3.8 * G, 3.3 * rows), squeeze=False)
    for g, t in enumerate(targets):
        W = p["dirs"][g, -1]
        m = np.abs(W).max()
        ax = axes[0, g]
        im = ax.imshow(W, cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"worst ΔW on {t} (T = {times[-1]:g})")
        fig.colorbar(im, ax=ax, fraction=0.046)
        sv = np.linalg.svd(p["dirs"][g], compute_uv=False)  # (T, d)
        ax = axes[1, g]
        for j in range(d):
            ax.semilogy(times, np.maximum(sv[:, j], 1e-17), "-o", ms=3, label=f"s{j + 1}")
        ax.set_xlabel("T")
        ax.set_title("singular values of the worst ΔW")
        ax.set_ylim(1e-6, 1.5)
        ax.legend(fontsize=7, ncol=2)
        if d == 2:
            ax = axes[2, g]
            x = p["base"][-1]
            dx = p["resp"][g, -1]
            ax.scatter(x[:, 0], x[:, 1], s=12, c="k")
            ax.quiver(x[:, 0], x[:, 1], dx[:, 0], dx[:, 1], color=_COLORS.get(t, "r"), angles="xy")
            ax.set_aspect("equal")
            ax.set_title(f"tokens at T and δx(T) (worst {t})")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def linear_response_figure(ts, lin, runs: dict, path, *, title=None):
    """`max_i |δx_i(t)|` against `e_ε(t)/ε` for each ε (left) and the bound/ε (right)."""
    ts = np.asarray(ts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    pos = lin > 0
    ax.semilogy(ts[pos], lin[pos], "k-", lw=2.2, label="linear response max_i |δx_i(t)|")
    for eps, (e, _) in runs.items():
        ok = e > 0
        ax.semilogy(ts[ok], e[ok] / eps, "--", lw=1.2, label=f"e(t)/ε, ε = {eps:g}")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    ax.set_title("measured divergence → linear response as ε → 0")
    ax = axes[1]
    ax.semilogy(ts[pos], lin[pos], "k-", lw=2.2, label="linear response")
    for eps, (_e, b) in runs.items():
        ok = np.isfinite(b) & (b > 0) & (b / eps < 1e6 * lin.max())
        ax.semilogy(ts[ok], b[ok] / eps, ":", lw=1.4, label=f"bound/ε, ε = {eps:g}")
    ax.set_xlabel("t")
    ax.set_title("Grönwall bound (a posteriori) sits above")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def cluster_change_figure(
    x_before, x_after, lab_before, lab_after, path, *, title=None, axis_labels=("z₁", "z₂")
):
    """Tokens at T without and with the smallest LoRA found. Both panels colour each
    token by its cluster *without* the LoRA, so a token that changes cluster shows its old
    colour in a new place; tokens whose cluster partners changed are ringed in red, and
    every cluster is labelled with its size (a partition can change while the number of
    clusters stays the same: a merge and a split)."""
    x_before, x_after = np.asarray(x_before), np.asarray(x_after)
    lab_before, lab_after = np.asarray(lab_before), np.asarray(lab_after)
    same_b = lab_before[:, None] == lab_before[None, :]
    same_a = lab_after[:, None] == lab_after[None, :]
    moved = np.any(same_b != same_a, axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True, layout="constrained")
    for ax, x, lab, name in (
        (axes[0], x_before, lab_before, "without LoRA"),
        (axes[1], x_after, lab_after, "with the LoRA found"),
    ):
        y = x[:, 1] if x.shape[1] > 1 else np.zeros(len(x))
        ax.scatter(
            x[:, 0],
            y,
            c=lab_before,
            cmap="tab10",
            vmin=0,
            vmax=9,
            s=30,
            edgecolors="k",
            linewidths=0.4,
            zorder=2,
        )
        if name != "without LoRA" and moved.any():
            ax.scatter(
                x[moved, 0],
                y[moved],
                s=140,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=1.2,
                zorder=3,
                label=f"{int(moved.sum())} tokens whose cluster partners changed",
            )
            ax.legend(fontsize=7, loc="best")
        for c in np.unique(lab):
            m = lab == c
            ax.annotate(
                f"{int(m.sum())}",
                (float(x[m, 0].mean()), float(y[m].mean())),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
            )
        ax.set_title(f"{name}: {np.unique(lab).size} clusters", fontsize=10)
        ax.set_xlabel(axis_labels[0])
        ax.set_aspect("equal")
    axes[0].set_ylabel(axis_labels[1])
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
