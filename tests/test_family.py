"""The model family (`TransformerField`): heads, causal and ALiBi masks, normalisation
schemes, feed-forward term, depth-dependent weights — against an independent float64
NumPy RK4 of the equations (tests/reference.py), exact properties, and the equiangular
reduction of Karagodin, Ge, Polyanskiy and Rigollet (NeurIPS 2025)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from helpers import unchecked
from reference import family_rhs, rk4_segments

import jaxattn as ja
from jaxattn._model import FeedForward, TransformerField


def _rng_weights(rng, H, e, d, f=None, scale=0.6):
    f = d if f is None else f
    return (
        rng.normal(size=(H, e, d)) * scale / np.sqrt(d),
        rng.normal(size=(H, e, d)) * scale / np.sqrt(d),
        rng.normal(size=(H, f, d)) * scale / np.sqrt(d),
    )


def _layer_dicts(Q, K, V, O=None, ffn=None):
    """The reference's per-layer dicts from `(L, H, ·, ·)` weights."""
    out = []
    for ell in range(Q.shape[0]):
        lay = {"Q": list(Q[ell]), "K": list(K[ell]), "V": list(V[ell])}
        lay["O"] = None if O is None else list(O[ell])
        if ffn is not None:
            W1, b1, W2, b2, act = ffn
            lay["ffn"] = (W1[ell], b1[ell], W2[ell], b2[ell], act)
        out.append(lay)
    return out


def _ffn_arrays(rng, L, h, d, act):
    return (
        rng.normal(size=(L, h, d)) / np.sqrt(d),
        rng.normal(size=(L, h)) * 0.1,
        rng.normal(size=(L, d, h)) / np.sqrt(h),
        rng.normal(size=(L, d)) * 0.1,
        act,
    )


# Random members: heads × masks × ALiBi × schemes (mix-LN too) × LayerNorm affine maps ×
# feed-forward × layers × LoRAs. Each is one compiled solve; the reference is NumPy RK4
# on the same grid (layer times on it), with the LoRAs merged into its weights by NumPy.
CASES = [
    dict(H=2, norm="none", causal=False, alibi=None, O=False, ffn=None, L=1),
    dict(H=2, norm="pre", causal=True, alibi=[0.3, 0.0], O=True, ffn="relu", L=1),
    dict(H=1, norm="peri", causal=True, alibi=None, O=False, ffn="gelu", L=2),
    dict(H=3, norm="ngpt", causal=True, alibi=[0.5, 0.1, 0.0], O=False, ffn=None, L=2),
    dict(H=2, norm="post", causal=True, alibi=None, O=True, ffn="gelu", L=3),
    dict(H=2, norm=("post", "pre"), causal=False, alibi=None, O=False, ffn="gelu", L=2,
         ln=True, centre=True, lora=True),
    dict(H=1, norm="post", causal=True, alibi=[0.2], O=False, ffn=None, L=1, usa=True),
    dict(H=2, norm=("ngpt", "peri", "ngpt"), causal=False, alibi=None, O=True, ffn=None,
         L=3, ln=True, alpha=[0.7, 1.3, 0.9], lora=True),
    dict(H=2, norm="post", causal=True, alibi=[0.2, 0.0], O=True, ffn="gelu", L=2,
         ln=True, centre=True, bias=True),
]  # fmt: skip


def _case_loras(rng, case, d, f, L):
    """LoRAs on a head and a layer of V, on every head of O's first layer and on the
    last layer's W1: as `LoRA`s and as `(target, head, layer, ΔW)` for NumPy."""
    out = []
    specs = [("V", case["H"] - 1, L - 1, (f, d))]
    if case["O"]:
        specs.append(("O", None, 0, (d, f)))
    if case["ffn"]:
        specs.append(("W1", None, L - 1, (4, d)))
    for target, head, layer, (rows, cols) in specs:
        A, B = rng.normal(size=(1, cols)), rng.normal(size=(rows, 1)) * 0.5
        lo = ja.LoRA(A, B, 2.0, target, head=head, layer=layer)
        out.append((lo, (target, head, layer, 2.0 * B @ A)))
    return out


def _merge_numpy(weights, ffn, edits):
    """NumPy `W + ΔW` at each edit's place (`weights`: dict of (L, H, ·, ·) arrays)."""
    weights = {k: None if W is None else W.copy() for k, W in weights.items()}
    ffn = None if ffn is None else [a.copy() if isinstance(a, np.ndarray) else a for a in ffn]
    for target, head, layer, dW in edits:
        if target == "W1":
            ffn[0][layer] += dW
            continue
        heads = range(weights[target].shape[1]) if head is None else [head]
        for h in heads:
            weights[target][layer, h] += dW
    return weights, ffn


