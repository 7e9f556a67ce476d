"""Issue 17, items 2 and 3 against the fake OpenAI-compatible server: structured outputs (probe, modes,
fallback), NVIDIA's deterministic rejects, the two judges and the query-form schedule."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import BAD_PAIRS, FakeOpenAIServer, kind_of  # noqa: E402
from test_sdg_llm import DOCS, DUMMY_KEY, KEY_ENV, RETRIEVAL, load_documents, sdg_cfg, write_corpus  # noqa: E402

from rerankflow.errors import InputError  # noqa: E402
from rerankflow.sdg import checks  # noqa: E402
from rerankflow.sdg.llm import generate_llm, llm_settings, plan_query_forms  # noqa: E402
from rerankflow.sdg.prompts import answer_agreement, combine_evaluations  # noqa: E402


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


# ---------------------------------------------------------------- deterministic checks (no network)

@pytest.mark.parametrize("query, answer, reason", [
    ("What does the table above show about retries?", "Backoff values.", "source_relative"),
    ("In this passage, which method sorts a list?", "sort", "source_relative"),
    ("According to the text, what does bind take?", "A host and port.", "source_relative"),
    ("What is described in segment 3?", "Sockets.", "source_relative"),
    ("Which method does list.append call to add an item?", "append", "answer_in_query"),
    ("How does the sort method keep equal keys in their original order?", "keep equal keys original order",
     "answer_in_query"),
    ("Which exception does loads raise on invalid input?", "Not specified.", "answer_not_specified"),
    ("Which exception does loads raise on invalid input?", "The documentation does not mention it.",
     "answer_not_specified"),
    ("Which exception does loads raise on invalid input?", "N/A", "answer_not_specified"),
    ("How many bytes are in a 1,024 byte block buffer?", "1024 bytes each", "numeric_answer_in_query"),
    ("How do I append an item to the list?", "Call append with the item.", None),
    ("How do I find a word in the text with sed?", "Use a regular expression address.", None),
    ("Which exception does loads raise on invalid input?", "JSONDecodeError, for unknown or malformed input.", None),
    ("How many items does the default buffer hold?", "1024", None),
])
def test_reject_reason_examples(query, answer, reason):
    assert checks.reject_reason({"question": query, "answer": answer}, checks.CHECKS) == reason


def test_form_checks_follow_the_schedule():
    assert checks.form_mismatch("How do sockets bind?", "question") is False
    assert checks.form_mismatch("sockets bind port", "question") is True
    assert checks.form_mismatch("Explain how sockets bind to a port.", "instruction") is False
    assert checks.form_mismatch("Explain how sockets bind?", "instruction") is True
    assert checks.form_mismatch("socket bind port reuse", "keyword") is False
    assert checks.form_mismatch("how do i make a socket bind to a port that is in use", "keyword") is True
    # a check left out of reject_checks is not applied
    assert checks.reject_reason({"question": "sockets bind port", "answer": "x y", "query_form": "question"},
                                [c for c in checks.CHECKS if c != "form_mismatch"]) is None


def test_query_forms_are_scheduled_by_weight_and_seeded():
    mix = {"question": 0.6, "instruction": 0.2, "keyword": 0.2}
    assert plan_query_forms(10, mix, random.Random(0)) == {"question": 6, "instruction": 2, "keyword": 2}
    a = [plan_query_forms(4, mix, random.Random(f"7:{d}")) for d in range(20)]
    b = [plan_query_forms(4, mix, random.Random(f"7:{d}")) for d in range(20)]
    assert a == b and all(sum(c.values()) == 4 for c in a)
    assert {f for c in a for f, n in c.items() if n} == {"question", "instruction", "keyword"}


def test_accuracy_is_agreement_with_the_answer_judge_that_never_saw_the_answer():
    assert answer_agreement("The sort method is stable.", "sort is stable") == 1.0
    assert answer_agreement("The sort method is stable.", "not answerable") == 0.0
    pair = {"question": "q?", "answer": "Sockets bind to a host and port."}
    q = {c: {"score": 8.0, "justification": c} for c in ("standalone", "plausible", "discriminative")}
    a = {"relevance": {"score": 9.0, "justification": "r"}, "context_support": {"score": 7.0, "justification": "c"},
         "answer": "a host and a port"}
    ev = combine_evaluations(pair, q, a)
    assert ev["accuracy"]["score"] == 10.0 and ev["clarity"]["score"] == 8.0
    assert ev["overall"]["score"] == round((9 + 10 + 7 + 8 * 3) / 6, 1)
    assert set(ev) >= {"relevance", "accuracy", "context_support", "clarity", "overall"}


def test_bad_settings_name_the_key():
    base = sdg_cfg(SimpleNamespace(base_url="http://127.0.0.1:9/v1"), None)
    for key, value, match in (("query_forms", {"question": 0, "keyword": 0}, "sdg.llm.query_forms"),
                              ("reject_checks", ["source_relative", "vibes"], "sdg.llm.reject_checks"),
                              ("structured_output", "grammar", "sdg.llm.structured_output")):
        cfg = json.loads(json.dumps(base))
        cfg["llm"][key] = value
        with pytest.raises(InputError, match=match):
            llm_settings(cfg)


# ---------------------------------------------------------------- against the fake server

def test_deterministic_rejects_are_counted_by_reason_and_never_judged(fake, tmp_path):
    docs = load_documents(write_corpus(tmp_path / "c", {
        "rejects.txt": "REJECTS_DOC marks this document for the tests. " + DOCS["json.txt"]}))
    cfg = sdg_cfg(fake, tmp_path / "cache", query_forms={"question": 1.0, "instruction": 0.0, "keyword": 0.0})
    cfg["num_pairs"] = 6
    records, summary = generate_llm(docs, cfg, RETRIEVAL, seed=0, device="cpu")
    assert summary["pairs_rejected"] == {c: 1 for c in checks.CHECKS}
    assert {k: v for k, v in summary["rejects_by_reason"].items() if not k.startswith("invalid:")} == \
        {c: 1 for c in checks.CHECKS}
    (rec,) = records
    assert len(rec["deduplicated_qa_pairs"]) == 1 == summary["pairs_judged"] == summary["pairs_kept"]
    # neither judge saw a rejected query
    for b in fake.requests:
        if kind_of(b) in ("query_judge", "answer_judge"):
            assert b["messages"][1]["content"].count("Query ") == 1
            assert not any(q in b["messages"][1]["content"] for q, _a in BAD_PAIRS)
    # the blind judge sees only the queries; the answer judge sees the segments but not the answers
    qj = next(b for b in fake.requests if kind_of(b) == "query_judge")["messages"][1]["content"]
    aj = next(b for b in fake.requests if kind_of(b) == "answer_judge")["messages"][1]["content"]
    answer = rec["deduplicated_qa_pairs"][0]["answer"]
    assert "[Segment" not in qj and answer not in qj
    assert "[Segment 1]" in aj and "answer:" not in aj.split("Segments:")[1].split("For every query")[0]


@pytest.mark.parametrize("server_mode, expected, tried", [
    ("both", "json_schema", {"json_schema": "honoured"}),
    ("json_object", "json_object", {"json_schema": "refused: HTTP 422", "json_object": "honoured"}),
    ("refuse", "none", {"json_schema": "refused: HTTP 400", "json_object": "refused: HTTP 400"}),
])
def test_auto_probes_once_and_uses_what_the_server_honours(fake, tmp_path, server_mode, expected, tried):
    fake.structured = server_mode
    docs = load_documents(write_corpus(tmp_path / "c", dict(list(DOCS.items())[:2])))
    cfg = sdg_cfg(fake, tmp_path / "cache", structured_output="auto")
    records, summary = generate_llm(docs, cfg, RETRIEVAL, seed=0, device="cpu")
    assert len(records) == 2 and summary["documents_failed"] == 0
    so = summary["structured_output"]
    assert so["generation"] == so["judge"] == expected
    assert {k: v.split(" (")[0] for k, v in so["probes"]["generation"]["tried"].items()} == tried
    work = [b for b in fake.requests if kind_of(b) != "probe"]
    assert len(work) == 6
    if expected == "none":
        assert all("response_format" not in b for b in work)
    else:
        assert all(b["response_format"]["type"] == expected for b in work)
        gen = next(b for b in work if kind_of(b) == "generation")
        schema = gen["response_format"]["json_schema"]["schema"] if expected == "json_schema" \
            else gen["response_format"]["schema"]
        assert schema["properties"]["qa_pairs"]["minItems"] == cfg["num_pairs"]
    # a rerun knows the outcome from the cache: no probe, no call
    n = len(fake.requests)
    _records, summary2 = generate_llm(docs, cfg, RETRIEVAL, seed=0, device="cpu")
    assert len(fake.requests) == n and summary2["calls"] == 0
    assert summary2["structured_output"]["generation"] == expected


def test_a_server_that_ignores_response_format_falls_back_to_parsing(fake, tmp_path):
    fake.structured = "ignore"
    docs = load_documents(write_corpus(tmp_path / "c", dict(list(DOCS.items())[:1])))
    records, summary = generate_llm(docs, sdg_cfg(fake, tmp_path / "cache", structured_output="auto"), RETRIEVAL,
                                    seed=0, device="cpu")
    assert summary["structured_output"]["generation"] == "none"
    assert summary["structured_output"]["probes"]["generation"]["tried"]["json_schema"].startswith("ignored")
    assert len(records) == 1 and records[0]["deduplicated_qa_pairs"]   # fenced <think> replies still parse


def test_explicit_mode_sends_no_probe(fake, tmp_path):
    docs = load_documents(write_corpus(tmp_path / "c", dict(list(DOCS.items())[:1])))
    _r, summary = generate_llm(docs, sdg_cfg(fake, tmp_path / "cache", structured_output="json_object"), RETRIEVAL,
                               seed=0, device="cpu")
    assert fake.count("probe") == 0 and summary["calls"] == 3
    assert all(b["response_format"]["type"] == "json_object" for b in fake.requests)
