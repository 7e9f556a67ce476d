"""Fusion of two or more runs (``run[qid][doc_id] = score``) into one ranking.

Contract, for both methods:

* Queries: the union of the runs' query ids. A run without a query contributes nothing to it (RRF) or
  a normalized score of 0 for every document (convex).
* Ranks inside one run: by score descending, ties by document id ascending; rank 1 is the best.
* The fused run lists each query's documents best first; equal fused scores are ordered by document
  id ascending, so the result never depends on dict order or on the order of equal scores.

:func:`reciprocal_rank_fusion`: ``score(d) = sum over runs holding d of 1 / (rrf_k + rank(d))``
(Cormack et al., 2009). A document missing from a run contributes nothing from it.

:func:`convex_fusion`: each run's scores of a query are min-max normalized to [0, 1]
(``(s - min) / (max - min)``; when all of them are equal, every listed document gets 1.0), and
``score(d) = sum_r weights[r] * norm_r(d)`` with the weights non-negative and summing to 1. A document
missing from a run has normalized score 0 there.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from rerankflow.errors import InputError
from rerankflow.normalization import min_max  # noqa: F401  (also part of this module's interface)

Run = Mapping[str, Mapping[str, float]]
WEIGHT_TOLERANCE = 1e-6


def ranked(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score descending, ties by id ascending."""
    return sorted(scores, key=lambda d: (-scores[d], d))


def _sorted_run(fused: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {q: {d: docs[d] for d in ranked(docs)} for q, docs in fused.items()}


def _check_runs(runs: Sequence[Run]) -> list[str]:
    if len(runs) < 2:
        raise InputError(f"fusion needs two or more runs, got {len(runs)}", key="retrieval.hybrid.sources")
    qids: dict[str, None] = {}
    for run in runs:
        for q, docs in run.items():
            qids.setdefault(q)
            for d, s in docs.items():
                if not math.isfinite(float(s)):
                    raise InputError(f"query {q!r}, document {d!r}: score {s!r} is not a finite number")
    return list(qids)


def reciprocal_rank_fusion(runs: Sequence[Run], rrf_k: float) -> dict[str, dict[str, float]]:
    """Reciprocal rank fusion of ``runs`` with constant ``rrf_k`` (see module docstring)."""
    if not rrf_k >= 0:
        raise InputError(f"rrf_k must be >= 0, got {rrf_k}", key="retrieval.hybrid.rrf_k")
    fused: dict[str, dict[str, float]] = {}
    for q in _check_runs(runs):
        acc: dict[str, float] = {}
        for run in runs:
            for rank, d in enumerate(ranked(run.get(q, {})), start=1):
                acc[d] = acc.get(d, 0.0) + 1.0 / (rrf_k + rank)
        fused[q] = acc
    return _sorted_run(fused)


def check_weights(weights: Sequence[float], n_runs: int) -> list[float]:
    """The weights as floats; one per run, each >= 0, summing to 1 (within ``WEIGHT_TOLERANCE``)."""
    w = [float(x) for x in weights]
    if len(w) != n_runs:
        raise InputError(f"{len(w)} weights for {n_runs} runs; give one weight per run", key="retrieval.hybrid.weights")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise InputError(f"weights must be finite and >= 0, got {w}", key="retrieval.hybrid.weights")
    if abs(sum(w) - 1.0) > WEIGHT_TOLERANCE:
        raise InputError(f"weights must sum to 1, got {w} (sum {sum(w):g})", key="retrieval.hybrid.weights")
    return w


def convex_fusion(runs: Sequence[Run], weights: Sequence[float]) -> dict[str, dict[str, float]]:
    """Convex combination of per-query min-max-normalized scores (see module docstring)."""
    qids = _check_runs(runs)
    w = check_weights(weights, len(runs))
    fused: dict[str, dict[str, float]] = {}
    for q in qids:
        acc: dict[str, float] = {}
        for weight, run in zip(w, runs):
            for d, s in min_max(run.get(q, {})).items():
                acc[d] = acc.get(d, 0.0) + weight * s
        fused[q] = acc
    return _sorted_run(fused)


def truncate(run: Run, top_k: int) -> dict[str, dict[str, float]]:
    """The ``top_k`` best documents of every query (same order as :func:`ranked`)."""
    if int(top_k) < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}", key="retrieval.top_k")
    return {q: {d: docs[d] for d in ranked(docs)[: int(top_k)]} for q, docs in run.items()}