def _case_id(c):
    norm = c["norm"] if isinstance(c["norm"], str) else "+".join(c["norm"])
    extras = "".join(f"-{k}" for k in ("ln", "lora", "usa", "bias") if c.get(k))
    return f"{norm}-H{c['H']}-L{c['L']}{extras}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_family_matches_numpy_rk4(case):
    rng = np.random.default_rng(len(str(case)))
    n, d, e, L, H = 6, 3, 2, case["L"], case["H"]
    f = 2 if case["O"] else d
    Q, K, V = (np.stack(w) for w in zip(*[_rng_weights(rng, H, e, d, f) for _ in range(L)]))
    O = rng.normal(size=(L, H, d, f)) / np.sqrt(f) if case["O"] else None
    ffn = None if case["ffn"] is None else _ffn_arrays(rng, L, 4, d, case["ffn"])
    gain = 1.0 + 0.3 * rng.normal(size=(L, d)) if case.get("ln") else None
    bias = 0.2 * rng.normal(size=(L, d)) if case.get("ln") else None
    alpha = case.get("alpha", 0.7)
    loras = _case_loras(rng, case, d, f, L) if case.get("lora") else []
    # projection biases per layer and head, and the output bias (a real block's)
    proj_bias = None
    if case.get("bias"):
        proj_bias = {
            k: 0.3 * rng.normal(size=(L, H, w)) for k, w in (("bQ", e), ("bK", e), ("bV", f))
        }
        proj_bias["bO"] = 0.3 * rng.normal(size=(L, d))
    times = [0.35, 0.6][: L - 1]
    x0 = rng.normal(size=(n, d))
    if isinstance(case["norm"], str) and case["norm"] in ("post", "ngpt"):
        x0 /= np.linalg.norm(x0, axis=1, keepdims=True)
    field = TransformerField(
        Q,
        K,
        V,
        O,
        beta=1.4,
        mask="causal" if case["causal"] else "none",
        alibi=case["alibi"],
        norm=case["norm"],
        alpha=alpha,
        ffn=None if ffn is None else FeedForward(ffn[0], ffn[2], ffn[1], ffn[3], activation=ffn[4]),
        layer_times=times,
        ln_gain=gain,
        ln_bias=bias,
        centre=case.get("centre", False),
        normalised=not case.get("usa", False),
        lora=[lo for lo, _ in loras],
        **(proj_bias or {}),
    )
    sol = ja.simulate(field, jnp.asarray(x0), 1.0, dt=0.05)
    merged, ffn_ref = _merge_numpy({"Q": Q, "K": K, "V": V, "O": O}, ffn, [e for _, e in loras])
    layers = _layer_dicts(merged["Q"], merged["K"], merged["V"], merged["O"], ffn_ref)
    for ell, lay in enumerate(layers if proj_bias else []):
        lay.update({k: list(b[ell]) for k, b in proj_bias.items() if k != "bO"})
        lay["bO"] = proj_bias["bO"][ell]
    rhs = family_rhs(
        layers,
        1.4,
        norm=case["norm"],
        causal=case["causal"],
        alibi=case["alibi"],
        alpha=alpha,
        times=times,
        gain=gain,
        bias=bias,
        centre=case.get("centre", False),
        normalised=not case.get("usa", False),
    )
    grid = np.asarray(sol.ts)
    assert all(np.any(np.isclose(grid, t, rtol=0, atol=1e-15)) for t in times)
    ref = rk4_segments(rhs, x0, grid)
    # Same scheme and grid; float64 rounding over 20-odd steps (and the one-ulp step
    # onto each layer time, which moves the state by ~1e-16): 1e-12.
    np.testing.assert_allclose(np.asarray(sol.xs), ref, rtol=0, atol=1e-12)
    # the velocity itself, at a time in each layer
    for t in [0.1, 0.5, 0.9][:L]:
        np.testing.assert_allclose(np.asarray(field(t, jnp.asarray(x0))), rhs(t, x0), atol=1e-13)


def test_identical_heads_equal_one_head_and_the_classic_fields():
    rng = np.random.default_rng(3)
    Q, K, V = (rng.normal(size=(3, 3)) / 2 for _ in range(3))
    x = jnp.asarray(rng.normal(size=(7, 3)))
    one = TransformerField(Q, K, V, beta=0.9)
    three = TransformerField(*(np.stack([W] * 3) for W in (Q, K, V)), beta=0.9)
    np.testing.assert_allclose(np.asarray(three(0.0, x)), np.asarray(one(0.0, x)), atol=1e-15)
    # one head, no mask: the plain field; post-LN: the sphere field (same trajectories)
    np.testing.assert_allclose(
        np.asarray(one(0.0, x)), np.asarray(ja.PlainField(Q, K, V, beta=0.9)(0.0, x)), atol=1e-15
    )
    xs = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    post = TransformerField(Q, K, V, beta=0.9, norm="post")
    a = ja.simulate(post, xs, 2.0, dt=0.1).xs
    b = ja.simulate(ja.SphereField(Q, K, V, beta=0.9), xs, 2.0, dt=0.1).xs
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-14)


def test_causal_tokens_never_feel_later_ones_and_alibi_zero_is_causal():
    rng = np.random.default_rng(4)
    Q, K, V = _rng_weights(rng, 2, 3, 3)
    x0 = jnp.asarray(rng.normal(size=(9, 3)))
    field = TransformerField(Q, K, V, beta=2.0, mask="causal", norm="pre")
    full = ja.simulate(field, x0, 1.5, dt=0.05).xs
    first = ja.simulate(field, x0[:4], 1.5, dt=0.05).xs
    np.testing.assert_allclose(np.asarray(full[:, :4]), np.asarray(first), rtol=0, atol=1e-14)
    zero = TransformerField(Q, K, V, beta=2.0, alibi=[0.0, 0.0], norm="pre")
    np.testing.assert_allclose(
        np.asarray(zero(0.0, x0)), np.asarray(field(0.0, x0)), rtol=0, atol=1e-15
    )
    # the first token sees only itself: with V = I and no normalisation x₀' = x₀, which
    # RK4 with step h multiplies by 1 + h + h²/2 + h³/6 + h⁴/24 per step
    alone = TransformerField(Q, K, None, beta=2.0, mask="causal")
    xs = ja.simulate(alone, x0, 1.0, dt=0.1).xs
    h = 0.1
    growth = (1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24) ** np.arange(11)
    np.testing.assert_allclose(
        np.asarray(xs[:, 0]), growth[:, None] * np.asarray(x0[0])[None], rtol=1e-14
    )


