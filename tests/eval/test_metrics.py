"""Metric values against hand computation, and the behaviour of the paired statistics."""

import math

import numpy as np
import pytest

from rerankflow.eval.metrics import (aggregate, breakdown, compare_systems, evaluate_run, mrr_at_k, paired_bootstrap_ci,
                                paired_randomization_test, per_query_metrics, rank_documents, wilcoxon_p)

# q1: relevant d1 (grade 1) and d3 (grade 2); the run ranks d2, d1, d4, d3 -> relevant at ranks 2 and 4.
# q2: relevant d9; the run ranks d5, d6, d7 and never retrieves d9.
# q3: relevant d1; ranked first.
QRELS = {"q1": {"d1": 1, "d3": 2, "d8": 0}, "q2": {"d9": 1}, "q3": {"d1": 1}}
RUN = {
    "q1": {"d2": 4.0, "d1": 3.0, "d4": 2.0, "d3": 1.0},
    "q2": {"d5": 3.0, "d6": 2.0, "d7": 1.0},
    "q3": {"d1": 9.0, "d2": 1.0},
}


def log2(x):
    return math.log(x, 2)


def test_hand_computed_values():
    pq = per_query_metrics(QRELS, RUN, [1, 2, 10])
    # nDCG@10 of q1: DCG = 1/log2(3) + 2/log2(5)  (trec_eval gain = grade); IDCG = 2/log2(2) + 1/log2(3)
    dcg = 1 / log2(3) + 2 / log2(5)
    idcg = 2 / log2(2) + 1 / log2(3)
    assert pq["q1"]["NDCG@10"] == pytest.approx(dcg / idcg, abs=1e-9)
    assert pq["q1"]["NDCG@1"] == 0.0
    assert pq["q2"]["NDCG@10"] == 0.0
    assert pq["q3"]["NDCG@10"] == pytest.approx(1.0)
    # MRR: first relevant of q1 at rank 2
    assert pq["q1"]["MRR@1"] == 0.0
    assert pq["q1"]["MRR@2"] == pytest.approx(0.5)
    assert pq["q1"]["MRR@10"] == pytest.approx(0.5)
    assert pq["q2"]["MRR@10"] == 0.0
    assert pq["q3"]["MRR@1"] == 1.0
    # Recall@k: q1 has 2 relevant (d8 is judged non-relevant)
    assert pq["q1"]["Recall@2"] == pytest.approx(0.5)
    assert pq["q1"]["Recall@10"] == pytest.approx(1.0)
    assert pq["q2"]["Recall@10"] == 0.0
    # P@2 of q1 = 1/2; AP@10 of q1 = (1/2 + 2/4) / 2
    assert pq["q1"]["P@2"] == pytest.approx(0.5)
    assert pq["q1"]["MAP@10"] == pytest.approx(0.5)

    agg, pq2 = evaluate_run(QRELS, RUN, [1, 10])
    assert set(agg) == {"NDCG", "MAP", "Recall", "Precision", "MRR"}
    assert agg["NDCG"]["NDCG@10"] == pytest.approx(round((dcg / idcg + 0 + 1) / 3, 5))
    assert agg["MRR"]["MRR@10"] == pytest.approx(round((0.5 + 0 + 1) / 3, 5))
    assert agg["Recall"]["Recall@10"] == pytest.approx(round((1 + 0 + 1) / 3, 5))
    assert agg["Precision"]["P@1"] == pytest.approx(round(1 / 3, 5))


def test_missing_query_counts_as_zero_and_unjudgeable_query_is_dropped():
    qrels = {**QRELS, "q4": {"d1": 0}}  # q4 has no relevant document: undefined, excluded
    run = {"q1": RUN["q1"], "q3": RUN["q3"]}  # q2 not retrieved at all
    pq = per_query_metrics(qrels, run, [10])
    assert set(pq) == {"q1", "q2", "q3"}
    assert pq["q2"] == {k: 0.0 for k in pq["q2"]}
    agg = aggregate(pq, [10])
    # pytrec_eval alone would average over q1 and q3 only
    assert agg["NDCG"]["NDCG@10"] == pytest.approx(round((pq["q1"]["NDCG@10"] + 1.0) / 3, 5))


