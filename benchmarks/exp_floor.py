"""The exp floor of the rescaled RK4 step at n = 16,384, d = 3, in one run.

With d = 3 a score costs ~2d = 6 flops but one `exp`, so the attention is exp-bound,
not matmul-bound. This script measures, on the machine it runs on:

  (a) exp throughput (G exp/s) of XLA's `jnp.exp` over a large float32 array, with the
      default thread pool (all cores) and pinned to one core (a child process with CPU
      affinity {0}), in several forms: a materialised output (`jnp.exp(x)`: memory
      traffic + fresh output pages), a fused reduction (`sum(exp(x))`: reads only), an
      in-register operand (`sum(exp(iota·c))`: no memory at all: the pure exp rate), the
      same with a multiply-add fused in (`exp(a·x + b)`), NumPy's `np.exp` (one thread,
      `out=`; and two threads on halves), and an attention-shaped fused pass
      `Σ_j exp(s(q_i·k_j − c))` over key blocks at the benchmark's n (script-local, no P·v);
  (b) the float32 matmul peak (2048², JAX), i.e. what the FMA units deliver;
  (c) one RK4 step of `jaxattn.simulate` (rescaled dynamics, Q = K = V = I, float32,
      4 stages × n² exps per step) for the kernels dense, blockwise (several block
      sizes) and dot_product: ms/step (best of --repeat after a first call, which is
      reported as "first s"), achieved G exp/s, and 4 × one jitted field evaluation
      (the same attention without the solver around it); without --quick each kernel
      runs in its own process so its peak RSS is its own;
  (d) the floor: the ms/step that the measured exp rate implies (4·n² / rate), the same
      plus the step's FMA work at matmul peak (4 stages × 4·d·n² flops, no overlap),
      and each kernel's fraction of the exp floor (floor / measured: 100 % = at floor).

Usage: python benchmarks/exp_floor.py [--n 16384] [--repeat 2] [--quick] [--blocks 256,1024]
The script also reports how busy the machine was (CPU used by other processes while it
ran, from /proc/stat) so a noisy run can be recognised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

DT = 0.01


def best_of(fn, repeat):
    fn()  # compile / warm-up
    t = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# ------------------------------------------------------------------ machine load
class CpuMeter:
    """CPU seconds used by other processes during a run (Linux /proc/stat)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def others(self):
        """Average number of cores kept busy by other processes (None if unknown)."""
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / wall


# ------------------------------------------------------------------ (a) exp rates
def exp_rates(size, repeat, threads_numpy):
    """G exp/s for each form of exp over `size` float32 elements."""
    import jax
    import jax.numpy as jnp

    x = jax.random.uniform(jax.random.key(0), (size,), jnp.float32, -4.0, 0.0)
    c = jnp.float32(-1.0 / size)
    forms = {
        "xla exp(x) -> new array": (jax.jit(jnp.exp), x),
        "xla sum(exp(x))": (jax.jit(lambda x: jnp.sum(jnp.exp(x))), x),
        "xla sum(exp(iota*c)) in-register": (
            jax.jit(lambda c: jnp.sum(jnp.exp(jax.lax.iota(jnp.float32, size) * c))),
            c,
        ),
        "xla exp(a*x+b) -> new array": (jax.jit(lambda x: jnp.exp(1.5 * x - 0.5)), x),
        "xla sum(exp(a*x+b))": (jax.jit(lambda x: jnp.sum(jnp.exp(1.5 * x - 0.5))), x),
    }
    out = {}
    for name, (fn, arg) in forms.items():
        out[name] = size / best_of(lambda: fn(arg).block_until_ready(), repeat) / 1e9
    xn = np.asarray(x)
    buf = np.empty_like(xn)
    out["numpy exp(x, out=) 1 thread"] = size / best_of(lambda: np.exp(xn, out=buf), repeat) / 1e9
    if threads_numpy > 1:  # NumPy releases the GIL inside ufunc loops
        from concurrent.futures import ThreadPoolExecutor

        parts = np.array_split(np.arange(size), threads_numpy)
        sl = [slice(p[0], p[-1] + 1) for p in parts]
        with ThreadPoolExecutor(threads_numpy) as ex:

            def run():
                list(ex.map(lambda s: np.exp(xn[s], out=buf[s]), sl))

            out[f"numpy exp(x, out=) {threads_numpy} threads"] = size / best_of(run, repeat) / 1e9
    return out