def test_depth_dependent_weights_equal_chained_solves_fixed_and_adaptive():
    rng = np.random.default_rng(5)
    W = [_rng_weights(rng, 2, 3, 3) for _ in range(2)]
    Q, K, V = (np.stack(w) for w in zip(*W))
    x0 = jnp.asarray(rng.normal(size=(5, 3)))
    layered = TransformerField(Q, K, V, beta=1.2, norm="peri", layer_times=[0.63])
    first = TransformerField(*W[0], beta=1.2, norm="peri")
    second = TransformerField(*W[1], beta=1.2, norm="peri")
    # fixed steps, a layer time on the grid: the same steps as two chained solves
    on_grid = TransformerField(Q, K, V, beta=1.2, norm="peri", layer_times=[0.6])
    sol = ja.simulate(on_grid, x0, 1.0, dt=0.1)
    a = ja.simulate(first, x0, 0.6, dt=0.1)
    b = ja.simulate(second, a.xs[-1], 1.0, t0=0.6, dt=0.1)
    np.testing.assert_allclose(np.asarray(sol.xs[-1]), np.asarray(b.xs[-1]), atol=1e-15)
    # off the grid (0.63): the solver steps onto it, each step within one layer (the
    # NumPy RK4 on the same times, evaluating each step with its starting layer)
    sol = ja.simulate(layered, x0, 1.0, dt=0.1)
    assert np.isclose(np.asarray(sol.ts), 0.63, rtol=0, atol=1e-15).sum() == 1
    rhs = family_rhs(
        [{"Q": list(w[0]), "K": list(w[1]), "V": list(w[2])} for w in W],
        1.2,
        norm="peri",
        times=[0.63],
    )
    ref = rk4_segments(rhs, np.asarray(x0), np.asarray(sol.ts))
    np.testing.assert_allclose(np.asarray(sol.xs), ref, rtol=0, atol=1e-13)
    # adaptive steps: diffrax's jump_ts; the chained solves give the same answer to tol
    kw = dict(solver="tsit5", rtol=1e-10, atol=1e-10)
    sol = ja.simulate(layered, x0, 1.0, **kw)
    a = ja.simulate(first, x0, 0.63, **kw)
    b = ja.simulate(second, a.xs[-1], 1.0, t0=0.63, **kw)
    np.testing.assert_allclose(np.asarray(sol.xs[-1]), np.asarray(b.xs[-1]), atol=1e-8)


@pytest.mark.parametrize("norm", ["none", "post", "pre", "peri", "ngpt"])
def test_a_zero_feed_forward_adds_nothing(norm):
    rng = np.random.default_rng(6)
    Q, K, V = _rng_weights(rng, 2, 3, 3)
    x = jnp.asarray(rng.normal(size=(5, 3)))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True) if norm in ("post", "ngpt") else x
    zero = FeedForward(np.zeros((4, 3)), np.zeros((3, 4)))
    a = TransformerField(Q, K, V, norm=norm, ffn=zero)(0.0, x)
    b = TransformerField(Q, K, V, norm=norm)(0.0, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
    g = jax.grad(lambda W: jnp.sum(TransformerField(Q, K, V, norm=norm, ffn=W)(0.0, x)))(zero)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def _equiangular(norm, beta, n, t_eval, alpha=1.0):
    """The closed ODE of the common cosine γ (and radius r) of n orthonormal tokens
    with Q = K = V = I, derived from the scheme's velocity: A_j = Σ_k w_jk θ_k with
    w_jj = e^β/Z, w_jk = e^{βγ}/Z, Z = e^β + (n−1)e^{βγ}; then
    γ' = (2/s)(⟨A_j, θ_k⟩ − γ⟨A_j, θ_j⟩) and r' = ⟨θ, A⟩ (pre) or ⟨θ, A⟩/|A| (peri),
    with speed factor s = 1 (post), r (pre), r|A| (peri), |A|/α (nGPT)."""

    def rhs(t, y):
        g, r = y
        Z = np.exp(beta) + (n - 1) * np.exp(beta * g)
        on = (np.exp(beta) + (n - 1) * g * np.exp(beta * g)) / Z  # ⟨θ_j, A_j⟩
        off = (np.exp(beta) * g + np.exp(beta * g) * (1 + (n - 2) * g)) / Z  # ⟨θ_k, A_j⟩
        norm_a = (
            np.sqrt(
                np.exp(2 * beta)
                + 2 * (n - 1) * g * np.exp(beta * (1 + g))
                + (n - 1) * np.exp(2 * beta * g) * (1 + (n - 2) * g)
            )
            / Z
        )
        s = {"post": 1.0, "pre": r, "peri": r * norm_a, "ngpt": norm_a / alpha}[norm]
        dr = {"pre": on, "peri": on / norm_a}.get(norm, 0.0)
        return [2.0 / s * (off - g * on), dr]

    out = scipy.integrate.solve_ivp(
        rhs, (0.0, t_eval[-1]), [0.0, 1.0], t_eval=t_eval, rtol=1e-12, atol=1e-12
    )
    return out.y


@pytest.mark.parametrize("norm", ["post", "pre", "peri", "ngpt"])
def test_equiangular_reduction_of_each_scheme(norm):
    # Karagodin, Ge, Polyanskiy, Rigollet (2025), §4.1: from orthonormal tokens with
    # Q = K = V = I every pair keeps one common cosine γ(t). The simulated tokens follow
    # the scalar ODE; at t = 0 its speed is the paper's table: 2/(e^β + n − 1) (post),
    # the same over r₀ = 1 (pre), 2/√(e^{2β} + n − 1) (peri), 2α/√(e^{2β} + n − 1) (nGPT).
    n, beta, alpha = 4, 1.5, 0.7
    x0 = jnp.eye(n)
    field = TransformerField(d=n, beta=beta, norm=norm, alpha=alpha)
    sol = ja.simulate(field, x0, 3.0, dt=0.01, ts=np.linspace(0, 3, 7))
    xs = np.asarray(sol.xs)
    r = np.linalg.norm(xs, axis=-1)
    theta = xs / r[..., None]
    gram = np.einsum("tid,tjd->tij", theta, theta)
    off = gram[:, ~np.eye(n, dtype=bool)]
    assert np.ptp(off, axis=1).max() < 1e-12  # one common cosine
    g_ref, r_ref = _equiangular(norm, beta, n, np.asarray(sol.ts), alpha)
    np.testing.assert_allclose(off[:, 0], g_ref, rtol=0, atol=1e-9)  # RK4 dt = 0.01
    np.testing.assert_allclose(r[:, 0], r_ref, rtol=0, atol=1e-9)
    speed0 = {
        "post": 2 / (np.exp(beta) + n - 1),
        "pre": 2 / (np.exp(beta) + n - 1),
        "peri": 2 / np.sqrt(np.exp(2 * beta) + n - 1),
        "ngpt": 2 * alpha / np.sqrt(np.exp(2 * beta) + n - 1),
    }[norm]
    v = np.asarray(field(0.0, x0))
    assert abs(2 * float(v[0] @ np.asarray(x0[1])) - speed0) < 1e-14


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(Q=np.zeros((2, 3, 3)), K=np.zeros((3, 3, 3))), "number of heads"),
        (dict(Q=np.zeros((2, 2, 3, 3)), layer_times=[]), "need 1 layer time"),
        (dict(Q=np.zeros((3, 1, 3, 3)), layer_times=[0.5, 0.2]), "increasing"),
        (dict(d=3, alibi=[0.1, 0.2]), "one slope per head"),
        (dict(d=3, alibi=-0.5), "≥ 0"),
        (dict(d=3, alibi=0.5, mask="none"), "ALiBi is a causal mask"),
        (dict(d=3, norm="rms"), "norm"),
        (dict(V=np.zeros((1, 2, 3))), "without output maps O"),
        (dict(d=3, O=np.zeros((1, 3, 2))), "O must be"),
        (dict(d=3, norm=("post", "pre")), "needs 1 scheme"),
        (dict(d=3, bQ=np.ones((2, 3))), "bQ must be \\(1, 3\\)"),
        (dict(d=3, bO=np.ones(2)), "bO must be"),
        (dict(d=3, bV=np.ones(3), frame="z"), "biases"),
        (dict(Q=np.zeros((2, 1, 3, 3)), layer_times=[1.0], alpha=[1, 2, 3]), "one per layer"),
        (dict(d=3, norm="ngpt", alpha=0.0), "alpha must be > 0"),
        (dict(d=3, ln_gain=np.ones(3)), "norm='none' has none"),
        (dict(d=3, norm="pre", ln_bias=np.ones(2)), "ln_bias must be"),
        (dict(d=3, normalised=False, kernel="dot_product"), "unnormalised"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "O")), "no output"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "W2")), "feed-forward"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "V", head=1)), "head 1"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "Q", layer=2)), "layer 2"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 2)), np.ones((3, 1)), 1.0, "K")), "K is 3×3"),
        (dict(d=3, lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "X")), "lora target"),
    ],
)
def test_bad_members_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        TransformerField(**kw)
    assert "\n" not in str(e.value)


