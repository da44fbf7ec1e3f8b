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

import itertools

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


# ---------------------------------------------------------------------------------
# The model family (docs/theory.md, 'The model family'), from its equations: heads
# (mean over heads without output maps, Σ_h O_h … with them), the causal mask and ALiBi
# (`−λ_h (i − j)` on j ≤ i), a feed-forward term, the normalisation schemes and
# piecewise-constant weights. Plain loops over heads and tokens.


def family_head(x, Q, K, V, beta, causal, lam, normalised=True, bq=0.0, bk=0.0, bv=0.0):
    """`Σ_j P_ij (V x_j + b_V)` for one head, P the softmax of
    `β<Q x_i + b_Q, K x_j + b_K> − λ(i − j)` over the allowed j (j ≤ i when causal);
    `normalised=False`: `P_ij = exp(…)/n`."""
    x = _as64(x)
    n = x.shape[0]
    out = np.zeros((n, _as64(V).shape[0]))
    for i in range(n):
        js = range(i + 1) if causal else range(n)
        e = np.array(
            [
                float(beta) * float((_as64(Q) @ x[i] + bq) @ (_as64(K) @ x[j] + bk))
                - (0.0 if lam is None else float(lam) * (i - j))
                for j in js
            ]
        )
        if normalised:
            w = np.exp(e - e.max())
            w /= w.sum()
        else:
            w = np.exp(e) / n
        out[i] = sum(wj * (_as64(V) @ x[j] + bv) for wj, j in zip(w, js))
    return out


def _unit_or_zero_rows(s):
    s = _as64(s)
    r = np.linalg.norm(s, axis=1, keepdims=True)
    return np.where(r > 0, s / np.where(r > 0, r, 1.0), 0.0)


def family_rhs(
    layers,
    beta,
    norm="none",
    causal=False,
    alibi=None,
    alpha=1.0,
    times=(),
    gain=None,
    bias=None,
    centre=False,
    normalised=True,
):
    """`layers`: one dict per layer with `Q, K, V` lists over heads, optional `O` (list
    over heads, `d×f`) and optional `ffn = (W1, b1, W2, b2, act)`; layer ℓ acts on
    `[times[ℓ−1], times[ℓ])`. `norm`: one scheme or one per layer; `alpha`: a number or
    one per layer; `gain`, `bias`: the LayerNorm's affine map, one vector per layer;
    `centre`: subtract each token's mean first; `normalised=False`: weights
    `exp(β u_ij − λ(i − j))/n` instead of the softmax."""
    L = len(layers)
    norms = [norm] * L if isinstance(norm, str) else list(norm)
    alphas = np.broadcast_to(np.asarray(alpha, float), (L,))

    def sublayers(lay, y):
        H = len(lay["Q"])
        lams = [None] * H if alibi is None else list(alibi)
        bias = {k: lay.get(k) or [0.0] * H for k in ("bQ", "bK", "bV")}
        outs = [
            family_head(
                y,
                lay["Q"][h],
                lay["K"][h],
                lay["V"][h],
                beta,
                causal,
                lams[h],
                normalised,
                *(_as64(bias[k][h]) for k in ("bQ", "bK", "bV")),
            )
            for h in range(H)
        ]
        if lay.get("O") is None:
            att = sum(outs) / H
        else:
            att = sum(o @ _as64(lay["O"][h]).T for h, o in enumerate(outs))
        if lay.get("bO") is not None:
            att = att + _as64(lay["bO"])
        subs = [att]
        if lay.get("ffn") is not None:
            W1, b1, W2, b2, act = lay["ffn"]
            h = y @ _as64(W1).T + _as64(b1)
            if act == "relu":
                h = np.maximum(h, 0.0)
            else:  # GELU, tanh approximation
                h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
            subs.append(h @ _as64(W2).T + _as64(b2))
        return subs

    def layer_norm(ell, x):
        if gain is None and bias is None and not centre and norms[ell] in ("post", "ngpt"):
            return x  # on the sphere the projection is the identity: read x itself
        if centre:
            x = x - x.mean(axis=1, keepdims=True)
        theta = _unit_or_zero_rows(x)
        if gain is not None:
            theta = theta * _as64(gain[ell])[None, :]
        if bias is not None:
            theta = theta + _as64(bias[ell])[None, :]
        return theta

    def rhs(t, x):
        ell = int(np.searchsorted(np.asarray(times, float), t, side="right"))
        lay, scheme = layers[ell], norms[ell]
        x = _as64(x)
        if scheme == "none":
            return sum(sublayers(lay, x))
        if scheme == "post":
            return tangent_projection(x, sum(sublayers(lay, layer_norm(ell, x))))
        if scheme == "ngpt":
            return float(alphas[ell]) * tangent_projection(
                x, sum(_unit_or_zero_rows(s) for s in sublayers(lay, layer_norm(ell, x)))
            )
        subs = sublayers(lay, layer_norm(ell, x))
        if scheme == "pre":
            return sum(subs)
        return sum(_unit_or_zero_rows(s) for s in subs)  # peri

    return rhs


def rk4_segments(rhs, x0, grid):
    """Classical RK4 on `grid` (layer times must be grid points);
    within a step the layer is that of the step's start, so no step straddles a change."""
    x = _as64(x0)
    out = [x.copy()]
    for a, b in itertools.pairwise(grid):
        h = b - a
        tm = a + 0.5 * h

        # every stage with the layer of [a, b): the end time is nudged inside it
        def f(t, y, a=a, b=b):
            return rhs(min(max(t, a), np.nextafter(b, a)), y)

        k1 = f(a, x)
        k2 = f(tm, x + 0.5 * h * k1)
        k3 = f(tm, x + 0.5 * h * k2)
        k4 = f(b, x + h * k3)
        x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x.copy())
    return np.stack(out)
