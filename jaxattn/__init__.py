"""jaxattn: transformers as interacting particle systems, in JAX.

Tokens are particles, weight-tied attention layers an ODE in depth, LoRA a low-rank
perturbation of Q, K, V. The mathematics and the papers behind it: docs/theory.md.

A first run: `setup_jax("float64")`, a field (`make_field`, or `PlainField`,
`RescaledField`, `SphereField`, `USAField`), then `simulate(field, x0, t1, ...)`, which
returns a `Solution`. Spec files (TOML/JSON, as the command line reads them) go through
`load_spec` then `parse_spec` (or `parse_sweep`). `__all__` lists every public name,
grouped by topic; each has a docstring. Modules whose names start with `_` are private.
"""

from ._attention import (
    attend as attend,
)
from ._attention import (
    attention_scores as attention_scores,
)
from ._attention import (
    softmax_weights as softmax_weights,
)
from ._attention import (
    unnormalised_weights as unnormalised_weights,
)
from ._fields import (
    AbstractField as AbstractField,
)
from ._fields import (
    PlainField as PlainField,
)
from ._fields import (
    RescaledField as RescaledField,
)
from ._fields import (
    SphereField as SphereField,
)
from ._fields import (
    USAField as USAField,
)
from ._fields import (
    make_field as make_field,
)
from ._lora import LoRA as LoRA
from ._simulate import (
    STATUS_MESSAGES as STATUS_MESSAGES,
)
from ._simulate import (
    Float32PrecisionWarning as Float32PrecisionWarning,
)
from ._simulate import (
    Solution as Solution,
)
from ._simulate import (
    fixed_step_grid as fixed_step_grid,
)
from ._simulate import (
    rescaled_to_x as rescaled_to_x,
)
from ._simulate import (
    simulate as simulate,
)
from ._solvers import RK4 as RK4
from ._solvers import get_solver as get_solver

try:  # the installed distribution's version (pyproject.toml is the one place it is set)
    from importlib.metadata import PackageNotFoundError as _NotFound
    from importlib.metadata import version as _version

    __version__ = _version("jaxattn")
except _NotFound:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
from ._bounds import (
    Bound as Bound,
)
from ._bounds import (
    bound_a_posteriori as bound_a_posteriori,
)
from ._bounds import (
    bound_a_priori as bound_a_priori,
)
from ._bounds import (
    certified_horizon as certified_horizon,
)
from ._chunks import (
    SweepError as SweepError,
)
from ._chunks import (
    run_chunks as run_chunks,
)
from ._grid import (
    SweepPlan as SweepPlan,
)
from ._grid import (
    parse_sweep as parse_sweep,
)
from ._io import OutputBusyError as OutputBusyError
from ._meanfield import (
    InitialMeasure as InitialMeasure,
)
from ._meanfield import (
    ladder_distances as ladder_distances,
)
from ._meanfield import (
    measure_divergence as measure_divergence,
)
from ._meanfield import (
    simulate_ladder as simulate_ladder,
)
from ._metrics import (
    approach_departure as approach_departure,
)
from ._metrics import (
    approach_departure_times as approach_departure_times,
)
from ._metrics import (
    booleanness as booleanness,
)
from ._metrics import (
    chord_from_cosine_gap as chord_from_cosine_gap,
)
from ._metrics import (
    cluster_centres as cluster_centres,
)
from ._metrics import (
    cluster_centres_masked as cluster_centres_masked,
)
from ._metrics import (
    cluster_count as cluster_count,
)
from ._metrics import (
    cluster_distance as cluster_distance,
)
from ._metrics import (
    cluster_labels as cluster_labels,
)
from ._metrics import (
    divergence as divergence,
)
from ._metrics import (
    energy as energy,
)
from ._metrics import (
    fraction_close_pairs as fraction_close_pairs,
)
from ._metrics import (
    gram as gram,
)
from ._metrics import (
    hausdorff as hausdorff,
)
from ._metrics import (
    leaders as leaders,
)
from ._metrics import (
    mean_cosine as mean_cosine,
)
from ._metrics import (
    one_sided_distance as one_sided_distance,
)
from ._metrics import (
    pairwise_distances as pairwise_distances,
)
from ._metrics import (
    support as support,
)
from ._sensitivity import (
    ClusterChange as ClusterChange,
)
from ._sensitivity import (
    Gradient as Gradient,
)
from ._sensitivity import (
    LinearResponse as LinearResponse,
)
from ._sensitivity import (
    ResponseOperator as ResponseOperator,
)
from ._sensitivity import (
    WorstCase as WorstCase,
)
from ._sensitivity import (
    field_params as field_params,
)
from ._sensitivity import (
    linear_response as linear_response,
)
from ._sensitivity import (
    perturbed as perturbed,
)
from ._sensitivity import (
    random_directions as random_directions,
)
from ._sensitivity import (
    smallest_cluster_change as smallest_cluster_change,
)
from ._sensitivity import (
    squared_distance as squared_distance,
)
from ._sensitivity import (
    value_and_grad as objective_value_and_grad,
)
from ._sensitivity import (
    worst_case as worst_case,
)
from ._sensitivity import (
    worst_case_direction as worst_case_direction,
)
from ._setup import setup_jax as setup_jax
from ._sharding import (
    map_sharded as map_sharded,
)
from ._spec import (
    Simulation as Simulation,
)
from ._spec import (
    SpecError as SpecError,
)
from ._spec import (
    load_spec_file as load_spec,
)
from ._spec import (
    parse_spec as parse_spec,
)
from ._sweep import (
    sweep as sweep,
)
from ._wasserstein import (
    cost_matrix as cost_matrix,
)
from ._wasserstein import (
    entropic_ot as entropic_ot,
)
from ._wasserstein import (
    geodesic_distance as geodesic_distance,
)
from ._wasserstein import (
    optimal_assignment as optimal_assignment,
)
from ._wasserstein import (
    sinkhorn_divergence as sinkhorn_divergence,
)
from ._wasserstein import (
    sliced_wasserstein2 as sliced_wasserstein2,
)
from ._wasserstein import (
    wasserstein2 as wasserstein2,
)
from ._wasserstein import (
    wasserstein2_line as wasserstein2_line,
)
from ._wbounds import (
    WassersteinBound as WassersteinBound,
)
from ._wbounds import (
    wasserstein_bound as wasserstein_bound,
)

