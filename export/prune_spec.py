"""What a user may ask of round 0's pruning, checked without torch (so a bad flag fails at once).

  prune       a ratio in (0, 1), `auto:PT` (the largest ratio within PT accuracy points of the
              unpruned model, pqsu.export.recovery), or none
  importance  a criterion name (pqsu.export.importance)
  ranking     uniform (every layer loses the same ratio) or global (one threshold across layers,
              at uniform's parameter count)
"""
from __future__ import annotations

import math

from pqsu.protocol.errors import PqsuError

IMPORTANCE_NAMES = ("l1", "l2", "taylor", "bn-scale", "random")
RANKINGS = ("uniform", "global")


class PruneSpecError(PqsuError):
    """A prune ratio, importance or ranking that does not exist."""


def parse_prune(value: float | str | None) -> tuple[float | None, float | None]:
    """(fixed ratio, auto tolerance in points) from a prune setting."""
    if value is None:
        return None, None
    if isinstance(value, str):
        name, _, arg = value.strip().partition(":")
        if name == "auto":
            try:
                points = float(arg)
            except ValueError:
                points = math.nan
            if not 0 <= points < 100:
                raise PruneSpecError(f"prune auto:PT needs a tolerance in accuracy points, e.g. auto:1, got {value!r}")
            return None, points
        try:
            value = float(value)
        except ValueError:
            raise PruneSpecError(f"prune must be a ratio in (0, 1) or auto:PT, got {value!r}") from None
    if isinstance(value, bool) or not 0 < float(value) < 1:
        raise PruneSpecError(f"prune ratio must be in (0, 1), got {value}")
    return float(value), None


def check_importance(name: str) -> None:
    if name not in IMPORTANCE_NAMES:
        raise PruneSpecError(f"unknown importance {name!r}; choose one of: {', '.join(IMPORTANCE_NAMES)}")


def check_ranking(name: str) -> None:
    if name not in RANKINGS:
        raise PruneSpecError(f"unknown ranking {name!r}; choose one of: {', '.join(RANKINGS)}")


def check(prune: float | str | None, importance: str = "l1", ranking: str = "uniform", distill: float = 0.0,
          prune_steps: int = 1) -> None:
    """Every round-0 pruning setting at once, one line for the first that is wrong."""
    parse_prune(prune)
    check_importance(importance)
    check_ranking(ranking)
    if not 0 <= distill < 1:
        raise PruneSpecError(f"distill is the weight of the teacher's soft targets, in [0, 1), got {distill}")
    if prune_steps < 1:
        raise PruneSpecError(f"prune_steps must be at least 1, got {prune_steps}")