def test_stacked_family_loras_equal_single_solves_and_differentiate():
    """A stacked LoRA on one head of one layer: each member of the batched solve equals
    the solve with that member alone (and with ΔW written into the weight by hand);
    d/d‖ΔW‖ of a loss through the solve matches central differences."""
    rng = np.random.default_rng(21)
    Q, K, V = (np.stack([w, w[::-1]]) for w in _rng_weights(rng, 2, 3, 3))
    x0 = jnp.asarray(rng.normal(size=(5, 3)))
    field = TransformerField(Q, K, V, beta=1.2, norm="pre", layer_times=[0.4])
    norms = jnp.asarray([0.0, 0.5, 1.0])
    lo = ja.LoRA.random(3, rank=1, norm=norms, target="Q", head=1, layer=1, key=jax.random.key(3))
    batched = ja.simulate(field.with_lora(lo), x0, 1.0, dt=0.1).xs
    for k in range(3):
        dW = np.asarray(lo.delta()[k])
        Qk = Q.copy()
        Qk[1, 1] += dW
        by_hand = TransformerField(Qk, K, V, beta=1.2, norm="pre", layer_times=[0.4])
        np.testing.assert_allclose(
            np.asarray(batched[k]),
            np.asarray(ja.simulate(by_hand, x0, 1.0, dt=0.1).xs),
            rtol=0,
            atol=1e-13,
        )
    assert float(jnp.abs(batched[2] - batched[0]).max()) > 1e-3  # the LoRA acts
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(
        ja.simulate(field, x0, 1.0, dt=0.1).xs))  # fmt: skip

    one = ja.LoRA.random(3, rank=1, norm=1.0, target="Q", head=1, layer=1, key=jax.random.key(3))

    def loss(s):
        lora = ja.LoRA(one.A, s * one.B, one.alpha, "Q", head=1, layer=1)
        return jnp.sum(jnp.cos(ja.simulate(field.with_lora(lora), x0, 1.0, dt=0.1).xs[-1]))

    g = jax.grad(loss)(jnp.asarray(0.7))
    eps = 1e-6
    fd = (loss(0.7 + eps) - loss(0.7 - eps)) / (2 * eps)
    assert abs(float(g) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))
    with pytest.raises(ValueError, match="different \\(head, layer\\)"):
        ja.LoRA.stack([one, ja.LoRA(one.A, one.B, one.alpha, "Q", head=0, layer=1)])
    with pytest.raises(ValueError, match="one head and one layer"):
        ja.PlainField(d=3, lora=one)
    with pytest.raises(ValueError, match="stacked LoRAs"):
        field.with_lora(lo)(0.0, x0)


