"""Simulation specs (TOML or JSON) → field, initial tokens and solve options.

Validation happens here, once; every message is one line naming the offending key.
Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tomllib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._base import (
    DTYPES,
    as_float_array,
    check_choice,
    check_dtype,
    check_int,
    check_memory,
    check_number,
    check_seed,
    check_tokens,
    draw_normal,
    draw_uniform,
)
from .._model import (
    DYNAMICS,
    FAMILY_TARGETS,
    KERNELS,
    TARGETS,
    AbstractField,
    FeedForward,
    LoRA,
    TransformerField,
    make_field,
    unit_rows,
)
from .._simulate import SolveOptions


class SpecError(ValueError):
    """A spec (file or dictionary) that cannot be used; the message is one line naming
    the offending key. Raised by `load_spec` and `parse_spec`; a `ValueError`."""


# The model family (`TransformerField`): any of these makes the spec a family member.
FAMILY_KEYS = {
    "heads",
    "mask",
    "alibi",
    "norm",
    "alpha",
    "O",
    "ffn",
    "layer",
    "ln_gain",
    "ln_bias",
    "centre",
    "normalised",
    "frame",
    "bQ",
    "bK",
    "bV",
    "bO",
}
FFN_KEYS = {"W1", "W2", "b1", "b2", "activation"}
LAYER_KEYS = {"t0", "Q", "K", "V", "O", "ffn", "bQ", "bK", "bV", "bO"}

TOP_KEYS = FAMILY_KEYS | {
    "dynamics",
    "beta",
    "dtype",
    "Q",
    "K",
    "V",
    "attention",
    "block",
    "init",
    "lora",
    "solve",
}
INIT_KEYS = {"x0", "kind", "n", "d", "low", "high", "scale", "seed", "drawn"}
INIT_KINDS = ("uniform", "normal", "sphere")
LORA_KEYS = {"target", "A", "B", "alpha", "rank", "norm", "seed", "head", "layer"}
SOLVE_KEYS = {"t1", "solver", "dt", "rtol", "atol", "ts", "max_steps", "renormalise"}


@dataclasses.dataclass(frozen=True)
class Simulation:
    """A parsed spec (what `parse_spec` returns): what `simulate` needs, plus the
    resolved spec as plain data.

    - `field`: the vector field (with the spec's LoRA, if any); `base_field` is the same
      field without it.
    - `x0 (n, d)`: the initial tokens; `t1`: the final time.
    - `solve`: the `[solve]` options besides `t1`, as a `SolveOptions` (a mapping of
      the options given: `simulate(field, x0, t1, **sim.solve)` runs it).
    - `resolved`: the spec with defaults filled in and random draws written out
      (JSON-ready; a random `[init]` also keeps the keys that drew it, for the record).
    """

    field: AbstractField | TransformerField
    x0: jax.Array
    t1: float
    solve: SolveOptions
    resolved: dict[str, Any]

    @property
    def base_field(self) -> AbstractField | TransformerField:
        """`field` without its LoRA (the unperturbed run)."""
        return self.field.without_lora()


def load_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a spec file into a plain dictionary (public name: `jaxattn.load_spec`).

    Nothing is validated beyond the file format: pass the result to `parse_spec` (a
    simulation spec) or `parse_sweep` (a sweep spec).

    **Arguments:**

    - `path`: a `.toml` or `.json` file (by extension; any other name is tried as TOML,
      then as JSON).

    **Returns:** the file's top-level table as a `dict`.

    **Raises:** `SpecError` (one line) if the file cannot be read or parsed.
    """
    from .._base import read_regular_file

    path = os.fspath(path)
    if os.path.isdir(path):
        raise SpecError(f"spec path is a directory: {path}")
    try:
        raw = read_regular_file(path, "spec file")
    except ValueError as e:
        raise SpecError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"spec file {path} is not UTF-8 text") from None
    ext = os.path.splitext(path)[1].lower()
    parsers = (
        [("json", _parse_json)]
        if ext == ".json"
        else (
            [("toml", _parse_toml)]
            if ext == ".toml"
            else [("toml", _parse_toml), ("json", _parse_json)]
        )
    )
    errors = []
    for name, parse in parsers:
        try:
            data = parse(text)
        except ValueError as e:
            errors.append(f"{name}: {e}")
            continue
        except RecursionError:
            raise SpecError(f"spec file {path} is nested too deeply") from None
        if not isinstance(data, dict):
            raise SpecError(f"spec file {path} must hold a table/object at the top level")
        return data
    raise SpecError(f"cannot parse spec file {path} ({'; '.join(errors)})")


