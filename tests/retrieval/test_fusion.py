"""RRF and convex fusion against rankings computed by hand in each test."""

from __future__ import annotations

import pytest

from rerankflow.errors import InputError
from rerankflow.retrieval.fusion import convex_fusion, min_max, ranked, reciprocal_rank_fusion, truncate

# Two first stages over the same query. Ranks: bm25 a=1 b=2 c=3 ; dense c=1 d=2 a=3
BM25 = {"q": {"a": 12.0, "b": 9.0, "c": 3.0}}
DENSE = {"q": {"c": 0.9, "d": 0.8, "a": 0.5}}


def test_rrf_hand_computed():
    fused = reciprocal_rank_fusion([BM25, DENSE], rrf_k=60)
    expected = {
        "a": 1 / 61 + 1 / 63,   # rank 1 in bm25, rank 3 in dense
        "c": 1 / 63 + 1 / 61,   # rank 3 in bm25, rank 1 in dense
        "b": 1 / 62,            # only in bm25 (dense contributes nothing)
        "d": 1 / 62,            # only in dense
    }
    assert fused["q"] == pytest.approx(expected)
    # a and c tie, b and d tie: ties are ordered by document id
    assert list(fused["q"]) == ["a", "c", "b", "d"]


def test_rrf_k_changes_the_balance_between_top_and_depth():
    # run1: x=1 y=2 z=3 ; run2: z=1 (only).  k=0: x = 1, z = 1/3 + 1 = 1.333 > x.  k=60: z = 1/63 + 1/61, x = 1/61
    r1 = {"q": {"x": 3.0, "y": 2.0, "z": 1.0}}
    r2 = {"q": {"z": 5.0}}
    assert list(reciprocal_rank_fusion([r1, r2], rrf_k=0)["q"]) == ["z", "x", "y"]
    assert reciprocal_rank_fusion([r1, r2], rrf_k=0)["q"]["z"] == pytest.approx(1 / 3 + 1)
    # a document in only one run at rank 1 vs one at rank 2 in both runs:
    r3 = {"q": {"p": 2.0, "s": 1.0}}
    r4 = {"q": {"t": 2.0, "s": 1.0}}
    k60 = reciprocal_rank_fusion([r3, r4], rrf_k=60)["q"]
    assert k60["s"] == pytest.approx(2 / 62) and k60["p"] == pytest.approx(1 / 61)
    assert list(k60) == ["s", "p", "t"]  # 2/62 > 1/61


def test_rrf_ties_inside_a_run_are_ranked_by_doc_id():
    # within r1, m and b tie -> b gets rank 1, m rank 2
    r1 = {"q": {"m": 1.0, "b": 1.0}}
    r2 = {"q": {"z": 1.0}}
    fused = reciprocal_rank_fusion([r1, r2], rrf_k=10)["q"]
    assert fused == pytest.approx({"b": 1 / 11, "z": 1 / 11, "m": 1 / 12})
    assert list(fused) == ["b", "z", "m"]


def test_rrf_query_missing_from_one_run():
    fused = reciprocal_rank_fusion([{"q1": {"a": 1.0}}, {"q2": {"b": 1.0}}], rrf_k=60)
    assert fused == {"q1": pytest.approx({"a": 1 / 61}), "q2": pytest.approx({"b": 1 / 61})}


def test_min_max():
    assert min_max({"a": 12.0, "b": 9.0, "c": 3.0}) == pytest.approx({"a": 1.0, "b": 6 / 9, "c": 0.0})
    assert min_max({"a": 4.0, "b": 4.0}) == {"a": 1.0, "b": 1.0}
    assert min_max({}) == {}


def test_convex_hand_computed():
    # bm25 normalized: a=1, b=(9-3)/9=2/3, c=0 ; dense normalized: c=1, d=(0.8-0.5)/0.4=0.75, a=0
    fused = convex_fusion([BM25, DENSE], weights=[0.3, 0.7])["q"]
    expected = {
        "a": 0.3 * 1 + 0.7 * 0,
        "b": 0.3 * (2 / 3),          # missing from dense: 0 there
        "c": 0.3 * 0 + 0.7 * 1,
        "d": 0.7 * 0.75,             # missing from bm25: 0 there
    }
    assert fused == pytest.approx(expected)
    assert list(fused) == ["c", "d", "a", "b"]  # 0.7, 0.525, 0.3, 0.2


def test_convex_weight_moves_the_ranking():
    assert list(convex_fusion([BM25, DENSE], weights=[1.0, 0.0])["q"])[:2] == ["a", "b"]
    assert list(convex_fusion([BM25, DENSE], weights=[0.0, 1.0])["q"])[:2] == ["c", "d"]


def test_convex_ties_by_doc_id_and_scale_invariance():
    # the same ranking on very different scales fuses to equal scores -> order by id
    r1 = {"q": {"y": 100.0, "x": 0.0}}
    r2 = {"q": {"x": 0.2, "y": 0.1}}
    fused = convex_fusion([r1, r2], weights=[0.5, 0.5])["q"]
    assert fused == pytest.approx({"x": 0.5, "y": 0.5})
    assert list(fused) == ["x", "y"]


def test_three_runs():
    r3 = {"q": {"d": 7.0, "b": 7.0}}  # all equal -> both 1.0
    fused = convex_fusion([BM25, DENSE, r3], weights=[0.5, 0.25, 0.25])["q"]
    assert fused == pytest.approx({"a": 0.5, "b": 0.5 * 2 / 3 + 0.25, "c": 0.25, "d": 0.25 * 0.75 + 0.25})
    rrf = reciprocal_rank_fusion([BM25, DENSE, r3], rrf_k=1)["q"]
    # r3 ranks b=1, d=2 (tie broken by id)
    assert rrf == pytest.approx({"a": 1 / 2 + 1 / 4, "b": 1 / 3 + 1 / 2, "c": 1 / 4 + 1 / 2, "d": 1 / 3 + 1 / 3})


@pytest.mark.parametrize("weights, match", [([0.5, 0.6], "sum to 1"), ([1.0], "one weight per run"),
                                             ([1.5, -0.5], ">= 0")])
def test_bad_weights(weights, match):
    with pytest.raises(InputError, match=match):
        convex_fusion([BM25, DENSE], weights=weights)


def test_fewer_than_two_runs_and_bad_scores():
    with pytest.raises(InputError, match="two or more"):
        reciprocal_rank_fusion([BM25], rrf_k=60)
    with pytest.raises(InputError, match="not a finite"):
        convex_fusion([BM25, {"q": {"a": float("nan")}}], weights=[0.5, 0.5])
    with pytest.raises(InputError, match="rrf_k"):
        reciprocal_rank_fusion([BM25, DENSE], rrf_k=-1)


def test_ranked_and_truncate():
    assert ranked({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]
    assert truncate({"q": {"b": 1.0, "a": 1.0, "c": 2.0}}, 2) == {"q": {"c": 2.0, "a": 1.0}}
