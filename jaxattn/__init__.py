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
    attention_scores as attention_scores,
    softmax_weights as softmax_weights,
    unnormalised_weights as unnormalised_weights,
)
from ._fields import (
    AbstractField as AbstractField,
    PlainField as PlainField,
    RescaledField as RescaledField,
    SphereField as SphereField,
    USAField as USAField,
    make_field as make_field,
)
from ._lora import LoRA as LoRA
from ._simulate import (
    STATUS_MESSAGES as STATUS_MESSAGES,
    Float32PrecisionWarning as Float32PrecisionWarning,
    Solution as Solution,
    fixed_step_grid as fixed_step_grid,
    rescaled_to_x as rescaled_to_x,
    simulate as simulate,
)
from ._solvers import RK4 as RK4, get_solver as get_solver

__version__ = "0.1.0"
from ._bounds import (
    Bound as Bound,
    bound_a_posteriori as bound_a_posteriori,
    bound_a_priori as bound_a_priori,
    certified_horizon as certified_horizon,
)
from ._metrics import (
    approach_departure as approach_departure,
    approach_departure_times as approach_departure_times,
    booleanness as booleanness,
    cluster_centres as cluster_centres,
    cluster_centres_masked as cluster_centres_masked,
    cluster_count as cluster_count,
    cluster_distance as cluster_distance,
    cluster_labels as cluster_labels,
    chord_from_cosine_gap as chord_from_cosine_gap,
    divergence as divergence,
    energy as energy,
    fraction_close_pairs as fraction_close_pairs,
    gram as gram,
    hausdorff as hausdorff,
    leaders as leaders,
    mean_cosine as mean_cosine,
    one_sided_distance as one_sided_distance,
    pairwise_distances as pairwise_distances,
    support as support,
)
from ._io import OutputBusyError as OutputBusyError
from ._sensitivity import (
    ClusterChange as ClusterChange,
    Gradient as Gradient,
    LinearResponse as LinearResponse,
    ResponseOperator as ResponseOperator,
    WorstCase as WorstCase,
    field_params as field_params,
    linear_response as linear_response,
    perturbed as perturbed,
    random_directions as random_directions,
    smallest_cluster_change as smallest_cluster_change,
    value_and_grad as objective_value_and_grad,
    worst_case as worst_case,
    worst_case_direction as worst_case_direction,
    squared_distance as squared_distance,
)
from ._setup import setup_jax as setup_jax
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
from ._wasserstein import (
    cost_matrix as cost_matrix,
    entropic_ot as entropic_ot,
    geodesic_distance as geodesic_distance,
    optimal_assignment as optimal_assignment,
    sinkhorn_divergence as sinkhorn_divergence,
    sliced_wasserstein2 as sliced_wasserstein2,
    wasserstein2 as wasserstein2,
    wasserstein2_line as wasserstein2_line,
)
from ._meanfield import (
    InitialMeasure as InitialMeasure,
    ladder_distances as ladder_distances,
    measure_divergence as measure_divergence,
    simulate_ladder as simulate_ladder,
)
from ._wbounds import (
    WassersteinBound as WassersteinBound,
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