def one_core_exp_rates(size, repeat):
    """`exp_rates` in a child process pinned to CPU 0 (XLA then runs on one core)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child-exp",
        str(size),
        "--repeat",
        str(repeat),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(f"(one-core exp child failed: {r.stderr.strip().splitlines()[-1:]})")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def attention_shaped_exp_rate(n, d, block, repeat):
    """Σ_j exp(s(q_i·k_j − c)) over key blocks in one fused loop per block (the scores
    as d multiply-adds in registers): what XLA does when nothing but the exp is left."""
    import jax
    import jax.numpy as jnp

    nb = n - n % block
    x = jax.random.uniform(jax.random.key(1), (nb, d), jnp.float32, -1.0, 1.0)

    @jax.jit
    def run(x):
        kb = x.reshape(-1, block, d)

        def step(den, kk):
            u = sum(x[:, None, e] * kk[None, :, e] for e in range(d))
            return den + jnp.sum(jnp.exp(u - 3.0), axis=1), None

        return jax.lax.scan(step, jnp.zeros(nb, jnp.float32), kb)[0]

    return nb * nb / best_of(lambda: run(x).block_until_ready(), repeat) / 1e9


# ------------------------------------------------------------------ (b) matmul peak
def matmul_peak(size, repeat):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2 * size**3 / best_of(lambda: mm(a).block_until_ready(), max(3, repeat)) / 1e9


# ------------------------------------------------------------------ (c) kernels
def time_kernel(n, d, kernel, block, repeat):
    """One RK4 step and 4 field evaluations of the rescaled field with this kernel."""
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    x0 = jax.random.uniform(jax.random.key(0), (n, d), jnp.float32, -1.0, 1.0)
    field = ja.RescaledField(d=d, dtype=jnp.float32, kernel=kernel, block=block)
    step = lambda: ja.simulate(field, x0, DT, dt=DT, ts=[DT]).xs.block_until_ready()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    ev = jax.jit(lambda y: field(jnp.float32(DT / 2), y))
    t_eval = best_of(lambda: ev(x0).block_until_ready(), max(2, repeat))
    return {"step_s": best, "first_s": first, "eval4_s": 4 * t_eval, "rss_gb": peak_rss_gb()}


def time_kernel_isolated(n, d, kernel, block, repeat):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child-kernel",
        kernel,
        "--block",
        str(block),
        "--n",
        str(n),
        "--d",
        str(d),
        "--repeat",
        str(repeat),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return {"error": last[:80]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="tokens (default 16384; 1024 with --quick)")
    p.add_argument("--d", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="timed calls after the first (best of)")
    p.add_argument("--quick", action="store_true", help="small n and arrays: a smoke run")
    p.add_argument(
        "--blocks",
        default=None,
        help="comma list of blockwise block sizes (default 256,512,1024,2048,4096)",
    )
    p.add_argument("--block", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--_child-exp", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-kernel", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a._child_exp is not None:  # one-core exp child: pin before JAX starts threads
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {0})
        print(json.dumps(exp_rates(a._child_exp, a.repeat, threads_numpy=1)))
        return 0
    if a._child_kernel is not None:  # one kernel in its own process
        print(json.dumps(time_kernel(a.n, a.d, a._child_kernel, a.block, a.repeat)))
        return 0

    n = a.n or (1024 if a.quick else 16384)
    if n < 2 or a.d < 1 or a.repeat < 1:
        p.error("--n must be ≥ 2, --d and --repeat ≥ 1")
    try:
        blocks = (
            [int(b) for b in a.blocks.split(",")]
            if a.blocks
            else [256, 1024]
            if a.quick
            else [256, 512, 1024, 2048, 4096]
        )
    except ValueError:
        p.error(f"--blocks must be a comma list of integers, got {a.blocks!r}")
    if any(b < 1 for b in blocks):
        p.error("--blocks must be positive")
    exp_size = 1 << 20 if a.quick else 1 << 24
    mm_size = 512 if a.quick else 2048
    meter = CpuMeter()

    import jax

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.machine()}, {ncpu} CPU cores, python "
        f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}); "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )

    # (a) exp throughput
    all_cores = exp_rates(exp_size, max(5, a.repeat), threads_numpy=ncpu)
    one_core = one_core_exp_rates(exp_size, max(5, a.repeat))
    attn_block = min(1024, n)
    attn_rate = attention_shaped_exp_rate(n, a.d, attn_block, max(2, a.repeat))
    print(
        f"\n(a) exp throughput, float32, {exp_size:,} elements (G exp/s; best of "
        f"{max(5, a.repeat)})"
    )
    print(f"{'form':<44} {'all cores':>10} {'1 core':>8}")
    for name, r in all_cores.items():
        one = one_core.get(name)
        print(f"{name:<44} {r:>10.2f} {'-' if one is None else format(one, '.2f'):>8}")
    print(
        f"{'attention-shaped sum_j exp(q_i.k_j - c)':<44} {attn_rate:>10.2f} {'-':>8}"
        f"   (n = {n - n % attn_block}, d = {a.d}, key blocks of {attn_block})"
    )
    xla_forms = [k for k in all_cores if k.startswith("xla")]
    exp_rate = max(all_cores[k] for k in xla_forms)
    exp_form = max(xla_forms, key=all_cores.get)
    fma_rate = all_cores["xla sum(exp(a*x+b))"]
    one_rate = max((one_core[k] for k in xla_forms if k in one_core), default=float("nan"))

    # (b) matmul peak
    peak = matmul_peak(mm_size, a.repeat)
    print(f"\n(b) float32 matmul peak ({mm_size}², jax): {peak:.1f} GFLOP/s")

    # (c) kernels
    kernels = [("blockwise", b) for b in blocks] + [("dense", 0), ("dot_product", 0)]
    exps = 4 * n * n
    flops = 4 * 4 * a.d * n * n  # scores 2dn² + P·v 2dn² per stage
    floor = exps / (exp_rate * 1e9)
    floor_fma = floor + flops / (peak * 1e9)
    print(
        f"\n(c) rescaled RK4 step, n = {n}, d = {a.d}, float32, 4·n² = {exps / 1e9:.3f} G "
        f"exps/step; best of {a.repeat} after a first call"
        f"{'' if a.quick else '; each kernel in its own process'}"
    )
    hdr = (
        f"{'kernel':<16} {'ms/step':>9} {'first s':>8} {'G exp/s':>8} {'4 evals ms':>11} "
        f"{'% of floor':>10} {'peak RSS GB':>11}"
    )
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for kernel, block in kernels:
        label = f"{kernel} {block}" if kernel == "blockwise" else kernel
        try:
            r = (
                time_kernel(n, a.d, kernel, block or 1024, a.repeat)
                if a.quick
                else time_kernel_isolated(n, a.d, kernel, block or 1024, a.repeat)
            )
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"}
        if "error" in r:
            print(f"{label:<16} failed: {r['error']}")
            continue
        rows.append((label, r))
        print(
            f"{label:<16} {1e3 * r['step_s']:>9.1f} {r['first_s']:>8.2f} "
            f"{exps / r['step_s'] / 1e9:>8.3f} {1e3 * r['eval4_s']:>11.1f} "
            f"{100 * floor / r['step_s']:>9.1f}% {r['rss_gb']:>11.2f}",
            flush=True,
        )

    # (d) floor
    print(
        f"\n(d) floor at n = {n}, d = {a.d}: 4·n² exps at {exp_rate:.2f} G exp/s "
        f"({exp_form}, all cores) = {1e3 * floor:.1f} ms/step; at the fused multiply-add "
        f"+ exp rate {fma_rate:.2f} G exp/s: {1e3 * exps / (fma_rate * 1e9):.1f} ms/step; "
        f"exp floor + {flops / 1e9:.1f} GFLOP of scores and P·v at matmul peak (no "
        f"overlap): {1e3 * floor_fma:.1f} ms/step; {ncpu} × the best one-core rate "
        f"({ncpu} × {one_rate:.2f} G exp/s, perfect scaling): "
        f"{1e3 * exps / (ncpu * one_rate * 1e9):.1f} ms/step"
    )
    others = meter.others()
    busy = (
        "unknown"
        if others is None
        else f"other processes kept {others:.2f} of {ncpu} cores busy on average "
        f"({'busy' if others > 0.25 else 'otherwise idle'})"
    )
    print(f"machine load during this run: {busy}; load average after: {os.getloadavg()[0]:.2f}")

    if rows:
        bl, br = min(rows, key=lambda r: r[1]["step_s"])
        dn = dict(rows).get("dense")
        solver = br["step_s"] / br["eval4_s"]
        map_rate = all_cores["xla exp(x) -> new array"]
        print(
            "\nConclusion: "
            + (
                f"the cores' XLA exp rate is {exp_rate:.2f} G exp/s ({exp_form}; "
                f"{one_core.get(exp_form, float('nan')):.2f} on one core), so one RK4 step at "
                f"n = {n}, d = {a.d} cannot take less than {1e3 * floor:.1f} ms "
                f"({1e3 * floor_fma:.1f} ms with its matmul work at peak). The fastest kernel, "
                f"{bl}, takes {1e3 * br['step_s']:.1f} ms/step = "
                f"{exps / br['step_s'] / 1e9:.2f} G exp/s, {100 * floor / br['step_s']:.0f} % "
                f"of the exp floor"
                + (
                    f" (dense: {exps / dn['step_s'] / 1e9:.2f} G exp/s, "
                    f"{100 * floor / dn['step_s']:.0f} %)"
                    if dn
                    else ""
                )
                + f". The same four attention evaluations outside the solver take "
                f"{1e3 * br['eval4_s']:.1f} ms ({100 * floor / br['eval4_s']:.0f} % of the floor; "
                f"step / 4 evaluations = ×{solver:.2f}). An attention-shaped fused "
                f"exp pass (scores in registers, no P·v) reaches {attn_rate:.2f} G exp/s, "
                f"{100 * attn_rate / exp_rate:.0f} % of the exp rate."
                + (
                    f" A materialised exp (`jnp.exp(x)` into a new array) runs at only "
                    f"{map_rate:.2f} G exp/s (memory traffic and fresh output pages), the price "
                    f"the dense kernel pays on its n×n arrays."
                    if map_rate < 0.5 * exp_rate
                    else ""
                )
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
