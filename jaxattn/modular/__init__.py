"""The paper's modular-arithmetic transformer in Equinox + optax (docs/theory.md,
"Modular-arithmetic forgetting").

Pre-training on `(x + y) mod p`, LoRA fine-tuning on `(x − y) mod p` with the base frozen,
and the study of forgetting against depth. `jaxattn modular …` is the command line.
"""

from ._config import (
    ModularConfig as ModularConfig,
    load_config as load_config,
    make_config as make_config,
)
from ._data import (
    all_pairs as all_pairs,
    make_split as make_split,
    split_indices as split_indices,
    vocab_size as vocab_size,
)
from ._finetune import at_learning as at_learning, finetune as finetune, half_life as half_life
from ._model import ModularTransformer as ModularTransformer, trainable_filter as trainable_filter
from ._study import (
    check_run as check_run,
    particle_divergence as particle_divergence,
    run_study as run_study,
    trend_test as trend_test,
)
from ._train import (
    adamw as adamw,
    bar_text as bar_text,
    load_pretrained as load_pretrained,
    meets_bar as meets_bar,
    pretrain as pretrain,
    train as train,
)
