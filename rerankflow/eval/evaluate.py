"""Stage 3: evaluate first-stage retrieval, the base and fine-tuned rerankers and a served endpoint.

:func:`evaluate` is the one entry point (the Snakemake rule's script calls it). Steps:

1. load the eval BEIR folder (``qrels/test.tsv``), with per-query metadata when present;
2. dense first stage (:class:`rerankflow.retrieval.retriever.Retriever`) -> ``max(top_k, first_stage_depth)``
   candidates per query, scored as the system ``first_stage``;
3. rerank the first ``top_k`` candidates with the base reranker (``base``), the fine-tuned
   checkpoint (``finetuned``) and, when ``eval.endpoint`` is set, the served ``/v1/ranking``
   (``endpoint``). Candidates beyond ``top_k`` keep their first-stage order below the reranked
   ones (BEIR's rerank protocol), so Recall@100 can be reported while only the top 30 are
   rescored. Checkpoint scores go through :mod:`rerankflow.scoring.score_cache` when
   ``eval.cache_scores`` is true: a pair already scored by the same weights and settings is
   never scored again;
4. metrics with ``pytrec_eval`` (:mod:`rerankflow.eval.metrics`), paired bootstrap CIs and paired
   significance tests for first_stage->base, base->finetuned, finetuned->endpoint (consecutive
   systems that were evaluated), breakdown by ``query_type`` / ``reasoning_type``;
5. write, in this order, ``eval_results.json`` (NVIDIA's per-system layout plus ``comparisons``,
   ``breakdown``, ``endpoint_parity`` and ``meta``), ``per_query.json``, ``runs/<system>.trec``,
   ``eval_table.tsv`` and ``ndcg_plot.png``, and print the table;
6. only then fail when the endpoint could not be scored or its metrics differ from the
   fine-tuned checkpoint's beyond NVIDIA's tolerances (0.03 absolute for k < 5, 0.01 for k >= 5).
   Because Snakemake deletes the declared outputs of a failed job, a failure also leaves a copy of
   the results under ``<out_dir>/last_failure/`` and the error message names it.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from rerankflow import __version__
from rerankflow.beir import load_beir, load_query_metadata
from rerankflow.errors import InputError
from rerankflow.formatting import DEFAULT_INPUT_FORMAT, DEFAULT_PROMPT_TEMPLATE, check_input_format, check_template
from rerankflow.io import atomic_path, write_json, write_text
from rerankflow.eval.metrics import (FAMILIES, breakdown, check_k_values, compare_systems, evaluable_qrels, evaluate_run, metric_names,
                      metric_value, rank_documents)
from rerankflow.models import pick_device, resolve_model_path

log = logging.getLogger(__name__)

SYSTEMS = ("first_stage", "base", "finetuned", "endpoint")
RESULTS = "eval_results.json"
PER_QUERY = "per_query.json"
RUNS = "runs"
TABLE = "eval_table.tsv"
PLOT = "ndcg_plot.png"
FAILURE_DIR = "last_failure"

EVAL_DEFAULTS = {
    "eval_data_path": None,
    "retrieval_model": None,
    "top_k": 100,
    "first_stage_depth": 0,
    "k_values": [1, 5, 10, 100],
    "batch_size": 32,
    "sort_by_length": True,
    "bf16": False,
    "index": "flat",
    "hnsw_m": 32,
    "hnsw_ef_search": 256,
    "eval_base": True,
    "base_input_format": "pair",
    "eval_finetuned": True,
    "finetuned_checkpoint": "BEST",
    "cache_scores": True,
    "score_cache_dir": None,
    "endpoint": None,
    "endpoint_model": None,
    "endpoint_batch_size": 64,
    "endpoint_concurrency": 4,
    "endpoint_timeout": 60.0,
    "endpoint_truncate": "END",
    "endpoint_retries": 3,
    "endpoint_api_key_env": None,
    "parity_tolerance_k_below_5": 0.03,
    "parity_tolerance_k_from_5": 0.01,
    "comparison_metric": "NDCG@10",
    "bootstrap_samples": 10000,
    "confidence": 0.95,
    "breakdown_fields": ["query_type", "reasoning_type"],
    "seed": None,
}


class EvalConfigError(InputError):
    """A bad ``eval`` config value (the message names the key)."""


class EndpointParityError(RuntimeError):
    """The served endpoint's metrics differ from the fine-tuned checkpoint's beyond tolerance."""


def check_eval_config(eval_cfg: dict) -> dict:
    """Return the eval section with defaults filled in; raise :class:`EvalConfigError` naming the key."""
    unknown = sorted(set(eval_cfg) - set(EVAL_DEFAULTS))
    if unknown:
        raise EvalConfigError(f"unknown key(s) {unknown}; known keys: {sorted(EVAL_DEFAULTS)}", key="eval")
    cfg = {**EVAL_DEFAULTS, **{k: v for k, v in eval_cfg.items()}}
    try:
        cfg["k_values"] = check_k_values(cfg["k_values"])
    except ValueError as exc:
        raise EvalConfigError(str(exc), key="eval.k_values") from None
    if not isinstance(cfg["top_k"], int) or cfg["top_k"] < 1:
        raise EvalConfigError(f"must be a positive integer, got {cfg['top_k']!r}", key="eval.top_k")
    depth = cfg["first_stage_depth"]
    if not isinstance(depth, int) or depth < 0 or (depth and depth < cfg["top_k"]):
        raise EvalConfigError(f"must be 0 (= top_k) or an integer >= top_k={cfg['top_k']}, got {depth!r}",
                              key="eval.first_stage_depth")
    if candidate_depth(cfg) < max(cfg["k_values"]):
        raise EvalConfigError(
            f"the first stage retrieves {candidate_depth(cfg)} passages per query (max(top_k, first_stage_depth)) but "
            f"max(k_values)={max(cfg['k_values'])}: metrics at k beyond the candidate depth would be silently capped. "
            f"Raise eval.first_stage_depth (or eval.top_k) or drop the larger k from eval.k_values.",
            key="eval.k_values")
    if cfg["index"] not in ("flat", "hnsw"):
        raise EvalConfigError(f"must be 'flat' or 'hnsw', got {cfg['index']!r}", key="eval.index")
    if cfg["comparison_metric"] not in metric_names(cfg["k_values"]):
        raise EvalConfigError(f"{cfg['comparison_metric']!r} is not computed; choose one of {metric_names(cfg['k_values'])}",
                              key="eval.comparison_metric")
    if not 0.0 < float(cfg["confidence"]) < 1.0:
        raise EvalConfigError(f"must be in (0, 1), got {cfg['confidence']!r}", key="eval.confidence")
    if int(cfg["bootstrap_samples"]) < 100:
        raise EvalConfigError(f"must be >= 100, got {cfg['bootstrap_samples']!r}", key="eval.bootstrap_samples")
    if cfg["base_input_format"] not in ("template", "pair"):
        raise EvalConfigError(f"must be 'template' or 'pair', got {cfg['base_input_format']!r}", key="eval.base_input_format")
    if cfg["endpoint_truncate"] not in ("END", "NONE"):
        raise EvalConfigError(f"must be 'END' or 'NONE', got {cfg['endpoint_truncate']!r}", key="eval.endpoint_truncate")
    return cfg


def candidate_depth(cfg: dict) -> int:
    """Passages the first stage retrieves per query: ``max(top_k, first_stage_depth)``."""
    return max(int(cfg["top_k"]), int(cfg["first_stage_depth"] or 0))


def top_candidates(run: dict, k: int) -> dict:
    """The ``k`` best-scored documents of every query of ``run`` (trec_eval order)."""
    return {qid: {d: docs[d] for d in rank_documents(docs)[:k]} for qid, docs in run.items()}


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


def parity_check(ft: dict, ep: dict, k_values, tol_small: float = 0.03, tol_large: float = 0.01) -> dict:
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


def write_trec_run(path, run: dict, system: str) -> None:
    """TREC run format: ``qid Q0 doc_id rank score run_name``, ranked as trec_eval ranks."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for qid in sorted(run):
                docs = run[qid]
                for rank, did in enumerate(rank_documents(docs), start=1):
                    fh.write(f"{qid} Q0 {did} {rank} {docs[did]:.6f} {system}\n")


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def table_rows(results: dict, k_values) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the eval table: metrics per system plus its comparison to the previous one."""
    names = [f"{p}@{k}" for _f, p in FAMILIES for k in k_values]
    cmp_by_to = {c["to"]: c for c in results.get("comparisons", [])}
    metric = results["meta"]["comparison_metric"]
    conf = int(round(results["meta"]["confidence"] * 100))
    header = ["system", *names, "compared_to", f"delta_{metric}", f"ci{conf}_low", f"ci{conf}_high", "p_value"]
    rows = []
    for system in SYSTEMS:
        if system not in results:
            continue
        row = [system] + [_fmt(metric_value(results[system], n)) for n in names]
        c = cmp_by_to.get(system)
        if c:
            row += [c["from"], f"{c['delta']:+.4f}", f"{c['ci_low']:+.4f}", f"{c['ci_high']:+.4f}", _fmt(c["p_value"])]
        else:
            row += ["-", "-", "-", "-", "-"]
        rows.append(row)
    return header, rows


def format_table(results: dict, k_values) -> str:
    """A plain-text table for the log: metrics per system, comparisons with CIs, breakdown, parity."""
    header, rows = table_rows(results, k_values)
    keep = [0] + [i for i, h in enumerate(header) if h.startswith(("NDCG@", "MRR@", "Recall@"))]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in keep] if rows else []
    lines = ["  ".join(header[i].ljust(w) for i, w in zip(keep, widths))]
    lines += ["  ".join(r[i].ljust(w) for i, w in zip(keep, widths)) for r in rows]
    meta = results["meta"]
    conf = int(round(meta["confidence"] * 100))
    if results.get("comparisons"):
        lines.append("")
        lines.append(f"paired comparisons on {meta['comparison_metric']} ({meta['counts']['queries_evaluated']} queries, "
                     f"{meta['bootstrap_samples']} bootstrap samples):")
        for c in results["comparisons"]:
            lines.append(f"  {c['from']:>11} -> {c['to']:<10} delta {c['delta']:+.4f}  {conf}% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
                         f"  p={c['p_value']:.4f} (randomization)  wilcoxon p={_fmt(c['wilcoxon_p'])}"
                         f"  wins/losses/ties {c['wins']}/{c['losses']}/{c['ties']}")
    for field, groups in results.get("breakdown", {}).items():
        lines.append("")
        lines.append(f"{meta['comparison_metric']} by {field}:")
        systems = [s for s in SYSTEMS if s in results]
        lines.append("  " + "value".ljust(24) + "n".rjust(5) + "".join(s.rjust(13) for s in systems))
        for value, row in groups.items():
            lines.append("  " + value[:24].ljust(24) + str(row["n"]).rjust(5)
                         + "".join(_fmt(row[s][meta["comparison_metric"]]).rjust(13) for s in systems))
    parity = results.get("endpoint_parity")
    if parity:
        lines.append("")
        lines.append("endpoint parity (finetuned vs endpoint): " + ("PASSED" if parity["passed"] else "FAILED on " + ", ".join(parity["failed"])))
    return "\n".join(lines)


def write_table_tsv(path, results: dict, k_values) -> None:
    header, rows = table_rows(results, k_values)
    write_text(path, "\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def plot_ndcg(path, results: dict, per_query: dict, k_values, confidence: float = 0.95, seed: int = 0) -> None:
    """Grouped bar plot of nDCG@k per system, with bootstrap CIs of each mean as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = [s for s in SYSTEMS if s in results]
    x = np.arange(len(k_values))
    width = 0.8 / max(1, len(systems))
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(k_values) + 0.3 * len(systems), 4.2))
    for i, system in enumerate(systems):
        means, lo, hi = [], [], []
        for k in k_values:
            vals = np.array([q[f"NDCG@{k}"] for q in per_query[system].values()])
            m = float(vals.mean()) if vals.size else 0.0
            if vals.size > 1:
                boots = vals[rng.integers(0, vals.size, size=(1000, vals.size))].mean(axis=1)
                a, b = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
            else:
                a = b = m
            means.append(m)
            lo.append(m - a)
            hi.append(b - m)
        bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=3, label=system)
        ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [f"nDCG@{k}" for k in k_values])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean over queries")
    n = len(next(iter(per_query.values()))) if per_query else 0
    ax.set_title(f"nDCG@k per system ({n} queries; error bars: {int(round(confidence * 100))}% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=len(systems))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _save_failure_copy(out_dir: Path, results: dict, per_query_doc: dict) -> Path:
    fail = out_dir / FAILURE_DIR
    write_json(fail / RESULTS, results)
    write_json(fail / PER_QUERY, per_query_doc)
    return fail


def evaluate(eval_data_dir, out_dir, *, eval_cfg: dict, retrieval_cfg: dict, reranker_cfg: dict | None = None,
             base_model=None, finetuned_checkpoint=None, device: str = "auto", seed: int = 0) -> dict:
    """Run stage 3 and write its outputs under ``out_dir`` (see module docstring). Returns the results.

    ``eval_cfg``: the ``eval`` config section (defaults filled from :data:`EVAL_DEFAULTS`).
    ``retrieval_cfg``: ``{model, query_prefix, passage_prefix, max_length, batch_size, cache_dir,
    search_block_size}`` (the section prep uses). ``reranker_cfg``: ``{prompt_template, max_length, input_format}``
    (the fine-tuned model is scored in ``input_format``, the base in ``eval.base_input_format``).
    ``base_model`` / ``finetuned_checkpoint``: checkpoint dirs (required when ``eval_base`` /
    ``eval_finetuned``). Raises :class:`EndpointParityError` / ``EndpointError`` *after* writing.
    """
    t_start = time.perf_counter()
    cfg = check_eval_config(dict(eval_cfg or {}))
    reranker_cfg = dict(reranker_cfg or {})
    template = check_template(reranker_cfg.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))
    try:
        finetuned_format = check_input_format(reranker_cfg.get("input_format", DEFAULT_INPUT_FORMAT))
    except ValueError as exc:
        raise EvalConfigError(str(exc), key="reranker.input_format") from None
    max_length = int(reranker_cfg.get("max_length", 512))
    k_values = cfg["k_values"]
    seed = int(cfg["seed"] if cfg["seed"] is not None else seed)
    out_dir = Path(out_dir)
    device = pick_device(device)
    if cfg["eval_base"] and not base_model:
        raise EvalConfigError("eval_base is true but no base model path was given", key="eval.eval_base")
    if cfg["eval_finetuned"] and not finetuned_checkpoint:
        raise EvalConfigError("eval_finetuned is true but no fine-tuned checkpoint was given", key="eval.finetuned_checkpoint")

    # 1. data
    checkpoints = {"base": resolve_checkpoint(base_model) if cfg["eval_base"] else None,
                   "finetuned": resolve_checkpoint(finetuned_checkpoint) if cfg["eval_finetuned"] else None}

    data_dir = Path(eval_data_dir)
    corpus, queries, qrels = load_beir(data_dir, split="test")
    query_meta = load_query_metadata(data_dir)
    eval_qrels = evaluable_qrels(qrels)
    if not eval_qrels:
        raise InputError("no query in qrels/test.tsv has a relevant (score >= 1) document", path=data_dir / "qrels" / "test.tsv")
    eval_queries = {q: queries[q] for q in eval_qrels}
    counts = {
        "corpus": len(corpus),
        "queries_in_qrels": len(qrels),
        "queries_evaluated": len(eval_qrels),
        "queries_without_relevant": len(qrels) - len(eval_qrels),
        "qrels_pairs": sum(len(d) for d in qrels.values()),
        "relevant_pairs": sum(1 for d in eval_qrels.values() for s in d.values() if s >= 1),
        "queries_with_metadata": sum(1 for q in eval_qrels if q in query_meta),
    }
    log.info("eval data %s: %s", data_dir, counts)

    # 2. first stage
    from rerankflow.retrieval.retriever import Retriever

    retriever = Retriever.from_config(retrieval_cfg, device=device, search=cfg, model_name=cfg["retrieval_model"])
    t0 = time.perf_counter()
    first_run, fs_info = retriever.retrieve(corpus, eval_queries, candidate_depth(cfg))
    fs_info["total_s"] = round(time.perf_counter() - t0, 3)
    runs = {"first_stage": first_run}
    timings = {"first_stage": fs_info}
    candidates = top_candidates(first_run, cfg["top_k"])  # what the rerankers rescore
    n_pairs = sum(len(d) for d in candidates.values())

    # 3. rerankers
    from rerankflow.scoring.reranking import CrossEncoderScorer, EndpointError, EndpointRanker, candidate_pairs
    from rerankflow.scoring.score_cache import ScoreCache, cached_score, scorer_identity

    models = {"retrieval_model": retriever.model_name, "retrieval_model_path": resolve_model_path(retriever.model_name)}
    input_formats = {"base": cfg["base_input_format"], "finetuned": finetuned_format}
    checkpoint_info = None
    keys, pairs = candidate_pairs(candidates, eval_queries, corpus)
    for system, enabled, path in (("base", cfg["eval_base"], base_model), ("finetuned", cfg["eval_finetuned"], finetuned_checkpoint)):
        if not enabled:
            continue
        ckpt = checkpoints[system]
        fmt = input_formats[system]
        cache = None
        if cfg["cache_scores"] and cfg["score_cache_dir"]:
            ident = scorer_identity(ckpt, input_format=fmt, template=template, max_length=max_length, bf16=cfg["bf16"])
            cache = ScoreCache(cfg["score_cache_dir"], ident, {"checkpoint": str(ckpt), "input_format": fmt,
                                                               "max_length": max_length, "bf16": bool(cfg["bf16"])})
        t0 = time.perf_counter()
        loaded = {}

        def make_scorer(ckpt=ckpt, fmt=fmt, loaded=loaded):
            t = time.perf_counter()
            loaded["scorer"] = CrossEncoderScorer(ckpt, max_length=max_length, template=template, device=device,
                                                  bf16=cfg["bf16"], batch_size=cfg["batch_size"], input_format=fmt)
            loaded["load_s"] = time.perf_counter() - t
            return loaded["scorer"]

        scores, cache_info = cached_score(pairs, cache, make_scorer, sort_by_length=cfg["sort_by_length"], desc=system)
        t2 = time.perf_counter()
        reranked: dict[str, dict[str, float]] = {qid: {} for qid in candidates}
        for (qid, did), sc in zip(keys, scores):
            reranked[qid][did] = float(sc)
        runs[system] = with_first_stage_tail(reranked, first_run)
        score_s = t2 - t0 - loaded.get("load_s", 0.0)
        timings[system] = {"load_s": round(loaded.get("load_s", 0.0), 3), "score_s": round(score_s, 3), "pairs": n_pairs,
                           **cache_info,
                           "pairs_per_s": round(cache_info["scored_pairs"] / max(score_s, 1e-9), 2) if cache_info["scored_pairs"] else None}
        models[system] = str(path)
        if system == "finetuned":
            checkpoint_info = {"requested": cfg["finetuned_checkpoint"], "path": str(path), "resolved": os.path.realpath(ckpt) if isinstance(ckpt, Path) else ckpt}
        loaded.clear()
        gc.collect()

    errors: dict[str, str] = {}
    if cfg["endpoint"]:
        t1 = time.perf_counter()
        try:
            model_name = cfg["endpoint_model"] or discover_endpoint_model(cfg["endpoint"], cfg["endpoint_timeout"])
            models["endpoint"] = {"url": cfg["endpoint"], "model": model_name}
            with EndpointRanker(cfg["endpoint"], model_name, batch_size=cfg["endpoint_batch_size"],
                                concurrency=cfg["endpoint_concurrency"], timeout=cfg["endpoint_timeout"],
                                truncate=cfg["endpoint_truncate"], retries=int(cfg["endpoint_retries"]), api_key_env=cfg["endpoint_api_key_env"]) as ranker:
                runs["endpoint"] = with_first_stage_tail(ranker.rerank_run(candidates, eval_queries, corpus), first_run)
            t2 = time.perf_counter()
            timings["endpoint"] = {"score_s": round(t2 - t1, 3), "pairs": n_pairs, "pairs_per_s": round(n_pairs / max(t2 - t1, 1e-9), 2)}
        except EndpointError as exc:
            errors["endpoint"] = str(exc)
            models.setdefault("endpoint", {"url": cfg["endpoint"], "model": cfg["endpoint_model"]})

    # 4. metrics, comparisons, breakdown
    results: dict = {}
    per_query: dict = {}
    for system in SYSTEMS:
        if system in runs:
            results[system], per_query[system] = evaluate_run(eval_qrels, runs[system], k_values)
    order = [s for s in SYSTEMS if s in results]
    comparisons = []
    for a, b in zip(order, order[1:]):
        c = compare_systems(per_query[a], per_query[b], cfg["comparison_metric"], int(cfg["bootstrap_samples"]),
                            float(cfg["confidence"]), seed)
        comparisons.append({"from": a, "to": b, **c})
    results["comparisons"] = comparisons
    results["breakdown"] = breakdown(per_query, query_meta, cfg["breakdown_fields"],
                                     metrics=sorted({cfg["comparison_metric"], f"MRR@{_nearest_k(k_values)}"}))
    if "endpoint" in results and "finetuned" in results:
        parity = parity_check(results["finetuned"], results["endpoint"], k_values,
                              float(cfg["parity_tolerance_k_below_5"]), float(cfg["parity_tolerance_k_from_5"]))
        parity.update(_logit_diff(runs["finetuned"], runs["endpoint"], candidates))
        results["endpoint_parity"] = parity
    elif "endpoint" in results:
        results["endpoint_parity"] = {"passed": None, "note": "eval_finetuned is false: nothing to compare the endpoint with"}
    results["meta"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "eval_data": str(data_dir.resolve()),
        "split": "test",
        "counts": counts,
        "models": models,
        "checkpoint": checkpoint_info,
        "top_k": cfg["top_k"],
        "first_stage_depth": candidate_depth(cfg),
        "rerank_note": (f"rerankers rescore the first stage's top {cfg['top_k']}; ranks {cfg['top_k'] + 1}-"
                        f"{candidate_depth(cfg)} keep first-stage order below them, so a reranked system's "
                        f"Recall@k for k >= {cfg['top_k']} equals the first stage's")
                       if candidate_depth(cfg) > cfg["top_k"] else None,
        "k_values": k_values,
        "candidate_pairs": n_pairs,
        "comparison_metric": cfg["comparison_metric"],
        "bootstrap_samples": int(cfg["bootstrap_samples"]),
        "confidence": float(cfg["confidence"]),
        "seed": seed,
        "mrr_note": "MRR@k is computed from the run (trec_eval's recip_rank has no cutoff), ranking ties like trec_eval",
        "prefixes": {"query_prefix": retriever.prefixes.query_prefix, "passage_prefix": retriever.prefixes.passage_prefix},
        "prompt_template": template,
        "input_formats": input_formats,
        "reranker_max_length": max_length,
        "device": device,
        "timings": {**timings, "total_s": round(time.perf_counter() - t_start, 3)},
        "versions": _versions(),
        "config": {"eval": cfg, "retrieval": dict(retrieval_cfg), "reranker": reranker_cfg},
        "errors": errors,
    }

    # 5. outputs: the results file first, always
    per_query_doc = {
        "metrics": metric_names(k_values),
        "systems": {s: {q: {m: round(v, 6) for m, v in row.items()} for q, row in per_query[s].items()} for s in order},
        "queries": {q: {"text": eval_queries[q], "relevant": sorted(d for d, s in eval_qrels[q].items() if s >= 1),
                        **({"metadata": query_meta[q]} if q in query_meta else {})} for q in eval_qrels},
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

    # 6. fail only now
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
    if (out_dir / FAILURE_DIR).exists():
        shutil.rmtree(out_dir / FAILURE_DIR, ignore_errors=True)
    return results


def _nearest_k(k_values) -> int:
    return 10 if 10 in k_values else max(k_values)


def discover_endpoint_model(endpoint: str, timeout: float = 30.0) -> str:
    """The first model id a served endpoint lists under ``GET /v1/models``."""
    import httpx

    from rerankflow.scoring.reranking import EndpointError, ranking_url

    url = ranking_url(endpoint).rsplit("/", 1)[0] + "/models"
    try:
        resp = httpx.get(url, timeout=timeout)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except Exception as exc:
        raise EndpointError(f"eval.endpoint_model is not set and GET {url} did not name a model ({exc!r}); "
                            "set eval.endpoint_model") from None
