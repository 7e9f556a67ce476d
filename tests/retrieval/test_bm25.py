"""BM25 first stage on a tiny hand-made corpus: stemming, stopwords, ranking, and the index cache key."""

from __future__ import annotations

import pytest

from rerankflow.errors import InputError
from rerankflow.retrieval.bm25 import BM25Index, BM25Settings, bm25_retrieve, index_key

IDS = ["d-run", "d-cat", "d-bird", "d-the", "d-both"]
TEXTS = [
    "Runners keep running every morning",
    "The cat sleeps on the warm sofa",
    "A small bird sings in the garden",
    "The and of to in it is",
    "A cat watches the bird in the garden",
]


def settings(**over) -> BM25Settings:
    base = {"k1": 1.2, "b": 0.75, "stemmer": "english", "stopwords": "en"}
    base.update(over)
    return BM25Settings(**base)


def test_stemming_matches_run_with_running(tmp_path):
    index = BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    run = index.retrieve({"q": "run"}, top_k=5)
    assert list(run["q"]) == ["d-run"]  # "running" stems to "run" ("runners" to "runner")
    unstemmed = BM25Index.build(IDS, TEXTS, settings(stemmer=None), tmp_path)
    assert unstemmed.retrieve({"q": "run"}, top_k=5) == {"q": {}}


def test_stopwords_are_ignored_and_a_stopword_query_retrieves_nothing(tmp_path):
    index = BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    # "the" would otherwise favour the stopword-only document d-the
    run = index.retrieve({"q1": "the cat", "q2": "the and of"}, top_k=5)
    assert set(run["q1"]) == {"d-cat", "d-both"}
    assert run["q2"] == {}
    keep_all = BM25Index.build(IDS, TEXTS, settings(stopwords=None), tmp_path)
    assert "d-the" in keep_all.retrieve({"q": "the and of"}, top_k=5)["q"]


def test_ranking_scores_and_top_k(tmp_path):
    index = BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    run = index.retrieve({"q": "bird garden cat"}, top_k=2)
    # d-both holds all three terms; d-bird two (bird, garden); d-cat one.
    assert list(run["q"]) == ["d-both", "d-bird"]
    scores = list(run["q"].values())
    assert scores[0] > scores[1] > 0
    with pytest.raises(InputError, match="top_k"):
        index.retrieve({"q": "bird"}, top_k=0)


def test_ties_are_broken_by_corpus_order(tmp_path):
    ids = ["z", "a", "m"]
    texts = ["apple pie", "apple pie", "apple pie"]
    run = BM25Index.build(ids, texts, settings(), tmp_path).retrieve({"q": "apple"}, top_k=3)
    assert list(run["q"]) == ["z", "a", "m"]
    assert len(set(run["q"].values())) == 1


def test_second_build_hits_the_cache_and_gives_the_same_run(tmp_path):
    first = BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    second = BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    assert not first.from_cache and second.from_cache
    assert first.key == second.key
    q = {"q": "cat in the garden"}
    assert second.retrieve(q, top_k=5) == first.retrieve(q, top_k=5)
    assert len(list(tmp_path.glob("bm25-*"))) == 1


@pytest.mark.parametrize("change", ["k1", "b", "stemmer", "stopwords", "one_text", "one_id"])
def test_any_changed_setting_or_document_misses_the_cache(tmp_path, change):
    BM25Index.build(IDS, TEXTS, settings(), tmp_path)
    ids, texts, s = list(IDS), list(TEXTS), settings()
    if change == "one_text":
        texts[2] = "A small bird sings in the park"
    elif change == "one_id":
        ids[2] = "d-bird-2"
    elif change == "k1":
        s = settings(k1=0.9)
    elif change == "b":
        s = settings(b=0.4)
    elif change == "stemmer":
        s = settings(stemmer="porter")
    else:
        s = settings(stopwords=None)
    again = BM25Index.build(ids, texts, s, tmp_path)
    assert not again.from_cache
    assert again.key != index_key(IDS, TEXTS, settings())
    assert len(list(tmp_path.glob("bm25-*"))) == 2


def test_changed_k1_changes_scores(tmp_path):
    q = {"q": "bird garden"}
    a = BM25Index.build(IDS, TEXTS, settings(k1=1.2), tmp_path).retrieve(q, top_k=5)
    b = BM25Index.build(IDS, TEXTS, settings(k1=0.5), tmp_path).retrieve(q, top_k=5)
    assert a["q"]["d-bird"] != pytest.approx(b["q"]["d-bird"])


def test_without_cache_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = BM25Index.build(IDS, TEXTS, settings(), None)
    assert not index.from_cache and list(tmp_path.iterdir()) == []


def test_bad_settings_and_corpus_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="retrieval.bm25.stemmer"):
        settings(stemmer="klingon")
    with pytest.raises(InputError, match="retrieval.bm25.stopwords"):
        settings(stopwords="klingon")
    with pytest.raises(InputError, match="retrieval.bm25.b"):
        settings(b=1.5)
    with pytest.raises(InputError, match="not unique"):
        BM25Index.build(["a", "a"], ["x y", "y z"], settings(), tmp_path)


def test_bm25_retrieve_reads_title_and_text(tmp_path):
    corpus = {"d1": {"title": "Volcanoes", "text": "Lava flows downhill."},
              "d2": {"title": "Tides", "text": "The moon pulls the ocean."}}
    run, info = bm25_retrieve(corpus, {"q": "volcano"}, 10, settings(), tmp_path)
    assert list(run["q"]) == ["d1"]  # matched through the title only
    assert info["cache_hit"] is False and info["corpus_size"] == 2
    _run, info2 = bm25_retrieve(corpus, {"q": "volcano"}, 10, settings(), tmp_path)
    assert info2["cache_hit"] is True and info2["index_key"] == info["index_key"]
