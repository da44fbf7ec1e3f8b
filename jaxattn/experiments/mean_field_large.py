"""Mean-field limit at large n: a ladder to n = 2¹⁶ and the departure-time prefactor in W₂
against n over several seeds.

The companion of `mean-field` for the two questions that need more compute than its
default run:

1. **A ladder to n = 2¹⁶.** One nested sample of μ₀ (uniform on `[−1, 1]^d`, rescaled
   dynamics, Q = K = V = I, β = 1), runs at n = 2⁶ … 2¹⁶ with the blockwise attention
   kernel in float32 (memory O(n·block), not O(n²)), and the sliced W₂ of each run to the
   largest one at each saved time; log-log slope over n ≤ N/8.
2. **Departure prefactor against n.** The LoRA departure in W₂ (`Ṽ = diag(1, 1 − ε)`,
   departure = first time after the approach at which `W₂(μ̃_t, μ_{T_ref}) > δ`) for
   several independent samples at each n; `c = T_dep·ε` per seed and ε, mean ± sd per n.
   If T_dep ≈ c/ε survives n → ∞, c settles as n grows.

Every rung and every (n, seed) is checkpointed in `OUT/checkpoints/` as it finishes
(atomic `.npz`, keyed by a hash of the settings that change it): a killed run resumes
where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import Departures, InitialMeasure, LargeLadder, measure_divergence
from .._base import ExperimentConfig, check_output_dir, write_json, write_npz
from .._model import RescaledField
from .._simulate import simulate
from ._common import config_key, in_float64, loglog_fit, nanmedian
from .mean_field import Config as MeanFieldConfig, lora_departures

NAME = "mean-field-large"
DESCRIPTION = (
    "mean-field limit at large n: ladder to n = 2^16 (sliced W2, blockwise "
    "kernel), departure-time prefactor in W2 against n over several seeds"
)
CLI_OPTIONS = ()


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of `mean-field-large`: the measure and dynamics, the ladder (part 1), the
    departure runs (part 2)."""

    d: int = 2  #: token dimension
    low: float = -1.0  #: μ₀ uniform on [low, high]^d
    high: float = 1.0  #: upper bound of μ₀'s support
    beta: float = 1.0  #: inverse temperature β
    dt: float = 0.2  #: step of the ladder solves
    ladder_seed: int = 0  #: key of the ladder's sample of μ₀
    ladder_ns: tuple[int, ...] = tuple(2**k for k in range(6, 17))  #: n of the ladder
    ladder_ts: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)  #: saved times of the ladder
    ladder_dtype: Literal["float32", "float64"] = "float32"  #: dtype of the ladder runs
    block: int = 1024  #: block size of the blockwise kernel
    n_projections: int = 256  #: projections of the sliced W₂
    fit_max_frac: float = 0.125  #: slope fitted over n ≤ fit_max_frac·N
    dep_ns: tuple[int, ...] = (128, 256, 512)  #: n of the departure runs
    dep_seeds: int = 5  #: independent samples of μ₀ per n
    eps: tuple[float, ...] = (0.1, 0.05, 0.025)  #: LoRA sizes ε
    lora_t1: float = 100.0  #: end time of the LoRA runs
    lora_dt: float = 0.1  #: RK4 step of the LoRA runs
    lora_every: float = 1.0  #: saved-time spacing of the LoRA runs
    t_ref: float = 20.0  #: time of the reference clusters (a saved time)
    delta: float = 0.1  #: departure threshold in W₂

    QUICK: ClassVar[dict[str, Any]] = dict(
        ladder_ns=(16, 32, 64, 128),
        ladder_ts=(0.0, 2.0),
        block=32,
        n_projections=64,
        fit_max_frac=0.5,
        dep_ns=(16, 32),
        dep_seeds=2,
        eps=(0.1, 0.05),
        lora_t1=30.0,
    )


