"""Deterministic rejects of generated (query, answer) pairs, run before any judge call.

NVIDIA's retrieval SDG (data-designer-retrieval-sdg) throws away, without paying a judge, pairs whose
query or answer shows a defect that a rule can see. The checks here, each a reason counted in the
stage summary (``pairs_rejected``), enabled one by one with ``sdg.llm.reject_checks``:

``source_relative``
    The query points at the source instead of standing alone: "the table above", "in this passage",
    "according to the text", "the following section", "segment 3". A user of a search engine never
    writes that, and no retrieved passage can be "this passage" for a reranker.
``answer_in_query``
    The answer leaked into the query: the whole (normalised) answer appears in it, or, for an answer
    of three or more content words, at least 80 % of them do. Such a query is answered by reading it.
``answer_not_specified``
    The answer says the sources do not answer the query ("not specified", "not mentioned", "no
    information", "cannot be determined", "unknown", "N/A", ...): the pair has no positive passage.
``numeric_answer_in_query``
    A numeric answer ("42", "3.5 GB", "1,024 bytes", "2019") whose number also appears in the query.
``form_mismatch``
    The query does not have the form it was scheduled to have (``sdg.llm.query_forms``): a
    ``question`` ends with "?", an ``instruction`` does not (it asks for something in the imperative),
    a ``keyword`` query is at most :data:`KEYWORD_MAX_WORDS` words without "?".

Every function is pure and works on one pair; :func:`reject_reason` returns the first failing check
(in the order above) or None.
"""

from __future__ import annotations

import re

CHECKS = ("source_relative", "answer_in_query", "answer_not_specified", "numeric_answer_in_query", "form_mismatch")
QUERY_FORMS = ("question", "instruction", "keyword")
KEYWORD_MAX_WORDS = 8

_SOURCE_NOUNS = (r"(?:passages?|texts?|documents?|documentation|segments?|sections?|excerpts?|paragraphs?|articles?|"
                 r"contexts?|tables?|figures?|charts?|diagrams?|snippets?|chunks?|sources?|pages?|materials?|"
                 r"information|content|example)")
_SOURCE_RELATIVE = re.compile(
    r"\b(?:"
    # "this passage", "the given text", "the above table", "the following section"
    rf"(?:this|these|the (?:given|provided|above|following|preceding|previous|attached|accompanying|current)) {_SOURCE_NOUNS}"
    # "according to the text", "as described in the document", "based on this section"
    rf"|(?:according to|based on|as (?:stated|described|mentioned|shown|noted|explained|given|defined) in) "
    rf"(?:the|this|these) {_SOURCE_NOUNS}"
    # "the table above", "the example below"
    rf"|{_SOURCE_NOUNS} (?:above|below)"
    r"|(?:mentioned|described|shown|listed|stated|given|discussed|defined) (?:above|below|earlier)"
    # nouns no user query uses for the thing searched: "in the passage", "which excerpt"
    r"|(?:the|this|which|what) (?:passage|excerpt|snippet|segment|chunk)s?"
    r"|segments? \d+"
    r")\b", re.IGNORECASE)

_NOT_SPECIFIED = re.compile(
    r"\b(?:not (?:specified|mentioned|stated|provided|given|described|discussed|explained|defined|available|"
    r"included|covered|addressed|indicated|known|clear)"
    r"|(?:does|do|did) not (?:specify|mention|state|say|provide|give|describe|indicate|include)"
    r"|no (?:information|mention|details?|data|answer)"
    r"|cannot be (?:determined|answered|found|inferred)|can ?not be (?:determined|answered)"
    r"|none given|insufficient (?:information|context))\b", re.IGNORECASE)
# One-word refusals count only as the whole answer ("Unknown.", "N/A"), never inside a real answer.
_BARE_REFUSALS = {"unknown", "unspecified", "n a", "na", "none", "nothing", "no answer", "not applicable"}

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?![\w])")
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
STOP_WORDS = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been being it its this that these
those there their they them then than so such not no do does did done has have had having can could would should
will shall may might must what which who whom whose when where why how into onto over under about after before
between during through up down out off again further once only own same too very just also any each few more most
other some both all nor i you he she we me my your his her our us yes
""".split())


def normalise(text: str) -> str:
    """Lower case, words only, single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def content_words(text: str) -> list[str]:
    """Words of 2+ characters that are not stop words, in order."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOP_WORDS]


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "").lstrip("+") for n in _NUMBER.findall(text)]


def source_relative(query: str) -> bool:
    return _SOURCE_RELATIVE.search(query) is not None


def answer_in_query(query: str, answer: str) -> bool:
    nq, na = normalise(query), normalise(answer)
    if not na:
        return False
    if f" {na} " in f" {nq} " and len(content_words(answer)) >= 1:
        return True
    aw = set(content_words(answer))
    if len(aw) < 3:
        return False
    qw = set(content_words(query))
    return len(aw & qw) / len(aw) >= 0.8


def answer_not_specified(answer: str) -> bool:
    a = answer.strip()
    if not a or normalise(a) in _BARE_REFUSALS:
        return True
    # A refusal phrase in a short answer, or opening a long one; a long answer that mentions one in
    # passing ("... raises TypeError; the order is not specified") still answers the query.
    words = a.split()
    return _NOT_SPECIFIED.search(" ".join(words[:12] if len(words) <= 25 else words[:6])) is not None


def is_numeric_answer(answer: str) -> bool:
    """An answer that is essentially a number: one or two numbers and at most three other words."""
    nums = _numbers(answer)
    if not nums or len(nums) > 2:
        return False
    rest = [w for w in _WORD.findall(_NUMBER.sub(" ", answer.lower())) if w not in STOP_WORDS]
    return len(rest) <= 3


def numeric_answer_in_query(query: str, answer: str) -> bool:
    if not is_numeric_answer(answer):
        return False
    qn = set(_numbers(query))
    return any(n in qn for n in _numbers(answer))


def form_mismatch(query: str, form: str | None) -> bool:
    if form is None:
        return False
    q = query.strip()
    asks = q.endswith("?")
    if form == "question":
        return not asks
    if form == "instruction":
        return asks
    if form == "keyword":
        return asks or len(q.split()) > KEYWORD_MAX_WORDS
    return True


def reject_reason(pair: dict, enabled) -> str | None:
    """The first enabled check ``pair`` (``question``, ``answer``, optional ``query_form``) fails, or None."""
    q, a = pair["question"], pair["answer"]
    tests = {
        "source_relative": lambda: source_relative(q),
        "answer_in_query": lambda: answer_in_query(q, a),
        "answer_not_specified": lambda: answer_not_specified(a),
        "numeric_answer_in_query": lambda: numeric_answer_in_query(q, a),
        "form_mismatch": lambda: form_mismatch(q, pair.get("query_form")),
    }
    for name in CHECKS:
        if name in enabled and tests[name]():
            return name
    return None
