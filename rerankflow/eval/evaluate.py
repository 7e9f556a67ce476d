"""Stage 3: evaluate first-stage retrieval, the base and fine-tuned rerankers and a served endpoint.

:func:`evaluate` is the one entry point (the Snakemake rule's script calls it). Steps:

1. load the eval BEIR folder (``qrels/test.tsv``), with per-query metadata when present;
2. first stage (:class:`rerankflow.retrieval.first_stage.FirstStage`: ``retrieval.first_stage`` dense, bm25,
   hybrid or a run file) -> ``max(top_k, first_stage_depth)`` candidates per query, scored as the system
   ``first_stage``. With ``eval.ignore_identical_ids`` a document whose id equals the query id is dropped
   from it (so from every run) before anything is scored, as BEIR and MTEB do; qrels targets missing from
   the corpus are kept (BEIR does) and reported as a warning with their count;
3. rerank the first ``top_k`` candidates with the base reranker (``base``), the fine-tuned
   checkpoint (``finetuned``) and, when ``eval.endpoint`` is set, the served ``/v1/ranking``
   (``endpoint``); ``fused`` is the fine-tuned reranker fused with its first stage
   (:mod:`rerankflow.scoring.fusion`) at the weight chosen on validation by stage 2 (the checkpoint's
   fusion record) or given as ``eval.fusion_weight``, never chosen here, where the labels are test labels.
   Candidates beyond ``top_k`` keep their first-stage order below the reranked
   ones (BEIR's rerank protocol), so Recall@100 can be reported while only the top 30 are
   rescored. Each checkpoint is scored along ``eval.scoring_path`` (:mod:`rerankflow.scoring.paths`;
   ``auto`` = the fastest path passing parity with fp32 on a sample of these candidate pairs,
   :mod:`rerankflow.scoring.path_choice`), recorded in ``meta.scoring``. Checkpoint scores go through
   :mod:`rerankflow.scoring.score_cache` when ``eval.cache_scores`` is true: a pair already scored by
   the same weights, settings and scoring path is never scored again;
4. metrics with ``pytrec_eval`` (:mod:`rerankflow.eval.metrics`), paired bootstrap CIs and paired
   significance tests of each system against the one before it (first_stage->base->finetuned->fused,
   among those evaluated) and of finetuned->endpoint, breakdown by ``query_type`` / ``reasoning_type``;
5. write, in this order, ``eval_results.json`` (NVIDIA's per-system layout plus ``comparisons``,
   ``breakdown``, ``endpoint_parity`` and ``meta``), ``per_query.json``, ``runs/<system>.trec``,
   ``eval_table.tsv`` and ``ndcg_plot.png``, and print the table;
6. only then fail when the endpoint could not be scored or its metrics differ from the
   fine-tuned checkpoint's beyond ``eval.parity_tolerance_k_below_5`` / ``_k_from_5`` (NVIDIA's
   0.03 absolute for k < 5, 0.01 for k >= 5).
   Because Snakemake deletes the declared outputs of a failed job, a failure also leaves a copy of
   the results under ``<out_dir>/last_failure/`` and the error message names it.

The parts: :mod:`rerankflow.eval.config` (the checked ``eval`` section), :mod:`rerankflow.eval.data` (the
eval folder and the first stage), :mod:`rerankflow.eval.metrics`, :mod:`rerankflow.eval.report` (table, TREC
runs, plot). Settings come from the validated config
(:func:`rerankflow.config.load_config` outside Snakemake); this module holds no defaults of its own.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rerankflow import __version__
from rerankflow.errors import InputError
from rerankflow.eval.config import EvalConfigError, candidate_depth, check_eval_config
from rerankflow.eval.data import load_eval_data, run_first_stage
from rerankflow.eval.metrics import FAMILIES, breakdown, compare_systems, evaluate_run, metric_names, rank_documents
from rerankflow.eval.report import SYSTEMS, format_table, plot_ndcg, write_table_tsv, write_trec_run
from rerankflow.formatting import check_input_format, check_template
from rerankflow.io import atomic_path, write_json
from rerankflow.models import pick_device
from rerankflow.retrieval.candidates import candidate_pairs
from rerankflow.scoring.path_choice import (
    ParityTolerance, choose_scoring_path, decision_key, load_decision, parity_sample, save_decision,
)
from rerankflow.scoring.paths import auto_candidates, load_path_scorer
from rerankflow.scoring.endpoint import EndpointError, EndpointRanker, discover_endpoint_model
from rerankflow.scoring.fusion import fuse_run, read_fusion_record
from rerankflow.scoring.score_cache import ScoreCache, cached_score, scorer_identity

log = logging.getLogger(__name__)

RESULTS = "eval_results.json"
PER_QUERY = "per_query.json"
RUNS = "runs"
TABLE = "eval_table.tsv"
PLOT = "ndcg_plot.png"
FAILURE_DIR = "last_failure"


class EndpointParityError(RuntimeError):
    """The served endpoint's metrics differ from the fine-tuned checkpoint's beyond tolerance."""


def with_first_stage_tail(reranked: dict, first_run: dict) -> dict:
    """``reranked`` followed, per query, by the first-stage documents it lacks, in first-stage order.

    Tail documents get scores strictly below the query's lowest reranked score, so every metric
    ranks them after the reranked top (BEIR's rerank evaluation keeps them the same way).
    """
    out = {}
    for qid, docs in first_run.items():
        top = dict(reranked.get(qid, {}))
        tail = [d for d in rank_documents(docs) if d not in top]
        floor = (min(top.values()) if top else 0.0) - 1.0
        for i, d in enumerate(tail):
            top[d] = floor - float(i)
        out[qid] = top
    return out


def resolve_checkpoint(path) -> Path | str:
    """A Hugging Face checkpoint dir from a step dir, ``BEST``/``LATEST`` link or the dir itself.

    A string that is not a local path but looks like a hub id (``org/name``) is returned as is
    (``from_pretrained`` resolves it; offline it must already be in the Hugging Face cache).
    """
    p = Path(path)
    for cand in (p, p / "model" / "consolidated"):
        if (cand / "config.json").exists():
            return cand
    text = str(path)
    if not p.exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return text
    raise InputError("no Hugging Face checkpoint (config.json) here or under model/consolidated/", path=p)


def _versions() -> dict:
    out = {"python": platform.python_version(), "rerankflow": __version__}
    for mod in ("torch", "transformers", "sentence_transformers", "faiss", "pytrec_eval", "numpy", "scipy", "httpx"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "unknown")
        except Exception:  # pragma: no cover - optional module missing
            out[mod] = None
    return out


def parity_check(ft: dict, ep: dict, k_values, tol_small: float, tol_large: float) -> dict:
    """Compare two aggregate results family by family at every k with NVIDIA's tolerances."""
    checks, failed = [], []
    for family, prefix in FAMILIES:
        for k in k_values:
            name = f"{prefix}@{k}"
            a, b = ft[family][name], ep[family][name]
            tol = tol_small if k < 5 else tol_large
            ok = abs(a - b) <= tol + 1e-9
            checks.append({"metric": name, "finetuned": a, "endpoint": b, "abs_diff": round(abs(a - b), 6), "tolerance": tol, "ok": ok})
            if not ok:
                failed.append(name)
    return {"passed": not failed, "failed": failed, "tolerances": {"k<5": tol_small, "k>=5": tol_large}, "checks": checks}


def _logit_diff(run_a: dict, run_b: dict, candidates: dict) -> dict:
    """Logit differences over the rescored ``candidates`` only (the first-stage tail is not a logit)."""
    diffs = [abs(run_a[q][d] - run_b[q][d]) for q in candidates for d in candidates[q]
             if d in run_a.get(q, {}) and d in run_b.get(q, {})]
    if not diffs:
        return {"pairs": 0}
    return {"pairs": len(diffs), "max_abs_logit_diff": round(max(diffs), 6), "mean_abs_logit_diff": round(sum(diffs) / len(diffs), 6)}


def _save_failure_copy(out_dir: Path, results: dict, per_query_doc: dict) -> Path:
    fail = out_dir / FAILURE_DIR
    write_json(fail / RESULTS, results)
    write_json(fail / PER_QUERY, per_query_doc)
    return fail


def evaluate(eval_data_dir, out_dir, *, eval_cfg: dict, retrieval_cfg: dict, reranker_cfg: dict,
             base_model=None, finetuned_checkpoint=None, device: str, seed: int) -> dict:
    """Run stage 3 and write its outputs under ``out_dir`` (see module docstring). Returns the results.

    ``eval_cfg`` / ``retrieval_cfg`` / ``reranker_cfg``: the validated ``eval``, ``retrieval`` (the
    section prep uses) and ``reranker`` sections (the fine-tuned model is scored in
    ``reranker.input_format``, the base in ``eval.base_input_format``). ``base_model`` /
    ``finetuned_checkpoint``: checkpoint dirs (required when ``eval_base`` / ``eval_finetuned``).
    ``seed``: the top-level seed (``eval.seed`` wins when set). Raises :class:`EndpointParityError` /
    ``EndpointError`` *after* writing.
    """
    t_start = time.perf_counter()
    cfg = check_eval_config(dict(eval_cfg))
    reranker_cfg = dict(reranker_cfg)
    template = check_template(reranker_cfg["prompt_template"])
    try:
        finetuned_format = check_input_format(reranker_cfg["input_format"])
    except ValueError as exc:
        raise EvalConfigError(str(exc), key="reranker.input_format") from None
    max_length = int(reranker_cfg["max_length"])
    seed = int(cfg["seed"] if cfg["seed"] is not None else seed)
    out_dir = Path(out_dir)
    device = pick_device(device)
    if cfg["eval_base"] and not base_model:
        raise EvalConfigError("eval_base is true but no base model path was given", key="eval.eval_base")
    if cfg["eval_finetuned"] and not finetuned_checkpoint:
        raise EvalConfigError("eval_finetuned is true but no fine-tuned checkpoint was given", key="eval.finetuned_checkpoint")
    checkpoints = {"base": resolve_checkpoint(base_model) if cfg["eval_base"] else None,
                   "finetuned": resolve_checkpoint(finetuned_checkpoint) if cfg["eval_finetuned"] else None}
    data = load_eval_data(Path(eval_data_dir))

    # 2. first stage
    ev = run_first_stage(data, cfg, retrieval_cfg, device)
    ev["input_formats"] = {"base": cfg["base_input_format"], "finetuned": finetuned_format}

    # 3. rerankers
    paths = {"base": base_model, "finetuned": finetuned_checkpoint}
    with tempfile.TemporaryDirectory(prefix="rerankflow_onnx_") as tmp_onnx:
        onnx_dir = cfg["onnx_cache_dir"] or tmp_onnx  # null outside Snakemake: exports live for this run only
        ev["checkpoint"] = _rerank_checkpoints(ev, data, cfg, checkpoints, paths, template=template,
                                               max_length=max_length, device=device, seed=seed, onnx_dir=onnx_dir)
    _fuse(ev, cfg, checkpoints["finetuned"])
    if cfg["endpoint"]:
        _rerank_endpoint(ev, data, cfg)

    # 4. metrics, comparisons, breakdown, meta
    results, per_query = _metrics(ev, data, cfg, seed)
    results["meta"] = _meta(ev, data, cfg, seed=seed, template=template, max_length=max_length,
                            device=device, total_s=time.perf_counter() - t_start,
                            config={"eval": cfg, "retrieval": dict(retrieval_cfg), "reranker": reranker_cfg})

    # 5. outputs: the results file first, always; 6. fail only now
    per_query_doc = _write_outputs(out_dir, results, per_query, ev["runs"], data, cfg, seed)
    _raise_on_endpoint_failure(out_dir, results, per_query_doc, ev, cfg)
    if (out_dir / FAILURE_DIR).exists():
        shutil.rmtree(out_dir / FAILURE_DIR, ignore_errors=True)
    return results


def _rerank_checkpoints(ev: dict, data: dict, cfg: dict, checkpoints: dict, paths: dict, *, template: str,
                        max_length: int, device: str, seed: int, onnx_dir) -> dict | None:
    """Score the candidates with the base and fine-tuned checkpoints along the chosen scoring path (through
    the score cache); fills ``ev`` runs/timings/models/scoring and returns the fine-tuned checkpoint's info."""
    candidates = ev["candidates"]
    n_pairs = sum(len(d) for d in candidates.values())
    keys, pairs = candidate_pairs(candidates, data["queries"], data["corpus"])
    groups = parity_sample(keys, candidates, n_pairs=int(cfg["scoring_parity_pairs"]), seed=seed)
    sample_pairs = [pairs[i] for g in groups for i in g]
    ev.setdefault("scoring", {})
    checkpoint_info = None
    for system, enabled in (("base", cfg["eval_base"]), ("finetuned", cfg["eval_finetuned"])):
        if not enabled:
            continue
        ckpt, fmt, path = checkpoints[system], ev["input_formats"][system], paths[system]
        text = {"max_length": max_length, "template": template, "input_format": fmt}

        def load(scoring_path, ckpt=ckpt, text=text):
            return load_path_scorer(scoring_path, ckpt, device=device, batch_size=cfg["batch_size"],
                                    onnx_cache_dir=onnx_dir, **text)

        t0 = time.perf_counter()
        scorer, record = _choose_path(cfg, ckpt, text, device, load, sample_pairs, groups, system)
        choice_s = time.perf_counter() - t0
        used = record["used"]
        cache = None
        if cfg["cache_scores"] and cfg["score_cache_dir"]:
            ident = scorer_identity(ckpt, input_format=fmt, template=template, max_length=max_length, scoring_path=used)
            cache = ScoreCache(cfg["score_cache_dir"], ident, {"checkpoint": str(ckpt), "input_format": fmt,
                                                               "max_length": max_length, "scoring_path": used})
        loaded = {"scorer": scorer}

        def make_scorer(load=load, used=used, loaded=loaded):
            if loaded["scorer"] is None:  # the path was decided before: load only it
                t = time.perf_counter()
                loaded["scorer"] = load(used)[0]
                loaded["load_s"] = time.perf_counter() - t
            return loaded["scorer"]

        t1 = time.perf_counter()
        scores, cache_info = cached_score(pairs, cache, make_scorer, sort_by_length=cfg["sort_by_length"], desc=system)
        t2 = time.perf_counter()
        reranked: dict[str, dict[str, float]] = {qid: {} for qid in candidates}
        for (qid, did), sc in zip(keys, scores):
            reranked[qid][did] = float(sc)
        ev["runs"][system] = with_first_stage_tail(reranked, ev["runs"]["first_stage"])
        load_s = loaded.get("load_s", 0.0)
        score_s = t2 - t1 - load_s
        ev["timings"][system] = {"load_s": round(load_s, 3), "choice_s": round(choice_s, 3), "score_s": round(score_s, 3),
                                 "pairs": n_pairs, "scoring_path": used, **cache_info,
                                 "pairs_per_s": round(cache_info["scored_pairs"] / max(score_s, 1e-9), 2)
                                 if cache_info["scored_pairs"] else None}
        ev["scoring"][system] = record
        ev["models"][system] = str(path)
        if system == "finetuned":
            checkpoint_info = {"requested": cfg["finetuned_checkpoint"], "path": str(path),
                               "resolved": os.path.realpath(ckpt) if isinstance(ckpt, Path) else ckpt}
        loaded.clear()
        scorer = None
        gc.collect()
    return checkpoint_info


def _choose_path(cfg: dict, ckpt, text: dict, device: str, load, sample_pairs, groups, system: str):
    """``(scorer or None, record)``: the scoring path of one checkpoint (:mod:`rerankflow.scoring.path_choice`).

    With the score cache on, a decision made before for the same checkpoint, settings, request,
    tolerance and sample is reused (``scorer`` None: nothing loaded until a pair needs scoring)."""
    requested = cfg["scoring_path"]
    tolerance = ParityTolerance(float(cfg["scoring_parity_max_abs_diff"]))
    candidates = auto_candidates(device) if requested == "auto" else []
    store = cfg["score_cache_dir"] if cfg["cache_scores"] else None
    key = None
    if store:
        key = decision_key(ckpt, settings=text, requested=requested, candidates=candidates, tolerance=tolerance,
                           sample_pairs=sample_pairs, device=device)
        record = load_decision(store, key)
        if record is not None:
            log.info("%s: scoring path %s (decided before, %s)", system, record["used"], "fell back to fp32"
                     if record.get("fallback") else "parity passed" if record.get("tried") else "as configured")
            return None, {**record, "decision": "reused"}
    scorer, record = choose_scoring_path(requested, load=load, candidates=candidates, sample_pairs=sample_pairs,
                                         groups=groups, tolerance=tolerance, name=system)
    if store:
        save_decision(store, key, record)
    log.info("%s: scoring along %s%s", system, record["used"], " (fell back to fp32)" if record["fallback"] else "")
    return scorer, {**record, "decision": "made now"}


def _fuse(ev: dict, cfg: dict, finetuned_dir) -> None:
    """The system ``fused``: the fine-tuned reranker's candidate scores fused with the first stage's at the
    weight ``eval.fusion_weight``, else the one stage 2 chose on validation (the checkpoint's fusion record).
    Records the weight and where it came from in ``ev["fusion"]``; without a weight, no ``fused`` system."""
    if not cfg["fuse_first_stage"] or "finetuned" not in ev["runs"]:
        ev["fusion"] = None
        return
    if cfg["fusion_weight"] is not None:
        weight, source = float(cfg["fusion_weight"]), "eval.fusion_weight"
        record = None
    else:
        record = read_fusion_record(finetuned_dir) if isinstance(finetuned_dir, Path) else None
        if record is None:
            ev["fusion"] = {"weight": None, "note": "the fine-tuned checkpoint has no fusion record (stage 2 validated "
                            "without first-stage candidates) and eval.fusion_weight is null: no fused system"}
            log.warning(ev["fusion"]["note"])
            return
        weight, source = record["weight"], "chosen on validation by stage 2 (checkpoint fusion record)"
    candidates, first = ev["candidates"], ev["runs"]["first_stage"]
    reranked = {q: {d: ev["runs"]["finetuned"][q][d] for d in docs} for q, docs in candidates.items()}
    ev["runs"]["fused"] = with_first_stage_tail(fuse_run(reranked, first, weight), first)
    ev["models"]["fused"] = {"reranker": ev["models"].get("finetuned"), "fusion_weight": weight}
    ev["fusion"] = {"weight": weight, "source": source, "record": record}


def _rerank_endpoint(ev: dict, data: dict, cfg: dict) -> None:
    """Score the candidates through the served endpoint; an unusable endpoint is recorded in ``ev["errors"]``."""
    candidates = ev["candidates"]
    n_pairs = sum(len(d) for d in candidates.values())
    t1 = time.perf_counter()
    try:
        model_name = cfg["endpoint_model"] or discover_endpoint_model(cfg["endpoint"], cfg["endpoint_timeout"])
        ev["models"]["endpoint"] = {"url": cfg["endpoint"], "model": model_name}
        with EndpointRanker(cfg["endpoint"], model_name, batch_size=cfg["endpoint_batch_size"],
                            concurrency=cfg["endpoint_concurrency"], timeout=cfg["endpoint_timeout"],
                            truncate=cfg["endpoint_truncate"], retries=int(cfg["endpoint_retries"]),
                            api_key_env=cfg["endpoint_api_key_env"]) as ranker:
            ev["runs"]["endpoint"] = with_first_stage_tail(ranker.rerank_run(candidates, data["queries"], data["corpus"]),
                                                           ev["runs"]["first_stage"])
        t2 = time.perf_counter()
        ev["timings"]["endpoint"] = {"score_s": round(t2 - t1, 3), "pairs": n_pairs,
                                     "pairs_per_s": round(n_pairs / max(t2 - t1, 1e-9), 2)}
    except EndpointError as exc:
        ev["errors"]["endpoint"] = str(exc)
        ev["models"].setdefault("endpoint", {"url": cfg["endpoint"], "model": cfg["endpoint_model"]})


def _metrics(ev: dict, data: dict, cfg: dict, seed: int) -> tuple[dict, dict]:
    """Per-system metrics, paired comparisons of consecutive systems, breakdown and endpoint parity."""
    k_values, runs = cfg["k_values"], ev["runs"]
    results: dict = {}
    per_query: dict = {}
    for system in SYSTEMS:
        if system in runs:
            results[system], per_query[system] = evaluate_run(data["qrels"], runs[system], k_values)
    chain = [s for s in SYSTEMS if s in results and s != "endpoint"]
    pairs = list(zip(chain, chain[1:])) + ([("finetuned", "endpoint")] if {"finetuned", "endpoint"} <= results.keys() else [])
    comparisons = []
    for a, b in pairs:
        c = compare_systems(per_query[a], per_query[b], cfg["comparison_metric"], int(cfg["bootstrap_samples"]),
                            float(cfg["confidence"]), seed)
        comparisons.append({"from": a, "to": b, **c})
    results["comparisons"] = comparisons
    results["breakdown"] = breakdown(per_query, data["meta"], cfg["breakdown_fields"],
                                     metrics=sorted({cfg["comparison_metric"], f"MRR@{_nearest_k(k_values)}"}))
    if "endpoint" in results and "finetuned" in results:
        parity = parity_check(results["finetuned"], results["endpoint"], k_values,
                              float(cfg["parity_tolerance_k_below_5"]), float(cfg["parity_tolerance_k_from_5"]))
        parity.update(_logit_diff(runs["finetuned"], runs["endpoint"], ev["candidates"]))
        results["endpoint_parity"] = parity
    elif "endpoint" in results:
        results["endpoint_parity"] = {"passed": None, "note": "eval_finetuned is false: nothing to compare the endpoint with"}
    return results, per_query


def _meta(ev: dict, data: dict, cfg: dict, *, seed: int, template: str, max_length: int,
          device: str, total_s: float, config: dict) -> dict:
    """The ``meta`` block of ``eval_results.json``: data, models, settings, timings, versions, errors."""
    depth = candidate_depth(cfg)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "eval_data": str(data["dir"].resolve()),
        "split": "test",
        "counts": data["counts"],
        "models": ev["models"],
        "checkpoint": ev["checkpoint"],
        "top_k": cfg["top_k"],
        "first_stage_depth": depth,
        "rerank_note": (f"rerankers rescore the first stage's top {cfg['top_k']}; ranks {cfg['top_k'] + 1}-"
                        f"{depth} keep first-stage order below them, so a reranked system's "
                        f"Recall@k for k >= {cfg['top_k']} equals the first stage's")
                       if depth > cfg["top_k"] else None,
        "k_values": cfg["k_values"],
        "candidate_pairs": sum(len(d) for d in ev["candidates"].values()),
        "comparison_metric": cfg["comparison_metric"],
        "bootstrap_samples": int(cfg["bootstrap_samples"]),
        "confidence": float(cfg["confidence"]),
        "seed": seed,
        "mrr_note": "MRR@k is computed from the run (trec_eval's recip_rank has no cutoff), ranking ties like trec_eval",
        "first_stage": ev["first_stage"],
        "fusion": ev.get("fusion"),
        "prefixes": {k: ev["first_stage"]["dense"][k] for k in ("query_prefix", "passage_prefix")}
        if "dense" in ev["first_stage"] else None,
        "prompt_template": template,
        "input_formats": ev["input_formats"],
        "reranker_max_length": max_length,
        "scoring": ev.get("scoring", {}),
        "device": device,
        "timings": {**ev["timings"], "total_s": round(total_s, 3)},
        "versions": _versions(),
        "config": config,
        "errors": ev["errors"],
    }


