"""jaxattn: transformers as interacting particle systems, in JAX.

Tokens are particles, weight-tied attention layers an ODE in depth, LoRA a low-rank
perturbation of Q, K, V. The mathematics and the papers behind it: docs/theory.md.

A first run: `setup_jax("float64")`, a field (`make_field`, or `PlainField`,
`RescaledField`, `SphereField`, `USAField`), then `simulate(field, x0, t1, ...)`, which
returns a `Solution`. Spec files (TOML/JSON, as the command line reads them) go through
`load_spec` then `parse_spec` (or `parse_sweep`). `__all__` lists every public name,
grouped by topic; each has a docstring. Modules whose names start with `_` are private.
"""

from ._model import (
    AbstractField as AbstractField,
    AbstractVectorField as AbstractVectorField,
    FeedForward as FeedForward,
    LoRA as LoRA,
    PlainField as PlainField,
    RescaledField as RescaledField,
    SphereField as SphereField,
    TransformerField as TransformerField,
    USAField as USAField,
    attend as attend,
    attention_scores as attention_scores,
    make_field as make_field,
    softmax_weights as softmax_weights,
    unnormalised_weights as unnormalised_weights,
)
from ._simulate import (
    RK4 as RK4,
    STATUS_MESSAGES as STATUS_MESSAGES,
    Float32PrecisionWarning as Float32PrecisionWarning,
    Solution as Solution,
    SolveOptions as SolveOptions,
    Stepping as Stepping,
    fixed_step_grid as fixed_step_grid,
    get_solver as get_solver,
    rescaled_to_x as rescaled_to_x,
    simulate as simulate,
)

try:  # the installed distribution's version (pyproject.toml is the one place it is set)
    from importlib.metadata import PackageNotFoundError as _NotFound, version as _version

    __version__ = _version("jaxattn")
except _NotFound:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
from ._analysis import (
    InitialMeasure as InitialMeasure,
    approach_departure as approach_departure,
    approach_departure_times as approach_departure_times,
    booleanness as booleanness,
    chord_from_cosine_gap as chord_from_cosine_gap,
    cluster_centres as cluster_centres,
    cluster_centres_masked as cluster_centres_masked,
    cluster_count as cluster_count,
    cluster_distance as cluster_distance,
    cluster_labels as cluster_labels,
    cost_matrix as cost_matrix,
    divergence as divergence,
    energy as energy,
    entropic_ot as entropic_ot,
    fraction_close_pairs as fraction_close_pairs,
    geodesic_distance as geodesic_distance,
    gram as gram,
    hausdorff as hausdorff,
    ladder_distances as ladder_distances,
    leaders as leaders,
    mean_cosine as mean_cosine,
    measure_divergence as measure_divergence,
    one_sided_distance as one_sided_distance,
    optimal_assignment as optimal_assignment,
    pairwise_distances as pairwise_distances,
    simulate_ladder as simulate_ladder,
    sinkhorn_divergence as sinkhorn_divergence,
    sliced_wasserstein2 as sliced_wasserstein2,
    support as support,
    wasserstein2 as wasserstein2,
    wasserstein2_line as wasserstein2_line,
)
from ._base import (
    OutputBusyError as OutputBusyError,
    OutputLockError as OutputLockError,
    clear_caches as clear_caches,
    setup_jax as setup_jax,
    uniform_tokens as uniform_tokens,
)
from ._bounds import (
    Bound as Bound,
    WassersteinBound as WassersteinBound,
    bound_a_posteriori as bound_a_posteriori,
    bound_a_priori as bound_a_priori,
    bound_one_sided as bound_one_sided,
    certified_horizon as certified_horizon,
    wasserstein_bound as wasserstein_bound,
)
from ._sensitivity import (
    ClusterChange as ClusterChange,
    Gradient as Gradient,
    LinearResponse as LinearResponse,
    ResponseOperator as ResponseOperator,
    WorstCase as WorstCase,
    field_params as field_params,
    linear_response as linear_response,
    objective_value_and_grad as objective_value_and_grad,
    perturbed as perturbed,
    random_directions as random_directions,
    smallest_cluster_change as smallest_cluster_change,
    squared_distance as squared_distance,
    worst_case as worst_case,
    worst_case_direction as worst_case_direction,
)
from ._spec import (
    Simulation as Simulation,
    SpecError as SpecError,
    load_spec_file as load_spec,
    parse_spec as parse_spec,
)
from ._sweep import (
    SweepError as SweepError,
    SweepPlan as SweepPlan,
    map_sharded as map_sharded,
    parse_sweep as parse_sweep,
    run_chunks as run_chunks,
    sweep as sweep,
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
    "TransformerField",
    "FeedForward",
    "AbstractVectorField",
    "LoRA",
    "attend",
    "attention_scores",
    "softmax_weights",
    "unnormalised_weights",
    # solving
    "setup_jax",
    "uniform_tokens",
    "clear_caches",
    "simulate",
    "SolveOptions",
    "Stepping",
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
    "bound_one_sided",
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
    "OutputLockError",
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
