"""Retrieval metrics with ``pytrec_eval``, per query, and paired uncertainty between systems.

Contracts
---------
* ``run`` and ``qrels`` are BEIR-style dicts: ``run[qid][doc_id] = score`` (higher is better),
  ``qrels[qid][doc_id] = graded relevance`` (``>= 1`` is relevant, as in trec_eval).
* Metric names follow BEIR / NVIDIA's recipe: ``NDCG@k``, ``MAP@k``, ``Recall@k``, ``P@k`` and
  ``MRR@k``. Aggregates are grouped per family as in NVIDIA's ``eval_results.json``:
  ``{"NDCG": {"NDCG@10": ..}, "MAP": {..}, "Recall": {..}, "Precision": {..}, "MRR": {..}}``.
* NDCG, MAP, Recall and P come from ``pytrec_eval`` (``ndcg_cut``, ``map_cut``, ``recall``, ``P``).
  trec_eval's ``recip_rank`` has **no cutoff** (``recip_rank.10`` silently returns the uncut
  value), so ``MRR@k`` is computed here from the run, ranking documents exactly as trec_eval does
  (score descending, ties broken by document id descending) so that it agrees with the others.
* Every query of ``qrels`` that has at least one relevant document is evaluated; a query the
  system returned nothing for scores 0 on every metric (pytrec_eval would silently drop it and
  inflate the mean). Queries without any relevant document are excluded (their metrics are
  undefined) and counted by the caller.
* Comparisons are *paired* over queries: bootstrap percentile interval of the mean difference
  (``b - a``) and a two-sided paired randomization (sign-flip) test, plus scipy's Wilcoxon
  signed-rank test as a second opinion.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

FAMILIES = (("NDCG", "NDCG"), ("MAP", "MAP"), ("Recall", "Recall"), ("Precision", "P"), ("MRR", "MRR"))
_TREC = {"NDCG": "ndcg_cut", "MAP": "map_cut", "Recall": "recall", "P": "P"}


def metric_names(k_values: Sequence[int]) -> list[str]:
    """All per-query metric names for ``k_values``, family by family."""
    return [f"{prefix}@{k}" for _family, prefix in FAMILIES for k in k_values]


def check_k_values(k_values) -> list[int]:
    """Return ``k_values`` as sorted unique positive ints, or raise ``ValueError``."""
    try:
        ks = sorted({int(k) for k in k_values})
    except (TypeError, ValueError):
        raise ValueError(f"k_values must be a list of positive integers, got {k_values!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"k_values must be a non-empty list of positive integers, got {k_values!r}")
    return ks


def rank_documents(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids best first, with trec_eval's order: score desc, then doc id desc."""
    items = sorted(doc_scores.items(), key=lambda kv: kv[0], reverse=True)
    items.sort(key=lambda kv: -float(kv[1]))  # stable: equal scores keep doc id descending
    return [d for d, _s in items]


def drop_identical_ids(run: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, dict[str, float]], int]:
    """``run`` without any document whose id equals its query's id (BEIR's and MTEB's ``ignore_identical_ids``),
    and how many were dropped."""
    out = {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}
    return out, sum(len(run[q]) - len(out[q]) for q in run)


def mrr_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k_values: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{qid: {"MRR@k": 1/rank of the first relevant document within the top k, else 0}}``."""
    out: dict[str, dict[str, float]] = {}
    for qid, rels in qrels.items():
        ranking = rank_documents(run.get(qid, {}))
        first = next((i + 1 for i, d in enumerate(ranking) if rels.get(d, 0) >= 1), None)
        out[qid] = {f"MRR@{k}": (1.0 / first if first is not None and first <= k else 0.0) for k in k_values}
    return out


def evaluable_qrels(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """The queries of ``qrels`` with at least one relevant (``>= 1``) document."""
    return {qid: {d: int(s) for d, s in docs.items()} for qid, docs in qrels.items() if any(int(s) >= 1 for s in docs.values())}


def per_query_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k_values: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{qid: {metric name: value}}`` for every evaluable query of ``qrels`` (see module doc)."""
    import pytrec_eval

    ks = check_k_values(k_values)
    qrels = evaluable_qrels(qrels)
    kstr = ",".join(str(k) for k in ks)
    measures = {f"{m}.{kstr}" for m in _TREC.values()}
    run_f = {qid: {str(d): float(s) for d, s in run.get(qid, {}).items()} for qid in qrels}
    run_f = {qid: docs for qid, docs in run_f.items() if docs}
    scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run_f) if run_f else {}
    mrr = mrr_at_k(qrels, run_f, ks)
    out: dict[str, dict[str, float]] = {}
    for qid in qrels:
        s = scores.get(qid, {})
        row = {}
        for prefix, trec in _TREC.items():
            for k in ks:
                row[f"{prefix}@{k}"] = float(s.get(f"{trec}_{k}", 0.0))
        row.update(mrr[qid])
        out[qid] = row
    return out


def aggregate(per_query: Mapping[str, Mapping[str, float]], k_values: Sequence[int], digits: int = 5) -> dict[str, dict[str, float]]:
    """Mean over queries in NVIDIA's per-family layout, rounded to ``digits`` like BEIR."""
    ks = check_k_values(k_values)
    n = len(per_query)
    out: dict[str, dict[str, float]] = {}
    for family, prefix in FAMILIES:
        out[family] = {}
        for k in ks:
            name = f"{prefix}@{k}"
            mean = sum(q[name] for q in per_query.values()) / n if n else 0.0
            out[family][name] = round(mean, digits)
    return out


