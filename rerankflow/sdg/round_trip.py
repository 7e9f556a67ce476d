"""The round-trip consistency filter of the llm backend (Promptagator, Dai et al. 2022).

A generated question is kept only if the retrieval embedder (a :class:`rerankflow.retrieval.retriever.Retriever`
built from the ``retrieval`` section: same model, prefixes and cache as mining and evaluation) ranks one of
its cited chunks within ``sdg.llm.round_trip_top_k``. ``round_trip_scope: corpus`` searches every chunk
of every document (a retrieved chunk whose text equals a cited chunk's text counts as a hit);
``document`` searches only the question's own document.
"""

from __future__ import annotations

import logging

from rerankflow.retrieval.retriever import Retriever

log = logging.getLogger("rerankflow.sdg.llm")


def round_trip_keep(items, docs_chunks, retriever: Retriever, top_k: int, scope: str) -> list[list[bool]]:
    """For each (doc index, pairs) item, a keep flag per pair (see module docstring).

    Every chunk of every document is a passage of ``retriever`` (whitespace-normalised text, cached
    like any corpus); the questions are its queries.
    """
    import numpy as np

    rows, norm_texts, doc_range = [], [], {}
    for di, chunks in enumerate(docs_chunks):
        start = len(rows)
        for c in chunks:
            rows.append((di, c["chunk_id"]))
            norm_texts.append(" ".join(c["text"].split()))
        doc_range[di] = (start, len(rows))
    retriever.embedder()  # one model for passages and questions
    corpus_emb = retriever.embed_passages([f"{di}:{cid}" for di, cid in rows], norm_texts)
    q_emb = retriever.embed_queries([p["question"] for _di, pairs in items for p in pairs])
    keeps, qpos = [], 0
    for di, pairs in items:
        start, end = doc_range[di]
        qe = q_emb[qpos:qpos + len(pairs)]
        qpos += len(pairs)
        if scope == "document":
            _s, idx = retriever.search(qe, np.asarray(corpus_emb[start:end]), top_k)
            idx = np.where(idx >= 0, idx + start, -1)
        else:
            _s, idx = retriever.search(qe, corpus_emb, top_k)
        flags = []
        for p, hits in zip(pairs, idx):
            cited_rows = {start + s - 1 for s in p["segment_ids"]}  # chunk ids are 1..n in document order
            cited_texts = {norm_texts[r] for r in cited_rows}
            flags.append(any(h >= 0 and (h in cited_rows or norm_texts[h] in cited_texts) for h in hits))
        keeps.append(flags)
    return keeps


def round_trip_filter(pairs_by_doc: dict, docs_chunks, cfg: dict, retrieval_cfg: dict, device: str) -> int:
    """Drop (in place) the questions that fail the round trip; returns how many were dropped."""
    items = [(i, pairs_by_doc[i]) for i in sorted(pairs_by_doc) if pairs_by_doc[i]]
    n_generated = sum(len(p) for _i, p in items)
    keeps = round_trip_keep(items, docs_chunks, Retriever.from_config(retrieval_cfg, device=device),
                            int(cfg["round_trip_top_k"]), cfg["round_trip_scope"])
    dropped = 0
    for (i, pairs), flags in zip(items, keeps):
        pairs_by_doc[i] = [p for p, k in zip(pairs, flags) if k]
        dropped += len(pairs) - len(pairs_by_doc[i])
    log.info("round-trip filter (top %d, scope %s): dropped %d of %d questions", cfg["round_trip_top_k"],
             cfg["round_trip_scope"], dropped, n_generated)
    return dropped
