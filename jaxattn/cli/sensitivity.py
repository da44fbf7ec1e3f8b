"""`jaxattn sensitivity spec.toml --out OUT.npz`: an objective of a simulation and its
gradient.

The spec file is a `simulate` spec with an `[objective]` table:

    [objective]
    kind = "mean_sq"        # ½·mean_i |x_i(t1)|²   | "squared_distance": ½·Σ_i |x_i(t1) − x̃_i(t1)|²
                            # (x̃: the run without the LoRA; old name "divergence", deprecated)
    adjoint = "checkpoint"  # | "forward" | "backsolve"
    checkpoints = 16        # optional, checkpoint adjoint only
    wrt = ["Q", "V", "x0"]  # optional: subset of Q, K, V, beta, x0, lora (default: all)

OUT.npz holds `value`, `grad_Q`, `grad_K`, `grad_V`, `grad_beta`, `grad_x0` (and
`grad_lora_A`, `grad_lora_B` when the spec has a LoRA), for the names in `wrt`; with a
LoRA also `e_T` = `e(t1) = max_i |x_i(t1) − x̃_i(t1)|` (`jaxattn.divergence`), printed
next to the objective.

`jaxattn sensitivity-experiment --out DIR [--quick]` runs the worst-case LoRA experiment
(`jaxattn.experiments.worst_case_lora`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._simulate import SolveOptions


def register(sub) -> None:
    p = sub.add_parser(
        "sensitivity", help="value and gradient of an [objective] of a simulate spec"
    )
    p.add_argument("spec", help="simulate spec (.toml or .json) with an [objective] table")
    p.add_argument("--out", required=True, help="output .npz (value, grad_Q, grad_K, ...)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file that is not an earlier sensitivity output",
    )
    p.set_defaults(func=handle)
    e = sub.add_parser(
        "sensitivity-experiment",
        help="worst-case LoRA direction vs random ones, smallest cluster change",
    )
    e.add_argument("--out", required=True, help="output folder (figures, data, summary.json)")
    e.add_argument("--quick", action="store_true", help="small, fast version (used in tests)")
    e.set_defaults(func=handle_experiment)


def handle(args) -> int:
    from .._base import check_output_file, setup_jax, write_npz
    from .._model import AbstractField
    from .._sensitivity import split_objective
    from .._spec import load_spec_file, parse_spec

    out = check_output_file(
        args.out, inputs=[args.spec], own=("value", "objective"), force=args.force
    )
    raw = load_spec_file(args.spec)
    rest, obj = split_objective(raw)
    setup_jax("float64")
    sim = parse_spec(rest)
    field = sim.field
    if not isinstance(field, AbstractField):
        raise ValueError(
            "jaxattn sensitivity takes the classic fields (plain, rescaled, sphere, usa); "
            "this spec is a member of the model family"
        )
    if obj.wrt is not None and "lora" in obj.wrt and not field.loras:
        raise ValueError("objective wrt asks for a LoRA gradient but the spec has no [lora]")
    if obj.kind == "squared_distance" and not field.loras:
        raise ValueError(
            "objective squared_distance compares the runs with and without the "
            "LoRA; the spec has no [lora]"
        )
    import numpy as np

    from .._sensitivity import objective_value_and_grad

    t0 = time.perf_counter()
    try:
        res = objective_value_and_grad(
            field,
            sim.x0,
            sim.t1,
            obj.kind,
            adjoint=obj.adjoint,
            wrt=obj.wrt,
            checkpoints=obj.checkpoints,
            **sim.solve,
        )
    except RuntimeError as e:  # the solve itself failed (status), not a usage error
        print(f"jaxattn: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    arrays = {f"grad_{k}": np.asarray(v) for k, v in res.grads.items()}
    extra, e_text = {}, ""
    if field.loras:
        e_T = lora_divergence(field, sim.x0, sim.t1, sim.solve)
        extra["e_T"] = np.asarray(e_T)
        e_text = f"; e(T) = max_i |Δx_i| = {e_T:.10g}"
    write_npz(
        out,
        value=np.asarray(res.value),
        objective=obj.kind,
        adjoint=obj.adjoint,
        spec=json.dumps(sim.resolved),
        **extra,
        **arrays,
    )
    names = ", ".join(sorted(arrays))
    print(
        f"wrote {out}: {obj.kind} {OBJECTIVE_FORMULAS[obj.kind]} = {res.value:.10g}"
        f"{e_text}; and {names} ({obj.adjoint} adjoint, {wall:.2f} s)"
    )
    return 0


#: how the CLI writes each objective next to its name
OBJECTIVE_FORMULAS = {"mean_sq": "½·mean_i |x_i|²", "squared_distance": "½·Σ_i |Δx_i|²"}


def lora_divergence(field, x0, t1: float, solve: SolveOptions) -> float:
    """`e(t1) = max_i |x_i(t1) − x̃_i(t1)|` (`jaxattn.divergence`) between the run of
    `field` and the same run without its LoRA, `Δx = x − x̃`."""
    from .._analysis import divergence
    from .._sensitivity import check_status, final_state, solve_options

    kw = solve_options(solve, "checkpoint", None)
    x, s1 = final_state(field, x0, t1, **kw)
    x_ref, s2 = final_state(field.without_lora(), x0, t1, **kw)
    check_status(s1)
    check_status(s2)
    return float(divergence(x, x_ref))


def handle_experiment(args) -> int:
    from .._base import check_output_dir, setup_jax

    check_output_dir(args.out, create=False)  # fail before any work; run() creates it
    setup_jax("float64")
    from ..experiments import worst_case_lora

    worst_case_lora.run(args.out, quick=args.quick)
    print(f"figures, data and summary.json in {args.out}")
    return 0
