"""Reading and writing BEIR-layout folders exactly as BEIR's ``GenericDataLoader`` reads them.

Layout: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``,
optional ``metadata``), ``qrels/<split>.tsv`` with the header ``query-id\tcorpus-id\tscore``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rerankflow.errors import InputError
from rerankflow.io import atomic_path, iter_jsonl_numbered, write_jsonl

QRELS_HEADER = "query-id\tcorpus-id\tscore"


def passage_text(doc: dict) -> str:
    """The passage a model reads for a BEIR corpus entry: ``title + " " + text``, stripped."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def load_corpus(path) -> dict[str, dict]:
    corpus: dict[str, dict] = {}
    for lineno, row in iter_jsonl_numbered(path):
        if "_id" not in row or "text" not in row:
            raise InputError("corpus row needs '_id' and 'text'", path=path, line=lineno)
        corpus[str(row["_id"])] = {"title": row.get("title") or "", "text": row["text"]}
    return corpus


def load_queries(path) -> tuple[dict[str, str], dict[str, dict]]:
    """Return ``(queries, metadata)``; metadata holds a query's ``metadata`` object when present."""
    queries: dict[str, str] = {}
    meta: dict[str, dict] = {}
    for lineno, row in iter_jsonl_numbered(path):
        if "_id" not in row or "text" not in row:
            raise InputError("query row needs '_id' and 'text'", path=path, line=lineno)
        qid = str(row["_id"])
        queries[qid] = row["text"]
        if isinstance(row.get("metadata"), dict) and row["metadata"]:
            meta[qid] = row["metadata"]
    return queries, meta


def load_qrels(path) -> dict[str, dict[str, int]]:
    """Read a qrels TSV (header ``query-id corpus-id score``); bad lines name file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError("qrels file not found", path=path)
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if lineno == 1 and parts[0] == "query-id":
                continue
            if len(parts) != 3:
                raise InputError(f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}", path=path, line=lineno)
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise InputError(f"score {parts[2]!r} is not a number", path=path, line=lineno) from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def load_beir(data_dir, split: str = "test", *, check_ids: bool = True, missing_docs_ok: bool = False):
    """Load ``(corpus, queries, qrels)`` of one split; with ``check_ids`` unknown ids raise.

    Only queries that appear in the split's qrels are returned, as BEIR does. ``missing_docs_ok``: a qrels
    target missing from the corpus is kept, not an error (BEIR's own loader keeps them; count them with
    :func:`missing_corpus_targets`); an unknown query id still raises.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError("BEIR folder not found (expected corpus.jsonl, queries.jsonl, qrels/<split>.tsv)", path=data_dir)
    corpus = load_corpus(data_dir / "corpus.jsonl")
    queries, _meta = load_queries(data_dir / "queries.jsonl")
    qrels_path = data_dir / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qrels_path)
    if check_ids:
        check_qrels(qrels, corpus, queries, qrels_path, check_docs=not missing_docs_ok)
    queries = {qid: queries[qid] for qid in qrels if qid in queries}
    return corpus, queries, qrels


def load_query_metadata(data_dir) -> dict[str, dict]:
    return load_queries(Path(data_dir) / "queries.jsonl")[1]


def qrels_line(path, qid: str, did: str | None = None) -> int | None:
    """The line number of the first qrels line of ``qid`` (and ``did`` when given), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                parts = line.rstrip("\n\r").split("\t")
                if len(parts) == 3 and parts[0] == qid and (did is None or parts[1] == did):
                    return lineno
    except OSError:
        return None
    return None


def check_qrels(qrels, corpus, queries, qrels_path, *, check_docs: bool = True) -> None:
    """Raise when a qrels line names a query (or, with ``check_docs``, a document) that does not exist; the
    error names the file and line (``qrels/train.tsv:LINE: ...``)."""
    for qid, docs in qrels.items():
        if qid not in queries:
            raise InputError(f"qrels names query id {qid!r}, which is not in queries.jsonl", path=qrels_path,
                             line=qrels_line(qrels_path, qid))
        for did in docs if check_docs else ():
            if did not in corpus:
                raise InputError(f"qrels names corpus id {did!r} (query {qid!r}), which is not in corpus.jsonl",
                                 path=qrels_path, line=qrels_line(qrels_path, qid, did))


def missing_corpus_targets(qrels, corpus) -> list[tuple[str, str]]:
    """``(query id, document id)`` of every qrels line whose document is not in the corpus, in qrels order."""
    return [(qid, did) for qid, docs in qrels.items() for did in docs if did not in corpus]


def write_beir(data_dir, corpus: dict, queries: dict, qrels: dict, split: str = "test", query_meta: dict | None = None) -> Path:
    """Write a BEIR folder atomically (the whole folder appears at once)."""
    data_dir = Path(data_dir)
    with atomic_path(data_dir, is_dir=True) as tmp:
        write_jsonl(tmp / "corpus.jsonl", ({"_id": did, "title": d.get("title", ""), "text": d["text"]} for did, d in corpus.items()))
        rows = []
        for qid, text in queries.items():
            row = {"_id": qid, "text": text}
            if query_meta and query_meta.get(qid):
                row["metadata"] = query_meta[qid]
            rows.append(row)
        write_jsonl(tmp / "queries.jsonl", rows)
        os.makedirs(tmp / "qrels", exist_ok=True)
        with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
            fh.write(QRELS_HEADER + "\n")
            for qid, docs in qrels.items():
                for did, score in docs.items():
                    fh.write(f"{qid}\t{did}\t{int(score)}\n")
    return data_dir
