"""Experiments: one module per paper figure (see docs/theory.md), each a thin
`run(out_dir, quick=False, log=print, **overrides) -> dict` that calls `simulate`, the
metrics and the plotting helpers, writes figures, data and `summary.json` into `out_dir`,
and returns the summary. `jaxattn reproduce NAME` calls the same function.

Each module defines `NAME`, `DESCRIPTION` (one line) and `CLI_OPTIONS` (the subset of
`eps`, `x0`, `metric` that `jaxattn reproduce` may pass to it).
"""

from __future__ import annotations

import importlib

from .._base import ExperimentConfig as ExperimentConfig

__all__ = ["ExperimentConfig", "available", "get"]

# name -> module (imported lazily: `import jaxattn` stays light)
_MODULES = {
    "lora-divergence": "lora_divergence",
    "stability-bound": "stability_bound",
    "departure-time": "departure_time",
    "low-rank": "low_rank",
    "geometries": "geometries",
    "sphere-phase": "sphere_phase",
    "worst-case-lora": "worst_case_lora",
    "mean-field": "mean_field",
    "mean-field-large": "mean_field_large",
    "normalisation": "normalisation",
}


def available() -> dict[str, str]:
    """Names of the experiments whose module exists, with their one-line description."""
    out = {}
    for name, mod in _MODULES.items():
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{mod}":
                continue
            raise
        out[name] = getattr(m, "DESCRIPTION", "")
    return out


def get(name: str):
    """The experiment module called `name`; unknown names list the available ones."""
    names = available()
    if name not in names:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")
