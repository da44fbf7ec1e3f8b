"""The public API is learnable from `help(jaxattn)`: every public name is in `__all__`
with a docstring, every type a public function returns or raises is public, and the
docs, README, benchmarks and notebooks use public names, not private modules."""

import inspect
import json
import pathlib
import re

import numpy as np
import pytest
from helpers import unchecked

import jaxattn as ja
import jaxattn._base.io as _io
import jaxattn._sensitivity as _sensitivity
import jaxattn._spec.spec as _spec
import jaxattn._sweep.chunks as _chunks
import jaxattn._sweep.grid as _grid
from jaxattn import cli

ROOT = pathlib.Path(__file__).parent.parent


# ----------------------------------------------------------------------------- __all__
def test_all_lists_exactly_the_public_names():
    assert len(ja.__all__) == len(set(ja.__all__)), "a name appears twice in __all__"
    public = {n for n in dir(ja) if not n.startswith("_") and not inspect.ismodule(getattr(ja, n))}
    assert set(ja.__all__) == public


@pytest.mark.parametrize("name", ja.__all__)
def test_public_name_resolves_and_has_a_docstring(name):
    obj = getattr(ja, name)
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        # A dataclass without a docstring gets its signature as __doc__.
        assert doc and not doc.startswith(f"{obj.__name__}("), f"{name} has no docstring"
    elif callable(obj):
        assert inspect.getdoc(obj), f"{name} has no docstring"
    else:  # data: STATUS_MESSAGES
        assert name.isupper(), f"{name} is neither a class, a function nor a constant"


def test_help_shows_the_public_names():
    import pydoc

    text = pydoc.render_doc(ja, renderer=pydoc.plaintext)
    # Each name heads an entry of its own ("class Name(...)", "name(...)", "NAME = ...").
    missing = [n for n in ja.__all__ if not re.search(rf"^ *(class )?{n}\b", text, re.M)]
    assert not missing, f"help(jaxattn) does not show {missing}"


# ----------------------------------------------------------------------------- types
EXPECTED = {
    # sensitivity: what the public functions return
    "Gradient": _sensitivity.Gradient,
    "LinearResponse": _sensitivity.LinearResponse,
    "WorstCase": _sensitivity.WorstCase,
    "ClusterChange": _sensitivity.ClusterChange,
    "ResponseOperator": _sensitivity.ResponseOperator,
    # sweeps and specs: what they return and raise
    "SweepPlan": _grid.SweepPlan,
    "SweepError": _chunks.SweepError,
    "OutputBusyError": _io.OutputBusyError,
    "OutputLockError": _io.OutputLockError,
    "Simulation": _spec.Simulation,
    "SpecError": _spec.SpecError,
    # functions under one public name each
    "objective_value_and_grad": _sensitivity.objective_value_and_grad,
    "load_spec": _spec.load_spec_file,
    "parse_spec": _spec.parse_spec,
    "parse_sweep": _grid.parse_sweep,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_returned_and_raised_types_are_public(name):
    assert getattr(ja, name) is EXPECTED[name]
    assert name in ja.__all__


def test_setup_jax_has_one_public_home():
    assert ja.setup_jax is cli.setup_jax  # the old import path keeps working


def test_every_error_and_warning_of_the_core_is_public():
    # What a public function raises or warns must be catchable by a public name.
    import importlib
    import pkgutil

    missing = []
    for info in pkgutil.iter_modules(ja.__path__):
        if not info.name.startswith("_") or info.name.startswith("__"):
            continue
        mod = importlib.import_module(f"jaxattn.{info.name}")
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
                and getattr(ja, name, None) is not obj
            ):
                missing.append(f"{mod.__name__}.{name}")
    assert not missing, f"errors/warnings without a public name: {missing}"


def _annotated_jaxattn_classes(fn):
    """The jaxattn classes named in `fn`'s return annotation."""
    fn = inspect.unwrap(fn)
    ann = getattr(fn, "__annotations__", {}).get("return")
    if ann is None:
        return set()
    if not isinstance(ann, str):
        ann = repr(ann)
    found = set()
    for ident in re.findall(r"[A-Za-z_]\w*", ann):
        obj = fn.__globals__.get(ident)
        if inspect.isclass(obj) and obj.__module__.startswith("jaxattn."):
            found.add(obj)
    return found


