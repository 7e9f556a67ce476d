"""Prompts of the ``llm`` SDG backend and the strict parsing of what the model answers.

Three calls per document (NVIDIA's retrieval SDG: a generator, then two judges that each see less):

1. **generation** — the document as numbered segments (``[Segment 3] ...``, the ``chunk_id`` of
   :func:`rerankflow.sdg.chunking.chunk_document`); the model writes ``num_pairs`` query/answer pairs
   with a given mix of query types *and query forms* (a ``question``, an ``instruction`` or a
   ``keyword`` query, on the schedule of ``sdg.llm.query_forms``), one of the configured reasoning
   types and a complexity of at least ``min_complexity`` (scale 1-5), each citing the segment ids it
   relies on. Reply format::

       {"qa_pairs": [{"question", "answer", "query_type", "query_form", "reasoning_type",
                      "question_complexity": 1-5, "segment_ids": [int, ...], "hop_count": int}]}

2. **blind query judge** — sees *only the queries* (no document, no answer) and scores each on
   ``standalone`` (understandable without the source), ``plausible`` (a real user would type it) and
   ``discriminative`` (specific enough to single out the passages that answer it), 1-10 with a
   justification. Reply: ``{"query_evaluations": [{"standalone": {"score", "justification"}, ...}]}``.

3. **answer judge** — sees the segments and the queries with their cited segment ids, but *not the
   generated answers*; per query it scores ``relevance`` and ``context_support`` (the cited segments
   alone answer it) and writes its own short ``answer`` from the cited segments. Reply:
   ``{"answer_evaluations": [{"relevance": {...}, "context_support": {...}, "answer": "..."}]}``.
   :func:`combine_evaluations` turns both judges' scores into the record's evaluation (accuracy =
   agreement of the generated answer with the judge's own, see there).

Structured outputs: :func:`generation_schema`, :func:`query_judge_schema` and :func:`answer_judge_schema`
are the JSON schemas of the three replies, sent as ``response_format`` when the endpoint supports it
(``sdg.llm.structured_output``), so that even a small model returns parseable records. Parsing stays
strict either way: the reply (after removing a ``<think>...</think>`` block and one surrounding
Markdown code fence, which reasoning and chat models add) must be exactly one JSON object of the
shape above, else :class:`ParseError` (the caller asks again, telling the model what was wrong).
Inside a valid generation reply, a pair that breaks a rule (unknown segment id, multi-hop citing a
single segment, complexity below the floor, unknown type or form...) is dropped and counted by reason;
a reply left with no valid pair is a :class:`ParseError`. A judge reply must score every query.
"""

from __future__ import annotations

import json
import re

QUERY_TYPES = ("multi_hop", "structural", "contextual")
QUERY_TYPE_HELP = {
    "multi_hop": "needs facts from at least two different segments combined; cite every segment used; hop_count = number of segments needed (>= 2)",
    "structural": "about how the document is organised or how its parts, steps, options or components relate to each other",
    "contextual": "answerable from one segment (or a few adjacent ones) but only with its surrounding context, not by keyword lookup",
}
QUERY_FORMS = ("question", "instruction", "keyword")
# (form, help) pairs: the prompt's help text per query form (not the weights of sdg.llm.query_forms).
# No example queries: small models copy them verbatim.
QUERY_FORM_HELP = dict((
    ("question", "a natural question ending with a question mark"),
    ("instruction", "an imperative request (explain, describe, list, show...) without a question mark"),
    ("keyword", "a short keyword query of at most 8 words, as typed into a search box, no question mark"),
))
CRITERIA = ("relevance", "accuracy", "context_support", "clarity")
QUERY_CRITERIA = ("standalone", "plausible", "discriminative")
ANSWER_CRITERIA = ("relevance", "context_support")
GEN_MARKER = '"qa_pairs"'
QUERY_JUDGE_MARKER = '"query_evaluations"'
ANSWER_JUDGE_MARKER = '"answer_evaluations"'


class ParseError(ValueError):
    """The model's reply is not the requested JSON (message says what is wrong, for the retry prompt)."""


def number_segments(chunks: list[dict]) -> str:
    """Render chunks as ``[Segment <chunk_id>] <text>`` lines."""
    return "\n\n".join(f"[Segment {c['chunk_id']}] {' '.join(c['text'].split())}" for c in chunks)


