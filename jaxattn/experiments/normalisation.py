"""Normalisation schemes and causal attention (background: docs/theory.md, 'The model
family'; page: docs/normalisation.md).

Part 1, after Karagodin, Ge, Polyanskiy and Rigollet (*Normalization in attention
dynamics*, NeurIPS 2025): the same tokens (uniform on the sphere, unit radii) under
post-LN, pre-LN, peri-LN and nGPT with `Q = K = V = I`, one solve per scheme batched over
initial conditions; the mean cosine and the number of clusters against depth t, and the
radii. Beside it the paper's symmetric case from its closed scalar ODE (orthonormal
tokens: one common cosine; tested against simulated tokens in tests/test_family.py).

Part 2, after Karagodin, Polyanskiy and Rigollet (*Clustering in causal attention
masking*, NeurIPS 2024, its Figure 2): n = 200 tokens on the circle, `Q = K = V = I`,
β = 64, the causal mask, on the sphere; the number of clusters (single-linkage at chord
≤ 0.1) against time up to t = 150, over several initial conditions. Meta-stable
clusters: the count stays flat for long stretches and drops rarely.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import cluster_count, mean_cosine
from .._base import (
    ExperimentConfig,
    check_memory,
    check_output_dir,
    draw_normal,
    draw_uniform,
    write_json,
    write_npz,
)
from .._model import TransformerField
from .._simulate import simulate
from ._common import default_dtype, in_float64
from .sphere_phase import equiangular_rate

NAME = "normalisation"
DESCRIPTION = (
    "post/pre/peri-LN and nGPT clustering speed against depth; causal meta-stable clusters"
)
CLI_OPTIONS = ()

SCHEMES = ("post", "pre", "peri", "ngpt")


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the normalisation study (defaults: the full run; `QUICK`: `--quick`)."""

    n: int = 64  #: tokens per initial condition (part 1)
    d: int = 128  #: token dimension (part 1: high d, where |A| is small at a random start)
    beta: float = 1.0  #: inverse temperature (part 1: the paper's Theorem 4.2 takes β = 1)
    alpha: float = 1.0  #: nGPT's step scale
    n_ic: int = 8  #: initial conditions (part 1)
    t1: float = 30.0  #: depth (part 1)
    dt: float = 0.05  #: RK4 step (both parts)
    saves: int = 121  #: saved times (part 1)
    threshold: float = 0.1  #: cluster threshold, a chord between directions (part 1)
    early: float = 1.0  #: the "early" depth at which speeds are compared
    eq_n: int = 256  #: symmetric case: tokens (paper: n = 256)
    eq_beta: float = 5.0  #: symmetric case: β (paper: β = 5)
    eq_t1: float = 10.0  #: symmetric case: end time
    causal_n: int = 200  #: part 2: tokens on the circle
    causal_beta: float = 64.0  #: part 2: β
    causal_t1: float = 150.0  #: part 2: end time
    causal_ic: int = 4  #: part 2: initial conditions
    causal_saves: int = 151  #: part 2: saved times
    causal_threshold: float = 0.1  #: part 2: cluster threshold (chord)
    seed: int = 0  #: seed of every initial condition

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=24,
        d=32,
        n_ic=3,
        t1=8.0,
        dt=0.1,
        saves=41,
        eq_n=64,
        causal_n=48,
        causal_beta=16.0,
        causal_t1=30.0,
        causal_ic=2,
        causal_saves=31,
    )

    def check(self) -> None:
        item = 8.0
        check_memory(
            item * self.n_ic * self.saves * self.n * (self.d + self.n),
            f"normalisation study with n = {self.n}, d = {self.d}, {self.n_ic} initial conditions",
        )
        check_memory(
            item * self.causal_ic * self.causal_saves * self.causal_n * (2 + self.causal_n),
            f"causal study with n = {self.causal_n}",
        )


