"""`jaxattn simulate SPEC --out OUT.npz`: solve the dynamics a TOML/JSON spec describes
(the spec format: the README, "jaxattn simulate")."""

from __future__ import annotations

import json
import os
import sys
import time

from .._base import setup_jax


def register(sub) -> None:
    s = sub.add_parser("simulate", help="solve the dynamics of a TOML/JSON spec")
    s.add_argument("spec", help="spec file (.toml or .json)")
    s.add_argument("--out", required=True, help="output .npz (ts, xs, status, spec)")
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file that is not an earlier simulate output",
    )
    s.set_defaults(func=handle)


def handle(args) -> int:
    from .._base import check_output_file, write_npz
    from .._spec import load_spec_file, parse_spec

    out = check_output_file(
        args.out, inputs=[args.spec], own=("ts", "xs", "status", "spec"), force=args.force
    )
    raw = load_spec_file(args.spec)
    setup_jax(raw.get("dtype", "float64") if isinstance(raw.get("dtype"), str) else "float64")
    sim = parse_spec(raw)
    from .._simulate import simulate

    t0 = time.perf_counter()
    options = sim.solve.replace(progress=True) if args.progress else sim.solve
    sol = simulate(sim.field, sim.x0, sim.t1, options=options)
    xs = sol.xs.block_until_ready()
    wall = time.perf_counter() - t0
    import numpy as np

    msg = "ok" if sol.ok else "; ".join(sol.messages())
    if not sol.ok and os.path.exists(out):
        # An existing file is replaced only by a successful run.
        print(f"jaxattn: the solve failed ({msg}); {out} was left unchanged", file=sys.stderr)
        return 1
    extra = {}
    if sol.norm_drift is not None:
        extra["norm_drift"] = np.asarray(sol.norm_drift)
    write_npz(
        out,
        ts=np.asarray(sol.ts),
        xs=np.asarray(xs),
        status=np.asarray(sol.status),
        num_steps=np.asarray(sol.num_steps),
        spec=json.dumps(sim.resolved),
        **extra,
    )
    print(
        f"wrote {out}: {xs.shape[0]} times × {xs.shape[1]} tokens × d = {xs.shape[2]} "
        f"({int(sol.num_steps)} steps, {wall:.2f} s, status: {msg})"
    )
    return 0 if sol.ok else 1
