"""Attention kernels: blockwise (online softmax, no n×n array) agrees with dense for
every dynamics, in float64 and float32, for values and gradients; large n fits in memory."""

import functools
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn as ja
from jaxattn._model.attention import AUTO_DENSE_MAX_SCORES, attend_blockwise, use_blockwise
from jaxattn._spec.spec import SpecError, parse_spec

DYN = ["plain", "rescaled", "sphere", "usa"]


def _case(dyn, n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    Q, K, V = (jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), dtype) for _ in range(3))
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    if dyn in ("sphere", "usa"):
        x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return Q, K, V, x


# A field evaluated as inside a solve: compiled once per field structure and shape (the
# time is an argument, so the three times below share one program).
_evaluate = eqx.filter_jit(lambda f, t, x: f(t, x))


@pytest.mark.parametrize("dyn", DYN)
@pytest.mark.parametrize("n,block", [(37, 8), (37, 64), (64, 16)])
def test_blockwise_equals_dense_float64(dyn, n, block):
    Q, K, V, x = _case(dyn, n, 3, jnp.float64)
    lora = ja.LoRA.random(3, rank=1, norm=0.3, target="Q", key=jax.random.key(1))
    dense = ja.make_field(dyn, Q, K, V, beta=2.0, lora=lora, kernel="dense")
    block_f = ja.make_field(dyn, Q, K, V, beta=2.0, lora=lora, kernel="blockwise", block=block)
    for t in (0.0, 2.5, 500.0):
        t = jnp.asarray(t)
        a, b = _evaluate(dense, t, x), _evaluate(block_f, t, x)
        # Same arithmetic up to the order of summation: relative 1e-12.
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * float(jnp.max(jnp.abs(a))), float(t)


@pytest.mark.parametrize("dyn", DYN)
def test_blockwise_equals_dense_float32(dyn):
    Q, K, V, x = _case(dyn, 300, 3, jnp.float32, seed=2)
    dense = ja.make_field(dyn, Q, K, V, beta=1.0, kernel="dense", dtype=jnp.float32)
    blk = ja.make_field(dyn, Q, K, V, beta=1.0, kernel="blockwise", block=64, dtype=jnp.float32)
    a, b = dense(0.7, x), blk(0.7, x)
    assert a.dtype == b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * float(jnp.max(jnp.abs(a)))


SOFTMAX_DYN = ["plain", "rescaled", "sphere"]


@pytest.mark.parametrize("dyn", SOFTMAX_DYN)
def test_dot_product_equals_dense_float32_and_bf16(dyn):
    Q, K, V, x = _case(dyn, 300, 3, jnp.float32, seed=5)
    dense = ja.make_field(dyn, Q, K, V, beta=1.0, kernel="dense", dtype=jnp.float32)
    dpa = ja.make_field(dyn, Q, K, V, beta=1.0, kernel="dot_product", dtype=jnp.float32)
    low = ja.make_field(dyn, Q, K, V, beta=1.0, kernel="dot_product_bf16", dtype=jnp.float32)
    a, b, c = dense(0.7, x), dpa(0.7, x), low(0.7, x)
    assert a.dtype == b.dtype == c.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * scale
    # bfloat16 inputs carry 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per entry);
    # the logits, weights and weighted sum each add a few of those: 3e-2 is a loose cap
    # that still catches a wrong scale (β = 1 vs the default 1/√3 differs by 40 %).
    err = float(jnp.max(jnp.abs(a - c)))
    assert 0 < err <= 3e-2 * scale
    # Through a jitted, vmapped solve as well (two initial conditions, 5 RK4 steps).
    xb = jnp.stack([x[:50], x[50:100]])
    s1 = ja.simulate(dense, xb, 0.5, dt=0.1)
    s2 = ja.simulate(dpa, xb, 0.5, dt=0.1)
    assert s2.ok and float(jnp.max(jnp.abs(s1.xs - s2.xs))) <= 1e-5 * float(jnp.max(jnp.abs(s1.xs)))


def test_dot_product_gradient_and_bad_uses_rejected():
    Q, K, V, x = _case("rescaled", 20, 3, jnp.float32, seed=6)

    def loss(Qm, kernel):
        f = ja.RescaledField(Qm, K, V, beta=1.5, kernel=kernel, dtype=jnp.float32)
        return jnp.sum(f(jnp.float32(1.2), x) ** 2)

    g1 = jax.grad(loss)(Q, "dense")
    g2 = jax.grad(loss)(Q, "dot_product")
    # float32 arithmetic in a different order: a few ulps of the largest entry.
    np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(g1))))
    with pytest.raises(ValueError, match="USA's unnormalised weights"):
        ja.USAField(d=3, kernel="dot_product", dtype=jnp.float32)
    with pytest.raises(ValueError, match="softmax in float32"):
        ja.PlainField(d=3, kernel="dot_product", dtype=jnp.float64)