def evaluate_run(qrels, run, k_values):
    """``(aggregate, per_query)`` of one system; see :func:`per_query_metrics` and :func:`aggregate`."""
    pq = per_query_metrics(qrels, run, k_values)
    return aggregate(pq, k_values), pq


def metric_value(aggregate_result: Mapping[str, Mapping[str, float]], name: str) -> float:
    """Look up ``"NDCG@10"`` (etc.) in an aggregate dict."""
    for family, prefix in FAMILIES:
        if name.startswith(prefix + "@"):
            return aggregate_result[family][name]
    raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Paired comparisons


def _paired_arrays(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    qids = sorted(set(a) & set(b))
    if len(qids) != len(a) or len(qids) != len(b):
        raise ValueError("paired comparison needs the same queries in both systems")
    return np.array([a[q] for q in qids], dtype=np.float64), np.array([b[q] for q in qids], dtype=np.float64)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_samples: int, confidence: float,
                        seed: int, chunk: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b - a)``, resampling queries with replacement.

    Deterministic for a given ``seed``. Memory is bounded by ``chunk x n_queries``.
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = d.shape[0]
    if n == 0:
        return (math.nan, math.nan)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_samples), dtype=np.float64)
    for start in range(0, int(n_samples), chunk):
        m = min(chunk, int(n_samples) - start)
        idx = rng.integers(0, n, size=(m, n))
        means[start:start + m] = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_randomization_test(a: Sequence[float], b: Sequence[float], n_samples: int, seed: int,
                              chunk: int = 1000) -> float:
    """Two-sided paired randomization (sign-flip) test of ``mean(b - a) == 0``.

    Each resample flips the sign of every query's difference with probability 1/2; the p-value is
    ``(#{|mean flipped| >= |observed|} + 1) / (n_samples + 1)``. Identical systems give ``p = 1``.
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = d.shape[0]
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    tol = 1e-12
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, int(n_samples), chunk):
        m = min(chunk, int(n_samples) - start)
        signs = rng.integers(0, 2, size=(m, n)) * 2 - 1
        hits += int(np.count_nonzero(np.abs((signs * d).mean(axis=1)) >= observed - tol))
    return (hits + 1) / (int(n_samples) + 1)


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """scipy's two-sided Wilcoxon signed-rank p-value; ``1.0`` when all differences are zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return None
    if not np.any(np.abs(d) > 1e-12):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox").pvalue)


def compare_systems(per_query_a: Mapping[str, Mapping[str, float]], per_query_b: Mapping[str, Mapping[str, float]],
                    metric: str, n_samples: int, confidence: float, seed: int) -> dict:
    """Paired comparison of system ``b`` against baseline ``a`` on ``metric`` over shared queries.

    Returns ``{"metric", "n_queries", "a", "b", "delta", "ci_low", "ci_high", "confidence",
    "p_value" (randomization), "wilcoxon_p", "wins", "losses", "ties"}``.
    """
    a, b = _paired_arrays({q: v[metric] for q, v in per_query_a.items()}, {q: v[metric] for q, v in per_query_b.items()})
    lo, hi = paired_bootstrap_ci(a, b, n_samples, confidence, seed)
    d = b - a
    return {
        "metric": metric,
        "n_queries": int(a.size),
        "a": float(a.mean()) if a.size else math.nan,
        "b": float(b.mean()) if b.size else math.nan,
        "delta": float(d.mean()) if d.size else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "p_value": paired_randomization_test(a, b, n_samples, seed),
        "test": "paired randomization (sign-flip), two-sided",
        "wilcoxon_p": wilcoxon_p(a, b),
        "wins": int(np.count_nonzero(d > 1e-12)),
        "losses": int(np.count_nonzero(d < -1e-12)),
        "ties": int(np.count_nonzero(np.abs(d) <= 1e-12)),
    }


def breakdown(per_query_by_system: Mapping[str, Mapping[str, Mapping[str, float]]], query_meta: Mapping[str, Mapping],
              fields: Iterable[str] = ("query_type", "reasoning_type"), metrics: Sequence[str] = ("NDCG@10",)) -> dict:
    """Mean metrics per value of each metadata field: ``{field: {value: {"n": .., system: {metric: ..}}}}``.

    Only fields that at least one evaluated query carries appear; queries without the field are
    grouped under ``"(none)"`` when others have it.
    """
    systems = list(per_query_by_system)
    if not systems:
        return {}
    qids = list(next(iter(per_query_by_system.values())))
    out: dict = {}
    for field in fields:
        groups: dict[str, list[str]] = {}
        for qid in qids:
            value = (query_meta.get(qid) or {}).get(field)
            groups.setdefault("(none)" if value in (None, "") else str(value), []).append(qid)
        if set(groups) <= {"(none)"}:
            continue
        out[field] = {}
        for value, members in sorted(groups.items()):
            row: dict = {"n": len(members)}
            for system in systems:
                pq = per_query_by_system[system]
                row[system] = {m: round(sum(pq[q][m] for q in members) / len(members), 5) for m in metrics}
            out[field][value] = row
    return out