_LADDER_KEYS = (
    "d",
    "low",
    "high",
    "beta",
    "dt",
    "ladder_seed",
    "ladder_ts",
    "ladder_dtype",
    "block",
)
# The options that change a departure: also those passed on to `mean_field.lora_departures`.
_DEP_KEYS = ("low", "high", "beta", "eps", "lora_t1", "lora_dt", "lora_every", "t_ref", "delta")


def _cached(path, compute):
    """The arrays in `path` if it exists, else `compute()` written there atomically."""
    if os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    out = compute()
    write_npz(path, **out)
    return out


def _ladder(cfg: Config, ckpt: str, log) -> LargeLadder:
    d, dtype = cfg.d, jnp.dtype(cfg.ladder_dtype)
    ns, ts = list(cfg.ladder_ns), np.asarray(cfg.ladder_ts, np.float64)
    field = RescaledField(d=d, beta=cfg.beta, dtype=dtype, kernel="blockwise", block=cfg.block)
    measure = InitialMeasure.uniform(d, cfg.low, cfg.high)
    x_all = measure.sample(jax.random.key(cfg.ladder_seed), ns[-1], dtype)
    tag = config_key(cfg.to_dict(), _LADDER_KEYS)
    runs: dict[int, np.ndarray] = {}
    seconds: dict[int, float] = {}
    for n in ns:

        def solve(n=n):
            t0 = time.perf_counter()
            sol = simulate(field, x_all[:n], float(ts[-1]), ts=ts, dt=cfg.dt, dtype=dtype)
            if not sol.ok:
                raise RuntimeError(f"the solve at n = {n} failed: {'; '.join(sol.messages())}")
            return {"xs": np.asarray(sol.xs), "seconds": np.asarray(time.perf_counter() - t0)}

        r = _cached(os.path.join(ckpt, f"ladder-{tag}-n{n}.npz"), solve)
        runs[n], seconds[n] = np.asarray(r["xs"], np.float64), float(r["seconds"])
        log(f"  ladder n = {n}: solved in {seconds[n]:.1f} s")
    N = ns[-1]
    key = jax.random.key(12345)

    def distances():  # minutes at N = 2¹⁶ (sorting N-point projections): checkpointed too
        return {
            "sliced": np.stack(
                [
                    measure_divergence(
                        runs[n],
                        runs[N],
                        distance="sliced",
                        key=key,
                        n_projections=cfg.n_projections,
                    )
                    for n in ns[:-1]
                ]
            )
        }  # (len(ns) − 1, T)

    sliced = _cached(
        os.path.join(ckpt, f"sliced-{tag}-N{N}-from{ns[0]}-{len(ns)}-p{cfg.n_projections}.npz"),
        distances,
    )["sliced"]
    fits = {
        f"{t:g}": loglog_fit(
            np.asarray(ns[:-1], np.float64)[np.asarray(ns[:-1]) <= cfg.fit_max_frac * N],
            sliced[np.asarray(ns[:-1]) <= cfg.fit_max_frac * N, k],
        )
        for k, t in enumerate(ts)
    }
    return LargeLadder(ns=ns, ts=ts, N=N, sliced=sliced, fits=fits, seconds=seconds)


