"""The first-stage choice of the ``retrieval`` section: dense, BM25, a fusion of them, or the user's own run.

:class:`FirstStage` is what every stage that needs candidates asks (the eval first stage, export's
candidate pairs). Built from the validated ``retrieval`` section by :meth:`FirstStage.from_config`;
:meth:`FirstStage.retrieve` returns ``(run, info)`` with ``run[qid][doc_id] = score``, best first, at
most ``top_k`` documents per query, for every asked query:

* ``dense``: :meth:`rerankflow.retrieval.retriever.Retriever.retrieve` (the bi-encoder ``retrieval.model``,
  its embedding cache and search index), exactly as before this choice existed;
* ``bm25``: :func:`rerankflow.retrieval.bm25.bm25_retrieve` with ``retrieval.bm25``, the index cached under
  ``retrieval.cache_dir``;
* ``hybrid``: every source of ``retrieval.hybrid.sources`` retrieves ``top_k``; the runs are fused by
  :func:`~rerankflow.retrieval.fusion.reciprocal_rank_fusion` (``rrf_k``) or
  :func:`~rerankflow.retrieval.fusion.convex_fusion` (``weights``, in the order of ``sources``) and cut to ``top_k``;
* ``run``: :func:`rerankflow.retrieval.trec_run.read_trec_run` of ``retrieval.run_file`` (document ids checked
  against the corpus), restricted to the asked queries and cut to ``top_k``; an asked query missing from the
  file is an :class:`~rerankflow.errors.InputError` naming the file and the query id.

``info["first_stage"]`` names the kind that ran; its timings are ``total_s`` plus each part's own
(a dense part keeps the Retriever's keys at the top level, a hybrid lists its ``sources``).
:func:`check_first_stage_config` is the cross-key check of the section (the Snakefile calls it at parse time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from rerankflow.errors import InputError
from rerankflow.io import sha256_file
from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve
from rerankflow.retrieval.fusion import check_weights, convex_fusion, reciprocal_rank_fusion, truncate
from rerankflow.retrieval.retriever import Retriever
from rerankflow.retrieval.trec_run import read_trec_run

log = logging.getLogger(__name__)

KINDS = ("dense", "bm25", "hybrid", "run")
SOURCES = ("dense", "bm25", "run")
METHODS = ("rrf", "convex")


def used_sources(retrieval: Mapping) -> list[str]:
    """The single first stages the section's choice runs (a hybrid's sources, else the kind itself)."""
    kind = retrieval["first_stage"]
    if kind == "hybrid":
        return list(retrieval["hybrid"]["sources"])
    return [kind]


def check_first_stage_config(retrieval: Mapping) -> None:
    """Cross-key checks of a validated ``retrieval`` section; raise :class:`InputError` naming the key."""
    kind = retrieval["first_stage"]
    if kind not in KINDS:
        raise InputError(f"must be one of {', '.join(KINDS)}, got {kind!r}", key="retrieval.first_stage")
    if kind == "hybrid":
        hybrid = retrieval["hybrid"]
        sources = list(hybrid["sources"])
        bad = [s for s in sources if s not in SOURCES]
        if bad or len(sources) < 2 or len(set(sources)) != len(sources):
            raise InputError(f"need two or more distinct sources of {', '.join(SOURCES)}, got {sources}",
                             key="retrieval.hybrid.sources")
        if hybrid["method"] not in METHODS:
            raise InputError(f"must be one of {', '.join(METHODS)}, got {hybrid['method']!r}", key="retrieval.hybrid.method")
        if hybrid["method"] == "convex":
            if hybrid["weights"] is None:
                raise InputError(f"method convex needs one weight per source ({', '.join(sources)}), summing to 1",
                                 key="retrieval.hybrid.weights")
            check_weights(hybrid["weights"], len(sources))
        elif not float(hybrid["rrf_k"]) >= 0:
            raise InputError(f"must be >= 0, got {hybrid['rrf_k']!r}", key="retrieval.hybrid.rrf_k")
    sources = used_sources(retrieval)
    if "run" in sources:
        run_file = retrieval["run_file"]
        where = "first_stage run" if kind == "run" else "hybrid.sources lists run"
        if not run_file:
            raise InputError(f"{where}: give the TREC run file of your retriever", key="retrieval.run_file")
        if not Path(run_file).is_file():
            raise InputError(f"{where}: run file {run_file} not found", key="retrieval.run_file")
    if "bm25" in sources:
        BM25Settings.from_config(retrieval["bm25"])  # unknown stemmer / stopword list, k1, b


@dataclass
class FirstStage:
    """The first stage of a validated ``retrieval`` section (see module docstring)."""

    kind: str
    sources: tuple[str, ...]
    retriever: Retriever | None = field(default=None, repr=False)
    bm25: BM25Settings | None = None
    cache_dir: str | None = None
    run_file: str | None = None
    method: str | None = None
    rrf_k: float | None = None
    weights: list[float] | None = None

    @classmethod
    def from_config(cls, retrieval: Mapping, *, device: str, search: Mapping | None = None,
                    model_name: str | None = None) -> "FirstStage":
        """The first stage of the ``retrieval`` section; ``device``, ``search`` and ``model_name`` go to the
        dense :class:`Retriever` (see :meth:`Retriever.from_config`) when a dense source is used."""
        check_first_stage_config(retrieval)
        sources = tuple(used_sources(retrieval))
        hybrid = retrieval["hybrid"] if retrieval["first_stage"] == "hybrid" else None
        return cls(
            kind=retrieval["first_stage"],
            sources=sources,
            retriever=Retriever.from_config(retrieval, device=device, search=search, model_name=model_name)
            if "dense" in sources else None,
            bm25=BM25Settings.from_config(retrieval["bm25"]) if "bm25" in sources else None,
            cache_dir=retrieval["cache_dir"],
            run_file=retrieval["run_file"] if "run" in sources else None,
            method=hybrid["method"] if hybrid else None,
            rrf_k=float(hybrid["rrf_k"]) if hybrid else None,
            weights=[float(w) for w in hybrid["weights"]] if hybrid and hybrid["method"] == "convex" else None,
        )

    def settings(self) -> dict:
        """What this first stage is, for results' meta (kind and the settings its run depends on)."""
        out: dict = {"kind": self.kind}
        if self.retriever is not None:
            r = self.retriever
            out["dense"] = {"model": r.model_name, "query_prefix": r.prefixes.query_prefix,
                            "passage_prefix": r.prefixes.passage_prefix, "max_length": r.max_length, "index": r.index,
                            "precision": "bf16" if r.bf16 else "fp32"}
        if self.bm25 is not None:
            out["bm25"] = {"k1": self.bm25.k1, "b": self.bm25.b, "stemmer": self.bm25.stemmer,
                           "stopwords": self.bm25.stopwords}
        if self.run_file is not None:
            out["run"] = {"run_file": str(self.run_file), "sha256": sha256_file(self.run_file)}
        if self.kind == "hybrid":
            out["hybrid"] = {"sources": list(self.sources), "method": self.method,
                             **({"rrf_k": self.rrf_k} if self.method == "rrf" else {"weights": self.weights})}
        return out

    def retrieve(self, corpus: Mapping[str, dict], queries: Mapping[str, str],
                 top_k: int) -> tuple[dict[str, dict[str, float]], dict]:
        """``(run, info)``: the ``top_k`` first-stage documents of every query of ``queries`` (module docstring)."""
        if not corpus:
            raise InputError("the corpus to retrieve from is empty")
        if int(top_k) < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}", key="eval.top_k")
        t0 = time.perf_counter()
        if self.kind != "hybrid":
            run, info = self._single(self.kind, corpus, queries, top_k)
        else:
            runs, parts = [], {}
            for source in self.sources:
                r, parts[source] = self._single(source, corpus, queries, top_k)
                runs.append(r)
            t1 = time.perf_counter()
            fused = (reciprocal_rank_fusion(runs, self.rrf_k) if self.method == "rrf"
                     else convex_fusion(runs, self.weights))
            run = truncate(fused, top_k)
            info = {"sources": parts, "fusion": self.method, "fusion_s": round(time.perf_counter() - t1, 3)}
        run = {q: run.get(q, {}) for q in queries}
        info = {**info, "first_stage": self.kind, "total_s": round(time.perf_counter() - t0, 3)}
        log.info("first stage %s: %d queries x top %d in %.1fs", self.kind, len(queries), top_k, info["total_s"])
        return run, info

    def _single(self, source: str, corpus, queries, top_k) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        if source == "dense":
            run, info = self.retriever.retrieve(corpus, queries, top_k)
        elif source == "bm25":
            run, info = bm25_retrieve(corpus, queries, top_k, self.bm25, self.cache_dir)
        else:
            run, info = self._from_run_file(corpus, queries, top_k)
        info = {**info, "first_stage": source, "total_s": round(time.perf_counter() - t0, 3)}
        return run, info

    def _from_run_file(self, corpus, queries, top_k) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        full = read_trec_run(self.run_file, None, corpus)
        missing = [q for q in queries if q not in full]
        if missing:
            raise InputError(f"{len(missing)} of the {len(queries)} queries asked are not in the run file "
                             f"(first: query id {missing[0]!r}); the run must cover every evaluated query",
                             path=self.run_file)
        run = truncate({q: full[q] for q in queries}, top_k)
        return run, {"run_file": str(self.run_file), "queries_in_file": len(full), "queries": len(queries),
                     "read_s": round(time.perf_counter() - t0, 3)}


def first_query_candidates(eval_dir, retrieval: Mapping, top_k: int, *, device: str) -> tuple[str, dict[str, float]]:
    """``(query id, {doc id: first-stage score})``: the first stage's top ``top_k`` for the first judged query
    of the BEIR folder ``eval_dir`` (``qrels/test.tsv``), best first. What the deploy smoke request sends."""
    from rerankflow.beir import load_beir

    corpus, queries, _ = load_beir(eval_dir, missing_docs_ok=True)
    if not queries:
        raise InputError("no query with relevance judgements; cannot build a smoke request", path=eval_dir)
    qid = next(iter(queries))
    run, _ = FirstStage.from_config(retrieval, device=device).retrieve(corpus, {qid: queries[qid]}, min(int(top_k), len(corpus)))
    return qid, run[qid]
