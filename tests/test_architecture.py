"""The package's layers, as docs/architecture.md writes them once, held by a test.

The page's `layers` block lists the layers from the top down, each with its packages
(folders of `jaxattn/`, or a top-level module). A module may import its own package and
the layers *below* its own, nothing beside or above it; an import from another package
names that package (its `__init__`, which lists the internal surface other layers may use),
never a module inside it. Imports under `if TYPE_CHECKING:` count too.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxattn"
PAGE = ROOT / "docs" / "architecture.md"


def read_layers(text: str) -> list[tuple[str, list[str]]]:
    """`[(layer, [package, ...]), ...]` from the top down, from the fenced block that
    follows the line `<!-- layers -->` (each line: a layer name, then its packages:
    `name/` for a folder, `name.py` for a module; anything after `#` is a comment)."""
    m = re.search(r"<!-- layers -->\s*```[a-z]*\n(.*?)```", text, re.S)
    if m is None:
        raise AssertionError("docs/architecture.md has no `<!-- layers -->` block")
    layers = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, *packages = line.split()
        layers.append((name, [p.rstrip("/").removesuffix(".py") for p in packages]))
    return layers


def _package(path: pathlib.Path) -> str:
    """The top-level package (or module) of `jaxattn` a file belongs to."""
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def _module_name(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: pathlib.Path) -> list[tuple[int, list[str]]]:
    """`(line, target)` for each import of a `jaxattn` module or name in a file, with
    `target` the absolute dotted path split into parts (`from .._model import LoRA` in
    `jaxattn/_sweep/runner.py` gives `['jaxattn', '_model', 'LoRA']`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.split("."))
                for a in node.names
                if a.name.split(".")[0] == "jaxattn"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            else:
                base = []
            mod = base + (node.module.split(".") if node.module else [])
            if not mod or mod[0] != "jaxattn":
                continue
            found += [(node.lineno, [*mod, a.name]) for a in node.names]
    return found


def _is_module(parts: list[str]) -> bool:
    p = ROOT.joinpath(*parts)
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _reaches_inside(target: list[str]) -> bool:
    """An import that names a module inside another package instead of the package: any
    module of a private package (`jaxattn._model.fields`), or a private module of a public
    one (`jaxattn.modular._config`); a public package's public modules
    (`jaxattn.experiments.lora_divergence`) are part of the API."""
    inner = [p for p in target[2:] if _is_module(target[: target.index(p) + 1])]
    if not inner:
        return False
    return target[1].startswith("_") or any(p.startswith("_") for p in inner)


def violations(layers: list[tuple[str, list[str]]]) -> list[str]:
    rank = {pkg: i for i, (_, pkgs) in enumerate(reversed(layers)) for pkg in pkgs}
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "__init__.py":  # the public face imports every layer
            continue
        src = _package(path)
        where = f"{path.relative_to(ROOT)}"
        if src not in rank:
            bad.append(f"{where}: package {src} is in no layer")
            continue
        for line, target in imports(path):
            if len(target) < 2:
                continue
            # `from .. import plotting` names a package; `from .. import __version__` the top
            dst = target[1] if len(target) > 1 else ""
            if not _is_module(["jaxattn", dst]):  # a name of jaxattn itself
                bad.append(f"{where}:{line}: imports jaxattn.{dst} from the top package")
                continue
            if dst == src:
                continue
            if dst not in rank:
                bad.append(f"{where}:{line}: imports {dst}, which is in no layer")
            elif rank[dst] >= rank[src]:
                bad.append(f"{where}:{line}: {src} imports {dst}, which is not below it")
            elif _reaches_inside(target):
                bad.append(
                    f"{where}:{line}: imports {'.'.join(target)}: import from {dst} "
                    "itself (its __init__ is the surface other layers use)"
                )
    return bad


def test_layers_block_places_every_package():
    layers = read_layers(PAGE.read_text(encoding="utf-8"))
    placed = [p for _, pkgs in layers for p in pkgs]
    assert len(placed) == len(set(placed)), "a package is placed twice"
    present = {
        p.name.removesuffix(".py")
        for p in PKG.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.name != "__init__.py")
    }
    assert present == set(placed), (
        f"not on the page: {sorted(present - set(placed))}; "
        f"on the page, not in jaxattn/: {sorted(set(placed) - present)}"
    )


def test_imports_follow_the_layers():
    bad = violations(read_layers(PAGE.read_text(encoding="utf-8")))
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_page_names_every_module():
    """Every module of the layered core (the private packages) is named on the page: a
    new module gets a place."""
    text = PAGE.read_text(encoding="utf-8")
    missing = [
        str(p.relative_to(PKG))
        for p in sorted(PKG.glob("_*/*.py"))
        if p.name != "__init__.py" and p.stem not in text
    ]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_checker_finds_upward_sideways_and_deep_imports(tmp_path, monkeypatch):
    import sys

    me = sys.modules[__name__]
    pkg = tmp_path / "jaxattn"
    for name in ("_low", "_mid", "_side", "_high"):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
        (pkg / name / "mod.py").write_text("")
    (pkg / "__init__.py").write_text("from ._high import x\n")
    (pkg / "_mid" / "mod.py").write_text(
        "from .._low import ok\n"  # below, through the package: fine
        "from . import mod\n"  # its own package: fine
        "from .._high import up\n"  # above
        "from .._side import beside\n"  # same layer
        "from .._low.mod import deep\n"  # a module inside another package
        "if False:\n    import jaxattn._high.mod\n"  # nested, absolute, above
    )
    monkeypatch.setattr(me, "ROOT", tmp_path)
    monkeypatch.setattr(me, "PKG", pkg)
    layers = [("top", ["_high"]), ("middle", ["_mid", "_side"]), ("bottom", ["_low"])]
    found = violations(layers)
    assert len(found) == 4, found
    assert any("_mid imports _high" in v for v in found)
    assert any("_mid imports _side" in v for v in found)
    assert any("jaxattn._low.mod" in v for v in found)
    assert any(":7:" in v and "_high" in v for v in found)
