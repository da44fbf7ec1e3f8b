"""Solve options, specs and sweep plans as typed objects validated once; the sweep's axis
and summary tables."""

import dataclasses
import json

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unchecked

import jaxattn as ja
import jaxattn._sweep.runner as runner
from jaxattn._simulate import SolveOptions
from jaxattn._simulate.options import Stepping, solve_config
from jaxattn._sweep.tables import AXES, SUMMARIES


def _x0(n=5, d=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


# ------------------------------------------------------------------ SolveOptions
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dt": 0.0}, "dt must be finite and > 0"),
        ({"dt": 0.1, "rtol": 1e-6}, "either dt"),
        ({"solver": "rk4", "atol": 1e-6}, "no error estimate"),
        ({"solver": "rk5"}, "unknown solver 'rk5'"),
        ({"dt": 0.1, "max_steps": 10}, "max_steps applies to adaptive steps"),
        ({"max_steps": 10}, "max_steps applies to adaptive steps"),  # rk4: fixed dt 0.1
        ({"ts": []}, "ts is empty"),
        ({"ts": [0.5, 0.2]}, "non-decreasing"),
        ({"ts": [0.0, float("nan")]}, "NaN or inf"),
        ({"adjoint": "magic"}, "unknown adjoint"),
        ({"checkpoints": 0}, "positive integer"),
        ({"adjoint": "forward", "checkpoints": 4}, "checkpoint only"),
        ({"adjoint": "backsolve", "renormalise": True}, "not available with the backsolve"),
    ],
)
def test_each_rule_is_one_line_at_construction(kw, match):
    with unchecked(), pytest.raises(ValueError, match=match) as info:
        SolveOptions(**kw)
    assert "\n" not in str(info.value)


def test_rules_that_need_the_span_or_the_field():
    opts = SolveOptions(ts=[0.0, 2.0], dt=0.1)
    opts.check(0.0, 2.0, sphere=False)
    with pytest.raises(ValueError, match=r"\[t0, t1\]"):
        opts.check(0.0, 1.0, sphere=False)
    with pytest.raises(ValueError, match="sphere dynamics"):
        SolveOptions(renormalise=True).check(0.0, 1.0, sphere=False)
    with pytest.raises(ValueError, match="too many steps"):
        SolveOptions(dt=1e-300).check(0.0, 1e10, sphere=False)


def test_mapping_of_given_options_runs_simulate_and_compares():
    opts = SolveOptions(solver="Dopri5", rtol=1e-7, ts=np.array([0.0, 0.5, 1.0]))
    assert opts.solver == "dopri5"  # canonical name
    assert dict(opts) == {"solver": "dopri5", "rtol": 1e-7, "ts": (0.0, 0.5, 1.0)}
    assert opts == SolveOptions(solver="dopri5", rtol=1e-7, ts=(0.0, 0.5, 1.0))
    assert opts != opts.replace(rtol=1e-8)
    assert dict(SolveOptions()) == {}
    field = ja.PlainField(d=2, beta=1.0)
    a = ja.simulate(field, _x0(), 1.0, **opts)
    b = ja.simulate(field, _x0(), 1.0, options=opts)
    c = ja.simulate(field, _x0(), 1.0, solver="dopri5", rtol=1e-7, ts=[0.0, 0.5, 1.0])
    np.testing.assert_array_equal(np.asarray(a.xs), np.asarray(c.xs))
    np.testing.assert_array_equal(np.asarray(b.xs), np.asarray(c.xs))
    with pytest.raises(TypeError, match="not both"):
        ja.simulate(field, _x0(), 1.0, options=opts, dt=0.1)
    with pytest.raises(ValueError, match="either dt"):  # an edit is checked again
        opts.replace(dt=0.1)


def test_from_table_coerces_plain_data_with_the_config_mechanism():
    opts = SolveOptions.from_table({"solver": "heun", "rtol": 1e-5, "ts": [0, 1], "max_steps": 7})
    assert opts.ts == (0.0, 1.0) and opts.max_steps == 7 and isinstance(opts.rtol, float)
    for table, match in [
        ({"renormalise": "yes"}, "renormalise must be true or false"),
        ({"ts": "0 1"}, "ts must be a list"),
        ({"dt": "0.1"}, "dt must be a number"),
        ({"max_steps": 1.5}, "max_steps must be an integer"),
        ({"solver": 4}, "solver must be a string"),
        ({"colour": 1}, "unknown solve option colour"),
    ]:
        with pytest.raises(ValueError, match=match):
            SolveOptions.from_table(table)
    assert SolveOptions.from_table(dict(opts)) == opts  # the mapping is plain data again
    json.dumps(opts.as_record())


