"""The model family (`TransformerField`) against the same maths hand-written in
`jit` + `lax.scan` (classical RK4), per variant; both save only the final state.

Usage: PYTHONPATH=. python benchmarks/family.py [--n 256] [--d 16] [--steps 100]
       [--dtype float32] [--repeat 5]

Variants: (1) four heads, causal mask with ALiBi slopes, pre-LN; (2) one head, post-LN
(beside `SphereField`, the classic field of the same maths); (3) two heads, peri-LN with
a GELU feed-forward term and two layers (a layer time halfway, on the step grid).
The two sides of a row are timed interleaved, best of `--repeat` calls each, compile
excluded; ratio = hand-written time / jaxattn time (> 1: jaxattn faster).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _unit(s):
    return s / jnp.linalg.norm(s, axis=-1, keepdims=True)


def _heads(y, Q, K, V, beta, lam):
    """Mean over heads of causal softmax attention with ALiBi (lam None: no mask)."""
    n = y.shape[0]
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    out = 0.0
    for h in range(Q.shape[0]):
        s = beta * (y @ Q[h].T) @ (y @ K[h].T).T
        if lam is not None:
            s = jnp.where(j <= i, s - lam[h] * (i - j), -jnp.inf)
        out = out + jax.nn.softmax(s, axis=-1) @ (y @ V[h].T)
    return out / Q.shape[0]


def _scan_rk4(rhs, x0, dt, steps, *, at_step_start=False):
    """The hand-written peer: `jit` of a `lax.scan` of RK4 steps (time-aware rhs);
    `at_step_start`: every stage at the step's start time (layers that change on the
    grid: a step stays in its layer)."""

    @jax.jit
    def solve(x0):
        def step(carry, k):
            x = carry
            t = k * dt
            half, end = (t, t) if at_step_start else (t + dt / 2, t + dt)
            k1 = rhs(t, x)
            k2 = rhs(half, x + dt / 2 * k1)
            k3 = rhs(half, x + dt / 2 * k2)
            k4 = rhs(end, x + dt * k3)
            return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

        out, _ = jax.lax.scan(step, x0, jnp.arange(steps, dtype=x0.dtype))
        return out

    return solve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    if a.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jaxattn as ja

    dtype = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    n, d, dt = a.n, a.d, 0.01
    t1 = a.steps * dt

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-1]), dtype)

    x0 = _unit(jnp.asarray(rng.normal(size=(n, d)), dtype))
    beta = 2.0
    rows = []

    # (1) four heads, causal + ALiBi, pre-LN
    Q, K, V = w(4, d, d), w(4, d, d), w(4, d, d)
    lam = jnp.asarray([0.5, 0.25, 0.125, 0.0], dtype)
    fam = ja.TransformerField(Q, K, V, beta=beta, alibi=lam, norm="pre", dtype=dtype)
    hand = _scan_rk4(lambda t, x: _heads(_unit(x), Q, K, V, beta, lam), x0, dt, a.steps)
    rows.append(("4 heads, causal + ALiBi, pre-LN", fam, hand, None))

    # (2) one head, post-LN
    Q1, K1, V1 = w(d, d), w(d, d), w(d, d)
    post = ja.TransformerField(Q1, K1, V1, beta=beta, norm="post", dtype=dtype)

    def post_rhs(t, x):
        a_ = _heads(x, Q1[None], K1[None], V1[None], beta, None)
        return a_ - jnp.sum(x * a_, axis=-1, keepdims=True) * x

    hand2 = _scan_rk4(post_rhs, x0, dt, a.steps)
    sphere = ja.SphereField(Q1, K1, V1, beta=beta, dtype=dtype)
    rows.append(("1 head, post-LN", post, hand2, sphere))

    # (3) two heads, peri-LN, GELU feed-forward, two layers switching at t1/2
    L = 2
    Q3, K3, V3 = w(L, 2, d, d), w(L, 2, d, d), w(L, 2, d, d)
    W1, W2 = w(L, 4 * d, d), w(L, d, 4 * d)
    ffn = ja.FeedForward(W1, W2, dtype=dtype)
    half = (a.steps // 2) * dt
    peri = ja.TransformerField(
        Q3, K3, V3, beta=beta, norm="peri", ffn=ffn, layer_times=[half], dtype=dtype
    )

    def peri_rhs(t, x):
        ell = (t >= half - dt / 4).astype(jnp.int32)  # the layer of the step's start
        th = _unit(x)
        att = _heads(th, Q3[ell], K3[ell], V3[ell], beta, None)
        ff = jax.nn.gelu(th @ W1[ell].T) @ W2[ell].T
        return _unit(att) + _unit(ff)

    hand3 = _scan_rk4(peri_rhs, x0, dt, a.steps, at_step_start=True)
    rows.append(("2 heads, peri-LN, FFN, 2 layers", peri, hand3, None))

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device), {a.dtype}, "
        f"n = {n}, d = {d}, {a.steps} RK4 steps, dt = {dt}"
    )
    print(
        "| variant | jaxattn ms/step | compile s | hand-written scan | classic field | max |Δx| |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, field, hand_solve, classic in rows:
        run = lambda f=field: ja.simulate(f, x0, t1, dt=dt, ts=[t1]).xs[-1]
        t0 = time.perf_counter()
        ref = run().block_until_ready()
        compile_s = time.perf_counter() - t0
        other = hand_solve(x0).block_until_ready()
        diff = float(jnp.max(jnp.abs(ref - other)))
        peers = [("jaxattn", run), ("hand", lambda h=hand_solve: hand_solve(x0))]
        if classic is not None:
            classic_run = lambda c=classic: ja.simulate(c, x0, t1, dt=dt, ts=[t1]).xs[-1]
            classic_run().block_until_ready()
            peers.append(("classic", classic_run))
        best = {k: float("inf") for k, _ in peers}
        for _ in range(a.repeat):
            for k, fn in peers:
                time.sleep(0.05)
                t0 = time.perf_counter()
                fn().block_until_ready()
                best[k] = min(best[k], time.perf_counter() - t0)
        ms = 1e3 * best["jaxattn"] / a.steps
        ratio = best["hand"] / best["jaxattn"]
        cl = f"{best['classic'] / best['jaxattn']:.2f}×" if "classic" in best else "—"
        print(
            f"| {name} | {ms:.3f} | {compile_s - best['jaxattn']:.1f} | {ratio:.2f}× | {cl} "
            f"| {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
