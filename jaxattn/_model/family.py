"""The model family: several heads, causal and ALiBi masks, the normalisation schemes, a
feed-forward term and depth-dependent weights, as choices of one field (background:
docs/theory.md, 'The model family').

`TransformerField` is one Equinox module whose options are data, not subclasses:

- **heads** `H`: `Q_h, K_h` of shape `(e, d)` and `V_h` of shape `(f, d)`. Without output
  maps (`O=None`, the convention of the particle papers: `f = d`, full matrices) the
  attention term is the mean over heads, `A_i = (1/H) Σ_h Σ_j P^h_ij V_h y_j`; with output
  maps `O_h (d, f)` it is their sum, `A_i = Σ_h O_h Σ_j P^h_ij V_h y_j`, as in a real block.
  `P^h_ij ∝ exp(β ⟨Q_h y_i, K_h y_j⟩)`.
- **mask** `"causal"` (token i attends to j ≤ i) and **ALiBi** slopes `λ_h ≥ 0` per head
  (bias `−λ_h (i − j)` on the scaled logits; implies causal).
- **feed-forward** `FeedForward`: `F(y) = W₂ act(W₁ y + b₁) + b₂` per token, added as a
  second sub-layer.
- **normalisation** `norm`, after Karagodin, Ge, Polyanskiy and Rigollet (*Normalization
  in attention dynamics*, NeurIPS 2025), with LayerNorm read as the projection
  `y ↦ y/|y|` and `θ = x/|x|`; for each sub-layer output `S` (attention, feed-forward):

  | norm | velocity `ẋ_i` | tokens |
  |---|---|---|
  | `"none"` | `Σ S_i(x)` | free (the plain dynamics) |
  | `"post"` | `Π_{x_i} Σ S_i(x)` | on the sphere (today's sphere field) |
  | `"pre"` | `Σ S_i(θ)` | free; `ṙ = ⟨θ, S⟩`, angular speed divided by `r` |
  | `"peri"` | `Σ S_i(θ)/|S_i(θ)|` | free; angular speed divided by `r |S|` |
  | `"ngpt"` | `α Π_{x_i} Σ S_i(x)/|S_i(x)|` | on the sphere; speed `α/|S|` |

  The scheme may change with the layer (mix-LN: post-LN in the first layers, pre-LN
  after). The projection may centre the token first (LayerNorm rather than RMSNorm) and
  carry an affine map `γ ⊙ θ + b` (`ln_gain`, `ln_bias`), which the sub-layers read.
- **unnormalised weights** (`normalised=False`): `exp(β⟨Q_h y_i, K_h y_j⟩)/n` instead of
  the softmax; with `norm="post"` this is USA.
- **depth-dependent weights**: every weight may carry a leading layer axis `L`; layer ℓ
  acts on `[t_ℓ, t_{ℓ+1})` with `layer_times = (t_1, …, t_{L−1})` (layer 0 before `t_1`,
  the last after `t_{L−1}`). `simulate` steps exactly onto these times
  (`jump_times`).
- **LoRA** on any head's `Q, K, V, O` and any layer's weights (`LoRA(…, head=, layer=)`),
  stacked for batches.

With one head, no mask and no feed-forward, `norm="none"` is `PlainField` and
`norm="post"` is `SphereField` (tested).
"""

from __future__ import annotations

import abc
import functools
import itertools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import DTypeLike

from .._base import (
    Array,
    ArrayLike,
    Float,
    PyTree,
    ScalarLike,
    as_float_array,
    check_choice,
    check_dtype,
    check_int,
    check_memory,
    check_positive,
    draw_normal,
)
from .attention import KERNELS, attend
from .fields import expm, exponential_shift, tangent
from .lora import LoRA, lora_tuple

NORMS = ("none", "post", "pre", "peri", "ngpt")
#: the schemes whose tokens live on the unit sphere
SPHERE_NORMS = ("post", "ngpt")
#: up to this many heads the attention is one traced computation per head (a Python loop:
#: faster on the CPU than one vmapped computation, benchmarks/family.py); above, a vmap
UNROLL_HEADS = 8
#: the weights a LoRA can perturb in a `TransformerField`
FAMILY_TARGETS = ("Q", "K", "V", "O", "W1", "W2")
MASKS = ("none", "causal")
ACTIVATIONS = ("gelu", "relu")


