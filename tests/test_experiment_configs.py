"""Every experiment takes its options through one typed, frozen config class: unknown keys
and wrong types are one-line errors before any work or output, and the defaults and quick
overrides are themselves valid values of the declared types."""

import dataclasses
import typing
from typing import Any, Literal

import pytest

from jaxattn import experiments
from jaxattn._base.config import ExperimentConfig, coerce

NAMES = list(experiments.available())


def _module(name):
    return experiments.get(name)


@pytest.mark.parametrize("name", NAMES)
def test_config_class_declared(name):
    mod = _module(name)
    assert issubclass(mod.Config, ExperimentConfig)
    assert dataclasses.is_dataclass(mod.Config)
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    assert set(mod.Config.QUICK) <= fields, set(mod.Config.QUICK) - fields
    for opt in getattr(mod, "CLI_OPTIONS", ()):
        assert opt in fields


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quick", [False, True])
def test_defaults_have_declared_types(name, quick):
    """Building re-checks every value: the defaults and QUICK pass their own types, and
    coercion leaves them unchanged (no silent list/tuple or int/float drift)."""
    mod = _module(name)
    cfg = mod.Config.build(quick=quick)
    hints = typing.get_type_hints(mod.Config)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        assert coerce(v, hints[f.name], f.name) == v or v is None, f.name


@pytest.mark.parametrize("name", NAMES)
def test_config_is_frozen(name):
    cfg = _module(name).Config.build()
    f = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, f, None)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_rejected_before_output(name, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown option 'nonsense'"):
        _module(name).run(out, quick=True, nonsense=1)
    assert not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_wrong_type_rejected(name, tmp_path):
    mod = _module(name)
    hints = typing.get_type_hints(mod.Config)
    # the first option with a checked scalar type gets a string
    key = next(
        f.name
        for f in dataclasses.fields(mod.Config)
        if hints[f.name] in (int, float, bool) or typing.get_origin(hints[f.name]) is tuple
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=key):
        mod.run(out, quick=True, **{key: "not-a-value"})
    assert not out.exists()


def test_coerce_rules():
    assert coerce(2, float, "x") == 2.0 and isinstance(coerce(2, float, "x"), float)
    assert coerce([1, 2], tuple[float, ...], "x") == (1.0, 2.0)
    assert coerce(None, int | None, "x") is None
    assert coerce("a", Literal["a", "b"], "x") == "a"
    assert coerce(object, Any, "x") is object
    for bad, hint in [
        (2.5, int),
        (True, int),
        ("1", float),
        (float("nan"), float),
        ("ab", tuple[str, ...]),
        ("c", Literal["a", "b"]),
        (1, bool),
        (3, str),
    ]:
        with pytest.raises(ValueError, match="x"):
            coerce(bad, hint, "x")
