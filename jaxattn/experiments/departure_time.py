"""Departure time: when does the LoRA-perturbed run leave the original clusters?

n = 20 tokens in d = 2, `x0 ~ U[−1, 1]²`, rescaled dynamics, Q = K = I. Reference: V = I,
its tokens at `T_ref = 20` are the reference clusters. Perturbed: `Ṽ = diag(1, 1 − ε)`.
`D(t)` = distance of the perturbed tokens to the reference set — two-sided Hausdorff by
default (sees merging), or the paper's one-sided `max_i min_c |z_i − c|` (`metric="paper"`).
Approach time: first `D ≤ δ`; departure time: first later `D > δ`. NaN is never read as
"far": a non-finite D before a decision gives NaN times (and is counted in the summary).

All (ε, initial condition) pairs of a chunk are one vmapped solve; the chunks run on the
package's sweep engine (`_chunks.run_chunks`): finished chunks are saved under
`out_dir/chunks/` and skipped when the same configuration is run again, so a killed full
run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import approach_departure, hausdorff, one_sided_distance
from .._base import ExperimentConfig, check_memory, check_output_dir, write_json, write_npz
from .._model import RescaledField
from .._simulate import fixed_step_grid, simulate
from .._sweep import run_chunks, sweep_id
from ._common import (
    config_key,
    default_dtype,
    in_float64,
    loglog_fit,
    nanmedian,
    perturbation,
    uniform_tokens,
)

NAME = "departure-time"
DESCRIPTION = "approach/departure times vs ε to t = 1000, log-log fit, three phases"
CLI_OPTIONS = ("eps", "x0", "metric")


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the departure-time study (defaults: the full run; `QUICK`: `--quick`)."""

    n: int = 20  #: tokens per initial condition
    d: int = 2  #: token dimension (the perturbation is 2-D; part of the chunk hash)
    low: float = -1.0  #: initial tokens ~ U[low, high]²
    high: float = 1.0  #: upper bound of the initial tokens
    n_ic: int = 16  #: random initial conditions
    eps: tuple[float, ...] = tuple(float(v) for v in np.logspace(-3, -1, 30))  #: ε values
    t1: float = 1000.0  #: end time of the perturbed runs
    t_ref: float = 20.0  #: time of the reference clusters (V = I)
    dt: float = 0.1  #: solver step
    solver: str = "rk4"  #: fixed-step solver of the runs
    delta: float = 0.1  #: approach/departure threshold δ on D(t)
    metric: Literal["hausdorff", "paper"] = "hausdorff"  #: D(t): two- or one-sided
    seed: int = 0  #: seed of the random initial conditions
    x0: Any = None  #: given tokens (n, 2) instead of random ones (n_ic becomes 1)
    chunk: int = 6  #: ε values per resumable chunk
    dense_until: float = 60.0  #: output every step up to this time ...
    coarse_every: int = 5  #: ... then every `coarse_every` steps
    paper_eps: tuple[float, ...] = (0.01, 0.002)  #: ε of the scheme comparison
    fit_max_eps: float = 0.02  #: log-log fit over ε ≤ this

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=8,
        n_ic=3,
        eps=(0.02, 0.05, 0.1),
        t1=120.0,
        chunk=3,
        paper_eps=(0.05,),
        fit_max_eps=0.1,
    )

    def check(self) -> None:
        if self.x0 is not None:
            shape = np.shape(self.x0)
            if len(shape) != 2 or shape[-1] != 2:
                raise ValueError(
                    f"--x0 must hold 2-D tokens (n, 2) for this experiment, got shape {shape}"
                )
        n = self.n if self.x0 is None else int(np.shape(self.x0)[0])
        b = self.n_ic if self.x0 is None else 1
        T = _output_grid(self.t1, self.dt, self.dense_until, self.coarse_every).size
        chunk = min(self.chunk, len(self.eps))
        # One chunk's perturbed runs saved at every output time, and their distances to
        # the reference clusters (an n × n matrix per run and time), in float64.
        check_memory(
            8.0 * chunk * b * T * n * (2 + n),
            f"departure-time with {n} tokens ({chunk} ε × {b} initial conditions × "
            f"{T} saved times per chunk)",
        )


PAPER_PREFACTOR = 0.54  # paper: T_dep ≈ 0.54/ε for ε ≤ 0.015 (its first-order scheme)


def _output_grid(t1, dt, dense_until, coarse_every):
    grid = fixed_step_grid(0.0, t1, dt)
    keep = (grid <= dense_until) | (np.arange(grid.size) % coarse_every == 0)
    keep[-1] = True
    return grid[keep]


