"""`simulate`: long-time finiteness, batching and per-member status, dtypes, outputs,
sphere renormalisation, and the one-line errors of the Python API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unchecked

import jaxattn as ja


def _x0(n=8, d=2, seed=0, low=-1.0, high=1.0):
    return jax.random.uniform(jax.random.key(seed), (n, d), jnp.float64, low, high)


def test_rescaled_stays_finite_to_t_1000():
    # Logits grow like e^{2t}: at t = 1000 they are e^{2000}, far beyond float64.
    f = ja.RescaledField(V=jnp.diag(jnp.asarray([1.0, 0.999])))
    sol = ja.simulate(f, _x0(10, low=-5.0, high=5.0), 1000.0, dt=0.5)
    assert sol.ok and bool(jnp.all(jnp.isfinite(sol.xs)))
    assert float(sol.ts[-1]) == 1000.0
    # The plain dynamics overflow, and that is reported as a status, not a crash.
    plain = ja.simulate(ja.PlainField(d=2), _x0(10, low=-5.0, high=5.0), 1000.0, dt=0.5)
    assert int(plain.status) == 3 and "NaN or inf" in plain.messages()[0]


def test_rescaled_finite_in_float32_too():
    f = ja.RescaledField(V=jnp.diag(jnp.asarray([1.0, 0.999])), dtype=jnp.float32)
    sol = ja.simulate(f, _x0(10, low=-5.0, high=5.0).astype(jnp.float32), 300.0, dt=0.5)
    assert sol.xs.dtype == jnp.float32 and sol.ok


def test_float32_agrees_with_float64():
    f = ja.SphereField(d=3, beta=2.0)
    x0 = _x0(6, 3)
    s64 = ja.simulate(f, x0, 2.0, dt=0.05)
    s32 = ja.simulate(f, x0, 2.0, dt=0.05, dtype="float32")
    assert s32.xs.dtype == jnp.float32 and s64.xs.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(s32.xs), np.asarray(s64.xs), atol=2e-5)


def test_one_failing_member_does_not_crash_the_batch():
    # A stacked LoRA on V: the last member has a huge V, so its plain run overflows.
    big = ja.LoRA(
        jnp.asarray([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]]),
        jnp.asarray([[[0.0], [0.0]], [[0.1], [0.0]], [[2000.0], [0.0]]]),
        1.0,
        "V",
    )
    f = ja.PlainField(d=2).with_lora(big)
    sol = ja.simulate(f, _x0(), 1.0, dt=0.01)
    np.testing.assert_array_equal(sol.status, [0, 0, 3])
    assert bool(jnp.all(jnp.isfinite(sol.xs[:2])))
    # Adaptive solve: the blow-up member runs out of steps instead.
    sol = ja.simulate(f, _x0(), 1.0, solver="tsit5", rtol=1e-8, atol=1e-8, max_steps=200)
    assert list(np.asarray(sol.status[:2])) == [0, 0] and int(sol.status[2]) in (1, 3)
    assert not sol.ok and sol.messages()


def test_outer_product_batch_shapes():
    los = ja.LoRA.random(2, rank=1, norm=jnp.asarray([0.0, 0.1, 0.2]), key=jax.random.key(0))
    x0 = jnp.stack([_x0(5, seed=s) for s in range(4)])
    sol = ja.simulate(ja.RescaledField(d=2).with_lora(los), x0, 1.0, dt=0.1)
    assert sol.xs.shape == (3, 4, 11, 5, 2) and sol.status.shape == (3, 4)
    # Member (p, b) is the single solve with LoRA p from x0[b].
    single = ja.LoRA(los.A[2], los.B[2], los.alpha, "V")
    ref = ja.simulate(ja.RescaledField(d=2).with_lora(single), x0[1], 1.0, dt=0.1)
    np.testing.assert_allclose(sol.xs[2, 1], ref.xs, rtol=1e-12, atol=1e-12)


def test_fixed_step_grid_and_output_times():
    sol = ja.simulate(ja.PlainField(d=2), _x0(), 1.05, dt=0.1)
    np.testing.assert_allclose(sol.ts[-2:], [1.0, 1.05])  # last short step
    assert int(sol.num_steps) == 11
    # Outputs at requested times interpolate the same solution (cubic Hermite, O(dt^4)).
    ts = [0.0, 0.5, 1.0]
    sol2 = ja.simulate(ja.PlainField(d=2), _x0(), 1.05, dt=0.1, ts=ts)
    np.testing.assert_allclose(
        sol2.xs[jnp.asarray([0, 2])], sol.xs[jnp.asarray([0, 10])], atol=1e-12
    )
    np.testing.assert_allclose(sol2.xs[1], sol.xs[5], atol=1e-12)
    # t1 = t0: nothing to integrate.
    sol3 = ja.simulate(ja.PlainField(d=2), _x0(), 0.0)
    np.testing.assert_array_equal(sol3.xs[0], _x0())


def test_adaptive_default_output_and_tolerance():
    sol = ja.simulate(ja.SphereField(d=3, beta=1.0), _x0(5, 3), 2.0, solver="dopri5")
    assert sol.ts.shape == (101,) and sol.ok
    tight = ja.simulate(
        ja.SphereField(d=3, beta=1.0), _x0(5, 3), 2.0, solver="dopri8", rtol=1e-12, atol=1e-12
    )
    assert float(jnp.max(jnp.abs(sol.xs - tight.xs))) < 1e-5


def test_sphere_norm_drift_and_renormalisation():
    x0 = _x0(6, 3)
    free = ja.simulate(ja.SphereField(d=3, beta=4.0), x0, 5.0, solver="euler", dt=0.1)
    proj = ja.simulate(
        ja.SphereField(d=3, beta=4.0), x0, 5.0, solver="euler", dt=0.1, renormalise=True
    )
    assert float(free.norm_drift) > 1e-3  # Euler leaves the sphere
    assert float(proj.norm_drift) < 1e-12
    assert ja.simulate(ja.PlainField(d=3), x0, 1.0).norm_drift is None


def test_rk4_really_is_fourth_order_not_euler():
    # The research code's "RK4" froze attention and was forward Euler.
    f = ja.PlainField(d=2, beta=1.0)
    x0 = _x0(6, seed=3)
    ref = ja.simulate(f, x0, 0.5, solver="dopri8", rtol=1e-13, atol=1e-13, ts=[0.5]).xs[-1]
    err_rk4 = float(jnp.max(jnp.abs(ja.simulate(f, x0, 0.5, dt=0.1).final - ref)))
    err_eul = float(jnp.max(jnp.abs(ja.simulate(f, x0, 0.5, dt=0.1, solver="euler").final - ref)))
    assert err_rk4 < 1e-5 < err_eul


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ja.PlainField(Q=jnp.ones((2, 3))), "square"),
        (lambda: ja.PlainField(Q=jnp.eye(2), V=jnp.eye(3)), "disagree on the dimension"),
        (lambda: ja.PlainField(V=jnp.asarray([[jnp.nan, 0.0], [0.0, 1.0]])), "NaN or inf"),
        (lambda: ja.PlainField(), "at least one of Q, K, V"),
        (lambda: ja.PlainField(d=2, beta=-1.0), "beta"),
        (lambda: ja.make_field("nope", d=2), "unknown dynamics 'nope'"),
        (lambda: ja.LoRA(jnp.ones((1, 2)), jnp.ones((2, 2))), "rank mismatch"),
        (lambda: ja.LoRA.random(2, rank=3, norm=0.1, key=jax.random.key(0)), "exceeds"),
        (
            lambda: ja.PlainField(d=2, lora=ja.LoRA(jnp.ones((1, 2)), jnp.ones((2, 1)), 1.0, "O")),
            "unknown lora target 'O'",
        ),
        (lambda: ja.PlainField(d=3, lora=ja.LoRA(jnp.ones((1, 2)), jnp.ones((2, 1)))), "d = 3"),
    ],
)
def test_constructor_errors(make, match):
    # The constructors' own checks; several inputs (a non-square Q, Q and V of different
    # sizes, a LoRA rank mismatch) are already refused by the annotations' shapes.
    with unchecked(), pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs,x0,match",
    [
        ({"dt": 0.0}, None, "dt must be finite and > 0"),
        ({"dt": -0.1}, None, "dt must be finite and > 0"),
        ({"t1": -1.0}, None, "t1"),
        ({"solver": "rk5"}, None, "unknown solver 'rk5'"),
        ({"solver": "rk4", "rtol": 1e-6}, None, "no error estimate"),
        ({"dt": 0.1, "rtol": 1e-6}, None, "either dt"),
        ({}, np.zeros((0, 2)), "no tokens"),
        ({}, [[0.1, 0.2], [0.3]], "ragged"),
        ({}, [[0.1, np.nan]], "NaN or inf"),
        ({}, np.zeros((3, 3)), "d = 3"),
        ({}, np.zeros(3), "shape"),
        ({"ts": [0.5, 0.2]}, None, "non-decreasing"),
        ({"ts": [0.0, 2.0]}, None, r"\[t0, t1\]"),
        ({"renormalise": True}, None, "sphere dynamics"),
        ({"adjoint": "magic"}, None, "unknown adjoint"),
    ],
)
def test_simulate_errors(kwargs, x0, match):
    kwargs = {"t1": 1.0, **kwargs}
    t1 = kwargs.pop("t1")
    with unchecked(), pytest.raises(ValueError, match=match):  # simulate's own checks
        ja.simulate(ja.PlainField(d=2), _x0() if x0 is None else x0, t1, **kwargs)


def test_simulate_rejects_non_field():
    with pytest.raises(TypeError, match="field"):
        ja.simulate(lambda t, y, a: y, _x0(), 1.0)


def test_summary_saves_fn_of_state_instead_of_tokens():
    # SaveAt(fn=...): the summary at every output time equals the summary of the saved
    # tokens of an ordinary solve (same arithmetic, so equal to rounding), with a batch.
    f = ja.RescaledField(d=2, beta=1.0)
    x = jax.random.uniform(jax.random.key(0), (3, 10, 2), jnp.float64, -1, 1)
    full = ja.simulate(f, x, 2.0, dt=0.1)

    def fn(t, y):
        return {"mean": jnp.mean(y, axis=0), "spread": jnp.max(jnp.abs(y - y[:1]))}

    s = ja.simulate(f, x, 2.0, dt=0.1, summary=fn)
    assert s.xs["mean"].shape == (3, 21, 2) and s.xs["spread"].shape == (3, 21)
    np.testing.assert_allclose(s.xs["mean"], full.xs.mean(axis=-2), rtol=0, atol=1e-14)
    spread = jnp.max(jnp.abs(full.xs - full.xs[..., :1, :]), axis=(-2, -1))
    np.testing.assert_allclose(s.xs["spread"], spread, rtol=0, atol=1e-14)
    assert s.ok and s.norm_drift is None
    # t1 == t0: the summary of x0 itself; sphere + renormalise: the fn sees unit tokens.
    s0 = ja.simulate(f, x, 0.0, dt=0.1, summary=fn)
    np.testing.assert_allclose(s0.xs["mean"][:, 0], x.mean(axis=-2))
    sp = ja.simulate(
        ja.SphereField(d=2),
        x,
        1.0,
        dt=0.1,
        renormalise=True,
        summary=lambda t, y: jnp.linalg.norm(y, axis=-1),
    )
    assert float(jnp.max(jnp.abs(sp.xs - 1.0))) < 1e-14
    with unchecked(), pytest.raises(TypeError, match="summary must be a function"):
        ja.simulate(f, x, 1.0, dt=0.1, summary=3)  # simulate's own check


# Output at given times in the slow suite: backsolve with `ts` is also differentiated by
# test_speed_paths.py (float32) and test_sensitivity.py (against finite differences).
@pytest.mark.slow
@pytest.mark.parametrize("save_every_step", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_backsolve_works_on_any_field_and_saveat(save_every_step):
    # BacksolveAdjoint needs three things diffrax does not do by itself, which `simulate`
    # supplies: no SaveAt(steps=True), a backward controller for a fixed grid, and no
    # empty LoRA tuple among the leaves. A field without LoRA, default (every-step)
    # output: the gradient must match reverse mode through the solver to ~1e-6.
    x0 = jax.random.uniform(jax.random.key(5), (6, 2), jnp.float64, -1, 1)
    V = jnp.asarray([[1.0, 0.2], [0.0, 0.9]])

    def loss(Vm, adjoint):
        f = ja.RescaledField(V=Vm, beta=1.0)
        kw = {} if save_every_step else {"ts": [0.5, 1.0]}
        sol = ja.simulate(f, x0, 1.0, dt=0.05, adjoint=adjoint, **kw)
        return jnp.sum(sol.xs[-1] ** 2)

    g_ref = jax.grad(loss)(V, "checkpoint")
    g_back = jax.grad(loss)(V, "backsolve")
    # The adjoint ODE is solved by RK4 with the same dt: O(dt⁴) from the discrete
    # gradient, ≈ 1e-7 relative at dt = 0.05 (measured); 1e-5 leaves margin.
    np.testing.assert_allclose(g_back, g_ref, rtol=1e-5, atol=1e-8)
    assert float(loss(V, "backsolve")) == pytest.approx(float(loss(V, "checkpoint")), rel=1e-14)


def test_solution_states_its_frame_and_to_x_undoes_the_rescaling():
    """A rescaled solution holds z = e^{−tV} x (frame "z"); `to_x` gives x(t) = e^{tV} z(t)
    (checked against scipy.linalg.expm in float64), which is the plain dynamics' x(t);
    the other dynamics hold x already. Batches: a stacked LoRA on V (one V per member)
    and a batch of initial conditions."""
    from helpers import random_weights
    from scipy.linalg import expm

    Q, K, V = random_weights(jax.random.key(3), 3)
    x0 = jnp.stack([_x0(5, 3, seed=s) for s in range(2)])  # (2, n, d)
    f = ja.RescaledField(Q, K, V, beta=1.0)
    sol = ja.simulate(f, x0, 2.0, dt=0.01, t0=0.5)
    assert sol.frame == "z"
    xs = np.asarray(sol.to_x(f))
    ts = np.asarray(sol.ts)
    ref = np.stack(
        [np.asarray(sol.xs)[:, k] @ expm(t * np.asarray(V)).T for k, t in enumerate(ts)], axis=1
    )
    np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-13)
    # x0 is z(t0), so x(t0) = e^{t0 V} x0 starts the plain run.
    plain = ja.simulate(
        ja.PlainField(Q, K, V, beta=1.0), x0 @ expm(0.5 * np.asarray(V)).T, 2.0, dt=0.01, t0=0.5
    )
    assert plain.frame == "x" and plain.to_x(ja.PlainField(Q, K, V)) is plain.xs
    np.testing.assert_allclose(xs, np.asarray(plain.xs), rtol=1e-8, atol=1e-9)
    assert ja.simulate(ja.SphereField(d=3), x0, 0.1).frame == "x"
    # stacked LoRA on V: member m uses V + ΔV_m
    A = jax.random.normal(jax.random.key(4), (2, 1, 3), jnp.float64)
    B = jax.random.normal(jax.random.key(5), (2, 3, 1), jnp.float64)
    fl = ja.RescaledField(Q, K, V, lora=ja.LoRA(A, B, 1.0, "V"))
    sl = ja.simulate(fl, x0, 1.0, dt=0.05)
    xl = np.asarray(sl.to_x(fl))
    assert xl.shape == (2, 2, sl.ts.shape[0], 5, 3)
    for m in range(2):
        Vm = np.asarray(V) + np.asarray(B[m] @ A[m])
        ref = np.stack(
            [np.asarray(sl.xs)[m, :, k] @ expm(t * Vm).T for k, t in enumerate(np.asarray(sl.ts))],
            axis=1,
        )
        np.testing.assert_allclose(xl[m], ref, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="rescaled dynamics"):
        sol.to_x(ja.PlainField(Q, K, V))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ja.PlainField(d=2, dtype="float64"),
        lambda: ja.RescaledField(V=np.eye(2), dtype=np.float64),
        lambda: ja.make_field("sphere", d=3, dtype=jnp.float64),
        lambda: ja.make_field("usa", d=3, dtype="float64"),
    ],
)
def test_float64_without_x64_one_rule(make):
    """One float64 rule: asking a field or `simulate` for float64 while 64-bit JAX is off
    raises the same one-line error, naming `setup_jax` and `dtype="float32"`; tokens
    whose dtype was not asked for (a float64 NumPy array, a Python list) both run in
    JAX's default float32."""
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError) as field_err:
            make()
        with pytest.raises(ValueError) as x0_err:
            ja.simulate(ja.PlainField(d=2), np.ones((3, 2)), 0.1, dtype="float64")
        assert str(field_err.value) == str(x0_err.value)
        msg = str(field_err.value)
        assert "float64 needs 64-bit JAX" in msg and 'setup_jax("float64")' in msg
        assert 'dtype="float32"' in msg and "\n" not in msg
        x0 = np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, -1.0]])
        from_numpy = ja.simulate(ja.PlainField(d=2), x0, 0.1, dt=0.05)
        from_list = ja.simulate(ja.PlainField(d=2), x0.tolist(), 0.1, dt=0.05)
        assert from_numpy.xs.dtype == from_list.xs.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(from_numpy.xs), np.asarray(from_list.xs))
        assert ja.PlainField(d=2, dtype="float32").V.dtype == jnp.float32  # still fine
    finally:
        jax.config.update("jax_enable_x64", True)
    assert ja.PlainField(d=2, dtype="float64").V.dtype == jnp.float64