GEN_SYSTEM = (
    "You write search queries with answers for training a document reranker. You read a document split "
    "into numbered segments and write realistic, self-contained queries a user of this documentation "
    "would type, each answerable only from the segments it cites. You reply with one JSON object and "
    "nothing else."
)


def _reply_format(example: str, fields: str, structured: bool) -> str:
    """The closing instruction: with a structured output the server enforces the schema, so the prompt
    names the fields instead of showing an example object (small models copy an example's placeholders
    and scores verbatim); without one, the example object is the only format description."""
    if structured:
        key = example.split(":", 1)[0].lstrip("{")
        return f"Reply with one JSON object {{{key}: [...]}} whose entries have the fields: {fields}."
    return f"Reply with only this JSON object (no Markdown, no commentary):\n{example}"


def generation_messages(file_name: str, chunks: list[dict], counts: dict[str, int], reasoning_types: list[str],
                        min_complexity: int, forms: dict[str, int] | None = None, structured: bool = False) -> list[dict]:
    """Chat messages of the generation call (deterministic for its inputs, so the cache can key on them).

    ``counts``: questions per query type; ``forms``: queries per query form (same total), the schedule
    of ``sdg.llm.query_forms``; ``structured``: the reply's schema is sent as ``response_format``.
    """
    n = sum(counts.values())
    forms = forms or {"question": n}
    mix = "\n".join(f"- {k} questions: {v} ({QUERY_TYPE_HELP[k]})" for k, v in counts.items() if v > 0)
    form_mix = "\n".join(f"- {k}: {v} ({QUERY_FORM_HELP[k]})" for k, v in forms.items() if v > 0)
    user = (
        f"Document: {file_name}\n\nSegments:\n{number_segments(chunks)}\n\n"
        f"Write exactly {n} query-answer pairs about this document:\n{mix}\n\n"
        f"Query forms (query_form), {n} in all:\n{form_mix}\n\n"
        "Rules:\n"
        f"- reasoning_type is one of: {', '.join(reasoning_types)}.\n"
        "- question_complexity is an integer from 1 (a single-fact lookup) to 5 (synthesis of several facts); "
        f"every question must have complexity >= {min_complexity}.\n"
        "- segment_ids lists the ids of every segment the answer relies on (integers shown in [Segment N]); "
        "hop_count is the number of reasoning steps (1 for a single segment).\n"
        "- Queries must stand alone: never write 'this document', 'the text', 'segment', 'the passage' or "
        "'the table above'. Do not copy a sentence verbatim as the query, and never put the answer in the query.\n"
        "- Answers are complete, short and use only the cited segments; never answer 'not specified'.\n\n"
        + _reply_format(
            '{"qa_pairs": [{"question": "...", "answer": "...", "query_type": "multi_hop|structural|contextual", '
            '"query_form": "question|instruction|keyword", '
            '"reasoning_type": "...", "question_complexity": 3, "segment_ids": [1, 2], "hop_count": 2}]}',
            "question (your query), answer (its answer from the cited segments), query_type, query_form, "
            "reasoning_type, question_complexity, segment_ids, hop_count", structured)
    )
    return [{"role": "system", "content": GEN_SYSTEM}, {"role": "user", "content": user}]


QUERY_JUDGE_SYSTEM = (
    "You are a strict evaluator of search queries written for training a document reranker. You see only "
    "the queries, never the documents. You reply with one JSON object and nothing else."
)


def query_judge_messages(pairs: list[dict], structured: bool = False) -> list[dict]:
    """Chat messages of the blind query judge: the queries only (no document, no answer)."""
    listing = "\n".join(f"Query {i + 1}: {p['question']}" for i, p in enumerate(pairs))
    user = (
        f"{listing}\n\n"
        "Score every query from 1 (worst) to 10 (best) on:\n"
        "- standalone: can it be understood without seeing any document? (It must not refer to 'the text', "
        "'this passage', 'the table above' or similar.)\n"
        "- plausible: would a real user of technical documentation type it into a search engine?\n"
        "- discriminative: is it specific enough that only a few passages would answer it?\n"
        "Give a one-sentence justification for each score.\n\n"
        f"Exactly {len(pairs)} entries, in query order. "
        + _reply_format(
            '{"query_evaluations": [{"standalone": {"score": 8, "justification": "..."}, '
            '"plausible": {"score": 7, "justification": "..."}, "discriminative": {"score": 6, "justification": "..."}}]}',
            "standalone, plausible, discriminative, each {score, justification}", structured)
    )
    return [{"role": "system", "content": QUERY_JUDGE_SYSTEM}, {"role": "user", "content": user}]