def _write_outputs(out_dir: Path, results: dict, per_query: dict, runs: dict, data: dict, cfg: dict, seed: int) -> dict:
    """Write results, per-query metrics, TREC runs, table and plot (in that order); print the table."""
    k_values, qrels = cfg["k_values"], data["qrels"]
    order = [s for s in SYSTEMS if s in per_query]
    per_query_doc = {
        "metrics": metric_names(k_values),
        "systems": {s: {q: {m: round(v, 6) for m, v in row.items()} for q, row in per_query[s].items()} for s in order},
        "queries": {q: {"text": data["queries"][q], "relevant": sorted(d for d, s in qrels[q].items() if s >= 1),
                        **({"metadata": data["meta"][q]} if q in data["meta"] else {})} for q in qrels},
    }
    write_json(out_dir / RESULTS, results)
    write_json(out_dir / PER_QUERY, per_query_doc)
    with atomic_path(out_dir / RUNS, is_dir=True) as tmp:
        for system in order:
            write_trec_run(Path(tmp) / f"{system}.trec", runs[system], system)
    write_table_tsv(out_dir / TABLE, results, k_values)
    plot_ndcg(out_dir / PLOT, results, per_query, k_values, float(cfg["confidence"]), seed)
    print(format_table(results, k_values), flush=True)
    print(f"\nwrote {out_dir / RESULTS}", flush=True)
    return per_query_doc


