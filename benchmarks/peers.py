"""jaxattn against its peers on the same work, side by side in one run.

Work: rescaled dynamics (docs/theory.md, 'Rescaled dynamics'), Q = K = V = I, β = 1,
classical RK4 with the same number of fixed steps (dt = 0.1), float32, tokens
U[−1, 1]^d. Compile / warm-up is excluded and reported separately; every timing is the
best of `--repeat` calls, and the peers of one row are timed interleaved (one call of each
in turn, `--repeat` rounds), so a busy machine slows all of them alike.

Peers:
  scan       a hand-written JAX RK4: `jit` + `lax.scan` over the same field in 4 lines
             (`e^{tV}` by `jax.scipy.linalg.expm`, stable softmax, `P·Vz − Vz`); for a
             batch, the same code on the stacked `(B, n, d)` array
  torchdiffeq  PyTorch + torchdiffeq `odeint(method="rk4")` on the CPU, one call on the
             (batched) tensor; the Python loop over members is an extra column
  numpy      vectorised NumPy RK4 (matrix exponential by scipy.linalg.expm per stage)
  diffrax    a hand-written diffrax solve of the same field (plain function, RK4 tableau)
  paper      the research code's per-step algorithm as docs/theory.md ('Numerical
             schemes') describes it (one expm(tV) per token pair and stage, Python
             loops, attention frozen within a step): re-implemented here from that
             description — not the original code — timed for a few steps at n = 50
             and extrapolated.

Also: `jaxattn.sweep` on `docs/sweep/example.toml` with fewer initial conditions
(`--sweep-seeds`) against the hand-written scan computing the same points and the same
summaries at the same save times.

Usage: python benchmarks/peers.py [--quick] [--repeat 3] [--skip-big] [--batch 256]
       [--sweep-seeds 32]   (from a checkout: PYTHONPATH=. so that its jaxattn is timed)
Prints ms/step, ratios (peer time / jaxattn time: > 1 means jaxattn is faster), achieved
GFLOP/s against a measured float32 matmul peak, and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

# The torch and NumPy peers' thread pools must not keep spinning on the cores after their
# calls return: the peers of a row are timed in turn in one process, so a spinning pool
# would slow whichever peer runs next (set before the libraries start their pools).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def interleaved(fns, repeat):
    """Best time of each function in `fns` (name → callable), after one warm-up call
    each, timing one call of each in turn for `repeat` rounds — more rounds (up to 15)
    when a round takes under a second, so short calls are not at the mercy of one busy
    moment of a shared machine. A 0.1 s pause (not timed) precedes every call, so no
    peer starts while another's worker threads are still spinning."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    rounds, done = repeat, 0
    while done < rounds:
        for name, fn in fns.items():
            time.sleep(0.1)  # let the previous peer's thread pools go idle (not timed)
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        done += 1
        if done == 1:
            rounds = max(repeat, min(15, int(1.0 / max(sum(best.values()), 1e-3))))
    return best


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
    d = x0.shape[-1]
    V = torch.eye(d)

    def f(t, z):
        x = z @ torch.linalg.matrix_exp(t * V).T
        w = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
        vz = z @ V.T
        return w @ vz - vz

    z0 = torch.from_numpy(x0)
    ts = torch.tensor([0.0, dt * steps])

    def run():
        with torch.no_grad():
            return torchdiffeq.odeint(f, z0, ts, method="rk4", options={"step_size": dt})

    return run


# ---------------------------------------------------------------- hand-written JAX RK4
def scan_field(t, z, V):
    """The rescaled field in 4 lines, for `z` of shape (n, d) or (B, n, d)."""
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    x = z @ jsl.expm(t * V).T
    u = x @ jnp.swapaxes(x, -1, -2)
    w = jnp.exp(u - jnp.max(u, axis=-1, keepdims=True))
    return (w @ (z @ V.T)) / jnp.sum(w, axis=-1, keepdims=True) - z @ V.T


def rk4_scan(f, z, t0, dt, steps):
    """`steps` classical RK4 steps of `z' = f(t, z)` in a `lax.scan`."""
    import jax

    def body(carry, _):
        z, t = carry
        k1 = f(t, z)
        k2 = f(t + dt / 2, z + dt / 2 * k1)
        k3 = f(t + dt / 2, z + dt / 2 * k2)
        k4 = f(t + dt, z + dt * k3)
        return (z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + dt), None

    return jax.lax.scan(body, (z, t0), None, length=steps)[0][0]


