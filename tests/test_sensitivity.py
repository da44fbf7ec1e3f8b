"""Gradients through `simulate` against central finite differences, the linear
response, the worst-case direction against brute force, the smallest cluster change, and
the `jaxattn sensitivity` CLI.

Finite differences: central, step h = 1e-5 along one random direction of all inputs at
once. Truncation error ~ h²|f'''| ≈ 1e-10 and rounding ~ 1e-16·|f|/h ≈ 1e-11 (relative,
for O(1) values and derivatives), so 1e-6 relative agreement leaves four orders of margin
for the exact derivatives of fixed-step solves (checkpoint, forward). Backsolve solves the
continuous adjoint ODE, so it differs from the discrete derivative by the solver error of
the backward solve: O(dt⁴) for RK4 — dt = 0.02 over t1 = 1 keeps it below 1e-6 too.
Adaptive solves: the accepted step sequence jumps with the parameters, so FD of the
discrete solve has errors ~ rtol/h; with rtol = 1e-10 and h = 1e-4 that is ~1e-6, and
the tolerance is 1e-5 relative.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_weights

import jaxattn as ja
import jaxattn._sensitivity as S
from jaxattn.cli import main

N, D, T1 = 4, 3, 1.0
DYNAMICS = ("plain", "rescaled", "sphere", "usa")


def _case(dynamics, *, lora=True):
    Q, K, V = random_weights(jax.random.key(7), D)
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    x0 = jax.random.normal(k1, (N, D), jnp.float64)
    lo = None
    if lora:
        lo = ja.LoRA(
            0.3 * jax.random.normal(k2, (1, D), jnp.float64),
            0.3 * jax.random.normal(k3, (D, 1), jnp.float64),
            1.0,
            "V",
        )
    return ja.make_field(dynamics, Q, K, V, beta=1.0, lora=lo), x0


def _objective():
    """A random linear functional plus mean_sq: mean_sq alone is constant on the sphere."""
    w = jax.random.normal(jax.random.key(5), (N, D), jnp.float64)
    return lambda x: jnp.sum(w * x) + S.mean_sq(x)


def _fd(field, x0, obj, h, solve):
    f = S.objective_fn(field, T1, obj, adjoint="checkpoint", solve=solve)
    p = S.field_params(field, x0)
    keys = jax.random.split(jax.random.key(99), len(p))
    direction = {
        k: jax.random.normal(kk, v.shape, jnp.float64) for kk, (k, v) in zip(keys, p.items())
    }
    fj = jax.jit(lambda q: f(q)[0])
    shift = lambda s: {k: p[k] + s * direction[k] for k in p}
    fd = (float(fj(shift(h))) - float(fj(shift(-h)))) / (2 * h)
    return fd, direction


def _directional(grad: S.Gradient, direction) -> float:
    return float(sum(np.sum(grad.grads[k] * np.asarray(direction[k])) for k in grad.grads))


# Every dynamics with the default adjoint (checkpoint) and one other; every adjoint with
# two dynamics. The other four pairs are in the slow suite (a gradient program each).
_FD_CASES = [
    ("plain", ("checkpoint", "forward")),
    ("rescaled", ("checkpoint", "backsolve")),
    ("sphere", ("checkpoint", "forward")),
    ("usa", ("checkpoint", "backsolve")),
]
_FD_CASES_SLOW = [
    ("plain", ("backsolve",)),
    ("rescaled", ("forward",)),
    ("sphere", ("backsolve",)),
    ("usa", ("forward",)),
]


@pytest.mark.parametrize(
    "dynamics,adjoints",
    [pytest.param(d, a, id=d) for d, a in _FD_CASES]
    + [pytest.param(d, a, id=f"{d}-{a[0]}", marks=pytest.mark.slow) for d, a in _FD_CASES_SLOW],
)
def test_fixed_step_gradients_match_finite_differences(dynamics, adjoints):
    field, x0 = _case(dynamics)
    obj = _objective()
    solve = dict(solver="rk4", dt=0.02)
    fd, direction = _fd(field, x0, obj, 1e-5, solve)
    for adjoint in adjoints:
        g = S.objective_value_and_grad(field, x0, T1, obj, adjoint=adjoint, **solve)
        assert set(g.grads) == {"Q", "K", "V", "beta", "x0", "lora_A", "lora_B"}
        ad = _directional(g, direction)
        assert abs(ad - fd) <= 1e-6 * abs(fd), (adjoint, ad, fd)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dynamics",
    [
        "plain",
        pytest.param("sphere", marks=pytest.mark.slow),
        pytest.param("rescaled", marks=pytest.mark.slow),
        pytest.param("usa", marks=pytest.mark.slow),
    ],
)
def test_adaptive_gradients_match_finite_differences(dynamics):
    field, x0 = _case(dynamics)
    obj = _objective()
    solve = dict(solver="tsit5", rtol=1e-10, atol=1e-12)
    fd, direction = _fd(field, x0, obj, 1e-4, solve)
    for adjoint in ("checkpoint", "forward", "backsolve"):
        g = S.objective_value_and_grad(field, x0, T1, obj, adjoint=adjoint, **solve)
        ad = _directional(g, direction)
        assert abs(ad - fd) <= 1e-5 * abs(fd), (adjoint, ad, fd)


@pytest.mark.slow
def test_checkpoint_count_and_squared_distance_objective():
    """Fewer checkpoints recompute more but give the same gradient; the squared_distance
    objective differentiates both runs (with and without the LoRA) and is zero-valued
    exactly when the LoRA vanishes."""
    field, x0 = _case("plain")
    a = S.objective_value_and_grad(field, x0, T1, "squared_distance", solver="rk4", dt=0.1)
    b = S.objective_value_and_grad(
        field, x0, T1, "squared_distance", checkpoints=2, solver="rk4", dt=0.1
    )
    assert a.value > 0
    for k in a.grads:
        np.testing.assert_allclose(a.grads[k], b.grads[k], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="no LoRA"):
        S.objective_value_and_grad(
            field.without_lora(), x0, T1, "squared_distance", solver="rk4", dt=0.1
        )
    with pytest.raises(ValueError, match="LoRA gradient"):
        S.objective_value_and_grad(field.without_lora(), x0, T1, wrt=["lora"], solver="rk4", dt=0.1)
    with pytest.raises(ValueError, match="one JVP per input entry"):
        S.objective_value_and_grad(
            field,
            jnp.zeros((1100, D), jnp.float64) + 1.0,
            T1,
            adjoint="forward",
            solver="rk4",
            dt=0.1,
        )
    with pytest.raises(ValueError, match="adjoint"):
        S.objective_value_and_grad(field, x0, T1, adjoint="bogus", solver="rk4", dt=0.1)


def test_linear_response_is_the_eps_to_zero_limit_and_below_the_bound():
    """x(ε) − x − ε δx = O(ε²) (halving ε divides the remainder by ≈ 4), and the
    a-posteriori Grönwall bound sits above the measured divergence."""
    field, x0 = _case("plain", lora=False)
    dV = np.asarray(jax.random.normal(jax.random.key(3), (D, D), jnp.float64))
    solve = dict(solver="rk4", dt=0.05)
    lr = S.linear_response(field, x0, T1, dV, "V", **solve)
    assert lr.dxs.shape == lr.xs.shape == (21, N, D)
    rem = []
    for eps in (1e-3, 5e-4):
        fe = S.perturbed(field, "V", jnp.asarray(eps * dV))
        xe = np.asarray(ja.simulate(fe, x0, T1, **solve).xs)
        rem.append(np.max(np.abs(xe - lr.xs - eps * lr.dxs)))
        e = np.max(np.linalg.norm(xe - lr.xs, axis=-1), axis=-1)
        b = ja.bound_a_posteriori(field, fe, lr.ts, lr.xs, xe).bound
        assert np.all(e <= b + 1e-12)
        lin = eps * np.max(np.linalg.norm(lr.dxs, axis=-1), axis=-1)
        np.testing.assert_allclose(e[1:], lin[1:], rtol=1e-2)
    assert 3.5 < rem[0] / rem[1] < 4.5


@pytest.fixture(scope="module")
def small_operator():
    x0 = jax.random.normal(jax.random.key(12), (N, 2), jnp.float64)
    Q, K, V = random_weights(jax.random.key(8), 2)
    field = ja.PlainField(Q, K, V, beta=1.0)
    times = [0.5, 1.0]
    solve = dict(solver="rk4", dt=0.05)
    op = S.ResponseOperator(field, x0, 1.0, times, "Q", **solve)
    F = lambda w: (
        ja.simulate(S.perturbed(field, "Q", w), x0, 1.0, ts=times, adjoint="forward", **solve).xs
    )
    J = np.asarray(jax.jacfwd(F)(jnp.zeros((2, 2), jnp.float64))).reshape(2, N * 2, 4)
    return op, J


def test_jvp_and_vjp_are_transposes(small_operator):
    op, J = small_operator
    V = np.asarray(jax.random.normal(jax.random.key(1), (2, 2, 2), jnp.float64))
    U = np.asarray(jax.random.normal(jax.random.key(2), (2, N, 2), jnp.float64))
    Jv, JtU = op.matvec(V), op.rmatvec(U)
    np.testing.assert_allclose(
        Jv.reshape(2, -1), np.einsum("kmj,kj->km", J, V.reshape(2, 4)), rtol=1e-10, atol=1e-13
    )
    np.testing.assert_allclose(
        np.sum(Jv * U, axis=(1, 2)), np.sum(V * JtU, axis=(1, 2)), rtol=1e-10
    )


def test_worst_case_sign_does_not_depend_on_solver_or_start(small_operator):
    """A singular vector is defined up to its sign; the returned direction has its
    largest-magnitude entry positive, so LOBPCG, power iteration and different random
    starts give the same direction (not its negative)."""
    op, _ = small_operator
    runs = [
        S.worst_case(op, method="lobpcg", key=jax.random.key(0)),
        S.worst_case(op, method="lobpcg", key=jax.random.key(5)),
        S.worst_case(op, method="power", key=jax.random.key(7)),
    ]
    for wc in runs:
        flat = wc.directions.reshape(wc.directions.shape[0], -1)
        assert np.all(flat[np.arange(flat.shape[0]), np.argmax(np.abs(flat), axis=1)] > 0)
    for wc in runs[1:]:
        np.testing.assert_allclose(wc.directions, runs[0].directions, atol=1e-5)


@pytest.mark.slow
def test_lobpcg_worst_case_matches_full_jacobian_svd_in_d3():
    """d = 3 (9 unknowns: the LOBPCG path, not the dense one of d = 2): the top singular
    value and vector at each time equal those of the full forward-mode Jacobian."""
    d, n, times = 3, 6, [0.5, 1.0]
    x0 = jax.random.normal(jax.random.key(21), (n, d), jnp.float64)
    Q, K, V = random_weights(jax.random.key(22), d)
    field = ja.PlainField(Q, K, V, beta=1.0)
    solve = dict(solver="rk4", dt=0.05)
    op = S.ResponseOperator(field, x0, 1.0, times, "V", **solve)
    F = lambda w: (
        ja.simulate(S.perturbed(field, "V", w), x0, 1.0, ts=times, adjoint="forward", **solve).xs
    )
    J = np.asarray(jax.jacfwd(F)(jnp.zeros((d, d), jnp.float64))).reshape(2, n * d, d * d)
    wc = S.worst_case(op, method="lobpcg", iters=40)
    for k in range(2):
        _, s, Wt = np.linalg.svd(J[k])
        # LOBPCG stops at a residual of ~10·n·eps relative: σ² to ~1e-12, σ and the
        # vector's alignment (second order in the residual) far below the tolerances.
        np.testing.assert_allclose(wc.sigma[k], s[0], rtol=1e-8)
        assert abs(Wt[0] @ wc.directions[k].ravel()) > 1 - 1e-8


def test_worst_case_direction_matches_brute_force(small_operator):
    """LOBPCG and power iteration (JVP/VJP only) give the top singular pair of the full
    Jacobian; truncated power iteration gives the best rank-1 direction found by a grid
    over all unit rank-1 matrices u vᵀ; random directions never beat the worst one."""
    op, J = small_operator
    lan = S.worst_case(op, method="lobpcg")
    pw = S.worst_case(op, method="power")
    r1 = S.worst_case(op, rank=1)
    a = np.linspace(0.0, np.pi, 181)
    b = np.linspace(0.0, 2 * np.pi, 361)
    u = np.stack([np.cos(a), np.sin(a)], -1)
    v = np.stack([np.cos(b), np.sin(b)], -1)
    M = np.einsum("ai,bj->abij", u, v).reshape(-1, 4)
    R = S.random_directions(jax.random.key(4), 16, 2)
    rand = np.linalg.norm(op.apply_all(R).reshape(16, 2, -1), axis=-1)
    for k in range(2):
        _, s, Wt = np.linalg.svd(J[k])
        np.testing.assert_allclose(lan.sigma[k], s[0], rtol=1e-9)
        np.testing.assert_allclose(pw.sigma[k], s[0], rtol=1e-6)
        assert abs(Wt[0] @ lan.directions[k].ravel()) > 1 - 1e-9
        grid = np.max(np.linalg.norm(M @ J[k].T, axis=-1))
        assert grid - 1e-4 <= r1.sigma[k] <= s[0] + 1e-12
        np.testing.assert_allclose(
            np.linalg.svd(r1.directions[k], compute_uv=False)[1], 0.0, atol=1e-12
        )
        assert np.all(rand[:, k] <= lan.sigma[k] * (1 + 1e-12))
    lo = lan.lora(0, norm=0.5, target="Q")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(lo.delta())), 0.5, rtol=1e-12)


@pytest.mark.slow
def test_smallest_cluster_change_changes_the_partition_and_respects_the_bound():
    x0 = jax.random.uniform(jax.random.key(0), (6, 2), jnp.float64, -1.0, 1.0)
    field = ja.RescaledField(d=2)
    cc = S.smallest_cluster_change(
        field, x0, 2.0, "V", threshold=0.1, steps=6, bisections=2, solver="rk4", dt=0.1
    )
    fc = S.perturbed(field, "V", jnp.asarray(cc.norm * cc.direction))
    after = ja.cluster_labels(ja.simulate(fc, x0, 2.0, solver="rk4", dt=0.1).final, 0.1)
    before = ja.cluster_labels(ja.simulate(field, x0, 2.0, solver="rk4", dt=0.1).final, 0.1)
    same = lambda a: np.asarray(a)[:, None] == np.asarray(a)[None, :]
    assert not np.array_equal(same(after), same(before))
    assert np.linalg.matrix_rank(cc.direction, tol=1e-10) == 1
    assert cc.bound_norm <= cc.norm


def test_change_margins_prove_a_partition_change():
    x = jnp.asarray([[0.0, 0.0], [0.05, 0.0], [1.0, 0.0]])
    labels = np.asarray([0, 0, 2])
    m = np.asarray(S.change_margins(x, labels, 0.1))
    assert np.all(m < 0)
    moved = jnp.asarray([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])  # token 1 split off
    assert np.any(np.asarray(S.change_margins(moved, labels, 0.1)) > 0)


# ----------------------------------------------------------------------------- CLI
SPEC = """
dynamics = "{dyn}"
beta = 1.0
[init]
x0 = [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]]
{lora}
[solve]
t1 = 1.0
solver = "rk4"
dt = 0.1
[objective]
kind = "{kind}"
adjoint = "{adjoint}"
{extra}
"""
LORA = """[lora]
target = "V"
A = [[0.0, 1.0]]
B = [[0.0], [-0.1]]
"""


def _spec(tmp_path, *, dyn="plain", kind="mean_sq", adjoint="checkpoint", lora=True, extra=""):
    p = tmp_path / "s.toml"
    p.write_text(
        SPEC.format(dyn=dyn, kind=kind, adjoint=adjoint, lora=LORA if lora else "", extra=extra)
    )
    return str(p)


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ["checkpoint", "forward"])
def test_cli_sensitivity_writes_value_and_gradients(tmp_path, adjoint):
    out = tmp_path / "g.npz"
    assert (
        main(
            [
                "sensitivity",
                _spec(tmp_path, kind="squared_distance", adjoint=adjoint),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    z = np.load(out)
    for k in ("value", "grad_Q", "grad_K", "grad_V", "grad_x0", "grad_lora_A", "grad_lora_B"):
        assert k in z.files
    assert z["grad_x0"].shape == (3, 2) and z["grad_lora_A"].shape == (1, 2)
    spec = json.loads(str(z["spec"]))
    field = ja.make_field(
        "plain",
        beta=1.0,
        d=2,
        lora=ja.LoRA(np.asarray(spec["lora"]["A"]), np.asarray(spec["lora"]["B"])),
    )
    ref = S.objective_value_and_grad(
        field, np.asarray(spec["init"]["x0"]), 1.0, "squared_distance", solver="rk4", dt=0.1
    )
    np.testing.assert_allclose(float(z["value"]), ref.value, rtol=1e-12)
    np.testing.assert_allclose(z["grad_V"], ref.grads["V"], rtol=1e-9, atol=1e-14)


@pytest.mark.slow
def test_squared_distance_is_half_sum_of_squares_and_old_name_maps_to_it():
    """The objective is ½Σ_i|x_i − x̃_i|² (not `jaxattn.divergence` = max_i|x_i − x̃_i|);
    the old name "divergence" still works, with a FutureWarning, and gives the same."""
    field, x0 = _case("plain")
    solve = dict(solver="rk4", dt=0.1)
    x = ja.simulate(field, x0, T1, **solve).xs[-1]
    xr = ja.simulate(field.without_lora(), x0, T1, **solve).xs[-1]
    g = S.objective_value_and_grad(field, x0, T1, "squared_distance", wrt=["V"], **solve)
    assert g.value == pytest.approx(0.5 * float(jnp.sum((x - xr) ** 2)), rel=1e-12)
    assert g.objective == "squared_distance"
    with pytest.warns(FutureWarning, match="deprecated.*squared_distance"):
        old = S.objective_value_and_grad(field, x0, T1, "divergence", wrt=["V"], **solve)
    assert old.objective == "squared_distance" and old.value == g.value


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["squared_distance", "divergence"])
def test_cli_prints_the_objective_and_e_T_by_their_definitions(tmp_path, capsys, kind):
    """The CLI prints the objective as ½Σ|Δx|² under its own name and e(T) = max_i|Δx_i|
    (`jaxattn.divergence`), each matching its definition on a small case."""
    import re

    out = tmp_path / "g.npz"
    with pytest.warns(FutureWarning) if kind == "divergence" else _nullcontext():
        assert main(["sensitivity", _spec(tmp_path, kind=kind), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    z = np.load(out)
    spec = json.loads(str(z["spec"]))
    field = ja.make_field(
        "plain",
        beta=1.0,
        d=2,
        lora=ja.LoRA(np.asarray(spec["lora"]["A"]), np.asarray(spec["lora"]["B"])),
    )
    x0 = np.asarray(spec["init"]["x0"])
    x = ja.simulate(field, x0, 1.0, solver="rk4", dt=0.1).xs[-1]
    xr = ja.simulate(field.without_lora(), x0, 1.0, solver="rk4", dt=0.1).xs[-1]
    half_sq = 0.5 * float(jnp.sum((x - xr) ** 2))
    e_T = float(jnp.max(jnp.linalg.norm(x - xr, axis=-1)))
    assert "divergence" not in text
    m = re.search(r"squared_distance ½·Σ_i \|Δx_i\|² = ([0-9.eE+-]+)", text)
    assert m and float(m.group(1)) == pytest.approx(half_sq, rel=1e-9), text
    m = re.search(r"e\(T\) = max_i \|Δx_i\| = ([0-9.eE+-]+)", text)
    assert m and float(m.group(1)) == pytest.approx(e_T, rel=1e-9), text
    assert float(z["e_T"]) == pytest.approx(e_T, rel=1e-12)
    assert str(z["objective"]) == "squared_distance"
    assert e_T > 0 and half_sq != pytest.approx(e_T)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(kind="variance"), "unknown objective kind"),
        (dict(adjoint="reverse"), "unknown adjoint"),
        (dict(lora=False, extra='wrt = ["lora"]'), "LoRA gradient"),
        (dict(lora=False, kind="squared_distance"), "no [lora]"),
        (dict(extra='colour = "red"'), "unknown key in [objective]"),
        (dict(adjoint="forward", extra="checkpoints = 4"), "checkpoint only"),
    ],
)
def test_cli_sensitivity_bad_input_is_one_line_exit_2(tmp_path, capsys, kw, message):
    out = tmp_path / "g.npz"
    assert main(["sensitivity", _spec(tmp_path, **kw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxattn: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_forward_refuses_a_large_full_gradient(tmp_path, capsys):
    spec = tmp_path / "big.toml"
    spec.write_text(
        'dynamics = "plain"\n[init]\nkind = "normal"\nn = 1100\nd = 2\n'
        '[solve]\nt1 = 0.1\ndt = 0.1\n[objective]\nkind = "mean_sq"\n'
        'adjoint = "forward"\n'
    )
    assert main(["sensitivity", str(spec), "--out", str(tmp_path / "g.npz")]) == 2
    assert "one JVP per input entry" in capsys.readouterr().err


def test_cli_missing_objective_and_experiment_out(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text("[init]\nx0 = [[0.1, 0.2]]\n[solve]\nt1 = 1.0\n")
    assert main(["sensitivity", str(p), "--out", str(tmp_path / "g.npz")]) == 2
    assert "[objective]" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sensitivity-experiment", "--out", str(blocker)]) == 2


@pytest.mark.slow
def test_experiment_quick(tmp_path):
    from jaxattn.experiments import worst_case_lora

    s = worst_case_lora.run(tmp_path / "out", quick=True, log=lambda *a: None)
    for f in (
        "worst_vs_random_paper.png",
        "worst_direction_paper.png",
        "linear_response.png",
        "cluster_change.png",
        "worst_case_lora.npz",
        "summary.json",
    ):
        assert (tmp_path / "out" / f).exists()
    r = s["settings"]["paper"]["targets"]["V"]["ratio_worst_over_mean_random"]
    assert r["min"] >= 1.0
    assert s["settings"]["paper"]["brute_force_check"]["max_rel_sigma_error"] < 1e-8
    assert s["linear_response"]["bound_holds"]
