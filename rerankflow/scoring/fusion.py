"""Fusion of a reranker's scores with its first stage's, and the record that carries the weight.

The final ranking of a query may combine the reranker's score of each candidate with the first stage's
score of the same candidate (a convex combination of per-query min-max-normalized scores)::

    fused(d) = weight * norm(reranker)(d) + (1 - weight) * norm(first_stage)(d)

``norm`` maps a query's scores to [0, 1] by min-max over that query's candidates (all-equal scores map
to 1.0), so logits and BM25 / cosine / RRF scores are comparable. ``weight`` = 1 is the reranker alone,
0 the first stage alone. Ties in the fused score keep document id order (ascending), so the ranking
never depends on dict order.

The weight is chosen on the validation split (:func:`rerankflow.eval.fusion.choose_fusion_weight`, run by
stage 2 on every validation) and written beside the checkpoint as :data:`FUSION_RECORD`; stage 3 applies
it unchanged to test, stage 4 copies it into the export record (key ``fusion``), and the server applies it
when a request carries first-stage scores. This module holds the formula and the record, nothing else.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

from rerankflow.errors import InputError
from rerankflow.normalization import min_max

FUSION_RECORD = "rerankflow_fusion.json"
METHOD = "convex_minmax"


def check_fusion_weight(weight, *, where: str = "fusion weight") -> float:
    """``weight`` as a float in [0, 1]; anything else raises :class:`InputError` naming ``where``."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be a number in [0, 1], got {weight!r}") from None
    if not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise InputError(f"{where} must be a number in [0, 1], got {weight!r}")
    return w


def fuse_with_first_stage(reranker: Mapping[str, float], first_stage: Mapping[str, float],
                          weight: float) -> dict[str, float]:
    """One query's fused scores over the documents ``reranker`` scored, best first (see module docstring).

    A reranked document missing from ``first_stage`` gets normalized first-stage score 0.
    """
    w = check_fusion_weight(weight)
    r = min_max(reranker)
    f = min_max({d: first_stage[d] for d in reranker if d in first_stage})
    fused = {d: w * r[d] + (1.0 - w) * f.get(d, 0.0) for d in reranker}
    return {d: fused[d] for d in sorted(fused, key=lambda d: (-fused[d], d))}


def fuse_run(reranker_run: Mapping[str, Mapping[str, float]], first_stage_run: Mapping[str, Mapping[str, float]],
             weight: float) -> dict[str, dict[str, float]]:
    """:func:`fuse_with_first_stage` for every query of ``reranker_run``."""
    return {q: fuse_with_first_stage(docs, first_stage_run.get(q, {}), weight) for q, docs in reranker_run.items()}


def read_fusion_record(model_dir: str | os.PathLike) -> dict | None:
    """The fusion record in ``model_dir`` (``{"weight", "method", ...}``) or None when there is none."""
    path = Path(model_dir) / FUSION_RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable fusion record: {exc}", path=path) from None
    if not isinstance(rec, dict) or "weight" not in rec:
        raise InputError("a fusion record must be an object with a 'weight'", path=path)
    if rec.get("method", METHOD) != METHOD:
        raise InputError(f"unknown fusion method {rec.get('method')!r}; expected {METHOD!r}", path=path)
    rec["weight"] = check_fusion_weight(rec["weight"], where=f"{path}: 'weight'")
    return rec