def _departures(cfg: Config, ckpt: str, dtype, log) -> Departures:
    eps = np.sort(np.asarray(cfg.eps, np.float64))[::-1]
    ns, S = list(cfg.dep_ns), cfg.dep_seeds
    t_dep = np.full((len(ns), S, eps.size), np.nan)
    t_dep_tok = np.full_like(t_dep, np.nan)
    for i, n in enumerate(ns):
        for s in range(S):

            def solve(n=n, s=s):
                sub = MeanFieldConfig.build(lora_ns=(n,), **{k: cfg[k] for k in _DEP_KEYS})
                r = lora_departures(sub, dtype, lambda msg: None, seed=s)
                return {"t_dep_W": r["t_dep_W"][0], "t_dep_tok": r["t_dep_tok"][0]}

            tag = config_key(cfg.to_dict(), _DEP_KEYS, parts=(n, s, str(jnp.dtype(dtype))))
            t0 = time.perf_counter()
            r = _cached(os.path.join(ckpt, f"departure-{tag}.npz"), solve)
            t_dep[i, s], t_dep_tok[i, s] = r["t_dep_W"], r["t_dep_tok"]
            log(
                f"  departure n = {n}, seed {s} ({time.perf_counter() - t0:.1f} s): "
                + ", ".join(f"ε={e:g}: {t:.0f}" for e, t in zip(eps, t_dep[i, s]))
            )
    c = t_dep * eps  # prefactor per (n, seed, ε); inf where no departure was seen
    stats = []
    for i, n in enumerate(ns):
        fin = c[i][np.isfinite(c[i])]
        stats.append(
            {
                "n": n,
                "prefactor_mean": float(fin.mean()) if fin.size else None,
                "prefactor_sd": float(fin.std(ddof=1)) if fin.size > 1 else None,
                "departures_seen": int(fin.size),
                "runs": int(c[i].size),
                "slope_over_eps": loglog_fit(eps, nanmedian(t_dep[i], axis=0))["slope"],
            }
        )
    return Departures(eps=eps, ns=ns, t_dep=t_dep, t_dep_tok=t_dep_tok, prefactor=c, stats=stats)


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the large-n ladder and the departure prefactors (module docstring) and write
    `large_n.png`, `ladder.npz`, `departures.npz` and `summary.json` into `out_dir`; return
    the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    ckpt = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()

    log(
        f"[1/2] ladder d = {cfg.d}: n = {cfg.ladder_ns[0]} … {cfg.ladder_ns[-1]} "
        f"({cfg.ladder_dtype}, blockwise kernel), t ∈ {list(cfg.ladder_ts)} ..."
    )
    lad = _ladder(cfg, ckpt, log)
    write_npz(
        os.path.join(out_dir, "ladder.npz"),
        ns=np.asarray(lad["ns"]),
        ts=lad["ts"],
        sliced=lad["sliced"],
    )
    log(
        f"[2/2] departure prefactor: n ∈ {list(cfg.dep_ns)}, {cfg.dep_seeds} seeds, "
        f"ε ∈ {list(cfg.eps)} ..."
    )
    dep = _departures(cfg, ckpt, dtype, log)
    write_npz(
        os.path.join(out_dir, "departures.npz"),
        eps=dep["eps"],
        ns=np.asarray(dep["ns"]),
        t_departure_w2=dep["t_dep"],
        t_departure_token=dep["t_dep_tok"],
    )
    summary = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg.to_dict(),
        "ladder": {
            "ns": lad["ns"],
            "reference_n": lad["N"],
            "ts": lad["ts"],
            "sliced_w2_vs_largest": lad["sliced"],
            "fits": lad["fits"],
            "solve_seconds": lad["seconds"],
        },
        "departure": {
            "eps": dep["eps"],
            "ns": dep["ns"],
            "t_departure_w2": dep["t_dep"],
            "t_departure_token": dep["t_dep_tok"],
            "prefactor_by_n": dep["stats"],
        },
    }
    log("figures and summary ...")
    from .. import plotting

    plotting.mean_field_large_n(
        lad,
        dep,
        os.path.join(out_dir, "large_n.png"),
        d=cfg.d,
        fit_max_frac=cfg.fit_max_frac,
        ladder_dtype=cfg.ladder_dtype,
        dep_seeds=cfg.dep_seeds,
        delta=cfg.delta,
    )
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    summary["notes"] = (
        "sliced_w2_vs_largest[i, k]: sliced W2 (fixed projections) between the run at "
        "ns[i] and the largest run, at ts[k]; the samples are nested. Slope fitted over "
        "n ≤ fit_max_frac·N. prefactor = T_dep·ε per seed and ε (departures not seen "
        "before lora_t1 are left out; departures_seen counts the rest)."
    )
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(f"done in {summary['wall_seconds']} s")
    return summary
