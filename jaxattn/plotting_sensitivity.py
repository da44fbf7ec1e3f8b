"""Compatibility module: the worst-case LoRA figures live in `jaxattn.plotting` now."""

from .plotting import cluster_change_figure as cluster_change_figure
from .plotting import direction_structure as direction_structure
from .plotting import linear_response_figure as linear_response_figure
from .plotting import worst_vs_random as worst_vs_random
