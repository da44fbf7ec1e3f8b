"""Differentiable sensitivity, gathered under one name. The tools are split by job:

- `_gradients`: a scalar objective of `x(t1)` and its gradient through `simulate`
  (`value_and_grad`, `objective_fn`, `Gradient`; reverse, forward or backsolve mode);
- `_response`: the linear response `δx(t)` to a perturbation of Q, K or V, the response
  operator `J_T : ΔW ↦ δx(T)` (JVPs and VJPs) and its worst-case (LoRA) direction;
- `_cluster_change`: the smallest LoRA that changes the cluster partition at T, and the
  norm the Grönwall bound says is needed.

Everything is a JAX transformation of `simulate`; nothing here forms a full Jacobian
except the brute-force checks in the tests. The public names are exported by `jaxattn`.
"""

from ._cluster_change import ClusterChange as ClusterChange
from ._cluster_change import bound_needed_norm as bound_needed_norm
from ._cluster_change import change_margins as change_margins
from ._cluster_change import change_score as change_score
from ._cluster_change import smallest_cluster_change as smallest_cluster_change
from ._gradients import MAX_FORWARD_ENTRIES as MAX_FORWARD_ENTRIES
from ._gradients import OBJECTIVE_ALIASES as OBJECTIVE_ALIASES
from ._gradients import OBJECTIVES as OBJECTIVES
from ._gradients import WRT as WRT
from ._gradients import Gradient as Gradient
from ._gradients import check_objective as check_objective
from ._gradients import check_status as check_status
from ._gradients import field_params as field_params
from ._gradients import final_state as final_state
from ._gradients import mean_sq as mean_sq
from ._gradients import objective_fn as objective_fn
from ._gradients import solve_kwargs as solve_kwargs
from ._gradients import squared_distance as squared_distance
from ._gradients import value_and_grad as value_and_grad
from ._gradients import with_params as with_params
from ._response import LinearResponse as LinearResponse
from ._response import ResponseOperator as ResponseOperator
from ._response import WorstCase as WorstCase
from ._response import linear_response as linear_response
from ._response import perturbed as perturbed
from ._response import power_top as power_top
from ._response import random_directions as random_directions
from ._response import truncate_rank as truncate_rank
from ._response import worst_case as worst_case
from ._response import worst_case_direction as worst_case_direction