def test_blockwise_uniform_attention_at_beta_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 2)))
    v = x * 2.0
    out = attend_blockwise(x, x, v, 0.0, block=3)
    np.testing.assert_allclose(out, jnp.broadcast_to(jnp.mean(v, axis=0), (10, 2)), rtol=1e-14)


def test_blockwise_gradients_equal_dense():
    Q, K, V, x = _case("rescaled", 20, 3, jnp.float64, seed=3)

    def loss(Qm, kernel):
        f = ja.RescaledField(Qm, K, V, beta=1.5, kernel=kernel, block=6)
        return jnp.sum(f(1.0, x) ** 2)

    g_dense = jax.grad(loss)(Q, "dense")
    g_block = jax.grad(loss)(Q, "blockwise")
    np.testing.assert_allclose(g_block, g_dense, rtol=1e-11, atol=1e-13)


def test_trajectories_agree_and_auto_choice():
    Q, K, V, x = _case("sphere", 24, 3, jnp.float64, seed=4)
    s1 = ja.simulate(ja.SphereField(Q, K, V, kernel="dense"), x, 1.0, dt=0.05)
    s2 = ja.simulate(ja.SphereField(Q, K, V, kernel="blockwise", block=5), x, 1.0, dt=0.05)
    np.testing.assert_allclose(s1.xs, s2.xs, rtol=0, atol=1e-12)
    side = int(np.sqrt(AUTO_DENSE_MAX_SCORES))
    assert not use_blockwise("auto", side, side) and use_blockwise("auto", side + 1, side + 1)
    assert use_blockwise("blockwise", 2, 2) and not use_blockwise("dense", 10**6, 10**6)


def test_kernel_in_spec_and_errors():
    sim = parse_spec(
        {
            "attention": "blockwise",
            "block": 4,
            "init": {"x0": [[0.0, 1.0]] * 3},
            "solve": {"t1": 1.0},
        }
    )
    assert sim.field.kernel == "blockwise" and sim.field.block == 4
    assert sim.field.with_lora(None).kernel == "blockwise"
    with pytest.raises(SpecError, match="unknown attention 'flash'"):
        parse_spec({"attention": "flash", "init": {"x0": [[0.0, 1.0]]}, "solve": {"t1": 1.0}})
    with pytest.raises(SpecError, match="block must be ≥ 1"):
        parse_spec({"block": 0, "init": {"x0": [[0.0, 1.0]]}, "solve": {"t1": 1.0}})
    with pytest.raises(ValueError, match="block must be a positive integer"):
        ja.PlainField(d=2, block=0)