def test_tools_refuse_what_they_do_not_understand_and_with_lora_keeps_a_subclass():
    # A researcher's two-head field as a subclass of PlainField: the bounds used to read
    # only the parent's Q, K, V and certify 0.084 where the divergence was 0.618.
    class TwoHeads(ja.PlainField):
        Q2: jax.Array

        def __init__(self, Q2, **kw):
            super().__init__(**kw)
            self.Q2 = Q2

        def __call__(self, t, y, args=None):
            return super().__call__(t, y, args) + 0.5 * y @ self.Q2.T

    rng = np.random.default_rng(8)
    base = ja.PlainField(d=2)
    sub = TwoHeads(jnp.asarray(rng.normal(size=(2, 2))), d=2)
    lora = ja.LoRA(jnp.ones((1, 2)), jnp.ones((2, 1)) * 0.1, 1.0, "V")
    tuned = sub.with_lora(lora)
    assert type(tuned) is TwoHeads and tuned.Q2 is sub.Q2 and len(tuned.loras) == 1
    x0 = jnp.asarray(rng.normal(size=(4, 2)))
    sols = [ja.simulate(f, x0, 0.5, dt=0.1) for f in (sub, tuned)]
    with pytest.raises(ValueError, match=r"TwoHeads is not one of them \(it overrides __call__\)"):
        ja.bound_a_posteriori(sub, tuned, sols[0].ts, sols[0].xs, sols[1].xs)
    # a family member, as users run it (without the test suite's runtime type checks,
    # which refuse it at the annotation already)
    fam = TransformerField(d=2, norm="pre")
    with unchecked(), pytest.raises(ValueError, match="TransformerField is not one of them"):
        ja.bound_a_priori(fam, fam, [0.0, 1.0], x0)
    own = _SwitchedV(jnp.eye(2), -jnp.eye(2))
    with unchecked(), pytest.raises(TypeError, match="jaxattn field"):
        ja.objective_value_and_grad(own, x0, 1.0, dt=0.1)
    assert base.with_lora(lora).with_lora(None).loras == ()


class _SwitchedV(ja.AbstractVectorField):
    """A researcher's own field: plain dynamics whose V changes at t = 5."""

    V0: jax.Array
    V1: jax.Array

    @property
    def d(self):
        return self.V0.shape[0]

    @property
    def jump_times(self):
        return (5.0,)

    def __call__(self, t, y, args=None):
        V = jnp.where(t < 5.0, self.V0, self.V1)
        P = jax.nn.softmax(y @ y.T, axis=-1)
        return P @ y @ V.T


def test_own_field_through_simulate_gradients_and_refusals():
    rng = np.random.default_rng(9)
    V0, V1 = (jnp.asarray(rng.normal(size=(2, 2)) * 0.3) for _ in range(2))
    own = _SwitchedV(V0, V1)
    x0 = jnp.asarray(rng.normal(size=(5, 2)))
    sol = ja.simulate(own, x0, 8.0, dt=0.3)  # 5.0 is not on the grid: stepped onto
    assert np.isclose(np.asarray(sol.ts), 5.0, rtol=0, atol=1e-14).sum() == 1
    # adaptive steps (diffrax jump_ts) against the two chained solves
    kw = dict(solver="tsit5", rtol=1e-11, atol=1e-11)
    sol = ja.simulate(own, x0, 8.0, **kw)
    before = ja.simulate(own, x0, 5.0, **kw).xs[-1]
    after = ja.simulate(_SwitchedV(V1, V1), before, 8.0, t0=5.0, **kw)
    np.testing.assert_allclose(np.asarray(sol.xs[-1]), np.asarray(after.xs[-1]), rtol=1e-8)
    g = jax.grad(lambda f: jnp.sum(ja.simulate(f, x0, 8.0, dt=0.3).xs[-1] ** 2))(own)
    assert float(jnp.abs(g.V1).sum()) > 0 and bool(jnp.all(jnp.isfinite(g.V0)))
    with unchecked(), pytest.raises(ValueError, match="_SwitchedV is not one of them"):
        ja.bound_a_priori(own, own, [0.0, 1.0], x0)


def test_family_gradients_match_finite_differences_and_batches_equal_a_loop():
    rng = np.random.default_rng(10)
    Q, K, V = _rng_weights(rng, 2, 2, 3)
    x0 = jnp.asarray(rng.normal(size=(3, 4, 3)))

    def loss(beta, lam, x):
        f = TransformerField(Q, K, V, beta=beta, alibi=lam, norm="peri")
        return jnp.sum(jnp.sin(ja.simulate(f, x, 1.0, dt=0.1).xs[..., -1, :, :]))

    beta, lam = jnp.asarray(1.1), jnp.asarray([0.4, 0.2])
    gb, gl = jax.grad(loss, argnums=(0, 1))(beta, lam, x0[0])
    eps = 1e-6
    fd_b = (loss(beta + eps, lam, x0[0]) - loss(beta - eps, lam, x0[0])) / (2 * eps)
    e0 = jnp.asarray([eps, 0.0])
    fd_l = (loss(beta, lam + e0, x0[0]) - loss(beta, lam - e0, x0[0])) / (2 * eps)
    assert abs(float(gb) - float(fd_b)) < 1e-7 and abs(float(gl[0]) - float(fd_l)) < 1e-7
    f = TransformerField(Q, K, V, beta=1.1, alibi=[0.4, 0.2], norm="peri")
    batched = ja.simulate(f, x0, 1.0, dt=0.1).xs
    loop = jnp.stack([ja.simulate(f, x, 1.0, dt=0.1).xs for x in x0])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(loop), rtol=0, atol=1e-14)


