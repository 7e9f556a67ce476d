"""Stage 1 (prep): from SDG records or a labelled BEIR folder to training and evaluation data.

Steps (SPEC.md, stage 1):

1. keep QA pairs whose judge ``overall.score >= quality_threshold``;
2. split by *source document* (seeded) into train/val/test, so no document feeds two splits
   (BEIR input: train/val from ``qrels/train.tsv`` split by query, test from ``qrels/test.tsv``);
3. build the passage corpus, deduplicated by text, ids ``d_<sha256(text)[:16]>`` (BEIR input keeps
   its own ids);
4. mine hard negatives for train and val queries from the first stage ``retrieval.first_stage``
   (:mod:`rerankflow.prep.mining`); passages of the test split are never negatives, and train queries
   never get val passages as negatives; list each val query's top ``val_candidates`` first-stage
   candidates (with scores) in its ``val.json`` record, so stage 2 validates as stage 3 tests;
5. write ``train.json`` (records without negatives), ``val.json``, ``corpus/train.parquet``,
   ``train_mined.automodel.json`` (negatives), ``train_mined.automodel_unrolled.json`` (one record per
   positive), the validation file ``val_mined.automodel.json`` and ``eval_beir/`` for the test split.

Training record: ``{question_id, question, corpus_id, pos_doc: [{id, score}], neg_doc: [{id, score}]}``
under ``{"corpus": {"path": <parquet>}, "data": [...]}``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from rerankflow.beir import check_qrels, load_corpus, load_qrels, load_queries, passage_text, write_beir
from rerankflow.errors import InputError
from rerankflow.io import atomic_path, sha256_text, write_json
from rerankflow.prep.mining import (mine_from_first_stage, mine_hard_negatives, mix_first_stage, teacher_denoise,
                                    teacher_scores)
from rerankflow.retrieval.first_stage import FirstStage
from rerankflow.sdg.run import load_sdg_records

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class PrepData:
    """Everything stage 1 knows before mining."""

    passages: dict[str, dict] = field(default_factory=dict)  # id -> {"title", "text"}
    passage_splits: dict[str, set] = field(default_factory=dict)  # id -> splits whose documents hold it
    queries: list[dict] = field(default_factory=list)  # {qid, question, split, positives, metadata}
    stats: dict = field(default_factory=dict)


def passage_id(text: str) -> str:
    """Content-addressed passage id: ``d_`` + first 16 hex of sha256(text)."""
    return "d_" + sha256_text(text)[:16]


def split_documents(source_ids: list[str], train_ratio: float, val_ratio: float, test_ratio: float,
                    seed: int) -> dict[str, str]:
    """Assign each source document to one split, seeded; ratios are normalised to sum to 1."""
    total = train_ratio + val_ratio + test_ratio
    if total <= 0:
        raise InputError("train_ratio + val_ratio + test_ratio must be > 0", key="prep.train_ratio")
    ids = sorted(set(source_ids))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_test = round(n * test_ratio / total)
    n_val = round(n * val_ratio / total)
    if test_ratio > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if val_ratio > 0 and n_val == 0 and n - n_test >= 3:
        n_val = 1
    assign = {}
    for i, sid in enumerate(ids):
        assign[sid] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return assign


def from_sdg(sdg_path, quality_threshold: float, ratios: tuple[float, float, float], seed: int) -> PrepData:
    """Collect passages and judged-good queries from SDG output, split by source document."""
    records = load_sdg_records(sdg_path)
    split_of = split_documents([r["source_id"] for r in records], *ratios, seed=seed)
    data = PrepData()
    total = kept = 0
    for rec in records:
        split = split_of[rec["source_id"]]
        chunk_pid = {}
        for ch in rec["chunks"]:
            text = ch["text"].strip()
            if not text:
                continue
            pid = passage_id(text)
            chunk_pid[ch["chunk_id"]] = pid
            data.passages.setdefault(pid, {"title": "", "text": text})
            data.passage_splits.setdefault(pid, set()).add(split)
        for i, (pair, ev) in enumerate(zip(rec["deduplicated_qa_pairs"], rec["qa_evaluations"]["evaluations"])):
            total += 1
            score = float((ev.get("overall") or {}).get("score", 0))
            if score < quality_threshold:
                continue
            pos = list(dict.fromkeys(chunk_pid[s] for s in pair["segment_ids"] if s in chunk_pid))
            if not pos:
                continue
            kept += 1
            qid = "q_" + sha256_text(f"{rec['source_id']}\x00{i}\x00{pair['question']}")[:16]
            data.queries.append({
                "qid": qid, "question": pair["question"], "split": split, "positives": pos,
                "source_id": rec["source_id"],
                "metadata": {k: pair[k] for k in ("query_type", "reasoning_type", "question_complexity", "hop_count") if k in pair},
            })
    data.stats = {"source": "sdg", "documents": len(records), "qa_pairs": total, "qa_pairs_kept": kept,
                  "quality_threshold": quality_threshold,
                  "documents_per_split": {s: sum(1 for v in split_of.values() if v == s) for s in SPLITS}}
    return data


def from_beir(beir_dir, val_ratio: float, seed: int) -> PrepData:
    """Labelled BEIR folder: ``qrels/train.tsv`` -> train (+ a seeded val slice), ``qrels/test.tsv`` -> test."""
    beir_dir = Path(beir_dir)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        if not (beir_dir / rel).exists():
            raise InputError(f"labelled BEIR folder lacks {rel} (expected corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv)",
                             path=beir_dir, key="prep.input_beir")
    corpus = load_corpus(beir_dir / "corpus.jsonl")
    queries, meta = load_queries(beir_dir / "queries.jsonl")
    data = PrepData()
    for did, doc in corpus.items():
        data.passages[did] = {"title": doc.get("title", ""), "text": doc["text"]}
        data.passage_splits[did] = set()
    splits = {}
    for split_name in ("train", "test"):
        path = beir_dir / "qrels" / f"{split_name}.tsv"
        qrels = load_qrels(path)
        check_qrels(qrels, corpus, queries, path)
        splits[split_name] = qrels
    train_qids = sorted(splits["train"])
    random.Random(seed).shuffle(train_qids)
    n_val = round(len(train_qids) * val_ratio)
    val_set = set(train_qids[:n_val])
    for split_name, qrels in (("train", splits["train"]), ("test", splits["test"])):
        for qid, docs in qrels.items():
            pos = [d for d, s in docs.items() if s > 0]
            if not pos:
                continue
            split = "val" if (split_name == "train" and qid in val_set) else split_name
            for d in pos:
                data.passage_splits[d].add(split)
            data.queries.append({"qid": qid, "question": queries[qid], "split": split, "positives": pos,
                                 "metadata": meta.get(qid, {})})
    data.stats = {"source": "beir", "beir_dir": str(beir_dir), "corpus": len(corpus),
                  "train_qrels_queries": len(splits["train"]), "test_qrels_queries": len(splits["test"])}
    return data


def _allowed_for(split: str, passage_splits: list[set]):
    """Negatives of a train query come from passages of train documents (or unlabelled ones); of a
    val query, from anything but test. Test passages are never negatives."""
    if split == "train":
        return lambda i: not (passage_splits[i] & {"test", "val"})
    return lambda i: "test" not in passage_splits[i]


def _check_splits(by_split: dict) -> list[str]:
    """Refuse empty train/test splits; return (and log) the warnings about small splits.

    (Too few mined negatives for ``finetune.train_n_passages`` is a config-level warning:
    :func:`rerankflow.config.config_warnings`, shown when the workflow is parsed.)"""
    if not by_split["train"]:
        raise InputError("no training query survived the quality filter and split; lower prep.quality_threshold, "
                         "raise sdg.num_pairs or give a larger corpus", key="prep.quality_threshold")
    if not by_split["test"]:
        raise InputError("the test split is empty, so stage 3 would have nothing to evaluate; raise prep.test_ratio "
                         "or give more documents", key="prep.test_ratio")
    warnings = []
    if len(by_split["train"]) < 100:
        warnings.append(f"only {len(by_split['train'])} training queries: fine-tuning will be noisy (aim for 500+)")
    if len(by_split["test"]) < 30:
        warnings.append(f"only {len(by_split['test'])} test queries: evaluation confidence intervals will be wide")
    for w in warnings:
        log.warning(w)
    return warnings


def _write_training_files(out_dir: Path, mine_q: list[dict], mined, pids: list[str], texts: list[str],
                          psplits: list[set], val_candidates: dict,
                          teacher_logits: list[dict[int, float]] | None = None) -> tuple[list[str], list[dict]]:
    """Write the corpus parquet, train.json, val.json and the mined (and unrolled) training files.

    ``val_candidates``: ``{val qid: {passage id: first-stage score}}``, written into each val record as
    ``candidates`` (first-stage order). ``teacher_logits``: per query, passage index -> teacher logit; a
    training record's ``pos_doc`` / ``neg_doc`` entries then carry it as ``"teacher"``. Returns the passage
    ids of the training corpus and the unrolled records."""
    index_of = {p: i for i, p in enumerate(pids)}
    parquet = (out_dir / "corpus" / "train.parquet").resolve()
    referenced = set()
    records = {"train": [], "val": []}
    for qi, (q, pos, neg) in enumerate(zip(mine_q, mined.positives, mined.negatives)):
        teach = teacher_logits[qi] if teacher_logits is not None and q["split"] == "train" else {}

        def entry(i, s, teach=teach):
            return {"id": pids[i], "score": round(s, 6), **({"teacher": round(teach[i], 5)} if i in teach else {})}

        rec = {
            "question_id": q["qid"], "question": q["question"], "corpus_id": "train",
            "pos_doc": [entry(i, s) for i, s in pos],
            "neg_doc": [entry(i, s) for i, s in neg],
        }
        if q.get("metadata"):
            rec["metadata"] = q["metadata"]
        if q["split"] == "val" and q["qid"] in val_candidates:
            rec["candidates"] = [{"id": d, "score": round(s, 6)} for d, s in val_candidates[q["qid"]].items()]
        referenced.update(d["id"] for d in rec["pos_doc"] + rec["neg_doc"])
        referenced.update(d for d in val_candidates.get(q["qid"], ()) if q["split"] == "val")
        records[q["split"]].append(rec)

    def wrap(recs):
        return {"corpus": {"path": str(parquet)}, "data": recs}

    unrolled = []
    for rec in records["train"]:
        for i, pos in enumerate(rec["pos_doc"]):
            unrolled.append({**rec, "question_id": f"{rec['question_id']}_{i}", "pos_doc": [pos]})

    train_pids = [p for i, p in enumerate(pids) if p in referenced or "test" not in psplits[i]]
    _write_parquet(parquet, train_pids, [texts[index_of[p]] for p in train_pids])
    write_json(out_dir / "train.json", wrap([{k: v for k, v in r.items() if k != "neg_doc"} for r in records["train"]]))
    write_json(out_dir / "val.json", wrap(records["val"]))
    write_json(out_dir / "train_mined.automodel.json", wrap(records["train"]))
    write_json(out_dir / "train_mined.automodel_unrolled.json", wrap(unrolled))
    return train_pids, unrolled


def _teacher_scorer(teacher: dict, batch_size: int, device: str, precision: str):
    """``score_pairs(pairs, desc)`` with the teacher cross-encoder (its ``from_cache`` attribute counts the pairs
    the score cache answered), built like stage 3 builds the base's scorer
    (its input format, the prompt template and max_length of ``reranker``), in ``precision`` (fp32 or bf16).

    With ``teacher["score_cache_dir"]`` (stage 3's score cache, ``eval.score_cache_dir``) scores are looked
    up there first under the scorer's identity (:mod:`rerankflow.scoring.score_cache`: checkpoint content,
    input format, max length, scoring path), and the model is loaded only when some pair is missing; so a
    second prep over the same pairs (another ``teacher_first_stage_weight``, another fine-tune setting that
    re-runs prep) scores nothing again."""
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer
    from rerankflow.scoring.score_cache import ScoreCache, cached_score, scorer_identity

    loaded = {}

    def make_scorer():
        if "scorer" not in loaded:
            loaded["scorer"] = CrossEncoderScorer(
                teacher["model"], max_length=int(teacher["max_length"]), template=teacher["prompt_template"],
                device=device, bf16=precision == "bf16", batch_size=int(batch_size), input_format=teacher["input_format"])
        return loaded["scorer"]

    cache = None
    if teacher.get("score_cache_dir"):
        path = "torch_bf16" if precision == "bf16" else "torch_fp32"
        ident = scorer_identity(teacher["model"], input_format=teacher["input_format"],
                                template=teacher["prompt_template"], max_length=int(teacher["max_length"]),
                                scoring_path=path)
        cache = ScoreCache(teacher["score_cache_dir"], ident, {"checkpoint": str(teacher["model"]), "scoring_path": path,
                                                              "input_format": teacher["input_format"],
                                                              "max_length": int(teacher["max_length"])})
    def score_pairs(pairs, desc):
        scores, info = cached_score(pairs, cache, make_scorer, sort_by_length=True, desc=desc)
        score_pairs.from_cache += info["cached_pairs"]
        return scores

    score_pairs.from_cache = 0  # pairs answered by the score cache so far
    return score_pairs


def run_prep(out_dir, prep_cfg: dict, retrieval_cfg: dict, *, seed: int, sdg_path=None, device: str,
             val_candidates: int, teacher: dict | None = None) -> dict:
    """Stage 1 entry point; returns the summary also written to ``prep_summary.json``.

    ``prep_cfg`` / ``retrieval_cfg``: the validated ``prep`` and ``retrieval`` sections: negatives are mined
    from the first stage ``retrieval.first_stage`` (dense embeds with ``prep.mining_batch_size``);
    ``sdg_path``: stage 0's output, unless ``prep.input_beir`` is set. ``val_candidates``: how many
    first-stage candidates of each val query ``val.json`` lists (stage 3's ``eval.top_k``, so stage 2
    validates exactly as stage 3 tests); 0 lists none (validation then ranks positives + mined negatives).

    ``prep.teacher_denoise``: a cross-encoder ``teacher`` (``{"model": checkpoint, "input_format",
    "prompt_template", "max_length"}``, resolved by the rule) drops mined candidates it scores above the
    query's lowest positive minus ``prep.teacher_margin`` (:func:`rerankflow.prep.mining.teacher_denoise`).
    ``prep.teacher_scores`` (set by the rule when ``finetune.loss`` is ``distill``): the same teacher scores
    every positive and negative of the training records, written as ``"teacher"`` in each ``pos_doc`` /
    ``neg_doc`` entry (:func:`rerankflow.prep.mining.teacher_scores`), the targets stage 2 distils;
    ``prep.teacher_first_stage_weight`` > 0 mixes the first stage's scores into them
    (:func:`rerankflow.prep.mining.mix_first_stage`).
    ``prep.negative_range_min``: the first N first-stage ranks (positives removed) are never negatives.
    The rule leaves these keys out of ``prep_cfg`` while they are off (false / 0), so existing outputs are
    not re-run: absent means off, today's behaviour.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    ratios = (float(prep_cfg["train_ratio"]), float(prep_cfg["val_ratio"]), float(prep_cfg["test_ratio"]))
    if prep_cfg.get("input_beir"):
        data = from_beir(prep_cfg["input_beir"], ratios[1] / max(1e-9, ratios[0] + ratios[1]), seed)
    else:
        if sdg_path is None:
            raise InputError("no SDG output given and prep.input_beir is not set", key="prep.input_beir")
        data = from_sdg(sdg_path, float(prep_cfg["quality_threshold"]), ratios, seed)

    by_split = {s: [q for q in data.queries if q["split"] == s] for s in SPLITS}
    n_neg = int(prep_cfg["hard_negatives_to_mine"])
    warnings = _check_splits(by_split)

    pids = list(data.passages)
    texts = [passage_text(data.passages[p]) for p in pids]
    index_of = {p: i for i, p in enumerate(pids)}
    psplits = [data.passage_splits.get(p, set()) for p in pids]
    mine_q = by_split["train"] + by_split["val"]
    t_mine = time.time()
    first_stage = FirstStage.from_config({**retrieval_cfg, "batch_size": prep_cfg["mining_batch_size"]}, device=device)
    denoise = bool(prep_cfg.get("teacher_denoise"))
    if denoise and not teacher:
        raise InputError("prep.teacher_denoise is true but no teacher model was given", key="prep.teacher_denoise")
    distill = bool(prep_cfg.get("teacher_scores"))
    if distill and not teacher:
        raise InputError("finetune.loss is distill but prep was given no teacher model", key="finetune.loss")
    precision = prep_cfg.get("teacher_precision")  # present with every teacher key (the rule drops them together)
    score_pairs = _teacher_scorer(teacher, prep_cfg["teacher_batch_size"], device, precision) if teacher else None
    skip = int(prep_cfg.get("negative_range_min") or 0)
    mining_args = dict(num_negatives=n_neg, margin=float(prep_cfg["hard_neg_margin"]), depth=int(prep_cfg["mining_depth"]),
                       skip=skip, keep_all=denoise)
    mine_args = ([q["question"] for q in mine_q], [[index_of[p] for p in q["positives"]] for q in mine_q],
                 pids, texts, [_allowed_for(q["split"], psplits) for q in mine_q])
    corpus = {p: data.passages[p] for p in pids}
    if first_stage.kind == "dense":
        mined = mine_hard_negatives(*mine_args, retriever=first_stage.retriever, **mining_args)
    else:
        mined = mine_from_first_stage([q["qid"] for q in mine_q], *mine_args, first_stage=first_stage,
                                      corpus=corpus, **mining_args)
    mining_seconds = time.time() - t_mine
    teacher_stats = None
    if denoise:
        t_teacher = time.time()
        teacher_stats = teacher_denoise(mined, [q["question"] for q in mine_q], texts, score_pairs=score_pairs,
                                        num_negatives=n_neg, margin=float(prep_cfg["teacher_margin"]))
        teacher_seconds = time.time() - t_teacher
        scored = teacher_stats["candidates_scored"] + teacher_stats["positives_scored"]
        examples = [{"question_id": q["qid"], "passage_id": pids[p], "teacher_logit": round(s, 4),
                     "lowest_positive_logit": round(mined.teacher_reference[i], 4)}
                    for i, q in enumerate(mine_q) for p, s in mined.teacher_dropped[i]][:10]
        teacher_stats = {"model": str(teacher["model"]), "input_format": teacher["input_format"],
                         "max_length": int(teacher["max_length"]), "margin": float(prep_cfg["teacher_margin"]),
                         **teacher_stats, "seconds": round(teacher_seconds, 2),
                         "pairs_per_s": round(scored / max(teacher_seconds, 1e-9), 1), "dropped_examples": examples}
        log.info("teacher: scored %d candidates (+%d positives) in %.1f s, dropped %d as likely positives (%.1f%%)",
                 teacher_stats["candidates_scored"], teacher_stats["positives_scored"], teacher_seconds,
                 teacher_stats["dropped_as_likely_positive"], 100 * teacher_stats["dropped_fraction"])
    distill_stats = None
    if distill:
        t_distill = time.time()
        train_idx = [i for i, q in enumerate(mine_q) if q["split"] == "train"]
        cached_before = score_pairs.from_cache
        distill_stats = teacher_scores(mined, [q["question"] for q in mine_q], texts, score_pairs=score_pairs,
                                       only=train_idx)
        distill_stats["from_score_cache"] = score_pairs.from_cache - cached_before
        fs_weight = float(prep_cfg["teacher_first_stage_weight"])
        if fs_weight > 0:
            mix_first_stage(mined, train_idx, fs_weight)
        distill_stats = {"model": str(teacher["model"]), "input_format": teacher["input_format"],
                         "max_length": int(teacher["max_length"]), "precision": precision,
                         "first_stage_weight": fs_weight, **distill_stats,
                         "seconds": round(time.time() - t_distill, 2)}
        log.info("teacher: %d training pairs for distillation (%d of them from the score cache; %d more reused from "
                 "denoising) in %.1f s", distill_stats["pairs"], distill_stats["from_score_cache"], distill_stats["reused"],
                 distill_stats["seconds"])
    val_run, val_recall = {}, None
    if by_split["val"] and int(val_candidates) > 0:
        val_run, _ = first_stage.retrieve(corpus, {q["qid"]: q["question"] for q in by_split["val"]},
                                          min(int(val_candidates), len(pids)))
        hits = [len(set(q["positives"]) & set(val_run[q["qid"]])) / len(q["positives"]) for q in by_split["val"]]
        val_recall = round(sum(hits) / len(hits), 4)
    if mined.short:
        warnings.append(f"{mined.short} of {len(mine_q)} queries got fewer than {n_neg} hard negatives "
                        "(small corpus or strict margin)")
        log.warning(warnings[-1])

    train_pids, unrolled = _write_training_files(out_dir, mine_q, mined, pids, texts, psplits, val_run,
                                                 mined.teacher_logits if distill else None)
    if teacher_stats is not None:
        teacher_stats["train_examples_short_of_negatives"] = sum(1 for r in unrolled if len(r["neg_doc"]) < n_neg)

    test_q = by_split["test"]
    qrels = {q["qid"]: {p: 1 for p in q["positives"]} for q in test_q}
    write_beir(out_dir / "eval_beir", data.passages, {q["qid"]: q["question"] for q in test_q}, qrels,
               query_meta={q["qid"]: q.get("metadata") or {} for q in test_q})

    summary = {
        **data.stats,
        "queries_per_split": {s: len(v) for s, v in by_split.items()},
        "passages": len(pids), "train_corpus_passages": len(train_pids),
        "unrolled_records": len(unrolled),
        "hard_negatives_to_mine": n_neg, "hard_neg_margin": prep_cfg["hard_neg_margin"],
        "dropped_as_false_negatives": mined.dropped_as_false_negative,
        "queries_short_of_negatives": mined.short,
        **({"negative_range_min": skip} if skip else {}),
        **({"teacher": teacher_stats} if teacher_stats is not None else {}),
        **({"teacher_scores": distill_stats} if distill_stats is not None else {}),
        "mining": {**mined.stats, "seconds": round(mining_seconds, 2),
                   "passages_per_s": round(len(pids) / max(mining_seconds, 1e-9), 1)},
        "retrieval_model": retrieval_cfg["model"],
        "first_stage": first_stage.settings(),
        "val_candidates": int(val_candidates) if val_run else 0,
        "val_first_stage_recall": val_recall,
        "warnings": warnings, "seconds": round(time.time() - t0, 2),
    }
    write_json(out_dir / "prep_summary.json", summary)
    return summary


def _write_parquet(path: Path, ids: list[str], texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
