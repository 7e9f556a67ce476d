"""Stage 0 (synthetic data generation): the record format shared by every backend, near-duplicate
removal, and the writer of ``<dataset>.jsonl`` + ``generation_result.json``.

One JSON record per source document (NVIDIA's SDG format)::

    {"file_name", "source_id", "text",
     "chunks": [{"chunk_id" (1-based), "text", "start", "end"}],
     "deduplicated_qa_pairs": [{"question", "answer", "query_type", "reasoning_type",
                                 "question_complexity", "segment_ids": [...], "hop_count"}],
     "qa_evaluations": {"evaluations": [{"relevance"|"accuracy"|"context_support"|"clarity":
                                          {"score": 1-10, "justification"},
                                          "overall": {"score", "assessment"}}]}}

``qa_evaluations.evaluations[i]`` judges ``deduplicated_qa_pairs[i]``. Stage 1 does not care which
backend produced the records.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import Prefixes
from rerankflow.io import iter_jsonl_numbered, read_json, write_json, write_jsonl
from rerankflow.retrieval.retriever import Retriever
from rerankflow.sdg.corpus import documents_from_config

log = logging.getLogger(__name__)

JUDGE_CRITERIA = ("relevance", "accuracy", "context_support", "clarity")
MANIFEST_NAME = "generation_result.json"


DEDUP_MAX_LENGTH = 128  # token limit of the near-duplicate filter: questions are short


def dedup_retriever(retrieval_cfg: dict, *, device: str) -> Retriever:
    """The embedder of the near-duplicate filter: ``retrieval.model`` (batch size, search block size of
    the ``retrieval`` section) comparing questions with questions, so without prefixes, at
    :data:`DEDUP_MAX_LENGTH` tokens, and without a cache (questions change every run)."""
    return Retriever(model_name=retrieval_cfg["model"], prefixes=Prefixes("", ""), max_length=DEDUP_MAX_LENGTH,
                     batch_size=int(retrieval_cfg["batch_size"]), cache_dir=None,
                     block_size=int(retrieval_cfg["search_block_size"]), device=device, index="flat")


def near_duplicate_mask(questions: Sequence[str], threshold: float, retriever: Retriever) -> np.ndarray:
    """Boolean mask of questions to keep: a question whose embedding cosine with an earlier kept
    question exceeds ``threshold`` is dropped (first occurrence wins)."""
    n = len(questions)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    emb = retriever.embed_queries(list(questions))
    scores, idx = retriever.search(emb, emb, min(n, 32))
    for i in range(n):
        for s, j in zip(scores[i], idx[i]):
            if j < 0 or j >= i or s <= threshold:
                continue
            if keep[j]:
                keep[i] = False
                break
    return keep


def apply_dedup(records: list[dict], keep: np.ndarray) -> tuple[list[dict], int]:
    """Drop the pairs (and their aligned evaluations) masked out by ``keep`` (flat over records)."""
    pos = 0
    dropped = 0
    for rec in records:
        pairs = rec["deduplicated_qa_pairs"]
        evals = rec["qa_evaluations"]["evaluations"]
        m = keep[pos:pos + len(pairs)]
        pos += len(pairs)
        rec["deduplicated_qa_pairs"] = [p for p, k in zip(pairs, m) if k]
        rec["qa_evaluations"]["evaluations"] = [e for e, k in zip(evals, m) if k]
        dropped += int((~m).sum())
    return records, dropped


def public_chunks(chunks: list[dict]) -> list[dict]:
    """Chunks as written to the record (internal keys such as ``sentences`` removed)."""
    return [{"chunk_id": c["chunk_id"], "text": c["text"], "start": c["start"], "end": c["end"]} for c in chunks]


def write_sdg_output(out_dir, dataset_name: str, records: list[dict], summary: dict) -> Path:
    """Write ``<dataset>.jsonl`` and the manifest ``generation_result.json`` (atomically, JSONL first)."""
    out_dir = Path(out_dir)
    jsonl = out_dir / f"{dataset_name}.jsonl"
    write_jsonl(jsonl, records)
    manifest = {
        "dataset_name": dataset_name,
        "output_file": jsonl.name,
        "num_documents": len(records),
        "num_qa_pairs": sum(len(r["deduplicated_qa_pairs"]) for r in records),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **summary,
    }
    write_json(out_dir / MANIFEST_NAME, manifest)
    return out_dir / MANIFEST_NAME


def validate_record(rec: dict, path, line: int) -> None:
    """Check one SDG record's shape; raise InputError naming file and line."""
    for key in ("source_id", "text", "chunks", "deduplicated_qa_pairs", "qa_evaluations"):
        if key not in rec:
            raise InputError(f"SDG record lacks '{key}'", path=path, line=line)
    ids = {c.get("chunk_id") for c in rec["chunks"]}
    pairs = rec["deduplicated_qa_pairs"]
    evals = rec["qa_evaluations"].get("evaluations", []) if isinstance(rec["qa_evaluations"], dict) else None
    if evals is None or len(evals) != len(pairs):
        raise InputError(f"qa_evaluations.evaluations has {len(evals or [])} entries for {len(pairs)} QA pairs; expected one per pair", path=path, line=line)
    for i, p in enumerate(pairs):
        if not isinstance(p.get("question"), str) or not p["question"].strip():
            raise InputError(f"QA pair {i} has no question", path=path, line=line)
        segs = p.get("segment_ids")
        if not isinstance(segs, list) or not segs:
            raise InputError(f"QA pair {i} has no segment_ids (expected a non-empty list of chunk ids)", path=path, line=line)
        unknown = [s for s in segs if s not in ids]
        if unknown:
            raise InputError(f"QA pair {i} cites segment ids {unknown} that are not chunk ids of this record", path=path, line=line)