def _public_callables():
    for name in ja.__all__:
        obj = getattr(ja, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__.startswith("jaxattn."):
            for m, f in vars(obj).items():
                f = f.__func__ if isinstance(f, (staticmethod, classmethod)) else f
                f = f.fget if isinstance(f, property) else f
                if not m.startswith("_") and inspect.isfunction(f):
                    yield f"{name}.{m}", f


def test_every_annotated_return_type_is_public():
    missing = {}
    for where, fn in _public_callables():
        for cls in _annotated_jaxattn_classes(fn):
            if getattr(ja, cls.__name__, None) is not cls:
                missing[where] = f"{cls.__module__}.{cls.__name__}"
    assert not missing, f"returned types not reachable as jaxattn.<Name>: {missing}"


# ------------------------------------------------------------- no private imports in docs
def _user_facing_texts():
    files = [ROOT / "README.md"]
    files += [
        p
        for p in sorted((ROOT / "docs").rglob("*.md"))
        if p.name != "modular.md" and "modular" not in p.relative_to(ROOT / "docs").parts
    ]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    files += sorted((ROOT / "benchmarks").glob("*.md"))
    for p in files:
        yield str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(p.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            src = cell["source"]
            yield f"notebooks/{p.name} cell {i}", src if isinstance(src, str) else "".join(src)


_FROM_PRIVATE = re.compile(r"from\s+jaxattn\.(_[\w.]+)\s+import\s+\(?([\w\s,]+)\)?")


def _private_uses(text):
    """(line, why) for each use of a private jaxattn module where a public name exists.

    `from jaxattn._mod import a, b` is allowed only for names that `jaxattn` does not
    export (internals a benchmark times on purpose, like the sweep's point builder);
    `from jaxattn import _mod`, `import jaxattn._mod` and prose naming a private module
    are not."""
    bad = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if re.search(r"from\s+jaxattn\s+import\s+.*\b_(?!_)\w+", line):
            bad.append((lineno, line.strip()))
            continue
        if not re.search(r"jaxattn\._(?!_)", line):  # jaxattn.__all__ is public
            continue
        m = _FROM_PRIVATE.search(line)
        if m is None:
            bad.append((lineno, line.strip()))
            continue
        names = [n.split(" as ")[0].strip() for n in m.group(2).split(",") if n.strip()]
        public = [n for n in names if n in ja.__all__]
        if public:
            bad.append((lineno, f"{line.strip()}  (public: {', '.join(public)})"))
    return bad


def test_no_private_imports_in_docs_benchmarks_notebooks():
    bad = {
        f"{where}:{lineno}": line
        for where, text in _user_facing_texts()
        for lineno, line in _private_uses(text)
    }
    assert not bad, "private jaxattn modules used where public names exist:\n" + "\n".join(
        f"{k}: {v}" for k, v in bad.items()
    )


def test_setup_jax_comes_from_jaxattn_in_docs_and_notebooks():
    old = [
        where
        for where, text in _user_facing_texts()
        if re.search(r"from\s+jaxattn\.cli\s+import\s+setup_jax", text)
    ]
    assert not old, f"import setup_jax from jaxattn, not jaxattn.cli: {old}"


def test_private_use_detector():
    assert _private_uses("from jaxattn import _sensitivity as S")
    assert _private_uses("import jaxattn._analysis.metrics")
    assert _private_uses("`jaxattn._sensitivity` differentiates")
    assert _private_uses("from jaxattn._sweep.runner import _PointBuilder, parse_sweep")
    assert not _private_uses("from jaxattn._sweep.runner import _PointBuilder")
    assert not _private_uses("from jaxattn import load_spec, parse_spec")
    assert not _private_uses("`jaxattn.__all__` lists them; from jaxattn import __version__")


# ----------------------------------------------------------------------------- specs
SPEC_TOML = """\
dynamics = "rescaled"
beta = 2.0

[init]
x0 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]

[lora]
target = "V"
A = [[0.1, 0.2]]
B = [[0.3], [0.4]]

[solve]
t1 = 1.0
dt = 0.1
"""


def test_load_and_parse_spec_round_trip(tmp_path):
    import tomllib

    path = tmp_path / "run.toml"
    path.write_text(SPEC_TOML, encoding="utf-8")
    raw = ja.load_spec(path)
    assert raw == tomllib.loads(SPEC_TOML)
    sim = ja.parse_spec(raw)
    assert isinstance(sim, ja.Simulation)
    assert isinstance(sim.field, ja.AbstractField) and sim.t1 == 1.0
    np.testing.assert_array_equal(np.asarray(sim.x0), raw["init"]["x0"])
    # The resolved spec, written as JSON and read back, is the same simulation.
    again_path = tmp_path / "resolved.json"
    again_path.write_text(json.dumps(sim.resolved), encoding="utf-8")
    again = ja.parse_spec(ja.load_spec(again_path))
    assert again.resolved == sim.resolved
    assert again.solve == sim.solve and again.t1 == sim.t1
    np.testing.assert_array_equal(np.asarray(again.x0), np.asarray(sim.x0))
    a = ja.simulate(sim.field, sim.x0, sim.t1, **sim.solve)
    b = ja.simulate(again.field, again.x0, again.t1, **again.solve)
    np.testing.assert_array_equal(np.asarray(a.xs), np.asarray(b.xs))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"init": {"x0": [[0.0, 1.0]]}, "solve": {"t1": 1.0}, "colour": 1}, "unknown key"),
        ({"init": {"x0": [[0.0, 1.0]]}}, "needs t1"),
        ({"init": {"x0": [[0.0, 1.0]]}, "solve": {"t1": 1.0}, "beta": -1.0}, "beta"),
        ("not a table", "table/object"),
    ],
)
def test_bad_spec_raises_spec_error_in_one_line(spec, match):
    # parse_spec's own checks (a spec that is not a dict is refused by its annotation too)
    with unchecked(), pytest.raises(ja.SpecError, match=match) as info:
        ja.parse_spec(spec)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_spec_file_raises_spec_error_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("beta = = 1\n", encoding="utf-8")
    with pytest.raises(ja.SpecError) as info:
        ja.load_spec(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ja.SpecError, match="not found"):
        ja.load_spec(tmp_path / "missing.toml")


