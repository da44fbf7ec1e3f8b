"""Figures of the `geometries` and `low-rank` experiments: token trails in 2-D and 3-D
(matplotlib's object API, `matplotlib.figure.Figure`), one function per figure file."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .._base import save_figure


def _save(fig, path):
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _trails_2d(ax, xs):
    for i in range(xs.shape[1]):
        ax.plot(xs[:, i, 0], xs[:, i, 1], lw=0.5, color="tab:gray", alpha=0.5)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=8, color="tab:gray", label="t = 0")
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=18, color="tab:red", zorder=3, label="t = t1")
    ax.set_aspect("equal", adjustable="box")


def _trails_3d(ax, xs, start_size=6):
    for i in range(xs.shape[1]):
        ax.plot(xs[:, i, 0], xs[:, i, 1], xs[:, i, 2], lw=0.5, color="tab:gray", alpha=0.5)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], xs[0, :, 2], s=start_size, color="tab:gray")
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], xs[-1, :, 2], s=16, color="tab:red")


def _hull_outline(ax, centres):
    """Polygon through 2-D centres ordered by angle around their mean (they are hull
    vertices when the check holds)."""
    c = np.asarray(centres)
    if c.shape[0] < 2:
        return
    m = c.mean(axis=0)
    order = np.argsort(np.arctan2(c[:, 1] - m[1], c[:, 0] - m[0]))
    loop = c[np.append(order, order[0])]
    ax.plot(loop[:, 0], loop[:, 1], "-", color="tab:blue", lw=0.8)


# -- low-rank ----------------------------------------------------------------------------
def low_rank_cases(xs, members, path, *, step, n, t1):
    """Trails of the chosen rank cases (x0 seed 0, weight seed 0): grey = start, red = end."""
    want = [
        "A = e1e1ᵀ",
        "A = 0 (Q = 0)",
        "proj rank 1 (w0)",
        "proj rank 2 (w0)",
        "proj rank 3 (w0)",
        "psd rank 3 (w0)",
    ]
    picks = [
        next(i for i, m in enumerate(members) if m["label"] == w)
        for w in want
        if any(m["label"] == w for m in members)
    ]
    fig = Figure(figsize=(12, 7.5))
    for j, mi in enumerate(picks):
        ax = fig.add_subplot(2, 3, j + 1, projection="3d")
        _trails_3d(ax, xs[mi, 0, ::step], start_size=5)
        m = members[mi]
        ax.set_title(
            f"{m['label']}: rank A = {m['rank_A']}, {m['stats'][0]['clusters']} cluster(s)",
            fontsize=9,
        )
    fig.suptitle(
        f"Rescaled dynamics, V = I, n = {n}, t ∈ [0, {t1:g}]: grey = start, red = end",
        fontsize=10,
    )
    _save(fig, path)


def low_rank_cluster_counts(members, path, *, d):
    """Cluster count against the rank of A = QᵀK (each dot one run); leaders against
    clusters."""
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    for fam, off, col in (
        ("zero", 0.0, "k"),
        ("e1", -0.2, "tab:red"),
        ("psd", -0.1, "tab:blue"),
        ("gen", 0.0, "tab:orange"),
        ("proj", 0.1, "tab:green"),
    ):
        xs_, ys_ = [], []
        for m in members:
            if m["family"] == fam:
                for st in m["stats"]:
                    xs_.append(m["rank_A"] + off + rng.uniform(-0.025, 0.025))
                    ys_.append(st["clusters"])
        label = {
            "zero": "A = 0",
            "e1": "A = e1e1ᵀ",
            "psd": "Q = K = G_r (A = G_rᵀG_r)",
            "gen": "Q = G_r, K = H_r independent",
            "proj": "Q = K = A = rank-r projection",
        }[fam]
        ax.scatter(xs_, ys_, s=14, color=col, alpha=0.7, label=label)
    ax.set_xticks(range(d + 1))
    ax.set_xlabel("rank of A = QᵀK")
    ax.set_ylabel("clusters at t1")
    ax.legend(fontsize=8)
    ax.set_title("cluster count against rank (each dot one run)", fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    cl = [st["clusters"] for m in members for st in m["stats"]]
    ld = [st["n_leaders"] for m in members for st in m["stats"]]
    ax.scatter(
        np.array(cl) + rng.uniform(-0.1, 0.1, len(cl)),
        np.array(ld) + rng.uniform(-0.1, 0.1, len(ld)),
        s=12,
        alpha=0.6,
    )
    top = max(cl + ld) + 1
    ax.plot([0, top], [0, top], "k:", lw=0.8)
    ax.set_xlabel("clusters")
    ax.set_ylabel("leaders {j : max_i P_ij > 1/2}")
    ax.set_title("leaders against clusters (A = 0 has no leader)", fontsize=10)
    _save(fig, path)


def low_rank_lora(ts, lxs, scales, lora_out, e_all, path, *, step, separation):
    """Rank-2 LoRA of K raising the rank of A: trails (seed 0) and the distance from the
    rank-1 run."""
    L = len(scales)
    fig = Figure(figsize=(3.0 * L, 7))
    for li in range(L):
        ax = fig.add_subplot(2, L, li + 1, projection="3d")
        _trails_3d(ax, lxs[li, 0, ::step], start_size=5)
        lo = lora_out[li]
        ax.set_title(
            f"ΔK = diag(0, {scales[li][0]:g}, {scales[li][1]:g})\nrank A = "
            f"{lo['rank_A']}, {lo['clusters'][0]} clusters",
            fontsize=9,
        )
    if e_all:
        ax = fig.add_subplot(2, 1, 2)
        for li in range(1, L):
            med = np.median(e_all[li], axis=0)
            pos = med > 0
            ax.semilogy(
                ts[pos],
                med[pos],
                lw=1.4,
                label=f"s = ({scales[li][0]:g}, {scales[li][1]:g}), rank A = "
                f"{lora_out[li]['rank_A']}",
            )
        ax.axhline(separation, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("t")
        ax.set_ylabel("median over seeds of max_i |z_i − z_i^(rank 1)|")
        ax.legend(fontsize=8)
        ax.set_title("distance from the rank-1 run (base Q = I, K = e1e1ᵀ)", fontsize=10)
    fig.suptitle("Rank-2 LoRA of K raising the rank of A = QᵀK (seed 0)", fontsize=10)
    _save(fig, path)


# -- geometries ----------------------------------------------------------------------------
def geometries_polytope(a, cases, centres_d2, path):
    """V = I, QᵀK ≻ 0: clusters at the vertices of a convex polytope (d = 2, every seed
    up to 3, with `centres_d2[s]` the cluster centres of seed s; d = 3, seed 0)."""
    xs2, xs3 = a["polytope_d2_xs"], a["polytope_d3_xs"]
    S = xs2.shape[0]
    ncol = min(S, 3)
    fig = Figure(figsize=(3.3 * (ncol + 1), 3.4))
    for s in range(ncol):
        ax = fig.add_subplot(1, ncol + 1, s + 1)
        _trails_2d(ax, xs2[s])
        c = centres_d2[s]
        _hull_outline(ax, c)
        ax.set_title(f"d = 2, seed {s}: {c.shape[0]} clusters", fontsize=9)
    ax = fig.add_subplot(1, ncol + 1, ncol + 1, projection="3d")
    _trails_3d(ax, xs3[0])
    ax.set_title(f"d = 3, seed 0: {cases['polytope']['d3']['clusters'][0]} clusters", fontsize=9)
    fig.suptitle(
        "V = I, QᵀK ≻ 0 (rescaled): clusters at the vertices of a convex polytope "
        f"— check: {cases['polytope']['d2']['check_centres_are_hull_vertices']}"
        f" (d=2), {cases['polytope']['d3']['check_centres_are_hull_vertices']} (d=3)",
        fontsize=10,
    )
    _save(fig, path)


def geometries_hyperplanes(a, cases, path):
    """Top eigenvalue of V simple and positive: tokens on at most 3 parallel hyperplanes."""
    fig = Figure(figsize=(13, 3.6))
    h2, h3 = cases["hyperplanes"]["d2"], cases["hyperplanes"]["d3"]
    ax = fig.add_subplot(1, 4, 1)
    _trails_2d(ax, a["hyperplanes_d2_xs"][0])
    ps = np.asarray(h2["phi_1_star"])
    lim = np.abs(a["hyperplanes_d2_xs"][0]).max() * 1.05
    tt = np.linspace(-lim, lim, 2)
    perp = np.array([-ps[1], ps[0]])
    for v in h2["level_values"][0]:
        line = v * ps[None, :] + tt[:, None] * perp[None, :]
        ax.plot(line[:, 0], line[:, 1], "--", color="tab:blue", lw=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title("2-D paper V, seed 0: lines ⟨φ₁*, z⟩ = c", fontsize=9)
    ts = a["hyperplanes_ts"]
    for j, (d, h) in enumerate(((2, h2), (3, h3))):
        ax = fig.add_subplot(1, 4, 2 + j)
        coord = a[f"hyperplanes_d{d}_coord"][0]
        ax.plot(ts, coord, lw=0.6, color="k", alpha=0.6)
        ax.set_xlabel("t")
        ax.set_ylabel("⟨φ₁*, z_i(t)⟩")
        ax.set_title(f"{d}-D paper V, seed 0: {h['levels'][0]} limit levels", fontsize=9)
    ax = fig.add_subplot(1, 4, 4, projection="3d")
    _trails_3d(ax, a["hyperplanes_d3_xs"][0])
    ax.set_title("3-D paper V, seed 0 (z)", fontsize=9)
    fig.suptitle(
        "Top eigenvalue of V simple and positive: at most 3 parallel hyperplanes "
        f"— levels per seed d=2 {h2['levels']}, d=3 {h3['levels']}",
        fontsize=10,
    )
    _save(fig, path)


def geometries_polygon_line(a, cases, plane_centres, path):
    """V = diag(1, 1, −0.5): polygon vertices (`plane_centres`: the (z₁, z₂) cluster
    centres of seed 0) × a free third coordinate."""
    pl = cases["polygon_line"]
    zs, x3 = a["polygon_line_zs"], a["polygon_line_x3"]
    fig = Figure(figsize=(11, 3.8))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    pts = np.concatenate([zs[0, :, :, :2], x3[0][..., None]], axis=-1)
    _trails_3d(ax, pts)
    ax.set_zlabel("x₃ = exp(−t/2)·z₃")
    ax.set_title("seed 0: (z₁, z₂, x₃)", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    _trails_2d(ax, zs[0, :, :, :2])
    _hull_outline(ax, plane_centres)
    ax.set_title(f"(z₁, z₂): {pl['clusters_in_plane'][0]} polygon vertices", fontsize=9)
    ax = fig.add_subplot(1, 3, 3)
    tsp = a["polygon_line_ts"]
    ax.semilogy(tsp, np.ptp(zs[:, :, :, 2], axis=-1).T, lw=1)
    ax.semilogy(
        tsp,
        np.ptp(zs[0, :, :, 2], axis=-1)[-1] * np.exp(0.5 * (tsp - tsp[-1])),
        "k--",
        lw=0.8,
        label="∝ exp(t/2)",
    )
    ax.set_xlabel("t")
    ax.set_ylabel("spread of z₃")
    ax.legend(fontsize=8)
    ax.set_title("third coordinate: no clustering", fontsize=9)
    fig.suptitle(
        "V = diag(1, 1, −0.5): polygon vertices × free third coordinate — checks: "
        f"{pl['check_plane_centres_are_polygon_vertices']}, "
        f"{pl['check_third_coordinate_free']}",
        fontsize=10,
    )
    _save(fig, path)


def geometries_collapse(a, cases, path):
    """V = −I, QᵀK = I (plain): slow collapse of the tokens."""
    co = cases["collapse"]
    ts, R = a["collapse_ts"], a["collapse_radius"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    pos = ts > 0
    ax.loglog(ts[pos], R[:, pos].T, lw=1)
    ax.loglog(
        ts[pos], a["collapse_mean_norm"][0, pos], ":", color="gray", lw=1, label="|mean| (seed 0)"
    )
    ref = R[0, -1] * (ts[pos] / ts[-1]) ** -0.5
    ax.loglog(ts[pos], ref, "k--", lw=0.8, label="∝ t^(−1/2)")
    ax.set_xlabel("t")
    ax.set_ylabel("max_i |x_i(t)|")
    ax.set_ylim(max(R[:, pos].min() / 5, a["collapse_mean_norm"][0, pos].min()), R.max() * 2)
    ax.legend(fontsize=8)
    ax.set_title(
        f"V = −I, QᵀK = I (plain): slow collapse, slope {np.mean(co['late_loglog_slope']):.3f}",
        fontsize=10,
    )
    _save(fig, path)


def geometries_leaders_1d(a, cases, path):
    """d = 1, V > 0: Boolean attention, leaders = extreme tokens."""
    l1 = cases["leaders_1d"]
    ts, z, boo = a["leaders_1d_ts"], a["leaders_1d_zs"], a["leaders_1d_booleanness"]
    fig = Figure(figsize=(12, 3.6))
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(ts, z[0], lw=0.8, color="k", alpha=0.6)
    for j in l1["per_seed"][0]["leaders"]:
        ax.plot(ts, z[0, :, j], lw=2, color="tab:red")
    ax.set_xlabel("t")
    ax.set_ylabel("z_i(t)")
    ax.set_title("seed 0: tokens (leaders in red)", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    floor = 1e-18
    ax.semilogy(ts, np.maximum(boo.T, floor), lw=1)
    ax.set_xlabel("t")
    ax.set_ylabel("Booleanness max min(P, 1−P)")
    ax.set_title(f"→ 0 (floored at {floor:g})", fontsize=9)
    ax = fig.add_subplot(1, 3, 3)
    order = np.argsort(z[0, 0])
    ax.imshow(a["leaders_1d_P_final"][0][np.ix_(order, order)], cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(f"final P (tokens sorted), rank {l1['per_seed'][0]['rank_P_final']}", fontsize=9)
    fig.suptitle(
        "d = 1, V > 0: Boolean attention, leaders = extreme tokens — checks: "
        f"{l1['check_booleanness_to_zero']}, {l1['check_leaders_are_extreme_tokens']}",
        fontsize=10,
    )
    _save(fig, path)
