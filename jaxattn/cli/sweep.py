"""`jaxattn sweep spec.toml --out DIR`: a grid of simulations as resumable, sharded
chunks."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a spec's [grid] (ε × seeds × targets × β …) as resumable chunks",
        description="Runs every point of the spec's [grid] (Cartesian product) as chunks of "
        "vmapped solves sharded across the local devices; saves summaries at "
        "fixed times to DIR/result.npz. Rerunning the same command resumes a "
        "killed sweep.",
    )
    p.add_argument("spec", help="sweep spec (.toml or .json): a simulate spec plus [grid]")
    p.add_argument("--out", required=True, help="output folder (chunks/, result.npz, summary.json)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or log lines (failures are still reported on stderr)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allow an output folder holding a "
        "summary.json, sweep.png or result.npz that this sweep did not write",
    )
    p.add_argument(
        "--process-index",
        type=int,
        help="this host's index (several hosts sharing --out; default from jax.distributed)",
    )
    p.add_argument(
        "--process-count", type=int, help="number of hosts (default from jax.distributed)"
    )
    p.set_defaults(func=handle)


def handle(args) -> int:
    from .._base import setup_jax
    from .._spec import load_spec_file

    raw = load_spec_file(args.spec)
    dtype = raw.get("dtype", "float64")
    setup_jax(dtype if isinstance(dtype, str) else "float64")
    from .._sweep import parse_sweep, sweep

    plan = parse_sweep(raw)  # every spec/grid error surfaces here, before any output
    if (args.process_index is None) != (args.process_count is None):
        raise ValueError("give both --process-index and --process-count, or neither")
    log = None if args.quiet else print
    result = sweep(
        plan,
        args.out,
        progress=not args.quiet,
        log=log,
        process_index=args.process_index,
        process_count=args.process_count,
        force=args.force,
    )
    if result is None:
        return 0
    failed = int((result["status"] != 0).sum())
    if failed:
        print(
            f"jaxattn: {failed} of {plan.n_points} points failed (status in {args.out}/result.npz)",
            file=sys.stderr,
        )
    return 0 if not failed else 1