def test_sweep_spec_goes_through_load_spec(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(
        json.dumps(
            {
                "init": {"kind": "uniform", "n": 4, "d": 2},
                "solve": {"t1": 1.0, "dt": 0.1},
                "grid": {"beta": [0.5, 1.0, 2.0]},
            }
        ),
        encoding="utf-8",
    )
    plan = ja.parse_sweep(ja.load_spec(path))
    assert isinstance(plan, ja.SweepPlan) and plan.n_points == 3
    assert isinstance(ja.parse_spec(plan.point_spec(1)), ja.Simulation)
    with pytest.raises(ja.SweepError):
        ja.parse_sweep({"init": {"x0": [[0.0, 1.0]]}, "solve": {"t1": 1.0}})


def test_fields_abstract_or_final():
    """Equinox's abstract-or-final rule: a concrete field class only implements what its
    bases leave abstract; it never overrides a base's concrete method."""
    import inspect

    import equinox as eqx

    from jaxattn._model.fields import FIELDS

    for cls in FIELDS.values():
        assert not inspect.isabstract(cls), cls
        for name, value in vars(cls).items():
            if not callable(value) or (name.startswith("__") and name != "__call__"):
                continue
            for base in cls.__mro__[1:]:
                if base in (eqx.Module, object) or name not in vars(base):
                    continue
                assert getattr(vars(base)[name], "__isabstractmethod__", False), (
                    f"{cls.__name__}.{name} overrides the concrete {base.__name__}.{name}"
                )


def _private_names_imported_across_modules(root):
    """`(file, module.name)` for every `from .mod import _name` and `alias._name` (with
    `alias` bound by a relative import) inside the package: a module reaching into another
    module's private names instead of its documented internal surface."""
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        # private *modules* (`from . import _plots`) are the package's layout
                        if node.module is not None:
                            found.append((path.name, f"{node.module}.{a.name}"))
                        else:
                            aliases.add(a.asname or a.name)
                    elif node.module is None:
                        aliases.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append((path.name, f"{node.value.id}.{node.attr}"))
    return found


def test_no_private_names_imported_between_package_modules(tmp_path):
    import pathlib

    import jaxattn

    root = pathlib.Path(jaxattn.__file__).parent
    assert _private_names_imported_across_modules(root) == []
    # the detector itself finds both forms
    (tmp_path / "a.py").write_text("from ._b import _hidden\nfrom . import _c as c\nc._x\n")
    assert _private_names_imported_across_modules(tmp_path) == [
        ("a.py", "_b._hidden"),
        ("a.py", "c._x"),
    ]


# ------------------------------------------------------------------ runtime type checks
def test_runtime_type_checks_are_on():
    """pyproject's `addopts` has jaxtyping's import hook instrument `jaxattn` with beartype
    (`--jaxtyping-packages=jaxattn,beartype.beartype(...)`), so the test suite checks
    every annotated call, shapes included. Both calls below run silently without it."""
    import jax.numpy as jnp
    from jaxtyping import TypeCheckError

    import jaxattn._analysis.metrics as _metrics

    assert type(_metrics.__loader__).__name__ == "_JaxtypingLoader", (
        "jaxattn was imported without jaxtyping's import hook (is --jaxtyping-packages "
        "missing from addopts, or was jaxattn imported before the plugin ran?)"
    )
    # wrong dtype: an attention matrix holds floats, not integers (shapes are checked
    # by the metrics themselves, `_batched`)
    with pytest.raises(TypeCheckError, match="P"):
        ja.booleanness(jnp.zeros((3, 3), jnp.int32))
    # wrong type: a threshold is a number, not a string
    with pytest.raises(TypeCheckError, match="delta"):
        ja.chord_from_cosine_gap("0.1")


@pytest.mark.slow
def test_readme_snippet_in_float32_gives_the_demos_numbers(capsys):
    """The README's first Python snippet, run as a new user runs it (float32, no
    `setup_jax`), draws the demo's tokens (seed 0, rounded) and prints the demo's numbers:
    the same cluster counts and the final divergence of `docs/demo/summary.json` to 1e-4
    relative (float32 against float64 over 400 RK4 steps)."""
    import jax

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    summary = json.loads((ROOT / "docs" / "demo" / "summary.json").read_text())
    jax.config.update("jax_enable_x64", False)
    try:
        with unchecked():
            exec(compile(code.group(1), "README.md", "exec"), {})
    finally:
        jax.config.update("jax_enable_x64", True)
    words = capsys.readouterr().out.split()
    assert int(words[0]) == summary["clusters_original"]
    assert int(words[1]) == summary["clusters_lora"]
    assert abs(float(words[2]) / summary["final_divergence"] - 1) < 1e-4