def scan_solver(x0, dt, steps):
    import jax
    import jax.numpy as jnp

    z0 = jnp.asarray(x0)
    V = jnp.eye(x0.shape[-1], dtype=z0.dtype)
    run = jax.jit(
        lambda z: rk4_scan(lambda t, y: scan_field(t, y, V), z, jnp.zeros((), z.dtype), dt, steps)
    )
    return lambda: run(z0).block_until_ready()


# ---------------------------------------------------------------- hand-written diffrax
def diffrax_solver(x0, dt, steps):
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    tab = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        c=np.array([0.5, 0.5, 1.0]),
    )

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
        return diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            _RK4(),
            0.0,
            dt * steps,
            dt,
            z0,
            stepsize_controller=diffrax.ConstantStepSize(),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=steps + 1,
        ).ys

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
    """One step of the research code's algorithm: for each stage and token i, for each
    pair (j, k), a fresh expm(tV) (2n³ per step over the 4 identical stages)."""
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


# ---------------------------------------------------------------- the docs sweep
def sweep_spec(seeds, quick=False):
    """`docs/sweep/example.toml` with `seeds` initial conditions per (norm, target)."""
    import copy
    import os
    import tomllib

    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "docs", "sweep", "example.toml"
    )
    with open(path, "rb") as fh:
        spec = copy.deepcopy(tomllib.load(fh))
    spec["grid"]["init.seed"] = {"range": seeds}
    if quick:
        spec["solve"]["t1"] = 1.0
        spec["grid"]["lora.norm"] = {"geomspace": [0.001, 0.3, 2]}
        spec["sweep"]["save_points"] = 11
    return spec