def test_resolve_fixed_adaptive_and_backsolve():
    fixed = SolveOptions().resolve(0.0, 0.25, jnp.float64, sphere=False)
    assert isinstance(fixed, Stepping) and fixed.dt == 0.1  # rk4's default step
    np.testing.assert_array_equal(fixed.grid, [0.0, 0.1, 0.2, 0.25])
    assert fixed.ts is None and solve_config(fixed).saveat_steps and solve_config(fixed).stacked
    adaptive = SolveOptions(solver="tsit5").resolve(0.0, 1.0, jnp.float64, sphere=False)
    assert adaptive.grid is None and adaptive.max_steps == 100_000
    assert adaptive.ts.size == 101 and not solve_config(adaptive).stacked
    assert isinstance(adaptive.controller, diffrax.PIDController)
    assert (adaptive.controller.rtol, adaptive.controller.atol) == (1e-6, 1e-9)
    back = SolveOptions(dt=0.5, adjoint="backsolve").resolve(0.0, 1.0, jnp.float64, sphere=False)
    # backsolve saves at the grid times and walks back with constant steps −dt
    np.testing.assert_array_equal(back.ts, [0.0, 0.5, 1.0])
    assert isinstance(back.adjoint, diffrax.BacksolveAdjoint)
    assert back.adjoint.kwargs["dt0"] == -0.5
    proj = SolveOptions(renormalise=True, solver="tsit5").resolve(
        0.0, 1.0, jnp.float64, sphere=True
    )
    assert isinstance(proj.solver, diffrax.AbstractAdaptiveSolver) and proj.renormalise
    proj_fixed = SolveOptions(renormalise=True).resolve(0.0, 1.0, jnp.float64, sphere=True)
    assert not isinstance(proj_fixed.solver, diffrax.AbstractAdaptiveSolver)


def test_spec_solve_is_a_solve_options_checked_once(monkeypatch):
    spec = {"init": {"x0": _x0().tolist()}, "solve": {"t1": 1.0, "dt": 0.25, "ts": [0, 1]}}
    sim = ja.parse_spec(spec)
    assert isinstance(sim.solve, SolveOptions) and sim.solve.dt == 0.25
    assert sim.resolved["solve"] == {"t1": 1.0, "solver": "rk4", "dt": 0.25, "ts": [0.0, 1.0]}
    # simulate(options=...) does not check the options again
    calls = []
    real = SolveOptions.__post_init__
    monkeypatch.setattr(SolveOptions, "__post_init__", lambda s: (calls.append(1), real(s)))
    sol = ja.simulate(sim.field, sim.x0, sim.t1, options=sim.solve)
    assert calls == [] and sol.ts.shape == (2,)
    monkeypatch.undo()
    with pytest.raises(ja.SpecError, match=r"^\[solve\] dt must be finite and > 0"):
        ja.parse_spec({**spec, "solve": {"t1": 1.0, "dt": -1}})
    with pytest.raises(ja.SpecError, match=r"\[solve\] ts must lie in \[t0, t1\]"):
        ja.parse_spec({**spec, "solve": {"t1": 1.0, "ts": [0, 2]}})


# ------------------------------------------------------------------ objective
def test_objective_table_parsed_in_the_library():
    from jaxattn._sensitivity import Objective, ObjectiveError, split_objective

    rest, obj = split_objective(
        {"init": {}, "objective": {"kind": "mean_sq", "wrt": "V", "checkpoints": 3}}
    )
    assert rest == {"init": {}} and obj == Objective("mean_sq", checkpoints=3, wrt=("V",))
    with pytest.warns(FutureWarning, match="deprecated"):
        assert Objective("divergence").kind == "squared_distance"
    for table, match in [
        ({"kind": "variance"}, "unknown objective kind"),
        ({"kind": "mean_sq", "adjoint": "reverse"}, "unknown adjoint"),
        ({"kind": "mean_sq", "adjoint": "forward", "checkpoints": 2}, "checkpoint only"),
        ({"kind": "mean_sq", "wrt": ["W"]}, "unknown objective wrt W"),
        ({"kind": "mean_sq", "colour": 1}, "unknown key in"),
        ({}, "needs kind"),
    ]:
        with pytest.raises(ObjectiveError, match=match):
            Objective.from_table(table)
    with pytest.raises(ObjectiveError, match=r"needs an \[objective\]"):
        split_objective({"init": {}})


# ------------------------------------------------------------------ sweep tables
SWEEP = {
    "dynamics": "rescaled",
    "init": {"kind": "uniform", "n": 4, "d": 2, "low": -2, "high": 2},
    "lora": {"rank": 1, "seed": 0},
    "solve": {"t1": 1.0, "dt": 0.25},
    "grid": {
        "init.seed": [0, 1],
        "lora.norm": [0.05, 0.2],
        "beta": [1.0, 2.5],
        "lora.target": ["V", "Q"],
    },
    "sweep": {"summaries": ["divergence", "clusters", "mean", "tokens"], "save_points": 3},
}