ANSWER_JUDGE_SYSTEM = (
    "You are a strict evaluator of search queries written for training a document reranker. You check each "
    "query against the document segments it cites. You reply with one JSON object and nothing else."
)


def answer_judge_messages(file_name: str, chunks: list[dict], pairs: list[dict], structured: bool = False) -> list[dict]:
    """Chat messages of the answer judge: the segments and the queries with their cited segment ids,
    never the generated answers (so the judge is not anchored by them)."""
    listing = "\n".join(f"Query {i + 1}: {p['question']}\ncited segments: {p['segment_ids']}"
                        for i, p in enumerate(pairs))
    user = (
        f"Document: {file_name}\n\nSegments:\n{number_segments(chunks)}\n\n{listing}\n\n"
        "For every query, using only its cited segments:\n"
        "- relevance (1-10): is the query about the content of its cited segments?\n"
        "- context_support (1-10): do the cited segments alone contain everything needed to answer it?\n"
        "- answer: your own short answer from the cited segments (\"not answerable\" if they do not answer it).\n"
        "Give a one-sentence justification for each score.\n\n"
        f"Exactly {len(pairs)} entries, in query order. "
        + _reply_format(
            '{"answer_evaluations": [{"relevance": {"score": 8, "justification": "..."}, '
            '"context_support": {"score": 9, "justification": "..."}, "answer": "..."}]}',
            "relevance and context_support, each {score, justification}, and answer (your own short answer)",
            structured)
    )
    return [{"role": "system", "content": ANSWER_JUDGE_SYSTEM}, {"role": "user", "content": user}]


def correction_messages(messages: list[dict], bad_reply: str, problem: str) -> list[dict]:
    """The conversation for a parse retry: the conversation so far, the unusable reply, what was wrong."""
    return messages + [
        {"role": "assistant", "content": bad_reply[:4000]},
        {"role": "user", "content": f"That reply could not be used: {problem}. Reply again with only the JSON "
                                    "object in the requested format, nothing else."},
    ]


# ---------------------------------------------------------------- JSON schemas (structured outputs)

def _obj(props: dict) -> dict:
    # Every property required and nothing else allowed: what OpenAI's strict mode demands, and what
    # grammar-based servers (llama.cpp, vLLM's guided decoding) turn into a tight grammar.
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _scored(criteria) -> dict:
    return _obj({c: _obj({"score": {"type": "integer", "enum": list(range(1, 11))},
                          "justification": {"type": "string"}}) for c in criteria})


def generation_schema(n: int, counts: dict[str, int], forms: dict[str, int], reasoning_types: list[str],
                      chunk_ids, min_complexity: int) -> dict:
    """JSON schema of the generation reply: exactly ``n`` pairs whose types, forms, reasoning types,
    complexities and segment ids can only take allowed values."""
    pair = _obj({
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "query_type": {"type": "string", "enum": [t for t in QUERY_TYPES if counts.get(t)]},
        "query_form": {"type": "string", "enum": [f for f in QUERY_FORMS if forms.get(f)]},
        "reasoning_type": {"type": "string", "enum": list(reasoning_types)},
        "question_complexity": {"type": "integer", "enum": list(range(max(1, min_complexity), 6))},
        "segment_ids": {"type": "array", "items": {"type": "integer", "enum": sorted(chunk_ids)}, "minItems": 1},
        "hop_count": {"type": "integer", "enum": list(range(1, max(2, len(chunk_ids)) + 1))},
    })
    return _obj({"qa_pairs": {"type": "array", "items": pair, "minItems": n, "maxItems": n}})


def query_judge_schema(n: int) -> dict:
    return _obj({"query_evaluations": {"type": "array", "items": _scored(QUERY_CRITERIA), "minItems": n, "maxItems": n}})


def answer_judge_schema(n: int) -> dict:
    item = _scored(ANSWER_CRITERIA)
    item["properties"]["answer"] = {"type": "string"}
    item["required"].append("answer")
    return _obj({"answer_evaluations": {"type": "array", "items": item, "minItems": n, "maxItems": n}})


