"""The first stage as one object: :class:`Retriever`, used by every stage that retrieves.

SDG's near-duplicate filter and round-trip filter, prep's hard-negative mining, the eval first stage
and export's candidate pairs all embed and search through a ``Retriever``, so prefixes, max length,
the embedding cache and the index can never differ between them (NVIDIA's recipe mined with
``query:text`` and evaluated with ``query: text``).

* Texts: queries get the query prefix, passages the passage prefix
  (:class:`rerankflow.formatting.Prefixes`); BEIR documents are ``passage_text(doc)`` (title + " " + text).
* Passage embeddings go through :func:`rerankflow.retrieval.embedding.embed_corpus`: cached under a key
  of (model, prefixes, max length, corpus hash, bf16 or not), so a changed corpus, model or prefix never
  reuses stale vectors and an unchanged one is embedded once.
* ``precision`` (``retrieval.precision``): ``auto`` embeds queries and passages under bf16 autocast where
  bf16 is native (:func:`rerankflow.retrieval.embedding.resolve_embed_precision`), after a parity check of
  passages against fp32 (``bf16_min_cosine``); ``None`` or ``fp32`` embed at fp32.
* ``index="flat"``: exact inner product (cosine: the vectors are normalised) with FAISS, the corpus
  walked in blocks (:func:`rerankflow.retrieval.embedding.search`). ``index="hnsw"``: approximate search
  with ``faiss.IndexHNSWFlat`` for corpora too large for exact search; recall depends on ``hnsw_m`` /
  ``hnsw_ef_search``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from rerankflow.beir import passage_text
from rerankflow.formatting import Prefixes
from rerankflow.models import load_embedder
from rerankflow.retrieval.embedding import embed_corpus, embed_queries, resolve_embed_precision, search

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw")


def build_hnsw_index(corpus_emb: np.ndarray, m: int, ef_construction: int = 200, block_size: int = 65536):
    """A ``faiss.IndexHNSWFlat`` (inner product) over ``corpus_emb``, added in blocks of ``block_size`` rows.

    Blocks keep a memory-mapped cache from being copied whole; a tqdm bar (stderr, so the rule log) shows
    the blocks added when there is more than one.
    """
    import faiss
    from tqdm.auto import tqdm

    n, dim = corpus_emb.shape
    index = faiss.IndexHNSWFlat(dim, int(m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    starts = range(0, n, block_size)
    for start in tqdm(starts, desc="hnsw index", unit="block", disable=len(starts) < 2, mininterval=5.0):
        index.add(np.ascontiguousarray(corpus_emb[start:start + block_size], dtype=np.float32))
    return index


def hnsw_search(query_emb: np.ndarray, corpus_emb: np.ndarray, top_k: int, m: int, ef_search: int,
                ef_construction: int = 200, block_size: int = 65536):
    """Approximate inner-product top-k with ``faiss.IndexHNSWFlat``; same return shape as ``search``.

    The index is built by :func:`build_hnsw_index` and searched with ``efSearch = max(ef_search, k)``.
    """
    index = build_hnsw_index(corpus_emb, m, ef_construction, block_size)
    k = min(int(top_k), corpus_emb.shape[0])
    index.hnsw.efSearch = max(int(ef_search), k)
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)


@dataclass
class Retriever:
    """A bi-encoder first stage: embedder settings, embedding cache and search index in one place.

    Build it from the config with :meth:`from_config`; the embedder is loaded on first use (or pass
    ``model`` to share one already loaded).
    """

    model_name: str
    prefixes: Prefixes
    max_length: int
    batch_size: int
    cache_dir: str | None
    block_size: int
    device: str
    index: str
    hnsw_m: int | None = None
    hnsw_ef_search: int | None = None
    precision: str | None = None           # retrieval.precision (auto, fp32, bf16); None = fp32
    bf16_min_cosine: float | None = None   # retrieval.bf16_min_cosine: the bf16 parity bound
    model: object = field(default=None, repr=False)

    def __post_init__(self):
        self.bf16 = resolve_embed_precision(self.precision, self.device) == "bf16"
        if self.index not in INDEX_TYPES:
            raise ValueError(f"eval.index must be one of {INDEX_TYPES}, got {self.index!r}")
        if self.index == "hnsw" and (self.hnsw_m is None or self.hnsw_ef_search is None):
            raise ValueError("index 'hnsw' needs hnsw_m and hnsw_ef_search (eval.hnsw_m, eval.hnsw_ef_search)")

    @classmethod
    def from_config(cls, retrieval: Mapping, *, device: str, search: Mapping | None = None,
                    model_name: str | None = None) -> "Retriever":
        """The first stage of a validated config.

        ``retrieval`` is the ``retrieval`` section (model, prefixes, max length, batch size, cache
        directory, search block size). ``search`` holds ``index`` / ``hnsw_m`` / ``hnsw_ef_search``
        (the ``eval`` section); without it the search is exact. ``model_name`` overrides the section's
        model (``eval.retrieval_model``).
        """
        search = search or {"index": "flat"}
        return cls(
            model_name=model_name or retrieval["model"],
            prefixes=Prefixes.from_config(retrieval),
            max_length=int(retrieval["max_length"]),
            batch_size=int(retrieval["batch_size"]),
            cache_dir=retrieval["cache_dir"],
            block_size=int(retrieval["search_block_size"]),
            device=device,
            index=search["index"],
            hnsw_m=search.get("hnsw_m"),
            hnsw_ef_search=search.get("hnsw_ef_search"),
            # absent in stage 0's slice of the section (rules/common.smk FIRST_STAGE_KEYS): its dedup and
            # round-trip filter embed at fp32, so SDG outputs do not depend on the CPU's bf16 support
            precision=retrieval.get("precision"),
            bf16_min_cosine=retrieval.get("bf16_min_cosine"),
        )

    # ------------------------------------------------------------------ embedding
    def embedder(self):
        """The sentence-transformers model, loaded once."""
        if self.model is None:
            self.model = load_embedder(self.model_name, self.max_length, self.device)
        return self.model

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 query vectors (query prefix applied)."""
        return embed_queries(list(texts), self.model_name, self.prefixes, self.max_length, self.batch_size,
                             self.device, model=self.embedder(), bf16=self.bf16)

    def embed_passages(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 passage vectors (passage prefix applied), from the cache when it holds them."""
        return embed_corpus(ids, texts, self.model_name, self.prefixes, self.max_length, self.batch_size,
                            self.cache_dir, self.device, model=self.model, bf16=self.bf16,
                            bf16_min_cosine=self.bf16_min_cosine)

    # ------------------------------------------------------------------ search
    def search(self, query_emb: np.ndarray, passage_emb: np.ndarray, top_k: int):
        """``(scores, indices)`` of the ``top_k`` passages of every query, best first (-1 pads)."""
        if self.index == "hnsw":
            return hnsw_search(query_emb, passage_emb, top_k, m=self.hnsw_m, ef_search=self.hnsw_ef_search)
        return search(query_emb, passage_emb, top_k, self.block_size)

    def retrieve(self, corpus: Mapping[str, dict], queries: Mapping[str, str],
                 top_k: int) -> tuple[dict[str, dict[str, float]], dict]:
        """Retrieve the ``top_k`` documents of every query from a BEIR ``corpus``.

        Returns ``(run, info)``: ``run[qid][doc_id] = cosine score`` (``min(top_k, len(corpus))``
        documents per query) and ``info`` with timings (``embed_corpus_s``, ``embed_queries_s``,
        ``search_s``) and counts.
        """
        if not corpus:
            raise ValueError("the eval corpus is empty")
        ids = list(corpus)
        texts = [passage_text(corpus[d]) for d in ids]
        qids = list(queries)
        self.embedder()
        t0 = time.perf_counter()
        c_emb = self.embed_passages(ids, texts)
        t1 = time.perf_counter()
        q_emb = self.embed_queries([queries[q] for q in qids])
        t2 = time.perf_counter()
        scores, idx = self.search(q_emb, c_emb, top_k)
        t3 = time.perf_counter()
        run: dict[str, dict[str, float]] = {}
        for row, qid in enumerate(qids):
            run[qid] = {ids[j]: float(s) for s, j in zip(scores[row], idx[row]) if j >= 0}
        info = {
            "index": self.index,
            "corpus_size": len(ids),
            "queries": len(qids),
            "embedding_dim": int(c_emb.shape[1]),
            "embed_precision": "bf16" if self.bf16 else "fp32",
            "embed_corpus_s": round(t1 - t0, 3),
            "embed_queries_s": round(t2 - t1, 3),
            "search_s": round(t3 - t2, 3),
        }
        log.info("first stage: %d queries x top %d over %d passages (%s) in %.1fs", len(qids), top_k, len(ids),
                 self.index, t3 - t0)
        return run, info
