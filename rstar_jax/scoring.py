"""Step-score aggregation for ranking whole solutions (Best-of-N, beam search, evaluation).

Qwen's PRM lessons compare `min` (a solution is as good as its worst step), `product` (probability that every step
is right, for scores in [0, 1]) and `last` (the score of the final step).
"""

from __future__ import annotations

import math
from typing import Sequence

AGGREGATIONS = ("min", "product", "last")


def aggregate(step_scores: Sequence[float], how: str) -> float:
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r} is not one of {', '.join(AGGREGATIONS)}")
    if not step_scores:
        return -math.inf
    if how == "min":
        return float(min(step_scores))
    if how == "last":
        return float(step_scores[-1])
    return float(math.prod(step_scores))