@jax.jit
def _distances_hausdorff(xs, ref):
    # xs: (E, B, T, n, d), ref: (B, n, d)
    f = jax.vmap(jax.vmap(hausdorff, in_axes=(0, None)), in_axes=(0, 0))
    return jax.vmap(f, in_axes=(0, None))(xs, ref)


@jax.jit
def _distances_paper(xs, ref):
    f = jax.vmap(jax.vmap(one_sided_distance, in_axes=(0, None)), in_axes=(0, 0))
    return jax.vmap(f, in_axes=(0, None))(xs, ref)


def _times(ts, D, delta):
    fn = jax.vmap(jax.vmap(lambda d: approach_departure(ts, d, delta)))
    return fn(D)


def departure_times(x0, eps, cfg: Config, *, solver=None, dt=None, dtype=None):
    """Approach/departure times `(E, B)` and distances `(E, B, T)` for tokens `x0 (B, n, 2)`."""
    dtype = dtype or x0.dtype
    solver = solver or cfg.solver
    dt = dt or cfg.dt
    base = RescaledField(d=2, dtype=dtype)
    ref = simulate(base, x0, cfg.t_ref, solver=solver, dt=dt, ts=np.array([cfg.t_ref]))
    ref_tokens = ref.xs[:, -1]
    ts = _output_grid(cfg.t1, dt, cfg.dense_until, cfg.coarse_every)
    sol = simulate(
        base.with_lora(perturbation(eps, dtype)), x0, cfg.t1, solver=solver, dt=dt, ts=ts
    )
    dist = _distances_paper if cfg.metric == "paper" else _distances_hausdorff
    D = dist(sol.xs, ref_tokens)
    t_app, t_dep = _times(jnp.asarray(ts, dtype), D, cfg.delta)
    return (
        np.asarray(t_app),
        np.asarray(t_dep),
        np.asarray(D),
        ts,
        np.asarray(sol.status),
        np.asarray(ref.status),
    )


