"""The `[objective]` table of a sensitivity spec as a typed object (`Objective`), parsed
and checked once: which scalar of `x(t1)` to differentiate, by which adjoint, with respect
to which inputs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from .._base import coerce, plain_hints
from .._simulate import SolveOptions
from .gradients import OBJECTIVE_ALIASES, OBJECTIVES, WRT

OBJECTIVE_KEYS = ("kind", "adjoint", "checkpoints", "wrt")


class ObjectiveError(ValueError):
    """An `[objective]` table that cannot be used (one line naming the key)."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """A sensitivity spec's `[objective]`: `kind` (`mean_sq` or `squared_distance`; the
    deprecated `divergence` is mapped to the latter with a warning), `adjoint`
    (`checkpoint`, `forward` or `backsolve`) with optional `checkpoints`, and `wrt` (a
    subset of `Q, K, V, beta, x0, lora`; None: all)."""

    kind: str
    adjoint: str = "checkpoint"
    checkpoints: int | None = None
    wrt: tuple[str, ...] | list[str] | str | None = None

    def __post_init__(self) -> None:
        kind = self.kind
        if kind in OBJECTIVE_ALIASES:
            warnings.warn(
                f"objective kind {kind!r} is deprecated, use "
                f"{OBJECTIVE_ALIASES[kind]!r} (½·Σ_i |Δx_i|²; e(T) = max_i |Δx_i| is "
                f"printed as well)",
                FutureWarning,
                stacklevel=4,
            )
            object.__setattr__(self, "kind", OBJECTIVE_ALIASES[kind])
        if self.kind not in OBJECTIVES:
            raise ObjectiveError(
                f"unknown objective kind {self.kind!r}; choose {' | '.join(OBJECTIVES)}"
            )
        try:  # the adjoint and checkpoints rules are the solve options' own
            SolveOptions(adjoint=self.adjoint, checkpoints=self.checkpoints)
        except (ValueError, TypeError) as e:
            raise ObjectiveError(f"objective {e}") from None
        wrt = self.wrt
        if wrt is not None:
            if isinstance(wrt, str):
                wrt = (wrt,)
            if (
                not isinstance(wrt, (list, tuple))
                or not wrt
                or not all(isinstance(w, str) for w in wrt)
            ):
                raise ObjectiveError(
                    f"objective wrt must be a non-empty list of names ({', '.join(WRT)})"
                )
            bad = sorted(set(wrt) - set(WRT))
            if bad:
                raise ObjectiveError(
                    f"unknown objective wrt {', '.join(bad)}; choose from {', '.join(WRT)}"
                )
            object.__setattr__(self, "wrt", tuple(wrt))

    @classmethod
    def from_table(cls, table: Any) -> Objective:
        """An `[objective]` table (plain data) → `Objective`; unknown keys are errors."""
        if not isinstance(table, Mapping):
            raise ObjectiveError(f"[objective] must be a table/object, got {type(table).__name__}")
        extra = sorted(set(table) - set(OBJECTIVE_KEYS))
        if extra:
            raise ObjectiveError(
                f"unknown key{'s' if len(extra) > 1 else ''} in [objective]: "
                f"{', '.join(extra)} (allowed: {', '.join(sorted(OBJECTIVE_KEYS))})"
            )
        if "kind" not in table:
            raise ObjectiveError("[objective] needs kind = mean_sq | squared_distance")
        hints = plain_hints(cls)
        try:  # plain data checked by the configs' mechanism, then the rules as a whole
            values = {k: coerce(v, hints[k], f"objective {k}") for k, v in table.items()}
        except ValueError as e:
            raise ObjectiveError(str(e)) from None
        return cls(**values)

    def as_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "adjoint": self.adjoint,
            "checkpoints": self.checkpoints,
            "wrt": None if self.wrt is None else list(self.wrt),
        }


def split_objective(raw: Mapping[str, Any]) -> tuple[dict[str, Any], Objective]:
    """A sensitivity spec (plain data) → the simulation spec without `[objective]`, and
    the parsed `Objective`."""
    if "objective" not in raw:
        raise ObjectiveError(
            "the spec needs an [objective] table (kind = mean_sq | squared_distance)"
        )
    rest = {k: v for k, v in raw.items() if k != "objective"}
    return rest, Objective.from_table(raw["objective"])
