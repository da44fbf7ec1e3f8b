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

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from .._fields import RescaledField
from .._io import check_output_dir, write_json, write_npz
from .._meanfield import InitialMeasure, measure_divergence
from .._simulate import simulate
from ._common import config_key, loglog_fit, nanmedian
from .mean_field import _lora_part

NAME = "mean-field-large"
DESCRIPTION = (
    "mean-field limit at large n: ladder to n = 2^16 (sliced W2, blockwise "
    "kernel), departure-time prefactor in W2 against n over several seeds"
)
CLI_OPTIONS = ()

DEFAULTS = dict(
    d=2,
    low=-1.0,
    high=1.0,
    beta=1.0,
    dt=0.2,
    ladder_seed=0,
    ladder_ns=[2**k for k in range(6, 17)],
    ladder_ts=[0.0, 2.0, 4.0, 8.0],
    ladder_dtype="float32",
    block=1024,
    n_projections=256,
    fit_max_frac=0.125,
    dep_ns=[128, 256, 512],
    dep_seeds=5,
    eps=[0.1, 0.05, 0.025],
    lora_t1=100.0,
    lora_dt=0.1,
    lora_every=1.0,
    t_ref=20.0,
    delta=0.1,
)
QUICK = dict(
    ladder_ns=[16, 32, 64, 128],
    ladder_ts=[0.0, 2.0],
    block=32,
    n_projections=64,
    fit_max_frac=0.5,
    dep_ns=[16, 32],
    dep_seeds=2,
    eps=[0.1, 0.05],
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
_DEP_KEYS = ("low", "high", "beta", "eps", "lora_t1", "lora_dt", "lora_every", "t_ref", "delta")


def _cached(path, compute):
    """The arrays in `path` if it exists, else `compute()` written there atomically."""
    if os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    out = compute()
    write_npz(path, **out)
    return out


def _ladder(cfg, ckpt, log):
    d, dtype = cfg["d"], jnp.dtype(cfg["ladder_dtype"])
    ns, ts = [int(n) for n in cfg["ladder_ns"]], np.asarray(cfg["ladder_ts"], np.float64)
    field = RescaledField(
        d=d, beta=cfg["beta"], dtype=dtype, kernel="blockwise", block=cfg["block"]
    )
    measure = InitialMeasure.uniform(d, cfg["low"], cfg["high"])
    x_all = measure.sample(jax.random.key(cfg["ladder_seed"]), ns[-1], dtype)
    tag = config_key(cfg, _LADDER_KEYS)
    runs, seconds = {}, {}
    for n in ns:

        def solve(n=n):
            t0 = time.perf_counter()
            sol = simulate(field, x_all[:n], float(ts[-1]), ts=ts, dt=cfg["dt"], dtype=dtype)
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
                        n_projections=cfg["n_projections"],
                    )
                    for n in ns[:-1]
                ]
            )
        }  # (len(ns) − 1, T)

    sliced = _cached(
        os.path.join(ckpt, f"sliced-{tag}-N{N}-from{ns[0]}-{len(ns)}-p{cfg['n_projections']}.npz"),
        distances,
    )["sliced"]
    fits = {
        f"{t:g}": loglog_fit(
            np.asarray(ns[:-1], np.float64)[np.asarray(ns[:-1]) <= cfg["fit_max_frac"] * N],
            sliced[np.asarray(ns[:-1]) <= cfg["fit_max_frac"] * N, k],
        )
        for k, t in enumerate(ts)
    }
    return dict(ns=ns, ts=ts, N=N, sliced=sliced, fits=fits, seconds=seconds)


def _departures(cfg, ckpt, dtype, log):
    eps = np.sort(np.asarray(cfg["eps"], np.float64))[::-1]
    ns, S = [int(n) for n in cfg["dep_ns"]], int(cfg["dep_seeds"])
    t_dep = np.full((len(ns), S, eps.size), np.nan)
    t_dep_tok = np.full_like(t_dep, np.nan)
    for i, n in enumerate(ns):
        for s in range(S):

            def solve(n=n, s=s):
                sub = {**cfg, "lora_ns": [n], "lora_seed": s}
                r = _lora_part(sub, dtype, lambda msg: None)
                return {"t_dep_W": r["t_dep_W"][0], "t_dep_tok": r["t_dep_tok"][0]}

            tag = config_key(cfg, _DEP_KEYS, parts=(n, s, str(jnp.dtype(dtype))))
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
    return dict(eps=eps, ns=ns, t_dep=t_dep, t_dep_tok=t_dep_tok, prefactor=c, stats=stats)


def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown option(s) for {NAME}: {', '.join(sorted(unknown))}")
    cfg = {**DEFAULTS, **(QUICK if quick else {}), **overrides}
    out_dir = check_output_dir(out_dir)
    ckpt = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()

    log(
        f"[1/2] ladder d = {cfg['d']}: n = {cfg['ladder_ns'][0]} … {cfg['ladder_ns'][-1]} "
        f"({cfg['ladder_dtype']}, blockwise kernel), t ∈ {cfg['ladder_ts']} ..."
    )
    lad = _ladder(cfg, ckpt, log)
    write_npz(
        os.path.join(out_dir, "ladder.npz"),
        ns=np.asarray(lad["ns"]),
        ts=lad["ts"],
        sliced=lad["sliced"],
    )
    log(
        f"[2/2] departure prefactor: n ∈ {cfg['dep_ns']}, {cfg['dep_seeds']} seeds, "
        f"ε ∈ {cfg['eps']} ..."
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
        "config": cfg,
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
    from ._mean_field_plots import plot_large

    plot_large(out_dir, cfg, lad, dep)
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
