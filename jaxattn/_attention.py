"""The one attention kernel: logits, a stable softmax with a log-space scale, and P·v.

Every field of the package (and the modular transformer) goes through these functions.
The logits are `scale * <q_i, k_j>`; the scale may be astronomically large (the rescaled
dynamics multiply the logits by `β e^{2ct}`), so it is passed as a logarithm and the row
maximum is subtracted *before* scaling: `softmax(s·u) = softmax(s·(u − max u))`, and
`s·(u − max u) ≤ 0` can only overflow towards `-inf`, whose exponential is an exact 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._custom_types import Array, Float

# Largest log-scale applied to the centred logits. Beyond it, centred logits that are
# non-zero are below -e^{cap}·(resolution of u), i.e. the softmax is already a hard max up
# to the dtype's precision; the cap only prevents `inf * 0 = nan` at exact ties.
_LOG_SCALE_CAP = {jnp.dtype("float32"): 60.0, jnp.dtype("float64"): 600.0}


def _scale_from_log(log_scale, dtype) -> Array:
    cap = _LOG_SCALE_CAP.get(jnp.dtype(dtype), 60.0)
    return jnp.exp(jnp.minimum(log_scale, cap))


def attention_scores(
    q: Float[Array, "n e"], k: Float[Array, "m e"]
) -> Float[Array, "n m"]:
    """Raw scores `u_ij = <q_i, k_j>`."""
    return q @ k.T


def softmax_weights(
    u: Float[Array, "n m"], beta, log_scale=0.0
) -> Float[Array, "n m"]:
    """Row-stochastic `P = softmax_j(β e^{log_scale} u_ij)`, stable for any scale.

    `beta ≥ 0` multiplies the scale directly (β = 0 gives uniform attention);
    `log_scale` is the logarithm of an extra positive factor that may be huge.
    """
    s = beta * _scale_from_log(log_scale, u.dtype)
    centred = u - jnp.max(u, axis=-1, keepdims=True)
    w = jnp.exp(s * centred)
    return w / jnp.sum(w, axis=-1, keepdims=True)


def unnormalised_weights(u: Float[Array, "n m"], beta) -> Float[Array, "n m"]:
    """USA weights `exp(β u_ij) / m` (SPEC §1.4): no normalisation, no max-shift."""
    return jnp.exp(beta * u) / u.shape[-1]


def attend(
    q: Float[Array, "n e"],
    k: Float[Array, "m e"],
    v: Float[Array, "m f"],
    beta,
    log_scale=0.0,
) -> Float[Array, "n f"]:
    """`Σ_j P_ij v_j` with `P = softmax_weights(q kᵀ, beta, log_scale)`."""
    return softmax_weights(attention_scores(q, k), beta, log_scale) @ v
