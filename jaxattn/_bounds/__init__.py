"""Bounds layer: the Grönwall and one-sided token-level bounds and the W₂ stability bound.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .gronwall import (
    Bound as Bound,
    bound_a_posteriori as bound_a_posteriori,
    bound_a_priori as bound_a_priori,
    certified_horizon as certified_horizon,
)
from .lognorm import bound_one_sided as bound_one_sided
from .wasserstein import (
    WassersteinBound as WassersteinBound,
    wasserstein_bound as wasserstein_bound,
)
