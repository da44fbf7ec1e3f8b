"""Independent NumPy/SciPy float64 reference for the four attention dynamics.

Written from the equations of docs/theory.md ('Particle dynamics' to 'Sphere
dynamics') only; it deliberately does not import
`jaxattn`. Everything is float64 NumPy; the weights are plain `d×d` matrices (a LoRA is
handled by the caller, who passes the materialised `W + (alpha/r) B @ A`).

Notation: tokens `x` have shape `(n, d)`, row `i` is token `x_i`. Logits
`ℓ_ij = β <Q x_i, K x_j>`.

- plain:    `x_i' = Σ_j P_ij V x_j`, `P = row-softmax(ℓ)`;
- rescaled: `z_i' = Σ_j P_ij V (z_j − z_i)`, `P` computed from `x = e^{tV} z`;
- sphere:   `x_i' = Π_{x_i}(Σ_j P_ij V x_j)`, `Π_x y = y − <x, y> x`;
- usa:      as sphere with `P_ij = exp(ℓ_ij) / n`.
"""

from __future__ import annotations

import numpy as np
import scipy.integrate
import scipy.linalg


def _as64(a) -> np.ndarray:
    return np.array(a, dtype=np.float64)


def lora_delta(A, B, alpha) -> np.ndarray:
    """Materialised LoRA change `ΔW = (alpha / r) B @ A` (A: r×d, B: d×r)."""
    A, B = _as64(A), _as64(B)
    r = A.shape[0]
    return (float(alpha) / r) * (B @ A)


def logits(x, Q, K, beta) -> np.ndarray:
    """`ℓ_ij = β <Q x_i, K x_j>` for tokens x of shape (n, d)."""
    x = _as64(x)
    q = x @ _as64(Q).T  # row i is Q x_i
    k = x @ _as64(K).T  # row j is K x_j
    return float(beta) * (q @ k.T)


def softmax_rows(ell) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum (mathematically a no-op)."""
    ell = _as64(ell)
    w = np.exp(ell - ell.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def tangent_projection(x, y) -> np.ndarray:
    """`Π_{x_i} y_i = y_i − <x_i, y_i> x_i`, row by row."""
    x, y = _as64(x), _as64(y)
    return y - np.sum(x * y, axis=1, keepdims=True) * x


# ---------------------------------------------------------------------------------
# Right-hand sides. Each factory returns rhs(t, x) -> (n, d) array.


def plain_rhs(Q, K, V, beta=1.0):
    """Plain dynamics."""
    Q, K, V = _as64(Q), _as64(K), _as64(V)

    def rhs(t, x):
        x = _as64(x)
        P = softmax_rows(logits(x, Q, K, beta))
        return P @ (x @ V.T)  # row i: Σ_j P_ij V x_j

    return rhs


def rescaled_attention(t, z, Q, K, V, beta=1.0) -> np.ndarray:
    """P of the rescaled dynamics: the softmax of the logits of `x = e^{tV} z` (for
    moderate t only)."""
    S = scipy.linalg.expm(float(t) * _as64(V))
    x = _as64(z) @ S.T  # row i: e^{tV} z_i
    return softmax_rows(logits(x, Q, K, beta))


def rescaled_rhs(Q, K, V, beta=1.0):
    """Rescaled dynamics: `z_i' = Σ_j P_ij V (z_j − z_i)` (straightforward expm;
    moderate t)."""
    Q, K, V = _as64(Q), _as64(K), _as64(V)

    def rhs(t, z):
        z = _as64(z)
        P = rescaled_attention(t, z, Q, K, V, beta)
        n = z.shape[0]
        out = np.zeros_like(z)
        for i in range(n):
            for j in range(n):
                out[i] += P[i, j] * (V @ (z[j] - z[i]))
        return out

    return rhs


def sphere_rhs(Q, K, V, beta=1.0):
    """Sphere dynamics (SA): `x_i' = Π_{x_i}(Σ_j P_ij V x_j)`, P row-softmax."""
    Q, K, V = _as64(Q), _as64(K), _as64(V)

    def rhs(t, x):
        x = _as64(x)
        P = softmax_rows(logits(x, Q, K, beta))
        return tangent_projection(x, P @ (x @ V.T))

    return rhs


def usa_rhs(Q, K, V, beta=1.0):
    """Sphere dynamics (USA): as SA with `P_ij = exp(ℓ_ij) / n` (no normalisation)."""
    Q, K, V = _as64(Q), _as64(K), _as64(V)

    def rhs(t, x):
        x = _as64(x)
        n = x.shape[0]
        P = np.exp(logits(x, Q, K, beta)) / n
        return tangent_projection(x, P @ (x @ V.T))

    return rhs


RHS = {
    "plain": plain_rhs,
    "rescaled": rescaled_rhs,
    "sphere": sphere_rhs,
    "usa": usa_rhs,
}


def make_rhs(dynamics: str, Q, K, V, beta=1.0):
    """Reference right-hand side for `dynamics` (plain | rescaled | sphere | usa)."""
    return RHS[dynamics](Q, K, V, beta)


# ---------------------------------------------------------------------------------
# Integration.


def solve_reference(rhs, x0, t_eval, rtol=1e-12, atol=1e-12, t0=0.0) -> np.ndarray:
    """Integrate `x' = rhs(t, x)` with SciPy's DOP853 and return x at `t_eval`.

    Returns an array of shape `(len(t_eval), n, d)`. `t_eval` must be non-decreasing and
    lie in `[t0, max(t_eval)]`; `t0` itself may be included.
    """
    x0 = _as64(x0)
    shape = x0.shape
    t_eval = np.asarray(t_eval, dtype=np.float64).ravel()
    t1 = float(t_eval[-1])
    if t1 == t0:
        return np.broadcast_to(x0, (t_eval.size,) + shape).copy()

    def flat(t, y):
        return rhs(t, y.reshape(shape)).ravel()

    res = scipy.integrate.solve_ivp(
        flat,
        (float(t0), t1),
        x0.ravel(),
        method="DOP853",
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
    )
    if not res.success:  # pragma: no cover - a reference failure is a test-setup bug
        raise RuntimeError(f"reference solve failed: {res.message}")
    return res.y.T.reshape((t_eval.size,) + shape)
