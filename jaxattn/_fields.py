"""Self-attention vector fields (SPEC §1.1–1.4) as Equinox modules.

All four share the attention kernel of `_attention.py` and the LoRA of `_lora.py`. Each
field is a diffrax-compatible callable `field(t, y, args)`; its weights are pytree
leaves, so `jax.grad` differentiates through them.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ._attention import (
    KERNELS,
    attend,
    attention_scores,
    softmax_weights,
    unnormalised_weights,
)
from ._custom_types import Array, Float
from ._lora import LoRA
from ._validate import (
    DYNAMICS,
    TARGETS,
    as_float_array,
    check_choice,
    check_positive,
    check_square,
)


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

    dynamics: eqx.AbstractClassVar[str]

    def __init__(self, Q=None, K=None, V=None, *, beta=1.0, lora=None, d=None,
                 dtype=None, kernel: str = "auto", block: int = 1024):
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        mats = {"Q": Q, "K": K, "V": V}
        given = {k: as_float_array(v, k, dtype) for k, v in mats.items() if v is not None}
        for name, W in given.items():
            check_square(W, name)
        dims = {W.shape[0] for W in given.values()}
        if d is not None:
            dims.add(int(d))
        if len(dims) > 1:
            shapes = ", ".join(f"{k} {tuple(W.shape)}" for k, W in given.items())
            raise ValueError(f"Q, K, V and d disagree on the dimension: {shapes}, d={d}")
        if not dims:
            raise ValueError("give at least one of Q, K, V, or the dimension d")
        (dim,) = dims
        if dim < 1:
            raise ValueError(f"dimension d must be ≥ 1, got {dim}")
        eye = jnp.eye(dim, dtype=dtype)
        self.Q = given.get("Q", eye)
        self.K = given.get("K", eye)
        self.V = given.get("V", eye)
        if isinstance(beta, jax.core.Tracer):
            self.beta = beta.astype(dtype)
        else:
            self.beta = jnp.asarray(check_positive(beta, "beta", allow_zero=True), dtype)
        if lora is None:
            loras = ()
        elif isinstance(lora, LoRA):
            loras = (lora,)
        else:
            loras = tuple(lora)
        fixed = []
        for lo in loras:
            if not isinstance(lo, LoRA):
                raise TypeError(f"lora must be a LoRA or a sequence of LoRA, got {type(lo).__name__}")
            check_choice(lo.target, "lora target", TARGETS)
            if lo.A.shape[-1] != dim or lo.B.shape[-2] != dim:
                raise ValueError(
                    f"lora on {lo.target} has A {tuple(lo.A.shape[-2:])} and B "
                    f"{tuple(lo.B.shape[-2:])} but the tokens have d = {dim}"
                )
            if lo.rank > dim:
                raise ValueError(f"lora rank {lo.rank} exceeds the dimension d = {dim}")
            fixed.append(LoRA(lo.A.astype(dtype), lo.B.astype(dtype), lo.alpha.astype(dtype),
                              lo.target.upper()))
        self.loras = tuple(fixed)
        self.kernel = check_choice(kernel, "attention kernel", KERNELS)
        if self.kernel.startswith("dot_product") and type(self).dynamics == "usa":
            raise ValueError(f"attention kernel {kernel!r} computes a softmax; USA's "
                             "unnormalised weights need dense, blockwise or auto")
        if self.kernel.startswith("dot_product") and self.V.dtype == jnp.float64:
            raise ValueError(f"attention kernel {kernel!r} computes its softmax in float32 "
                             "(jax.nn.dot_product_attention): use it with dtype float32, "
                             "or dense/blockwise for float64")
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

    def weight(self, name: str) -> Float[Array, "d d"]:
        """Effective weight `W + Σ ΔW` (materialised; cheap, d×d)."""
        W = getattr(self, name)
        for lo in self.loras:
            if lo.target == name:
                W = lo.merged(W)
        return W

    def project(self, name: str, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """`x W_effᵀ` for W in {Q, K, V}, factored when that is cheaper."""
        mine = [lo for lo in self.loras if lo.target == name]
        W = getattr(self, name)
        if len(mine) == 1:
            return mine[0].apply(W, x)
        return x @ self.weight(name).T

    @property
    def A(self) -> Float[Array, "d d"]:
        """`A = Qᵀ K`: only this enters the logits `β x_iᵀ A x_j`."""
        return self.weight("Q").T @ self.weight("K")

    def with_lora(self, lora) -> "AbstractField":
        """The same field with `lora` (LoRA, sequence or None) replacing its LoRAs."""
        return type(self)(self.Q, self.K, self.V, beta=self.beta, lora=lora,
                          dtype=self.V.dtype, kernel=self.kernel, block=self.block)

    def without_lora(self) -> "AbstractField":
        return self.with_lora(None)

    # -- dynamics -----------------------------------------------------------------
    def attention(self, t, y: Float[Array, "n d"]) -> Float[Array, "n n"]:
        """The attention matrix P at state y and time t (SPEC §1)."""
        q, k, log_scale = self._queries_keys(t, y)
        return softmax_weights(attention_scores(q, k), self.beta, log_scale)

    def _queries_keys(self, t, x, args=None):
        return self.project("Q", x), self.project("K", x), 0.0

    def solve_args(self):
        """Per-solve constants computed once outside the time loop (passed as `args`)."""
        return None

    def attend(self, t, y, values, args=None):
        """`Σ_j P_ij values_j` with the field's kernel (dense or blockwise)."""
        q, k, log_scale = self._queries_keys(t, y, args)
        return attend(q, k, values, self.beta, log_scale, kernel=self.kernel, block=self.block)

    @abc.abstractmethod
    def __call__(self, t, y: Float[Array, "n d"], args=None) -> Float[Array, "n d"]:
        ...