# The public API, grouped as `help(jaxattn)` should present it. Everything here has a
# docstring; the modules with a leading underscore are private.
__all__ = [
    # fields, attention and LoRA
    "AbstractField",
    "PlainField",
    "RescaledField",
    "SphereField",
    "USAField",
    "make_field",
    "LoRA",
    "attend",
    "attention_scores",
    "softmax_weights",
    "unnormalised_weights",
    # solving
    "setup_jax",
    "simulate",
    "Solution",
    "STATUS_MESSAGES",
    "Float32PrecisionWarning",
    "fixed_step_grid",
    "rescaled_to_x",
    "RK4",
    "get_solver",
    # spec files
    "load_spec",
    "parse_spec",
    "Simulation",
    "SpecError",
    # metrics
    "approach_departure",
    "approach_departure_times",
    "booleanness",
    "cluster_centres",
    "cluster_centres_masked",
    "cluster_count",
    "cluster_distance",
    "cluster_labels",
    "chord_from_cosine_gap",
    "divergence",
    "energy",
    "fraction_close_pairs",
    "gram",
    "hausdorff",
    "leaders",
    "mean_cosine",
    "one_sided_distance",
    "pairwise_distances",
    "support",
    # stability bounds
    "Bound",
    "bound_a_posteriori",
    "bound_a_priori",
    "certified_horizon",
    "WassersteinBound",
    "wasserstein_bound",
    # sensitivity
    "objective_value_and_grad",
    "Gradient",
    "field_params",
    "perturbed",
    "linear_response",
    "LinearResponse",
    "ResponseOperator",
    "worst_case",
    "worst_case_direction",
    "squared_distance",
    "WorstCase",
    "random_directions",
    "smallest_cluster_change",
    "ClusterChange",
    # sweeps
    "parse_sweep",
    "SweepPlan",
    "sweep",
    "SweepError",
    "OutputBusyError",
    "run_chunks",
    "map_sharded",
    # optimal transport
    "cost_matrix",
    "entropic_ot",
    "geodesic_distance",
    "optimal_assignment",
    "sinkhorn_divergence",
    "sliced_wasserstein2",
    "wasserstein2",
    "wasserstein2_line",
    # mean field
    "InitialMeasure",
    "simulate_ladder",
    "ladder_distances",
    "measure_divergence",
]
