"""CLI subcommands beyond `simulate` and `demo`.

Each module here defines `register(subparsers)`, which adds its parser(s) with
`set_defaults(func=handler)`; `handler(args) -> int` does the work. Registration must be
cheap: heavy imports (jax, matplotlib, model code) happen inside the handler. A module is
listed in `MODULES` to be picked up by `jaxattn.cli`.
"""

MODULES: list[str] = []
