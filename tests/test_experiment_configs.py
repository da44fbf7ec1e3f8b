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


@pytest.mark.parametrize("name", NAMES)
def test_run_is_wrapped_to_compute_in_float64(name):
    """Every experiment's `run()` goes through `in_float64` (the wrapper's own code, the
    original kept as `__wrapped__`), and `help(run)` says that it computes in float64."""
    from jaxattn.experiments._common import in_float64

    mod = _module(name)
    assert mod.run.__code__ is in_float64(lambda: None).__code__
    assert callable(mod.run.__wrapped__)
    assert "Computes in float64" in mod.run.__doc__
    assert "summary.json" in mod.run.__doc__


def test_in_float64_from_a_float32_process():
    """From a float32 Python process the body sees 64-bit JAX (as under the CLI), its
    random tokens are the float64 draw, and the process's setting is restored, also when
    the body raises."""
    import jax
    import numpy as np

    from jaxattn.experiments._common import in_float64, uniform_tokens

    @in_float64
    def body(seed):
        x = uniform_tokens(seed, 2, 3, 2, -5.0, 5.0, jax.numpy.float64)
        return jax.config.read("jax_enable_x64"), np.asarray(x)

    @in_float64
    def fails():
        raise RuntimeError("boom")

    ref = np.asarray(uniform_tokens(7, 2, 3, 2, -5.0, 5.0, jax.numpy.float64))
    jax.config.update("jax_enable_x64", False)
    try:
        x64, x = body(7)
        assert x64 is True and x.dtype == np.float64
        assert jax.config.read("jax_enable_x64") is False
        with pytest.raises(RuntimeError):
            fails()
        assert jax.config.read("jax_enable_x64") is False
        # float32 tokens of the same seed: the float64 ones, rounded
        x32 = np.asarray(uniform_tokens(7, 2, 3, 2, -5.0, 5.0, jax.numpy.float32))
        assert x32.dtype == np.float32
    finally:
        jax.config.update("jax_enable_x64", True)
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_array_equal(x32, ref.astype(np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_every_option_with_its_description(name):
    """`help(Config)` (its docstring, also on the docs site) lists every option with its
    default, its `--quick` value and the description written beside it in the source;
    no option is left undescribed."""
    import pydoc

    from jaxattn._base.config import option_docs

    cfg_cls = _module(name).Config
    docs = option_docs(cfg_cls)
    text = pydoc.render_doc(cfg_cls, renderer=pydoc.plaintext)
    for f in dataclasses.fields(cfg_cls):
        assert f.name in docs, f"{name}: option {f.name} has no #: description"
        lines = [ln.lstrip(" |") for ln in text.splitlines()]
        line = next((ln for ln in lines if ln.startswith(f"- `{f.name}`")), None)
        assert line is not None, f"{name}: {f.name} missing from help()"
        assert docs[f.name].split()[0] in line
        if f.name in cfg_cls.QUICK:
            assert "--quick" in line
