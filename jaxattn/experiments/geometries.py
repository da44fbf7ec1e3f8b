"""Geometries: the limit geometry of the tokens is set by the spectrum of V.

Five cases of Geshkovski–Letrouit–Polyanskiy–Rigollet (arXiv 2305.05465), each with an
automatic check of the predicted geometry (booleans in `summary.json`, next to the
measured numbers):

1. `polytope` — rescaled dynamics, `V = I`, `QᵀK ≻ 0` (Q = I, K a random SPD matrix),
   d = 2 and d = 3: the cluster centres are vertices of the convex hull of the final tokens.
2. `hyperplanes` — rescaled, Q = K = I, V = the paper's 2-D and 3-D matrices (top
   eigenvalue simple and positive): the left-eigenvector coordinate `⟨φ₁*, z_i⟩` takes at
   most 3 limit values.
3. `polygon_line` — rescaled, Q = K = I, `V = diag(1, 1, −0.5)`: `(z₁, z₂)` clusters at
   the vertices of a polygon while the third coordinate stays free (in the original
   variable `x₃ = e^{−t/2} z₃` every token keeps its own limit; `z₃` itself spreads like
   `e^{t/2}`).
4. `collapse` — plain dynamics, `V = −I`, Q = K = I: tokens collapse to 0, slowly: the
   radius decays like `t^{−1/2}` (small-x expansion: the covariance obeys `Σ' = −2βΣ²`).
5. `leaders_1d` — rescaled, d = 1, V = Q = K = 1: the attention matrix becomes Boolean
   (Booleanness → 0) of rank 1 or 2, and its leaders are the extreme tokens.

Each case is one batched `simulate` call over all initial conditions (seeds); cases with
the same field type and shapes share one compilation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import booleanness, cluster_centres_masked, cluster_labels, leaders, support
from .._base import (
    ExperimentConfig,
    check_output_dir,
    draw_uniform,
    write_atomic,
    write_json,
    write_npz,
)
from .._model import PlainField, RescaledField
from .._simulate import simulate
from ._clusters import final_motion, hull_directions, hull_vertex_mask
from ._common import in_float64

NAME = "geometries"
DESCRIPTION = (
    "limit geometries by the spectrum of V (polytope, hyperplanes, "
    "polygon × line, collapse, 1-D leaders) with automatic checks"
)
CLI_OPTIONS = ()

# The paper's example value matrices (docs/theory.md, 'Geometries by the spectrum of V').
V_HYPER_2D = ((0.64709742, 0.81911926), (0.61210449, 0.63263484))
V_HYPER_3D = (
    (0.2362413, 0.0599536, 0.40506019),
    (0.81321448, 0.49948705, 0.33754772),
    (0.2160645, 0.38505272, 0.14588075),
)
V_POLYGON_LINE = (1.0, 1.0, -0.5)


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the five cases: tokens and the rescaled solves (`n` … `spd_seed`), the
    plain V = −I collapse (`collapse_*`) and the d = 1 case (`d1_n`, `booleanness_tol`)."""

    #: tokens per initial condition (d = 2, 3)
    n: int = 32
    #: initial conditions per case, solved as one batch
    seeds: int = 6
    #: seed of the initial tokens and the hull directions
    seed: int = 0
    #: inverse temperature β
    beta: float = 1.0
    #: tokens x0 ~ U[low, high]^d: lower bound
    low: float = -1.0
    #: upper bound of the tokens
    high: float = 1.0
    #: final time of the rescaled cases
    t1: float = 20.0
    #: fixed step of the rescaled cases
    dt: float = 0.1
    #: fixed-step solver of the rescaled cases
    solver: str = "rk4"
    #: tokens within this distance are one cluster
    cluster_threshold: float = 1e-3
    #: relative tolerance that separates the levels of ⟨φ₁*, z_i⟩
    level_rtol: float = 1e-3
    #: directions tested for convex-hull vertices
    n_dirs: int = 20000
    #: seed of the random SPD K of the polytope case (plus d)
    spd_seed: int = 1
    #: final time of the plain V = −I case (tsit5, adaptive)
    collapse_t1: float = 1000.0
    #: relative tolerance of the collapse solve
    collapse_rtol: float = 1e-8
    #: absolute tolerance of the collapse solve
    collapse_atol: float = 1e-12
    #: output times of the collapse case, on a log grid in [0.1, collapse_t1] (plus t = 0)
    collapse_points: int = 80
    #: accepted range of the late log-log slope of the radius (predicted −1/2)
    collapse_slope_range: tuple[float, float] = (-0.65, -0.35)
    #: tokens of the d = 1 case
    d1_n: int = 20
    #: final Booleanness below which the d = 1 attention counts as Boolean
    booleanness_tol: float = 1e-6

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=16,
        seeds=2,
        t1=15.0,
        collapse_t1=200.0,
        collapse_points=40,
        n_dirs=4000,
        d1_n=12,
    )


