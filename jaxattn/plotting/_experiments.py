"""Figures of the `stability-bound`, `sphere-phase` and `departure-time` experiments, one
function per figure file."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


# -- stability-bound ---------------------------------------------------------------------
def bound_vs_eps(eps, probe_ts, results, path):
    """Measured divergence at a few times (band: min–max over initial conditions), the
    one-sided bound (dashed) and the Grönwall bound (dotted) against ε = ‖ΔW‖₂, for each
    perturbed weight (medians over initial conditions)."""
    colors = {"Q": "tab:blue", "K": "tab:orange", "V": "tab:green"}
    fig, axes = plt.subplots(1, len(probe_ts), figsize=(4.6 * len(probe_ts), 4), squeeze=False)
    for j, (ax, t) in enumerate(zip(axes[0], probe_ts)):
        for name, r in results.items():
            e = r["e_probe"][..., j]
            ax.loglog(
                eps,
                np.median(e, axis=1),
                "-o",
                ms=3,
                color=colors[name],
                label=f"{name}: measured (median)",
            )
            ax.fill_between(eps, e.min(axis=1), e.max(axis=1), color=colors[name], alpha=0.15)
            for key, style, what in (
                ("bound_probe", "--", "one-sided bound"),
                ("gronwall_probe", ":", "Grönwall bound"),
            ):
                if key not in r:
                    continue
                bm = np.median(r[key][..., j], axis=1)
                ok = np.isfinite(bm)
                ax.loglog(eps[ok], bm[ok], style, color=colors[name], label=f"{name}: {what}")
        ax.set_xlabel("ε = ‖ΔW‖₂")
        ax.set_ylabel(f"e(t = {t:g})")
        ax.set_title(f"t = {t:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Measured divergence (band: min–max over initial conditions) and the bounds")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def horizon_vs_eps(eps, results, path, *, eta, t_end=None):
    """Horizons (the last time with e ≤ η) against ε for each perturbed weight, medians
    over initial conditions: measured (solid), certified by the one-sided bound (dashed,
    band: min–max) and by the Grönwall bound (dotted). `t_end`: the end of the runs (a
    measured horizon there means the runs never separated)."""
    colors = {"Q": "tab:blue", "K": "tab:orange", "V": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in results.items():
        h = r["horizon"]
        if "median_measured_horizon" in r:
            ax.loglog(
                eps,
                r["median_measured_horizon"],
                "-",
                lw=2,
                color=colors[name],
                label=f"{name}: measured",
            )
        ax.loglog(
            eps,
            r["median_horizon"],
            "--o",
            ms=3,
            color=colors[name],
            label=f"{name}: one-sided bound",
        )
        with np.errstate(all="ignore"):
            ax.fill_between(
                eps, np.nanmin(h, axis=1), np.nanmax(h, axis=1), color=colors[name], alpha=0.12
            )
        if "median_gronwall_horizon" in r:
            ax.loglog(
                eps,
                r["median_gronwall_horizon"],
                ":",
                color=colors[name],
                label=f"{name}: Grönwall bound",
            )
    ax.set_xlabel("ε = ‖ΔW‖₂")
    if t_end is not None:
        ax.axhline(t_end, color="0.4", lw=0.8, ls="-.")
        ax.annotate(
            "end of the runs",
            (eps[0], t_end),
            xytext=(0, 4),
            textcoords="offset points",
            fontsize=7,
            color="0.3",
        )
        ax.set_ylim(top=1.5 * t_end)
    ax.set_ylabel(f"horizon: last t with e ≤ {eta:g}")
    ax.set_title("Measured and certified horizons (medians over initial conditions)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=len(results), loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def horizon_sweep(rows, path, *, eta, title=None):
    """Measured and certified horizons (the last time with e ≤ η) against ε, log-log: one
    row per ε with `eps`, `measured_horizon` (`measured_censored`: a lower bound),
    `certified_horizon` (one-sided bound; `certified_censored`: a lower bound) and
    `certified_horizon_gronwall`."""
    eps = np.array([r["eps"] for r in rows])
    meas = np.array([r["measured_horizon"] for r in rows])
    cens = np.array([r["measured_censored"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.loglog(eps, meas, "k-o", ms=4, label="measured")
    if cens.any():
        ax.loglog(eps[cens], meas[cens], "k^", ms=8, mfc="none", label="measured ≥ (run ended)")
    for key, style, label in (
        ("certified_horizon", "--s", "certified: one-sided bound"),
        ("certified_horizon_gronwall", ":v", "certified: Grönwall bound"),
    ):
        h = np.array([r[key] for r in rows], np.float64)
        ok = np.isfinite(h) & (h > 0)
        (line,) = ax.loglog(eps[ok], h[ok], style, ms=4, label=label)
        if key == "certified_horizon":
            cc = np.array([r.get("certified_censored", False) for r in rows]) & ok
            if cc.any():
                ax.loglog(
                    eps[cc],
                    h[cc],
                    "^",
                    ms=8,
                    mfc="none",
                    color=line.get_color(),
                    label="certified ≥ (bound's grid ended)",
                )
    ax.set_xlabel("ε = ‖ΔV‖₂")
    ax.set_ylabel(f"horizon: last t with e ≤ {eta:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- sphere-phase ------------------------------------------------------------------------
def sphere_phase_diagram(ts, betas, dims, prob, curve, path, *, delta, n, realisations):
    """P(⟨x_i, x_j⟩ ≥ 1 − δ) over (t, β), one panel per dimension, with the equiangular
    model's curve."""
    fig, axes = plt.subplots(
        1, len(dims), figsize=(4.2 * len(dims), 3.8), squeeze=False, sharey=True
    )
    for ax, d, P in zip(axes[0], dims, prob):
        im = ax.pcolormesh(ts, betas, P, vmin=0, vmax=1, cmap="magma", shading="auto")
        ok = np.isfinite(curve) & (curve <= ts[-1])
        ax.plot(curve[ok], betas[ok], "c--", lw=1.5, label="equiangular model")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("t")
        ax.set_xlim(ts[0], ts[-1])
    axes[0][0].set_ylabel("β")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"P(⟨x_i, x_j⟩ ≥ 1 − {delta:g})")
    fig.suptitle(f"SA on the sphere, n = {n}, {realisations} realisations per β")
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def sphere_plateaus(pts, plateaus, path, *, threshold, n):
    """Number of clusters over time for a few β (mean, band 25–75 %): metastable
    plateaus."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, c in plateaus.items():
        m = c.mean(axis=0)
        ax.plot(pts, m, label=f"β = {b:g}")
        ax.fill_between(pts, np.percentile(c, 25, axis=0), np.percentile(c, 75, axis=0), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(f"clusters (⟨x_i, x_j⟩ ≥ 1 − {threshold:g})")
    ax.set_title(f"Metastable plateaus, d = 2, n = {n} (mean, band 25–75 %)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# -- departure-time ----------------------------------------------------------------------
def departure_vs_eps(eps, t_dep, med_dep, med_app, fit, path, *, delta, metric, paper_prefactor):
    """Departure time (every initial condition and the median), approach time and the
    fitted power law against ε, with the paper's prefactor/ε."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for b in range(t_dep.shape[1]):
        ax.loglog(
            eps, np.where(np.isfinite(t_dep[:, b]), t_dep[:, b], np.nan), ".", color="0.7", ms=3
        )
    ax.loglog(eps, med_dep, "o-", color="tab:blue", ms=4, label="departure (median)")
    ax.loglog(eps, med_app, "s-", color="tab:green", ms=3, label="approach (median)")
    if fit["slope"] is not None:
        ax.loglog(
            eps,
            fit["prefactor"] * eps ** fit["slope"],
            "k--",
            lw=1,
            label=f"fit {fit['prefactor']:.3g}·ε^{fit['slope']:.3f}",
        )
    ax.loglog(
        eps, paper_prefactor / eps, ":", color="tab:red", label=f"paper: {paper_prefactor:g}/ε"
    )
    ax.set_xlabel("ε")
    ax.set_ylabel("time")
    ax.set_title(f"Departure from the original clusters (δ = {delta}, {metric})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def departure_phases(eps, ts, D0, t_app, t_dep, path, *, delta):
    """D(t) of the first initial condition at a few ε, with the three phases shaded."""
    pick = np.unique(np.linspace(0, eps.size - 1, min(3, eps.size)).round().astype(int))
    fig, axes = plt.subplots(1, pick.size, figsize=(4.8 * pick.size, 3.8), squeeze=False)
    for ax, k in zip(axes[0], pick):
        D = D0[k]
        ax.semilogy(ts, D, color="k", lw=1)
        ax.axhline(delta, color="tab:red", lw=0.8)
        a, dp = t_app[k, 0], t_dep[k, 0]
        if np.isfinite(a):
            ax.axvspan(0, a, color="tab:gray", alpha=0.2, label="before clustering")
            end = dp if np.isfinite(dp) else ts[-1]
            ax.axvspan(a, end, color="tab:green", alpha=0.2, label="near original clusters")
            if np.isfinite(dp):
                ax.axvspan(dp, ts[-1], color="tab:orange", alpha=0.2, label="after departure")
        ax.set_xlim(0, min(ts[-1], 3 * dp if np.isfinite(dp) else ts[-1]))
        ax.set_title(f"ε = {eps[k]:.3g}")
        ax.set_xlabel("t")
        ax.set_ylabel("D(t)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Three phases (first initial condition)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