def _tangent(x, y):
    """Π_x y = y − <x, y> x, row by row (x assumed on the unit sphere)."""
    return y - jnp.sum(x * y, axis=-1, keepdims=True) * x


class PlainField(AbstractField):
    """SPEC §1.1: `x_i' = Σ_j P_ij V x_j`, `P_ij ∝ exp(β<Q x_i, K x_j>)`."""

    dynamics = "plain"

    def __call__(self, t, y, args=None):
        return self.attend(t, y, self.project("V", y), args)


class RescaledField(AbstractField):
    """SPEC §1.2: `z_i' = Σ_j P_ij V (z_j − z_i)` with P computed from `x = e^{tV} z`.

    `e^{tV}` is carried as `e^{ct} · e^{t(V − cI)}` with `c = λ_max((V + Vᵀ)/2)`, so
    `‖e^{t(V − cI)}‖₂ ≤ 1` never overflows and the factor `e^{2ct}` multiplies the
    logits in log space (`_attention.softmax_weights`). Tokens stay finite for any t.
    (The shifted exponential can only underflow when `(c − max Re λ(V))·t ≳ 700`, i.e.
    for strongly non-normal V at very long times; it never does for normal V.)
    """

    dynamics = "rescaled"

    def solve_args(self):
        """The shift `c = λ_max((V + Vᵀ)/2)`, computed once per solve (an eigvalsh per
        stage costs more than the attention itself for small n)."""
        V = self.weight("V")
        return jax.lax.stop_gradient(jnp.linalg.eigvalsh(0.5 * (V + V.T))[-1])

    def _queries_keys(self, t, z, args=None):
        V = self.weight("V")
        d = V.shape[-1]
        c = self.solve_args() if args is None else args
        t = jnp.asarray(t, V.dtype)
        S = jsl.expm(t * (V - c * jnp.eye(d, dtype=V.dtype)))
        x = z @ S.T
        return self.project("Q", x), self.project("K", x), 2.0 * c * t

    def __call__(self, t, y, args=None):
        vz = self.project("V", y)
        return self.attend(t, y, vz, args) - vz


class SphereField(AbstractField):
    """SPEC §1.3 (SA, post-LayerNorm): `x_i' = Π_{x_i}(Σ_j P_ij V x_j)` on `S^{d-1}`."""

    dynamics = "sphere"

    def __call__(self, t, y, args=None):
        return _tangent(y, self.attend(t, y, self.project("V", y), args))


class USAField(AbstractField):
    """SPEC §1.4 (USA): like `SphereField` with `P_ij = exp(β<Q x_i, K x_j>) / n`."""

    dynamics = "usa"

    def attention(self, t, y):
        q, k, _ = self._queries_keys(t, y)
        return unnormalised_weights(attention_scores(q, k), self.beta)

    def attend(self, t, y, values, args=None):
        q, k, _ = self._queries_keys(t, y, args)
        return attend(q, k, values, self.beta, kernel=self.kernel, block=self.block,
                      normalise=False)

    def __call__(self, t, y, args=None):
        return _tangent(y, self.attend(t, y, self.project("V", y), args))


FIELDS = {"plain": PlainField, "rescaled": RescaledField, "sphere": SphereField,
          "usa": USAField}


def make_field(dynamics: str, Q=None, K=None, V=None, *, beta=1.0, lora=None, d=None,
               dtype=None, kernel: str = "auto", block: int = 1024) -> AbstractField:
    """Build the field named `dynamics` (plain | rescaled | sphere | usa)."""
    name = check_choice(dynamics, "dynamics", DYNAMICS)
    return FIELDS[name](Q, K, V, beta=beta, lora=lora, d=d, dtype=dtype, kernel=kernel,
                        block=block)