def _sphere_tokens(key, batch: int, n: int, d: int, dtype):
    g = draw_normal(key, (batch, n, d), dtype)
    return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def equiangular_curves(n: int, beta: float, t_eval, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """The common cosine γ(t) of n orthonormal tokens with `Q = K = V = I` under each
    scheme, from the closed scalar ODE (docs/theory.md, 'The model family'): SA's rate
    (`sphere_phase.equiangular_rate`) divided by the scheme's speed factor, with unit
    initial radii."""
    import scipy.integrate

    def rhs(scheme):
        def f(t, y):
            g, r = y
            e_b, e_g = np.exp(beta), np.exp(beta * g)
            Z = e_b + (n - 1) * e_g
            on = (e_b + (n - 1) * g * e_g) / Z  # ⟨θ_j, A_j⟩
            sq = e_b**2 + 2 * (n - 1) * g * e_b * e_g + (n - 1) * e_g**2 * (1 + (n - 2) * g)
            norm_a = np.sqrt(sq) / Z
            s = {"post": 1.0, "pre": r, "peri": r * norm_a, "ngpt": norm_a / alpha}[scheme]
            dr = {"pre": on, "peri": on / norm_a}.get(scheme, 0.0)
            return [equiangular_rate(g, beta, n) / s, dr]

        return f

    t_eval = np.asarray(t_eval, np.float64)
    out = {}
    for scheme in SCHEMES:
        sol = scipy.integrate.solve_ivp(
            rhs(scheme), (0.0, t_eval[-1]), [0.0, 1.0], t_eval=t_eval, rtol=1e-10, atol=1e-12
        )
        out[scheme] = sol.y[0]
    return out


def _first_time(ts, values, level):
    """First saved time with `values ≥ level` (None if never)."""
    hit = np.nonzero(np.asarray(values) >= level)[0]
    return None if hit.size == 0 else float(ts[hit[0]])


def _drops(ts, counts):
    """Times at which the cluster count decreases."""
    c = np.asarray(counts)
    return [float(ts[k + 1]) for k in np.nonzero(np.diff(c) < 0)[0]]


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Both parts (module docstring): figures `normalisation.png` and `causal.png`, the
    curves in `normalisation.npz`, and `summary.json` in `out_dir`; returns the summary."""
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = default_dtype()
    t_start = time.perf_counter()
    key1, key2 = jax.random.split(jax.random.key(cfg.seed))
    ts = np.linspace(0.0, cfg.t1, cfg.saves)

    # -- part 1: the schemes ------------------------------------------------------------
    x0 = _sphere_tokens(key1, cfg.n_ic, cfg.n, cfg.d, dtype)
    per: dict[str, dict[str, np.ndarray]] = {}
    for k, scheme in enumerate(SCHEMES):
        log(
            f"[{k + 1}/6] {scheme}: {cfg.n_ic} initial conditions × {cfg.n} tokens in "
            f"d = {cfg.d}, β = {cfg.beta:g}, to t = {cfg.t1:g}"
        )
        field = TransformerField(d=cfg.d, beta=cfg.beta, norm=scheme, alpha=cfg.alpha, dtype=dtype)
        sol = simulate(field, x0, cfg.t1, dt=cfg.dt, ts=ts)
        if not sol.ok:
            raise RuntimeError(f"{scheme}: {sol.messages()}")
        xs = sol.xs  # (B, T, n, d)
        per[scheme] = {
            "mean_cosine": np.asarray(mean_cosine(xs)),
            "clusters": np.asarray(cluster_count(xs, cfg.threshold, sphere=True)),
            "radius": np.asarray(jnp.mean(jnp.linalg.norm(xs, axis=-1), axis=-1)),
        }
    t_eq = np.linspace(0.0, cfg.eq_t1, 201)
    log(f"[5/6] symmetric case: n = {cfg.eq_n}, β = {cfg.eq_beta:g} (scalar ODE)")
    eq = equiangular_curves(cfg.eq_n, cfg.eq_beta, t_eq, cfg.alpha)

    # -- part 2: causal ------------------------------------------------------------------
    log(
        f"[6/6] causal: {cfg.causal_ic} initial conditions × {cfg.causal_n} tokens on the "
        f"circle, β = {cfg.causal_beta:g}, to t = {cfg.causal_t1:g}"
    )
    angles = draw_uniform(key2, (cfg.causal_ic, cfg.causal_n), dtype, 0.0, 2 * np.pi)
    xc0 = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    ts_c = np.linspace(0.0, cfg.causal_t1, cfg.causal_saves)
    causal = TransformerField(d=2, beta=cfg.causal_beta, mask="causal", norm="post", dtype=dtype)
    sol_c = simulate(causal, xc0, cfg.causal_t1, dt=cfg.dt, ts=ts_c)
    if not sol_c.ok:
        raise RuntimeError(f"causal: {sol_c.messages()}")
    counts_c = np.asarray(cluster_count(sol_c.xs, cfg.causal_threshold, sphere=True))  # (B, T)
    theta_c = np.asarray(jnp.arctan2(sol_c.xs[0, ..., 1], sol_c.xs[0, ..., 0]))  # (T, n)

    # -- figures, data, summary ----------------------------------------------------------
    from .. import plotting

    plotting.normalisation_schemes(
        ts, per, t_eq, eq, cfg, os.path.join(out_dir, "normalisation.png")
    )
    plotting.causal_clusters(
        ts_c, theta_c, counts_c, cfg.causal_threshold, os.path.join(out_dir, "causal.png")
    )
    write_npz(
        os.path.join(out_dir, "normalisation.npz"),
        ts=ts,
        t_eq=t_eq,
        ts_causal=ts_c,
        causal_clusters=counts_c,
        causal_angles=theta_c,
        **{f"{s}_{k}": v for s, d in per.items() for k, v in d.items()},
        **{f"{s}_equiangular": v for s, v in eq.items()},
    )
    i_early = int(np.argmin(np.abs(ts - cfg.early)))
    schemes = {}
    for s, r in per.items():
        mc = r["mean_cosine"]
        reach = [_first_time(ts, m, 0.9) for m in mc]
        schemes[s] = {
            "mean_cosine_early": {
                "median": float(np.median(mc[:, i_early])),
                "min": float(mc[:, i_early].min()),
                "max": float(mc[:, i_early].max()),
            },
            "one_minus_mean_cosine_final": {
                "median": float(np.median(1 - mc[:, -1])),
                "min": float((1 - mc[:, -1]).min()),
                "max": float((1 - mc[:, -1]).max()),
            },
            "time_to_mean_cosine_0.9": reach,
            "clusters_final": r["clusters"][:, -1].tolist(),
            "radius_final": {"median": float(np.median(r["radius"][:, -1]))},
        }
    med_early = {s: schemes[s]["mean_cosine_early"]["median"] for s in SCHEMES}
    med_gap = {s: schemes[s]["one_minus_mean_cosine_final"]["median"] for s in SCHEMES}
    i_eq = int(np.argmin(np.abs(t_eq - 1.0)))
    checkpoints = [t for t in (0, 25, 50, 75, 100, 150) if t <= cfg.causal_t1]
    summary = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg.to_dict(),
        "schemes": schemes,
        "ordering": {
            "early_fastest_two": sorted(SCHEMES, key=lambda s: -med_early[s])[:2],
            "peri_and_ngpt_faster_early_than_post_and_pre": bool(
                min(med_early["peri"], med_early["ngpt"]) > max(med_early["post"], med_early["pre"])
            ),
            "post_most_collapsed_at_the_end": bool(
                med_gap["post"] <= min(med_gap["pre"], med_gap["peri"])
            ),
        },
        "equiangular_cosine_at_t1": {s: float(v[i_eq]) for s, v in eq.items()},
        "causal": {
            "threshold": cfg.causal_threshold,
            "clusters_at": {
                f"t={t:g}": counts_c[:, int(np.argmin(np.abs(ts_c - t)))].tolist()
                for t in checkpoints
            },
            "drop_times": [_drops(ts_c, c) for c in counts_c],
        },
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": "part 1: medians and ranges over the initial conditions; Q = K = V = I, "
        "tokens uniform on the sphere with unit radii. Part 2: cluster counts per "
        "initial condition (components of the graph chord ≤ δ).",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(
        f"done in {summary['wall_seconds']} s: mean cosine at t = {cfg.early:g}: "
        + ", ".join(f"{s} {med_early[s]:.3f}" for s in SCHEMES)
        + "; causal clusters at "
        + ", ".join(f"{k} {v}" for k, v in summary["causal"]["clusters_at"].items())
    )
    return summary
