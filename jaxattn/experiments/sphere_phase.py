"""Clustering on the sphere — the (t, β) phase diagram and metastable plateaus.

SA dynamics (post-LayerNorm), Q = K = V = I, n = 32 tokens uniform on `S^{d−1}`.
Phase diagram: the probability that two tokens are within `1 − δ` (δ = 1e-3) of each
other, `P(⟨x_i(t), x_j(t)⟩ ≥ 1 − δ)`, estimated over all pairs of ≥ 256 realisations per β
(pairs are exchangeable, so this is the paper's `P(⟨x₁, x₂⟩ ≥ 1 − δ)` with less noise),
for d ∈ {2, 8, 32, 128}; overlaid: the time at which the equiangular model (docs/theory.md,
'Clustering on the sphere'; `ρ(0) = 0`) reaches `1 − δ`. Plateaus: cluster counts
against t in d = 2 for several β.

Each (d, β) cell is one vmapped solve over the realisations and one chunk of the sweep
engine (`_chunks.run_chunks`): finished cells are saved under `out_dir/chunks/` and
skipped on a rerun, so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import chord_from_cosine_gap, cluster_count, gram
from .._base import ExperimentConfig, check_output_dir, draw_normal, write_json, write_npz
from .._model import SphereField
from .._simulate import simulate
from .._sweep import run_chunks, sweep_id
from ._common import config_key, default_dtype, in_float64

NAME = "sphere-phase"
DESCRIPTION = "sphere phase diagram over (t, β) for d = 2…128, metastable plateaus"
CLI_OPTIONS = ()


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the phase diagram (`n` … `seed`) and of the d = 2 plateau study
    (`plateau_*`)."""

    #: tokens per realisation
    n: int = 32
    #: token dimensions d, one panel of the phase diagram each
    dims: tuple[int, ...] = (2, 8, 32, 128)
    #: inverse temperatures β of the phase diagram (0.5, 1.0, …, 10.0)
    betas: tuple[float, ...] = tuple(np.round(np.linspace(0.5, 10.0, 20), 3).tolist())
    #: independent initial conditions per (d, β) cell
    realisations: int = 256
    #: final time of the phase diagram
    t1: float = 20.0
    #: fixed step of the solver (both parts)
    dt: float = 0.1
    #: output times of the phase diagram, evenly spaced in [0, t1]
    n_out: int = 81
    #: a pair is close when ⟨x_i, x_j⟩ ≥ 1 − delta
    delta: float = 1e-3
    #: seed of the initial tokens
    seed: int = 0
    #: β of the plateau curves
    plateau_betas: tuple[float, ...] = (1.0, 4.0, 9.0)
    #: final time of the plateau study
    plateau_t1: float = 30.0
    #: initial conditions per plateau curve
    plateau_realisations: int = 64
    #: cosine gap (1 − cos) under which two tokens count as one cluster
    plateau_threshold: float = 1e-3

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=8,
        dims=(2, 8),
        betas=(1.0, 4.0, 9.0),
        realisations=16,
        t1=5.0,
        n_out=21,
        plateau_betas=(4.0,),
        plateau_t1=5.0,
        plateau_realisations=8,
    )


def sphere_tokens(key, batch, n, d, dtype):
    x = draw_normal(key, (batch, n, d), dtype)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@jax.jit
def _close_fraction(xs, delta):
    """Fraction of pairs i < j with ⟨x_i, x_j⟩ ≥ 1 − δ, per time: xs (B, T, n, d) → (T,)."""
    n = xs.shape[-2]
    G = jax.vmap(jax.vmap(gram))(xs)
    iu = jnp.triu_indices(n, 1)
    close = (G[..., iu[0], iu[1]] >= 1.0 - delta).astype(xs.dtype)
    return jnp.mean(close, axis=(0, 2))


def equiangular_rate(rho, beta: float, n: int):
    """`ρ'` of SA's equiangular ODE: `2 e^{βρ}(1 − ρ)(1 + (n − 1)ρ) / (e^β + (n − 1)e^{βρ})`
    for the common cosine ρ of n tokens with Q = K = V = I (the other normalisation
    schemes divide it by their speed factor)."""
    return (
        2 * np.exp(beta * rho) * (1 - rho) * ((n - 1) * rho + 1)
        / (np.exp(beta) + (n - 1) * np.exp(beta * rho))
    )  # fmt: skip


def equiangular_time(beta: float, n: int, delta: float, t_max: float, dt: float = 1e-3) -> float:
    """First t with ρ(t) ≥ 1 − δ for SA's equiangular ODE from ρ(0) = 0
    (classical RK4 on the scalar ODE; inf if not reached by t_max)."""

    def f(r):
        return equiangular_rate(r, beta, n)

    r, t = 0.0, 0.0
    while t < t_max:
        k1 = f(r)
        k2 = f(r + 0.5 * dt * k1)
        k3 = f(r + 0.5 * dt * k2)
        k4 = f(r + dt * k3)
        r_new = r + dt * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        if r_new >= 1 - delta:  # linear interpolation inside the step
            return t + dt * (1 - delta - r) / (r_new - r)
        r, t = r_new, t + dt
    return float("inf")


def _key(cfg: Config, *parts) -> str:
    return config_key(cfg.to_dict(), ("n", "t1", "dt", "n_out", "delta", "seed"), parts)