@pytest.mark.slow
def test_65536_tokens_take_an_rk4_step_in_4_gb(tmp_path):
    # Dense attention would need 65536² floats = 17 GB per score matrix; blockwise keeps a
    # 1024×1024 block. Peak RSS of a fresh process (JAX runtime included) must stay ≤ 4 GB.
    code = textwrap.dedent("""
        import resource, jax, jax.numpy as jnp, jaxattn as ja
        x0 = jax.random.uniform(jax.random.key(0), (65536, 3), jnp.float32, -1.0, 1.0)
        sol = ja.simulate(ja.RescaledField(d=3, dtype=jnp.float32), x0, 0.01, dt=0.01)
        assert bool(sol.ok) and sol.xs.shape == (2, 65536, 3)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kb = int(r.stdout.strip().splitlines()[-1])
    assert peak_kb <= 4 * 1024 * 1024, f"peak RSS {peak_kb / 1e6:.2f} GB"


def _attend_inputs(n, m, e, f, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s)) for s in ((n, e), (m, e), (m, f)))
    return {"q": q, "k": k, "v": v, "beta": jnp.asarray(1.3), "log_scale": jnp.asarray(0.4)}


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize(
    "kernel,block", [("dense", 1024), ("blockwise", 4), ("blockwise", 5), ("blockwise", 64)]
)
def test_every_kernel_gradient_wrt_every_input(kernel, block, normalise):
    # Reverse mode through every kernel, with respect to q, k, v, β and the log-scale,
    # against the dense kernel and against central finite differences (float64). Blocks
    # of 4 and 5 leave padded query and key rows (13 queries, 11 keys); the first key
    # block starts from an empty running maximum. Once a NaN gradient in β: the
    # blockwise kernel took exp(s·(−inf − m)) in the unselected branch of a `where`.
    from jaxattn._model.attention import attend

    inp = _attend_inputs(13, 11, 3, 2, seed=5)
    if not normalise:
        inp["log_scale"] = jnp.asarray(0.0)  # USA's weights take no log-scale

    @functools.partial(jax.jit, static_argnums=1)
    def loss(p, kern):
        out = attend(
            p["q"],
            p["k"],
            p["v"],
            p["beta"],
            p["log_scale"],
            kernel=kern,
            block=block,
            normalise=normalise,
        )
        return jnp.sum(jnp.sin(out))  # a loss with a non-uniform cotangent

    g = jax.grad(loss)(inp, kernel)
    g_dense = jax.grad(loss)(inp, "dense")
    eps = 1e-6
    for name, val in inp.items():
        assert bool(jnp.all(jnp.isfinite(g[name]))), name
        np.testing.assert_allclose(g[name], g_dense[name], rtol=1e-10, atol=1e-12, err_msg=name)
        flat = np.asarray(val, np.float64).ravel()
        fd = np.empty_like(flat)
        for i in range(flat.size):
            hi, lo = flat.copy(), flat.copy()
            hi[i] += eps
            lo[i] -= eps
            at = lambda a: {**inp, name: jnp.asarray(a.reshape(np.shape(val)))}
            fd[i] = (loss(at(hi), kernel) - loss(at(lo), kernel)) / (2 * eps)
        # Central differences: O(eps²) truncation and O(1e-16/eps) rounding, ≈ 1e-9 here.
        np.testing.assert_allclose(np.ravel(g[name]), fd, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint", ["checkpoint", pytest.param("backsolve", marks=pytest.mark.slow)]
)
def test_beta_gradient_through_a_blockwise_solve_is_finite(adjoint):
    # The same through `simulate` (kernel "blockwise", and "auto" would pick it above
    # 2048² scores): ∂/∂β of a trajectory loss equals the dense kernel's.
    _, _, _, x = _case("rescaled", 12, 2, jnp.float64, seed=6)

    def loss(beta, kernel):
        f = ja.RescaledField(d=2, beta=beta, kernel=kernel, block=5)
        return jnp.sum(ja.simulate(f, x, 0.3, dt=0.1, adjoint=adjoint).final ** 2)

    g_block = jax.grad(loss)(jnp.asarray(0.7), "blockwise")
    g_dense = jax.grad(loss)(jnp.asarray(0.7), "dense")
    assert bool(jnp.isfinite(g_block))
    np.testing.assert_allclose(g_block, g_dense, rtol=1e-9)


def _dense_reference(q, k, v, s):
    """Softmax attention in float64 NumPy (max-shifted), the independent reference."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    u = s * (q @ k.T)
    w = np.exp(u - u.max(axis=1, keepdims=True))
    return (w @ v) / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("width", [3, 16])  # fused multiply-reduce and matmul for P·v
@pytest.mark.parametrize("beta", [1.0, 20.0, 400.0])
def test_blockwise_both_shifts_equal_the_softmax(beta, width):
    """The bound shift (fast path) and the running maximum agree with a float64 NumPy
    softmax, in a regime where the fast path is taken (β = 1), one near its limit
    (β = 20: s·(bound − row max) up to ≈ 60) and one where the bound would underflow
    every weight (β = 400: the running maximum must be taken, or the rows would be 0/0)."""
    from jaxattn._model.attention import exact_row_max

    rng = np.random.default_rng(3)
    n, m = 70, 45  # padded queries and keys with block 16
    q = jnp.asarray(rng.uniform(-1, 1, (n, 3)), jnp.float64)
    k = jnp.asarray(rng.uniform(-1, 1, (m, 3)), jnp.float64)
    v = jnp.asarray(rng.normal(size=(m, width)), jnp.float64)
    ref = _dense_reference(q, k, v, beta)
    got = attend_blockwise(q, k, v, beta, block=16)
    with exact_row_max():
        online = attend_blockwise(q, k, v, beta, block=16)
    # Both are the softmax up to the order of summation (rows are convex combinations of
    # v, |v| ≤ ~4): 1e-12 absolute in float64.
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(online), ref, rtol=0, atol=1e-12)
    # float32: each weight is exp of a rounded logit (s·|u| ≲ 3β·eps32 relative error).
    got32 = attend_blockwise(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), beta, block=16
    )
    assert np.all(np.isfinite(np.asarray(got32)))
    np.testing.assert_allclose(
        np.asarray(got32), ref, rtol=0, atol=4 * 3 * beta * 1.2e-7 * np.abs(ref).max() + 1e-5
    )


