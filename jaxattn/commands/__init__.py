"""CLI subcommands beyond `simulate` and `demo`, discovered automatically.

Each module here defines `register(subparsers)`, which adds its parser(s) with
`set_defaults(func=handler)`; `handler(args) -> int` does the work. Registration must be
cheap: heavy imports (jax, matplotlib, model code) happen inside the handler.
"""

import pkgutil


def module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