def _unit_or_zero(s: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """Rows `s_i/|s_i|`, and 0 for a zero row (a zero sub-layer adds nothing), with a
    finite gradient there."""
    sq = jnp.sum(s * s, axis=-1, keepdims=True)
    ok = sq > 0
    # the `where`s act on the (n, 1) norms, not on the (n, d) rows
    return s * jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def _layers_heads(W, name: str, dtype) -> Array:
    """A weight as `(layers, heads, rows, cols)`: a matrix is one head of one layer, a
    3-D array the heads of one layer."""
    W = jnp.asarray(as_float_array(W, name, dtype))
    if W.ndim in (2, 3):
        W = W.reshape((1,) * (4 - W.ndim) + W.shape)
    if W.ndim != 4:
        raise ValueError(
            f"{name} must be a matrix, (heads, ·, ·) or (layers, heads, ·, ·), "
            f"got shape {tuple(jnp.shape(W))}"
        )
    return W


class FeedForward(eqx.Module):
    """The per-token feed-forward term `F(y) = W₂ act(W₁ y + b₁) + b₂`.

    **Arguments:** `W1 (h, d)`, `W2 (d, h)`, optional `b1 (h,)`, `b2 (d,)` (none), each
    with an optional leading layer axis `L` (as the field's attention weights);
    `activation`: `"gelu"` (tanh approximation, as GPT-2) or `"relu"`.
    """

    W1: Float[Array, "L h d"]
    b1: Float[Array, "L h"] | None
    W2: Float[Array, "L d h"]
    b2: Float[Array, "L d"] | None
    activation: str = eqx.field(static=True)

    def __init__(self, W1, W2, b1=None, b2=None, *, activation: str = "gelu", dtype=None):
        dtype = check_dtype(jnp.dtype(dtype) if dtype is not None else jnp.result_type(float))
        W1 = jnp.asarray(as_float_array(W1, "W1", dtype))
        W2 = jnp.asarray(as_float_array(W2, "W2", dtype))
        if W1.ndim == 2:
            W1 = W1[None]
        if W2.ndim == 2:
            W2 = W2[None]
        if W1.ndim != 3 or W2.ndim != 3:
            raise ValueError(
                f"feed-forward W1 and W2 must be (h, d) and (d, h), with an optional "
                f"leading layer axis, got {tuple(W1.shape)} and {tuple(W2.shape)}"
            )
        L, h, d = W1.shape
        if W2.shape[1:] != (d, h):
            raise ValueError(f"feed-forward W2 must be ({d}, {h}) for W1 {(h, d)}, got {W2.shape}")
        if W2.shape[0] != L:
            raise ValueError(f"feed-forward W1 and W2 have {L} and {W2.shape[0]} layers")
        self.W1, self.W2 = W1, W2
        self.b1 = self._bias(b1, "b1", (L, h), dtype)
        self.b2 = self._bias(b2, "b2", (L, d), dtype)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)

    @staticmethod
    def _bias(b, name, shape, dtype):
        if b is None:
            return None
        b = jnp.asarray(as_float_array(b, name, dtype))
        if b.ndim == 1:
            b = b[None]
        if b.shape != shape:
            raise ValueError(f"feed-forward {name} must be {shape[1:]} per layer, got {b.shape}")
        return b

    @property
    def layers(self) -> int:
        return self.W1.shape[0]

    def __call__(self, layer, y: Float[Array, "n d"]) -> Float[Array, "n d"]:
        act = jax.nn.relu if self.activation == "relu" else jax.nn.gelu
        h = y @ self.W1[layer].T
        h = act(h if self.b1 is None else h + self.b1[layer][None, :])
        out = h @ self.W2[layer].T
        return out if self.b2 is None else out + self.b2[layer][None, :]


class AbstractVectorField(eqx.Module):
    """The extension point: a token vector field `simulate` integrates, for a model the
    package does not have. Subclass it, give the weights as fields (pytree leaves:
    `jax.grad` and LoRA-style perturbations reach them) and implement `__call__(t, y,
    args) -> dy/dt` for tokens `y (n, d)` and the property `d`. The defaults below are
    what the other fields declare; override them when they differ:

    - `on_sphere` (False): `simulate` puts `x0` on the unit sphere and allows
      `renormalise`;
    - `frame` (`"x"`): the state is the tokens;
    - `jump_times` (none): times where the velocity jumps (the solver steps onto them);
    - `heads` (1): dense attention matrices per token pair, for the memory estimate;
    - `kernel` (`"auto"`): the attention path, for the memory estimate;
    - `solve_args()` (None): constants computed once per solve, passed as `args`.

    Tools derived for particular dynamics (the stability bounds, the sensitivity tools,
    spec files and sweeps) do not take such a field: they refuse it in one line.
    docs/own_field.md has an example.
    """

    on_sphere = False
    frame = "x"
    normalised = True
    heads = 1
    kernel = "auto"

    @property
    def dynamics(self) -> str:
        return type(self).__name__

    @property
    @abc.abstractmethod
    def d(self) -> int:
        """The token dimension."""

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def jump_times(self) -> tuple[float, ...]:
        return ()

    @property
    def loras(self) -> tuple:
        return ()

    def solve_args(self) -> PyTree:
        return None

    @abc.abstractmethod
    def __call__(self, t, y: Float[Array, "n d"], args=None) -> Float[Array, "n d"]:
        """The velocity `dy/dt` of tokens `y (n, d)` at time `t`."""


