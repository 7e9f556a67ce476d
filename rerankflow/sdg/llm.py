"""Stage 0, ``llm`` backend: synthetic QA generation with any OpenAI-compatible chat endpoint.

Per document (NVIDIA's recipe, plus a round-trip filter):

1. chunk into numbered segments (``sentences_per_chunk``, :func:`rerankflow.sdg.chunking.chunk_document`);
2. **generation** call: ``num_pairs`` pairs with the configured query-type mix, reasoning types and
   complexity floor, each citing its segment ids (:mod:`rerankflow.sdg.prompts`); invalid pairs are
   dropped and counted, a reply that is not the requested JSON is asked again (``max_parse_retries``);
3. **round-trip consistency filter** (Promptagator, Dai et al. 2022; NVIDIA's recipe lacks it): the
   retrieval embedder (``retrieval.model`` with the shared query/passage prefixes) must rank one of
   the question's cited chunks within ``round_trip_top_k``. ``round_trip_scope: corpus`` (default,
   as in Promptagator) searches every chunk of every document — a retrieved chunk whose text equals a
   cited chunk's text counts as a hit, so boilerplate repeated across files is not punished;
   ``document`` searches only the question's own document (cheaper, weaker: a document with no more
   than ``round_trip_top_k`` chunks passes everything). It runs *before* the judge, so no judge
   tokens are spent on questions that are dropped anyway;
4. **judge** call: one per document, scoring every surviving pair (relevance, accuracy,
   context_support, clarity, overall; 1-10 with justification), strict JSON, same retry rule.

A document whose generation or judge reply stays unusable after ``max_parse_retries`` retries, or
whose call fails after its transport retries, is counted as failed and left out; the run goes on.
A 401/403/404 stops the run (no other document could succeed). Calls cost, per run:
``documents x (1 generation + 1 judge) + parse retries`` requests (transport retries re-send the same
request); the cache (see :mod:`rerankflow.sdg.llm_client`) makes a re-run after a kill or crash repeat
none of the finished ones.

Entry points: :func:`generate_llm` (called by :func:`rerankflow.sdg.run.run_sdg` for ``backend: llm``),
:func:`preview_llm` and ``python -m rerankflow.sdg --preview`` (:mod:`rerankflow.sdg.__main__`: a few
documents, printed, nothing persisted: the cache is read but not written).

Settings come from the validated config (``sdg`` and ``retrieval`` sections with the schema's defaults
filled in, e.g. by :func:`rerankflow.config.load_config`); this module holds no defaults of its own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from rerankflow.config import load_schema
from rerankflow.errors import InputError
from rerankflow.sdg.chunking import chunk_document
from rerankflow.sdg.corpus import Document, documents_from_config
from rerankflow.sdg.llm_client import (CallCache, CallStats, LLMCallError, LLMClient, LLMFatalError, RetryPolicy,
                                       register_secret, request_key, scrub)
from rerankflow.sdg.round_trip import round_trip_filter
from rerankflow.sdg.prompts import (QUERY_TYPES, ParseError, correction_messages, generation_messages, judge_messages,
                                    parse_generation, parse_judge)

log = logging.getLogger(__name__)


def _schema_keys() -> tuple[set, set]:
    """The keys of ``sdg.llm`` and of ``sdg.llm.judge`` in config/schema.yaml."""
    llm = load_schema()["properties"]["sdg"]["properties"]["llm"]["properties"]
    return set(llm), set(llm["judge"]["properties"])


def llm_settings(sdg_cfg: dict) -> dict:
    """A checked copy of ``sdg.llm`` of a validated config (every key present; unknown or missing keys
    are an error naming the key; the query-type mix, reasoning types and scope are checked)."""
    cfg = copy.deepcopy(sdg_cfg.get("llm") or {})
    keys, judge_keys = _schema_keys()
    for where, have, known in (("sdg.llm", set(cfg), keys), ("sdg.llm.judge", set(cfg.get("judge") or {}), judge_keys)):
        if have - known:
            raise InputError(f"unknown key(s) {sorted(have - known)}; expected some of {sorted(known)}", key=where)
        if known - have:
            raise InputError(f"missing key(s) {sorted(known - have)}: pass the validated config "
                             "(rerankflow.config.load_config fills the schema's defaults)", key=where)
    mix = cfg["query_types"]
    if not isinstance(mix, dict) or set(mix) - set(QUERY_TYPES) or not any(float(w) > 0 for w in mix.values()):
        raise InputError(f"expected weights >= 0 for some of {list(QUERY_TYPES)}, at least one > 0; got {mix!r}",
                         key="sdg.llm.query_types")
    if not cfg["reasoning_types"]:
        raise InputError("needs at least one reasoning type", key="sdg.llm.reasoning_types")
    if cfg["round_trip_scope"] not in ("corpus", "document"):
        raise InputError(f"expected 'corpus' or 'document', got {cfg['round_trip_scope']!r}", key="sdg.llm.round_trip_scope")
    return cfg


def resolve_api_key(env_name: str | None, key_name: str) -> str | None:
    """The key from environment variable ``env_name``; ``""``/None = endpoint without a key.

    An unset or empty variable is refused here, before any request, with a message naming it.
    """
    if not env_name:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise InputError(
            f"environment variable {env_name} is not set, so no request was made. Export your API key "
            f"(e.g. `export {env_name}=...`), or set {key_name} to another variable name, or to \"\" for a "
            "local server that needs no key (vLLM, Ollama)", key=key_name)
    register_secret(value)
    return value


def plan_query_types(num_pairs: int, mix: dict, n_chunks: int, rng: random.Random) -> dict[str, int]:
    """How many questions of each type to ask for: floors of ``num_pairs x weight``, the remainder
    drawn (seeded) in proportion to the weights; multi-hop needs two segments, so a one-chunk
    document gets contextual questions instead."""
    weights = {t: max(0.0, float(mix.get(t, 0))) for t in QUERY_TYPES}
    if n_chunks < 2 and weights["multi_hop"] > 0:
        weights["contextual"] += weights["multi_hop"]
        weights["multi_hop"] = 0.0
    total = sum(weights.values())
    counts = {t: int(num_pairs * w / total) for t, w in weights.items()}
    rest = num_pairs - sum(counts.values())
    pool = {t: num_pairs * w / total - counts[t] for t, w in weights.items() if w > 0}
    while rest > 0 and pool:
        types = sorted(pool)
        pick = rng.choices(types, weights=[pool[t] + 1e-9 for t in types])[0]
        counts[pick] += 1
        pool.pop(pick)
        rest -= 1
    if rest > 0:
        best = max(weights, key=weights.get)
        counts[best] += rest
    return counts


def _call_with_parse_retries(client: LLMClient, messages: list[dict], params: dict, parse, max_parse_retries: int,
                             counters: dict):
    """Call, parse; on :class:`ParseError` ask again with the problem explained, up to the bound."""
    convo = messages
    for attempt in range(max_parse_retries + 1):
        res = client.chat(convo, **params)
        try:
            return parse(res["content"])
        except ParseError as err:
            exc = err
            if res.get("finish_reason") == "length":
                exc = ParseError(f"{err} (the reply was cut off at the token limit: raise sdg.llm.max_tokens)")
            with counters["lock"]:
                counters["parse_failures"] += 1
                if attempt < max_parse_retries:
                    counters["parse_retries"] += 1
            if attempt == max_parse_retries:
                raise exc from None
            log.info("unusable reply (%s); asking again (%d/%d)", exc, attempt + 1, max_parse_retries)
            # The conversation grows with each unusable reply, so every retry is a new request (an
            # identical one would be answered from the cache with the same unusable reply).
            convo = correction_messages(convo, res["content"], str(exc))
    raise AssertionError("unreachable")


def _preflight(docs, docs_chunks, gen_msgs, active, cfg: dict, ends, cache, num_pairs: int, preview: bool) -> dict:
    """What the run will cost (documents, segments, expected calls, calls already cached), logged."""
    pre = {
        "documents": len(docs), "characters": sum(len(d.text) for d in docs),
        "segments": sum(len(c) for c in docs_chunks), "num_pairs": num_pairs,
        "expected_calls": 2 * len(active), "max_parse_retries": int(cfg["max_parse_retries"]),
        "generation_cached": sum(request_key(ends.gen.payload(gen_msgs[i], **ends.gen_params)) in cache for i in active),
        "model": cfg["model"], "base_url": scrub(cfg["base_url"]),
        "judge_model": ends.judge_model, "judge_base_url": scrub(ends.judge_base), "preview": preview,
    }
    _log_preflight(pre)
    return pre


def _log_preflight(pre: dict) -> None:
    log.info(
        "LLM SDG preflight: %d documents (%d characters, %d segments), %d pairs asked per document; "
        "expected calls: %d (%d generation + %d judge) plus parse retries (at most %d each); "
        "%d generation calls already cached; generation %s @ %s, judge %s @ %s",
        pre["documents"], pre["characters"], pre["segments"], pre["num_pairs"], pre["expected_calls"],
        pre["expected_calls"] // 2, pre["expected_calls"] // 2, pre["max_parse_retries"], pre["generation_cached"],
        pre["model"], pre["base_url"], pre["judge_model"], pre["judge_base_url"],
    )


class _Endpoints:
    """The generation and judge clients of one run, with their request parameters."""

    def __init__(self, cfg: dict, seed: int, cache: CallCache):
        judge = cfg["judge"]
        self.judge_base = judge["base_url"] or cfg["base_url"]
        self.judge_model = judge["model"] or cfg["model"]
        judge_env = judge["api_key_env"] if judge["api_key_env"] is not None else cfg["api_key_env"]
        gen_key = resolve_api_key(cfg["api_key_env"], "sdg.llm.api_key_env")
        judge_key = gen_key if judge_env == cfg["api_key_env"] else resolve_api_key(judge_env, "sdg.llm.judge.api_key_env")
        self.stats = CallStats()
        retry = RetryPolicy(int(cfg["max_retries"]), float(cfg["retry_backoff_initial"]), float(cfg["retry_backoff_max"]),
                            float(cfg["max_retry_after"]))
        self.gen = LLMClient(cfg["base_url"], cfg["model"], gen_key, timeout=float(cfg["timeout"]), retry=retry,
                             cache=cache, stats=self.stats, seed=seed)
        self.judge = LLMClient(self.judge_base, self.judge_model, judge_key, timeout=float(cfg["timeout"]), retry=retry,
                               cache=cache, stats=self.stats, seed=seed + 1)
        self.gen_params = {"temperature": cfg["temperature"], "top_p": cfg["top_p"], "max_tokens": cfg["max_tokens"],
                           "extra_body": cfg["extra_body"]}
        self.judge_params = {**self.gen_params, "temperature": judge["temperature"]}


def _cache_for(cfg: dict, out_dir, preview: bool) -> tuple[CallCache, Path]:
    cache_dir = cfg["cache_dir"] or (Path(out_dir) / ".llm_cache" if out_dir else None)
    if cache_dir is None:
        cache_dir = Path(".llm_cache")
        log.warning("sdg.llm.cache_dir is not set and no output folder was given: caching calls in %s",
                    cache_dir.resolve())
    return CallCache(cache_dir, read_only=preview), cache_dir


def _run_phase(fn, jobs: dict, desc: str, workers: int, docs: list[Document], failures: dict) -> dict:
    """``fn(i, *args)`` for every job in a thread pool; a document whose call fails is recorded in
    ``failures`` and left out; a fatal error (401/403/404) stops the run."""
    results = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(fn, i, *args): i for i, args in jobs.items()}
        try:
            for fut in tqdm(as_completed(futs), total=len(futs), desc=desc, unit="doc", file=sys.stderr):
                i = futs[fut]
                try:
                    results[i] = fut.result()
                except LLMFatalError:
                    raise
                except (ParseError, LLMCallError) as exc:
                    failures[docs[i].source_id] = f"{desc}: {scrub(exc)}"
                    log.warning("document %s failed (%s): %s", docs[i].source_id, desc, scrub(exc))
        except LLMFatalError as exc:
            for f in futs:
                f.cancel()
            raise InputError(f"stopping the run: {scrub(exc)}", key="sdg.llm") from None
    return results


def _plan(docs: list[Document], cfg: dict, num_pairs: int, sentences_per_chunk: int, seed: int):
    """Chunks and generation messages per document (None for a document without a sentence)."""
    docs_chunks, gen_msgs = [], []
    for doc in docs:
        chunks = chunk_document(doc.text, sentences_per_chunk)
        rng = random.Random(f"{seed}:{doc.source_id}")
        counts = plan_query_types(num_pairs, cfg["query_types"], len(chunks), rng)
        docs_chunks.append(chunks)
        gen_msgs.append(generation_messages(doc.file_name, chunks, counts, list(cfg["reasoning_types"]),
                                            int(cfg["min_complexity"])) if chunks else None)
    return docs_chunks, gen_msgs


def generate_llm(docs: list[Document], sdg_cfg: dict, retrieval_cfg: dict, seed: int, *, out_dir=None,
                 device: str, preview: bool | None = None) -> tuple[list[dict], dict]:
    """Generate SDG records for ``docs`` with the configured LLM; returns ``(records, summary)``.

    ``sdg_cfg`` / ``retrieval_cfg``: the validated ``sdg`` and ``retrieval`` sections. Records are in
    the SDG record format of :mod:`rerankflow.sdg.run` (chunks still carry the internal ``sentences``
    key; ``run_sdg`` strips it and removes near-duplicate questions). Documents that failed are left
    out and listed in the summary. ``preview`` (None = ``sdg.preview``) keeps the first
    ``sdg.preview_documents`` documents and writes nothing, not even the cache; called from
    ``run_sdg`` in preview mode it prints the preview and then raises :class:`InputError`, so the
    Snakemake rule leaves no output behind.

    The cache lives in ``sdg.llm.cache_dir``, else ``<out_dir>/.llm_cache``, else ``./.llm_cache``.
    """
    cfg = llm_settings(sdg_cfg)
    raise_after_preview = preview is None and bool(sdg_cfg["preview"])
    preview = bool(sdg_cfg["preview"]) if preview is None else preview
    if preview:
        docs = docs[: int(sdg_cfg["preview_documents"])]
    num_pairs = int(sdg_cfg["num_pairs"])

    # --- preflight: no request before this has passed -------------------------------------------
    cache, cache_dir = _cache_for(cfg, out_dir, preview)
    ends = _Endpoints(cfg, seed, cache)
    docs_chunks, gen_msgs = _plan(docs, cfg, num_pairs, int(sdg_cfg["sentences_per_chunk"]), seed)
    active = [i for i, m in enumerate(gen_msgs) if m is not None]
    pre = _preflight(docs, docs_chunks, gen_msgs, active, cfg, ends, cache, num_pairs, preview)
    if len(active) < len(docs):
        log.warning("%d documents have no sentence to chunk and are skipped", len(docs) - len(active))

    counters = {"parse_failures": 0, "parse_retries": 0, "lock": threading.Lock()}
    failures: dict[str, str] = {}
    workers = max(1, int(cfg["max_parallel_requests"]))
    rt, min_cx, max_pr = cfg["reasoning_types"], int(cfg["min_complexity"]), int(cfg["max_parse_retries"])

    def gen_one(i):
        ids = {c["chunk_id"] for c in docs_chunks[i]}
        return _call_with_parse_retries(ends.gen, gen_msgs[i], ends.gen_params,
                                        lambda text: parse_generation(text, ids, rt, min_cx, num_pairs), max_pr, counters)

    def judge_one(i, pairs):
        msgs = judge_messages(docs[i].file_name, docs_chunks[i], pairs)
        return _call_with_parse_retries(ends.judge, msgs, ends.judge_params, lambda text: parse_judge(text, len(pairs)),
                                        max_pr, counters)

    t0 = time.time()
    generated = _run_phase(gen_one, {i: () for i in active}, "generation", workers, docs, failures)
    pairs_by_doc: dict[int, list[dict]] = {}
    dropped: dict[str, int] = {}
    for i, (pairs, drop) in generated.items():
        pairs_by_doc[i] = pairs
        for k, v in drop.items():
            dropped[k] = dropped.get(k, 0) + v
    n_generated = sum(len(p) for p in pairs_by_doc.values())
    rt_dropped = round_trip_filter(pairs_by_doc, docs_chunks, cfg, retrieval_cfg, device) \
        if cfg["round_trip_filter"] and n_generated else 0
    judged = _run_phase(judge_one, {i: (p,) for i, p in pairs_by_doc.items() if p}, "judge", workers, docs, failures)

    records = _records(docs, docs_chunks, pairs_by_doc, judged)
    summary = {
        "model": cfg["model"], "base_url": scrub(cfg["base_url"]),
        "judge_model": ends.judge_model, "judge_base_url": scrub(ends.judge_base),
        "documents": len(docs), "documents_ok": len(records), "documents_failed": len(failures),
        "failed_documents": dict(sorted(failures.items())), "expected_calls": pre["expected_calls"],
        **ends.stats.as_dict(),
        "parse_failures": counters["parse_failures"], "parse_retries": counters["parse_retries"],
        "pairs_generated": n_generated, "pairs_dropped_invalid": dict(sorted(dropped.items())),
        "round_trip": {"enabled": bool(cfg["round_trip_filter"]), "top_k": int(cfg["round_trip_top_k"]),
                       "scope": cfg["round_trip_scope"], "dropped": rt_dropped},
        "pairs_kept": sum(len(r["deduplicated_qa_pairs"]) for r in records),
        "cache_dir": None if preview else str(cache_dir), "seconds": round(time.time() - t0, 2),
    }
    log.info("LLM SDG summary: %s", json.dumps({k: v for k, v in summary.items() if k != "failed_documents"}))
    if not records and active:
        raise InputError(
            f"every document failed ({len(failures)}); first failures: "
            f"{list(failures.items())[:3]} — nothing to write. Finished calls are cached in {cache_dir}",
            key="sdg.llm")
    if raise_after_preview:
        _print_records(records, summary)
        raise InputError(
            f"sdg.preview is true: generated {len(records)} preview record(s) (printed above) and wrote nothing. "
            "Set sdg.preview: false to generate and write the dataset", key="sdg.preview")
    return records, summary


def _records(docs, docs_chunks, pairs_by_doc: dict, judged: dict) -> list[dict]:
    records = []
    for i in sorted(pairs_by_doc):
        pairs = pairs_by_doc[i]
        if pairs and i not in judged:
            continue  # judge failed: the document is counted as failed and left out
        doc = docs[i]
        records.append({
            "file_name": doc.file_name,
            "source_id": doc.source_id,
            "text": doc.text,
            "chunks": docs_chunks[i],
            "deduplicated_qa_pairs": pairs,
            "qa_evaluations": {"evaluations": judged.get(i, [])},
        })
    return records


def _print_records(records: list[dict], summary: dict, stream=None) -> None:
    stream = stream or sys.stdout
    for rec in records:
        view = {k: rec[k] for k in ("source_id", "file_name", "deduplicated_qa_pairs", "qa_evaluations")}
        view["num_chunks"] = len(rec["chunks"])
        print(json.dumps(view, indent=2, ensure_ascii=False), file=stream)
    print(json.dumps({"summary": summary}, indent=2, ensure_ascii=False), file=stream)
    stream.flush()


def preview_llm(corpus_dir, corpus_cfg: dict, sdg_cfg: dict, retrieval_cfg: dict, seed: int, device: str,
                stream=None) -> list[dict]:
    """Generate for ``sdg.preview_documents`` documents, print the records, persist nothing."""
    docs = documents_from_config(corpus_dir, corpus_cfg)
    records, summary = generate_llm(docs, sdg_cfg, retrieval_cfg, seed, device=device, preview=True)
    _print_records(records, summary, stream)
    return records
