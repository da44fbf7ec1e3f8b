"""Gradients through `simulate`: a scalar objective of `x(t1)` (`mean_sq`,
`squared_distance` to the LoRA-free run) and its gradient with respect to `Q, K, V, β`, the
initial tokens and the LoRA factors, by reverse mode (`"checkpoint"`: diffrax's
`RecursiveCheckpointAdjoint`, exact derivative of the discrete solve), forward mode
(`"forward"`: one JVP per input entry, for few inputs) or `"backsolve"`
(`BacksolveAdjoint`: the continuous adjoint ODE solved backwards — O(1) memory in the
number of steps, but only an approximation, see `docs/sensitivity.md`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._base import Array, ArrayLike, Float, check_choice
from .._model import AbstractField, TransformerField
from .._simulate import ADJOINTS, STATUS_MESSAGES, SolveOptions, simulate

OBJECTIVES = ("mean_sq", "squared_distance")
#: old objective names still accepted (with a one-line FutureWarning) and what they mean
#: now. "divergence" is `e(t) = max_i |x_i − x̃_i|` everywhere else (`jaxattn.divergence`).
OBJECTIVE_ALIASES = {"divergence": "squared_distance"}
WRT = ("Q", "K", "V", "beta", "x0", "lora")
#: forward mode costs one JVP per input entry; above this many entries it is refused.
MAX_FORWARD_ENTRIES = 2048


# --------------------------------------------------------------------------- objectives
def mean_sq(x: Float[Array, "n d"]) -> Float[Array, ""]:
    """`½ · mean_i |x_i|²`."""
    return 0.5 * jnp.mean(jnp.sum(x * x, axis=-1))


def squared_distance(x: Float[Array, "n d"], x_ref: Float[Array, "n d"]) -> Float[Array, ""]:
    """`½ · Σ_i |x_i − x̃_i|²` (the sensitivity objective; not `e = max_i |x_i − x̃_i|`,
    which is `jaxattn.divergence`)."""
    diff = x - x_ref
    return 0.5 * jnp.sum(diff * diff)


def check_objective(objective: str) -> str:
    """The canonical objective name; an old name (`OBJECTIVE_ALIASES`) is mapped to its new
    one with a one-line `FutureWarning`."""
    if isinstance(objective, str) and objective.lower() in OBJECTIVE_ALIASES:
        new = OBJECTIVE_ALIASES[objective.lower()]
        warnings.warn(
            f"objective {objective!r} is deprecated, use {new!r} (½·Σ_i |Δx_i|²; "
            f"'divergence' means e = max_i |Δx_i| elsewhere)",
            FutureWarning,
            stacklevel=3,
        )
        return new
    return check_choice(objective, "objective", OBJECTIVES)


# --------------------------------------------------------------------------- parameters
def field_params(
    field: AbstractField | TransformerField, x0: Float[ArrayLike, "n d"]
) -> dict[str, Array]:
    """The differentiable inputs of a run as a flat dict: `Q, K, V, beta, x0` and, for a
    field with exactly one LoRA, `lora_A`, `lora_B`."""
    p = {
        "Q": field.Q,
        "K": field.K,
        "V": field.V,
        "beta": field.beta,
        "x0": jnp.asarray(x0, field.V.dtype),
    }
    if len(field.loras) == 1:
        p["lora_A"] = field.loras[0].A
        p["lora_B"] = field.loras[0].B
    return p


def with_params(
    field: AbstractField | TransformerField, p: dict[str, Array]
) -> AbstractField | TransformerField:
    """`field` with the weights named in `p` replaced (works on tracers: no checks)."""
    names = [k for k in ("Q", "K", "V", "beta") if k in p]
    if names:
        field = eqx.tree_at(lambda f: [getattr(f, k) for k in names], field, [p[k] for k in names])
    if "lora_A" in p:
        field = eqx.tree_at(
            lambda f: (f.loras[0].A, f.loras[0].B), field, (p["lora_A"], p["lora_B"])
        )
    return field


def _strip_lora(field: AbstractField | TransformerField) -> AbstractField | TransformerField:
    return field.with_lora(None)


def solve_options(
    solve: SolveOptions | Mapping[str, Any] | None, adjoint, checkpoints
) -> SolveOptions:
    """The options of a gradient's solves: `solve` (a `SolveOptions` or a mapping of
    `simulate` options) with `adjoint` and `checkpoints`, without output times or a
    progress bar (objectives read `x(t1)` only). Checked by `SolveOptions`."""
    return SolveOptions.of(solve, ts=None, progress=False, adjoint=adjoint, checkpoints=checkpoints)


def final_state(field: AbstractField | TransformerField, x0, t1: float, **solve_kw):
    """`(x(t1), status)` of one run, saving only the final time.

    Saving only `t1` (`SaveAt(ts=[t1])`) keeps reverse-mode memory at the checkpoints
    (not every step). `simulate` itself makes every adjoint, backsolve included, work
    with any field and step option.
    """
    sol = simulate(field, x0, t1, ts=[float(t1)], **solve_kw)
    return sol.xs[..., -1, :, :], sol.status


# --------------------------------------------------------------------------- gradients
@dataclasses.dataclass
class Gradient:
    """Value of the objective and its gradients (`grads[name]` has the input's shape)."""

    value: float
    grads: dict[str, np.ndarray]
    adjoint: str
    objective: str


def _check_wrt(wrt, field: AbstractField | TransformerField) -> tuple[str, ...]:
    if isinstance(wrt, str):
        wrt = (wrt,)
    # The canonical spelling of each name: "q" means Q, "BETA" beta.
    wrt = tuple(dict.fromkeys(check_choice(w, "wrt", WRT) for w in wrt))
    if "lora" in wrt:
        if not field.loras:
            raise ValueError("a LoRA gradient was asked for but the field has no LoRA")
        if len(field.loras) > 1:
            raise ValueError("LoRA gradients need exactly one LoRA on the field")
        if field.batch_shape:
            raise ValueError("gradients take a single field, not a stacked LoRA batch")
    if not wrt:
        raise ValueError("wrt is empty: name at least one of " + ", ".join(WRT))
    return wrt


def objective_fn(
    field: AbstractField | TransformerField,
    t1: float,
    objective: str | Callable = "mean_sq",
    *,
    adjoint: str = "checkpoint",
    checkpoints: int | None = None,
    solve: SolveOptions | Mapping[str, Any] | None = None,
) -> Callable:
    """`f(params) -> (value, status)` for the params of `field_params`.

    `objective`: `"mean_sq"` (`½ mean_i |x_i(t1)|²`), `"squared_distance"`
    (`½ Σ_i |x_i(t1) − x̃_i(t1)|²`, `x̃` the same run without the field's LoRA; both runs
    depend on the parameters; the old name `"divergence"` is mapped to it with a warning)
    or a callable `g(x_t1) -> scalar`.
    """
    if isinstance(objective, str):
        objective = check_objective(objective)
        if objective == "squared_distance" and not field.loras:
            raise ValueError(
                "objective squared_distance compares runs with and without the "
                "LoRA, but the field has no LoRA"
            )
    kw = solve_options(solve, check_choice(adjoint, "adjoint", ADJOINTS), checkpoints)

    def f(p):
        fld = with_params(field, p)
        x, status = final_state(fld, p["x0"], t1, **kw)
        if callable(objective):
            return objective(x), status
        if objective == "mean_sq":
            return mean_sq(x), status
        x_ref, status_ref = final_state(_strip_lora(fld), p["x0"], t1, **kw)
        return squared_distance(x, x_ref), jnp.maximum(status, status_ref)

    return f


def objective_value_and_grad(
    field: AbstractField | TransformerField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    objective: str | Callable = "mean_sq",
    *,
    adjoint: str = "checkpoint",
    wrt: Sequence[str] | None = None,
    checkpoints: int | None = None,
    max_forward_entries: int = MAX_FORWARD_ENTRIES,
    **solve,
) -> Gradient:
    """Value of a scalar objective of `x(t1)` and its gradient.

    **Arguments:**

    - `field`, `x0 (n, d)`, `t1`: as for `simulate` (single run, no batches); a classic
      field or a `TransformerField` (whose `Q, K, V` gradients have its weights' shapes,
      `(L, H, ·, d)`).
    - `objective`: `"mean_sq"`, `"squared_distance"` (`½ Σ_i |x_i − x̃_i|²`; old name
      `"divergence"`) or a callable `g(x_t1) -> scalar`.
    - `adjoint`: `"checkpoint"` (reverse mode, diffrax recursive checkpointing with
      `checkpoints` checkpoints; default `log(steps)`), `"forward"` (`jax.jacfwd` with
      diffrax `ForwardMode`: one JVP per input entry; refused above
      `max_forward_entries`), or `"backsolve"` (`BacksolveAdjoint`, approximate).
    - `wrt`: names among `Q, K, V, beta, x0, lora` (default: all; `lora` only when the
      field has one).
    - `solve`: further `simulate` options (`solver`, `dt`, `rtol`, `atol`, `max_steps`,
      `renormalise`).

    **Returns:** a `Gradient` (`grads` keys `Q, K, V, beta, x0, lora_A, lora_B`).

    For sphere dynamics `simulate` normalises `x0`; `grads["x0"]` differentiates through
    that normalisation (it is orthogonal to each `x0_i`).
    """
    if not isinstance(field, (AbstractField, TransformerField)):
        raise TypeError(
            f"field must be a jaxattn field (its Q, K, V, beta are the parameters), got "
            f"{type(field).__name__}: differentiate your own field with jax.grad through "
            "simulate"
        )
    if field.batch_shape:
        raise ValueError("gradients take a single field, not a stacked LoRA batch")
    x0 = jnp.asarray(x0, field.V.dtype)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (n, d) for a gradient, got {tuple(x0.shape)}")
    if wrt is None:
        wrt = ("Q", "K", "V", "beta", "x0") + (("lora",) if len(field.loras) == 1 else ())
    wrt = _check_wrt(wrt, field)
    adjoint = check_choice(adjoint, "adjoint", ADJOINTS)
    if isinstance(objective, str):
        objective = check_objective(objective)
    params = field_params(field, x0)
    keys = [k for k in params if k in wrt or (k.startswith("lora_") and "lora" in wrt)]
    diff = {k: params[k] for k in keys}
    rest = {k: v for k, v in params.items() if k not in diff}
    f = objective_fn(field, t1, objective, adjoint=adjoint, checkpoints=checkpoints, solve=solve)
    g = lambda d: f({**rest, **d})
    if adjoint == "forward":
        entries = sum(int(np.prod(v.shape)) for v in diff.values())
        if entries > max_forward_entries:
            raise ValueError(
                f"adjoint forward needs one JVP per input entry and the gradient wrt "
                f"{', '.join(wrt)} has {entries} entries (limit {max_forward_entries}); "
                f"use adjoint checkpoint or backsolve, or fewer wrt"
            )

        def with_aux(d):
            value, status = g(d)
            return value, (value, status)

        grads, (value, status) = jax.jacfwd(with_aux, has_aux=True)(diff)
    else:
        (value, status), grads = jax.value_and_grad(g, has_aux=True)(diff)
    check_status(status)
    return Gradient(
        float(value),
        {k: np.asarray(v) for k, v in grads.items()},
        adjoint,
        objective if isinstance(objective, str) else "custom",
    )


def check_status(status) -> None:
    codes = sorted({int(c) for c in np.asarray(status).ravel()} - {0})
    if codes:
        raise RuntimeError("the solve failed: " + "; ".join(STATUS_MESSAGES[c] for c in codes))
