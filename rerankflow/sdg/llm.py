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
   Before it, the **deterministic rejects** of :mod:`rerankflow.sdg.checks` (NVIDIA's retrieval SDG:
   source-relative wording, the answer leaked into the query, "not specified" answers, a numeric
   answer repeated in the query, a query not of its scheduled form) drop pairs without any call;
4. two **judge** calls per document (NVIDIA's retrieval SDG): a **blind query judge** that sees only
   the queries (standalone, plausible, discriminative) and an **answer judge** that sees the cited
   segments and the queries but not the generated answers (relevance, context_support, its own
   answer); :func:`rerankflow.sdg.prompts.combine_evaluations` makes the record's evaluation.

Structured outputs (``sdg.llm.structured_output``): the replies' JSON schemas are sent as
``response_format`` when the endpoint honours it (``auto`` probes once per endpoint and caches the
outcome, :func:`rerankflow.sdg.llm_client.probe_structured_output`); strict parsing and parse retries
stay as the fallback and the safety net.

A document whose generation or judge reply stays unusable after ``max_parse_retries`` retries, or
whose call fails after its transport retries, is counted as failed and left out; the run goes on.
A 401/403/404, or a server that stops answering (connection refused on every retry), stops the run
(no other document could succeed); finished calls stay in the cache, so a rerun resumes. Calls cost, per run:
``documents x (1 generation + 2 judges) + parse retries (+ at most 2 probe calls)`` requests (transport retries re-send the same
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
from rerankflow.sdg.checks import CHECKS, reject_reason
from rerankflow.sdg.llm_client import (STRUCTURED_MODES, CallCache, CallStats, LLMCallError, LLMClient, LLMFatalError,
                                       LLMUnreachableError, RetryPolicy, probe_key, probe_structured_output, register_secret,
                                       request_key, response_format, scrub)
from rerankflow.sdg.round_trip import round_trip_filter
from rerankflow.sdg.prompts import (QUERY_FORMS, QUERY_TYPES, ParseError, answer_judge_messages, answer_judge_schema,
                                    combine_evaluations, correction_messages, generation_messages, generation_schema,
                                    parse_answer_judge, parse_generation, parse_query_judge, query_judge_messages,
                                    query_judge_schema)

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
    forms = cfg["query_forms"]
    if not isinstance(forms, dict) or set(forms) - set(QUERY_FORMS) or not any(float(w) > 0 for w in forms.values()):
        raise InputError(f"expected weights >= 0 for some of {list(QUERY_FORMS)}, at least one > 0; got {forms!r}",
                         key="sdg.llm.query_forms")
    unknown = [c for c in cfg["reject_checks"] if c not in CHECKS]
    if unknown:
        raise InputError(f"unknown check(s) {unknown}; expected some of {list(CHECKS)}", key="sdg.llm.reject_checks")
    if cfg["structured_output"] not in ("auto", "none", *STRUCTURED_MODES):
        raise InputError(f"expected one of {['auto', *STRUCTURED_MODES, 'none']}, got {cfg['structured_output']!r}",
                         key="sdg.llm.structured_output")
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
    return plan_counts(num_pairs, weights, rng)


def plan_query_forms(num_pairs: int, mix: dict, rng: random.Random) -> dict[str, int]:
    """The schedule of query forms of one document (question / instruction / keyword), as
    :func:`plan_query_types` does for types: floors of ``num_pairs x weight``, the rest drawn (seeded)."""
    return plan_counts(num_pairs, {f: max(0.0, float(mix.get(f, 0))) for f in QUERY_FORMS}, rng)


def plan_counts(num_pairs: int, weights: dict[str, float], rng: random.Random) -> dict[str, int]:
    """Split ``num_pairs`` by ``weights``: floors of ``num_pairs x weight``, the remainder drawn
    (seeded) in proportion to what the floors left out."""
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
    """What the run will cost (documents, segments, expected calls, calls already cached), logged.
    With ``structured_output: auto`` and no probe outcome cached yet, the generation calls count as
    not cached (their requests depend on the probe)."""
    pre = {
        "documents": len(docs), "characters": sum(len(d.text) for d in docs),
        "segments": sum(len(c) for c in docs_chunks), "num_pairs": num_pairs,
        "expected_calls": 3 * len(active), "max_parse_retries": int(cfg["max_parse_retries"]),
        "generation_cached": 0 if ends.gen_mode is None else sum(
            request_key(ends.gen.payload(gen_msgs[i][0](ends.gen_structured), **ends.gen_request(gen_msgs[i][1])))
            in cache for i in active),
        "structured_output": cfg["structured_output"] if ends.gen_mode is None else ends.gen_mode,
        "model": cfg["model"], "base_url": scrub(cfg["base_url"]),
        "judge_model": ends.judge_model, "judge_base_url": scrub(ends.judge_base), "preview": preview,
    }
    _log_preflight(pre)
    return pre


def _log_preflight(pre: dict) -> None:
    log.info(
        "LLM SDG preflight: %d documents (%d characters, %d segments), %d pairs asked per document; "
        "expected calls: %d (%d generation + %d query judge + %d answer judge) plus parse retries (at most %d each); "
        "%d generation calls already cached; structured output: %s; generation %s @ %s, judge %s @ %s",
        pre["documents"], pre["characters"], pre["segments"], pre["num_pairs"], pre["expected_calls"],
        pre["expected_calls"] // 3, pre["expected_calls"] // 3, pre["expected_calls"] // 3, pre["max_parse_retries"],
        pre["generation_cached"], pre["structured_output"],
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
        self.setting = cfg["structured_output"]
        self.cache = cache
        # Structured-output mode per endpoint; None = auto, not probed yet (see probe()).
        self.probes: dict[str, dict] = {}
        self.gen_mode = self.judge_mode = None
        if self.setting != "auto":
            self.gen_mode = self.judge_mode = self.setting
        else:  # a probe outcome cached by an earlier run is known before any request
            self.gen_mode = self._cached_probe(self.gen, self.gen_params)
            self.judge_mode = self._cached_probe(self.judge, self.judge_params)

    def _cached_probe(self, client: LLMClient, params: dict) -> str | None:
        key = probe_key(client, params)
        hit = self.cache.get(key)
        return hit["mode"] if hit and hit.get("mode") else None

    def probe(self) -> None:
        """Probe the endpoints whose structured-output mode is still unknown (``auto``)."""
        if self.setting != "auto":
            return
        self.probes["generation"] = probe_structured_output(self.gen, self.cache, self.gen_params)
        self.gen_mode = self.probes["generation"]["mode"]
        if (self.judge.base_url, self.judge.model) == (self.gen.base_url, self.gen.model):
            self.probes["judge"] = {**self.probes["generation"], "calls": 0, "same_as": "generation"}
        else:
            self.probes["judge"] = probe_structured_output(self.judge, self.cache, self.judge_params)
        self.judge_mode = self.probes["judge"]["mode"]

    @property
    def gen_structured(self) -> bool:
        return self.gen_mode not in (None, "none")

    @property
    def judge_structured(self) -> bool:
        return self.judge_mode not in (None, "none")

    def gen_request(self, schema: dict) -> dict:
        return {**self.gen_params, "response_format": response_format(self.gen_mode, "qa_pairs", schema)}

    def judge_request(self, name: str, schema: dict) -> dict:
        return {**self.judge_params, "response_format": response_format(self.judge_mode, name, schema)}

    def summary(self) -> dict:
        return {"setting": self.setting, "generation": self.gen_mode, "judge": self.judge_mode,
                "probes": {k: {kk: vv for kk, vv in v.items()} for k, v in self.probes.items()}}


def _cache_for(cfg: dict, out_dir, preview: bool) -> tuple[CallCache, Path]:
    cache_dir = cfg["cache_dir"] or (Path(out_dir) / ".llm_cache" if out_dir else None)
    if cache_dir is None:
        cache_dir = Path(".llm_cache")
        log.warning("sdg.llm.cache_dir is not set and no output folder was given: caching calls in %s",
                    cache_dir.resolve())
    return CallCache(cache_dir, read_only=preview), cache_dir


def _run_phase(fn, jobs: dict, desc: str, workers: int, docs: list[Document], failures: dict, cache_dir=None) -> dict:
    """``fn(i, *args)`` for every job in a thread pool; a document whose call fails is recorded in
    ``failures`` and left out; a fatal error (401/403/404, a server that stopped answering) stops the
    run with a message that says where the finished calls are kept."""
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
            resume = ""
            if isinstance(exc, LLMUnreachableError):
                resume = (f". Every finished call is kept in {cache_dir}: start the server again and rerun, only the "
                          "missing calls are sent" if cache_dir else "")
            raise InputError(f"stopping the run during {desc}: {scrub(exc)}{resume}", key="sdg.llm") from None
    return results


def _plan(docs: list[Document], cfg: dict, num_pairs: int, sentences_per_chunk: int, seed: int):
    """Chunks per document, and its generation messages, reply schema and query-form schedule
    (None for a document without a sentence)."""
    docs_chunks, gen_msgs = [], []
    rt, min_cx = list(cfg["reasoning_types"]), int(cfg["min_complexity"])
    for doc in docs:
        chunks = chunk_document(doc.text, sentences_per_chunk)
        counts = plan_query_types(num_pairs, cfg["query_types"], len(chunks), random.Random(f"{seed}:{doc.source_id}"))
        forms = plan_query_forms(num_pairs, cfg["query_forms"], random.Random(f"{seed}:{doc.source_id}:forms"))
        docs_chunks.append(chunks)
        if not chunks:
            gen_msgs.append(None)
            continue
        ids = {c["chunk_id"] for c in chunks}
        gen_msgs.append((lambda structured, chunks=chunks, counts=counts, forms=forms, doc=doc: generation_messages(
                             doc.file_name, chunks, counts, rt, min_cx, forms, structured),
                         generation_schema(num_pairs, counts, forms, rt, ids, min_cx),
                         tuple(f for f in QUERY_FORMS if forms.get(f))))
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
    checks = tuple(cfg["reject_checks"])

    def gen_one(i):
        msgs, schema, forms = gen_msgs[i]
        ids = {c["chunk_id"] for c in docs_chunks[i]}
        pairs, invalid = _call_with_parse_retries(
            ends.gen, msgs(ends.gen_structured), ends.gen_request(schema),
            lambda text: parse_generation(text, ids, rt, min_cx, num_pairs, forms), max_pr, counters)
        kept, rejected = [], {}
        for p in pairs:  # deterministic rejects: no judge call is paid for these
            why = reject_reason(p, checks)
            if why is None:
                kept.append(p)
            else:
                rejected[why] = rejected.get(why, 0) + 1
                log.info("rejected (%s): %r -> %r", why, p["question"][:160], p["answer"][:80])
        return kept, invalid, rejected

    def judge_one(i, pairs):
        n = len(pairs)
        q_evals = _call_with_parse_retries(ends.judge, query_judge_messages(pairs, ends.judge_structured),
                                           ends.judge_request("query_evaluations", query_judge_schema(n)),
                                           lambda text: parse_query_judge(text, n), max_pr, counters)
        a_evals = _call_with_parse_retries(ends.judge, answer_judge_messages(docs[i].file_name, docs_chunks[i], pairs,
                                                                             ends.judge_structured),
                                           ends.judge_request("answer_evaluations", answer_judge_schema(n)),
                                           lambda text: parse_answer_judge(text, n), max_pr, counters)
        return [combine_evaluations(p, q, a) for p, q, a in zip(pairs, q_evals, a_evals)]

    t0 = time.time()
    try:
        ends.probe()
    except LLMCallError as exc:
        raise InputError(f"stopping the run: the structured-output probe failed: {scrub(exc)}", key="sdg.llm") from None
    generated = _run_phase(gen_one, {i: () for i in active}, "generation", workers, docs, failures, cache_dir)
    pairs_by_doc: dict[int, list[dict]] = {}
    dropped: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for i, (pairs, drop, rej) in generated.items():
        pairs_by_doc[i] = pairs
        for k, v in drop.items():
            dropped[k] = dropped.get(k, 0) + v
        for k, v in rej.items():
            rejected[k] = rejected.get(k, 0) + v
    n_parsed = sum(len(p) for p in pairs_by_doc.values()) + sum(rejected.values())
    n_checked = sum(len(p) for p in pairs_by_doc.values())
    rt_dropped = round_trip_filter(pairs_by_doc, docs_chunks, cfg, retrieval_cfg, device) \
        if cfg["round_trip_filter"] and n_checked else 0
    judged = _run_phase(judge_one, {i: (p,) for i, p in pairs_by_doc.items() if p}, "judge", workers, docs, failures,
                        cache_dir)

    records = _records(docs, docs_chunks, pairs_by_doc, judged)
    all_rejects = {**{f"invalid:{k}": v for k, v in dropped.items()}, **rejected}
    if rt_dropped:
        all_rejects["round_trip"] = rt_dropped
    summary = {
        "model": cfg["model"], "base_url": scrub(cfg["base_url"]),
        "judge_model": ends.judge_model, "judge_base_url": scrub(ends.judge_base),
        "documents": len(docs), "documents_ok": len(records), "documents_failed": len(failures),
        "failed_documents": dict(sorted(failures.items())), "expected_calls": pre["expected_calls"],
        **ends.stats.as_dict(),
        "structured_output": ends.summary(),
        "parse_failures": counters["parse_failures"], "parse_retries": counters["parse_retries"],
        "pairs_generated": n_parsed, "pairs_dropped_invalid": dict(sorted(dropped.items())),
        "pairs_rejected": dict(sorted(rejected.items())),
        "rejects_by_reason": dict(sorted(all_rejects.items())),
        "round_trip": {"enabled": bool(cfg["round_trip_filter"]), "top_k": int(cfg["round_trip_top_k"]),
                       "scope": cfg["round_trip_scope"], "dropped": rt_dropped},
        "pairs_judged": sum(len(e) for e in judged.values()),
        "pairs_kept": sum(len(r["deduplicated_qa_pairs"]) for r in records),
        "cache_dir": None if preview else str(cache_dir), "seconds": round(time.time() - t0, 2),
    }
    log.info("LLM SDG summary: %s", json.dumps({k: v for k, v in summary.items() if k != "failed_documents"}))
    if not records and active:
        err = InputError(
            f"every document failed ({len(failures)}); first failures: "
            f"{list(failures.items())[:3]} — nothing to write. Finished calls are cached in {cache_dir}",
            key="sdg.llm")
        err.summary = summary  # what the run saw (calls, parse failures), for callers that report it
        raise err
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
