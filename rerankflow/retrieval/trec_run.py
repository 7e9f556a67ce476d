"""TREC run files: the first stage of a user's own retriever (Elasticsearch, OpenSearch, Vespa, ...).

Format: one line per retrieved document, six whitespace-separated columns
``qid Q0 docid rank score tag`` (the second column is ignored, as trec_eval does); blank lines are
skipped. Reading validates every line and raises :class:`~rerankflow.errors.InputError` naming the
file, the line and the offending id for: a wrong column count, a rank that is not an integer >= 0 (0-based
ranks are accepted),
a score that is not a finite number, a rank or a document repeated within a query (the message also
names the earlier line), a query id not in ``known_queries``, a document id not in ``known_docs``.

The score column orders the documents (as trec_eval does); ranks are validated, not used. A query
whose ranks contradict its scores is counted and logged as a warning.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Collection, Mapping

from rerankflow.errors import InputError
from rerankflow.io import atomic_path

log = logging.getLogger(__name__)

COLUMNS = 6


def _fields(line: str, path: Path, lineno: int) -> tuple[str, str, int, float]:
    parts = line.split()
    if len(parts) != COLUMNS:
        first = f" (query {parts[0]!r})" if parts else ""
        raise InputError(f"expected {COLUMNS} whitespace-separated columns 'qid Q0 docid rank score tag', "
                         f"got {len(parts)}{first}: {line.strip()[:120]!r}", path=path, line=lineno)
    qid, _q0, doc, rank_s, score_s, _tag = parts
    try:
        rank = int(rank_s)
    except ValueError:
        raise InputError(f"query {qid!r}, document {doc!r}: rank {rank_s!r} is not an integer",
                         path=path, line=lineno) from None
    if rank < 0:
        raise InputError(f"query {qid!r}, document {doc!r}: rank {rank} is negative", path=path, line=lineno)
    try:
        score = float(score_s)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise InputError(f"query {qid!r}, document {doc!r}: score {score_s!r} is not a finite number",
                         path=path, line=lineno)
    return qid, doc, rank, score


def read_trec_run(path: str | os.PathLike, known_queries: Collection[str] | None,
                  known_docs: Collection[str] | None) -> dict[str, dict[str, float]]:
    """Read and validate a TREC run file; ``run[qid][doc_id] = score``, each query best first.

    ``known_queries`` / ``known_docs``: the ids the run may use (the eval queries, the corpus); ``None``
    skips that check. Queries of ``known_queries`` absent from the file simply have no candidates.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("run file not found", path=path)
    known_q = set(known_queries) if known_queries is not None else None
    known_d = set(known_docs) if known_docs is not None else None
    run: dict[str, dict[str, float]] = {}
    seen_rank: dict[tuple[str, int], int] = {}
    seen_doc: dict[tuple[str, str], int] = {}
    ranks: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            qid, doc, rank, score = _fields(line, path, lineno)
            if known_q is not None and qid not in known_q:
                raise InputError(f"unknown query id {qid!r} (not among the {len(known_q)} queries evaluated)",
                                 path=path, line=lineno)
            if known_d is not None and doc not in known_d:
                raise InputError(f"query {qid!r}: unknown document id {doc!r} (not in the corpus)",
                                 path=path, line=lineno)
            if (qid, doc) in seen_doc:
                raise InputError(f"query {qid!r}: document {doc!r} listed twice (first on line {seen_doc[qid, doc]})",
                                 path=path, line=lineno)
            if (qid, rank) in seen_rank:
                raise InputError(f"query {qid!r}: rank {rank} given twice (document {doc!r}; first on line "
                                 f"{seen_rank[qid, rank]})", path=path, line=lineno)
            seen_doc[qid, doc] = lineno
            seen_rank[qid, rank] = lineno
            run.setdefault(qid, {})[doc] = score
            ranks.setdefault(qid, {})[doc] = rank
    if not run:
        raise InputError("run file holds no lines", path=path)
    _warn_rank_score_disagreement(run, ranks, path)
    return {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))) for q, docs in run.items()}


def _warn_rank_score_disagreement(run: Mapping[str, Mapping[str, float]], ranks: Mapping[str, Mapping[str, int]],
                                  path: Path) -> None:
    bad = []
    for q, docs in run.items():
        by_rank = sorted(docs, key=lambda d: ranks[q][d])
        scores = [docs[d] for d in by_rank]
        if any(a < b for a, b in zip(scores, scores[1:])):
            bad.append(q)
    if bad:
        log.warning("%s: in %d queries (e.g. %r) a better rank has a lower score; documents are ordered by score, "
                    "as trec_eval does", path, len(bad), bad[0])


def write_trec_run(path: str | os.PathLike, run: Mapping[str, Mapping[str, float]], tag: str) -> Path:
    """Write ``run`` as a TREC run file, atomically: each query's documents by score descending (ties by
    id), ranks from 1. Ids and ``tag`` must not contain whitespace."""
    if not tag or any(c.isspace() for c in tag):
        raise InputError(f"run tag {tag!r} must be a non-empty word without whitespace")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for qid, docs in run.items():
                for rank, doc in enumerate(sorted(docs, key=lambda d: (-docs[d], d)), start=1):
                    for name, value in (("query", qid), ("document", doc)):
                        if not value or any(c.isspace() for c in str(value)):
                            raise InputError(f"{name} id {value!r} cannot be written to a TREC run (whitespace)",
                                             path=path)
                    fh.write(f"{qid} Q0 {doc} {rank} {float(docs[doc])!r} {tag}\n")
    return path
