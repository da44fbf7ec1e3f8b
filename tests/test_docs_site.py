"""The documentation site's sources: every public name has an API reference entry and
every page in the navigation exists. (`make docs` builds the site with --strict in CI.)"""

from __future__ import annotations

import importlib
import pathlib
import re
import types

import jaxattn
import jaxattn.experiments
import jaxattn.modular
import jaxattn.plotting
import jaxattn.real_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _public(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return sorted(
        n
        for n in names
        if not isinstance(getattr(module, n), types.ModuleType) and n != "__version__"
    )


def _entries():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    return set(re.findall(r"^::: ([\w.]+)\s*$", text, re.M))


def test_every_public_name_has_a_reference_entry():
    entries = _entries()
    missing = [f"jaxattn.{n}" for n in _public(jaxattn) if f"jaxattn.{n}" not in entries]
    for module in (jaxattn.modular, jaxattn.real_model, jaxattn.experiments, jaxattn.plotting):
        missing += [
            f"{module.__name__}.{n}"
            for n in _public(module)
            if f"{module.__name__}.{n}" not in entries
        ]
    # each experiment's options and entry point
    for name in jaxattn.experiments.available():
        mod = jaxattn.experiments.get(name).__name__
        missing += [f"{mod}.{n}" for n in ("Config", "run") if f"{mod}.{n}" not in entries]
    assert not missing, f"no API reference entry for: {missing}"


def test_reference_entries_resolve():
    for entry in _entries():
        obj = jaxattn
        path = "jaxattn"
        for part in entry.split(".")[1:]:
            path = f"{path}.{part}"
            if not hasattr(obj, part):  # a submodule not imported by its package
                importlib.import_module(path)  # ModuleNotFoundError names the stale entry
            obj = getattr(obj, part)  # AttributeError names the stale entry


def test_navigation_pages_exist():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r":\s+([\w/.-]+\.(?:md|ipynb))\s*$", nav, re.M)
    assert len(pages) > 20
    for page in pages:
        assert (DOCS / page).exists(), page


def test_no_references_to_files_outside_the_repository():
    """Code, docs and notebooks cite docs/theory.md and papers, never the research notes
    or the tracker this package was built from ("SPEC §n", "issue N")."""
    pattern = re.compile(r"SPEC §|issue [0-9]")
    paths = [*(ROOT / "jaxattn").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]
    paths += [*DOCS.rglob("*.md"), ROOT / "README.md"]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in paths
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
