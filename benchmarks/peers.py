"""jaxattn against its peers on the same work (issue 4), side by side in one run.

Work: rescaled dynamics (SPEC §1.2), Q = K = V = I, β = 1, classical RK4 with the same
number of fixed steps, float32, tokens U[−1, 1]^d. Compile / warm-up is excluded and
reported separately; every timing is the best of `--repeat` calls after a first call.

Peers:
  numpy      vectorised NumPy RK4 (matrix exponential by scipy.linalg.expm per stage)
  torchdiffeq  PyTorch + torchdiffeq `odeint(method="rk4")` on the CPU (optional)
  diffrax    a hand-written diffrax solve of the same field (plain function, RK4 tableau)
  paper      the research code's per-step algorithm as SPEC §6 describes it (one
             expm(tV) per token pair and stage, Python loops, attention frozen within a
             step): re-implemented here from that description — not the original code —
             timed for a few steps at n = 50 and extrapolated.

Usage: python benchmarks/peers.py [--quick] [--repeat 3]
Prints ms/step, ratios (peer time / jaxattn time: > 1 means jaxattn is faster), achieved
GFLOP/s against a measured float32 matmul peak, and peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time

import numpy as np

try:  # optional peers
    import torch
    import torchdiffeq
except ImportError:  # pragma: no cover
    torch = torchdiffeq = None


def best_of(fn, repeat):
    fn()  # compile / warm-up
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def first_call(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- NumPy RK4
def numpy_rk4(x0, dt, steps):
    from scipy.linalg import expm

    d = x0.shape[1]
    V = np.eye(d, dtype=np.float32)

    def f(t, z):
        x = z @ expm(t * V).T.astype(np.float32)
        u = x @ x.T
        u = u - u.max(axis=1, keepdims=True)
        w = np.exp(u)
        w /= w.sum(axis=1, keepdims=True)
        vz = z @ V.T
        return w @ vz - vz

    z, t = x0.copy(), 0.0
    for _ in range(steps):
        k1 = f(t, z)
        k2 = f(t + dt / 2, z + dt / 2 * k1)
        k3 = f(t + dt / 2, z + dt / 2 * k2)
        k4 = f(t + dt, z + dt * k3)
        z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
    return z


# ---------------------------------------------------------------- torchdiffeq
def torch_solver(x0, dt, steps):
    d = x0.shape[1]
    V = torch.eye(d)

    def f(t, z):
        x = z @ torch.linalg.matrix_exp(t * V).T
        w = torch.softmax(x @ x.T, dim=1)
        vz = z @ V.T
        return w @ vz - vz

    z0 = torch.from_numpy(x0)
    ts = torch.tensor([0.0, dt * steps])

    def run():
        with torch.no_grad():
            return torchdiffeq.odeint(f, z0, ts, method="rk4", options={"step_size": dt})

    return run


# ---------------------------------------------------------------- hand-written diffrax
def diffrax_solver(x0, dt, steps):
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    tab = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]), b_error=np.zeros(4),
        c=np.array([0.5, 0.5, 1.0]))

    class _RK4(diffrax.AbstractERK):
        tableau = tab
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    d = x0.shape[1]

    def f(t, z, args):
        V = jnp.eye(d, dtype=z.dtype)
        x = z @ jsl.expm(t * V).T
        w = jax.nn.softmax(x @ x.T, axis=1)
        vz = z @ V.T
        return w @ vz - vz

    z0 = jnp.asarray(x0)

    @eqx.filter_jit
    def solve(z0):
        return diffrax.diffeqsolve(diffrax.ODETerm(f), _RK4(), 0.0, dt * steps, dt, z0,
                                   stepsize_controller=diffrax.ConstantStepSize(),
                                   saveat=diffrax.SaveAt(t1=True), max_steps=steps + 1).ys

    return lambda: solve(z0).block_until_ready()


def jaxattn_solver(x0, dt, steps, **field_kw):
    import jax.numpy as jnp

    import jaxattn as ja

    d = x0.shape[1]
    field = ja.RescaledField(d=d, dtype=jnp.float32, **field_kw)
    z0 = jnp.asarray(x0)
    t1 = dt * steps
    return lambda: ja.simulate(field, z0, t1, dt=dt, ts=[t1]).xs.block_until_ready()


# ---------------------------------------------------------------- paper's algorithm
def paper_step_time(n=50, d=2, dt=0.1, steps=2):
    """One step of the SPEC §6 algorithm: for each stage and token i, for each pair
    (j, k), a fresh expm(tV) (2n³ per step over the 4 identical stages)."""
    from scipy.linalg import expm

    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, size=(n, d))
    V = np.eye(d)
    t0 = time.perf_counter()
    t = 0.0
    for _ in range(steps):
        incr = np.zeros_like(z)
        for i in range(n):
            logits = np.empty(n)
            for j in range(n):
                xi = expm(t * V) @ z[i]
                xj = expm(t * V) @ z[j]
                logits[j] = xi @ xj
            w = np.exp(logits - logits.max())
            w /= w.sum()
            incr[i] = sum(w[j] * (V @ (z[j] - z[i])) for j in range(n))
        z = z + dt * incr  # all four "RK4" stages are equal: forward Euler
        t += dt
    return (time.perf_counter() - t0) / steps


def matmul_peak(size=2048, repeat=5):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    sec = best_of(lambda: mm(a).block_until_ready(), repeat)
    return 2 * size**3 / sec / 1e9


def flops_per_step(n, d):
    # 4 stages × (scores 2n²d + weighted sum 2n²d + softmax ~5n²); exp counted as 1 flop.
    return 4 * (4 * n * n * d + 5 * n * n)


def big_step_subprocess(n=65536, d=3):
    code = f"""
