"""Figures of the real-model analyses (`jaxattn real-model analyze`): clustering across
layers, head spectra, one head as the particle model, LoRA drift."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


def _pass_lines(ax, L, repeat):
    for k in range(1, repeat):
        ax.axvline(k * L, color="0.7", lw=0.8, ls="--", zorder=0)


def real_model_clustering(res: dict, path, *, title: str) -> None:
    """Mean cosine and cluster count per hidden state (band = 10–90 % over sequences),
    and the pooled histogram of pairwise cosines per hidden state."""
    L, R = res["num_layers"], res["repeat"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, color, label in (("prose", "C0", "prose"), ("random", "C3", "random tokens")):
        r = res[key]
        s = np.arange(r["mean_cosine"].shape[0])
        ax = axes[0]
        ax.plot(s, r["mean_cosine"], "o-", ms=3, color=color, label=f"{label} ({r['count']})")
        if r["count"] > 1:
            ax.fill_between(s, *r["mean_cosine_band"], color=color, alpha=0.2, lw=0)
        ax = axes[1]
        ax.plot(s, r["clusters"], "o-", ms=3, color=color, label=label)
        if r["count"] > 1:
            ax.fill_between(s, *r["clusters_band"], color=color, alpha=0.2, lw=0)
    for ax in axes[:2]:
        _pass_lines(ax, L, R)
        ax.set_xlabel(f"hidden state (0 = embeddings; stack of {L} layers run {R}×)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean pairwise cosine")
    axes[0].legend()
    axes[1].set_ylabel(f"clusters (cos ≥ 1 − {res['cluster_delta']:g})")
    h = res["prose"]["hist_density"]
    e = res["hist_edges"]
    im = axes[2].imshow(
        h.T,
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(-0.5, h.shape[0] - 0.5, e[0], e[-1]),
        vmax=np.quantile(h, 0.995),
    )
    _pass_lines(axes[2], L, R)
    axes[2].set_xlabel("hidden state")
    axes[2].set_ylabel("pairwise cosine (prose)")
    fig.colorbar(im, ax=axes[2], label="density")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def real_model_spectra(sp: dict, path) -> None:
    """Eigenvalues of each head's value-output map and of each layer's; symmetric part of
    `QᵀK/√d_h`; effective β per head, with the heads meeting the
    top-eigenvalue hypotheses marked."""
    L, H = sp["num_layers"], sp["num_heads"]
    colors = plt.cm.viridis(np.linspace(0, 1, L))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    ax = axes[0]
    for l in range(L):
        ev = sp["ov_eigs"][l].ravel()
        ax.scatter(ev.real, ev.imag, s=6, color=colors[l], label=f"layer {l}")
        lam1 = sp["lambda1"][l]
        ax.scatter(lam1.real, lam1.imag, s=30, facecolors="none", edgecolors=colors[l])
    ax.axvline(0, color="0.6", lw=0.7)
    ax.set_title("heads: eig(W_O^a W_V^a) (circles: λ₁)")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.legend(fontsize=7, markerscale=2)
    ax = axes[1]
    for l in range(L):
        ev = sp["layer_ov_eigs"][l]
        ax.scatter(ev.real, ev.imag, s=4, color=colors[l])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title("layers: eig(W_O W_V), all heads")
    ax.set_xlabel("Re λ")
    ax = axes[2]
    sym = sp["sym_eigs"]  # (L, H, d)
    for l in range(L):
        x = l * H + np.arange(H)
        ax.vlines(x, sym[l].min(axis=-1), sym[l].max(axis=-1), color=colors[l], lw=2)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_title("range of eig(sym(W_Qᵀ W_K)/√d_h) per head")
    ax.set_xlabel("layer · heads + head")
    ax = axes[3]
    im = ax.imshow(sp["beta_eff"], cmap="viridis", aspect="auto")
    yy, xx = np.nonzero(sp["hypotheses"])
    ax.scatter(
        xx,
        yy,
        marker="*",
        color="w",
        edgecolors="k",
        s=70,
        label="λ₁ real > 0 simple, ⟨Qφ₁,Kφ₁⟩ > 0",
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title("effective β = ‖QᵀK/√d_h‖₂ · mean|x|²")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def real_model_particle(pr: dict, path) -> None:
    """Mean cosine and Gram agreement of each head's sphere dynamics against the real
    model's next layers; final Gram matrices of the best-agreeing head and of the model."""
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ts = pr["ts"]
    layer = pr["layer"]
    runs = pr["runs"]
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(runs), 2)))
    for r, c in zip(runs, colors, strict=False):
        axes[0].plot(ts, r["mean_cosine"], color=c, lw=1, label=f"head {r['head']}")
        axes[1].plot(ts, r["gram_corr"], color=c, lw=1)
    axes[0].plot(ts, pr["real_mean_cosine"], "ko-", ms=3, lw=2, label="real model")
    axes[0].set_xlabel(f"t (particles)  /  layers after the input of layer {layer} (model)")
    axes[0].set_ylabel("mean pairwise cosine")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_xlabel("t = number of layers")
    axes[1].set_ylabel("corr(Gram particle(t), Gram model(layer + t))")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    best = max(runs, key=lambda r: r["gram_corr"][-1])
    for ax, G, name in (
        (axes[2], best["final_gram"], f"particles, head {best['head']}, t = {ts[-1]:g}"),
        (axes[3], pr["real_final_gram"], "real model, last state"),
    ):
        im = ax.imshow(G, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("token")
    fig.colorbar(im, ax=axes[3])
    fig.suptitle(
        f"Sphere dynamics (SA) with one head's (Q, K, W_O W_V) from layer "
        f"{layer}, {pr['tokens']} tokens"
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def real_model_lora_drift(dr: dict, path, *, num_layers: int) -> None:
    """Relative drift of the token states against depth for each ε; against ε per layer."""
    eps, e = dr["eps"], dr["e_rel"]
    S = e.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(eps)))
    for k, c in enumerate(colors):
        axes[0].semilogy(
            np.arange(1, S),
            e[k, 1:],
            "o-",
            ms=3,
            color=c,
            label=f"ε = {eps[k]:g} (×{dr['fit']['growth_per_layer'][k]:.2f}/layer)",
        )
    _pass_lines(axes[0], num_layers, dr["repeat"])
    axes[0].set_xlabel("hidden state (layer)")
    axes[0].set_ylabel("mean_i |x_i − x̃_i| / mean_i |x_i|")
    axes[0].legend(fontsize=7)
    ls = sorted({1, min(num_layers, S - 1), S - 1})
    for l, c in zip(ls, plt.cm.viridis(np.linspace(0, 0.85, len(ls))), strict=True):
        p = dr["fit"]["eps_exponent"][l - 1]
        axes[1].loglog(eps, e[:, l], "o-", color=c, label=f"state {l} (slope {p:.2f})")
    axes[1].set_xlabel("ε = ‖ΔV_l‖₂ in every layer")
    axes[1].set_ylabel("relative drift")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"random rank-{dr['rank']} LoRA on V in every layer; "
        f"{dr['sequences']} sequences × {len(dr['seeds'])} directions"
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
