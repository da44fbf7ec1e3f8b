"""Analysis layer: metrics of token configurations, Wasserstein distances, mean-field samples.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .meanfield import (
    BoundCheck as BoundCheck,
    Clusters as Clusters,
    Departures as Departures,
    InitialMeasure as InitialMeasure,
    Ladder as Ladder,
    LargeLadder as LargeLadder,
    LoraW2 as LoraW2,
    ladder_distances as ladder_distances,
    measure_divergence as measure_divergence,
    simulate_ladder as simulate_ladder,
)
from .metrics import (
    approach_departure as approach_departure,
    approach_departure_times as approach_departure_times,
    booleanness as booleanness,
    chord_from_cosine_gap as chord_from_cosine_gap,
    cluster_centres as cluster_centres,
    cluster_centres_masked as cluster_centres_masked,
    cluster_count as cluster_count,
    cluster_distance as cluster_distance,
    cluster_labels as cluster_labels,
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
    unit_rows as unit_rows,
)
from .wasserstein import (
    cost_matrix as cost_matrix,
    entropic_ot as entropic_ot,
    geodesic_distance as geodesic_distance,
    optimal_assignment as optimal_assignment,
    sinkhorn_divergence as sinkhorn_divergence,
    sliced_wasserstein2 as sliced_wasserstein2,
    wasserstein2 as wasserstein2,
    wasserstein2_line as wasserstein2_line,
)
