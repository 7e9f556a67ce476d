"""Per-query score normalization shared by every fusion (first-stage hybrids and reranker + first stage)."""

from __future__ import annotations

from typing import Mapping


def min_max(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores mapped to [0, 1] by min-max; all-equal scores map to 1.0; an empty mapping stays empty."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return {d: 1.0 for d in scores}
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}
