"""Self-attention vector fields (see docs/theory.md, 'Particle dynamics' to
'Sphere dynamics') as Equinox modules.

All four share the attention kernel of `attention.py` and the LoRA of `lora.py`. Each
field is a diffrax-compatible callable `field(t, y, args)`; its weights are pytree
leaves, so `jax.grad` differentiates through them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
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
    check_square,
)
from .attention import KERNELS, attend, attention_scores, softmax_weights, unnormalised_weights
from .lora import TARGETS, LoRA, lora_tuple

_Self = TypeVar("_Self", bound="AbstractField")


def unit_rows(x: Float[Array, "*batch n d"]) -> Float[Array, "*batch n d"]:
    """`x_i / |x_i|` without overflow or underflow: each row is first divided by its
    largest absolute entry, so `|x_i|` is computed from numbers in [−1, 1] (a token of
    norm 1e200 in float64, or 3e19 in float32, would otherwise square to inf and become
    0). A zero row gives NaN; callers reject zero tokens first."""
    m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    y = x / m
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)


def _checked_loras(lora: LoRA | Sequence[LoRA] | None, dim: int, dtype) -> tuple[LoRA, ...]:
    """`lora` (a LoRA, a sequence or None) as a checked tuple in the field's dtype."""
    fixed = []
    for lo in lora_tuple(lora):
        check_choice(lo.target, "lora target", TARGETS)
        if lo.head not in (None, 0) or lo.layer not in (None, 0):
            raise ValueError(
                f"lora head = {lo.head}, layer = {lo.layer}: this field has one head and "
                "one layer (several are a TransformerField's)"
            )
        if lo.A.shape[-1] != dim or lo.B.shape[-2] != dim:
            raise ValueError(
                f"lora on {lo.target} has A {tuple(lo.A.shape[-2:])} and B "
                f"{tuple(lo.B.shape[-2:])} but the tokens have d = {dim}"
            )
        if lo.rank > dim:
            raise ValueError(f"lora rank {lo.rank} exceeds the dimension d = {dim}")
        fixed.append(
            LoRA(lo.A.astype(dtype), lo.B.astype(dtype), lo.alpha.astype(dtype), lo.target.upper())
        )
    return tuple(fixed)


