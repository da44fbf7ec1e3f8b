"""Wall time of the mean-field distances: one exact W2 (optimal assignment) and one
Sinkhorn divergence (OTT-JAX), between two clouds of n i.i.d. points of U[-1, 1]^d.

    python benchmarks/meanfield_distances.py --exact 4096 --sinkhorn 65536

Compile time is excluded (compiled ahead of time, reported apart); each time is the
median of `--repeat` calls, measured with `block_until_ready`. `--kind ot` (default)
times one entropic OT, i.e. one Sinkhorn solve; `--kind divergence` the debiased
divergence (three solves).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import jaxattn as ja  # noqa: E402


def _timed(fn, args, repeat):
    """Median time of `repeat` calls of `fn` on `args`, compiled ahead of time (compile
    excluded without running the computation once more: at n = 65,536 a warm-up call
    would double the cost of the measurement); also returns the compile time."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    times = []
    value = None
    for _ in range(repeat):
        t = time.perf_counter()
        value = compiled(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], float(value), compile_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exact", type=int, nargs="*", default=[4096])
    p.add_argument("--sinkhorn", type=int, nargs="*", default=[65536])
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--kind",
        default="ot",
        choices=["ot", "divergence"],
        help="ot: one entropic OT (one Sinkhorn solve); divergence: the debiased "
        "Sinkhorn divergence (three solves)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    mu = ja.InitialMeasure.uniform(a.d, -1.0, 1.0)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.default_backend()}",
        "d": a.d,
        "exact": {},
        "sinkhorn": {},
    }

    def clouds(n, dtype, k):
        return mu.sample(jax.random.key(2 * k), n, dtype), mu.sample(
            jax.random.key(2 * k + 1), n, dtype
        )

    for n in a.exact:
        t, v, _ = _timed(ja.wasserstein2, clouds(n, jnp.float64, 0), a.repeat)
        res["exact"][n] = {"seconds": t, "w2": v, "dtype": "float64"}
        print(f"exact W2, n = {n}: {t:.3f} s (W2 = {v:.5f})", flush=True)
    dtype = jnp.dtype(a.dtype)
    for n in a.sinkhorn:
        solver = ja.entropic_ot if a.kind == "ot" else ja.sinkhorn_divergence
        t, v, c = _timed(
            lambda x, y: solver(x, y, epsilon=a.epsilon, threshold=a.threshold),
            clouds(n, dtype, 0),
            a.repeat,
        )
        res["sinkhorn"][n] = {
            "seconds": t,
            "compile_seconds": c,
            "value": v,
            "kind": a.kind,
            "epsilon": a.epsilon,
            "threshold": a.threshold,
            "dtype": a.dtype,
        }
        label = "entropic OT (one Sinkhorn)" if a.kind == "ot" else "Sinkhorn divergence"
        print(
            f"{label}, n = {n} ({a.dtype}, eps = {a.epsilon}): {t:.2f} s, compile "
            f"{c:.1f} s (value {v:.4g}{'; NaN: not converged' if v != v else ''})",
            flush=True,
        )
    if a.out:
        from jaxattn._base.io import write_json

        write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