# ---------------------------------------------------------------- parsing

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def extract_json_object(text: str) -> dict:
    """The single JSON object of a reply (see module docstring) or :class:`ParseError`."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("the reply was empty")
    s = _THINK.sub("", text)
    if "</think>" in s:  # reasoning output whose opening tag the server stripped
        s = s.rsplit("</think>", 1)[1]
    s = s.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    try:
        # strict=False: raw newlines/tabs inside strings, which small models emit even under a grammar
        obj = json.loads(s, strict=False)
    except json.JSONDecodeError as exc:
        raise ParseError(f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ParseError(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


_TEXT = re.compile(r"[^\W_]{2}")


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return None


def validate_pair(p, chunk_ids: set[int], reasoning_types: list[str], min_complexity: int,
                  forms=QUERY_FORMS) -> tuple[dict | None, str | None]:
    """``(clean pair, None)`` or ``(None, reason it was dropped)``; ``forms``: the query forms asked for."""
    if not isinstance(p, dict):
        return None, "not_an_object"
    q, a = p.get("question"), p.get("answer")
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        return None, "missing_question_or_answer"
    if not _TEXT.search(q) or not _TEXT.search(a):  # "...", the prompt's placeholder, copied
        return None, "placeholder_text"
    qt = p.get("query_type")
    if not isinstance(qt, str) or qt.strip().lower() not in QUERY_TYPES:
        return None, "unknown_query_type"
    qt = qt.strip().lower()
    qf = p.get("query_form")
    if not isinstance(qf, str) or qf.strip().lower() not in forms:
        return None, "unknown_query_form"
    qf = qf.strip().lower()
    rt = p.get("reasoning_type")
    allowed = {r.lower(): r for r in reasoning_types}
    if not isinstance(rt, str) or rt.strip().lower() not in allowed:
        return None, "unknown_reasoning_type"
    cx = _as_int(p.get("question_complexity"))
    if cx is None or not 1 <= cx <= 5:
        return None, "invalid_complexity"
    if cx < min_complexity:
        return None, "below_min_complexity"
    raw = p.get("segment_ids")
    if not isinstance(raw, list) or not raw:
        return None, "missing_segment_ids"
    segs: list[int] = []
    for s in raw:
        si = _as_int(s)
        if si is None or si not in chunk_ids:
            return None, "unknown_segment_id"
        if si not in segs:
            segs.append(si)
    hops = _as_int(p.get("hop_count"))
    if hops is None or hops < 1:
        return None, "invalid_hop_count"
    if qt == "multi_hop" and (len(segs) < 2 or hops < 2):
        return None, "multi_hop_single_segment"
    return {
        "question": " ".join(q.split()),
        "answer": a.strip(),
        "query_type": qt,
        "query_form": qf,
        "reasoning_type": allowed[rt.strip().lower()],
        "question_complexity": cx,
        "segment_ids": segs,
        "hop_count": hops,
    }, None


def parse_generation(text: str, chunk_ids: set[int], reasoning_types: list[str], min_complexity: int,
                     num_pairs: int, forms=QUERY_FORMS) -> tuple[list[dict], dict[str, int]]:
    """Valid pairs (at most ``num_pairs``, duplicates of an earlier question dropped) and drop counts."""
    obj = extract_json_object(text)
    pairs = obj.get("qa_pairs")
    if not isinstance(pairs, list):
        raise ParseError('the object has no "qa_pairs" list')
    kept: list[dict] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for p in pairs:
        clean, why = validate_pair(p, chunk_ids, reasoning_types, min_complexity, forms)
        if clean is not None and clean["question"].lower() in seen:
            clean, why = None, "repeated_question"
        if clean is None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        if len(kept) >= num_pairs:
            dropped["beyond_num_pairs"] = dropped.get("beyond_num_pairs", 0) + 1
            continue
        seen.add(clean["question"].lower())
        kept.append(clean)
    if not kept:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "the list was empty"
        raise ParseError(f"no valid question-answer pair ({detail}); segment ids must be among "
                         f"{sorted(chunk_ids)[:50]}, complexity >= {min_complexity}, query_form one of "
                         f"{list(forms)}, multi_hop pairs cite >= 2 segments")
    return kept, dropped


def _score(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if isinstance(v, (int, float)) and 1 <= v <= 10:
        return round(float(v), 1)
    return None


def _scored_items(text: str, marker: str, n: int, criteria) -> list[tuple[dict, dict]]:
    obj = extract_json_object(text)
    key = marker.strip('"')
    evals = obj.get(key)
    if not isinstance(evals, list):
        raise ParseError(f'the object has no "{key}" list')
    if len(evals) != n:
        raise ParseError(f'"{key}" has {len(evals)} entries; expected exactly {n}, one per query in order')
    out = []
    for i, e in enumerate(evals):
        if not isinstance(e, dict):
            raise ParseError(f"evaluation {i + 1} is not an object")
        rec = {}
        for c in criteria:
            item = e.get(c)
            score = _score(item.get("score")) if isinstance(item, dict) else None
            just = item.get("justification") if isinstance(item, dict) else None
            if score is None or not isinstance(just, str):
                raise ParseError(f'evaluation {i + 1}: "{c}" needs {{"score": 1-10, "justification": "..."}}')
            rec[c] = {"score": score, "justification": just.strip()}
        out.append((rec, e))
    return out


def parse_query_judge(text: str, n: int) -> list[dict]:
    """One ``{standalone, plausible, discriminative}`` evaluation per query, or :class:`ParseError`."""
    return [rec for rec, _raw in _scored_items(text, QUERY_JUDGE_MARKER, n, QUERY_CRITERIA)]


def parse_answer_judge(text: str, n: int) -> list[dict]:
    """One ``{relevance, context_support, answer}`` evaluation per query, or :class:`ParseError`."""
    out = []
    for i, (rec, raw) in enumerate(_scored_items(text, ANSWER_JUDGE_MARKER, n, ANSWER_CRITERIA)):
        ans = raw.get("answer")
        if not isinstance(ans, str):
            raise ParseError(f'evaluation {i + 1}: "answer" needs a string (your own short answer)')
        rec["answer"] = " ".join(ans.split())
        out.append(rec)
    return out


def answer_agreement(generated: str, judge_answer: str) -> float:
    """Share (0-1) of the content words of the judge's own answer that the generated answer contains;
    0 when the judge found the query not answerable or wrote no content word."""
    from rerankflow.sdg.checks import answer_not_specified, content_words

    if answer_not_specified(judge_answer) or "not answerable" in judge_answer.lower():
        return 0.0
    jw = set(content_words(judge_answer))
    if not jw:
        return 0.0
    return len(jw & set(content_words(generated))) / len(jw)


def combine_evaluations(pair: dict, query_eval: dict, answer_eval: dict) -> dict:
    """The record's evaluation of ``pair`` from the two judges (the SDG record format of
    :mod:`rerankflow.sdg.run` plus the judges' raw scores):

    * ``relevance``, ``context_support``: the answer judge's;
    * ``accuracy``: ``1 + 9 x`` :func:`answer_agreement` of the generated answer with the answer
      judge's own answer (the judge never saw the generated one);
    * ``clarity``: mean of the blind query judge's ``standalone`` and ``discriminative``;
    * ``overall``: mean of relevance, accuracy, context_support and the three query-judge scores.
    """
    agree = answer_agreement(pair["answer"], answer_eval["answer"])
    accuracy = round(1 + 9 * agree, 1)
    clarity = round((query_eval["standalone"]["score"] + query_eval["discriminative"]["score"]) / 2, 1)
    parts = [answer_eval["relevance"]["score"], accuracy, answer_eval["context_support"]["score"],
             *(query_eval[c]["score"] for c in QUERY_CRITERIA)]
    overall = round(sum(parts) / len(parts), 1)
    return {
        "relevance": dict(answer_eval["relevance"]),
        "accuracy": {"score": accuracy, "justification": f"the generated answer holds {agree:.0%} of the content words "
                                                         f"of the answer judge's own answer: {answer_eval['answer'][:200]!r}"},
        "context_support": dict(answer_eval["context_support"]),
        "clarity": {"score": clarity, "justification": "blind query judge: "
                                                       f"standalone {query_eval['standalone']['justification']} / "
                                                       f"discriminative {query_eval['discriminative']['justification']}"},
        "overall": {"score": overall, "assessment": "mean of relevance, accuracy, context_support (answer judge) and "
                                                     "standalone, plausible, discriminative (blind query judge)"},
        "query_judge": {c: dict(query_eval[c]) for c in QUERY_CRITERIA},
        "answer_judge": {"answer": answer_eval["answer"]},
    }