def load_sdg_records(sdg_path) -> list[dict]:
    """Read SDG output: a stage-0 folder (its manifest names the JSONL), a manifest file, or a JSONL file."""
    p = Path(sdg_path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if p.name == MANIFEST_NAME or p.suffix == ".json":
        manifest = read_json(p)
        if "output_file" not in manifest:
            raise InputError("manifest lacks 'output_file' (the JSONL it describes)", path=p)
        p = p.parent / manifest["output_file"]
    records = []
    for line, rec in iter_jsonl_numbered(p):
        validate_record(rec, p, line)
        records.append(rec)
    if not records:
        raise InputError("SDG output holds no records", path=p)
    return records


def run_sdg(corpus_dir, out_dir, corpus_cfg: dict, sdg_cfg: dict, retrieval_cfg: dict, seed: int,
            device: str, quality_threshold: float | None = None) -> Path:
    """Stage 0 entry point: read documents, generate with the configured backend, dedupe, write.

    The manifest counts documents by outcome (``documents_by_outcome``: questions, too_short, one_sentence,
    no_usable_sentence, duplicate, and judged_low when ``quality_threshold`` (prep's) is given); when no
    document gave a usable question the stage fails here, naming the reasons, instead of leaving prep an
    empty input.

    ``corpus_cfg`` / ``sdg_cfg`` / ``retrieval_cfg``: the validated ``corpus``, ``sdg`` and ``retrieval``
    sections (``retrieval.model`` is the near-duplicate embedder). Returns the manifest path. The ``llm``
    backend lives in :mod:`rerankflow.sdg.llm`.
    """
    docs = documents_from_config(corpus_dir, corpus_cfg)
    backend = sdg_cfg["backend"]
    t0 = time.time()
    summary: dict = {"backend": backend, "seed": seed}
    if backend == "offline":
        from rerankflow.sdg.offline import generate_offline_with_outcomes

        off = sdg_cfg["offline"]
        records, outcomes, windowed = generate_offline_with_outcomes(
            docs, sdg_cfg["sentences_per_chunk"], sdg_cfg["num_pairs"], seed, off["min_question_words"], off["max_question_words"])
        summary["num_documents_cut_into_word_windows"] = windowed
    elif backend == "llm":
        from rerankflow.sdg.llm import generate_llm

        records, llm_summary = generate_llm(docs, sdg_cfg, retrieval_cfg, seed, out_dir=out_dir, device=device)
        summary["llm"] = llm_summary
        outcomes = ["questions" if r["deduplicated_qa_pairs"] else "no_questions_generated" for r in records]
    else:
        raise InputError(f"unknown backend {backend!r}; expected 'offline' or 'llm'", key="sdg.backend")
    for rec in records:
        rec["chunks"] = public_chunks(rec["chunks"])
    questions = [p["question"] for r in records for p in r["deduplicated_qa_pairs"]]
    keep = near_duplicate_mask(questions, float(sdg_cfg["similarity_threshold"]),
                               dedup_retriever(retrieval_cfg, device=device))
    records, dropped = apply_dedup(records, keep)
    outcomes = final_outcomes(records, outcomes, quality_threshold)
    by_outcome = {k: outcomes.count(k) for k in dict.fromkeys(outcomes)}
    summary.update({
        "num_generated_pairs": len(questions),
        "num_near_duplicates_dropped": dropped,
        "documents_by_outcome": by_outcome,
        "similarity_threshold": sdg_cfg["similarity_threshold"],
        "embedding_model": retrieval_cfg["model"],
        "seconds": round(time.time() - t0, 2),
    })
    log.info("SDG: %d documents, %d pairs generated, %d near-duplicates dropped; documents by outcome: %s",
             len(records), len(questions), dropped, by_outcome)
    if not by_outcome.get("questions"):
        raise InputError(nothing_usable_message(by_outcome, sdg_cfg, quality_threshold), path=corpus_dir, key="corpus.dir")
    return write_sdg_output(out_dir, sdg_cfg["dataset_name"], records, summary)


def final_outcomes(records: list[dict], outcomes: list[str], quality_threshold: float | None) -> list[str]:
    """Per document after near-duplicate removal: ``duplicate`` when all its questions were near-duplicates
    of earlier ones, ``judged_low`` (only with a ``quality_threshold``) when none of the rest is judged
    ``overall.score >= quality_threshold``; other outcomes as generated."""
    out = []
    for rec, outcome in zip(records, outcomes):
        if outcome == "questions" and not rec["deduplicated_qa_pairs"]:
            outcome = "duplicate"
        elif outcome == "questions" and quality_threshold is not None and not any(
                float(e["overall"]["score"]) >= quality_threshold for e in rec["qa_evaluations"]["evaluations"]):
            outcome = "judged_low"
        out.append(outcome)
    return out


OUTCOME_HELP = {
    "too_short": "too short: fewer words than two questions need (sdg.offline.min_question_words x 2)",
    "one_sentence": "one sentence and too few words to cut into word windows",
    "no_usable_sentence": "no sentence of sdg.offline.min_question_words..max_question_words words beside another in a chunk",
    "duplicate": "every question a near-duplicate of an earlier one (sdg.similarity_threshold)",
    "judged_low": "every question judged below prep.quality_threshold",
    "no_questions_generated": "the LLM returned no usable question (see the llm summary and the rule's log)",
}


def nothing_usable_message(by_outcome: dict, sdg_cfg: dict, quality_threshold: float | None) -> str:
    """Why stage 0 produced nothing a later stage can use, the commonest reason first."""
    total = sum(by_outcome.values())
    reasons = sorted(by_outcome.items(), key=lambda kv: -kv[1])
    parts = [f"{n} {OUTCOME_HELP.get(k, k)}" for k, n in reasons]
    off = sdg_cfg["offline"]
    return (f"stage 0 made no usable question from the {total} documents of the corpus: " + "; ".join(parts)
            + f" (sdg.backend={sdg_cfg['backend']}, sentences_per_chunk={sdg_cfg['sentences_per_chunk']}, "
              f"question words {off['min_question_words']}..{off['max_question_words']}). Use longer documents of prose, "
              "or a labelled BEIR folder (prep.input_beir)")
