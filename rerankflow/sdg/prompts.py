"""Prompts of the ``llm`` SDG backend and the strict parsing of what the model answers.

Two calls per document, as in NVIDIA's recipe:

1. **generation** — the document as numbered segments (``[Segment 3] ...``, the ``chunk_id`` of
   :func:`rerankflow.sdg.chunking.chunk_document`); the model writes ``num_pairs`` question/answer pairs
   with a given mix of query types, one of the configured reasoning types and a complexity of at
   least ``min_complexity`` (scale 1-5), each citing the segment ids it relies on. Reply format::

       {"qa_pairs": [{"question", "answer", "query_type", "reasoning_type",
                      "question_complexity": 1-5, "segment_ids": [int, ...], "hop_count": int}]}

2. **judge** — the same segments and the surviving pairs; the model scores each pair on
   relevance, accuracy, context_support and clarity (1-10 with a justification) and overall
   (1-10 with an assessment). Reply format::

       {"evaluations": [{"relevance": {"score", "justification"}, ..., "overall": {"score", "assessment"}}]}

   exactly one entry per pair, in order.

Parsing is strict: the reply (after removing a ``<think>...</think>`` block and one surrounding
Markdown code fence, which reasoning and chat models add) must be exactly one JSON object of the
shape above, else :class:`ParseError` (the caller asks again, telling the model what was wrong).
Inside a valid generation reply, a pair that breaks a rule (unknown segment id, multi-hop citing a
single segment, complexity below the floor, unknown type...) is dropped and counted by reason;
a reply left with no valid pair is a :class:`ParseError`. A judge reply must score every pair.
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
CRITERIA = ("relevance", "accuracy", "context_support", "clarity")
GEN_MARKER = '"qa_pairs"'
JUDGE_MARKER = '"evaluations"'


class ParseError(ValueError):
    """The model's reply is not the requested JSON (message says what is wrong, for the retry prompt)."""


def number_segments(chunks: list[dict]) -> str:
    """Render chunks as ``[Segment <chunk_id>] <text>`` lines."""
    return "\n\n".join(f"[Segment {c['chunk_id']}] {' '.join(c['text'].split())}" for c in chunks)


GEN_SYSTEM = (
    "You write search queries with answers for training a document reranker. You read a document split "
    "into numbered segments and write realistic, self-contained questions a user of this documentation "
    "would type, each answerable only from the segments it cites. You reply with one JSON object and "
    "nothing else."
)


def generation_messages(file_name: str, chunks: list[dict], counts: dict[str, int], reasoning_types: list[str],
                        min_complexity: int) -> list[dict]:
    """Chat messages of the generation call (deterministic for its inputs, so the cache can key on them)."""
    n = sum(counts.values())
    mix = "\n".join(f"- {k} questions: {v} ({QUERY_TYPE_HELP[k]})" for k, v in counts.items() if v > 0)
    user = (
        f"Document: {file_name}\n\nSegments:\n{number_segments(chunks)}\n\n"
        f"Write exactly {n} question-answer pairs about this document:\n{mix}\n\n"
        "Rules:\n"
        f"- reasoning_type is one of: {', '.join(reasoning_types)}.\n"
        "- question_complexity is an integer from 1 (a single-fact lookup) to 5 (synthesis of several facts); "
        f"every question must have complexity >= {min_complexity}.\n"
        "- segment_ids lists the ids of every segment the answer relies on (integers shown in [Segment N]); "
        "hop_count is the number of reasoning steps (1 for a single segment).\n"
        "- Questions must stand alone: never write 'this document', 'the text', 'segment' or 'the passage'. "
        "Do not copy a sentence verbatim as the question.\n"
        "- Answers are complete and use only the cited segments.\n\n"
        "Reply with only this JSON object (no Markdown, no commentary):\n"
        '{"qa_pairs": [{"question": "...", "answer": "...", "query_type": "multi_hop|structural|contextual", '
        '"reasoning_type": "...", "question_complexity": 3, "segment_ids": [1, 2], "hop_count": 2}]}'
    )
    return [{"role": "system", "content": GEN_SYSTEM}, {"role": "user", "content": user}]


JUDGE_SYSTEM = (
    "You are a strict evaluator of synthetic question-answer pairs used to train a document reranker. "
    "You score each pair against the document segments it cites. You reply with one JSON object and "
    "nothing else."
)