def _parse_toml(text):
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(str(e).splitlines()[0]) from None


def _parse_json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}") from None


def _unknown(section: dict, allowed: set, where: str) -> None:
    extra = sorted(set(section) - allowed)
    if extra:
        raise SpecError(
            f"unknown key{'s' if len(extra) > 1 else ''} in {where}: "
            f"{', '.join(extra)} (allowed: {', '.join(sorted(allowed))})"
        )


def _table(spec: dict, key: str) -> dict:
    sec = spec.get(key, {})
    if not isinstance(sec, dict):
        raise SpecError(f"[{key}] must be a table/object, got {type(sec).__name__}")
    return sec


def _spec_check(check, *args, **kw):
    """A `_validate` check whose failure is a spec mistake (`SpecError`, one line)."""
    try:
        return check(*args, **kw)
    except ValueError as e:
        raise SpecError(str(e)) from None


def _int(value, name: str, minimum: int = 0) -> int:
    return _spec_check(check_int, value, name, minimum)


def _seed(value, name: str) -> int:
    return _spec_check(check_seed, value, name)


def _check_sizes(n: int, d: int, dtype, where: str) -> None:
    """The tokens (n×d) must fit before they are allocated (the field's constructor
    checks its d×d weights)."""
    try:
        check_memory(
            jnp.dtype(dtype).itemsize * float(n * d), f"{where} with n = {n} tokens in d = {d}"
        )
    except ValueError as e:
        raise SpecError(str(e)) from None


def _num(value, name: str) -> float:
    return _spec_check(check_number, value, name)


def _matrix(value, name: str, dtype) -> jax.Array:
    try:
        arr = as_float_array(value, name, dtype)
    except (ValueError, TypeError) as e:
        raise SpecError(str(e)) from None
    return jnp.asarray(arr)


def initial_tokens(init: dict, dtype, d_hint: int | None) -> jax.Array:
    """Tokens from `[init]`: explicit `x0`, or a seeded random draw."""
    _unknown(init, INIT_KEYS, "[init]")
    if "drawn" in init and ("x0" not in init or not isinstance(init["drawn"], dict)):
        raise SpecError(
            "[init] drawn records how an explicit x0 was drawn (a table); it goes with x0 only"
        )
    if "x0" in init:
        # `drawn` (kind, n, seed, ... of a random draw) is provenance only: a resolved spec
        # saved with its draw written out as x0 keeps it and runs again as it is.
        others = sorted(set(init) - {"x0", "drawn"})
        if others:
            raise SpecError(f"[init] x0 is explicit; remove {', '.join(others)}")
        x0 = _matrix(init["x0"], "init x0", dtype)
        if x0.ndim != 2:
            raise SpecError(f"init x0 must be a list of tokens (n×d), got shape {tuple(x0.shape)}")
        try:
            check_tokens(x0, "init x0", batch_ok=False)
        except ValueError as e:
            raise SpecError(str(e)) from None
        return x0
    if "kind" not in init:
        raise SpecError("[init] needs x0 (explicit tokens) or kind = uniform | normal | sphere")
    try:
        kind = check_choice(init["kind"], "init kind", INIT_KINDS)
    except ValueError as e:
        raise SpecError(str(e)) from None
    if "n" not in init:
        raise SpecError("[init] needs n (number of tokens)")
    n = _int(init["n"], "init n", 1)
    d = _int(init["d"], "init d", 1) if "d" in init else d_hint
    if d is None:
        raise SpecError("[init] needs d (token dimension), or give Q, K or V")
    seed = _seed(init.get("seed", 0), "init seed")
    _check_sizes(n, d, dtype, "[init]")
    key = jax.random.key(seed)
    if kind == "uniform":
        low = _num(init.get("low", -1.0), "init low")
        high = _num(init.get("high", 1.0), "init high")
        if not high > low:
            raise SpecError(f"init high ({high}) must exceed low ({low})")
        bad = sorted({"scale"} & set(init))
        if bad:
            raise SpecError(f"init kind uniform takes low/high, not {', '.join(bad)}")
        return draw_uniform(key, (n, d), dtype, low, high)
    bad = sorted({"low", "high"} & set(init))
    if bad:
        raise SpecError(f"init kind {kind} takes scale, not {', '.join(bad)}")
    scale = _num(init.get("scale", 1.0), "init scale")
    if scale <= 0:
        raise SpecError(f"init scale must be > 0, got {scale}")
    x = draw_normal(key, (n, d), dtype)
    if kind == "sphere":
        return unit_rows(x)
    return scale * x


