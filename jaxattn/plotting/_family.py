"""Figures of the `normalisation` experiment (the model family)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure

_COLORS = {"post": "tab:blue", "pre": "tab:orange", "peri": "tab:green", "ngpt": "tab:red"}
_LABELS = {"post": "post-LN", "pre": "pre-LN", "peri": "peri-LN", "ngpt": "nGPT"}


def normalisation_schemes(ts, per, t_eq, eq, cfg, path):
    """Mean cosine, number of clusters and mean radius against depth for each scheme
    (median over initial conditions, band: min–max), and the common cosine of the
    symmetric case from its scalar ODE."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for s, r in per.items():
        c = _COLORS[s]
        for ax, key in zip(axes[:3], ("mean_cosine", "clusters", "radius")):
            v = np.asarray(r[key], float)
            ax.plot(ts, np.median(v, axis=0), color=c, label=_LABELS[s])
            ax.fill_between(ts, v.min(axis=0), v.max(axis=0), color=c, alpha=0.15)
        axes[3].plot(t_eq, eq[s], color=c, label=_LABELS[s])
    axes[0].set_ylabel("mean cosine")
    axes[1].set_ylabel(f"clusters (chord ≤ {cfg.threshold:g})")
    axes[2].set_ylabel("mean |x_i|")
    axes[3].set_ylabel("common cosine γ(t)")
    axes[0].set_title(f"n = {cfg.n}, d = {cfg.d}, β = {cfg.beta:g}, Q = K = V = I")
    axes[1].set_title(f"{cfg.n_ic} initial conditions (band: min–max)")
    axes[2].set_title("radii (pre/peri-LN grow)")
    axes[3].set_title(f"symmetric case: n = {cfg.eq_n}, β = {cfg.eq_beta:g} (scalar ODE)")
    for ax in axes:
        ax.set_xlabel("depth t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def causal_clusters(ts, theta, counts, threshold, path):
    """Angles of the tokens of one causal run against time, and the number of clusters of
    every run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    n = theta.shape[1]
    colors = plt.cm.viridis(np.linspace(0, 1, n))
    for i in range(n):
        axes[0].plot(ts, np.mod(theta[:, i], 2 * np.pi), ".", ms=0.8, color=colors[i])
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("angle θ_i (colour: token index)")
    axes[0].set_title(f"causal attention, n = {n}, one initial condition")
    for k, c in enumerate(np.asarray(counts)):
        axes[1].step(ts, c, where="post", label=f"initial condition {k}")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel(f"clusters (chord ≤ {threshold:g})")
    axes[1].set_title("meta-stable clusters: long plateaus, rare merges")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