def jaxattn_sweep(spec):
    import shutil
    import tempfile

    import jaxattn as ja

    def run():
        out = tempfile.mkdtemp(prefix="peers-sweep-")
        try:
            return ja.sweep(spec, out, progress=False, log=None)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def scan_sweep(spec, shared=False):
    """The same points, LoRAs and summaries as `jaxattn.sweep(spec)`, hand-written: one
    jitted `lax.scan` RK4 over all points, the summaries (jaxattn's metric functions)
    after every `k`-th step. `shared=False`: each point's unperturbed run is stacked
    beside its perturbed one (as a user writes it first); `shared=True`: the unperturbed
    runs are solved once per initial condition and gathered for the divergence (what
    `jaxattn.sweep` does with fixed steps)."""
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    from jaxattn import cluster_count, divergence, pairwise_distances, parse_sweep
    from jaxattn._sweep.runner import _PointBuilder  # the sweep's own LoRAs and tokens per point

    plan = parse_sweep(spec)
    b = _PointBuilder(plan)
    opts, solve = plan.options, spec["solve"]
    steps = round(solve["t1"] / solve["dt"])
    k = steps // (opts["save_points"] - 1)
    assert k * (opts["save_points"] - 1) == steps, "save times must fall every k steps"
    assert "beta" not in plan.axes, "the hand-written peer keeps β = 1"
    eye = np.eye(b.d)
    x0, W, ref_of, refs = [], [], [], {}  # refs: initial condition → (index, first point)
    for p in range(plan.n_points):
        a = plan.assignment(p)
        lo = b.lora(a)
        pert = {
            t: np.asarray(lo.merged(jnp.asarray(eye, b.dtype))) if lo.target == t else eye
            for t in "QKV"
        }
        x0.append(b.x0(a))
        W.append([pert["Q"], pert["K"], pert["V"]])
        ref_of.append(refs.setdefault(a.get("init.seed"), (len(refs), p))[0])
    P = plan.n_points
    if shared:  # state (R + P, n, d): the R distinct references first
        y0 = np.concatenate([np.stack([x0[p] for _, p in refs.values()]), x0])
        W = np.concatenate([np.broadcast_to(eye, (len(refs), 3) + eye.shape), W])
        R = len(refs)
    else:  # state (2P, n, d): reference p, then point p
        y0 = np.concatenate([np.stack(x0), np.stack(x0)])
        W = np.concatenate([np.broadcast_to(eye, (P, 3) + eye.shape), W])
        R, ref_of = P, list(range(P))
    y0, W = jnp.asarray(y0, b.dtype), jnp.asarray(W, b.dtype)
    ridx = jnp.asarray(ref_of)
    dt = float(solve["dt"])
    thr = opts["cluster_threshold"]

    def field(t, z, w):  # one run: z (n, d), w (3, d, d) = Q, K, V
        Q, K, V = w
        x = z @ jsl.expm(t * V).T
        u = (x @ Q.T) @ (x @ K.T).T
        e = jnp.exp(u - jnp.max(u, axis=-1, keepdims=True))
        return (e @ (z @ V.T)) / jnp.sum(e, axis=-1, keepdims=True) - z @ V.T

    f = jax.vmap(field, in_axes=(None, 0, 0))

    def summaries(y):  # y (R + P, n, d)
        pts = y[R:]
        return {
            "divergence": jax.vmap(divergence)(y[:R][ridx], pts),
            "clusters": jax.vmap(lambda x: cluster_count(x, thr))(pts),
            "diameter": jax.vmap(lambda x: jnp.max(pairwise_distances(x)))(pts),
        }

    @jax.jit
    def run(y0, W):
        def save(carry, _):
            y, t = carry
            y = rk4_scan(lambda t, z: f(t, z, W), y, t, dt, k)
            return (y, t + k * dt), summaries(y)

        t0 = jnp.zeros((), y0.dtype)
        _, later = jax.lax.scan(save, (y0, t0), None, length=steps // k)
        first = summaries(y0)
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, later)

    return lambda: jax.block_until_ready(run(y0, W))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-big", action="store_true", help="skip the n = 65536 step")
    p.add_argument(
        "--sizes",
        default=None,
        help="single-solve rows as n×d list, e.g. 50x2,1000x2 ('none': no rows)",
    )
    p.add_argument("--batch", type=int, default=256, help="members of the batch case")
    p.add_argument(
        "--sweep-seeds",
        type=int,
        default=32,
        help="initial conditions per (norm, target) in the docs sweep (128 there)",
    )
    a = p.parse_args()
    if a.repeat < 1 or a.batch < 1 or a.sweep_seeds < 1:
        p.error("--repeat, --batch and --sweep-seeds must be ≥ 1")
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}; torch: "
        f"{torch.__version__ if torch else 'not installed'}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    peak = matmul_peak()
    print(f"measured float32 matmul peak (2048², jax): {peak:.1f} GFLOP/s\n")
    sizes = (
        [(50, 2), (1000, 2)]
        if a.quick
        else [(50, 2), (1000, 2), (4096, 2), (50, 64), (1000, 64), (4096, 64)]
    )
    if a.sizes is not None:
        try:
            sizes = (
                []
                if a.sizes == "none"
                else [tuple(int(v) for v in sz.split("x")) for sz in a.sizes.split(",")]
            )
        except ValueError:
            p.error(f"--sizes must look like 50x2,1000x2 or none, got {a.sizes!r}")
    dt = 0.1
    hdr = (
        f"{'n':>5} {'d':>3} {'steps':>5} | {'jaxattn ms/step':>15} {'compile s':>9} "
        f"{'GFLOP/s':>8} {'%peak':>6} | {'scan':>6} {'torchdiffeq':>11} {'numpy':>7} "
        f"{'diffrax':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n, d in sizes:
        steps = 200 if n <= 64 else 50 if n <= 1000 else 10
        if a.quick:
            steps = 20
        x0 = np.random.default_rng(0).uniform(-1, 1, size=(n, d)).astype(np.float32)
        ja_fn = jaxattn_solver(x0, dt, steps)
        comp = first_call(ja_fn)
        fns = {
            "jaxattn": ja_fn,
            "scan": scan_solver(x0, dt, steps),
            "diffrax": diffrax_solver(x0, dt, steps),
        }
        if torch:
            fns["torchdiffeq"] = torch_solver(x0, dt, steps)
        if n * d <= 4096 * 2 or not a.quick:
            fns["numpy"] = lambda: numpy_rk4(x0, dt, steps)
        t = {k: v / steps for k, v in interleaved(fns, a.repeat).items()}
        comp -= t["jaxattn"] * steps
        r = {
            k: t.get(k, np.nan) / t["jaxattn"] for k in ("scan", "torchdiffeq", "numpy", "diffrax")
        }
        gf = flops_per_step(n, d) / t["jaxattn"] / 1e9
        print(
            f"{n:>5} {d:>3} {steps:>5} | {1e3 * t['jaxattn']:>15.3f} {comp:>9.2f} "
            f"{gf:>8.2f} {100 * gf / peak:>5.1f}% | {r['scan']:>5.2f}x "
            f"{r['torchdiffeq']:>10.2f}x {r['numpy']:>6.2f}x {r['diffrax']:>7.2f}x",
            flush=True,
        )
    print("(ratios = peer time / jaxattn time; > 1 means jaxattn is faster)\n")

    # Batch: B simulations, n = 64, d = 8, 200 steps, one call each.
    import jax.numpy as jnp

    import jaxattn as ja

    B, n, d, steps = a.batch, 64, 8, 200
    if a.quick:
        n, steps = 16, 20
    xb = np.random.default_rng(1).uniform(-1, 1, size=(B, n, d)).astype(np.float32)
    field = ja.RescaledField(d=d, dtype=jnp.float32)
    zb = jnp.asarray(xb)
    fns = {
        "jaxattn": lambda: ja.simulate(
            field, zb, steps * dt, dt=dt, ts=[steps * dt]
        ).xs.block_until_ready(),
        "scan": scan_solver(xb, dt, steps),
    }
    if torch:
        fns["torchdiffeq"] = torch_solver(xb, dt, steps)
    t = interleaved(fns, a.repeat)
    line = (
        f"batch {B}×(n={n}, d={d}, {steps} RK4 steps), one call each: jaxattn "
        f"{1e3 * t['jaxattn'] / steps:.3f} ms/step; hand-written scan "
        f"{t['scan'] / t['jaxattn']:.2f}x"
    )
    if torch:
        line += f"; torchdiffeq batched {t['torchdiffeq'] / t['jaxattn']:.2f}x"
        k = min(16, B)
        t_loop = best_of(lambda: [torch_solver(xb[i], dt, steps)() for i in range(k)], 1)
        t_loop *= B / k
        line += (
            f"; torchdiffeq Python loop ({k} runs timed, ×{B / k:g}) {t_loop / t['jaxattn']:.1f}x"
        )
    print(line, flush=True)

    # The docs sweep, shrunk: jaxattn.sweep (chunks, files, figure) against the
    # hand-written scan computing the same summaries.
    import jax

    jax.config.update("jax_enable_x64", True)  # the docs sweep is float64 (as the CLI does)
    spec = sweep_spec(a.sweep_seeds, a.quick)
    peers_ = {
        "jaxattn sweep": jaxattn_sweep(spec),
        "scan": scan_sweep(spec),
        "scan, shared references": scan_sweep(spec, shared=True),
    }
    t = interleaved(peers_, a.repeat)
    from jaxattn import parse_sweep

    pts = parse_sweep(spec).n_points
    js = t["jaxattn sweep"]
    print(
        f"docs sweep ({pts} points, n = 32, d = 2, float64, t1 = {spec['solve']['t1']}, "
        f"summaries at {spec['sweep']['save_points']} times): "
        f"jaxattn sweep {js:.2f} s (chunks, result files and figure included); "
        f"hand-written scan {t['scan']:.2f} s → {t['scan'] / js:.2f}x; "
        f"hand-written scan with shared references {t['scan, shared references']:.2f} s "
        f"→ {t['scan, shared references'] / js:.2f}x",
        flush=True,
    )

    if not a.quick:
        t_paper = paper_step_time()
        x0 = np.random.default_rng(0).uniform(-1, 1, size=(50, 2)).astype(np.float32)
        t_ja50 = best_of(jaxattn_solver(x0, 0.1, 400), a.repeat) / 400
        print(
            f"paper's algorithm (re-implemented), n = 50: {t_paper:.2f} s/step "
            f"(2 steps timed) → a 400-step run ≈ {400 * t_paper / 60:.1f} min; jaxattn "
            f"{1e3 * t_ja50:.3f} ms/step → {t_paper / t_ja50:,.0f}x"
        )

    if not a.skip_big:
        big = big_step_subprocess()
        if big:
            print(
                f"n = 65536, d = 3, one RK4 step (blockwise, float32): first call "
                f"{big[0]:.1f} s, step {big[1]:.1f} s, peak RSS {big[2]:.2f} GB"
            )
    print(
        f"load average after: {os.getloadavg()[0]:.2f}; peak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
    )


if __name__ == "__main__":
    main()