def judge_messages(file_name: str, chunks: list[dict], pairs: list[dict]) -> list[dict]:
    """Chat messages of the judge call for the pairs of one document."""
    listing = "\n\n".join(
        f"Pair {i + 1}:\nquestion: {p['question']}\nanswer: {p['answer']}\ncited segments: {p['segment_ids']}"
        for i, p in enumerate(pairs)
    )
    user = (
        f"Document: {file_name}\n\nSegments:\n{number_segments(chunks)}\n\n{listing}\n\n"
        "Score every pair from 1 (worst) to 10 (best) on:\n"
        "- relevance: is the question one a real user of this document would ask, and about its content?\n"
        "- accuracy: is the answer correct according to the cited segments?\n"
        "- context_support: do the cited segments contain everything needed to answer?\n"
        "- clarity: is the question clear, specific and self-contained?\n"
        "- overall: your overall judgement of the pair as training data.\n"
        "Give a one-sentence justification for each criterion and an assessment for overall.\n\n"
        f"Reply with only this JSON object, with exactly {len(pairs)} entries in pair order (no Markdown, no commentary):\n"
        '{"evaluations": [{"relevance": {"score": 8, "justification": "..."}, '
        '"accuracy": {"score": 9, "justification": "..."}, "context_support": {"score": 8, "justification": "..."}, '
        '"clarity": {"score": 7, "justification": "..."}, "overall": {"score": 8, "assessment": "..."}}]}'
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def correction_messages(messages: list[dict], bad_reply: str, problem: str) -> list[dict]:
    """The conversation for a parse retry: the conversation so far, the unusable reply, what was wrong."""
    return messages + [
        {"role": "assistant", "content": bad_reply[:4000]},
        {"role": "user", "content": f"That reply could not be used: {problem}. Reply again with only the JSON "
                                    "object in the requested format, nothing else."},
    ]


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
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        raise ParseError(f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ParseError(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


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


def validate_pair(p, chunk_ids: set[int], reasoning_types: list[str], min_complexity: int) -> tuple[dict | None, str | None]:
    """``(clean pair, None)`` or ``(None, reason it was dropped)``."""
    if not isinstance(p, dict):
        return None, "not_an_object"
    q, a = p.get("question"), p.get("answer")
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        return None, "missing_question_or_answer"
    qt = p.get("query_type")
    if not isinstance(qt, str) or qt.strip().lower() not in QUERY_TYPES:
        return None, "unknown_query_type"
    qt = qt.strip().lower()
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
        "reasoning_type": allowed[rt.strip().lower()],
        "question_complexity": cx,
        "segment_ids": segs,
        "hop_count": hops,
    }, None


def parse_generation(text: str, chunk_ids: set[int], reasoning_types: list[str], min_complexity: int,
                     num_pairs: int) -> tuple[list[dict], dict[str, int]]:
    """Valid pairs (at most ``num_pairs``, duplicates of an earlier question dropped) and drop counts."""
    obj = extract_json_object(text)
    pairs = obj.get("qa_pairs")
    if not isinstance(pairs, list):
        raise ParseError('the object has no "qa_pairs" list')
    kept: list[dict] = []
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for p in pairs:
        clean, why = validate_pair(p, chunk_ids, reasoning_types, min_complexity)
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
                         f"{sorted(chunk_ids)[:50]}, complexity >= {min_complexity}, multi_hop pairs cite >= 2 segments")
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


def parse_judge(text: str, n_pairs: int) -> list[dict]:
    """One evaluation per pair, in the SDG record's shape, or :class:`ParseError`."""
    obj = extract_json_object(text)
    evals = obj.get("evaluations")
    if not isinstance(evals, list):
        raise ParseError('the object has no "evaluations" list')
    if len(evals) != n_pairs:
        raise ParseError(f'"evaluations" has {len(evals)} entries; expected exactly {n_pairs}, one per pair in order')
    out = []
    for i, e in enumerate(evals):
        if not isinstance(e, dict):
            raise ParseError(f"evaluation {i + 1} is not an object")
        rec = {}
        for c in CRITERIA:
            item = e.get(c)
            score = _score(item.get("score")) if isinstance(item, dict) else None
            just = item.get("justification") if isinstance(item, dict) else None
            if score is None or not isinstance(just, str):
                raise ParseError(f'evaluation {i + 1}: "{c}" needs {{"score": 1-10, "justification": "..."}}')
            rec[c] = {"score": score, "justification": just.strip()}
        ov = e.get("overall")
        score = _score(ov.get("score")) if isinstance(ov, dict) else None
        assess = (ov.get("assessment", ov.get("justification")) if isinstance(ov, dict) else None)
        if score is None or not isinstance(assess, str):
            raise ParseError(f'evaluation {i + 1}: "overall" needs {{"score": 1-10, "assessment": "..."}}')
        rec["overall"] = {"score": score, "assessment": assess.strip()}
        out.append(rec)
    return out
