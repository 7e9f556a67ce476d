"""The reranker + first-stage fusion: the formula on hand-computed scores, and the weight chosen on validation."""

import json

import pytest

from rerankflow.errors import InputError
from rerankflow.eval.fusion import WEIGHT_GRID, choose_fusion_weight
from rerankflow.scoring.fusion import FUSION_RECORD, fuse_with_first_stage, read_fusion_record


def test_fusion_formula_by_hand():
    # reranker 2, 0, 1 -> normalized 1, 0, .5; first stage 0, 10, 5 -> 0, 1, .5
    fused = fuse_with_first_stage({"a": 2.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": 10.0, "c": 5.0}, 0.75)
    assert fused == pytest.approx({"a": 0.75, "c": 0.5, "b": 0.25}) and list(fused) == ["a", "c", "b"]
    assert list(fuse_with_first_stage({"a": 1.0, "b": 2.0}, {"a": 9.0, "b": 1.0}, 1.0)) == ["b", "a"]  # reranker alone
    assert list(fuse_with_first_stage({"a": 1.0, "b": 2.0}, {"a": 9.0, "b": 1.0}, 0.0)) == ["a", "b"]  # first stage alone
    # equal fused scores: document id order; a reranked document the first stage lacks gets 0 from it
    assert list(fuse_with_first_stage({"z": 1.0, "y": 0.0}, {"z": 0.0, "y": 1.0}, 0.5)) == ["y", "z"]
    assert fuse_with_first_stage({"a": 1.0, "b": 0.0}, {"a": 3.0}, 0.5) == pytest.approx({"a": 1.0, "b": 0.0})
    with pytest.raises(InputError, match=r"fusion weight must be a number in \[0, 1\], got 1.5"):
        fuse_with_first_stage({"a": 1.0}, {"a": 1.0}, 1.5)


def test_weight_chosen_where_each_source_fixes_the_others_mistakes():
    # q1: the reranker is right, the first stage wrong; q2: the opposite, but the reranker's margin is small,
    # so a weight that still trusts the reranker a little fixes q2 without breaking q1
    rr = {"q1": {"p1": 5.0, "n1": 0.0, "n2": -1.0}, "q2": {"n3": 1.0, "p2": 0.9, "n4": -5.0}}
    fs = {"q1": {"n1": 3.0, "p1": 2.9, "n2": 0.0}, "q2": {"p2": 3.0, "n3": 0.0, "n4": 1.0}}
    qrels = {"q1": {"p1": 1}, "q2": {"p2": 1}}
    choice = choose_fusion_weight(rr, fs, qrels)
    assert choice["reranker_score"] < 1.0 and choice["first_stage_score"] < 1.0
    assert choice["score"] == 1.0 and 0.0 < choice["weight"] < 1.0 and choice["weight"] in WEIGHT_GRID
    # ties go to the largest weight among the best
    best = [float(w) for w, s in choice["by_weight"].items() if s == 1.0]
    assert choice["weight"] == max(best) and choice["queries"] == 2
    # the choice reads only the qrels it is given: other labels give another weight
    other = choose_fusion_weight(rr, fs, {"q1": {"n1": 1}, "q2": {"n3": 1}})
    assert other["weight"] != choice["weight"]


def test_fusion_record(tmp_path):
    assert read_fusion_record(tmp_path) is None
    (tmp_path / FUSION_RECORD).write_text(json.dumps({"weight": 0.35, "method": "convex_minmax"}))
    assert read_fusion_record(tmp_path)["weight"] == 0.35
    (tmp_path / FUSION_RECORD).write_text(json.dumps({"weight": 2}))
    with pytest.raises(InputError, match=r"rerankflow_fusion.json: 'weight' must be a number in \[0, 1\]"):
        read_fusion_record(tmp_path)
    (tmp_path / FUSION_RECORD).write_text("{not json")
    with pytest.raises(InputError, match=r"unreadable fusion record"):
        read_fusion_record(tmp_path)
