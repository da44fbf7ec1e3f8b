"""Per-step time of `jaxattn.simulate` (rescaled dynamics, Q = K = V = I, classical RK4).

Usage: python benchmarks/simulate_step.py [--n 1000] [--d 2] [--steps 200] [--dtype float32]

Compile time is measured separately (first call) from the steady-state time (best of
`--repeat` further calls, each `block_until_ready`). Prints ms/step.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    if a.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jaxattn as ja

    dtype = jnp.dtype(a.dtype)
    x0 = jax.random.uniform(jax.random.key(0), (a.n, a.d), dtype, -1.0, 1.0)
    field = ja.RescaledField(d=a.d, dtype=dtype)
    dt = 0.01
    t1 = a.steps * dt
    run = lambda: ja.simulate(field, x0, t1, solver="rk4", dt=dt, ts=[t1])
    t0 = time.perf_counter()
    run().xs.block_until_ready()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        run().xs.block_until_ready()
        best = min(best, time.perf_counter() - t0)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device)"
    )
    print(
        f"n={a.n} d={a.d} {a.dtype} rk4 steps={a.steps}: first call {first:.2f} s "
        f"(compile ≈ {first - best:.2f} s), {1e3 * best / a.steps:.3f} ms/step"
    )


if __name__ == "__main__":
    main()