def lora_from_table(lo: dict, d: int, dtype, *, family: bool = False) -> LoRA:
    """The `[lora]` table's LoRA; `family`: for a `TransformerField` (targets O, W1, W2
    too, and the keys `head`, `layer`; its shapes are checked by the field)."""
    _unknown(lo, LORA_KEYS, "[lora]")
    try:
        target = check_choice(
            lo.get("target", "V"), "lora target", FAMILY_TARGETS if family else TARGETS
        )
    except ValueError as e:
        raise SpecError(str(e)) from None
    place = {k: _int(lo[k], f"lora {k}", 0) for k in ("head", "layer") if k in lo}
    if place and not family:
        raise SpecError(
            f"lora {' and '.join(place)}: the classic fields have one head and one layer "
            "(several are the model family's: give heads, layer, …)"
        )
    alpha = _num(lo.get("alpha", 1.0), "lora alpha")  # > 0: the LoRA constructor checks
    explicit = "A" in lo or "B" in lo
    if explicit:
        if not ("A" in lo and "B" in lo):
            raise SpecError("[lora] needs both A (r×d) and B (d×r)")
        bad = sorted({"rank", "seed"} & set(lo))
        if bad:
            raise SpecError(f"[lora] has explicit A, B: remove {', '.join(bad)}")
        A = _matrix(lo["A"], "lora A", dtype)
        B = _matrix(lo["B"], "lora B", dtype)
        if A.ndim != 2 or B.ndim != 2:
            raise SpecError(
                f"lora A must be r×d and B d×r, got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        if not family and (A.shape[1] != d or B.shape[0] != d):
            raise SpecError(
                f"lora A is {A.shape[0]}×{A.shape[1]} and B {B.shape[0]}×{B.shape[1]}, "
                f"but d = {d}: A must be r×{d}, B {d}×r"
            )
        if A.shape[0] != B.shape[1]:  # before the constructor: shapes its annotations check
            raise SpecError(f"lora rank mismatch: A has {A.shape[0]} rows, B {B.shape[1]} columns")
        if A.shape[0] > d:
            raise SpecError(f"lora rank {A.shape[0]} exceeds the dimension d = {d}")
        if "norm" in lo:
            B = _scaled_to_norm(A, B, alpha, _lora_norm(lo), dtype)
        try:
            return LoRA(A, B, alpha, target, **place)
        except ValueError as e:
            raise SpecError(str(e)) from None
    if "rank" not in lo or "norm" not in lo:
        raise SpecError("[lora] needs A and B, or rank and norm (and seed) for a random draw")
    rank = _int(lo["rank"], "lora rank", 1)
    if rank > d:
        raise SpecError(f"lora rank {rank} exceeds the dimension d = {d}")
    norm = _lora_norm(lo)
    seed = _seed(lo.get("seed", 0), "lora seed")
    try:
        return LoRA.random(
            d,
            rank=rank,
            norm=norm,
            target=target,
            alpha=alpha,
            key=jax.random.key(seed),
            dtype=dtype,
            **place,
        )
    except ValueError as e:
        raise SpecError(str(e)) from None


def _lora_norm(lo: dict) -> float:
    """The `[lora]` table's `norm` (the operator norm of ΔW), checked."""
    norm = _num(lo["norm"], "lora norm")
    if norm < 0:
        raise SpecError(f"lora norm must be ≥ 0, got {norm}")
    return norm


def _scaled_to_norm(A, B, alpha: float, norm: float, dtype):
    """`B` rescaled so that `ΔW = (α/r) B A` has operator norm `norm` (the direction
    `B A` kept): an explicit LoRA direction swept over its size ε."""
    a, b = np.asarray(A, np.float64), np.asarray(B, np.float64)
    size = float(np.linalg.norm(alpha / a.shape[0] * (b @ a), 2))
    if size == 0.0:
        raise SpecError("lora norm: the explicit direction B·A is zero, it cannot be scaled")
    return jnp.asarray(b * (norm / size), dtype)


def _spec_tokens(spec: dict, dtype, d_hint: int | None, weights: str) -> tuple[dict, jax.Array]:
    """`[init]` and its tokens, whose d must be the weights' (`weights` says what they
    are, for the error)."""
    init = _table(spec, "init")
    if not init:
        raise SpecError("the spec needs an [init] table (x0, or kind/n/d/seed)")
    x0 = initial_tokens(init, dtype, d_hint)
    if d_hint is not None and int(x0.shape[1]) != d_hint:
        raise SpecError(f"the tokens have d = {int(x0.shape[1])} but {weights}")
    return init, x0


def _resolved_init(init: dict, x0) -> dict[str, Any]:
    """`[init]` with the tokens written out; a random draw's keys are kept as `drawn`."""
    rest = {k: v for k, v in init.items() if k != "x0"}
    return {"x0": np.asarray(x0).tolist(), **({"drawn": rest} if "x0" not in init else rest)}


def _solve_table(spec: dict, sphere: bool) -> tuple[float, SolveOptions]:
    """`[solve]`: the final time `t1` and the step options, checked for the span."""
    solve = _table(spec, "solve")
    _unknown(solve, SOLVE_KEYS, "[solve]")
    if "t1" not in solve:
        raise SpecError("[solve] needs t1 (final time)")
    t1 = _num(solve["t1"], "solve t1")
    if t1 < 0:
        raise SpecError(f"solve t1 must be ≥ 0, got {t1}")
    try:
        options = SolveOptions.from_table({k: v for k, v in solve.items() if k != "t1"})
        options.check(0.0, t1, sphere=sphere)
    except (ValueError, TypeError) as e:
        raise SpecError(f"[solve] {e}") from None
    return t1, options


def parse_spec(spec: dict[str, Any]) -> Simulation:
    """Validate a simulation spec and build what `simulate` needs.

    **Arguments:**

    - `spec`: a spec as plain data (what `load_spec` returns, or a `dict` written by
      hand): top-level `dynamics`, `beta`, `dtype`, `Q`/`K`/`V`, `attention`, `block`,
      and the tables `init` (explicit `x0`, or `kind`/`n`/`d`/`seed`), `lora` (optional)
      and `solve` (`t1` and step options). Unknown keys are errors. `dtype` float64 (the
      default) needs 64-bit JAX: call `setup_jax("float64")` first.

    **Returns:** a `Simulation`: run it with
    `simulate(sim.field, sim.x0, sim.t1, options=sim.solve)`. `sim.resolved` is the spec with
    every default filled in and the drawn tokens and LoRA written out (JSON-ready).

    **Raises:** `SpecError`, whose message is one line naming the offending key.
    """
    if not isinstance(spec, dict):
        raise SpecError("a spec must be a table/object")
    _unknown(spec, TOP_KEYS, "the spec")
    try:
        dynamics = check_choice(spec.get("dynamics", "rescaled"), "dynamics", DYNAMICS)
        dtype_name = check_choice(spec.get("dtype", "float64"), "dtype", DTYPES)
        dtype = check_dtype(dtype_name)
    except ValueError as e:
        raise SpecError(str(e)) from None
    beta = spec.get("beta", 1.0)  # checked once, by the field's constructor below
    if FAMILY_KEYS & set(spec):
        return _parse_family(spec, dtype, dtype_name)
    mats = {k: _matrix(spec[k], k, dtype) for k in ("Q", "K", "V") if k in spec}
    for k, W in mats.items():
        if W.ndim != 2 or W.shape[0] != W.shape[1]:
            raise SpecError(f"{k} must be a square d×d matrix, got shape {tuple(W.shape)}")
    dims = {W.shape[0] for W in mats.values()}
    if len(dims) > 1:
        raise SpecError(
            "Q, K and V have different sizes: "
            + ", ".join(f"{k} {W.shape[0]}×{W.shape[1]}" for k, W in mats.items())
        )
    d_hint = dims.pop() if dims else None
    init, x0 = _spec_tokens(spec, dtype, d_hint, f"Q/K/V are {d_hint}×{d_hint}")
    d = int(x0.shape[1])
    lora = None
    if "lora" in spec:
        lora = lora_from_table(_table(spec, "lora"), d, dtype)
    try:
        kernel = check_choice(spec.get("attention", "auto"), "attention", KERNELS)
    except ValueError as e:
        raise SpecError(str(e)) from None
    block = _int(spec.get("block", 1024), "block", 1)
    try:
        field = make_field(
            dynamics,
            mats.get("Q"),
            mats.get("K"),
            mats.get("V"),
            beta=beta,
            lora=lora,
            d=d,
            dtype=dtype,
            kernel=kernel,
            block=block,
        )
    except (ValueError, TypeError) as e:
        raise SpecError(str(e)) from None

    t1, options = _solve_table(spec, field.on_sphere)
    resolved = {
        "dynamics": dynamics,
        "beta": float(beta),
        "dtype": dtype_name,
        "attention": kernel,
        "block": block,
        "Q": np.asarray(field.Q).tolist(),
        "K": np.asarray(field.K).tolist(),
        "V": np.asarray(field.V).tolist(),
        "init": _resolved_init(init, x0),
        "solve": {"t1": t1, "solver": options.solver, **options.as_record()},
    }
    if lora is not None:
        resolved["lora"] = _resolved_lora(lora)
    return Simulation(field=field, x0=x0, t1=t1, solve=options, resolved=resolved)


def _resolved_lora(lora: LoRA) -> dict[str, Any]:
    """A LoRA written out (its drawn factors), as the resolved spec records it."""
    out = {
        "target": lora.target,
        "A": np.asarray(lora.A).tolist(),
        "B": np.asarray(lora.B).tolist(),
        "alpha": float(lora.alpha),
    }
    out.update({k: v for k, v in (("head", lora.head), ("layer", lora.layer)) if v is not None})
    return out


def _family_weights(table: dict, where: str, dtype, heads: int | None) -> dict[str, jax.Array]:
    """`Q`, `K`, `V`, `O` of one layer: a matrix (one head) or `(heads, ·, ·)`."""
    out = {}
    for k in ("Q", "K", "V", "O"):
        if k not in table:
            continue
        W = _matrix(table[k], f"{where}{k}", dtype)
        if W.ndim == 2:
            W = W[None]
        if W.ndim != 3:
            raise SpecError(
                f"{where}{k} must be a matrix or a list of one matrix per head, got "
                f"shape {tuple(W.shape)}"
            )
        if heads is not None and W.shape[0] != heads:
            raise SpecError(f"{where}{k} has {W.shape[0]} head(s) but heads = {heads}")
        out[k] = W
    counts = {W.shape[0] for W in out.values()}
    if len(counts) > 1:
        raise SpecError(
            f"{where}Q, K, V, O disagree on the number of heads: "
            + ", ".join(f"{k} {W.shape[0]}" for k, W in out.items())
        )
    for k in ("bQ", "bK", "bV", "bO"):  # shapes: checked by the field
        if k in table:
            b = _matrix(table[k], f"{where}{k}", dtype)
            # a projection bias of one head is a vector: (heads, width) per layer
            out[k] = b[None] if k != "bO" and b.ndim == 1 else b
    return out


def _ffn_table(table, where: str, dtype) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SpecError(f"{where}ffn must be a table (W1, W2, b1, b2, activation)")
    _unknown(table, FFN_KEYS, f"{where}ffn")
    if "W1" not in table or "W2" not in table:
        raise SpecError(f"{where}ffn needs W1 (h×d) and W2 (d×h)")
    out: dict[str, Any] = {
        k: _matrix(table[k], f"{where}ffn {k}", dtype)
        for k in ("W1", "W2", "b1", "b2")
        if k in table
    }
    out["activation"] = table.get("activation", "gelu")
    return out


def _parse_family(spec: dict, dtype, dtype_name: str) -> Simulation:
    """A spec with any of `FAMILY_KEYS`: a `TransformerField` (heads, mask, ALiBi, norm,
    feed-forward, `[[layer]]` tables with their start times `t0`)."""
    dyn = spec.get("dynamics")
    # each classic dynamics is a member: (norm, normalised weights, frame); without
    # `dynamics`, the plain one's defaults
    members = {
        "plain": ("none", True, "x"),
        "sphere": ("post", True, "x"),
        "usa": ("post", False, "x"),
        "rescaled": ("none", True, "z"),
    }
    member = members[dyn] if dyn in members else members["plain"]
    norm = spec.get("norm", member[0])
    for key, value in zip(("norm", "normalised", "frame"), member):
        if dyn is not None and key in spec and spec[key] != value:
            raise SpecError(f"dynamics {dyn} is {key} = {value!r}, not {spec[key]!r}")
    if not isinstance(norm, (str, list)):
        raise SpecError(f"norm must be a scheme or a list of one per layer, got {norm!r}")
    if "alpha" in spec and "ngpt" not in ([norm] if isinstance(norm, str) else norm):
        raise SpecError(f"alpha is nGPT's step scale; norm = {norm!r} does not use it")
    flags = {}
    for key, default in (("centre", False), ("normalised", member[1])):
        flags[key] = spec.get(key, default)
        if not isinstance(flags[key], bool):
            raise SpecError(f"{key} must be true or false, got {flags[key]!r}")
    heads = _int(spec["heads"], "heads", 1) if "heads" in spec else None
    layers = spec.get("layer")
    if layers is not None:
        if (
            not isinstance(layers, list)
            or not layers
            or not all(isinstance(t, dict) for t in layers)
        ):
            raise SpecError("layer must be an array of tables ([[layer]] with t0 and weights)")
        bad = sorted({"Q", "K", "V", "O", "ffn", "bQ", "bK", "bV", "bO"} & set(spec))
        if bad:
            raise SpecError(
                f"with [[layer]] tables the weights go in the layers; remove {', '.join(bad)}"
            )
        for k, lay in enumerate(layers):
            _unknown(lay, LAYER_KEYS, f"[[layer]] {k}")
            if "t0" not in lay:
                raise SpecError(f"[[layer]] {k} needs t0 (the time it starts)")
        starts = [_num(lay["t0"], f"[[layer]] {k} t0") for k, lay in enumerate(layers)]
        if starts[0] != 0.0:
            raise SpecError(f"the first [[layer]] must start at t0 = 0, got {starts[0]}")
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise SpecError(f"[[layer]] start times must increase, got {starts}")
        tables = layers
    else:
        starts, tables = [0.0], [spec]
    per = [_family_weights(t, "" if layers is None else f"[[layer]] {k} ", dtype, heads)
           for k, t in enumerate(tables)]  # fmt: skip
    ffns = [t.get("ffn") for t in tables]
    if any(f is not None for f in ffns) and not all(f is not None for f in ffns):
        raise SpecError("give ffn in every [[layer]] or in none")
    present = [sorted(w) for w in per]
    if any(p != present[0] for p in present):
        raise SpecError("every [[layer]] must give the same weights (Q, K, V, O)")

    def stack(name):
        if name not in per[0]:
            return None
        try:
            return jnp.stack([w[name] for w in per]) if layers is not None else per[0][name]
        except ValueError:
            raise SpecError(f"the [[layer]] tables' {name} have different shapes") from None

    d_hint = next((int(W.shape[-1]) for w in per for W in w.values()), None)
    init, x0 = _spec_tokens(spec, dtype, d_hint, f"the weights act on d = {d_hint}")
    d = int(x0.shape[1])
    lora = None
    if "lora" in spec:
        lora = lora_from_table(_table(spec, "lora"), d, dtype, family=True)
    ffn = None
    if ffns[0] is not None:
        tabs = [_ffn_table(f, "" if layers is None else f"[[layer]] {k} ", dtype)
                for k, f in enumerate(ffns)]  # fmt: skip
        acts = {t["activation"] for t in tabs}
        if len(acts) > 1:
            raise SpecError(
                f"the [[layer]] feed-forward terms use different activations: {sorted(acts)}"
            )
        try:
            ffn = FeedForward(
                *(jnp.stack([t[k] for t in tabs]) for k in ("W1", "W2")),
                *(jnp.stack([t[k] for t in tabs]) if k in tabs[0] else None for k in ("b1", "b2")),
                activation=acts.pop(),
                dtype=dtype,
            )
        except (ValueError, TypeError) as e:
            raise SpecError(str(e)) from None
    try:
        kernel = check_choice(spec.get("attention", "auto"), "attention", KERNELS)
        field = TransformerField(
            stack("Q"),
            stack("K"),
            stack("V"),
            stack("O"),
            bQ=stack("bQ"),
            bK=stack("bK"),
            bV=stack("bV"),
            bO=stack("bO"),
            beta=spec.get("beta", 1.0),
            mask=spec.get("mask"),
            alibi=spec.get("alibi"),
            norm=norm,
            alpha=spec.get("alpha", 1.0),
            ffn=ffn,
            ln_gain=spec.get("ln_gain"),
            ln_bias=spec.get("ln_bias"),
            frame=spec.get("frame", member[2]),
            layer_times=starts[1:],
            lora=lora,
            **flags,
            d=d,
            heads=heads,
            dtype=dtype,
            kernel=kernel,
            block=_int(spec.get("block", 1024), "block", 1),
        )
    except (ValueError, TypeError) as e:
        raise SpecError(str(e)) from None
    if heads is not None and field.heads != heads:
        raise SpecError(f"heads = {heads} but the weights give {field.heads}")
    t1, options = _solve_table(spec, field.on_sphere)
    if starts[-1] >= t1 and len(starts) > 1:
        raise SpecError(f"[[layer]] starting at t0 = {starts[-1]} is not before t1 = {t1}")
    resolved = {k: v for k, v in spec.items() if k not in ("init", "solve", "lora")}
    if lora is not None:
        resolved["lora"] = _resolved_lora(lora)
    resolved.update(
        norm=norm,
        dtype=dtype_name,
        init=_resolved_init(init, x0),
        solve={"t1": t1, "solver": options.solver, **options.as_record()},
    )
    return Simulation(field=field, x0=x0, t1=t1, solve=options, resolved=resolved)