import resource, time, jax, jax.numpy as jnp, jaxattn as ja
x0 = jax.random.uniform(jax.random.key(0), ({n}, {d}), jnp.float32, -1.0, 1.0)
f = ja.RescaledField(d={d}, dtype=jnp.float32)
run = lambda: ja.simulate(f, x0, 0.01, dt=0.01).xs.block_until_ready()
t0 = time.perf_counter(); run(); first = time.perf_counter() - t0
t0 = time.perf_counter(); run(); step = time.perf_counter() - t0
print(first, step, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return None
    first, step, rss = map(float, r.stdout.split())
    return first, step, rss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-big", action="store_true", help="skip the n = 65536 step")
    a = p.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
          f"python {platform.python_version()}; torch: "
          f"{torch.__version__ if torch else 'not installed'}")
    peak = matmul_peak()
    print(f"measured float32 matmul peak (2048², jax): {peak:.1f} GFLOP/s\n")
    sizes = [(50, 2), (1000, 2), (50, 64), (1000, 64)] if a.quick else [
        (50, 2), (1000, 2), (4096, 2), (50, 64), (1000, 64), (4096, 64)]
    dt = 0.01
    hdr = (f"{'n':>5} {'d':>3} {'steps':>5} | {'jaxattn ms/step':>15} {'compile s':>9} "
           f"{'GFLOP/s':>8} {'%peak':>6} | {'numpy':>7} {'torchdiffeq':>11} {'diffrax':>8}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for n, d in sizes:
        steps = 50 if n <= 1000 else 10
        x0 = np.random.default_rng(0).uniform(-1, 1, size=(n, d)).astype(np.float32)
        ja_fn = jaxattn_solver(x0, dt, steps)
        comp = first_call(ja_fn)
        t_ja = best_of(ja_fn, a.repeat) / steps
        comp -= t_ja * steps
        t_np = best_of(lambda: numpy_rk4(x0, dt, steps), 1) / steps
        t_th = best_of(torch_solver(x0, dt, steps), a.repeat) / steps if torch else np.nan
        t_dx = best_of(diffrax_solver(x0, dt, steps), a.repeat) / steps
        gf = flops_per_step(n, d) / t_ja / 1e9
        rows.append((n, d, t_ja, t_np, t_th, t_dx))
        print(f"{n:>5} {d:>3} {steps:>5} | {1e3 * t_ja:>15.3f} {comp:>9.2f} {gf:>8.2f} "
              f"{100 * gf / peak:>5.1f}% | {t_np / t_ja:>6.2f}x {t_th / t_ja:>10.2f}x "
              f"{t_dx / t_ja:>7.2f}x")
    print("(ratios = peer time / jaxattn time; > 1 means jaxattn is faster)\n")

    # Batch sweep: 256 simulations, n = 64, d = 8, 200 steps.
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    B, n, d, steps = 256, 64, 8, 200
    xb = np.random.default_rng(1).uniform(-1, 1, size=(B, n, d)).astype(np.float32)
    field = ja.RescaledField(d=d, dtype=jnp.float32)
    batch_fn = lambda: ja.simulate(field, jnp.asarray(xb), steps * dt, dt=dt,  # noqa: E731
                                   ts=[steps * dt]).xs.block_until_ready()
    t_batch = best_of(batch_fn, max(1, a.repeat - 1))
    line = f"batch sweep {B}×(n={n}, d={d}, {steps} RK4 steps): jaxattn {t_batch:.2f} s"
    if torch:
        k = 16
        t_loop = best_of(lambda: [torch_solver(xb[i], dt, steps)() for i in range(k)], 1)
        t_loop *= B / k
        line += (f"; torchdiffeq Python loop {t_loop:.1f} s (16 runs timed, ×16) → "
                 f"{t_loop / t_batch:.1f}x")
    print(line)

    t_paper = paper_step_time()
    x0 = np.random.default_rng(0).uniform(-1, 1, size=(50, 2)).astype(np.float32)
    t_ja50 = best_of(jaxattn_solver(x0, 0.1, 400), a.repeat) / 400
    print(f"paper's algorithm (SPEC §6, re-implemented), n = 50: {t_paper:.2f} s/step "
          f"(2 steps timed) → a 400-step run ≈ {400 * t_paper / 60:.1f} min; jaxattn "
          f"{1e3 * t_ja50:.3f} ms/step → {t_paper / t_ja50:,.0f}x")

    if not a.skip_big:
        big = big_step_subprocess()
        if big:
            print(f"n = 65536, d = 3, one RK4 step (blockwise, float32): first call "
                  f"{big[0]:.1f} s, step {big[1]:.1f} s, peak RSS {big[2]:.2f} GB")
    print(f"peak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
