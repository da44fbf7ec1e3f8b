"""The `jaxattn` command line: one module per subcommand in this package.

Each subcommand module defines `register(subparsers)`, which adds its parser with
`set_defaults(func=handle)`; `handle(args) -> int` does the work. Registration is cheap:
heavy imports (jax, matplotlib, model code) happen inside the handlers. Values are checked
once, at this boundary, by the package's validation helpers (`jaxattn._validate`, and the
spec / config parsers built on them).

User mistakes get one line on stderr and exit status 2, never a traceback, and no output
file is left behind (outputs are written atomically).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .._base import setup_jax as setup_jax  # also public as jaxattn.setup_jax

#: the subcommands, in the order `jaxattn --help` lists them (module names in this package)
COMMANDS = ("simulate", "demo", "modular", "real_model", "reproduce", "sensitivity", "sweep")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxattn", description="Transformers as interacting particle systems.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
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
