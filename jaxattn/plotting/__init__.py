"""Every figure the package draws: one function per figure (or per figure set), taking
arrays or results and an output path.

- Figures are built object-oriented: `fig, ax = plt.subplots(...)` or
  `matplotlib.figure.Figure(...)`, drawn on their axes, written with `fig.savefig`
  (through `jaxattn._io.save_figure`, atomically) and released with `plt.close(fig)` (a
  bare `Figure` needs no close).
- No `matplotlib.use(...)` anywhere: the CLI picks a headless backend by setting
  `MPLBACKEND` before matplotlib is imported, and a notebook that calls these functions
  keeps its own backend.
- matplotlib is imported lazily: only when `jaxattn.plotting` is imported, which
  `import jaxattn` never does (the experiments, the sweep, the real-model analyses and the
  modular study import it inside the functions that draw).

Submodules by subject: `_trajectories` (token snapshots and LoRA divergence), `_sweeps`
(the sweep overview), `_sensitivity` (worst-case LoRA), `_experiments` (stability bound,
sphere phase diagram, departure time), `_geometries` (geometries, low rank),
`_mean_field` (mean-field experiments), `_real_model` (real-model analyses), `_modular`
(modular-arithmetic forgetting study), `_family` (the normalisation schemes and causal
attention).
"""

from ._experiments import (
    bound_vs_eps,
    departure_phases,
    departure_vs_eps,
    horizon_sweep,
    horizon_vs_eps,
    sphere_phase_diagram,
    sphere_plateaus,
)
from ._family import causal_clusters, normalisation_schemes
from ._geometries import (
    geometries_collapse,
    geometries_hyperplanes,
    geometries_leaders_1d,
    geometries_polygon_line,
    geometries_polytope,
    low_rank_cases,
    low_rank_cluster_counts,
    low_rank_lora,
)
from ._mean_field import (
    mean_field_bound,
    mean_field_clusters,
    mean_field_convergence,
    mean_field_departure,
    mean_field_large_n,
    mean_field_lora_w2,
)
from ._modular import modular_study_figures
from ._real_model import (
    real_model_clustering,
    real_model_lora_drift,
    real_model_particle,
    real_model_spectra,
)
from ._sensitivity import (
    cluster_change_figure,
    direction_structure,
    linear_response_figure,
    worst_vs_random,
)
from ._sweeps import sweep_overview
from ._trajectories import (
    animate_side_by_side,
    divergence_with_bounds,
    snapshots_side_by_side,
    target_comparison,
)

__all__ = [
    "animate_side_by_side",
    "bound_vs_eps",
    "causal_clusters",
    "cluster_change_figure",
    "departure_phases",
    "departure_vs_eps",
    "direction_structure",
    "divergence_with_bounds",
    "geometries_collapse",
    "geometries_hyperplanes",
    "geometries_leaders_1d",
    "geometries_polygon_line",
    "geometries_polytope",
    "horizon_sweep",
    "horizon_vs_eps",
    "linear_response_figure",
    "low_rank_cases",
    "low_rank_cluster_counts",
    "low_rank_lora",
    "mean_field_bound",
    "mean_field_clusters",
    "mean_field_convergence",
    "mean_field_departure",
    "mean_field_large_n",
    "mean_field_lora_w2",
    "modular_study_figures",
    "normalisation_schemes",
    "real_model_clustering",
    "real_model_lora_drift",
    "real_model_particle",
    "real_model_spectra",
    "snapshots_side_by_side",
    "sphere_phase_diagram",
    "sphere_plateaus",
    "sweep_overview",
    "target_comparison",
    "worst_vs_random",
]