# -- geometry helpers ----------------------------------------------------------------
def count_levels(values, rtol: float) -> tuple[int, np.ndarray]:
    """Distinct values of a 1-D array: sort, split at gaps > `rtol · max(1, range)`.
    Returns the count and the mean of each level."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    tol = rtol * max(1.0, float(v[-1] - v[0]))
    cuts = np.nonzero(np.diff(v) > tol)[0] + 1
    groups = np.split(v, cuts)
    return len(groups), np.array([g.mean() for g in groups])


def left_top_eigenvector(V) -> tuple[float, np.ndarray, np.ndarray]:
    """Top eigenvalue λ₁ of V (real, simple), its right eigenvector φ₁ and left
    eigenvector φ₁* (`φ₁*ᵀ V = λ₁ φ₁*ᵀ`), both of unit norm with `⟨φ₁*, φ₁⟩ > 0`."""
    V = np.asarray(V, np.float64)
    w, R = np.linalg.eig(V)
    k = int(np.argmax(np.real(w)))
    wl, L = np.linalg.eig(V.T)
    kl = int(np.argmin(np.abs(wl - w[k])))
    phi = np.real(R[:, k])
    phi_star = np.real(L[:, kl])
    phi /= np.linalg.norm(phi)
    phi_star /= np.linalg.norm(phi_star)
    if phi @ phi_star < 0:
        phi_star = -phi_star
    return float(w[k].real), phi, phi_star


def random_spd(d: int, seed: int) -> np.ndarray:
    """`M Mᵀ/d + ½ I`: a random symmetric positive definite matrix (for `QᵀK ≻ 0`)."""
    M = np.random.default_rng(seed).standard_normal((d, d))
    return M @ M.T / d + 0.5 * np.eye(d)


@jax.jit
def cluster_batch(x, threshold):
    """Clusters of a batch of token sets `x (B, n, d)` in one compiled call: labels
    `(B, n)`, centres `(B, n, d)` and their validity mask `(B, n)` (see
    `cluster_centres_masked`); the count is `mask.sum(-1)`."""

    def one(z):
        centres, mask = cluster_centres_masked(z, threshold)
        return cluster_labels(z, threshold), centres, mask

    return jax.vmap(one)(x)


def clusters_np(x, threshold) -> list[dict]:
    """`cluster_batch` as NumPy: per token set, its labels and compact centres `(k, d)`."""
    x = np.asarray(x)
    labels, centres, mask = (np.asarray(a) for a in cluster_batch(jnp.asarray(x), threshold))
    return [
        {"labels": labels[b], "centres": centres[b][mask[b]], "count": int(mask[b].sum())}
        for b in range(x.shape[0])
    ]


def _tokens(key, shape, low, high, dtype):
    return draw_uniform(key, shape, dtype, low, high)


# -- the cases -----------------------------------------------------------------------
def _polytope(cfg: Config, x0s, dtype, log):
    out, arrays = {}, {}
    for d in (2, 3):
        K = random_spd(d, cfg.spd_seed + d)
        field = RescaledField(None, K, None, beta=cfg.beta, dtype=dtype)
        sol = _solve(field, x0s[d], cfg)
        ts, xs = np.asarray(sol.ts), np.asarray(sol.xs)
        dirs = hull_directions(d, cfg.n_dirs, seed=cfg.seed + d)
        per_seed = []
        cl = clusters_np(xs[:, -1], cfg.cluster_threshold)
        w = jnp.asarray(dirs, dtype)
        h_tokens = np.asarray(jax.vmap(support, in_axes=(0, None))(jnp.asarray(xs[:, -1]), w))
        for s in range(xs.shape[0]):
            fin, centres = xs[s, -1], cl[s]["centres"]
            mask = hull_vertex_mask(centres, dirs)
            h_centres = np.max(dirs @ centres.T, axis=1)
            per_seed.append(
                {
                    "clusters": int(centres.shape[0]),
                    "centres_are_hull_vertices": int(mask.sum()),
                    "max_token_to_centre": float(
                        np.max(
                            np.min(np.linalg.norm(fin[:, None] - centres[None], axis=-1), axis=1)
                        )
                    ),
                    "support_gap_tokens_vs_centres": float(np.max(np.abs(h_tokens[s] - h_centres))),
                }
            )
        ok = all(p["centres_are_hull_vertices"] == p["clusters"] for p in per_seed)
        out[f"d{d}"] = {
            "dynamics": "rescaled",
            "V": "I",
            "Q": "I",
            "K": K,
            "min_eig_QtK": float(np.linalg.eigvalsh(K)[0]),
            "per_seed": per_seed,
            "clusters": [p["clusters"] for p in per_seed],
            "final_motion_last_unit": final_motion(ts, xs),
            "check_centres_are_hull_vertices": bool(ok),
        }
        arrays[f"polytope_d{d}_xs"] = xs[:, :: _every(ts), :, :]
        arrays[f"polytope_d{d}_final"] = xs[:, -1]
        log(
            f"      polytope d={d}: clusters {out[f'd{d}']['clusters']}, all centres hull "
            f"vertices: {ok}"
        )
    arrays["polytope_ts"] = ts[:: _every(ts)]
    return out, arrays


def _hyperplanes(cfg: Config, x0s, dtype, log):
    out, arrays = {}, {}
    for d, V in ((2, V_HYPER_2D), (3, V_HYPER_3D)):
        V = np.asarray(V)
        lam, phi, phi_star = left_top_eigenvector(V)
        field = RescaledField(None, None, V, beta=cfg.beta, dtype=dtype)
        sol = _solve(field, x0s[d], cfg)
        ts, xs = np.asarray(sol.ts), np.asarray(sol.xs)
        coord = xs @ phi_star  # (S, T, n)
        levels, values = [], []
        for s in range(xs.shape[0]):
            k, v = count_levels(coord[s, -1], cfg.level_rtol)
            levels.append(k)
            values.append(v)
        k_ = int(np.argmin(np.abs(ts - (ts[-1] - 1.0))))
        ok = max(levels) <= 3
        out[f"d{d}"] = {
            "dynamics": "rescaled",
            "V": V,
            "Q": "I",
            "K": "I",
            "eigenvalues_V_real": np.linalg.eigvals(V).real,
            "eigenvalues_V_imag": np.linalg.eigvals(V).imag,
            "lambda_1": lam,
            "phi_1": phi,
            "phi_1_star": phi_star,
            "Qphi1_dot_Kphi1": float(phi @ phi),
            "levels": levels,
            "level_values": values,
            "coordinate_motion_last_unit": float(np.max(np.abs(coord[:, -1] - coord[:, k_]))),
            "check_at_most_3_levels": bool(ok),
        }
        arrays[f"hyperplanes_d{d}_xs"] = xs[:, :: _every(ts), :, :]
        arrays[f"hyperplanes_d{d}_final"] = xs[:, -1]
        arrays[f"hyperplanes_d{d}_coord"] = coord
        log(f"      hyperplanes d={d}: levels of <phi1*, z> per seed {levels} (≤ 3: {ok})")
    arrays["hyperplanes_ts"] = ts
    return out, arrays


def _polygon_line(cfg: Config, x0s, dtype, log):
    V = np.diag(V_POLYGON_LINE)
    field = RescaledField(None, None, V, beta=cfg.beta, dtype=dtype)
    sol = _solve(field, x0s[3], cfg)
    ts, zs = np.asarray(sol.ts), np.asarray(sol.xs)
    lam3 = V_POLYGON_LINE[2]
    x3 = zs[..., 2] * np.exp(lam3 * ts)[None, :, None]  # original variable x₃
    dirs = hull_directions(2, cfg.n_dirs, seed=cfg.seed + 7)
    thr = cfg.cluster_threshold
    per_seed, growth = [], []
    half = ts >= ts[-1] / 2
    cl = clusters_np(zs[:, -1, :, :2], thr)
    for s in range(zs.shape[0]):
        labels, centres = cl[s]["labels"], cl[s]["centres"]
        mask = hull_vertex_mask(centres, dirs)
        spreads = [
            float(np.ptp(x3[s, -1, labels == lab]))
            for lab in np.unique(labels)
            if np.sum(labels == lab) >= 2
        ]
        k3, _ = count_levels(x3[s, -1], 1e-6)
        per_seed.append(
            {
                "clusters_in_plane": int(centres.shape[0]),
                "centres_are_hull_vertices": int(mask.sum()),
                "distinct_x3_limits": int(k3),
                "max_x3_spread_within_a_cluster": max(spreads) if spreads else 0.0,
            }
        )
        spread = np.ptp(zs[s, :, :, 2], axis=-1)
        growth.append(float(np.polyfit(ts[half], np.log(spread[half]), 1)[0]))
    k_ = int(np.argmin(np.abs(ts - (ts[-1] - 1.0))))
    hull_ok = all(p["centres_are_hull_vertices"] == p["clusters_in_plane"] for p in per_seed)
    free_ok = all(
        p["distinct_x3_limits"] > p["clusters_in_plane"]
        and p["max_x3_spread_within_a_cluster"] > 100 * thr
        for p in per_seed
    )
    out = {
        "dynamics": "rescaled",
        "V": V,
        "Q": "I",
        "K": "I",
        "per_seed": per_seed,
        "clusters_in_plane": [p["clusters_in_plane"] for p in per_seed],
        "plane_motion_last_unit": float(np.max(np.abs(zs[:, -1, :, :2] - zs[:, k_, :, :2]))),
        "x3_motion_last_unit": float(np.max(np.abs(x3[:, -1] - x3[:, k_]))),
        "z3_spread_growth_rate": growth,
        "z3_spread_growth_rate_predicted": -lam3,
        "check_plane_centres_are_polygon_vertices": bool(hull_ok),
        "check_third_coordinate_free": bool(free_ok),
    }
    log(
        f"      polygon × line: clusters in the (z1, z2) plane {out['clusters_in_plane']}, "
        f"polygon vertices: {hull_ok}; third coordinate free: {free_ok}, "
        f"z3 spread grows at rate {np.round(growth, 3).tolist()} (predicted {-lam3})"
    )
    arrays = {
        "polygon_line_ts": ts[:: _every(ts)],
        "polygon_line_zs": zs[:, :: _every(ts)],
        "polygon_line_final": zs[:, -1],
        "polygon_line_x3": x3[:, :: _every(ts)],
    }
    return out, arrays


def _collapse(cfg: Config, x0s, dtype, log):
    d = 2
    field = PlainField(None, None, -np.eye(d), beta=cfg.beta, dtype=dtype)
    ts_out = np.concatenate([[0.0], np.geomspace(0.1, cfg.collapse_t1, cfg.collapse_points)])
    sol = simulate(
        field,
        x0s[d],
        cfg.collapse_t1,
        solver="tsit5",
        rtol=cfg.collapse_rtol,
        atol=cfg.collapse_atol,
        ts=ts_out,
    )
    _require_ok(sol, "collapse (V = −I)")
    ts, xs = np.asarray(sol.ts), np.asarray(sol.xs)
    R = np.max(np.linalg.norm(xs, axis=-1), axis=-1)  # (S, T)
    mean_norm = np.linalg.norm(xs.mean(axis=-2), axis=-1)
    late = ts >= ts[-1] ** (2 / 3)  # last third of log t
    slopes = [
        float(np.polyfit(np.log(ts[late]), np.log(R[s, late]), 1)[0]) for s in range(R.shape[0])
    ]
    lo, hi = cfg.collapse_slope_range
    monotone = bool(np.all(np.diff(R, axis=1) <= 1e-12 * R[:, :1]))
    ratio = (R[:, -1] / R[:, 0]).tolist()
    out = {
        "dynamics": "plain",
        "V": "-I",
        "Q": "I",
        "K": "I",
        "solver": f"tsit5 rtol={cfg.collapse_rtol} atol={cfg.collapse_atol}",
        "t1": cfg.collapse_t1,
        "radius_initial": R[:, 0].tolist(),
        "radius_final": R[:, -1].tolist(),
        "radius_ratio": ratio,
        "mean_norm_final": mean_norm[:, -1].tolist(),
        "late_loglog_slope": slopes,
        "predicted_slope": -0.5,
        "check_radius_non_increasing": monotone,
        "check_slow_power_law_collapse": bool(
            all(lo <= s <= hi for s in slopes) and max(ratio) < 0.5
        ),
    }
    log(
        f"      collapse: radius {np.round(R[:, 0], 3).tolist()} → "
        f"{np.round(R[:, -1], 4).tolist()} at t = {ts[-1]:g}, log-log slope "
        f"{np.round(slopes, 3).tolist()} (predicted −0.5)"
    )
    return out, {"collapse_ts": ts, "collapse_radius": R, "collapse_mean_norm": mean_norm}


def _leaders_1d(cfg: Config, x0s, dtype, log):
    field = RescaledField(None, None, None, beta=cfg.beta, d=1, dtype=dtype)
    x0 = x0s[1]
    sol = _solve(field, x0, cfg)
    ts, zs = np.asarray(sol.ts), np.asarray(sol.xs)
    att = jax.vmap(jax.vmap(field.attention), in_axes=(None, 0))  # over seeds, then times
    P = np.asarray(att(jnp.asarray(ts), jnp.asarray(zs)))  # (S, T, n, n)
    boo = np.max(np.minimum(P, 1.0 - P), axis=(-1, -2))  # = booleanness, batched
    per_seed = []
    x0n = np.asarray(x0)[..., 0]
    cl = clusters_np(zs[:, -1], cfg.cluster_threshold)
    bl = jax.vmap(lambda p: (booleanness(p), leaders(p)))(jnp.asarray(P[:, -1]))
    bool_f, lead_f = np.asarray(bl[0]), np.asarray(bl[1])
    for s in range(zs.shape[0]):
        lead = np.nonzero(lead_f[s])[0].tolist()
        ext = sorted({int(np.argmin(x0n[s])), int(np.argmax(x0n[s]))})
        per_seed.append(
            {
                "booleanness_final": float(bool_f[s]),
                "leaders": lead,
                "extreme_tokens": ext,
                "rank_P_final": int(np.linalg.matrix_rank(P[s, -1])),
                "clusters": cl[s]["count"],
            }
        )
    ok_bool = all(p["booleanness_final"] <= cfg.booleanness_tol for p in per_seed)
    ok_lead = all(
        p["leaders"]
        and set(p["leaders"]) <= set(p["extreme_tokens"])
        and len(p["leaders"]) == p["clusters"]
        for p in per_seed
    )
    ok_rank = all(p["rank_P_final"] in (1, 2) for p in per_seed)
    out = {
        "dynamics": "rescaled",
        "d": 1,
        "V": 1.0,
        "Q": 1.0,
        "K": 1.0,
        "n": cfg.d1_n,
        "per_seed": per_seed,
        "booleanness_at": {
            f"t={ts[k]:g}": boo[:, k].tolist()
            for k in np.unique(np.linspace(0, ts.size - 1, 5).astype(int))
        },
        "check_booleanness_to_zero": bool(ok_bool),
        "check_leaders_are_extreme_tokens": bool(ok_lead),
        "check_rank_1_or_2": bool(ok_rank),
    }
    boo_txt = ", ".join(f"{p['booleanness_final']:.1e}" for p in per_seed)
    log(
        f"      d = 1: final Booleanness [{boo_txt}], "
        f"leaders {[p['leaders'] for p in per_seed]} ⊆ extremes "
        f"{[p['extreme_tokens'] for p in per_seed]}: {ok_lead}"
    )
    return out, {
        "leaders_1d_ts": ts,
        "leaders_1d_zs": zs[..., 0],
        "leaders_1d_booleanness": boo,
        "leaders_1d_P_final": P[:, -1],
    }


# -- plumbing ------------------------------------------------------------------------
def _every(ts, per_unit: int = 2) -> int:
    """Stride that keeps about `per_unit` saved frames per unit of time."""
    dt = float(ts[1] - ts[0]) if ts.size > 1 else 1.0
    return max(1, round(1.0 / (per_unit * dt)))


def _require_ok(sol, what):
    if not sol.ok:
        raise RuntimeError(f"{what}: solve failed: {'; '.join(sol.messages())}")


def _solve(field, x0, cfg: Config):
    sol = simulate(field, x0, cfg.t1, solver=cfg.solver, dt=cfg.dt)
    _require_ok(sol, f"{field.dynamics} d={field.d}")
    return sol


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the five cases, write figures, `geometries.npz`, `checks.csv` and
    `summary.json` into `out_dir`, and return the summary."""
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()
    keys = jax.random.split(jax.random.key(cfg.seed), 4)
    x0s = {d: _tokens(keys[d], (cfg.seeds, cfg.n, d), cfg.low, cfg.high, dtype) for d in (2, 3)}
    x0s[1] = _tokens(keys[1], (cfg.seeds, cfg.d1_n, 1), cfg.low, cfg.high, dtype)

    cases, arrays, timing = {}, {}, {}
    steps = [
        ("polytope", _polytope),
        ("hyperplanes", _hyperplanes),
        ("polygon_line", _polygon_line),
        ("collapse", _collapse),
        ("leaders_1d", _leaders_1d),
    ]
    for i, (name, fn) in enumerate(steps, 1):
        log(f"[{i}/{len(steps) + 1}] {name} ...")
        t0 = time.perf_counter()
        cases[name], arr = fn(cfg, x0s, dtype, log)
        arrays.update(arr)
        timing[name] = round(time.perf_counter() - t0, 3)

    log(f"[{len(steps) + 1}/{len(steps) + 1}] figures, data and summary ...")
    from .. import plotting

    def fig_path(name):
        return os.path.join(out_dir, name)

    thr = cfg.cluster_threshold
    # the cluster centres the figures outline (same shapes as in the cases: cached)
    centres_d2 = [c["centres"] for c in clusters_np(arrays["polytope_d2_xs"][:, -1], thr)]
    plane_centres = clusters_np(arrays["polygon_line_zs"][:, -1, :, :2], thr)[0]["centres"]
    plotting.geometries_polytope(arrays, cases, centres_d2, fig_path("polytope.png"))
    plotting.geometries_hyperplanes(arrays, cases, fig_path("hyperplanes.png"))
    plotting.geometries_polygon_line(arrays, cases, plane_centres, fig_path("polygon_line.png"))
    plotting.geometries_collapse(arrays, cases, fig_path("collapse.png"))
    plotting.geometries_leaders_1d(arrays, cases, fig_path("leaders_1d.png"))
    checks = {}
    for case, res in cases.items():
        for k, v in res.items():
            if k.startswith("check_"):
                checks[f"{case}.{k[len('check_') :]}"] = bool(v)
            elif isinstance(v, dict):  # sub-cases (d2, d3)
                for kk, vv in v.items():
                    if kk.startswith("check_"):
                        checks[f"{case}.{k}.{kk[len('check_') :]}"] = bool(vv)
    arrays["x0_d2"], arrays["x0_d3"], arrays["x0_d1"] = (
        np.asarray(x0s[2]),
        np.asarray(x0s[3]),
        np.asarray(x0s[1]),
    )
    write_npz(os.path.join(out_dir, "geometries.npz"), **arrays)
    _write_checks_csv(os.path.join(out_dir, "checks.csv"), checks)
    summary = {
        "experiment": NAME,
        "quick": quick,
        "config": cfg.to_dict(),
        "dtype": jnp.dtype(dtype).name,
        "checks": checks,
        "all_checks_pass": bool(all(checks.values())),
        "cases": cases,
        "case_seconds_incl_compile": timing,
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "notes": (
            "Rescaled dynamics z = e^{-tV} x unless a case says plain; tokens "
            "x0 ~ U[low, high]^d, one batch of `seeds` initial conditions per case, RK4 "
            "with fixed dt (the collapse case: tsit5, adaptive). Cluster = connected "
            "component at distance <= cluster_threshold. Hull vertices: a centre is a "
            "vertex iff some of n_dirs directions exposes it strictly. Levels: distinct "
            "values of <phi1*, z_i(t1)> at relative tolerance level_rtol (phi1* = left "
            "eigenvector of V for its top eigenvalue). *_motion_last_unit: max change over "
            "[t1 - 1, t1], i.e. how converged t1 is."
        ),
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    failed = [k for k, v in checks.items() if not v]
    log(
        f"done in {summary['wall_seconds']:.1f} s: {len(checks) - len(failed)}/{len(checks)} "
        f"geometry checks pass" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return summary


def _write_checks_csv(path, checks: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["check", "holds"])
    for k, v in checks.items():
        w.writerow([k, bool(v)])

    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())

    write_atomic(path, _w)
