"""Stage 3's inputs: the eval BEIR folder (BEIR's conventions) and the first-stage run over it.

* :func:`load_eval_data`: ``qrels/test.tsv`` of the eval folder; qrels targets missing from the corpus are
  kept, as BEIR keeps them (they count as relevant documents no system retrieves), and reported as a
  warning with their count (``counts["qrels_targets_missing_from_corpus"]``, recorded in the results' meta).
* :func:`run_first_stage`: the :class:`~rerankflow.retrieval.first_stage.FirstStage` of the ``retrieval``
  section; with ``eval.ignore_identical_ids`` a retrieved document whose id equals the query id is dropped
  (BEIR's and MTEB's convention; ArguAna's queries are corpus documents) before the rerankers see the
  candidates, so it is missing from every run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rerankflow.beir import load_beir, load_query_metadata, missing_corpus_targets
from rerankflow.errors import InputError
from rerankflow.eval.config import candidate_depth
from rerankflow.eval.metrics import drop_identical_ids, evaluable_qrels, rank_documents
from rerankflow.models import resolve_model_path
from rerankflow.retrieval.first_stage import FirstStage

log = logging.getLogger(__name__)


def top_candidates(run: dict, k: int) -> dict:
    """The ``k`` best-scored documents of every query of ``run`` (trec_eval order)."""
    return {qid: {d: docs[d] for d in rank_documents(docs)[:k]} for qid, docs in run.items()}


def run_first_stage(data: dict, cfg: dict, retrieval_cfg: dict, device: str) -> dict:
    """The first stage over ``data`` (see module docstring): the evaluation's state ``ev`` with the
    ``first_stage`` run, its timings, the rerankers' ``candidates``, what ran (``first_stage``) and ``models``."""
    first_stage = FirstStage.from_config(retrieval_cfg, device=device, search=cfg, model_name=cfg["retrieval_model"])
    first_run, fs_info = first_stage.retrieve(data["corpus"], data["queries"], candidate_depth(cfg))
    dropped = 0
    if cfg["ignore_identical_ids"]:
        first_run, dropped = drop_identical_ids(first_run)
    dense = first_stage.retriever
    ev = {"runs": {"first_stage": first_run}, "timings": {"first_stage": fs_info}, "errors": {},
          "candidates": top_candidates(first_run, cfg["top_k"]),  # what the rerankers rescore
          "first_stage": {**first_stage.settings(), "ignore_identical_ids": bool(cfg["ignore_identical_ids"]),
                          "identical_ids_dropped": dropped},
          "models": {"retrieval_model": dense.model_name if dense else None,
                     "retrieval_model_path": resolve_model_path(dense.model_name) if dense else None}}
    return ev


def load_eval_data(data_dir: Path) -> dict:
    """The BEIR eval folder (``qrels/test.tsv``): ``corpus``, evaluable ``queries`` / ``qrels``,
    per-query ``meta``data and ``counts``."""
    corpus, queries, qrels = load_beir(data_dir, split="test", missing_docs_ok=True)
    missing = missing_corpus_targets(qrels, corpus)
    if missing:
        log.warning("%s: %d qrels targets are not in the corpus (e.g. query %r -> document %r); kept, as BEIR does, "
                    "so they count as relevant documents no system can retrieve", data_dir / "qrels" / "test.tsv",
                    len(missing), *missing[0])
    query_meta = load_query_metadata(data_dir)
    eval_qrels = evaluable_qrels(qrels)
    if not eval_qrels:
        raise InputError("no query in qrels/test.tsv has a relevant (score >= 1) document", path=data_dir / "qrels" / "test.tsv")
    counts = {
        "corpus": len(corpus),
        "queries_in_qrels": len(qrels),
        "queries_evaluated": len(eval_qrels),
        "queries_without_relevant": len(qrels) - len(eval_qrels),
        "qrels_pairs": sum(len(d) for d in qrels.values()),
        "relevant_pairs": sum(1 for d in eval_qrels.values() for s in d.values() if s >= 1),
        "queries_with_metadata": sum(1 for q in eval_qrels if q in query_meta),
        "qrels_targets_missing_from_corpus": len(missing),
    }
    log.info("eval data %s: %s", data_dir, counts)
    return {"dir": data_dir, "corpus": corpus, "queries": {q: queries[q] for q in eval_qrels}, "qrels": eval_qrels,
            "meta": query_meta, "counts": counts}