def test_the_experiments_equiangular_curves_equal_the_tests_ode():
    from jaxattn.experiments.normalisation import equiangular_curves

    t = np.linspace(0.0, 3.0, 7)
    curves = equiangular_curves(4, 1.5, t, alpha=0.7)
    for norm in ("post", "pre", "peri", "ngpt"):
        np.testing.assert_allclose(curves[norm], _equiangular(norm, 1.5, 4, t, 0.7)[0], atol=1e-8)


# -- spec files ------------------------------------------------------------------------
_EYE = np.eye(3).tolist()
_SPEC = {
    "beta": 1.5,
    "norm": "peri",
    "alibi": [0.4, 0.0],
    "init": {"kind": "sphere", "n": 5, "d": 3, "seed": 2},
    "layer": [
        {"t0": 0.0, "Q": [_EYE, (2 * np.eye(3)).tolist()], "ffn": {"W1": _EYE, "W2": _EYE}},
        {"t0": 0.4, "Q": [(0.5 * np.eye(3)).tolist(), _EYE], "ffn": {"W1": _EYE, "W2": _EYE}},
    ],
    "solve": {"t1": 1.0, "dt": 0.1},
}


def test_a_family_spec_builds_the_field_its_keys_name():
    from jaxattn._spec import parse_spec

    sim = parse_spec(_SPEC)
    Q = np.asarray([[np.eye(3), 2 * np.eye(3)], [0.5 * np.eye(3), np.eye(3)]])
    ffn = FeedForward(np.stack([np.eye(3)] * 2), np.stack([np.eye(3)] * 2))
    ref = TransformerField(Q, beta=1.5, norm="peri", alibi=[0.4, 0.0], ffn=ffn, layer_times=[0.4])
    for t in (0.1, 0.7):
        np.testing.assert_allclose(
            np.asarray(sim.field(t, sim.x0)), np.asarray(ref(t, sim.x0)), rtol=0, atol=1e-15
        )
    assert sim.resolved["norm"] == "peri" and len(sim.resolved["init"]["x0"]) == 5
    # the classic dynamics as members; mix-LN and the LayerNorm's options as keys
    x0 = sim.x0
    for dyn, kw in (("usa", dict(norm="post", normalised=False)), ("rescaled", dict(frame="z"))):
        s = parse_spec({"dynamics": dyn, "alibi": 0.2, "init": _SPEC["init"], "solve": {"t1": 1}})
        ref = TransformerField(d=3, alibi=0.2, **kw)
        np.testing.assert_allclose(
            np.asarray(s.field(0.3, x0)), np.asarray(ref(0.3, x0)), atol=1e-15
        )
    biased = parse_spec(
        {"bQ": [0.1, 0.2, 0.3], "bO": [1.0, 0.0, -1.0], "init": _SPEC["init"], "solve": {"t1": 1}}
    )
    ref = TransformerField(d=3, bQ=[[0.1, 0.2, 0.3]], bO=[1.0, 0.0, -1.0])
    np.testing.assert_allclose(
        np.asarray(biased.field(0.0, x0)), np.asarray(ref(0.0, x0)), atol=1e-15
    )
    mix = {"norm": ["post", "pre"], "ln_gain": [[1.0, 2.0, 3.0]] * 2, "centre": True}
    s = parse_spec(_SPEC | mix)
    ref = TransformerField(
        Q,
        beta=1.5,
        alibi=[0.4, 0.0],
        ffn=ffn,
        layer_times=[0.4],
        **(mix | {"norm": ("post", "pre")}),
    )
    for t in (0.1, 0.7):
        np.testing.assert_allclose(np.asarray(s.field(t, x0)), np.asarray(ref(t, x0)), atol=1e-15)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"layer": [dict(_SPEC["layer"][0], t0=0.2)]}, "must start at t0 = 0"),
        ({"layer": [_SPEC["layer"][0], dict(_SPEC["layer"][1], t0=0.0)]}, "must increase"),
        ({"layer": [_SPEC["layer"][0], dict(_SPEC["layer"][1], t0=1.5)]}, "not before t1"),
        ({"alibi": [0.4, 0.0, 0.1]}, "one slope per head"),
        ({"heads": 3}, "has 2 head"),
        ({"alpha": 0.5}, "nGPT's step scale"),
        ({"dynamics": "rescaled"}, "dynamics rescaled is norm = 'none'"),
        ({"dynamics": "sphere"}, "dynamics sphere is norm = 'post'"),
        ({"lora": {"rank": 1, "norm": 0.1, "head": 2}}, "lora head 2 is not one of"),
        ({"norm": ["peri"]}, "needs 2 scheme"),
        ({"centre": 1}, "centre must be true or false"),
        ({"ln_gain": [1.0, 2.0]}, "ln_gain must be"),
        ({"frame": "z"}, "frame 'z'"),
        ({"Q": _EYE}, "the weights go in the layers"),
        ({"layer": [dict(_SPEC["layer"][0], W=1)]}, "unknown key in \\[\\[layer\\]\\] 0"),
    ],
)
def test_bad_family_specs_are_one_line_errors(change, match):
    from jaxattn._spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=match) as e:
        parse_spec(_SPEC | change)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_family_spec_through_the_cli_simulate_and_sweep(tmp_path, capsys):
    """`jaxattn simulate` of a family spec, and `jaxattn sweep` over its normalisation
    scheme and the norm of a LoRA on one head of the second layer (two field structures,
    each compiled once; layer time 0.4 a step): every point's divergence and cluster
    count equal those of `simulate` on the point's own spec."""
    import json

    from jaxattn import cli
    from jaxattn._spec import parse_spec

    spec = tmp_path / "family.json"
    spec.write_text(json.dumps(_SPEC))
    assert cli.main(["simulate", str(spec), "--out", str(tmp_path / "out.npz")]) == 0
    z = np.load(tmp_path / "out.npz")
    assert z["xs"].shape == (11, 5, 3)  # the grid times; the layer time 0.4 is one of them
    raw = {k: v for k, v in _SPEC.items() if k != "norm"} | {
        "lora": {"target": "Q", "rank": 1, "head": 1, "layer": 1},
        "grid": {"norm": ["pre", "peri"], "lora.norm": [0.4, 0.8]},
        "sweep": {"save_points": 11},
    }
    sweep_spec = tmp_path / "sweep.json"
    sweep_spec.write_text(json.dumps(raw))
    assert cli.main(["sweep", str(sweep_spec), "--out", str(tmp_path / "sw"), "--quiet"]) == 0
    r = np.load(tmp_path / "sw" / "result.npz")
    assert r["divergence"].shape == (2, 2, 11)
    np.testing.assert_allclose(r["ts"], np.linspace(0.0, 1.0, 11), atol=1e-15)
    plan = ja.parse_sweep(raw)
    for p in range(plan.n_points):
        sim = parse_spec(plan.point_spec(p))
        run = ja.simulate(sim.field, sim.x0, sim.t1, options=sim.solve).xs[-1]
        ref = ja.simulate(sim.field.without_lora(), sim.x0, sim.t1, options=sim.solve).xs[-1]
        i = np.unravel_index(p, plan.shape)
        assert abs(float(ja.divergence(ref, run)) - r["divergence"][i][-1]) < 1e-12
        assert r["clusters"][i][-1] == float(ja.cluster_count(run, 0.1))
    assert len(set(np.round(r["divergence"][..., -1].ravel(), 9))) == 4  # all differ


