"""Typed, frozen experiment configurations.

Each experiment declares its options once, as a frozen dataclass deriving from
`ExperimentConfig`: the field's type says what a value must be, its default is the full
study, and the class attribute `QUICK` holds the overrides of the small version
(`--quick`, the tests, the docs build). `Config.build(quick, **overrides)` is the one
boundary every caller goes through — `run()`, the CLI, notebooks, tests: an unknown key
or a value of the wrong type is a one-line `ValueError` naming the option, and what comes
out is checked and immutable, so nothing inside `run()` can change it by accident
(`dataclasses.replace` makes an explicit modified copy).

Supported field types: `int`, `float`, `bool`, `str`, `tuple[X, ...]` of those,
`X | None`, `Literal[...]`, and `Any` (passed through unchecked; e.g. an initial-token
array).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from .validate import check_int, check_number

C = TypeVar("C", bound="ExperimentConfig")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Base class of the experiments' configurations (see the module docstring)."""

    #: overrides applied by `build(quick=True)`
    QUICK: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = _with_options(cls)

    @classmethod
    def build(cls: type[C], quick: bool = False, **overrides: Any) -> C:
        """The configuration: defaults, then `QUICK` if `quick`, then `overrides`, each
        value checked against its field's type. Unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(
                f"unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(names)}"
            )
        hints = typing.get_type_hints(cls)
        values = {**(cls.QUICK if quick else {}), **overrides}
        checked = {k: coerce(v, hints[k], k) for k, v in values.items()}
        cfg = cls(**checked)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Checks across options (sizes, shapes), run by `build` before any work: a
        one-line `ValueError`. Experiments override it; the base checks nothing."""

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (tuples kept), e.g. for `summary.json`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __getitem__(self, key: str) -> Any:
        # Read-only mapping access, so helpers written for option dicts (`config_key`)
        # take a config too.
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the type `hint` (see the module docstring); numbers are
    normalised (an int where a float is asked becomes a float, a list becomes a tuple)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        items = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise ValueError(f"{name} must have {len(args)} entries, got {len(items)}")
        return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    if hint is int:
        return check_int(value, name, minimum=-(2**63))
    if hint is float:
        return check_number(value, name)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {name}")  # a bug, not user input


_PLAIN = (int, float, bool, str, type(None))


def plain_hints(cls: type) -> dict[str, Any]:
    """The field types of a dataclass with the members plain data cannot hold (objects,
    arrays) left out of each union: what `coerce` checks a value read from a file against
    (`str | AbstractSolver` → `str`; `tuple[float, ...] | ArrayLike | None` →
    `tuple[float, ...] | None`)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        keep = [a for a in args if a in _PLAIN or typing.get_origin(a) is tuple]
        out[name] = functools.reduce(operator.or_, keep)
    return out


_OPTION_LINE = re.compile(r"^(\s+)(\w+)\s*:\s*[^=]+?(?:=\s*(.*?))?\s*(?:#:\s*(.*))?$")


def option_docs(cls: type) -> dict[str, str]:
    """The description of each option of a config class, from its source: the `#:`
    comment at the end of the option's line, or the `#:` lines just above it."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (an interactive session)
        return {}
    own = set(inspect.get_annotations(cls))
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _OPTION_LINE.match(line)
        if m and m.group(2) in own and not stripped.startswith(("def ", "@")):
            text = m.group(4) or " ".join(pending)
            if text:
                docs[m.group(2)] = text
        if stripped and not stripped.startswith("#"):
            pending = []
    return docs


def _with_options(cls: type) -> str:
    """`cls`'s docstring followed by its options (default, `--quick` value and
    description), as `help()` shows them (the docs site reads the source docstring)."""
    import inspect

    hints = inspect.get_annotations(cls)
    docs = option_docs(cls)
    quick = cls.__dict__.get("QUICK", {})
    rows = []
    for name, hint in hints.items():
        if name.startswith("_") or str(hint).startswith(("ClassVar", "typing.ClassVar")):
            continue
        default = cls.__dict__.get(name, dataclasses.MISSING)
        shown = (
            "required" if default is dataclasses.MISSING else f"default `{_short_repr(default)}`"
        )
        q = f"; `--quick`: `{_short_repr(quick[name])}`" if name in quick else ""
        text = docs.get(name, "")
        rows.append(f"    - `{name}` ({shown}{q}){': ' + text if text else ''}")
    head = (cls.__doc__ or "").rstrip()
    if not rows:
        return head
    return (
        f"{head}\n\n    **Options** (`Config.build(quick, **overrides)` checks each):\n\n"
        + "\n".join(rows)
        + "\n"
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    if isinstance(value, tuple) and len(text) > 60:
        text = f"({_short_repr(value[0])}, …, {_short_repr(value[-1])}) ({len(value)} values)"
    return text
