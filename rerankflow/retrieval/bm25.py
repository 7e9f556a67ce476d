"""BM25 first stage with ``bm25s`` and PyStemmer, its index cached on disk like the embedding cache.

Contract:

* Texts are tokenized by ``bm25s.tokenize``: lower-cased, split on ``TOKEN_PATTERN`` (words of two or
  more characters), the stopword list named by ``stopwords`` removed (any name ``bm25s`` knows, e.g.
  ``"en"``; ``None`` keeps every word), then stemmed by the PyStemmer algorithm named by ``stemmer``
  (e.g. ``"english"``; ``None`` does not stem). Queries go through the very same tokenizer.
* Scoring is ``bm25s``'s ``lucene`` variant with the given ``k1`` and ``b``.
* The index is cached under ``<cache_dir>/bm25-<key>/`` where ``key`` is a sha256 over (corpus hash
  of every (id, text) — :func:`rerankflow.retrieval.embedding.corpus_hash` —, lower-casing, token
  pattern, the resolved stopword list, stemmer algorithm and PyStemmer version, k1, b, method, bm25s
  version). A changed corpus or setting therefore never reuses a stale index; an unchanged one is
  indexed once. The folder appears atomically; a folder whose id list disagrees is rebuilt.
* :meth:`BM25Index.retrieve` returns ``run[qid][doc_id] = score`` with at most ``top_k`` documents per
  query, best first (ties: corpus order). Only documents sharing a term with the query are returned, as
  Lucene/Elasticsearch do; a query left with no term (all stopwords) gets an empty ranking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rerankflow.beir import passage_text
from rerankflow.errors import InputError
from rerankflow.io import atomic_path, read_json, write_json
from rerankflow.retrieval.embedding import corpus_hash

log = logging.getLogger(__name__)

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
METHOD = "lucene"
IDS_FILE = "doc_ids.json"
INFO_FILE = "bm25_info.json"
PROGRESS_MIN_DOCS = 50_000  # indexing a corpus this large shows bm25s's tqdm bars (stderr, so the rule log)


@dataclass(frozen=True)
class BM25Settings:
    """Tokenizer and scoring settings of a BM25 index (the ``retrieval.bm25`` config section)."""

    k1: float
    b: float
    stemmer: str | None
    stopwords: str | None

    @classmethod
    def from_config(cls, section: Mapping) -> "BM25Settings":
        """Settings from a validated ``bm25`` config section (keys ``k1``, ``b``, ``stemmer``, ``stopwords``)."""
        return cls(k1=float(section["k1"]), b=float(section["b"]), stemmer=section["stemmer"],
                   stopwords=section["stopwords"])

    def __post_init__(self):
        if not self.k1 >= 0:
            raise InputError(f"k1 must be >= 0, got {self.k1}", key="retrieval.bm25.k1")
        if not 0 <= self.b <= 1:
            raise InputError(f"b must be within [0, 1], got {self.b}", key="retrieval.bm25.b")
        self.stopword_list()  # fail early on an unknown list
        self.stemmer_fn()

    def stopword_list(self) -> list[str]:
        """The resolved stopword list (empty when ``stopwords`` is None)."""
        from bm25s.tokenization import Tokenizer

        try:
            return sorted(Tokenizer(stopwords=self.stopwords).stopwords or [])
        except ValueError as exc:
            raise InputError(f"unknown stopword list {self.stopwords!r}: {exc}", key="retrieval.bm25.stopwords") from None

    def stemmer_fn(self):
        """A PyStemmer ``Stemmer`` for ``stemmer``, or None."""
        if self.stemmer is None:
            return None
        import Stemmer

        if self.stemmer not in Stemmer.algorithms():
            raise InputError(f"unknown stemmer {self.stemmer!r}; PyStemmer knows {', '.join(Stemmer.algorithms())}",
                             key="retrieval.bm25.stemmer")
        return Stemmer.Stemmer(self.stemmer)

    def tokenize(self, texts: Sequence[str], *, return_ids: bool, progress: bool = False):
        """``bm25s.tokenize`` with these settings (ids + vocabulary, or lists of string tokens)."""
        import bm25s

        return bm25s.tokenize(list(texts), lower=True, token_pattern=TOKEN_PATTERN, stopwords=self.stopword_list(),
                              stemmer=self.stemmer_fn(), return_ids=return_ids, show_progress=progress)

    def fingerprint(self) -> dict:
        """Everything besides the corpus that changes the index."""
        return {
            "lower": True,
            "token_pattern": TOKEN_PATTERN,
            "stopwords": self.stopwords,
            "stopwords_sha256": hashlib.sha256("\n".join(self.stopword_list()).encode("utf-8")).hexdigest(),
            "stemmer": self.stemmer,
            "pystemmer": version("PyStemmer") if self.stemmer is not None else None,
            "k1": float(self.k1),
            "b": float(self.b),
            "method": METHOD,
            "bm25s": version("bm25s"),
        }


def index_key(ids: Sequence[str], texts: Sequence[str], settings: BM25Settings) -> str:
    """The cache key of a BM25 index over ``(ids, texts)`` (see module docstring)."""
    payload = {"corpus": corpus_hash(ids, texts), **settings.fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class BM25Index:
    """A built (or cache-loaded) BM25 index over a corpus of ``ids``."""

    ids: list[str]
    settings: BM25Settings
    key: str
    model: object = field(repr=False)
    from_cache: bool

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], settings: BM25Settings,
              cache_dir: str | os.PathLike | None) -> "BM25Index":
        """Index ``texts`` (aligned with ``ids``); with ``cache_dir``, load the cached index when its key matches."""
        import bm25s

        ids = [str(i) for i in ids]
        if len(ids) != len(texts):
            raise ValueError("ids and texts differ in length")
        if not ids:
            raise InputError("cannot build a BM25 index over an empty corpus")
        if len(set(ids)) != len(ids):
            raise InputError("corpus ids are not unique")
        key = index_key(ids, texts, settings)
        folder = Path(cache_dir) / f"bm25-{key}" if cache_dir is not None else None
        if folder is not None and (folder / INFO_FILE).is_file():
            cached_ids = read_json(folder / IDS_FILE)
            if cached_ids == ids:
                model = bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
                log.info("bm25 index cache hit %s (%d documents)", folder.name, len(ids))
                return cls(ids, settings, key, model, True)
            log.warning("bm25 index %s lists other document ids; rebuilding it", folder)
        model = bm25s.BM25(k1=settings.k1, b=settings.b, method=METHOD)
        progress = len(ids) >= PROGRESS_MIN_DOCS
        model.index(settings.tokenize(texts, return_ids=True, progress=progress), show_progress=progress)
        if folder is not None:
            with atomic_path(folder, is_dir=True) as tmp:
                model.save(str(tmp), show_progress=False)
                write_json(tmp / IDS_FILE, ids, indent=None)
                write_json(tmp / INFO_FILE, {"key": key, "documents": len(ids), **settings.fingerprint()})
        return cls(ids, settings, key, model, False)

    def retrieve(self, queries: Mapping[str, str], top_k: int) -> dict[str, dict[str, float]]:
        """``run[qid][doc_id] = BM25 score``: the ``top_k`` best documents sharing a term with each query."""
        if int(top_k) < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}", key="retrieval.top_k")
        qids = list(queries)
        run: dict[str, dict[str, float]] = {q: {} for q in qids}
        tokens = self.settings.tokenize([queries[q] for q in qids], return_ids=False)
        live = [i for i, t in enumerate(tokens) if t]
        if len(live) < len(qids):
            log.warning("%d of %d queries have no term left after stopwords; they retrieve nothing",
                        len(qids) - len(live), len(qids))
        if not live:
            return run
        k = min(int(top_k), len(self.ids))
        docs, scores = self.model.retrieve([tokens[i] for i in live], k=k, n_threads=1,
                                           show_progress=len(self.ids) >= PROGRESS_MIN_DOCS)
        for row, i in enumerate(live):
            order = np.lexsort((docs[row], -scores[row]))  # score descending, then corpus order
            run[qids[i]] = {self.ids[int(docs[row][j])]: float(scores[row][j]) for j in order if scores[row][j] > 0}
        return run


def bm25_retrieve(corpus: Mapping[str, dict], queries: Mapping[str, str], top_k: int, settings: BM25Settings,
                  cache_dir: str | os.PathLike | None) -> tuple[dict[str, dict[str, float]], dict]:
    """Retrieve from a BEIR ``corpus`` (passage = ``passage_text(doc)``, title + " " + text).

    Returns ``(run, info)`` like :meth:`rerankflow.retrieval.retriever.Retriever.retrieve`: ``info`` holds
    ``index_s`` (build or cache load), ``search_s``, ``cache_hit``, ``index_key`` and counts.
    """
    ids = list(corpus)
    t0 = time.perf_counter()
    index = BM25Index.build(ids, [passage_text(corpus[d]) for d in ids], settings, cache_dir)
    t1 = time.perf_counter()
    run = index.retrieve(queries, top_k)
    t2 = time.perf_counter()
    info = {"first_stage": "bm25", "corpus_size": len(ids), "queries": len(queries), "index_key": index.key,
            "cache_hit": index.from_cache, "index_s": round(t1 - t0, 3), "search_s": round(t2 - t1, 3)}
    log.info("bm25: %d queries x top %d over %d passages in %.1fs (index %.1fs, %s)", len(queries), top_k, len(ids),
             t2 - t0, t1 - t0, "cached" if index.from_cache else "built")
    return run, info
