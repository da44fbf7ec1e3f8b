"""The one attention kernel: logits, a stable softmax with a log-space scale, and P·v.

Every field of the package (and the modular transformer) goes through these functions.
The logits are `scale * <q_i, k_j>`; the scale may be astronomically large (the rescaled
dynamics multiply the logits by `β e^{2ct}`), so it is passed as a logarithm and the row
maximum is subtracted *before* scaling: `softmax(s·u) = softmax(s·(u − max u))`, and
`s·(u − max u) ≤ 0` can only overflow towards `-inf`, whose exponential is an exact 0.

Masks: with `causal=True` query i attends to the keys j ≤ i only (positions are the row
indices); `alibi=λ` (λ ≥ 0, implies causal) adds the bias `−λ (i − j)` to the scaled logits,
as in ALiBi (Press, Smith and Lewis, ICLR 2022). The biased exponent `s·(u_ij − max u) − λ(i − j)`
is ≤ 0 and is shifted once more by its own row maximum, so rows never underflow whole.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from .._base import Array, Float, ScalarLike

# Largest log-scale applied to the centred logits. Beyond it, centred logits that are
# non-zero are below -e^{cap}·(resolution of u), i.e. the softmax is already a hard max up
# to the dtype's precision; the cap only prevents `inf * 0 = nan` at exact ties.
_LOG_SCALE_CAP = {jnp.dtype("float32"): 60.0, jnp.dtype("float64"): 600.0}


def _scale_from_log(log_scale, dtype) -> Array:
    cap = _LOG_SCALE_CAP.get(jnp.dtype(dtype), 60.0)
    return jnp.exp(jnp.minimum(log_scale, cap))


def attention_scores(q: Float[Array, "n e"], k: Float[Array, "m e"]) -> Float[Array, "n m"]:
    """Raw scores `u_ij = <q_i, k_j>`."""
    return q @ k.T


def softmax_weights(
    u: Float[Array, "*batch n m"],
    beta: ScalarLike,
    log_scale: ScalarLike = 0.0,
    *,
    causal: bool = False,
    alibi: ScalarLike | None = None,
) -> Float[Array, "*batch n m"]:
    """Row-stochastic `P = softmax_j(β e^{log_scale} u_ij)`, stable for any scale (over
    the last axis: leading axes, e.g. heads, are a batch).

    `beta ≥ 0` multiplies the scale directly (β = 0 gives uniform attention);
    `log_scale` is the logarithm of an extra positive factor that may be huge.
    `causal`, `alibi`: the masks of the module docstring (masked weights are exact 0s).
    """
    allowed, bias = _mask(u.shape[-2], u.shape[-1], causal, alibi, u.dtype)
    if allowed is None:
        w = _shifted_exp(u, beta, log_scale)
    else:
        w = _masked_exp(u, beta * _scale_from_log(log_scale, u.dtype), allowed, bias)
    return w / jnp.sum(w, axis=-1, keepdims=True)


def _no_log_scale(log_scale) -> bool:
    """The log-scale is the constant 0 (known when tracing): the scale is β itself."""
    return isinstance(log_scale, (int, float)) and log_scale == 0


def _mask(n: int, m: int, causal: bool, alibi, dtype, row0=0, col0=0):
    """`(allowed, bias)` for queries `row0 + (0…n−1)` against keys `col0 + (0…m−1)`:
    `allowed_ij = j ≤ i` and `bias_ij = −λ (i − j)` (`(None, None)` without a mask)."""
    if not causal and alibi is None:
        return None, None
    i = row0 + jnp.arange(n)[:, None]
    j = col0 + jnp.arange(m)[None, :]
    allowed = j <= i
    bias = None if alibi is None else -jnp.asarray(alibi, dtype) * (i - j).astype(dtype)
    return allowed, bias


def _masked_exp(u, s, allowed, bias, *, direct: bool = False):
    """`exp(L_ij − max_j L_ij)` with `L_ij = s (u_ij − max_{allowed} u) + bias_ij` on the
    allowed entries, exact 0 elsewhere. Masked entries get a finite argument before the
    `where` (double where): their gradient is 0, never NaN.

    `direct`: the scale is β itself (no log-scale), so `s u + bias` is formed at once,
    masked with −∞ and shifted by its row maximum: one reduction and one `where` instead
    of two of each (the same values up to rounding; `s·u` overflows only beyond the
    dtype's largest number). Every row has an allowed entry (the diagonal), so the
    maximum is finite, and `exp(−∞) = 0` has the gradient 0."""
    if direct:
        e = jnp.where(allowed, s * u + (0.0 if bias is None else bias), -jnp.inf)
        return jnp.exp(e - jnp.max(e, axis=-1, keepdims=True))
    mx = jnp.max(jnp.where(allowed, u, -jnp.inf), axis=-1, keepdims=True)
    L = s * (jnp.where(allowed, u, mx) - mx)
    if bias is not None:
        L = L + bias
        L = L - jnp.max(jnp.where(allowed, L, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(allowed, jnp.exp(jnp.where(allowed, L, 0.0)), 0.0)


def _shifted_exp(
    u: Float[Array, "*batch n m"], beta: ScalarLike, log_scale: ScalarLike
) -> Float[Array, "*batch n m"]:
    """`exp(s (u_ij − max_j u_ij))` with `s = β e^{log_scale}`: centre first, then scale
    (the unnormalised softmax; rows are normalised by the caller)."""
    s = beta * _scale_from_log(log_scale, u.dtype)
    return jnp.exp(s * (u - jnp.max(u, axis=-1, keepdims=True)))


def unnormalised_weights(
    u: Float[Array, "*batch n m"],
    beta: ScalarLike,
    *,
    causal: bool = False,
    alibi: ScalarLike | None = None,
) -> Float[Array, "*batch n m"]:
    """USA weights `exp(β u_ij) / m`: no normalisation, no max-shift (with a mask:
    `exp(β u_ij − λ(i − j)) / m` on the allowed entries, 0 elsewhere)."""
    allowed, bias = _mask(u.shape[-2], u.shape[-1], causal, alibi, u.dtype)
    return _usa_exp(u, beta, allowed, bias) / u.shape[-1]


def _usa_exp(u, beta, allowed, bias):
    if allowed is None:
        return jnp.exp(beta * u)
    e = beta * jnp.where(allowed, u, 0.0) + (0.0 if bias is None else bias)
    return jnp.where(allowed, jnp.exp(jnp.where(allowed, e, 0.0)), 0.0)


KERNELS = ("auto", "dense", "blockwise", "dot_product", "dot_product_bf16")
# "auto": dense up to this many scores n·m, blockwise above. Measured on the 2-core CPU
# (rescaled field, RK4 step, float32, dense normalised after P·v): at n = 1000 dense is
# 1.1× (d = 64) to 1.3× (d = 2) faster than one 1024 block; at n = 4096, d = 64
# blockwise (block 1024) is 1.9× faster than dense (and than blocks of 512 or 2048);
# at n = 16384 (d = 3) blockwise was 4× faster with 4× less memory.
AUTO_DENSE_MAX_SCORES = 2048 * 2048


def use_blockwise(kernel: str, n: int, m: int) -> bool:
    """Static choice of the attention path for `n` queries and `m` keys."""
    return kernel == "blockwise" or (kernel == "auto" and n * m > AUTO_DENSE_MAX_SCORES)


def attend(
    q: Float[Array, "n e"],
    k: Float[Array, "m e"],
    v: Float[Array, "m f"],
    beta: ScalarLike,
    log_scale: ScalarLike = 0.0,
    *,
    kernel: str = "dense",
    block: int = 1024,
    normalise: bool = True,
    causal: bool = False,
    alibi: ScalarLike | None = None,
) -> Float[Array, "n f"]:
    """`Σ_j P_ij v_j`, the one place that picks the attention path: `kernel` is
    `"dense"` (materialised P), `"blockwise"` (`attend_blockwise`) or `"auto"`
    (`use_blockwise`). `normalise=False` gives USA's `exp(β u_ij)/m` weights.
    `causal`, `alibi`: the masks of the module docstring, on every path."""
    if kernel.startswith("dot_product"):
        if not normalise:
            raise ValueError(
                f"attention kernel {kernel!r} computes a softmax; USA's "
                "unnormalised weights need dense or blockwise"
            )
        return attend_dot_product(
            q,
            k,
            v,
            beta,
            log_scale,
            low_precision=kernel == "dot_product_bf16",
            causal=causal,
            alibi=alibi,
        )
    if use_blockwise(kernel, q.shape[0], k.shape[0]):
        return attend_blockwise(
            q,
            k,
            v,
            beta,
            log_scale,
            block=block,
            normalise=normalise,
            causal=causal,
            alibi=alibi,
        )
    u = attention_scores(q, k)
    allowed, bias = _mask(q.shape[0], k.shape[0], causal, alibi, u.dtype)
    # The weights are normalised after the product with v: n·f divisions instead of n·m
    # (same result up to rounding as `softmax_weights(u) @ v`).
    if normalise:
        if allowed is None:
            w = _shifted_exp(u, beta, log_scale)
        elif _no_log_scale(log_scale):
            w = _masked_exp(u, beta, allowed, bias, direct=True)
        else:
            w = _masked_exp(u, beta * _scale_from_log(log_scale, u.dtype), allowed, bias)
        return (w @ v) / jnp.sum(w, axis=-1, keepdims=True)
    return (_usa_exp(u, beta, allowed, bias) @ v) / u.shape[-1]


def attend_dot_product(
    q: Float[Array, "n e"],
    k: Float[Array, "m e"],
    v: Float[Array, "m f"],
    beta: ScalarLike,
    log_scale: ScalarLike = 0.0,
    *,
    low_precision: bool = False,
    causal: bool = False,
    alibi: ScalarLike | None = None,
) -> Float[Array, "n f"]:
    """`Σ_j P_ij v_j` through `jax.nn.dot_product_attention` (one head), the scale `β e^{log_scale}`
    passed explicitly (never its default `1/√e`). `causal` is its `is_causal`; `alibi`
    its additive `bias` (added after the scale, as in ALiBi).

    On the CPU this is XLA's fused attention. With `low_precision`, q, k, v are cast to
    bfloat16 (the output back to the state's dtype) and, on a GPU, cuDNN's flash
    attention is used; the ODE state and the solver keep their own dtype. cuDNN takes the
    scale as a static number, so there the (traced) scale is folded into q first: `s·q`
    must stay finite, which fails for the rescaled dynamics at long times (e^{2ct} in the
    scale); use `dense`/`blockwise` there. The value dimension must equal the key's.
    """
    if v.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"dot_product attention needs values of the key's width "
            f"{k.shape[-1]}, got {v.shape[-1]}"
        )
    out_dtype = v.dtype
    s = beta * _scale_from_log(log_scale, q.dtype)
    # JAX's implementation promotes float64 against float32 internally; allow that here
    # even when the caller runs with strict promotion.
    _, bias = _mask(q.shape[0], k.shape[0], causal, alibi, jnp.float32)
    is_causal = causal or alibi is not None
    with jax.numpy_dtype_promotion("standard"):
        out = _dot_product(q, k, v, s, low_precision, is_causal, bias)
    return out[:, 0, :].astype(out_dtype)


def _dot_product(q, k, v, s, low_precision, is_causal: bool, bias):
    if low_precision:
        cudnn = jax.default_backend() == "gpu"
        width = v.shape[-1]
        q, k, v = (a.astype(jnp.bfloat16) for a in ((q * s) if cudnn else q, k, v))
        if cudnn and width % 8:
            # cuDNN wants head widths that are multiples of 8: zero columns change no
            # score (q·k) and only add zero output columns, dropped below.
            pad = [(0, 0), (0, (-width) % 8)]
            q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        out = jax.nn.dot_product_attention(
            q[:, None, :],
            k[:, None, :],
            v[:, None, :],
            scale=1.0 if cudnn else s.astype(jnp.float32),
            implementation="cudnn" if cudnn else None,
            is_causal=is_causal,
            bias=None if bias is None else bias[None].astype(jnp.bfloat16),
        )
        return out[..., :width]
    return jax.nn.dot_product_attention(
        q[:, None, :],
        k[:, None, :],
        v[:, None, :],
        scale=s,
        is_causal=is_causal,
        bias=None if bias is None else bias[None].astype(q.dtype),
    )


def _pad_rows(x, multiple: int):
    pad = (-x.shape[0]) % multiple
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
    return x


# Blockwise kernel, fast path: every row is shifted by an upper bound of its logits known
# before the key loop, so the loop needs no running maximum (one pass over each score
# block fewer, no rescaling). It is taken for a query block when the bound is within this
# many units of exponent (after scaling) of a certified lower bound of the row maximum:
# the largest weight of a row is then ≥ e^{-gap}, far above the dtype's smallest normal
# number (float32: e^{-87}; float64: e^{-708}), so nothing underflows that matters.
_BOUND_GAP = {jnp.dtype("float32"): 60.0, jnp.dtype("float64"): 600.0}
# Value widths (+1 for the row sums) up to this are summed with a fused multiply-reduce
# (no second pass over the weights); wider ones with a matmul.
_REDUCE_MAX_WIDTH = 9
# Keys sampled (strided) for the lower bound of each row maximum.
_LOWER_BOUND_KEYS = 32

_EXACT_MAX_ONLY = contextvars.ContextVar("jaxattn_exact_max_only", default=False)


@contextlib.contextmanager
def exact_row_max():
    """Trace the blockwise kernel with the running row maximum only (no `lax.cond`
    between it and the bound-shift fast path).

    For code that vmaps a field: under `vmap` a `cond` whose predicate is batched runs
    both of its branches, so a vmapped blockwise kernel is faster without the choice.
    `simulate` and the sweep use it around their batched solves.
    """
    token = _EXACT_MAX_ONLY.set(True)
    try:
        yield
    finally:
        _EXACT_MAX_ONLY.reset(token)


def _blocked(q, k, v, block: int, normalise: bool):
    """The blockwise kernels' layout: queries `(blocks, qb, e)`, keys `(blocks, kb, e)`,
    values `(blocks, kb, f [+1])` (a last column of ones when normalising: the row sums
    come out of the same product) and the keys' validity `(blocks, kb)` (False on the
    padding of the last block)."""
    n, m = q.shape[0], k.shape[0]
    kb, qb = min(block, m), min(block, n)
    kp, vp = _pad_rows(k, kb), _pad_rows(v, kb)
    if normalise:
        vp = jnp.concatenate([vp, jnp.ones((vp.shape[0], 1), vp.dtype)], axis=1)
    valid = (jnp.arange(kp.shape[0]) < m).reshape(-1, kb)
    qp = _pad_rows(q, qb).reshape(-1, qb, q.shape[1])
    return qp, kp.reshape(-1, kb, k.shape[1]), vp.reshape(-1, kb, vp.shape[1]), valid


def _weighted_sum(w, vv):
    """`w @ vv`; for narrow `vv` as one fused multiply-reduce over the keys."""
    if vv.shape[1] <= _REDUCE_MAX_WIDTH:
        return jnp.sum(w[:, :, None] * vv[None, :, :], axis=1)
    return w @ vv


def attend_blockwise(
    q: Float[Array, "n e"],
    k: Float[Array, "m e"],
    v: Float[Array, "m f"],
    beta: ScalarLike,
    log_scale: ScalarLike = 0.0,
    *,
    block: int = 1024,
    normalise: bool = True,
    causal: bool = False,
    alibi: ScalarLike | None = None,
) -> Float[Array, "n f"]:
    """`Σ_j P_ij v_j` without materialising the `n × m` attention matrix.

    Queries are processed in blocks of `block` (`lax.map`), keys in blocks of `block`
    (`lax.scan`). Each row is stabilised like `softmax_weights` (centre first, then
    scale) by one of two shifts, chosen per query block (`lax.cond`):

    - **a bound known in advance** (fast path): `b_i = Σ_c max(q_ic·max_j k_jc,
      q_ic·min_j k_jc) ≥ max_j q_i·k_j` (the support function of the keys' bounding box),
      taken when `s·(b_i − ℓ_i)` stays below 60 (float32; 600 in float64) for every row
      of the block, where `ℓ_i ≤ max_j q_i·k_j` is the row maximum over a strided sample
      of keys. One pass over each score block: `exp(s(u − b))` and its products with
      `[v, 1]` in one fused loop;
    - **the running maximum** (online softmax) otherwise, e.g. for a hard-max scale or
      well separated clusters: the accumulator is rescaled by `exp(s (m_old − m_new)) ≤ 1`.

    Both give the softmax up to rounding; the shift does not enter the result, so it
    carries no gradient. Peak memory is O(block²) per query block; each key block is
    `jax.checkpoint`-ed, so reverse-mode gradients stay memory-bounded too.
    `normalise=False` gives the USA weights `exp(β u_ij)/m` (no shift, like
    `unnormalised_weights`). Inside `exact_row_max()` only the running maximum is traced.

    With a mask (`causal`, `alibi`) every query block runs the running maximum
    (`_attend_masked_blocks`): the masked keys are excluded like padded ones and, with
    ALiBi, the running maximum of the biased exponent is carried as well.
    """
    if causal or alibi is not None:
        return _attend_masked_blocks(q, k, v, beta, log_scale, block, normalise, alibi)
    n, m = q.shape[0], k.shape[0]
    dtype = q.dtype
    s = beta * _scale_from_log(log_scale, dtype) if normalise else beta
    qp, kblocks, vblocks, vmask = _blocked(q, k, v, block, normalise)
    qb, kb = qp.shape[1], kblocks.shape[1]
    # The masks of padded keys are static: without padding (m a multiple of the block)
    # the key loop does no selects at all (three passes over each block fewer).
    padded = m % kb != 0

    def online(qq):
        @jax.checkpoint
        def key_step(carry, blk):
            mx, acc = carry
            kk, vv, ok = blk
            u = qq @ kk.T  # (qb, kb)
            if padded:
                u = jnp.where(ok[None, :], u, -jnp.inf)  # padded keys: weight 0
            new_mx = jnp.maximum(mx, jnp.max(u, axis=-1))
            # Rows that have seen no valid key yet hold -inf: their factor is 0. Both
            # `where`s are "double": the unselected branch gets a finite argument
            # (exp(s·(−inf − m)) or the overflow of a padded key's exp would give
            # the gradient 0·inf = NaN, e.g. in β).
            seen = jnp.isfinite(mx)
            fix = jnp.where(seen, jnp.exp(s * (jnp.where(seen, mx, new_mx) - new_mx)), 0.0)
            if padded:  # exp(s·(−inf − m)) = 0, but its gradient would be NaN
                u = jnp.where(ok[None, :], u, new_mx[:, None])
            w = jnp.exp(s * (u - new_mx[:, None]))
            if padded:
                w = jnp.where(ok[None, :], w, 0.0)
            # `vv` carries a last column of ones: the row sums of w come out of the
            # same product as P·v (one pass over w fewer).
            return (new_mx, acc * fix[:, None] + _weighted_sum(w, vv)), None

        init = (
            jnp.full((qq.shape[0],), -jnp.inf, dtype),
            jnp.zeros((qq.shape[0], vblocks.shape[-1]), dtype),
        )
        (_, acc), _ = jax.lax.scan(key_step, init, (kblocks, vblocks, vmask))
        return acc

    def bounded(qq, shift):
        @jax.checkpoint
        def key_step(acc, blk):
            kk, vv, ok = blk
            u = qq @ kk.T
            if padded:  # finite argument for padded keys (double where, see above)
                u = jnp.where(ok[None, :], u, shift[:, None])
            w = jnp.exp(s * (u - shift[:, None]))
            if padded:
                w = jnp.where(ok[None, :], w, 0.0)
            return acc + _weighted_sum(w, vv), None

        init = jnp.zeros((qq.shape[0], vblocks.shape[-1]), dtype)
        acc, _ = jax.lax.scan(key_step, init, (kblocks, vblocks, vmask))
        return acc

    if not normalise:  # USA: the bounded loop with shift 0, divided by m
        out = jax.lax.map(lambda qq: bounded(qq, jnp.zeros((qb,), dtype)) / m, qp)
        return out.reshape(-1, v.shape[1])[:n]

    def finish(acc):
        return acc[:, :-1] / acc[:, -1:]

    if _EXACT_MAX_ONLY.get():
        out = jax.lax.map(lambda qq: finish(online(qq)), qp)
        return out.reshape(-1, v.shape[1])[:n]

    # The shift's bounds (in units of u, before scaling), O((n + m)·e).
    ks = jax.lax.stop_gradient(k)
    kmax, kmin = jnp.max(ks, axis=0), jnp.min(ks, axis=0)
    sample = ks[:: max(1, m // _LOWER_BOUND_KEYS)]
    qs = jax.lax.stop_gradient(qp)
    upper = jnp.sum(jnp.maximum(qs * kmax[None, None], qs * kmin[None, None]), axis=-1)
    lower = jnp.max(qs @ sample.T, axis=-1)  # (blocks, qb) both
    gap = _BOUND_GAP.get(jnp.dtype(dtype), 60.0)
    scale = jax.lax.stop_gradient(s)

    def query_block(args):
        qq, up, lo = args
        fast = jnp.all(scale * (up - lo) <= gap)  # False for NaN
        return finish(jax.lax.cond(fast, bounded, lambda qq, _: online(qq), qq, up))

    out = jax.lax.map(query_block, (qp, upper, lower))
    return out.reshape(-1, v.shape[1])[:n]


def _attend_masked_blocks(q, k, v, beta, log_scale, block, normalise, alibi):
    """The blockwise kernel with the causal mask (and ALiBi's bias): one pass of the
    running maximum over the key blocks of each query block.

    The accumulator holds `Σ_j exp(e_ij − R_i) [v_j, 1]` for the exponent `e_ij = s u_ij −
    λ(i − j)` and the reference `R_i = s M_i + C_i`, where `M_i` is the running maximum of
    the allowed scores `u_ij` and `C_i ≤ 0` that of `s (u_ij − M_i) − λ(i − j)` (0 without
    a bias). Both are updated per key block and the accumulator is rescaled by
    `exp(R_old − R_new) ≤ 1`, so no exponent is ever positive.
    """
    n, m = q.shape[0], k.shape[0]
    dtype = q.dtype
    s = beta * _scale_from_log(log_scale, dtype) if normalise else beta
    qp, kblocks, vblocks, valid = _blocked(q, k, v, block, normalise)
    qb, kb = qp.shape[1], kblocks.shape[1]
    k0s = jnp.arange(kblocks.shape[0]) * kb
    q0s = jnp.arange(qp.shape[0]) * qb
    lam = None if alibi is None else jnp.asarray(alibi, dtype)

    def query_block(args):
        qq, q0 = args

        @jax.checkpoint
        def key_step(carry, blk):
            mx, cmax, acc = carry
            kk, vv, ok, k0 = blk
            allowed, bias = _mask(qb, kb, True, lam, dtype, q0, k0)
            allowed = allowed & ok[None, :]
            u = qq @ kk.T
            if not normalise:  # USA: exp(β u − λ(i − j)), no shift
                return (mx, cmax, acc + _weighted_sum(_usa_exp(u, s, allowed, bias), vv)), None
            new_mx = jnp.maximum(mx, jnp.max(jnp.where(allowed, u, -jnp.inf), axis=-1))
            seen, seen_new = jnp.isfinite(mx), jnp.isfinite(new_mx)
            ref = jnp.where(seen_new, new_mx, 0.0)  # finite for the arithmetic below
            c = s * (jnp.where(allowed, u, ref[:, None]) - ref[:, None])
            if bias is not None:
                c = c + bias
            # the previous C in the new reference, then the new C (finite once seen)
            old = jnp.where(seen, cmax + s * (jnp.where(seen, mx, ref) - ref), -jnp.inf)
            new_c = jnp.maximum(old, jnp.max(jnp.where(allowed, c, -jnp.inf), axis=-1))
            c_ref = jnp.where(jnp.isfinite(new_c), new_c, 0.0)
            fix = jnp.where(seen, jnp.exp(jnp.where(seen, old - c_ref, 0.0)), 0.0)
            w = jnp.where(allowed, jnp.exp(jnp.where(allowed, c - c_ref[:, None], 0.0)), 0.0)
            return (new_mx, new_c, acc * fix[:, None] + _weighted_sum(w, vv)), None

        init = (
            jnp.full((qb,), -jnp.inf, dtype),
            jnp.full((qb,), -jnp.inf, dtype),
            jnp.zeros((qb, vblocks.shape[-1]), dtype),
        )
        (_, _, acc), _ = jax.lax.scan(key_step, init, (kblocks, vblocks, valid, k0s))
        return acc[:, :-1] / acc[:, -1:] if normalise else acc / m

    out = jax.lax.map(query_block, (qp, q0s))
    return out.reshape(-1, v.shape[1])[:n]
