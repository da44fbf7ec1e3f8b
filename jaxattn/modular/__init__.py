"""The paper's modular-arithmetic transformer in Equinox + optax (docs/theory.md,
"Modular-arithmetic forgetting").

Pre-training on `(x + y) mod p`, LoRA fine-tuning on `(x − y) mod p` with the base frozen,
and the study of forgetting against depth. `jaxattn modular …` is the command line.
"""

from ._config import (
    ModularConfig as ModularConfig,
)
from ._config import (
    load_config as load_config,
)
from ._config import (
    make_config as make_config,
)
from ._data import (
    all_pairs as all_pairs,
)
from ._data import (
    make_split as make_split,
)
from ._data import (
    split_indices as split_indices,
)
from ._data import (
    vocab_size as vocab_size,
)
from ._finetune import at_learning as at_learning
from ._finetune import finetune as finetune
from ._finetune import half_life as half_life
from ._model import (
    ModularTransformer as ModularTransformer,
)
from ._model import (
    trainable_filter as trainable_filter,
)
from ._study import particle_divergence as particle_divergence
from ._study import run_study as run_study
from ._study import trend_test as trend_test
from ._train import (
    adamw as adamw,
)
from ._train import bar_text as bar_text
from ._train import (
    load_pretrained as load_pretrained,
)
from ._train import meets_bar as meets_bar
from ._train import (
    pretrain as pretrain,
)
from ._train import (
    train as train,
)
