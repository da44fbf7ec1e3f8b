"""Figures of the mean-field experiments (`mean-field`, `mean-field-large`): convergence
in n, clusters against n, the measure-level LoRA divergence, departure times in W2, the
W2 stability bound, the large-n ladder and the departure prefactor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure

if TYPE_CHECKING:
    from .._analysis import BoundCheck, Departures, Ladder, LargeLadder, LoraW2


def _save(fig, path):
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _label(ax, xlabel, ylabel, title, legend_size: float = 7, ncol: int = 1):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size, ncol=ncol)


def mean_field_convergence(ladders: dict[int, Ladder], summary: dict[str, Any], path):
    """Convergence in n, one panel per dimension: sliced W2 against the largest run and
    exact W2 between seeds, with the n^-1/2 and n^-1/d rates."""
    from .._base import nanmedian

    dims = list(ladders)
    fig, axes = plt.subplots(1, len(dims), figsize=(5.6 * len(dims), 4.4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        lad = ladders[d]
        ns = np.asarray(lad["ns"][:-1], np.float64)
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(lad["ts"])))
        for k, t in enumerate(lad["ts"]):
            med = nanmedian(lad["sliced"][:, :, k], axis=0)
            ax.loglog(ns, med, "o-", color=colors[k], ms=3, label=f"sliced vs N, t = {t:g}")
        ens = np.asarray(lad["exact_ns"], np.float64)
        for k in (0, len(lad["ts"]) - 1):
            med = nanmedian(lad["exact"][:, :, k], axis=0)
            ax.loglog(
                ens,
                med,
                "s--",
                color=colors[k],
                ms=3,
                label=f"exact W2 between seeds, t = {lad['ts'][k]:g}",
            )
        y0 = nanmedian(lad["exact"][:, 0, 0])
        for rate, style, lab in ((-0.5, ":", "n^-1/2"), (-1.0 / d, "-.", f"n^-1/{d}")):
            ax.loglog(ens, y0 * (ens / ens[0]) ** rate, style, color="0.3", lw=1, label=lab)
        fit = summary[f"d{d}"]["fits"][f"{lad['ts'][-1]:g}"]["exact_between_seeds"]
        if fit["slope"] is not None:
            ci = fit.get("slope_ci95") or [np.nan, np.nan]
            ax.set_title(
                f"d = {d}, N = {lad['N']}: exact-W2 slope at t = {lad['ts'][-1]:g}: "
                f"{fit['slope']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
                fontsize=9,
            )
        _label(ax, "n", "W2", ax.get_title(), legend_size=6.5)
    _save(fig, path)


def mean_field_clusters(ladders: dict[int, Ladder], path, *, cluster_delta):
    """Number of clusters and the largest cluster masses against n, one row per
    dimension."""
    dims = list(ladders)
    fig, axes = plt.subplots(len(dims), 2, figsize=(10, 3.8 * len(dims)), squeeze=False)
    for row, d in zip(axes, dims):
        cl = ladders[d]["clusters"]
        ns = np.asarray(cl["ns"], np.float64)
        for s, counts in enumerate(cl["count"]):
            row[0].semilogx(ns, counts, "o-", ms=3, label=f"seed {s}")
        row[0].set_xlabel("n")
        row[0].set_ylabel(f"clusters at t = {ladders[d]['ts'][-1]:g} (δ = {cluster_delta})")
        row[0].set_title(f"d = {d}: number of clusters")
        row[0].legend(fontsize=7)
        row[0].grid(alpha=0.3)
        top = 6
        M = np.full((len(ns), top), np.nan)
        for i, m in enumerate(cl["masses"][0]):
            M[i, : min(top, m.size)] = m[:top]
        for j in range(top):
            row[1].semilogx(ns, M[:, j], "o-", ms=3, label=f"cluster {j + 1}")
        row[1].set_xlabel("n")
        row[1].set_ylabel("mass")
        row[1].set_title(f"d = {d}: largest cluster masses (seed 0)")
        row[1].legend(fontsize=7)
        row[1].grid(alpha=0.3)
    _save(fig, path)


def mean_field_lora_w2(lora: LoraW2, path):
    """W2 between the original and the LoRA flow over t, for each ε and n."""
    eps, ts, ns = lora["eps"], lora["ts"], lora["ns"]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.cm.plasma(np.linspace(0, 0.85, eps.size))
    styles = ["-", "--", ":", "-."]
    for i, _n in enumerate(ns):
        for e in range(eps.size):
            ax.semilogy(
                ts[1:],
                lora["W"][i, e, 1:],
                styles[i % 4],
                color=colors[e],
                lw=1,
                label=f"ε = {eps[e]:g}" if i == len(ns) - 1 else None,
            )
    for i, n in enumerate(ns):
        ax.plot([], [], styles[i % 4], color="k", label=f"n = {n}")
    _label(ax, "t", "W2(μ_t, μ̃_t)", "Measure-level LoRA divergence (same μ0)", ncol=2)
    _save(fig, path)


def mean_field_departure(lora: LoraW2, path, *, delta):
    """Departure times in W2 (and in the token Hausdorff distance) against ε."""
    eps, ns = lora["eps"], lora["ns"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, n in enumerate(ns):
        dep = np.where(np.isfinite(lora["t_dep_W"][i]), lora["t_dep_W"][i], np.nan)
        ax.loglog(eps, dep, "o-", ms=4, label=f"W2, n = {n}")
        tok = np.where(np.isfinite(lora["t_dep_tok"][i]), lora["t_dep_tok"][i], np.nan)
        ax.loglog(
            eps, tok, "x:", ms=4, color=ax.lines[-1].get_color(), label=f"token Hausdorff, n = {n}"
        )
    ax.loglog(eps, 0.72 / eps, "k--", lw=1, label="0.72/ε (token metric, n = 20)")
    _label(ax, "ε", "departure time", f"Departure from the original clusters (δ = {delta})")
    _save(fig, path)


def mean_field_bound(bound: BoundCheck, path, *, delta, n):
    """The W2 stability bound (and Dobrushin's) against the measured W2, for each ε."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.cm.plasma(np.linspace(0, 0.85, bound["eps"].size))
    for e in range(bound["eps"].size):
        ax.semilogy(
            bound["ts"][1:],
            bound["measured"][e, 1:],
            "-",
            color=colors[e],
            label=f"measured, ε = {bound['eps'][e]:g}",
        )
        ax.semilogy(bound["ts"][1:], bound["bound"][e, 1:], "--", color=colors[e], lw=1)
        ax.semilogy(bound["ts"][1:], bound["dobrushin"][e, 1:], ":", color=colors[e], lw=1)
    ax.plot([], [], "k--", lw=1, label="bound (min of both)")
    ax.plot([], [], "k:", lw=1, label="Dobrushin (W1/W2 Lipschitz)")
    ax.axhline(delta, color="0.5", lw=0.8)
    ax.set_ylim(bottom=max(1e-8, np.nanmin(bound["measured"][:, 1:]) / 10), top=1e3)
    _label(ax, "t", "W2", f"W2 stability bound vs measured (n = {n})")
    _save(fig, path)


def mean_field_large_n(
    lad: LargeLadder,
    dep: Departures,
    path,
    *,
    d,
    fit_max_frac,
    ladder_dtype,
    dep_seeds,
    delta,
):
    """Figure of `mean-field-large`: the ladder to large n, the departure prefactor."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    ax = axes[0]
    ns = np.asarray(lad["ns"][:-1], np.float64)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(lad["ts"])))
    for k, t in enumerate(lad["ts"]):
        fit = lad["fits"][f"{t:g}"]
        slope = f", slope {fit['slope']:.2f}" if fit["slope"] is not None else ""
        ax.loglog(ns, lad["sliced"][:, k], "o-", color=colors[k], ms=3, label=f"t = {t:g}{slope}")
    y0 = lad["sliced"][0, 0]
    ax.loglog(ns, y0 * (ns / ns[0]) ** -0.5, ":", color="0.3", lw=1, label="n^-1/2")
    ax.axvline(fit_max_frac * lad["N"], color="0.6", lw=0.8)
    _label(
        ax,
        "n",
        f"sliced W2 to n = {lad['N']}",
        f"d = {d}, one nested sample, {ladder_dtype}",
        legend_size=7,
    )
    ax = axes[1]
    for i, n in enumerate(dep["ns"]):
        c = dep["prefactor"][i]  # (seeds, ε)
        for e, eps in enumerate(dep["eps"]):
            ok = np.isfinite(c[:, e])
            ax.plot(
                np.full(ok.sum(), n) * (1 + 0.06 * (e - 1)),
                c[ok, e],
                "o",
                ms=4,
                alpha=0.6,
                color=plt.cm.plasma(0.85 * e / max(1, dep["eps"].size - 1)),
                label=f"ε = {eps:g}" if i == 0 else None,
            )
        st = dep["stats"][i]
        if st["prefactor_mean"] is not None:
            ax.errorbar(
                [n],
                [st["prefactor_mean"]],
                yerr=[st["prefactor_sd"] or 0.0],
                fmt="ks",
                ms=6,
                capsize=4,
                label="mean ± sd" if i == 0 else None,
            )
    ax.set_xscale("log")
    ax.set_xticks(dep["ns"], [str(n) for n in dep["ns"]])
    ax.minorticks_off()
    _label(
        ax,
        "n",
        "T_dep · ε (departure in W2)",
        f"Departure prefactor, {dep_seeds} samples per n (δ = {delta})",
    )
    _save(fig, path)