def test_a_factory_sweep_runs_the_users_fields_and_refuses_what_it_cannot(tmp_path):
    """`sweep(factory=…)`: each point's field is the factory's, heads and scheme vary
    (one compile per structure), and each point equals `simulate` of that field."""
    from jaxattn._sweep.chunks import SweepError

    def factory(heads, norm):
        return TransformerField.random(3, key=jax.random.key(5), heads=heads, norm=norm)

    raw = {
        "init": {"kind": "normal", "n": 5, "d": 3, "seed": 4},
        "solve": {"t1": 1.0, "dt": 0.1},
        "grid": {"field.heads": [1, 2], "field.norm": ["peri"]},
        "sweep": {"summaries": ["diameter", "mean"], "save_points": 3},
    }
    r = ja.sweep(raw, tmp_path / "f", factory=factory, progress=False, log=None)
    from jaxattn._spec import initial_tokens

    x0 = initial_tokens(raw["init"], jnp.float64, None)
    for i, h in enumerate([1, 2]):
        for j, norm in enumerate(["peri"]):
            xs = ja.simulate(factory(h, norm), x0, 1.0, dt=0.1).xs[-1]
            got = r["diameter"][i, j, -1]
            assert abs(float(jnp.max(ja.pairwise_distances(xs))) - got) < 1e-12
            np.testing.assert_allclose(r["mean"][i, j, -1], np.asarray(xs.mean(0)), atol=1e-12)
    bad = [
        (raw | {"beta": 1.0}, factory, "holds only init, solve, dtype"),
        (raw | {"grid": {"beta": [1.0]}}, factory, "field.<argument>"),
        (raw, lambda heads, norm: "no field", "not a field"),
        (raw, lambda heads, norm: TransformerField(d=4), "d = 4"),
        (raw | {"grid": {"field.heads": [1, 2], "field.norm": ["pre", "post"]}},
         factory, "on_sphere"),
    ]  # fmt: skip
    for k, (spec, fac, match) in enumerate(bad):
        with pytest.raises(SweepError, match=match) as e:
            ja.sweep(spec, tmp_path / f"bad{k}", factory=fac, progress=False, log=None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"bad{k}" / "result.npz").exists()


@pytest.mark.parametrize(
    "grid,match",
    [
        ({"norm": ["pre", "post"]}, "mixes schemes on the sphere"),
        ({"lora.target": ["O"]}, "classic fields have Q, K, V"),
        ({"alpha": [0.5]}, "alpha is nGPT's step scale"),
        ({"lora.head": [1]}, "needs a model-family spec"),
    ],
)
def test_sweep_axes_of_the_family_are_checked_before_anything_runs(grid, match):
    from jaxattn._sweep.chunks import SweepError

    base = {"dynamics": "plain", "init": {"kind": "normal", "n": 4, "d": 2},
            "lora": {"rank": 1, "norm": 0.1}, "solve": {"t1": 1.0}}  # fmt: skip
    with pytest.raises(SweepError, match=match):
        ja.parse_sweep(base | {"grid": grid})


def test_random_members_are_drawn_as_the_papers_draw_them():
    key = jax.random.key(3)
    d = 48
    a = TransformerField.random(d, key=key, heads=2, layers=2, layer_times=[1.0], qk="goe")
    b = TransformerField.random(d, key=key, heads=2, layers=2, layer_times=[1.0], qk="goe")
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip((a.Q, a.K, a.V), (b.Q, b.K, b.V)))
    A = np.asarray(jnp.swapaxes(a.Q, -1, -2) @ a.K)  # (L, H, d, d)
    np.testing.assert_array_equal(A, np.swapaxes(A, -1, -2))  # GOE: symmetric
    off = A[..., ~np.eye(d, dtype=bool)]
    # off-diagonal variance 1/d (2·2·48·47 samples: relative sd of the estimate ≈ 1.5 %)
    assert abs(off.var() * d - 1.0) < 0.08
    assert not np.allclose(A[0, 0], A[0, 1]) and not np.allclose(A[0, 0], A[1, 0])
    g = TransformerField.random(d, key=key, qk="gpt2", value="gpt2")
    for W in (g.Q, g.K, g.V):
        assert abs(float(jnp.std(W)) / 0.02 - 1.0) < 0.05  # 2304 samples: sd ≈ 1.5 %
    for sign, value in ((1, "plus_A"), (-1, "minus_A")):
        f = TransformerField.random(6, key=key, value=value, norm="post")
        np.testing.assert_allclose(
            np.asarray(f.V), sign * np.asarray(jnp.swapaxes(f.Q, -1, -2) @ f.K), atol=1e-15
        )
    with pytest.raises(ValueError, match="unknown qk 'wishart'"):
        TransformerField.random(4, key=key, qk="wishart")


