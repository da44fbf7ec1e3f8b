"""`jaxattn reproduce NAME [--quick] --out DIR`: the paper's experiments
(background: docs/theory.md)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run one of the paper's experiments (--list names them)")
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--out", help="output folder (figures, data, summary.json)")
    p.add_argument("--quick", action="store_true", help="small, fast version (used in tests)")
    p.add_argument("--eps", help="comma-separated perturbation sizes, e.g. 0.01,0.002")
    p.add_argument("--x0", help="initial tokens from a .npy file, shape (n, d)")
    p.add_argument("--metric", help="departure-time metric: hausdorff (default) | paper")
    p.add_argument(
        "--seed",
        help="seed of the experiment's random initial conditions (its config's seed; "
        "a seed names the same tokens as in Python, in float64)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds files this experiment did not write there",
    )
    p.set_defaults(func=handle)


def check_experiment_out(out: str, name: str, command: str, force: bool) -> None:
    """The `--out` rule of `reproduce` and `demo`: an empty or new folder, an earlier
    output of the same experiment (its `summary.json` names it), a killed run's resumable
    state only (`chunks/`, `checkpoints/`: keyed by the settings that made them, so a
    resume never mixes runs), or `--force`. Anything else is refused before any work, so
    that no file of the user's (nor another experiment's results) is replaced by one of
    the same name."""
    import json

    if force or not os.path.isdir(out):
        return
    entries = sorted(e for e in os.listdir(out) if not e.startswith((".jaxattn-lock", ".tmp-")))
    if set(entries) <= {"chunks", "checkpoints"}:
        return
    owner = None
    summary = os.path.join(out, "summary.json")
    if os.path.isfile(summary) and not os.path.islink(summary):
        try:
            with open(summary, encoding="utf-8") as fh:
                data = json.load(fh)
            owner = data.get("experiment") if isinstance(data, dict) else None
        except (OSError, ValueError):
            owner = None
    if owner == name:
        return
    what = (
        f"the results of experiment {owner!r}"
        if isinstance(owner, str)
        else f"files that {command} did not write ({', '.join(entries[:3])}"
        + (", …)" if len(entries) > 3 else ")")
    )
    raise ValueError(
        f"--out {out} holds {what}; choose another folder, or pass --force to replace "
        "files of the same names"
    )


@contextlib.contextmanager
def experiment_out(out: str, name: str, command: str, force: bool) -> Iterator[str]:
    """Hold `out` for one experiment run: the `--out` rule checked before anything is
    created (a refused run leaves nothing), then the folder created and locked, and the
    rule checked again under the lock (another run may have written in between)."""
    from .._base import check_output_dir, output_lock

    check_output_dir(out, create=False)  # fail before any work
    check_experiment_out(out, name, command, force)
    out = check_output_dir(out)
    with output_lock(out):  # one writer per folder
        check_experiment_out(out, name, command, force)
        yield out


def parse_eps(text: str) -> list[float]:
    import math

    parts = [s.strip() for s in text.split(",")]
    if not parts or any(not s for s in parts):
        raise ValueError(f"--eps must be comma-separated numbers, got {text!r}")
    try:
        vals = [float(s) for s in parts]
    except ValueError:
        raise ValueError(f"--eps must be comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(v) or not 0 < v < 1 for v in vals):
        raise ValueError(
            f"--eps values must lie in (0, 1) (ε is the size of a perturbation "
            f"of V = I), got {text!r}"
        )
    return vals


def load_x0(path: str):
    import numpy as np

    from .._base import check_input_file

    check_input_file(path, "--x0 file")
    try:
        x0 = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(
            f"--x0 {path} is not a readable .npy array ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(x0, np.ndarray):  # an .npz archive of several arrays
        x0.close()
        raise ValueError(f"--x0 {path} is an .npz archive; give a .npy file of one (n, d) array")
    if x0.ndim != 2 or x0.shape[0] < 1 or x0.shape[1] < 1:
        raise ValueError(f"--x0 must hold an (n, d) array of tokens, got shape {x0.shape}")
    if x0.dtype.kind not in "fi" or not np.all(np.isfinite(x0)):
        raise ValueError("--x0 must hold finite real numbers")
    return x0.astype(np.float64)


def handle(args) -> int:
    from .. import experiments

    if args.list or not args.name:
        if not args.list:
            raise ValueError("give an experiment name, or --list")
        for name, desc in experiments.available().items():
            print(f"{name:18s} {desc}")
        return 0
    mod = experiments.get(args.name)
    if not args.out:
        raise ValueError("--out DIR is required")
    overrides = {}
    allowed = set(getattr(mod, "CLI_OPTIONS", ()))
    given = {k: getattr(args, k) for k in ("eps", "x0", "metric") if getattr(args, k) is not None}
    bad = sorted(set(given) - allowed)
    if bad:
        raise ValueError(f"experiment {args.name} does not take --{', --'.join(bad)}")
    if "eps" in given:
        overrides["eps"] = parse_eps(given["eps"])
    if "x0" in given:
        overrides["x0"] = load_x0(given["x0"])
    if args.seed is not None:
        import dataclasses

        if "seed" not in {f.name for f in dataclasses.fields(mod.Config)}:
            raise ValueError(
                f"experiment {args.name} has no seed option (its random inputs are fixed "
                "by its config)"
            )
        from .._base import check_seed

        try:
            seed = int(args.seed)
        except ValueError:
            raise ValueError(f"--seed must be a non-negative integer, got {args.seed!r}") from None
        overrides["seed"] = check_seed(seed, "--seed")
    if "metric" in given:
        if given["metric"] not in ("hausdorff", "paper"):
            raise ValueError(f"unknown metric {given['metric']!r}; choose hausdorff or paper")
        overrides["metric"] = given["metric"]
    from .._base import setup_jax

    mod.Config.build(args.quick, **overrides)  # every option checked before --out is made
    with experiment_out(args.out, mod.NAME, f"jaxattn reproduce {mod.NAME}", args.force):
        setup_jax("float64")
        mod.run(args.out, quick=args.quick, **overrides)
    print(f"figures, data and summary.json in {args.out}")
    return 0