def test_plan_is_typed_and_parses_its_first_point_once(monkeypatch):
    import jaxattn._sweep.grid as grid

    calls = []
    real = grid.parse_spec
    monkeypatch.setattr(grid, "parse_spec", lambda s: (calls.append(1), real(s))[1])
    plan = ja.parse_sweep(SWEEP)
    assert calls == [1]
    assert dataclasses.is_dataclass(plan) and plan.options.names == (
        "divergence",
        "clusters",
        "mean",
        "tokens",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.options.chunk = 3  # type: ignore[misc]
    # the builder reuses the plan's parsed first point
    monkeypatch.setattr(runner, "parse_spec", lambda s: pytest.fail("parsed again"), raising=False)
    builder = runner._PointBuilder(plan)
    assert builder.sim0 is plan.first


def test_point_inputs_are_each_points_own_spec():
    """The table-driven inputs of every point equal what `parse_spec(point_spec(p))`
    builds: tokens, β and the LoRA in its target's slot (zero in the others)."""
    plan = ja.parse_sweep(SWEEP)
    builder = runner._PointBuilder(plan)
    inp = builder.inputs(np.arange(plan.n_points))
    assert builder.targets == ("Q", "V")
    for p in range(plan.n_points):
        sim = ja.parse_spec(plan.point_spec(p))
        np.testing.assert_array_equal(inp["x0"][p], np.asarray(sim.x0))
        assert inp["beta"][p] == float(sim.field.beta)
        (lo,) = sim.field.loras
        assert inp["alpha"][p] == float(lo.alpha)
        for t in builder.targets:
            np.testing.assert_array_equal(inp[f"A_{t}"][p], np.asarray(lo.A))
            want = np.asarray(lo.B) if lo.target == t else np.zeros_like(np.asarray(lo.B))
            np.testing.assert_array_equal(inp[f"B_{t}"][p], want)


def test_tables_describe_what_the_sweep_does(tmp_path):
    """Every summary's declared size per point and save time is what the sweep saves;
    the reference runs are keyed by every axis but the LoRA's."""
    plan = ja.parse_sweep(SWEEP)
    res = ja.sweep(SWEEP, tmp_path, progress=False, log=None)
    n, d = 4, 2
    T = res["ts"].size
    for name in plan.options.names:
        per = res[name].reshape(plan.n_points, T, -1).shape[-1]
        assert per == SUMMARIES[name].size(n, d), name
    # the references are keyed by the initial condition's axes, then the field's
    assert runner._References(plan, runner._PointBuilder(plan)).keys == ["init.seed", "beta"]


def test_docs_list_the_tables_rows():
    """docs/sweep.md's tables of grid keys and summaries name exactly the rows of
    `AXES` and `SUMMARIES` (a new row is documented)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "sweep.md").read_text(encoding="utf-8")
    grid_part, summary_part = text.split("| name | what |", 1)
    axes = re.findall(r"^\| `([\w.]+)` \|", grid_part, re.M)
    summaries = re.findall(r"^\| `([\w.]+)` \|", summary_part.split("\n## ", 1)[0], re.M)
    assert axes == list(AXES)
    assert summaries == list(SUMMARIES)


def test_beta_and_dt_meet_one_validation_from_spec_to_kernel(monkeypatch):
    """Following β and dt from a spec file's values to the solve: each is checked once
    (β by the field's constructor, dt by `SolveOptions`), however many layers pass it on."""
    import jaxattn._model.fields as fields
    import jaxattn._simulate.options as options

    seen = []

    def counting(real):
        def check(value, name, **kw):
            seen.append(name)
            return real(value, name, **kw)

        return check

    monkeypatch.setattr(fields, "check_positive", counting(fields.check_positive))
    monkeypatch.setattr(options, "check_positive", counting(options.check_positive))
    spec = {"beta": 2.0, "init": {"x0": _x0().tolist()}, "solve": {"t1": 0.5, "dt": 0.25}}
    sim = ja.parse_spec(spec)
    ja.simulate(sim.field, sim.x0, sim.t1, options=sim.solve)
    assert seen.count("beta") == 1 and seen.count("dt") == 1, seen


def test_a_grid_axis_is_one_row_init_scale():
    """`init.scale` is one row of `AXES`: its values are checked, each point draws its
    tokens with its own scale (and the same seed), the references are keyed by it, and a
    spec it does not fit is refused."""
    spec = {
        "dynamics": "plain",
        "init": {"kind": "normal", "n": 4, "d": 2, "seed": 1},
        "lora": {"rank": 1, "seed": 0},
        "solve": {"t1": 0.5, "dt": 0.25},
        "grid": {"init.scale": [0.5, 2.0], "lora.norm": [0.1, 0.3]},
        "sweep": {"summaries": ["divergence"], "save_points": 3},
    }
    plan = ja.parse_sweep(spec)
    builder = runner._PointBuilder(plan)
    inp = builder.inputs(np.arange(plan.n_points))
    for p in range(plan.n_points):
        np.testing.assert_array_equal(inp["x0"][p], ja.parse_spec(plan.point_spec(p)).x0)
    np.testing.assert_allclose(inp["x0"][2], 4.0 * inp["x0"][0], rtol=1e-15)
    assert runner._References(plan, builder).count == 2
    with pytest.raises(ja.SweepError, match="values must be > 0"):
        ja.parse_sweep({**spec, "grid": {"init.scale": [0.0]}})
    uniform = {**spec, "init": {"kind": "uniform", "n": 4, "d": 2}}
    with pytest.raises(ja.SweepError, match="takes low/high, not scale"):
        ja.parse_sweep(uniform)