def _raise_on_endpoint_failure(out_dir: Path, results: dict, per_query_doc: dict, ev: dict, cfg: dict) -> None:
    """Fail (after the outputs were written, keeping a copy) when the endpoint failed or broke parity."""
    errors, checkpoint_info = ev["errors"], ev["checkpoint"]
    if errors.get("endpoint"):
        fail = _save_failure_copy(out_dir, results, per_query_doc)
        raise EndpointError(f"endpoint {cfg['endpoint']} could not be evaluated: {errors['endpoint']}. The other systems' results "
                            f"were written to {out_dir / RESULTS} (a copy kept in {fail}/, which Snakemake does not delete).")
    parity = results.get("endpoint_parity")
    if parity and parity.get("passed") is False:
        fail = _save_failure_copy(out_dir, results, per_query_doc)
        bad = sorted((c for c in parity["checks"] if not c["ok"]), key=lambda c: c["metric"] != cfg["comparison_metric"])
        worst = ", ".join(f"{c['metric']}: finetuned {c['finetuned']:.4f} vs endpoint {c['endpoint']:.4f} (|diff| {c['abs_diff']:.4f} > {c['tolerance']})"
                          for c in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise EndpointParityError(
            f"endpoint parity FAILED: the served endpoint {cfg['endpoint']} does not reproduce the fine-tuned checkpoint "
            f"{checkpoint_info['resolved'] if checkpoint_info else ''} within NVIDIA's tolerances (0.03 for k<5, 0.01 for k>=5): {worst}. "
            f"Check that the endpoint serves the exported checkpoint evaluated here (same prompt template, max_length, truncation). "
            f"Results written to {out_dir / RESULTS}; a copy is kept in {fail}/ (Snakemake deletes the outputs of a failed job).")


def _nearest_k(k_values) -> int:
    return 10 if 10 in k_values else max(k_values)
