"""The `jaxattn` command line: `simulate`, `demo`.

User mistakes get one line on stderr and exit status 2, never a traceback, and no output
file is left behind (outputs are written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._setup import setup_jax as setup_jax  # also public as jaxattn.setup_jax

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def cmd_simulate(args) -> int:
    from ._io import check_output_file, write_npz
    from ._spec import load_spec_file, parse_spec

    out = check_output_file(
        args.out, inputs=[args.spec], own=("ts", "xs", "status", "spec"), force=args.force
    )
    raw = load_spec_file(args.spec)
    setup_jax(raw.get("dtype", "float64") if isinstance(raw.get("dtype"), str) else "float64")
    sim = parse_spec(raw)
    from ._simulate import simulate

    t0 = time.perf_counter()
    sol = simulate(sim.field, sim.x0, sim.t1, progress=args.progress, **sim.solve)
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


def cmd_demo(args) -> int:
    from ._io import check_output_dir

    out = check_output_dir(args.out)
    setup_jax("float64")
    from .experiments import lora_divergence

    summary = lora_divergence.run(out, quick=args.quick, compare_targets=False, gif=False)
    print(f"figures and summary.json in {out}")
    del summary
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxattn", description="Transformers as interacting particle systems.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("simulate", help="solve the dynamics of a TOML/JSON spec")
    s.add_argument("spec", help="spec file (.toml or .json)")
    s.add_argument("--out", required=True, help="output .npz (ts, xs, status, spec)")
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file that is not an earlier simulate output",
    )
    s.set_defaults(func=cmd_simulate)
    d = sub.add_parser("demo", help="original vs LoRA run, divergence and bound")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="smaller, faster version")
    d.set_defaults(func=cmd_demo)
    import importlib

    from .commands import module_names

    for name in module_names():
        importlib.import_module(f"jaxattn.commands.{name}").register(sub)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"jaxattn: warning: {message}\n"


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    # The CLI only writes figure files: a headless matplotlib backend unless the user
    # chose one (read by matplotlib when it is first imported; the library never sets it).
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror or msg}: {e.filename}"
        print(f"jaxattn: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(
            "jaxattn: error: out of memory (lower the sizes, or see JAXATTN_MAX_MEMORY)",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:  # a computation that failed (not a usage error): no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jaxattn: error: {msg[:300]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