def test_ties_ranked_like_trec_eval():
    import pytrec_eval

    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}
    qrels = {"q": {"a": 1}}
    assert rank_documents(run["q"]) == ["c", "b", "a"]
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"]
    assert mrr_at_k(qrels, run, [3])["q"]["MRR@3"] == pytest.approx(rr) == pytest.approx(1 / 3)


def _systems(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, n)
    b = np.clip(a + rng.normal(0.05, 0.2, n), 0, 1)
    return a, b


def test_bootstrap_contains_difference_and_shrinks():
    a, b = _systems(50, 1)
    lo, hi = paired_bootstrap_ci(a, b, 4000, 0.95, seed=3)
    assert lo < (b - a).mean() < hi
    a2, b2 = _systems(2000, 1)
    lo2, hi2 = paired_bootstrap_ci(a2, b2, 4000, 0.95, seed=3)
    assert lo2 < (b2 - a2).mean() < hi2
    assert (hi2 - lo2) < (hi - lo) / 3  # ~ 1/sqrt(40) of the width
    # narrower confidence -> narrower interval; same seed -> same interval
    lo90, hi90 = paired_bootstrap_ci(a, b, 4000, 0.90, seed=3)
    assert hi90 - lo90 < hi - lo
    assert paired_bootstrap_ci(a, b, 4000, 0.95, seed=3) == (lo, hi)


def test_significance_tests():
    a, _ = _systems(200, 2)
    assert paired_randomization_test(a, a.copy(), 2000, seed=0) == pytest.approx(1.0)
    assert wilcoxon_p(a, a.copy()) == 1.0
    # a clear, consistent improvement is significant
    b = np.clip(a + 0.1, 0, 2)
    assert paired_randomization_test(a, b, 2000, seed=0) < 0.01
    assert wilcoxon_p(a, b) < 0.01
    # pure noise around zero is not
    rng = np.random.default_rng(5)
    noise = a + rng.normal(0, 0.05, a.size)
    assert paired_randomization_test(a, noise, 2000, seed=0) > 0.01


def test_compare_systems_and_breakdown():
    pq_a = per_query_metrics(QRELS, RUN, [10])
    better = {"q1": {"d1": 5.0, "d3": 6.0}, "q2": {"d9": 1.0}, "q3": {"d1": 1.0}}
    pq_b = per_query_metrics(QRELS, better, [10])
    c = compare_systems(pq_a, pq_b, "NDCG@10", 1000, 0.95, 0)
    assert c["n_queries"] == 3 and c["wins"] == 2 and c["ties"] == 1 and c["losses"] == 0
    assert c["delta"] == pytest.approx(np.mean([pq_b[q]["NDCG@10"] - pq_a[q]["NDCG@10"] for q in QRELS]))
    assert c["ci_low"] <= c["delta"] <= c["ci_high"]
    same = compare_systems(pq_a, pq_a, "NDCG@10", 1000, 0.95, 0)
    assert same["p_value"] == pytest.approx(1.0) and same["delta"] == 0.0

    meta = {"q1": {"query_type": "multi_hop"}, "q2": {"query_type": "factual"}, "q3": {"query_type": "factual"}}
    br = breakdown({"a": pq_a, "b": pq_b}, meta, ["query_type", "reasoning_type"], ["NDCG@10"])
    assert set(br) == {"query_type"}  # no query carries reasoning_type
    assert br["query_type"]["factual"]["n"] == 2
    assert br["query_type"]["factual"]["a"]["NDCG@10"] == pytest.approx(round((0 + 1) / 2, 5))
    assert br["query_type"]["multi_hop"]["b"]["NDCG@10"] == pytest.approx(1.0)
