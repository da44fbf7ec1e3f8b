"""ms/step of `jaxattn.simulate` on a GPU (or whatever `jax.devices()` offers), n up to 100,000.

Work: the chosen dynamics with Q = K = V = I, β = 1, classical RK4 with fixed dt = 0.01,
`--steps` steps, tokens U[−1, 1]^d (normalised onto the sphere for `sphere`); the ODE
state is float32. `--dtype float32` uses `--kernel` (auto | dense | blockwise |
dot_product); `--dtype bf16` uses the `dot_product_bf16` kernel (q, k, v cast to
bfloat16; cuDNN flash attention on a GPU), the state staying float32.

For each n it prints ms/step (best of `--repeat` calls after a first one), the first
call's extra time (≈ compile), achieved G exp/s (4 stages × n² exps per step), and peak
memory: the device's `peak_bytes_in_use` where `memory_stats()` has it (GPU), else the
process's peak RSS (CPU). Each n runs in its own process (unless `--no-isolate`), so the
peak is that size's own and an out-of-memory error — or the OS killing the process —
becomes a row of the table, not the end of the run.

Usage: python benchmarks/gpu.py [--dtype float32|bf16] [--kernel auto] [--n 1000,10000,100000]
                                [--d 3] [--steps 10] [--dynamics rescaled] [--block 1024]
                                [--repeat 3] [--batch 4096] [--batch-n 64]
Without a GPU it runs on the CPU and says so (use small n there: n = 100,000 would take
about a minute per step on two cores).
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

DT = 0.01
MAX_N = 100_000
KERNELS_F32 = ("auto", "dense", "blockwise", "dot_product")
DYNAMICS = ("rescaled", "sphere", "plain")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = _Parser(prog="gpu.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bf16"),
        help="float32 (choose --kernel) or bf16 (dot_product_bf16, float32 state)",
    )
    p.add_argument(
        "--kernel",
        default=None,
        choices=KERNELS_F32,
        help="attention kernel for --dtype float32 (default auto)",
    )
    p.add_argument(
        "--n", default="1000,10000,100000", help=f"comma list of token counts, each 2..{MAX_N}"
    )
    p.add_argument("--d", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dynamics", default="rescaled", choices=DYNAMICS)
    p.add_argument("--block", type=int, default=1024, help="blockwise block size")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also time a batch of this many small simulations (e.g. 4096) in one "
        "simulate call: n = --batch-n, d = 8, 200 steps of dt 0.1",
    )
    p.add_argument("--batch-n", type=int, default=64, help="tokens per batch member")
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run every n in this process (peak memory is then cumulative)",
    )
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        a.sizes = sorted({int(v) for v in a.n.split(",") if v.strip()})
    except ValueError:
        p.error(f"--n must be a comma list of integers, got {a.n!r}")
    if not a.sizes or any(not 2 <= n <= MAX_N for n in a.sizes):
        p.error(f"--n values must lie in 2..{MAX_N}, got {a.n!r}")
    if a.dtype == "bf16":
        if a.kernel is not None:
            p.error("--kernel applies to --dtype float32 only (bf16 is dot_product_bf16)")
        a.kernel = "dot_product_bf16"
    else:
        a.kernel = a.kernel or "auto"
    if a.batch < 0 or a.batch_n < 2:
        p.error(f"--batch must be ≥ 0 and --batch-n ≥ 2, got {a.batch}, {a.batch_n}")
    for name in ("d", "steps", "block", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be ≥ 1, got {getattr(a, name)}")
    return a


def peak_memory():
    """(bytes, source): the device allocator's peak where reported, else peak RSS."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


def is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, MemoryError) or "resource_exhausted" in msg or "out of memory" in msg


def run_size(a, n):
    """Time one size in this process; returns a dict (never raises for OOM)."""
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    try:
        x0 = jax.random.uniform(jax.random.key(0), (n, a.d), jnp.float32, -1.0, 1.0)
        if a.dynamics == "sphere":
            x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
        field = ja.make_field(a.dynamics, d=a.d, dtype=jnp.float32, kernel=a.kernel, block=a.block)
        t1 = a.steps * DT
        run = lambda: ja.simulate(field, x0, t1, dt=DT, ts=[t1]).xs.block_until_ready()
        t0 = time.perf_counter()
        out = run()
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = run()
            best = min(best, time.perf_counter() - t0)
        finite = bool(jnp.all(jnp.isfinite(out)))
    except Exception as e:
        if is_oom(e):
            return {"n": n, "error": "out of memory"}
        line = (str(e).strip().splitlines() or [""])[0]
        return {"n": n, "error": f"{type(e).__name__}: {line[:100]}"}
    mem, src = peak_memory()
    return {
        "n": n,
        "step_s": best / a.steps,
        "compile_s": max(0.0, first - best),
        "mem_bytes": mem,
        "mem_src": src,
        "finite": finite,
    }


