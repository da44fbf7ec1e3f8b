"""Time and peak memory of one gradient through `jaxattn.simulate`, per adjoint, against
the forward solve alone; PyTorch + torchdiffeq (autograd and `odeint_adjoint`) as the peer.

Usage: python benchmarks/gradient.py [--n 1000] [--d 16] [--steps 400] [--repeat 2]

Problem: plain dynamics (docs/theory.md, 'Particle dynamics'), random Q, K, V
(Gaussian/√d · 0.5), β = 1, tokens N(0, I), classical RK4 with dt = 0.01 for `--steps`
steps, float64, objective
`½ mean_i |x_i(T)|²`, gradient with respect to Q, K, V (3d² entries). Forward mode
(one JVP per entry) is timed for a single direction (wrt β) and the full-gradient cost is
extrapolated ×3d² — `jaxattn sensitivity` refuses it at this size.

Each case runs in its own subprocess so that the peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that case alone; it includes
the Python/JAX baseline (printed as the `baseline` row). Time: first call (compile
included) and best of `--repeat` further calls, `block_until_ready`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CASES = (
    "baseline",
    "forward-solve",
    "checkpoint",
    "checkpoint-all",
    "backsolve",
    "forward-1dir",
    "torch-forward",
    "torch-autograd",
    "torch-adjoint",
)


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _timeit(fn, repeat):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = first if repeat == 0 else float("inf")  # repeat 0: compile included
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def run_jax(case, n, d, steps, repeat):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import jaxattn as ja
    from jaxattn._sensitivity import objective_fn  # the raw objective, to time jax.grad alone

    if case == "baseline":
        jnp.zeros(1).block_until_ready()
        return {"first_s": 0.0, "best_s": 0.0}
    kq, kk, kv, kx = jax.random.split(jax.random.key(0), 4)
    Q, K, V = (0.5 * jax.random.normal(k, (d, d), jnp.float64) / np.sqrt(d) for k in (kq, kk, kv))
    x0 = jax.random.normal(kx, (n, d), jnp.float64)
    field = ja.PlainField(Q, K, V, beta=1.0)
    dt = 0.01
    t1 = steps * dt
    solve = dict(solver="rk4", dt=dt)
    if case == "forward-solve":
        fn = lambda: ja.simulate(field, x0, t1, ts=[t1], **solve).xs.block_until_ready()
    else:
        adjoint, wrt, cps = {
            "checkpoint": ("checkpoint", ("Q", "K", "V"), None),
            "checkpoint-all": ("checkpoint", ("Q", "K", "V"), steps),
            "backsolve": ("backsolve", ("Q", "K", "V"), None),
            "forward-1dir": ("forward", ("beta",), None),
        }[case]
        f = objective_fn(field, t1, "mean_sq", adjoint=adjoint, checkpoints=cps, solve=solve)
        p = ja.field_params(field, x0)
        diff = {k: p[k] for k in wrt}
        rest = {k: v for k, v in p.items() if k not in diff}
        if adjoint == "forward":
            g = jax.jit(jax.jacfwd(lambda q: f({**rest, **q})[0]))
        else:
            g = jax.jit(jax.grad(lambda q: f({**rest, **q})[0]))
        fn = lambda: jax.block_until_ready(g(diff))
    first, best = _timeit(fn, repeat)
    return {"first_s": first, "best_s": best}


def run_torch(case, n, d, steps, repeat):
    import torch
    import torchdiffeq

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    Q, K, V = (0.5 * torch.randn(d, d) / d**0.5 for _ in range(3))
    x0 = torch.randn(n, d)
    dt = 0.01
    t = torch.tensor([0.0, steps * dt])

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.Q, self.K, self.V = (torch.nn.Parameter(W.clone()) for W in (Q, K, V))

        def forward(self, t, x):
            logits = (x @ self.Q.T) @ (x @ self.K.T).T
            return torch.softmax(logits, dim=-1) @ (x @ self.V.T)

    f = Field()
    opts = dict(method="rk4", options=dict(step_size=dt))

    def fn():
        if case == "torch-forward":
            with torch.no_grad():
                torchdiffeq.odeint(f, x0, t, **opts)
            return
        solver = torchdiffeq.odeint_adjoint if case == "torch-adjoint" else torchdiffeq.odeint
        xs = solver(f, x0, t, **opts)
        loss = 0.5 * (xs[-1] ** 2).sum(-1).mean()
        grads = torch.autograd.grad(loss, [f.Q, f.K, f.V])
        del grads

    first, best = _timeit(fn, repeat)
    return {"first_s": first, "best_s": best}


def child(case, n, d, steps, repeat):
    if case.startswith("torch"):
        try:
            import torch  # noqa: F401
            import torchdiffeq  # noqa: F401
        except ImportError:
            print(json.dumps({"case": case, "skipped": "torch/torchdiffeq not installed"}))
            return
        res = run_torch(case, n, d, steps, repeat)
    else:
        res = run_jax(case, n, d, steps, repeat)
    res.update(case=case, peak_mb=_peak_mb())
    print(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.n, a.d, a.steps, a.repeat)
        return
    rows = []
    for case in a.cases.split(","):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            case,
            "--n",
            str(a.n),
            "--d",
            str(a.d),
            "--steps",
            str(a.steps),
            "--repeat",
            str(a.repeat),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in out.stdout.splitlines() if s.startswith("{")]
        if out.returncode != 0 or not line:
            err = (out.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"case": case, "skipped": f"failed: {err[:100]}"})
        else:
            rows.append(json.loads(line[-1]))
        print(f"  done {case}", file=sys.stderr, flush=True)
    ref = {r["case"]: r for r in rows if "best_s" in r}
    fwd = ref.get("forward-solve", {}).get("best_s")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} cores; n={a.n} d={a.d} rk4 steps={a.steps} float64; "
        f"gradient wrt Q, K, V ({3 * a.d * a.d} entries)"
    )
    print(f"{'case':16s} {'first s':>9s} {'best s':>9s} {'× fwd':>7s} {'peak MB':>9s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:16s} skipped ({r['skipped']})")
            continue
        ratio = f"{r['best_s'] / fwd:7.2f}" if fwd and r["case"] != "baseline" else "      -"
        print(f"{r['case']:16s} {r['first_s']:9.2f} {r['best_s']:9.3f} {ratio} {r['peak_mb']:9.0f}")
    if "forward-1dir" in ref:
        print(
            f"forward mode, full gradient (×{3 * a.d * a.d} directions) ≈ "
            f"{ref['forward-1dir']['best_s'] * 3 * a.d * a.d:.1f} s (extrapolated)"
        )
    tj, tt = ref.get("checkpoint"), ref.get("torch-autograd")
    if tj and tt:
        print(f"jaxattn checkpoint / torch autograd time: {tj['best_s'] / tt['best_s']:.2f}")
    tb, ta = ref.get("backsolve"), ref.get("torch-adjoint")
    if tb and ta:
        print(
            f"jaxattn backsolve / torchdiffeq odeint_adjoint time: "
            f"{tb['best_s'] / ta['best_s']:.2f}"
        )


if __name__ == "__main__":
    main()
