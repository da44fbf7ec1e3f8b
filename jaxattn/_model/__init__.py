"""Model layer: the attention kernels, the vector fields and the LoRA.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .attention import (
    KERNELS as KERNELS,
    attend as attend,
    attention_scores as attention_scores,
    exact_row_max as exact_row_max,
    softmax_weights as softmax_weights,
    unnormalised_weights as unnormalised_weights,
    use_blockwise as use_blockwise,
)
from .family import (
    FAMILY_TARGETS as FAMILY_TARGETS,
    NORMS as NORMS,
    SPHERE_NORMS as SPHERE_NORMS,
    AbstractVectorField as AbstractVectorField,
    FeedForward as FeedForward,
    TransformerField as TransformerField,
)
from .fields import (
    DYNAMICS as DYNAMICS,
    FIELDS as FIELDS,
    AbstractField as AbstractField,
    PlainField as PlainField,
    RescaledField as RescaledField,
    SphereField as SphereField,
    USAField as USAField,
    expm as expm,
    make_field as make_field,
    unit_rows as unit_rows,
)
from .lora import TARGETS as TARGETS, LoRA as LoRA