def _complete(res: dict[str, np.ndarray] | None, part: str) -> dict[str, np.ndarray]:
    """`run_chunks`' arrays; None means chunks of other processes are still missing."""
    if res is None:
        raise RuntimeError(
            f"sphere-phase {part}: chunks of other processes are still missing; "
            "run again once they have finished"
        )
    return res


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the phase diagram and the plateaus (module docstring) and write
    `phase_diagram.png`, `plateaus.png`, `sphere_phase.npz` and `summary.json` into
    `out_dir`; return the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = default_dtype()
    t_start = time.perf_counter()
    ts = np.linspace(0.0, cfg.t1, cfg.n_out)
    betas = np.asarray(cfg.betas, np.float64)
    dims = list(cfg.dims)
    cells = [(d, float(beta)) for d in dims for beta in betas]  # one chunk per (d, β)
    progress = sys.stderr.isatty()

    def phase_cell(idx):
        (c,) = idx
        d, beta = cells[c]
        key = jax.random.fold_in(jax.random.key(cfg.seed), d)
        x0 = sphere_tokens(key, cfg.realisations, cfg.n, d, dtype)
        sol = simulate(
            SphereField(d=d, beta=beta, dtype=dtype),
            x0,
            cfg.t1,
            dt=cfg.dt,
            ts=ts,
            renormalise=True,
        )
        if not sol.ok:
            raise RuntimeError(f"sphere solve failed at d={d}, β={beta}: {sol.messages()}")
        return {"p": np.asarray(_close_fraction(sol.xs, cfg.delta))[None]}

    log(
        f"phase diagram: {len(cells)} cells (d × β) of {cfg.realisations} runs each (resumable) ..."
    )
    ident = {
        "experiment": NAME,
        "part": "phase",
        "cfg": _key(cfg, cfg.realisations),
        "cells": cells,
    }
    res = run_chunks(
        os.path.join(out_dir, "chunks", f"phase-{sweep_id(ident)}"),
        ident,
        len(cells),
        1,
        phase_cell,
        progress=progress,
        log=log,
        desc="phase",
    )
    prob = _complete(res, "phase")["p"].reshape(len(dims), betas.size, ts.size)
    curve = np.asarray([equiangular_time(float(b), cfg.n, cfg.delta, 10 * cfg.t1) for b in betas])

    log("metastable plateaus (d = 2): cluster counts against t ...")
    pts = np.linspace(0.0, cfg.plateau_t1, 61)
    plateau_betas = [float(b) for b in cfg.plateau_betas]

    def plateau_cell(idx):
        (c,) = idx
        x0 = sphere_tokens(jax.random.key(cfg.seed + 1), cfg.plateau_realisations, cfg.n, 2, dtype)
        sol = simulate(
            SphereField(d=2, beta=plateau_betas[c], dtype=dtype),
            x0,
            cfg.plateau_t1,
            dt=cfg.dt,
            ts=pts,
            renormalise=True,
        )
        # plateau_threshold is a cosine gap (1 − cos ≤ δ); cluster_count takes a chord.
        chord = chord_from_cosine_gap(cfg.plateau_threshold)
        count = jax.vmap(jax.vmap(lambda x: cluster_count(x, chord, sphere=True)))
        return {"counts": np.asarray(count(sol.xs))[None]}

    ident = {
        "experiment": NAME,
        "part": "plateau",
        "betas": plateau_betas,
        "cfg": _key(cfg, cfg.plateau_t1, cfg.plateau_realisations, cfg.plateau_threshold),
    }
    res = run_chunks(
        os.path.join(out_dir, "chunks", f"plateau-{sweep_id(ident)}"),
        ident,
        len(plateau_betas),
        1,
        plateau_cell,
        progress=progress,
        log=log,
        desc="plateaus",
    )
    counts = _complete(res, "plateaus")["counts"]
    plateaus = {b: counts[c] for c, b in enumerate(plateau_betas)}

    log("figures and summary ...")
    from .. import plotting

    plotting.sphere_phase_diagram(
        ts,
        betas,
        dims,
        prob,
        curve,
        os.path.join(out_dir, "phase_diagram.png"),
        delta=cfg.delta,
        n=cfg.n,
        realisations=cfg.realisations,
    )
    plotting.sphere_plateaus(
        pts,
        plateaus,
        os.path.join(out_dir, "plateaus.png"),
        threshold=cfg.plateau_threshold,
        n=cfg.n,
    )
    write_npz(
        os.path.join(out_dir, "sphere_phase.npz"),
        dims=np.asarray(dims),
        betas=betas,
        ts=ts,
        probability=prob,
        equiangular_time=curve,
        plateau_ts=pts,
        **{f"plateau_counts_beta{b:g}": c for b, c in plateaus.items()},
    )
    half = {}
    for i, d in enumerate(dims):  # time at which half the pairs are within 1 − δ, per β
        row = []
        for j in range(betas.size):
            k = np.nonzero(prob[i, j] >= 0.5)[0]
            row.append(float(ts[k[0]]) if k.size else None)
        half[str(d)] = row
    summary = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg.to_dict(),
        "betas": betas,
        "dims": dims,
        "time_half_pairs_close": half,
        "final_probability": {str(d): prob[i, :, -1] for i, d in enumerate(dims)},
        "equiangular_time": curve,
        "plateau_mean_clusters": {
            f"{b:g}": {
                "t": pts[:: max(1, pts.size // 6)],
                "mean": c.mean(axis=0)[:: max(1, pts.size // 6)],
                "at_end": float(c[:, -1].mean()),
            }
            for b, c in plateaus.items()
        },
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": "probability = fraction of token pairs with <x_i, x_j> >= 1 - delta over all "
        "realisations; equiangular_time = time the SA equiangular ODE from rho = 0 "
        "reaches 1 - delta (null = beyond 10·t1). Times in units of depth.",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(f"done in {summary['wall_seconds']} s")
    return summary
