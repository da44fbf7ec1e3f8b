"""LoRA: a low-rank change `ΔW = (α/r)·B A` of a frozen weight (see docs/theory.md,
'LoRA as a perturbation').

One implementation for the whole package: simulations perturb Q, K or V with it, and the
modular transformer trains it. A stacked LoRA (factors with a leading batch axis) is how a
batch of perturbations is passed to `simulate`.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    PRNGKeyArray,
    ScalarLike,
    as_float_array,
    check_finite,
    check_positive,
    draw_normal,
    draw_uniform,
)

#: the attention matrices a LoRA can perturb
TARGETS = ("Q", "K", "V")


class LoRA(eqx.Module):
    """Low-rank adapter `ΔW = (alpha / r) · B @ A` for the weight named `target`.

    **Arguments:**

    - `A`: down-projection, shape `(r, d_in)` (or `(batch, r, d_in)` when stacked).
    - `B`: up-projection, shape `(d_out, r)` (or `(batch, d_out, r)`).
    - `alpha`: LoRA's α; the change is scaled by `alpha / r`.
    - `target`: name of the perturbed weight: `"Q"`, `"K"` or `"V"` for the particle
      fields; the modular transformer also accepts `"O"`; a `TransformerField` also
      `"O"`, `"W1"` and `"W2"` (its feed-forward weights).
    - `head`, `layer`: for a `TransformerField`, the head and the layer whose weight is
      perturbed (`None`: every head, every layer, by the same ΔW). The classic fields
      have one of each and refuse them.

    Applying it never needs `W + ΔW` when the factored product is cheaper:
    `x Wᵀ + (α/r)(x Aᵀ) Bᵀ` (see `apply`).
    """

    A: Float[Array, "*batch r d_in"]
    B: Float[Array, "*batch d_out r"]
    alpha: Float[Array, ""]
    target: str = eqx.field(static=True)
    head: int | None = eqx.field(static=True)
    layer: int | None = eqx.field(static=True)

    def __init__(
        self,
        A: Float[ArrayLike, "*batch r d_in"],
        B: Float[ArrayLike, "*batch d_out r"],
        alpha: ScalarLike = 1.0,
        target: str = "V",
        *,
        head: int | None = None,
        layer: int | None = None,
    ):
        A = as_float_array(A, "lora A")
        B = as_float_array(B, "lora B")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"lora A must be r×d and B d×r, got shapes {tuple(A.shape)} and {tuple(B.shape)}"
            )
        if A.shape[-2] != B.shape[-1]:
            raise ValueError(
                f"lora rank mismatch: A is {A.shape[-2]}×{A.shape[-1]} (r×d) but B is "
                f"{B.shape[-2]}×{B.shape[-1]} (d×r)"
            )
        if A.shape[:-2] != B.shape[:-2]:
            raise ValueError(
                f"lora A and B have different batch shapes {A.shape[:-2]} and {B.shape[:-2]}"
            )
        check_finite(A, "lora A")
        check_finite(B, "lora B")
        if not isinstance(alpha, Tracer):
            check_positive(alpha, "lora alpha")
        self.A = jnp.asarray(A)
        self.B = jnp.asarray(B)
        self.alpha = jnp.asarray(alpha, dtype=self.A.dtype)
        if not isinstance(target, str) or not target:
            raise ValueError(f"lora target must be a weight name, got {target!r}")
        self.target = target
        for name, v in (("head", head), ("layer", layer)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
            ):
                raise ValueError(f"lora {name} must be an index ≥ 0 or None, got {v!r}")
        self.head = None if head is None else int(head)
        self.layer = None if layer is None else int(layer)

    def _placed(self, A, B, alpha=None) -> LoRA:
        """A LoRA with the factors `A`, `B` (and `alpha`) at this one's target, head
        and layer."""
        alpha = self.alpha if alpha is None else alpha
        return LoRA(A, B, alpha, self.target, head=self.head, layer=self.layer)

    # -- constructors -------------------------------------------------------------
    @classmethod
    def zeros_init(
        cls,
        d_in: int,
        d_out: int | None = None,
        *,
        rank: int,
        alpha: ScalarLike | None = None,
        target: str = "V",
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ) -> LoRA:
        """Training initialisation (Hu et al. 2021): `B = 0`, `A ~ U(±1/√d_in)`; ΔW = 0."""
        d_out = d_in if d_out is None else d_out
        _check_rank(rank, min(d_in, d_out))
        dtype = dtype or jnp.result_type(float)
        A = draw_uniform(key, (rank, d_in), dtype, -1.0, 1.0) / float(np.sqrt(d_in))
        B = jnp.zeros((d_out, rank), dtype)
        return cls(A, B, float(rank) if alpha is None else alpha, target)

    @classmethod
    def random(
        cls,
        d: int,
        *,
        rank: int,
        norm: float | Float[ArrayLike, " batch"],
        target: str = "V",
        alpha: ScalarLike = 1.0,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
        head: int | None = None,
        layer: int | None = None,
    ) -> LoRA:
        """Random Gaussian factors rescaled so that `‖ΔW‖₂ = norm` exactly (operator norm).

        `norm` may be an array of shape `(batch,)`: the result is then a stacked LoRA with
        the same random direction at each size (`batch` perturbations). `head`, `layer`:
        where it acts in a `TransformerField` (the class docstring).
        """
        _check_rank(rank, d)
        dtype = dtype or jnp.result_type(float)
        ka, kb = jax.random.split(key)
        A = draw_normal(ka, (rank, d), dtype)
        B = draw_normal(kb, (d, rank), dtype)
        scale = jnp.asarray(alpha, dtype) / rank
        sigma = jnp.linalg.norm(scale * (B @ A), ord=2)
        norm = jnp.asarray(norm, dtype)
        where = {"head": head, "layer": layer}
        if norm.ndim == 0:
            return cls(A, B * (norm / sigma), alpha, target, **where)
        Bs = B[None] * (norm / sigma)[:, None, None]
        As = jnp.broadcast_to(A, (norm.shape[0],) + A.shape)
        return cls(As, Bs, alpha, target, **where)

    @classmethod
    def stack(cls, loras: Iterable[LoRA]) -> LoRA:
        """Stack LoRAs of equal shapes, target, head, layer and α into one batched LoRA."""
        loras = list(loras)
        if not loras:
            raise ValueError("cannot stack an empty list of LoRAs")
        t = {lo.target for lo in loras}
        if len(t) != 1:
            raise ValueError(f"cannot stack LoRAs of different targets {sorted(t)}")
        places = {(lo.head, lo.layer) for lo in loras}
        if len(places) != 1:
            raise ValueError(
                f"cannot stack LoRAs at different (head, layer) places {sorted(places, key=str)}"
            )
        alphas = {float(lo.alpha) for lo in loras}
        if len(alphas) != 1:
            raise ValueError("cannot stack LoRAs with different alpha")
        shapes = sorted({(lo.A.shape, lo.B.shape) for lo in loras})
        if len(shapes) != 1:
            raise ValueError(
                "cannot stack LoRAs of different shapes (rank, d or batch): "
                + ", ".join(f"A {a}, B {b}" for a, b in shapes)
            )
        return loras[0]._placed(
            jnp.stack([lo.A for lo in loras]), jnp.stack([lo.B for lo in loras])
        )

    # -- properties ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.A.shape[:-2])

    @property
    def scale(self) -> Float[Array, ""]:
        return self.alpha / self.rank

    def delta(self) -> Float[Array, "*batch d_out d_in"]:
        """The materialised change `ΔW = (α/r) B A`."""
        return self.scale * (self.B @ self.A)

    def merged(self, W: Float[Array, "d_out d_in"]) -> Float[Array, "*batch d_out d_in"]:
        """`W + ΔW` (for a stacked LoRA, one merged weight per batch member)."""
        delta = self.delta()
        return jnp.broadcast_to(W, delta.shape) + delta

    def apply(
        self, W: Float[Array, "d_out d_in"], x: Float[Array, "n d_in"]
    ) -> Float[Array, "n d_out"]:
        """`x (W + ΔW)ᵀ`, in whichever form costs fewer flops.

        Materialising costs `d_out·d_in·r` once; the factored form `x Wᵀ + (α/r)(x Aᵀ)Bᵀ`
        costs `n·r·(d_in + d_out)` extra. The choice is static (shapes only).
        """
        n = x.shape[0]
        d_out, d_in = W.shape
        if d_out * d_in <= n * (d_in + d_out):
            return x @ self.merged(W).T
        return x @ W.T + self.scale * ((x @ self.A.T) @ self.B.T)


def lora_tuple(lora: LoRA | Iterable[LoRA] | None) -> tuple[LoRA, ...]:
    """A field's `lora=` argument (a LoRA, a sequence of them or None) as a tuple."""
    if lora is None:
        return ()
    loras = (lora,) if isinstance(lora, LoRA) else tuple(lora)
    for lo in loras:
        if not isinstance(lo, LoRA):
            raise TypeError(f"lora must be a LoRA or a sequence of LoRA, got {type(lo).__name__}")
    return loras


def _check_rank(rank, d: int) -> None:
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    if rank > d:
        raise ValueError(f"lora rank {rank} exceeds the dimension d = {d}")