class AbstractField(eqx.Module):
    """Weights `(Q, K, V, β)` plus optional LoRA perturbations; abstract `__call__`.

    **Arguments:**

    - `Q`, `K`, `V`: `d×d` matrices; any that is `None` is the identity (then `d` is
      taken from the others or from `d=`).
    - `beta`: temperature β ≥ 0.
    - `lora`: a `LoRA`, a sequence of them (different or equal targets add up), or
      `None`. A stacked LoRA (leading batch axis) makes the field a batch of fields,
      which `simulate` vmaps over.
    - `d`: token dimension, needed only when `Q`, `K` and `V` are all `None`.
    - `dtype`: cast every weight to this dtype (default: the default float dtype).
      `float64` needs 64-bit JAX (`jax_enable_x64`, e.g. `jaxattn.setup_jax("float64")`);
      without it the constructor raises, as `simulate` does for a float64 `x0`.
    - `kernel`: `"dense"` (materialised n×n softmax), `"blockwise"` (online softmax over
      key blocks of size `block`: memory O(block²), for large n), or `"auto"` (default:
      dense up to n·n = 2048², blockwise above; see `_attention.AUTO_DENSE_MAX_SCORES`),
      `"dot_product"` (`jax.nn.dot_product_attention` with β as its explicit scale) or
      `"dot_product_bf16"` (the same with q, k, v in bfloat16: cuDNN flash attention on a
      GPU; the state stays in `dtype`). The dot-product kernels are float32 paths (JAX
      computes their softmax in float32) and do not apply to USA, whose weights are not
      a softmax.
    """

    Q: Float[Array, "d d"]
    K: Float[Array, "d d"]
    V: Float[Array, "d d"]
    beta: Float[Array, ""]
    loras: tuple[LoRA, ...]
    kernel: str = eqx.field(static=True)
    block: int = eqx.field(static=True)

    #: the name `make_field` and specs use
    dynamics: eqx.AbstractClassVar[str]
    #: tokens live on the unit sphere (`simulate` normalises `x0`; `renormalise` applies)
    on_sphere: eqx.AbstractClassVar[bool]
    #: attention rows sum to one (a softmax); False for USA's unnormalised weights
    normalised: eqx.AbstractClassVar[bool]
    #: the variable the state holds: `"x"` (the tokens) or `"z" = e^{−tV} x` (rescaled)
    frame: eqx.AbstractClassVar[str]

    def __init__(
        self,
        Q: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
        K: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
        V: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
        *,
        beta: ScalarLike = 1.0,
        lora: LoRA | Sequence[LoRA] | None = None,
        d: int | None = None,
        dtype: DTypeLike | None = None,
        kernel: str = "auto",
        block: int = 1024,
    ):
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        # float32 or float64 (the solvers and every analysis take these two); float64
        # without x64 is the same one-line error as a float64 x0 (JAX would silently make
        # every weight float32).
        check_dtype(dtype)
        mats = {"Q": Q, "K": K, "V": V}
        given = {
            k: jnp.asarray(as_float_array(v, k, dtype)) for k, v in mats.items() if v is not None
        }
        for name, W in given.items():
            check_square(W, name)
        dims = {W.shape[0] for W in given.values()}
        if d is not None:
            dims.add(check_int(d, "dimension d", 1))
        if len(dims) > 1:
            shapes = ", ".join(f"{k} {tuple(W.shape)}" for k, W in given.items())
            raise ValueError(f"Q, K, V and d disagree on the dimension: {shapes}, d={d}")
        if not dims:
            raise ValueError("give at least one of Q, K, V, or the dimension d")
        (dim,) = dims
        if dim < 1:
            raise ValueError(f"dimension d must be ≥ 1, got {dim}")
        check_memory(3.0 * dim * dim * dtype.itemsize, f"weights of dimension d = {dim}")
        eye = jnp.eye(dim, dtype=dtype)
        self.Q = given.get("Q", eye)
        self.K = given.get("K", eye)
        self.V = given.get("V", eye)
        if isinstance(beta, Tracer):
            self.beta = beta.astype(dtype)
        else:
            self.beta = jnp.asarray(check_positive(beta, "beta", allow_zero=True), dtype)
        self.loras = _checked_loras(lora, dim, dtype)
        self.kernel = check_choice(kernel, "attention kernel", KERNELS)
        if self.kernel.startswith("dot_product") and not type(self).normalised:
            raise ValueError(
                f"attention kernel {kernel!r} computes a softmax; USA's "
                "unnormalised weights need dense, blockwise or auto"
            )
        if self.kernel.startswith("dot_product") and self.V.dtype == jnp.float64:
            raise ValueError(
                f"attention kernel {kernel!r} computes its softmax in float32 "
                "(jax.nn.dot_product_attention): use it with dtype float32, "
                "or dense/blockwise for float64"
            )
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"attention block must be a positive integer, got {block!r}")
        self.block = int(block)

    # -- weights ------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.V.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Batch shape of stacked LoRAs (empty for a single field)."""
        shapes = {lo.batch_shape for lo in self.loras}
        if len(shapes) > 1:
            raise ValueError(f"stacked LoRAs of one field must share a batch shape, got {shapes}")
        return shapes.pop() if shapes else ()

    def weight(self, name: str) -> Float[Array, "*batch d d"]:
        """Effective weight `W + Σ ΔW` (materialised; cheap, d×d; one per member of a
        stacked LoRA)."""
        W = getattr(self, name)
        for lo in self.loras:
            if lo.target == name:
                W = lo.merged(W)
        return W

    def _check_tokens(self, x) -> None:
        """Tokens of the field's dimension (a static shape check: free under jit)."""
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != self.d:
            raise ValueError(
                f"the field has d = {self.d}; tokens must have shape (..., n, {self.d}), "
                f"got {tuple(jnp.shape(x))}"
            )

    def project(self, name: str, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """`x W_effᵀ` for W in {Q, K, V}, factored when that is cheaper."""
        self._check_tokens(x)
        mine = [lo for lo in self.loras if lo.target == name]
        W = getattr(self, name)
        if len(mine) == 1:
            return mine[0].apply(W, x)
        return x @ self.weight(name).T

    @property
    def A(self) -> Float[Array, "*batch d d"]:
        """`A = Qᵀ K`: only this enters the logits `β x_iᵀ A x_j` (one per member of a
        stacked LoRA)."""
        return jnp.swapaxes(self.weight("Q"), -1, -2) @ self.weight("K")

    def with_lora(self: _Self, lora: LoRA | Sequence[LoRA] | None) -> _Self:
        """The same field with `lora` (LoRA, sequence or None) replacing its LoRAs. Every
        other leaf is kept, so a subclass with fields of its own keeps them."""
        loras = _checked_loras(lora, self.d, self.V.dtype)
        return eqx.tree_at(lambda f: f.loras, self, loras)

    def without_lora(self) -> AbstractField:
        return self.with_lora(None)

    # -- dynamics -----------------------------------------------------------------
    def attention(self, t: ScalarLike, y: Float[Array, "n d"]) -> Float[Array, "n n"]:
        """The attention matrix P at state y and time t."""
        self._check_tokens(y)
        q, k, log_scale = self._queries_keys(t, y)
        if not self.normalised:
            return unnormalised_weights(attention_scores(q, k), self.beta)
        return softmax_weights(attention_scores(q, k), self.beta, log_scale)

    def attend(
        self,
        t: ScalarLike,
        y: Float[Array, "n d"],
        values: Float[Array, "n f"],
        args: PyTree | None = None,
    ) -> Float[Array, "n f"]:
        """`Σ_j P_ij values_j` with the field's kernel (dense or blockwise)."""
        q, k, log_scale = self._queries_keys(t, y, args)
        return attend(
            q,
            k,
            values,
            self.beta,
            log_scale,
            kernel=self.kernel,
            block=self.block,
            normalise=self.normalised,
        )

    @abc.abstractmethod
    def solve_args(self) -> PyTree:
        """Per-solve constants computed once outside the time loop (passed as `args`)."""

    @abc.abstractmethod
    def _queries_keys(self, t, y, args=None) -> tuple[Array, Array, Array | float]:
        """`(q, k, log_scale)`: the logits are `β e^{log_scale} q kᵀ`."""

    @abc.abstractmethod
    def __call__(self, t, y: Float[Array, "n d"], args=None) -> Float[Array, "n d"]: ...


class AbstractTokenFrameField(AbstractField):
    """A field whose state is the tokens x themselves (every dynamics but the rescaled
    one): the logits are `β x_iᵀ A x_j` with the per-solve constant `A = Qᵀ K`."""

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    def solve_args(self) -> Float[Array, "*batch d d"]:
        """The logit matrix `A = Qᵀ K` (LoRAs merged)."""
        return self.A

    def _queries_keys(self, t, y, args=None):
        # Only `A = Qᵀ K` enters the logits: `<Q x_i, K x_j> = x_iᵀ A x_j`, so the scores
        # are `(x A) xᵀ`: one n×d×d product instead of two.
        A = self.A if args is None else args
        return y @ A, y, 0.0


# float32 matrix exponential: truncated Taylor series of degree 8 with scaling and
# squaring. On ‖M/2^s‖₁ ≤ θ = 1/2 the truncation error is ≤ θ⁹/9!·e^{2θ} ≈ 1.5e-8 relative,
# below float32's unit roundoff (6e-8), so it agrees with `jax.scipy.linalg.expm` (Padé
# with an LU solve) up to rounding, at 4 matrix products and no LU/triangular solve (the
# solve was ~75 % of `jsl.expm` at d = 64 on the CPU). Up to `_EXPM_MAX_SQUARINGS`
# squarings: NaN beyond ‖M‖₁ = 2^19 (jsl.expm: ≈ 2^18.97, its own NaN limit).
_EXPM_THETA = 0.5
_EXPM_MAX_SQUARINGS = 20
_TAYLOR8 = [1.0 / math.factorial(k) for k in range(9)]


def expm(M: Float[Array, "d d"]) -> Float[Array, "d d"]:
    """`e^M` of one square matrix: `jax.scipy.linalg.expm` for float64, the Taylor
    scaling-and-squaring above for float32 (same result up to rounding, cheaper)."""
    if M.dtype != jnp.float32:
        return jsl.expm(M)
    hi = jax.lax.Precision.HIGHEST
    mm = lambda a, b: jnp.matmul(a, b, precision=hi)
    d = M.shape[-1]
    norm = jax.lax.stop_gradient(jnp.max(jnp.sum(jnp.abs(M), axis=-2)))
    s = jnp.maximum(0.0, jnp.ceil(jnp.log2(norm / _EXPM_THETA)))
    s = jnp.where(jnp.isnan(s), 0.0, s)
    B = M * jnp.exp2(-s)  # exact: a power of two
    eye = jnp.eye(d, dtype=M.dtype)
    c = _TAYLOR8
    B2 = mm(B, B)
    # Σ_k B^k/k! = L0 + B²(L1 + B²(L2 + B²(L3 + c8 B²))), L_j = c_{2j} I + c_{2j+1} B.
    R = c[6] * eye + c[7] * B + c[8] * B2
    R = c[4] * eye + c[5] * B + mm(B2, R)
    R = c[2] * eye + c[3] * B + mm(B2, R)
    R = c[0] * eye + c[1] * B + mm(B2, R)

    def squarings(R):
        def body(R, i):
            return jax.lax.cond(i < s, lambda R: mm(R, R), lambda R: R, R), None

        return jax.lax.scan(body, R, jnp.arange(_EXPM_MAX_SQUARINGS, dtype=s.dtype))[0]

    R = jax.lax.cond(s > 0, squarings, lambda R: R, R)
    return jnp.where(s > _EXPM_MAX_SQUARINGS, jnp.nan, R)


def exponential_shift(V: Float[Array, "d d"]) -> Float[Array, ""]:
    """The shift `c` of `e^{tV} = e^{ct} e^{t(V − cI)}`: the spectral abscissa
    `max Re λ(V)`.

    For symmetric V it is `λ_max(V)` (`eigvalsh`, on any device). For a non-normal V the
    numerical abscissa `λ_max((V + Vᵀ)/2)` would bound `‖e^{t(V − cI)}‖` by 1 but exceeds
    the spectral abscissa, so `e^{t(V − cI)}` decays like `e^{−(c − max Re λ)t}`: its
    entries become tiny, and the rounding of the squarings in `expm`, which is relative to
    entries of size one, is then a large relative error (float32: 4e-4 in the tokens at
    t = 100 for V = [[1, .5], [0, .5]], enough to change the final clustering). The
    eigenvalues of a non-symmetric V come from NumPy on the host (`pure_callback`, once
    per solve; only when V is not symmetric, except under `vmap`, where `cond` runs both
    branches), since `jnp.linalg.eig` runs on the CPU only.
    """
    V = jax.lax.stop_gradient(V)  # callbacks have no JVP rule; the caller stops it too
    sym = jnp.linalg.eigvalsh(0.5 * (V + V.T))[-1]

    def host(v):
        v = np.asarray(v, np.float64)
        return np.asarray(np.max(np.linalg.eigvals(v).real), v.dtype).astype(V.dtype)

    def spectral(V):
        spec = jax.pure_callback(
            host, jax.ShapeDtypeStruct((), V.dtype), V, vmap_method="sequential"
        )
        return jnp.minimum(spec, sym)

    # A symmetric V (the common case) never leaves the device.
    return jax.lax.cond(jnp.all(V == V.T), lambda V: sym, spectral, V)


def tangent(x, y):
    """Π_x y = y − <x, y> x, row by row (x assumed on the unit sphere)."""
    return y - jnp.sum(x * y, axis=-1, keepdims=True) * x


class PlainField(AbstractTokenFrameField):
    """Plain dynamics: `x_i' = Σ_j P_ij V x_j`, `P_ij ∝ exp(β<Q x_i, K x_j>)` (see
    docs/theory.md, 'Particle dynamics')."""

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    dynamics = "plain"
    on_sphere = False
    normalised = True
    frame = "x"

    def __call__(self, t, y, args=None):
        return self.attend(t, y, self.project("V", y), args)


class RescaledField(AbstractField):
    """Rescaled dynamics: `z_i' = Σ_j P_ij V (z_j − z_i)` with P computed from
    `x = e^{tV} z` (see docs/theory.md, 'Rescaled dynamics').

    `e^{tV}` is carried as `e^{ct} · e^{t(V − cI)}` with `c` the spectral abscissa
    `max Re λ(V)` (`exponential_shift`), and the factor `e^{2ct}` multiplies the logits
    in log space (`_attention.softmax_weights`). Then `e^{t(V − cI)}` neither grows
    exponentially nor decays to nothing: its norm stays within the eigenvector condition
    number of V (polynomial growth for a defective V). Tokens stay finite for any t.
    """

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    dynamics = "rescaled"
    on_sphere = False
    normalised = True
    frame = "z"

    def solve_args(self):
        """Per-solve constants `(c, V − cI, A)`: the shift `c = λ_max((V + Vᵀ)/2)` (an
        eigvalsh per stage costs more than the attention itself for small n), the
        shifted matrix and the logit matrix `A = Qᵀ K` (LoRAs merged)."""
        V = self.weight("V")
        c = jax.lax.stop_gradient(exponential_shift(V))
        return c, V - c * jnp.eye(V.shape[-1], dtype=V.dtype), self.A

    def _queries_keys(self, t, z, args=None):
        c, Vc, A = self.solve_args() if args is None else args
        t = jnp.asarray(t, Vc.dtype)
        S = expm(t * Vc)
        n, d = z.shape[-2], z.shape[-1]
        if n > 2 * d:
            # u = x A xᵀ with x = z Sᵀ, i.e. u = z (Sᵀ A S) zᵀ: one n×d×d product and two
            # d×d×d ones, instead of two n×d×d products (static choice by shape).
            return z @ (S.T @ A @ S), z, 2.0 * c * t
        x = z @ S.T
        return x @ A, x, 2.0 * c * t

    def __call__(self, t, y, args=None):
        vz = self.project("V", y)
        return self.attend(t, y, vz, args) - vz


class AbstractSphereField(AbstractTokenFrameField):
    """Dynamics on the unit sphere `S^{d-1}`: `x_i' = Π_{x_i}(Σ_j P_ij V x_j)`, the
    attention average projected onto the tangent space at `x_i` (`P` softmax-normalised
    or not, by the subclass's `normalised` trait)."""

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    on_sphere = True
    frame = "x"

    def __call__(self, t, y, args=None):
        return tangent(y, self.attend(t, y, self.project("V", y), args))


class SphereField(AbstractSphereField):
    """SA (post-LayerNorm): `x_i' = Π_{x_i}(Σ_j P_ij V x_j)` on `S^{d-1}` (see
    docs/theory.md, 'Sphere dynamics')."""

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    dynamics = "sphere"
    normalised = True


class USAField(AbstractSphereField):
    """USA: like `SphereField` with `P_ij = exp(β<Q x_i, K x_j>) / n` (see docs/theory.md,
    'Sphere dynamics')."""

    if TYPE_CHECKING:  # equinox inherits __init__; static checkers would synthesise one
        __init__ = AbstractField.__init__

    dynamics = "usa"
    normalised = False


FIELDS = {"plain": PlainField, "rescaled": RescaledField, "sphere": SphereField, "usa": USAField}
#: the dynamics `make_field` and spec files name
DYNAMICS = tuple(FIELDS)


def make_field(
    dynamics: str,
    Q: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
    K: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
    V: Float[ArrayLike, "d d"] | Sequence[Sequence[float]] | None = None,
    *,
    beta: ScalarLike = 1.0,
    lora: LoRA | Sequence[LoRA] | None = None,
    d: int | None = None,
    dtype: DTypeLike | None = None,
    kernel: str = "auto",
    block: int = 1024,
) -> AbstractField:
    """Build the field named `dynamics` (plain | rescaled | sphere | usa)."""
    name = check_choice(dynamics, "dynamics", DYNAMICS)
    return FIELDS[name](Q, K, V, beta=beta, lora=lora, d=d, dtype=dtype, kernel=kernel, block=block)
