"""The paper's toy transformer as an Equinox module (background: docs/theory.md,
'Modular-arithmetic forgetting').

Token and learned positional embeddings, one attention block (Q, K, V without bias, an
output projection O, scores scaled by `1/√d_head`, no mask, no MLP) applied `depth` times
with shared weights, `x ← x + O·Attn(x)`, and an unembedding read at the last position.
Options: untied layers (one block per layer), pre-LayerNorm, several heads; with one
head, `fused` (default) computes a layer from `A = Qᵀ K` and `W_OV = O V`: the same
function with two token × d×d products instead of four (different float rounding).

The attention goes through the package's one softmax (`_attention.softmax_weights`) and
LoRA adapters are the package's one `LoRA` (`_model/lora.py`), on any of Q, K, V, O. With one
head and no LayerNorm the residual stream is exactly forward Euler (step 1) of the plain
particle dynamics with `β = 1/√d`, weights `(Q, K, O V)` (docs/theory.md, 'Particle
dynamics' and 'Residual layers as Euler steps'): see `particle_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._base import Array, Float, Int, PRNGKeyArray, PyTree
from .._model import LoRA, attention_scores, softmax_weights
from ._config import TARGETS, ModularConfig
from ._data import vocab_size

SEQ_LEN = 4


class AttentionBlock(eqx.Module):
    """Weights of one (or, untied, `depth` stacked) attention block(s).

    `Q, K, V, O` have shape `(n_blocks, d, d)` and act as `x Wᵀ`; `ln_w, ln_b` are the
    pre-LayerNorm scale and shift `(n_blocks, d)` (unused without LayerNorm).
    """

    Q: Float[Array, "L d d"]
    K: Float[Array, "L d d"]
    V: Float[Array, "L d d"]
    O: Float[Array, "L d d"]
    ln_w: Float[Array, "L d"]
    ln_b: Float[Array, "L d"]

    def __init__(self, d: int, n_blocks: int, *, key, dtype):
        ks = jax.random.split(key, 4)
        init = lambda k: jax.random.normal(k, (n_blocks, d, d), dtype) / math.sqrt(d)
        self.Q, self.K, self.V, self.O = (init(k) for k in ks)
        self.ln_w = jnp.ones((n_blocks, d), dtype)
        self.ln_b = jnp.zeros((n_blocks, d), dtype)


class ModularTransformer(eqx.Module):
    """Weight-tied attention-only transformer for `(x op y) mod p`.

    **Arguments:** a `ModularConfig` (uses `p, d_model, depth, heads, layernorm, tied,
    dtype`) and a keyword-only PRNG `key`.

    `model(tokens)` maps one prompt `(4,)` int to logits `(p,)`; batch with `jax.vmap`.
    `loras` holds LoRA adapters (empty after pre-training); untied models carry factors
    stacked over layers, `A (depth, r, d)`, `B (depth, d, r)`.
    """

    embed: Float[Array, "vocab d"]
    pos: Float[Array, "4 d"]
    block: AttentionBlock
    unembed: Float[Array, "p d"]
    loras: tuple[LoRA, ...]
    depth: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    layernorm: bool = eqx.field(static=True)
    tied: bool = eqx.field(static=True)
    fused: bool = eqx.field(static=True)

    def __init__(self, config: ModularConfig, *, key: PRNGKeyArray) -> None:
        dtype = jnp.dtype(config.dtype)
        d, p = config.d_model, config.p
        ke, kp, kb, ku = jax.random.split(key, 4)
        self.embed = jax.random.normal(ke, (vocab_size(p), d), dtype) / math.sqrt(d)
        self.pos = jax.random.normal(kp, (SEQ_LEN, d), dtype) / math.sqrt(d)
        n_blocks = 1 if config.tied else config.depth
        self.block = AttentionBlock(d, n_blocks, key=kb, dtype=dtype)
        self.unembed = jax.random.normal(ku, (p, d), dtype) / math.sqrt(d)
        self.loras = ()
        self.depth = config.depth
        self.heads = config.heads
        self.layernorm = config.layernorm
        self.tied = config.tied
        self.fused = config.fused

    @property
    def d(self) -> int:
        return self.embed.shape[1]

    @property
    def n_blocks(self) -> int:
        return self.block.Q.shape[0]

    # -- LoRA ---------------------------------------------------------------------
    def with_loras(
        self, targets: Sequence[str], *, rank: int, alpha: float, key: PRNGKeyArray
    ) -> ModularTransformer:
        """The same model with fresh LoRA adapters (`B = 0`, so unchanged outputs)."""
        loras = []
        for t, k in zip(targets, jax.random.split(key, len(targets))):
            if t not in TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; choose among Q, K, V, O")
            ks = jax.random.split(k, self.n_blocks)
            # zeros_init in the default float dtype, then cast: with dtype=float32 under
            # x64 its `/ np.sqrt(d_in)` mixes float32 and float64 (strict promotion).
            los = [
                LoRA.zeros_init(self.d, self.d, rank=rank, alpha=alpha, target=t, key=kk)
                for kk in ks
            ]
            st = LoRA.stack(los)
            dt = self.embed.dtype
            loras.append(LoRA(st.A.astype(dt), st.B.astype(dt), st.alpha.astype(dt), t))
        return eqx.tree_at(lambda m: m.loras, self, tuple(loras))

    def without_loras(self) -> ModularTransformer:
        return eqx.tree_at(lambda m: m.loras, self, ())

    def _lora(self, target: str, layer: int) -> LoRA | None:
        for lo in self.loras:
            if lo.target == target:
                return eqx.tree_at(lambda m: (m.A, m.B), lo, (lo.A[layer], lo.B[layer]))
        return None

    def weight(self, name: str, layer: int = 0) -> Float[Array, "d d"]:
        """Effective weight `W + (α/r) B A` of block `layer` (materialised)."""
        W = getattr(self.block, name)[layer]
        lo = self._lora(name, layer)
        return W if lo is None else lo.merged(W)

    def _project(self, name: str, layer: int, x):
        W = getattr(self.block, name)[layer]
        lo = self._lora(name, layer)
        return x @ W.T if lo is None else lo.apply(W, x)

    # -- forward ------------------------------------------------------------------
    def _layer_norm(self, x, b: int):
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
        scale, shift = self.block.ln_w[b][None, :], self.block.ln_b[b][None, :]
        return (x - mu) / jnp.sqrt(var + 1e-5) * scale + shift

    def attention(self, x: Float[Array, "4 d"], b: int) -> Float[Array, "4 d"]:
        """`O · concat_h(P_h V_h x)` for block `b`, `P_h = softmax(q_h k_hᵀ / √d_head)`."""
        h = x if not self.layernorm else self._layer_norm(x, b)
        if self.heads == 1 and self.fused:
            # One head: only `A = Qᵀ K` and `W_OV = O V` matter (docs/theory.md, 'Particle
            # dynamics'), so a layer
            # costs two token × d×d products instead of four. The d×d products are
            # computed once per call (outside `vmap` they are not batched).
            A = self.weight("Q", b).T @ self.weight("K", b)
            W_ov = self.weight("O", b) @ self.weight("V", b)
            P = softmax_weights(attention_scores(h @ A, h), 1.0 / math.sqrt(self.d))
            return P @ (h @ W_ov.T)
        q, k, v = (self._project(n, b, h) for n in ("Q", "K", "V"))
        n, d = q.shape
        dh = d // self.heads
        split = lambda a: a.reshape(n, self.heads, dh).transpose(1, 0, 2)
        beta = 1.0 / math.sqrt(dh)
        P = jax.vmap(lambda qq, kk: softmax_weights(attention_scores(qq, kk), beta))(
            split(q), split(k)
        )
        out = jnp.einsum("hij,hjd->hid", P, split(v)).transpose(1, 0, 2).reshape(n, d)
        return self._project("O", b, out)

    def residual_stream(self, tokens: Int[Array, " 4"]) -> Float[Array, "depth_plus_1 4 d"]:
        """Token states after 0, 1, …, depth layers (the particle trajectory): `depth + 1`
        states. (The axis is not written `depth+1`: a symbolic axis may only use axes of
        the arguments, and jaxtyping's runtime check rejects it.)"""
        x = self.embed[tokens] + self.pos
        xs = [x]
        for layer in range(self.depth):
            x = x + self.attention(x, 0 if self.tied else layer)
            xs.append(x)
        return jnp.stack(xs)

    def __call__(self, tokens: Int[Array, " 4"]) -> Float[Array, " p"]:
        x = self.embed[tokens] + self.pos
        for layer in range(self.depth):
            x = x + self.attention(x, 0 if self.tied else layer)
        if self.layernorm:
            mu = jnp.mean(x[-1])
            x_last = (x[-1] - mu) / jnp.sqrt(jnp.mean((x[-1] - mu) ** 2) + 1e-5)
        else:
            x_last = x[-1]
        return self.unembed @ x_last

    # -- particle model -------------------------------------------------------------
    def particle_weights(
        self, layer: int = 0
    ) -> tuple[Float[Array, "d d"], Float[Array, "d d"], Float[Array, "d d"], float]:
        """`(Q, K, V_eff = O V, β = 1/√d)` such that one layer is an Euler step (h = 1)
        of `x_i' = Σ_j P_ij V_eff x_j` (docs/theory.md, 'Particle dynamics' and 'Residual
        layers as Euler steps'). One head, no LayerNorm only."""
        if self.heads != 1 or self.layernorm:
            raise ValueError("the particle model needs one head and no LayerNorm")
        V_eff = self.weight("O", layer) @ self.weight("V", layer)
        return (self.weight("Q", layer), self.weight("K", layer), V_eff, 1.0 / math.sqrt(self.d))


def trainable_filter(
    model: ModularTransformer, *, lora_only: bool
) -> Callable[[Any], bool] | PyTree[bool]:
    """Boolean pytree for `eqx.partition`: everything (pre-training) or only the LoRA
    factors `A`, `B` (fine-tuning; α and the base weights stay frozen)."""
    if not lora_only:
        return eqx.is_inexact_array
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: [x for lo in m.loras for x in (lo.A, lo.B)],
        spec,
        replace=[True] * (2 * len(model.loras)),
    )