def _cfg_hash(cfg: Config, x0) -> str:
    keys = (
        "n",
        "d",
        "low",
        "high",
        "t1",
        "t_ref",
        "dt",
        "solver",
        "delta",
        "metric",
        "dense_until",
        "coarse_every",
    )
    return config_key(cfg.to_dict(), keys, arrays=(x0,))


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the departure-time study (module docstring) and write `phases.png`,
    `departure_vs_eps.png`, `departure_time.npz`, `departure_time.csv` and `summary.json`
    into `out_dir`; return the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = default_dtype()
    t_start = time.perf_counter()
    if cfg.x0 is not None:  # its shape is checked by `Config.check`
        x0 = jnp.asarray(np.asarray(cfg.x0, np.float64)[None], dtype)
        cfg = dataclasses.replace(cfg, n=int(x0.shape[1]), n_ic=1)
    else:
        x0 = uniform_tokens(cfg.seed, cfg.n_ic, cfg.n, 2, cfg.low, cfg.high, dtype)
    cfg_print = {k: v for k, v in cfg.to_dict().items() if k != "x0"}
    eps = np.sort(np.asarray(cfg.eps, np.float64))[::-1]
    E, B = eps.size, int(x0.shape[0])
    ts = _output_grid(cfg.t1, cfg.dt, cfg.dense_until, cfg.coarse_every)
    log(
        f"{E} values of ε × {B} initial conditions to t = {cfg.t1:g}, chunks of "
        f"{cfg.chunk} ε (resumable) ..."
    )

    def compute(idx):
        a, dp, D, _, status, _ = departure_times(x0, eps[idx], cfg, dtype=dtype)
        return {"t_app": a, "t_dep": dp, "D0": D[:, 0], "status": status}

    identity = {"experiment": NAME, "config": _cfg_hash(cfg, x0), "eps": eps}
    res = run_chunks(
        os.path.join(out_dir, "chunks", f"departure-{sweep_id(identity)}"),
        identity,
        E,
        cfg.chunk,
        compute,
        progress=sys.stderr.isatty(),
        log=log,
        desc="departure-time",
    )
    assert res is not None  # None only in a multi-process run with chunks still missing
    t_app, t_dep, D0 = res["t_app"], res["t_dep"], res["D0"]

    med_app, med_dep = nanmedian(t_app, axis=1), nanmedian(t_dep, axis=1)
    fit_mask = eps <= cfg.fit_max_eps
    fit = loglog_fit(eps[fit_mask], med_dep[fit_mask], groups=t_dep[fit_mask].T if B > 1 else None)

    log("paper comparison: first-order scheme (Euler, dt = 0.1) against converged RK4 ...")
    paper = _paper_comparison(x0[:1], cfg, dtype)

    log("figures and summary ...")
    from .. import plotting

    plotting.departure_vs_eps(
        eps,
        t_dep,
        med_dep,
        med_app,
        fit,
        os.path.join(out_dir, "departure_vs_eps.png"),
        delta=cfg.delta,
        metric=cfg.metric,
        paper_prefactor=PAPER_PREFACTOR,
    )
    plotting.departure_phases(
        eps, ts, D0, t_app, t_dep, os.path.join(out_dir, "phases.png"), delta=cfg.delta
    )
    write_npz(
        os.path.join(out_dir, "departure_time.npz"),
        eps=eps,
        t_approach=t_app,
        t_departure=t_dep,
        ts=ts,
        D_first_ic=D0,
    )
    _write_csv(os.path.join(out_dir, "departure_time.csv"), eps, med_app, med_dep, t_dep)
    never_app = int(np.sum(np.isinf(t_app)))
    never = int(np.sum(np.isinf(t_dep) & np.isfinite(t_app)))
    nan = int(np.sum(np.isnan(t_dep)))
    summary = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg_print,
        "x0_source": "file" if cfg.x0 is not None else f"uniform seed {cfg.seed}",
        "eps": eps,
        "t_approach": med_app,
        "t_departure": med_dep,
        "slope": fit["slope"],
        "prefactor": fit["prefactor"],
        "fit": fit,
        "fit_range": [float(eps[fit_mask].min()), float(eps[fit_mask].max())]
        if fit_mask.any()
        else None,
        "paper_prefactor": PAPER_PREFACTOR,
        "paper_prediction": {f"{e:g}": PAPER_PREFACTOR / e for e in cfg.paper_eps},
        "paper_scheme_comparison": paper,
        "t_departure_median_all_runs": np.median(np.where(np.isnan(t_dep), np.inf, t_dep), axis=1),
        "departed_fraction": np.mean(np.isfinite(t_dep), axis=1),
        "runs_total": int(t_dep.size),
        "runs_never_approached": never_app,
        "runs_never_departed": never,
        "runs_nonfinite": nan,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": "t_approach / t_departure: medians over the initial conditions whose run "
        "approached / departed before t1 (null: none did); "
        "t_departure_median_all_runs counts 'never' as infinity (null = infinite); "
        "metric " + cfg.metric + "; fit T_dep = prefactor · eps^slope over "
        "fit_range with a bootstrap 95 % interval.",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(f"done in {summary['wall_seconds']} s: slope {fit['slope']}, prefactor {fit['prefactor']}")
    return summary


def _paper_comparison(x0, cfg: Config, dtype) -> dict:
    """Departure times on one set of tokens: the paper's scheme (forward Euler, dt = 0.1,
    which is what its 'RK4' computes; docs/theory.md, 'Numerical schemes') against RK4 at
    dt and dt/2."""
    eps = np.asarray(cfg.paper_eps, np.float64)
    out: dict[str, Any] = {"eps": eps}
    for label, solver, dt in (
        ("paper_euler_dt0.1", "euler", 0.1),
        ("rk4_dt", "rk4", cfg.dt),
        ("rk4_dt_half", "rk4", cfg.dt / 2),
    ):
        a, dp, *_ = departure_times(x0, eps, cfg, solver=solver, dt=dt, dtype=dtype)
        out[label] = {"t_approach": a[:, 0], "t_departure": dp[:, 0]}
    conv, paper = out["rk4_dt_half"]["t_departure"], out["paper_euler_dt0.1"]["t_departure"]
    with np.errstate(all="ignore"):
        out["relative_difference_paper_vs_converged"] = (paper - conv) / conv
        out["rk4_dt_vs_half_relative"] = (out["rk4_dt"]["t_departure"] - conv) / conv
    return out


def _write_csv(path, eps, med_app, med_dep, t_dep):
    from .._base import write_atomic

    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(
                "eps,t_approach_median,t_departure_median,"
                + ",".join(f"t_departure_ic{i}" for i in range(t_dep.shape[1]))
                + "\n"
            )
            for k in range(eps.size):
                row = [eps[k], med_app[k], med_dep[k], *t_dep[k]]
                fh.write(",".join(f"{v:.6g}" for v in row) + "\n")

    write_atomic(path, w)