@pytest.mark.slow
def test_the_gradient_tool_takes_a_family_member():
    """`objective_value_and_grad` on a two-head ALiBi member with a LoRA on one head's K:
    its gradients wrt Q (shape (L, H, e, d)), β and the LoRA factors equal central
    differences (values from `simulate`: one compile per structure); the backsolve
    adjoint agrees with reverse mode; an own field is refused in one line."""
    rng = np.random.default_rng(31)
    Q, K, V = _rng_weights(rng, 2, 3, 3, scale=1.0)
    lo = ja.LoRA(rng.normal(size=(1, 3)), rng.normal(size=(3, 1)), 1.0, "K", head=1)
    field = TransformerField(Q, K, V, beta=1.3, alibi=[0.2, 0.5], norm="pre", lora=lo)
    x0 = jnp.asarray(rng.normal(size=(5, 3)))
    g = ja.objective_value_and_grad(field, x0, 1.0, "squared_distance", dt=0.1)
    assert g.grads["Q"].shape == (1, 2, 3, 3)
    eps = 1e-6

    def value(f):  # ½ Σ_i |x_i − x̃_i|² at t1, with and without the LoRA
        x = ja.simulate(f, x0, 1.0, dt=0.1, ts=[1.0]).xs[-1]
        x_ref = ja.simulate(f.without_lora(), x0, 1.0, dt=0.1, ts=[1.0]).xs[-1]
        return 0.5 * float(jnp.sum((x - x_ref) ** 2))

    for name, idx in (("Q", (0, 1, 2, 0)), ("beta", ())):
        W = np.asarray(getattr(field, name), np.float64)
        up, down = W.copy(), W.copy()
        up[idx] += eps
        down[idx] -= eps
        swap = lambda w, n=name: eqx.tree_at(lambda f: getattr(f, n), field, jnp.asarray(w))
        fd = (value(swap(up)) - value(swap(down))) / (2 * eps)
        assert abs(fd - float(g.grads[name][idx])) < 1e-7 * max(1.0, abs(fd))
    B = np.asarray(lo.B)
    Bu, Bd = B.copy(), B.copy()
    Bu[2, 0] += eps
    Bd[2, 0] -= eps
    with_B = lambda b: field.with_lora(ja.LoRA(lo.A, b, 1.0, "K", head=1))
    fd = (value(with_B(Bu)) - value(with_B(Bd))) / (2 * eps)
    assert abs(fd - float(g.grads["lora_B"][2, 0])) < 1e-7 * max(1.0, abs(fd))
    back = ja.objective_value_and_grad(
        field, x0, 1.0, "squared_distance", adjoint="backsolve", wrt=["beta"], dt=0.1
    )
    # the continuous adjoint against the discrete one: O(dt⁴) apart with RK4 at dt = 0.1
    assert abs(back.grads["beta"] - g.grads["beta"]) < 1e-5 * max(1.0, abs(g.grads["beta"]))
    with unchecked(), pytest.raises(TypeError, match=r"your own field with jax\.grad"):
        ja.objective_value_and_grad(_SwitchedV(jnp.eye(3), jnp.eye(3)), x0, 1.0)


def test_the_rescaled_frame_member_with_masks_and_heads():
    """frame 'z': one head is `RescaledField` step for step; two heads sharing V with a
    causal ALiBi mask, mapped back by `Solution.to_x`, are the x-frame solve (RK4 in two
    frames: O(dt⁴) apart, 1e-8 at dt = 0.01 here); what has no rescaled frame is refused."""
    rng = np.random.default_rng(41)
    Q, K = rng.normal(size=(2, 3, 3))
    V = 0.5 * rng.normal(size=(3, 3))
    x0 = jnp.asarray(rng.normal(size=(6, 3)))
    one = TransformerField(Q, K, V, beta=1.0, frame="z")
    classic = ja.make_field("rescaled", Q, K, V, beta=1.0)
    np.testing.assert_allclose(
        np.asarray(ja.simulate(one, x0, 2.0, dt=0.05).xs),
        np.asarray(ja.simulate(classic, x0, 2.0, dt=0.05).xs),
        rtol=0,
        atol=1e-13,
    )
    Qh, Kh = np.stack([Q, K]), np.stack([K, Q])
    Vh = np.stack([V, V])
    z = TransformerField(Qh, Kh, Vh, beta=1.0, alibi=[0.3, 0.0], frame="z")
    x = TransformerField(Qh, Kh, Vh, beta=1.0, alibi=[0.3, 0.0])
    sol = ja.simulate(z, x0, 2.0, dt=0.01)
    assert sol.frame == "z"
    np.testing.assert_allclose(
        np.asarray(sol.to_x(z)), np.asarray(ja.simulate(x, x0, 2.0, dt=0.01).xs), atol=1e-8
    )
    for kw, match in (
        (dict(norm="pre"), "needs 'none'"),
        (dict(V=np.stack([V, 2 * V])), "different V per head"),
        (dict(lora=ja.LoRA(np.ones((1, 3)), np.ones((3, 1)), 1.0, "V", head=0)), "head=None"),
    ):
        args = dict(Q=Qh, K=Kh, V=Vh, frame="z") | kw
        with pytest.raises(ValueError, match=match):
            TransformerField(**args)