def test_blockwise_falls_back_where_the_bound_shift_would_underflow(monkeypatch):
    """The fast path is a `cond` against the running maximum (none inside
    `exact_row_max`). It is needed: at β = 400 in float32, forcing the bound shift for
    every block (gap limit = ∞) underflows whole rows to 0/0, while the default choice
    falls back to the running maximum and matches the float64 softmax."""
    import jaxattn._model.attention as _attention
    from jaxattn._model.attention import exact_row_max

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (64, 2)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: attend_blockwise(x, x, x, 1.0, block=16))(x))
    assert "cond" in jaxpr
    with exact_row_max():
        jaxpr_exact = str(jax.make_jaxpr(lambda x: attend_blockwise(x, x, x, 1.0, block=16))(x))
    assert "cond" not in jaxpr_exact
    ref = _dense_reference(x, x, x, 400.0)
    good = np.asarray(attend_blockwise(x, x, x, 400.0, block=16))
    np.testing.assert_allclose(good, ref, rtol=0, atol=1e-3)
    monkeypatch.setitem(_attention._BOUND_GAP, jnp.dtype("float32"), float("inf"))
    forced = np.asarray(attend_blockwise(x, x, x, 400.0, block=16))
    assert not np.all(np.isfinite(forced))


def _masked_reference(q, k, v, s, lam, normalise):
    """Causal attention with ALiBi (`lam`; None: causal only) in float64 NumPy, from the
    definition: exponent `s u_ij − λ(i − j)` on j ≤ i, −inf above; softmax rows shifted by
    their maximum, or USA's `exp(·)/m`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    i, j = np.arange(q.shape[0])[:, None], np.arange(k.shape[0])[None, :]
    e = s * (q @ k.T) - (0.0 if lam is None else lam * (i - j))
    e = np.where(j <= i, e, -np.inf)
    if not normalise:
        return (np.exp(e) @ v) / k.shape[0]
    w = np.exp(e - e.max(axis=1, keepdims=True))
    return (w @ v) / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("lam", [None, 0.0, 0.7])
@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("kernel,block", [("dense", 1024), ("blockwise", 5), ("blockwise", 16)])
def test_causal_and_alibi_masks_equal_numpy(kernel, block, normalise, lam):
    # 13 queries and keys: blocks of 5 leave padded rows and key blocks that are wholly
    # above the diagonal for the first query block (they must add nothing).
    from jaxattn._model.attention import attend, softmax_weights, unnormalised_weights

    inp = _attend_inputs(13, 13, 3, 2, seed=11)
    beta = 1.3
    out = attend(
        inp["q"], inp["k"], inp["v"], beta, kernel=kernel, block=block,
        normalise=normalise, causal=True, alibi=lam,
    )  # fmt: skip
    ref = _masked_reference(inp["q"], inp["k"], inp["v"], beta, lam, normalise)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-13)
    # the first token sees itself only: its output is its own value (softmax)
    if normalise:
        np.testing.assert_allclose(np.asarray(out[0]), np.asarray(inp["v"][0]), rtol=1e-14)
    u = inp["q"] @ inp["k"].T
    P = (
        softmax_weights(u, beta, causal=True, alibi=lam)
        if normalise
        else unnormalised_weights(u, beta, causal=True, alibi=lam)
    )
    assert float(jnp.max(jnp.abs(jnp.triu(P, 1)))) == 0.0  # exact zeros above
    np.testing.assert_allclose(np.asarray(P @ inp["v"]), ref, rtol=1e-12, atol=1e-13)


def test_alibi_rows_never_underflow_and_its_gradients_are_finite():
    # A hard-max scale with a steep ALiBi slope: the biased exponent of every key is far
    # below 0 for late rows (s·(u − max u) ≪ 0 where the bias is 0, bias ≪ 0 where u is
    # largest). Shifting once (by max u) would underflow whole rows to 0/0; the second
    # shift keeps them. Gradients (q, k, v, β, λ) through dense and blockwise agree and
    # match central differences.
    from jaxattn._model.attention import attend

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-1, 1, (12, 2)))
    ref = _masked_reference(x, x, x, 900.0, 60.0, True)
    assert np.all(np.isfinite(ref))
    for kernel in ("dense", "blockwise"):
        got = attend(x, x, x, 900.0, kernel=kernel, block=5, causal=True, alibi=60.0)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-12)

    inp = _attend_inputs(9, 9, 3, 2, seed=4) | {"lam": jnp.asarray(0.4)}

    @functools.partial(jax.jit, static_argnums=1)
    def loss(p, kern):
        out = attend(
            p["q"], p["k"], p["v"], p["beta"], p["log_scale"], kernel=kern, block=4,
            causal=True, alibi=p["lam"],
        )  # fmt: skip
        return jnp.sum(jnp.sin(out))

    g, g_dense = jax.grad(loss)(inp, "blockwise"), jax.grad(loss)(inp, "dense")
    eps = 1e-6
    for name in ("beta", "lam", "q"):
        assert bool(jnp.all(jnp.isfinite(g[name]))), name
        np.testing.assert_allclose(g[name], g_dense[name], rtol=1e-10, atol=1e-12, err_msg=name)
        flat = np.asarray(inp[name], np.float64).ravel()
        fd = np.empty_like(flat)
        for i in range(flat.size):
            hi, lo = flat.copy(), flat.copy()
            hi[i] += eps
            lo[i] -= eps
            at = lambda a: {**inp, name: jnp.asarray(a.reshape(np.shape(inp[name])))}
            fd[i] = (loss(at(hi), "dense") - loss(at(lo), "dense")) / (2 * eps)
        np.testing.assert_allclose(np.ravel(g[name]), fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_dot_product_kernel_takes_the_masks():
    from jaxattn._model.attention import attend

    inp = _attend_inputs(10, 10, 4, 4, seed=3)
    q, k, v = (inp[n].astype(jnp.float32) for n in "qkv")
    for lam in (None, 0.5):
        got = attend(q, k, v, 1.1, kernel="dot_product", causal=True, alibi=lam)
        ref = _masked_reference(q, k, v, 1.1, lam, True)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=2e-6)


def test_batched_simulate_traces_no_cond_in_the_blockwise_kernel():
    """A batched solve (vmapped field) uses the running maximum only: under `vmap` a
    `cond` would run both branches. The single solve keeps the choice."""
    f = ja.RescaledField(d=2, kernel="blockwise", block=8)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 16, 2)), jnp.float32)
    single = jax.make_jaxpr(lambda x: ja.simulate(f, x, 0.2, dt=0.1).xs)(x[0])
    batched = jax.make_jaxpr(lambda x: ja.simulate(f, x, 0.2, dt=0.1).xs)(x)
    assert "cond[" in str(single) or "cond " in str(single)
    assert str(batched).count("cond") < str(single).count("cond")
    a = ja.simulate(f, x, 0.2, dt=0.1).xs
    b = jnp.stack([ja.simulate(f, xi, 0.2, dt=0.1).xs for xi in x])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)


# -- every kernel and field, jitted and not (chex variants), against float64 NumPy --------
import chex  # noqa: E402
from absl.testing import parameterized  # noqa: E402
from reference import make_rhs  # noqa: E402


class KernelsJittedAndNot(chex.TestCase):
    """The same numerics through `jax.jit` and eagerly: each field's velocity against the
    float64 NumPy reference (tests/reference.py, written from the equations), for every
    dynamics and kernel. Tolerance 1e-12 relative: float64, sums of ≤ 37 terms."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(dyn=DYN, kernel=["dense", "blockwise"])
    def test_field_velocity_matches_numpy(self, dyn, kernel):
        Q, K, V, x = _case(dyn, 37, 3, jnp.float64, seed=7)
        field = ja.make_field(dyn, Q, K, V, beta=1.3, kernel=kernel, block=8)
        got = self.variant(lambda t, y: field(t, y))(0.4, x)
        want = make_rhs(dyn, Q, K, V, beta=1.3)(0.4, np.asarray(x))
        chex.assert_shape(got, x.shape)
        chex.assert_trees_all_close(
            np.asarray(got), want, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(want)))
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.0, 1.0, 25.0)
    def test_attend_blockwise_matches_softmax(self, beta):
        rng = np.random.default_rng(11)
        q, k = (jnp.asarray(rng.normal(size=(29, 4))) for _ in range(2))
        v = jnp.asarray(rng.normal(size=(29, 2)))
        got = self.variant(lambda a, b, c: attend_blockwise(a, b, c, beta, block=6))(q, k, v)
        ell = beta * np.asarray(q) @ np.asarray(k).T
        P = np.exp(ell - ell.max(axis=1, keepdims=True))
        want = (P / P.sum(axis=1, keepdims=True)) @ np.asarray(v)
        chex.assert_trees_all_close(np.asarray(got), want, rtol=1e-12, atol=1e-13)
