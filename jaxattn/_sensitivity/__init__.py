"""Differentiable sensitivity, gathered under one name. The tools are split by job:

- `gradients`: a scalar objective of `x(t1)` and its gradient through `simulate`
  (`objective_value_and_grad`, `objective_fn`, `Gradient`; reverse, forward or backsolve mode);
- `response`: the linear response `δx(t)` to a perturbation of Q, K or V, the response
  operator `J_T : ΔW ↦ δx(T)` (JVPs and VJPs) and its worst-case (LoRA) direction;
- `cluster_change`: the smallest LoRA that changes the cluster partition at T, and the
  norm the Grönwall bound says is needed.

Everything is a JAX transformation of `simulate`; nothing here forms a full Jacobian
except the brute-force checks in the tests. The public names are exported by `jaxattn`.
"""

from .cluster_change import (
    ClusterChange as ClusterChange,
    bound_needed_norm as bound_needed_norm,
    change_margins as change_margins,
    change_score as change_score,
    smallest_cluster_change as smallest_cluster_change,
)
from .gradients import (
    MAX_FORWARD_ENTRIES as MAX_FORWARD_ENTRIES,
    OBJECTIVE_ALIASES as OBJECTIVE_ALIASES,
    OBJECTIVES as OBJECTIVES,
    WRT as WRT,
    Gradient as Gradient,
    check_objective as check_objective,
    check_status as check_status,
    field_params as field_params,
    final_state as final_state,
    mean_sq as mean_sq,
    objective_fn as objective_fn,
    objective_value_and_grad as objective_value_and_grad,
    solve_options as solve_options,
    squared_distance as squared_distance,
    with_params as with_params,
)
from .objective import (
    OBJECTIVE_KEYS as OBJECTIVE_KEYS,
    Objective as Objective,
    ObjectiveError as ObjectiveError,
    split_objective as split_objective,
)
from .response import (
    LinearResponse as LinearResponse,
    ResponseOperator as ResponseOperator,
    WorstCase as WorstCase,
    linear_response as linear_response,
    perturbed as perturbed,
    power_top as power_top,
    random_directions as random_directions,
    truncate_rank as truncate_rank,
    worst_case as worst_case,
    worst_case_direction as worst_case_direction,
)