def run_isolated(a, n):
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        str(n),
        "--dtype",
        a.dtype,
        "--n",
        str(n),
        "--d",
        str(a.d),
        "--steps",
        str(a.steps),
        "--dynamics",
        a.dynamics,
        "--block",
        str(a.block),
        "--repeat",
        str(a.repeat),
    ]
    if a.dtype == "float32":
        argv += ["--kernel", a.kernel]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        res = json.loads(r.stdout.strip().splitlines()[-1])
        # XLA:CPU's YNNPACK reports a failed allocation only on stderr ("allocate of
        # <…> failed") and raises a generic INTERNAL error.
        if "error" in res and "allocate of" in r.stderr and "failed" in r.stderr:
            res["error"] = f"out of memory ({res['error'][:60]})"
        return res
    if r.returncode < 0:
        return {"n": n, "error": f"killed by signal {-r.returncode} (out of memory?)"}
    last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return {"n": n, "error": ("out of memory" if is_oom(RuntimeError(last)) else last[:110])}


def main(argv=None):
    a = parse_args(argv)
    if a._child is not None:
        print(json.dumps(run_size(a, a._child)))
        return 0

    import jax

    devices = jax.devices()
    print(f"devices: {devices}")
    print(
        f"backend: {jax.default_backend()}, jax {jax.__version__}, python "
        f"{platform.python_version()}, {platform.machine()}"
    )
    if not any(d.platform == "gpu" for d in devices):
        print("note: no GPU found — running on the CPU (a smoke run; these are CPU numbers)")
    elif a.dtype == "bf16" and a.d % 8:
        # jax/_src/cudnn/fused_attention_stablehlo.py: "The head dim must be <= H_max
        # and a multiple of 8"; every size will then be reported as failed.
        print(
            f"note: cuDNN's flash attention needs a head dim that is a multiple of 8; "
            f"d = {a.d} is likely to fail — try --d 8 or --d 64"
        )
    print(
        f"dynamics {a.dynamics}, d = {a.d}, RK4, dt = {DT}, {a.steps} steps, state float32, "
        f"kernel {a.kernel}"
        + (f" (block {a.block})" if a.kernel in ("auto", "blockwise") else "")
        + f"; best of {a.repeat} after a first call"
        f"{'' if a.no_isolate else '; each n in its own process'}\n"
    )
    hdr = (
        f"{'n':>7} {'dtype':>7} {'kernel':>16} {'ms/step':>10} {'compile s':>9} "
        f"{'G exp/s':>9} {'peak mem GB':>11} {'(source)':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    failed = 0
    for n in a.sizes:
        r = run_size(a, n) if a.no_isolate else run_isolated(a, n)
        head = f"{n:>7} {a.dtype:>7} {a.kernel:>16}"
        if "error" in r:
            failed += 1
            print(f"{head} {'failed: ' + r['error']}", flush=True)
            continue
        gexp = 4 * n * n / r["step_s"] / 1e9
        note = "" if r["finite"] else "  (non-finite state!)"
        print(
            f"{head} {1e3 * r['step_s']:>10.3f} {r['compile_s']:>9.2f} {gexp:>9.3f} "
            f"{r['mem_bytes'] / 1e9:>11.3f} {r['mem_src']:>8}{note}",
            flush=True,
        )
    if failed:
        print(f"({failed} of {len(a.sizes)} sizes failed; see the rows above)")
    if a.batch:
        run_batch(a)
    return 0


def run_batch(a, d=8, steps=200, dt=0.1):
    """A batch of `a.batch` rescaled simulations (n = `a.batch_n`, d = 8) in one call."""
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    x0 = jax.random.uniform(jax.random.key(1), (a.batch, a.batch_n, d), jnp.float32, -1.0, 1.0)
    field = ja.RescaledField(d=d, dtype=jnp.float32)
    t1 = steps * dt
    run = lambda: ja.simulate(field, x0, t1, dt=dt, ts=[t1]).xs.block_until_ready()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    print(
        f"\nbatch of {a.batch} × (n = {a.batch_n}, d = {d}), {steps} RK4 steps, float32, "
        f"one call: {1e3 * best / steps:.3f} ms/step, {1e6 * best / steps / a.batch:.3f} "
        f"µs per member-step, first call {first:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