_OPT_LEVEL_CASE = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import jaxattn as ja

def run():
    x0 = jax.random.uniform(jax.random.key(3), (7, 3), jnp.float64, -1.0, 1.0)
    lo = ja.LoRA.random(3, rank=1, norm=0.3, key=jax.random.key(4), target="V")
    out = {}
    for dyn, kw in (("rescaled", dict(dt=0.05)), ("sphere", dict(solver="dopri5"))):
        f = ja.make_field(dyn, d=3, beta=1.5).with_lora(lo)
        sol = ja.simulate(f, x0, 3.0, ts=[1.0, 3.0], **kw)
        out[dyn], out[dyn + "_steps"] = np.asarray(sol.xs), np.asarray(sol.num_steps)
    return out

if __name__ == "__main__":
    import sys
    np.savez(sys.argv[1], **run())
"""


@pytest.mark.slow
def test_xla_optimisation_level_does_not_change_the_numbers(tmp_path):
    # The suite compiles with LLVM's optimiser off (conftest.py); users run XLA's
    # defaults. The same solves at the default level, in a fresh process, agree with this
    # process's to rounding: a fixed-step RK4 solve and an adaptive Dopri5 one (same
    # accepted steps).
    import os
    import subprocess
    import sys

    assert "--xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "")
    script = tmp_path / "case.py"
    script.write_text(_OPT_LEVEL_CASE)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "default.npz"
    r = subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    default = np.load(out)
    scope: dict = {}
    exec(compile(_OPT_LEVEL_CASE, "case.py", "exec"), scope)
    suite = scope["run"]()
    assert sorted(default.files) == sorted(suite)
    for key, a in suite.items():
        if key.endswith("_steps"):
            np.testing.assert_array_equal(default[key], a)
        else:
            np.testing.assert_allclose(default[key], a, rtol=0, atol=1e-12)


def test_progress_into_a_pipe_is_a_few_plain_lines(capfd):
    """`simulate(progress=True)` with stderr not a terminal (as under pytest, or in a
    log file): no carriage-return bar, about one line per 10 % (it was hundreds of
    updates, 27 kB for one solve)."""
    import sys

    assert not sys.stderr.isatty()
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)))
    ja.simulate(ja.PlainField(d=2), x0, 2.0, dt=0.01, progress=True).xs.block_until_ready()
    out, err = capfd.readouterr()
    text = out + err
    assert "\r" not in text
    # (a first call also says on stderr that it compiles: not a progress line)
    lines = [ln for ln in out.splitlines() + err.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("simulate: compiling")]
    assert 3 <= len(lines) <= 15 and lines[-1].strip() == "100.00%"


def test_a_seed_names_the_same_draw_in_both_dtypes():
    """Random inputs are drawn in float64 and cast: the float32 tokens and weights of a
    seed are its float64 ones rounded (bit for bit), with 64-bit JAX on or off.
    `jax.random.uniform(key, …, float32)` itself gives unrelated numbers."""
    from jaxattn._spec.spec import initial_tokens

    def draws(dtype):
        key = jax.random.key(7)
        return [
            initial_tokens(
                {"kind": "uniform", "n": 5, "d": 2, "seed": 7, "low": -5.0, "high": 5.0},
                dtype,
                None,
            ),
            initial_tokens({"kind": "normal", "n": 4, "d": 3, "seed": 7}, dtype, None),
            ja.LoRA.random(3, rank=1, norm=0.5, key=key, dtype=dtype).A,
            ja.TransformerField.random(3, key=key, heads=2, dtype=dtype).Q,
            ja.InitialMeasure.uniform(2, -1.0, 1.0).sample(key, 6, dtype),
        ]

    ref = [np.asarray(a) for a in draws(jnp.float64)]
    on = [np.asarray(a) for a in draws(jnp.float32)]
    jax.config.update("jax_enable_x64", False)
    try:
        off = [np.asarray(a) for a in draws(jnp.float32)]
    finally:
        jax.config.update("jax_enable_x64", True)
    for i, (r, a, b) in enumerate(zip(ref, on, off, strict=True)):
        assert r.dtype == np.float64 and a.dtype == b.dtype == np.float32
        if i < 2:  # tokens: the cast itself
            np.testing.assert_array_equal(a, r.astype(np.float32))
        else:  # weights: then scaled in the dtype (a few float32 units of rounding)
            np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(b, a)
    plain = np.asarray(jax.random.uniform(jax.random.key(7), (5, 2), jnp.float32, -5.0, 5.0))
    assert np.max(np.abs(plain - ref[0])) > 1.0  # the trap the draws avoid


def test_progress_announces_the_first_compile_only(capsys):
    """With `progress`, the first call with given shapes and options says on stderr that
    it compiles; the same call again (other tokens, same shapes) does not; a new shape
    does."""
    field = ja.PlainField(d=2, beta=0.5)
    x0 = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    ja.clear_caches()
    ja.simulate(field, x0, 0.2, dt=0.1, progress=True)
    assert "compiling" in capsys.readouterr().err
    ja.simulate(field, x0 + 0.25, 0.2, dt=0.1, progress=True)
    assert "compiling" not in capsys.readouterr().err
    ja.simulate(field, np.vstack([x0, x0 + 1.0]), 0.2, dt=0.1, progress=True)
    assert "compiling" in capsys.readouterr().err
    ja.simulate(field, x0, 0.2, dt=0.1)  # without progress: silent
    assert "compiling" not in capsys.readouterr().err
