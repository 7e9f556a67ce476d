"""Choosing the weight of the reranker + first-stage fusion on validation data.

:func:`choose_fusion_weight` evaluates :func:`rerankflow.scoring.fusion.fuse_run` at every weight of
:data:`WEIGHT_GRID` on the *validation* queries' candidates and returns the weight with the best mean
``metric`` (nDCG@10 by default). Stage 2 calls it at every validation (the reranker's validation scores
are already there, so it costs no model call) and writes the choice beside each checkpoint
(:data:`rerankflow.scoring.fusion.FUSION_RECORD`); stage 3 reads it and applies it unchanged to test.
Nothing here ever sees test labels: the caller passes validation qrels.

Ties (equal mean metric) go to the larger weight, i.e. towards the reranker alone: fusion is used only
where validation says it adds something.
"""

from __future__ import annotations

from typing import Mapping

from rerankflow.eval.metrics import per_query_metrics
from rerankflow.scoring.fusion import METHOD, fuse_run

# 0.00, 0.05, ..., 1.00: fine enough that the best weight on SciFact/ArguAna val moves the metric by
# < 0.002 between neighbours, coarse enough that 40 validation queries do not overfit it.
WEIGHT_GRID = tuple(round(i * 0.05, 2) for i in range(21))


def _mean(qrels: Mapping, run: Mapping, metric: str, k: int) -> float:
    rows = per_query_metrics(qrels, run, [k])
    return sum(r[metric] for r in rows.values()) / max(1, len(rows))


def choose_fusion_weight(reranker_run: Mapping[str, Mapping[str, float]],
                         first_stage_run: Mapping[str, Mapping[str, float]],
                         qrels: Mapping[str, Mapping[str, int]], *, metric: str = "NDCG@10",
                         grid=WEIGHT_GRID) -> dict:
    """The best fusion weight on these (validation) queries, and what every weight of ``grid`` scored.

    Returns ``{"weight", "method", "metric", "score", "reranker_score", "first_stage_score", "by_weight",
    "queries"}``: ``score`` is the fused mean ``metric`` at ``weight``, ``reranker_score`` / ``first_stage_score``
    the same metric of the reranker alone (weight 1) and of the first stage's ranking of the same candidates
    (weight 0).
    """
    if not grid:
        raise ValueError("the weight grid is empty")
    k = int(metric.split("@", 1)[1])
    qrels = {q: r for q, r in qrels.items() if q in reranker_run}
    by_weight = {float(w): round(_mean(qrels, fuse_run(reranker_run, first_stage_run, w), metric, k), 6)
                 for w in grid}
    best = max(by_weight, key=lambda w: (by_weight[w], w))
    return {"weight": best, "method": METHOD, "metric": metric, "score": by_weight[best],
            "reranker_score": by_weight.get(1.0), "first_stage_score": by_weight.get(0.0),
            "by_weight": {f"{w:.2f}": s for w, s in by_weight.items()}, "queries": len(qrels)}