class TransformerField(AbstractVectorField):
    """A member of the model family (module docstring): heads, masks, normalisation,
    feed-forward term and depth-dependent weights.

    **Arguments:**

    - `Q`, `K`, `V`: per-head weights `(H, e, d)`, `(H, e, d)`, `(H, f, d)`, or with a
      leading layer axis `(L, H, ·, d)`; a `d×d` matrix is one head; `None` is the
      identity (`d=` then needed if all are `None`). Heads and layers must agree.
    - `heads`: the number of heads H (checked against the weights; with no weights
      given, H identity heads — which differ only in their ALiBi slopes).
    - `O`: output maps `(H, d, f)` (or `(L, H, d, f)`); `None`: the mean over heads with
      `f = d`.
    - `bQ`, `bK`, `bV`: biases of the projections, `(H, e)`, `(H, e)`, `(H, f)` (a vector
      for one head; optional leading layer axis); `bO`: the output bias `(d,)` (or
      `(L, d)`), added to the attention term. `None`: no bias (the particle papers).
    - `beta`: β ≥ 0. `mask`: `"none"` or `"causal"`. `alibi`: slopes `λ_h ≥ 0`, one per
      head (a number: the same for every head); implies the causal mask.
    - `norm`: `"none"`, `"post"`, `"pre"`, `"peri"` or `"ngpt"`, or one of these per
      layer (mix-LN, e.g. `("post", "post", "pre", "pre")`: the scheme switches with
      the weights); `alpha` > 0: nGPT's step scale, a number or one per layer.
    - `ln_gain`, `ln_bias`: the LayerNorm's affine map `θ ↦ γ ⊙ θ + b` applied to the
      normalised token a sub-layer reads (`(d,)` or `(L, d)`; default: the identity);
      `centre=True` subtracts each token's mean over its d coordinates before the
      projection (LayerNorm; default `False`, RMSNorm). The normalisation is the
      projection `θ = y/|y|` on the unit sphere: a real LayerNorm's output has norm
      `√d`, so its gain enters as `ln_gain = √d · γ`. Not for `norm="none"`.
    - `normalised`: `True` (softmax attention) or `False` (the unnormalised weights
      `exp(β⟨Q y_i, K y_j⟩)/n` of USA; with `norm="post"` this is the USA field).
    - `frame`: `"x"` (the state is the tokens) or `"z"`: the rescaled variable
      `z = e^{−tV} x` of the plain dynamics (`norm="none"`, one layer, no output maps or
      feed-forward term, one V shared by the heads), in which
      `ż_i = V((1/H) Σ_h Σ_j P^h_ij z_j − z_i)` with `P^h` computed from `x = e^{tV} z`
      (docs/theory.md, 'Rescaled dynamics'): clusters stay at bounded positions.
      `Solution.to_x` maps back.
    - `ffn`: a `FeedForward` or `None`.
    - `lora`: a `LoRA` or a sequence of them on `"Q"`, `"K"`, `"V"`, `"O"` (of the head
      `lora.head` and the layer `lora.layer`; `None`: all of them) or on the
      feed-forward weights `"W1"`, `"W2"` (of `lora.layer`). Stacked LoRAs make the
      field a batch of fields, as for the classic fields.
    - `layer_times`: the `L − 1` increasing times where the layer changes (needed when
      any weight has `L > 1` layers).
    - `dtype`, `kernel`, `block`: as for the other fields.
    """

    Q: Float[Array, "L H e d"]
    K: Float[Array, "L H e d"]
    V: Float[Array, "L H f d"]
    O: Float[Array, "L H d f"] | None
    beta: Float[Array, ""]
    alibi: Float[Array, " H"] | None
    alpha: Float[Array, "*L"]
    ffn: FeedForward | None
    bQ: Float[Array, "L H e"] | None
    bK: Float[Array, "L H e"] | None
    bV: Float[Array, "L H f"] | None
    bO: Float[Array, "L d"] | None
    ln_gain: Float[Array, "L d"] | None
    ln_bias: Float[Array, "L d"] | None
    norm: str | tuple[str, ...] = eqx.field(static=True)
    centre: bool = eqx.field(static=True)
    normalised: bool = eqx.field(static=True)
    frame: str = eqx.field(static=True)
    mask: str = eqx.field(static=True)
    layer_times: tuple[float, ...] = eqx.field(static=True)
    kernel: str = eqx.field(static=True)
    block: int = eqx.field(static=True)
    # a default: the base class's `loras` property must not read as one
    loras: tuple[LoRA, ...] = ()

    def __init__(
        self,
        Q=None,
        K=None,
        V=None,
        O=None,
        *,
        beta: ScalarLike = 1.0,
        mask: str | None = None,
        alibi: ScalarLike | Float[ArrayLike, " H"] | Sequence[float] | None = None,
        norm: str | Sequence[str] = "none",
        alpha: ScalarLike | Sequence[float] = 1.0,
        ffn: FeedForward | None = None,
        bQ=None,
        bK=None,
        bV=None,
        bO=None,
        ln_gain=None,
        ln_bias=None,
        centre: bool = False,
        normalised: bool = True,
        frame: str = "x",
        lora: LoRA | Sequence[LoRA] | None = None,
        layer_times: Sequence[float] | None = None,
        d: int | None = None,
        heads: int | None = None,
        dtype: DTypeLike | None = None,
        kernel: str = "auto",
        block: int = 1024,
    ):
        dtype = check_dtype(jnp.dtype(dtype) if dtype is not None else jnp.result_type(float))
        given = {
            name: _layers_heads(W, name, dtype)
            for name, W in (("Q", Q), ("K", K), ("V", V))
            if W is not None
        }
        dims = {W.shape[-1] for W in given.values()}
        if d is not None:
            dims.add(check_int(d, "dimension d", 1))
        if len(dims) != 1:
            shapes = ", ".join(f"{k} {tuple(W.shape)}" for k, W in given.items())
            raise ValueError(
                "give Q, K or V, or the dimension d"
                if not dims
                else f"Q, K, V and d disagree on the token dimension: {shapes}, d={d}"
            )
        (dim,) = dims
        counts = {W.shape[1] for W in given.values()}
        if heads is not None:
            counts.add(check_int(heads, "heads", 1))
        if len(counts) > 1:
            shapes = ", ".join(f"{k} {tuple(W.shape)}" for k, W in given.items())
            raise ValueError(
                f"Q, K, V and heads disagree on the number of heads: {shapes}, heads={heads}"
            )
        (H,) = counts or {1}
        eye = jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (1, H, dim, dim))
        Qw, Kw, Vw = (given.get(n, eye) for n in ("Q", "K", "V"))
        if Qw.shape[-2] != Kw.shape[-2]:
            raise ValueError(
                f"Q and K must map to the same width, got {Qw.shape[-2]} and {Kw.shape[-2]}"
            )
        if O is None:
            if Vw.shape[-2] != dim:
                raise ValueError(
                    f"without output maps O, V must be d×d per head (mean over heads), "
                    f"got {tuple(Vw.shape[-2:])}"
                )
            Ow = None
        else:
            Ow = _layers_heads(O, "O", dtype)
            if Ow.shape[1:] != (H, dim, Vw.shape[-2]):
                raise ValueError(
                    f"O must be (heads, d, f) = ({H}, {dim}, {Vw.shape[-2]}), with an "
                    f"optional leading layer axis, got {tuple(Ow.shape)}"
                )
        biases = {
            name: self._head_bias(b, name, H, rows, dtype)
            for name, b, rows in (
                ("bQ", bQ, Qw.shape[-2]),
                ("bK", bK, Kw.shape[-2]),
                ("bV", bV, Vw.shape[-2]),
            )
        }
        biases["bO"] = None if bO is None else self._per_layer_vector(bO, "bO", None, dim, dtype)
        self.bQ, self.bK, self.bV, self.bO = (biases[k] for k in ("bQ", "bK", "bV", "bO"))
        layer_counts = {W.shape[0] for W in (Qw, Kw, Vw) + (() if Ow is None else (Ow,))}
        layer_counts |= {b.shape[0] for b in biases.values() if b is not None}
        if ffn is not None:
            if not isinstance(ffn, FeedForward):
                raise TypeError(f"ffn must be a FeedForward, got {type(ffn).__name__}")
            if ffn.W1.shape[-1] != dim:
                raise ValueError(f"the feed-forward term acts on d = {ffn.W1.shape[-1]}, not {dim}")
            layer_counts.add(ffn.layers)
            ffn = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, ffn)
        layer_counts.discard(1)
        if len(layer_counts) > 1:
            raise ValueError(
                f"the weights disagree on the number of layers: {sorted(layer_counts)}"
            )
        L = layer_counts.pop() if layer_counts else 1
        times = () if layer_times is None else tuple(float(t) for t in layer_times)
        if len(times) != L - 1:
            raise ValueError(
                f"{L} layer(s) need {L - 1} layer time(s) (where each next layer starts), "
                f"got {len(times)}"
            )
        if any(not math.isfinite(t) for t in times) or any(
            b <= a for a, b in itertools.pairwise(times)
        ):
            raise ValueError(f"layer_times must be finite and increasing, got {list(times)}")
        check_memory(
            dtype.itemsize * sum(W.size for W in (Qw, Kw, Vw)), "the family field's weights"
        )
        self.Q, self.K, self.V, self.O = Qw, Kw, Vw, Ow
        self.layer_times = times
        self.beta = (
            beta.astype(dtype)
            if isinstance(beta, Tracer)
            else jnp.asarray(check_positive(beta, "beta", allow_zero=True), dtype)
        )
        if isinstance(norm, str):
            self.norm = check_choice(norm, "norm", NORMS)
        else:
            norms = tuple(check_choice(n, "norm", NORMS) for n in norm)
            if len(norms) != L:
                raise ValueError(f"norm per layer needs {L} scheme(s), got {len(norms)}")
            self.norm = norms[0] if len(set(norms)) == 1 else norms
        self.alpha = self._alpha(alpha, L, dtype)
        if not isinstance(centre, bool) or not isinstance(normalised, bool):
            raise TypeError("centre and normalised must be True or False")
        self.centre, self.normalised = centre, normalised
        self.ln_gain = self._per_layer_vector(ln_gain, "ln_gain", L, dim, dtype)
        self.ln_bias = self._per_layer_vector(ln_bias, "ln_bias", L, dim, dtype)
        uses_ln = self.norm != "none"
        if not uses_ln and (self.ln_gain is not None or self.ln_bias is not None or centre):
            raise ValueError(
                "ln_gain, ln_bias and centre belong to a LayerNorm: norm='none' has none"
            )
        if alibi is None:
            self.alibi = None
        else:
            lam = jnp.asarray(as_float_array(alibi, "alibi", dtype))
            lam = jnp.broadcast_to(lam, (H,)) if lam.ndim == 0 else lam
            if lam.shape != (H,):
                raise ValueError(f"alibi needs one slope per head ({H}), got {lam.shape[0]}")
            if not isinstance(lam, Tracer) and bool(jnp.any(lam < 0)):
                raise ValueError(f"ALiBi slopes must be ≥ 0, got {np.asarray(lam).tolist()}")
            self.alibi = lam
        if mask is None:
            mask = "causal" if alibi is not None else "none"
        self.mask = check_choice(mask, "mask", MASKS)
        if self.alibi is not None and self.mask != "causal":
            raise ValueError("ALiBi is a causal mask: give mask='causal' (or leave it out)")
        self.ffn = ffn
        self.kernel = check_choice(kernel, "attention kernel", KERNELS)
        if self.kernel.startswith("dot_product") and not normalised:
            raise ValueError(
                f"attention kernel {kernel!r} computes a softmax; unnormalised weights "
                "need dense, blockwise or auto"
            )
        self.frame = check_choice(frame, "frame", ("x", "z"))
        if frame == "z":
            self._check_rescaled()
        self.loras = self._checked_loras(lora)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"attention block must be a positive integer, got {block!r}")
        self.block = int(block)

    @staticmethod
    def _alpha(alpha, L: int, dtype) -> Array:
        if isinstance(alpha, Tracer):
            return alpha.astype(dtype)
        a = jnp.asarray(as_float_array(alpha, "alpha", dtype))
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] not in (1, L)):
            raise ValueError(f"alpha must be a number or one per layer ({L}), got shape {a.shape}")
        if not bool(jnp.all(a > 0)):
            raise ValueError(f"alpha must be > 0, got {np.asarray(a).tolist()}")
        return a[0] if a.ndim == 1 and a.shape[0] == 1 else a

    @staticmethod
    def _per_layer_vector(w, name: str, L: int | None, d: int, dtype) -> Array | None:
        if w is None:
            return None
        w = jnp.asarray(as_float_array(w, name, dtype))
        w = w[None] if w.ndim == 1 else w
        if w.ndim != 2 or w.shape[1] != d or (L is not None and w.shape[0] not in (1, L)):
            raise ValueError(f"{name} must be ({d},) or (layers, {d}), got {tuple(w.shape)}")
        return w

    @staticmethod
    def _head_bias(b, name: str, H: int, rows: int, dtype) -> Array | None:
        """A projection bias as `(layers, heads, rows)`."""
        if b is None:
            return None
        b = jnp.asarray(as_float_array(b, name, dtype))
        if b.ndim == 1:
            b = b[None]
        if b.ndim == 2:
            b = b[None]
        if b.ndim != 3 or b.shape[1:] != (H, rows):
            raise ValueError(
                f"{name} must be ({H}, {rows}) (heads, width), with an optional leading "
                f"layer axis, got {tuple(b.shape)}"
            )
        return b

    def _check_rescaled(self) -> None:
        why = []
        if self.norm != "none":
            why.append(f"norm = {self.norm!r} (it needs 'none')")
        if self.O is not None or self.ffn is not None:
            why.append("output maps or a feed-forward term")
        if any(b is not None for b in (self.bQ, self.bK, self.bV, self.bO)):
            why.append("biases")
        if self.layers > 1:
            why.append(f"{self.layers} layers")
        V = self.V
        if V.shape[-2] != V.shape[-1]:
            why.append("a V that is not d×d")
        elif not isinstance(V, Tracer) and not bool(jnp.all(V == V[:, :1])):
            why.append("a different V per head")
        if why:
            raise ValueError(
                "frame 'z' (z = e^{−tV} x) is the plain dynamics with one V shared by the "
                f"heads; this field has {', '.join(why)}"
            )

    def weight(self, name: str) -> Array:
        """The shared `V` of a frame-`"z"` field with its LoRAs (`*batch, d, d`): what
        defines the frame (`Solution.to_x`)."""
        if name != "V" or self.frame != "z":
            raise ValueError("weight('V') is the shared V of a field in frame 'z'")
        V = self.V[0, 0]
        for lo in self.loras:
            if lo.target == "V":
                V = lo.merged(V)
        return V

    def _weight(self, target: str) -> Array:
        """The frozen weight a LoRA on `target` perturbs: `(L', H, out, in)` for the
        attention weights, `(L', out, in)` for the feed-forward ones."""
        if target in ("W1", "W2"):
            return getattr(self.ffn, target)
        return getattr(self, target)

    def _checked_loras(self, lora) -> tuple[LoRA, ...]:
        dtype = self.beta.dtype
        out = []
        for lo in lora_tuple(lora):
            target = check_choice(lo.target, "lora target", FAMILY_TARGETS)
            if target == "O" and self.O is None:
                raise ValueError("lora on O: this field has no output maps (it averages its heads)")
            if target in ("W1", "W2") and self.ffn is None:
                raise ValueError(f"lora on {target}: this field has no feed-forward term")
            if target in ("W1", "W2") and lo.head is not None:
                raise ValueError(f"lora on {target}: the feed-forward term has no heads")
            if lo.head is not None and lo.head >= self.heads:
                raise ValueError(f"lora head {lo.head} is not one of the {self.heads} head(s)")
            if lo.layer is not None and lo.layer >= self.layers:
                raise ValueError(f"lora layer {lo.layer} is not one of the {self.layers} layer(s)")
            if self.frame == "z" and target == "V" and lo.head is not None:
                raise ValueError("in frame 'z' the heads share V: a LoRA on V takes head=None")
            rows, cols = self._weight(target).shape[-2:]
            if lo.A.shape[-1] != cols or lo.B.shape[-2] != rows:
                raise ValueError(
                    f"lora on {target} has A {tuple(lo.A.shape[-2:])} and B "
                    f"{tuple(lo.B.shape[-2:])}; {target} is {rows}×{cols}"
                )
            if lo.rank > min(rows, cols):
                raise ValueError(f"lora rank {lo.rank} exceeds min{(rows, cols)} of {target}")
            out.append(lo._placed(lo.A.astype(dtype), lo.B.astype(dtype), lo.alpha.astype(dtype)))
        if len({lo.batch_shape for lo in out}) > 1:
            raise ValueError(
                "stacked LoRAs of one field must share a batch shape, got "
                f"{sorted({lo.batch_shape for lo in out})}"
            )
        return tuple(out)

    def with_lora(self, lora: LoRA | Sequence[LoRA] | None) -> TransformerField:
        """The same field with `lora` (a LoRA, a sequence or None) replacing its LoRAs."""
        return eqx.tree_at(lambda f: f.loras, self, self._checked_loras(lora))

    def without_lora(self) -> TransformerField:
        return self.with_lora(None)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Batch shape of stacked LoRAs (empty for a single field)."""
        return self.loras[0].batch_shape if self.loras else ()

    def merged(self) -> TransformerField:
        """The field with its LoRAs added into the weights (`W + ΔW` at each LoRA's head
        and layer) and no LoRA left. A stacked LoRA must be indexed first (`simulate`
        vmaps over it)."""
        if not self.loras:
            return self
        if self.batch_shape:
            raise ValueError(
                f"the field carries stacked LoRAs (batch {self.batch_shape}): solve it "
                "with simulate, or index the LoRA factors for one member"
            )
        f = self
        L = self.layers
        for lo in self.loras:
            W = f._weight(lo.target)
            if lo.layer is not None and W.shape[0] == 1 and L > 1:
                W = jnp.broadcast_to(W, (L,) + W.shape[1:])
            at = (slice(None) if lo.layer is None else (lo.layer if W.shape[0] > 1 else 0),)
            if lo.target not in ("W1", "W2"):
                at += (slice(None) if lo.head is None else lo.head,)
            W = W.at[at].add(lo.delta())
            where = (
                (lambda g, n=lo.target: getattr(g.ffn, n))
                if lo.target in ("W1", "W2")
                else (lambda g, n=lo.target: getattr(g, n))
            )
            f = eqx.tree_at(where, f, W)
        return eqx.tree_at(lambda g: g.loras, f, ())

    # -- random members -------------------------------------------------------------
    @classmethod
    def random(
        cls,
        d: int,
        *,
        key,
        heads: int = 1,
        layers: int = 1,
        qk: str = "gaussian",
        value: str = "identity",
        layer_times: Sequence[float] | None = None,
        dtype: DTypeLike | None = None,
        **options,
    ) -> TransformerField:
        """A member with weights drawn as the particle papers draw them, one draw per
        head and layer (layer ℓ, head h from `fold_in(key, ℓ·heads + h)`: the same key
        gives the same weights).

        - `qk`: `"gaussian"` (`Q_h, K_h` with i.i.d. `N(0, 1/d)` entries),
          `"goe"` (`Q_hᵀK_h = (G + Gᵀ)/√(2d)`, a GOE matrix, with `K_h = I`), or
          `"gpt2"` (entries `N(0, 0.02²)`, GPT-2's initialisation).
        - `value`: `"identity"`, `"gaussian"` (`N(0, 1/d)`), `"gpt2"` (`N(0, 0.02²)`),
          `"plus_A"` or `"minus_A"` (`V_h = ±Q_hᵀK_h`).
        - `layers > 1` needs `layer_times` (`L − 1` increasing times); `options`: the
          other arguments of the constructor (`beta`, `norm`, `mask`, `alibi`, …).
        """
        d = check_int(d, "dimension d", 1)
        heads = check_int(heads, "heads", 1)
        layers = check_int(layers, "layers", 1)
        qk = check_choice(qk, "qk", ("gaussian", "goe", "gpt2"))
        value = check_choice(value, "value", ("identity", "gaussian", "gpt2", "plus_A", "minus_A"))
        dtype = check_dtype(jnp.dtype(dtype) if dtype is not None else jnp.result_type(float))
        check_memory(3.0 * layers * heads * d * d * dtype.itemsize, "the random weights")
        eye = jnp.eye(d, dtype=dtype)

        def draw(k):
            kq, kk, kv = jax.random.split(k, 3)

            def normal(k_, scale):
                return scale * draw_normal(k_, (d, d), dtype)

            if qk == "goe":
                G = draw_normal(kq, (d, d), dtype)
                Q, K = (G + G.T) / math.sqrt(2 * d), eye
            else:
                scale = 0.02 if qk == "gpt2" else 1 / math.sqrt(d)
                Q, K = normal(kq, scale), normal(kk, scale)
            if value in ("plus_A", "minus_A"):
                V = (1.0 if value == "plus_A" else -1.0) * (Q.T @ K)
            elif value == "identity":
                V = eye
            else:
                V = normal(kv, 0.02 if value == "gpt2" else 1 / math.sqrt(d))
            return Q, K, V

        keys = [jax.random.fold_in(key, i) for i in range(layers * heads)]
        drawn = [draw(k) for k in keys]
        Q, K, V = (jnp.stack([w[i] for w in drawn]).reshape(layers, heads, d, d) for i in range(3))
        return cls(Q, K, V, layer_times=layer_times, dtype=dtype, **options)

    # -- the contract `simulate` reads ---------------------------------------------
    @property
    def norms(self) -> tuple[str, ...]:
        """The normalisation scheme of each layer."""
        return self.norm if isinstance(self.norm, tuple) else (self.norm,) * self.layers

    @property
    def dynamics(self) -> str:
        name = self.norm if isinstance(self.norm, str) else "mix(" + ",".join(self.norm) + ")"
        return (
            f"family/{name}"
            + ("" if self.normalised else "/unnormalised")
            + ("/rescaled" if self.frame == "z" else "")
        )

    @property
    def on_sphere(self) -> bool:
        """Tokens live on the unit sphere (post-LN, nGPT, in every layer)."""
        return all(n in SPHERE_NORMS for n in self.norms)

    @property
    def d(self) -> int:
        return self.Q.shape[-1]

    @property
    def heads(self) -> int:
        return self.Q.shape[1]

    @property
    def layers(self) -> int:
        return len(self.layer_times) + 1

    @property
    def jump_times(self) -> tuple[float, ...]:
        """Times where the weights change: the solver steps exactly onto them."""
        return self.layer_times

    # -- dynamics -------------------------------------------------------------------
    def layer(self, t: ScalarLike) -> Array:
        """Index of the layer acting at time t (a layer starts at its own time)."""
        if not self.layer_times:
            return jnp.asarray(0)
        times = jnp.asarray(self.layer_times, jnp.result_type(t, self.beta.dtype))
        # the number of layer times ≤ t (searchsorted's "right" side, as one reduction
        # instead of its loop)
        return jnp.sum(times <= t).astype(jnp.int32)

    @staticmethod
    def _at(W, layer):
        return W[0] if W.shape[0] == 1 else W[layer]

    def solve_args(self) -> tuple:
        """Per solve: the field with its LoRAs merged (`merged`), and the logit matrices
        `A_h = Q_hᵀ K_h` of every layer and head when the heads are not narrower than d
        and there is no mask (then `⟨Q_h y_i, K_h y_j⟩ = y_iᵀ A_h y_j` takes one n×d×d
        product instead of two); None otherwise. In frame `"z"`, also `(c, V − cI)`."""
        # the merged field without its (now empty) tuple of LoRAs: diffrax's
        # BacksolveAdjoint fails on an empty tuple among the arguments it differentiates
        f = eqx.tree_at(
            lambda g: g.loras, self.merged(), None, is_leaf=lambda x: isinstance(x, tuple) and not x
        )
        # The fold is measured faster without a mask and slower with one (CPU, n = 256,
        # d = 16: 0.81× against 1.10× of the hand-written scan; benchmarks/family.py)
        fold = (
            f.Q.shape[-2] >= f.Q.shape[-1]
            and self.mask == "none"
            and self.bQ is None
            and self.bK is None
        )
        A = jnp.swapaxes(f.Q, -1, -2) @ f.K if fold else None
        if self.frame == "x":
            return f, A
        # the rescaled frame: the shift c (spectral abscissa of V) and V − cI, per solve
        V = f.V[0, 0]
        c = jax.lax.stop_gradient(exponential_shift(V))
        return f, A, (c, V - c * jnp.eye(V.shape[-1], dtype=V.dtype))

    def _attention(
        self, layer, y: Float[Array, "n d"], A, x=None, log_scale=0.0
    ) -> Float[Array, "n d"]:
        """The heads' attention outputs at `layer` (weights already merged): values from
        `y`, logits from `x` (default `y`) scaled by `e^{log_scale}`."""
        x = y if x is None else x
        if A is None:
            Q, K = (self._at(W, layer) for W in (self.Q, self.K))
        else:  # queries x A_h against the keys x themselves (K is not read)
            Q = K = jnp.swapaxes(self._at(A, layer), -1, -2)
        V = self._at(self.V, layer)
        causal = self.mask == "causal"
        shared_keys = A is not None
        zero = jnp.zeros((self.heads, 1), V.dtype)  # an absent bias (added as 0)
        bq, bk, bv = (
            zero if b is None else self._at(b, layer) for b in (self.bQ, self.bK, self.bV)
        )

        def head(Qh, Kh, Vh, lam, bqh, bkh, bvh):
            add = lambda u, b, given: u + b[None, :] if given else u
            return attend(
                add(x @ Qh.T, bqh, self.bQ is not None),
                x if shared_keys else add(x @ Kh.T, bkh, self.bK is not None),
                add(y @ Vh.T, bvh, self.bV is not None),
                self.beta,
                log_scale,
                kernel=self.kernel,
                block=self.block,
                causal=causal,
                alibi=lam,
                normalise=self.normalised,
            )

        lam = self.alibi
        H = self.heads
        if H <= UNROLL_HEADS:
            outs = [
                head(Q[h], K[h], V[h], None if lam is None else lam[h], bq[h], bk[h], bv[h])
                for h in range(H)
            ]
            if self.O is None:
                out = functools.reduce(jnp.add, outs) / H
            else:
                O = self._at(self.O, layer)
                out = functools.reduce(jnp.add, [o @ O[h].T for h, o in enumerate(outs)])
        else:
            outs = jax.vmap(head, in_axes=(0, 0, 0, None if lam is None else 0, 0, 0, 0))(
                Q, K, V, lam, bq, bk, bv
            )
            if self.O is None:
                out = jnp.mean(outs, axis=0)
            else:
                out = jnp.einsum("hnf,hdf->nd", outs, self._at(self.O, layer))
        return out if self.bO is None else out + self._at(self.bO, layer)[None, :]

    def _sublayers(self, layer, y, A) -> list[Array]:
        out = [self._attention(layer, y, A)]
        if self.ffn is not None:
            out.append(self.ffn(layer if self.ffn.layers > 1 else 0, y))
        return out

    def layer_norm(self, layer, y: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """What a sub-layer reads: `γ ⊙ θ + b` with `θ = y/|y|` (after subtracting each
        token's mean when `centre`)."""
        if self.centre:
            y = y - jnp.mean(y, axis=-1, keepdims=True)
        theta = _unit_or_zero(y)
        if self.ln_gain is not None:
            theta = theta * self._at(self.ln_gain, layer)[None, :]
        if self.ln_bias is not None:
            theta = theta + self._at(self.ln_bias, layer)[None, :]
        return theta

    def _plain_ln(self) -> bool:
        return self.ln_gain is None and self.ln_bias is None and not self.centre

    def _velocity(self, norm: str, layer, y, A):
        if norm == "none":
            return sum(self._sublayers(layer, y, A))
        if norm in SPHERE_NORMS:
            # on the sphere y is its own projection: read y itself unless the LayerNorm
            # centres or has an affine map
            inp = y if self._plain_ln() else self.layer_norm(layer, y)
            subs = self._sublayers(layer, inp, A)
            if norm == "post":
                return tangent(y, sum(subs))
            alpha = self.alpha if self.alpha.ndim == 0 else self.alpha[layer]
            return alpha * tangent(y, sum(_unit_or_zero(s) for s in subs))
        subs = self._sublayers(layer, self.layer_norm(layer, y), A)
        if norm == "pre":
            return sum(subs)
        return sum(_unit_or_zero(s) for s in subs)  # peri

    def attention_term(
        self, t: ScalarLike, y: Float[Array, "n d"], args=None
    ) -> Float[Array, "n d"]:
        """`A_i`: the heads' attention outputs on tokens `y` at time `t` (mean or summed
        through O, LoRAs included); `args`: `solve_args()` (computed when not given)."""
        if self.frame == "z":
            raise ValueError("attention_term reads tokens x: this field's state is z")
        f, A = (self.solve_args() if args is None else args)[:2]
        return f._attention(self.layer(t), y, A)

    def sublayers(self, t: ScalarLike, y: Float[Array, "n d"], args=None) -> list[Array]:
        """The sub-layer outputs at tokens `y`: attention, then the feed-forward term."""
        if self.frame == "z":
            raise ValueError("sublayers read tokens x: this field's state is z")
        f, A = (self.solve_args() if args is None else args)[:2]
        return f._sublayers(self.layer(t), y, A)

    def __call__(self, t, y, args=None):
        if jnp.ndim(y) < 2 or jnp.shape(y)[-1] != self.d:
            raise ValueError(
                f"the field has d = {self.d}; tokens must have shape (n, {self.d}), "
                f"got {tuple(jnp.shape(y))}"
            )
        if self.frame == "z":
            f, A, (c, Vc) = self.solve_args() if args is None else args
            t = jnp.asarray(t, Vc.dtype)
            # x = e^{tV} z = e^{ct} S z: logits from S z, scaled by e^{2ct}
            x = y @ expm(t * Vc).T
            return f._attention(0, y, A, x, 2.0 * c * t) - y @ f.V[0, 0].T
        f, A = (self.solve_args() if args is None else args)[:2]
        layer = self.layer(t)
        if isinstance(self.norm, str):
            return f._velocity(self.norm, layer, y, A)
        schemes = sorted(set(self.norm))
        which = jnp.asarray([schemes.index(n) for n in self.norm])[layer]
        branches = [lambda y_, n=n: f._velocity(n, layer, y_, A) for n in schemes]
        return jax.lax.switch(which, branches, y)
