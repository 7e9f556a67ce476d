"""First-stage dense retrieval over a BEIR corpus: the candidates the rerankers reorder.

* Texts: passages are ``passage_text(doc)`` (title + " " + text) with the shared passage prefix,
  queries get the shared query prefix — :class:`rerankflow.formatting.Prefixes`, the one definition
  prep's hard-negative mining uses too.
* Corpus embeddings go through :func:`rerankflow.retrieval.embedding.embed_corpus` with the same cache
  directory and key rules as prep (model, prefixes, max length, corpus hash), so a changed corpus,
  model or prefix never reuses stale vectors and an unchanged one is embedded once.
* ``index="flat"`` (default): exact inner product (cosine, the vectors are normalised) with
  FAISS, corpus walked in blocks (:func:`rerankflow.retrieval.embedding.search`).
  ``index="hnsw"``: approximate search with ``faiss.IndexHNSWFlat`` (inner-product metric) for
  corpora too large for exact search; recall depends on ``hnsw_m`` / ``hnsw_ef_search``.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import numpy as np

from rerankflow.beir import passage_text
from rerankflow.retrieval.embedding import embed_corpus, embed_queries, search
from rerankflow.formatting import Prefixes
from rerankflow.models import load_embedder

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw")


def hnsw_search(query_emb: np.ndarray, corpus_emb: np.ndarray, top_k: int, m: int = 32, ef_construction: int = 200,
                ef_search: int = 256, block_size: int = 65536):
    """Approximate inner-product top-k with ``faiss.IndexHNSWFlat``; same return shape as ``search``."""
    import faiss

    n, dim = corpus_emb.shape
    index = faiss.IndexHNSWFlat(dim, int(m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    for start in range(0, n, block_size):  # add in blocks: a memory-mapped cache is never copied whole
        index.add(np.ascontiguousarray(corpus_emb[start:start + block_size], dtype=np.float32))
    k = min(int(top_k), n)
    index.hnsw.efSearch = max(int(ef_search), k)
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)


def dense_retrieve(corpus: Mapping[str, dict], queries: Mapping[str, str], model_name: str, prefixes: Prefixes,
                   max_length: int, top_k: int, batch_size: int = 64, cache_dir=None, device: str = "auto",
                   index: str = "flat", block_size: int = 4096, hnsw_m: int = 32, hnsw_ef_search: int = 256,
                   model=None) -> tuple[dict[str, dict[str, float]], dict]:
    """Retrieve the ``top_k`` passages of every query.

    Returns ``(run, info)``: ``run[qid][doc_id] = cosine score`` (``min(top_k, len(corpus))``
    documents per query) and ``info`` with timings (``embed_corpus_s``, ``embed_queries_s``,
    ``search_s``) and counts.
    """
    if index not in INDEX_TYPES:
        raise ValueError(f"eval.index must be one of {INDEX_TYPES}, got {index!r}")
    if not corpus:
        raise ValueError("the eval corpus is empty")
    ids = list(corpus)
    texts = [passage_text(corpus[d]) for d in ids]
    qids = list(queries)
    if model is None:
        model = load_embedder(model_name, max_length, device)
    t0 = time.perf_counter()
    c_emb = embed_corpus(ids, texts, model_name, prefixes, max_length, batch_size=batch_size,
                         cache_dir=cache_dir, device=device, model=model)
    t1 = time.perf_counter()
    q_emb = embed_queries([queries[q] for q in qids], model_name, prefixes, max_length, batch_size=batch_size,
                          device=device, model=model)
    t2 = time.perf_counter()
    if index == "hnsw":
        scores, idx = hnsw_search(q_emb, c_emb, top_k, m=hnsw_m, ef_search=hnsw_ef_search)
    else:
        scores, idx = search(q_emb, c_emb, top_k, block_size=block_size)
    t3 = time.perf_counter()
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(qids):
        run[qid] = {ids[j]: float(s) for s, j in zip(scores[row], idx[row]) if j >= 0}
    info = {
        "index": index,
        "corpus_size": len(ids),
        "queries": len(qids),
        "embedding_dim": int(c_emb.shape[1]),
        "embed_corpus_s": round(t1 - t0, 3),
        "embed_queries_s": round(t2 - t1, 3),
        "search_s": round(t3 - t2, 3),
    }
    log.info("first stage: %d queries x top %d over %d passages (%s) in %.1fs", len(qids), top_k, len(ids), index, t3 - t0)
    return run, info
