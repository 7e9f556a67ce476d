"""Stage 0, ``offline`` backend: inverse-cloze questions and a heuristic judge, no network, no LLM.

Question generation (the inverse cloze task of Lee et al., 2019, "Latent Retrieval for Weakly
Supervised Open Domain QA"): a sentence of a chunk becomes the query, and the chunk *with that
sentence removed* becomes its positive passage. The model must therefore match a statement to
the context it came from without the help of verbatim overlap: real training signal, and a
standard unsupervised pre-training task for retrievers and rerankers.

Consequences for the record format: a chunk whose sentence was taken as a question keeps its
``start``/``end`` span in the document, but its ``text`` omits that sentence. At most one
question is taken from a chunk, so the passage keeps ``sentences_per_chunk - 1`` sentences.

Judge heuristic (scores 1-10, documented so their meaning is clear):

* ``relevance`` — how much of the question's content vocabulary (lower-cased words of 3+ letters,
  minus stop words) reappears in its positive passage: ``1 + 9 * min(1, overlap / 0.5)``. A
  question sharing nothing with its context cannot be learned from it.
* ``accuracy`` — 10: the answer is the source sentence itself, verbatim from the document.
* ``context_support`` — how much context the positive keeps: ``1 + 9 * min(1, words / 60)``.
* ``clarity`` — prose-likeness of the question: starts 10, minus 3 if it has fewer than
  ``min_question_words`` or more than ``max_question_words`` words, minus up to 4 for symbol/digit
  density (code, tables), minus 2 if it does not start with a letter or quote.
* ``overall`` — ``0.4 * relevance + 0.2 * (accuracy + context_support + clarity)``, one decimal.
  Relevance weighs double because ``accuracy`` is constant here: a question that shares little
  with its context (relevance < ~3) falls below the default ``prep.quality_threshold`` of 7.0.
"""

from __future__ import annotations

import logging
import random
import re

from tqdm import tqdm

from rerankflow.sdg.chunking import chunk_document, split_sentences
from rerankflow.sdg.corpus import Document

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z][A-Za-z_]{2,}")
_STOP = frozenset(
    "the and for are but not you all any can had her was one our out has have this that with from they will would there "
    "their what which when where who how its into than then them these those been being were also such more most other "
    "some only same very just each does did done used uses using use may might must should could shall".split()
)


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - _STOP


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def judge(question: str, passage: str, min_words: int, max_words: int) -> dict:
    """Score a (question, positive passage) pair with the heuristic of the module docstring."""
    qw = content_words(question)
    overlap = len(qw & content_words(passage)) / max(1, len(qw))
    relevance = round(1 + 9 * min(1.0, overlap / 0.5), 1)
    n_ctx = len(passage.split())
    context_support = round(1 + 9 * min(1.0, n_ctx / 60), 1)
    n_q = len(question.split())
    clarity = 10.0
    if n_q < min_words or n_q > max_words:
        clarity -= 3
    symbols = sum(1 for ch in question if not (ch.isalpha() or ch.isspace() or ch in ",.;:'\"()-?!"))
    clarity -= min(4.0, 40.0 * symbols / max(1, len(question)))
    if not (question[:1].isalpha() or question[:1] in "\"'"):
        clarity -= 2
    clarity = round(max(1.0, clarity), 1)
    accuracy = 10.0
    overall = round(0.4 * relevance + 0.2 * (accuracy + context_support + clarity), 1)
    return {
        "relevance": {"score": relevance, "justification": f"{overlap:.0%} of the question's content words appear in its passage"},
        "accuracy": {"score": accuracy, "justification": "the answer is the source sentence, verbatim from the document"},
        "context_support": {"score": context_support, "justification": f"the positive passage keeps {n_ctx} words of context"},
        "clarity": {"score": clarity, "justification": f"{n_q} words, {symbols} symbol/digit characters"},
        "overall": {"score": overall, "assessment": "0.4 x relevance + 0.2 x (accuracy + context_support + clarity) (offline heuristic judge)"},
    }


def _candidate(doc_text: str, chunk: dict, span, min_words: int, max_words: int) -> bool:
    sent = _clean(doc_text[span[0]:span[1]])
    n = len(sent.split())
    return min_words <= n <= max_words and len(chunk["sentences"]) >= 2


OUTCOMES = ("questions", "too_short", "one_sentence", "no_usable_sentence")


def window_words(min_words: int, max_words: int) -> int:
    """Words per pseudo-sentence when a document has no sentence punctuation: twice the shortest question,
    within the question limits."""
    return max(min_words, min(max_words, 2 * min_words))


def _pairs_from_chunks(text: str, chunks: list[dict], num_pairs: int, rng: random.Random, min_words: int,
                       max_words: int) -> tuple[list[dict], list[dict]]:
    eligible = [c for c in chunks if len(c["sentences"]) >= 2]
    rng.shuffle(eligible)
    pairs, evaluations = [], []
    for chunk in eligible:
        if len(pairs) >= num_pairs:
            break
        spans = [s for s in chunk["sentences"] if _candidate(text, chunk, s, min_words, max_words)]
        if not spans:
            continue
        span = rng.choice(spans)
        question = _clean(text[span[0]:span[1]])
        rest = [text[s[0]:s[1]] for s in chunk["sentences"] if tuple(s) != tuple(span)]
        chunk["text"] = " ".join(_clean(r) for r in rest)
        pairs.append({
            "question": question,
            "answer": question,
            "query_type": "contextual",
            "reasoning_type": "inverse_cloze",
            "question_complexity": min(5, 1 + len(content_words(question)) // 4),
            "segment_ids": [chunk["chunk_id"]],
            "hop_count": 1,
        })
        evaluations.append(judge(question, chunk["text"], min_words, max_words))
    return pairs, evaluations


def _lacks_sentences(text: str, chunks: list[dict], max_words: int) -> bool:
    """Written without sentence punctuation: one sentence only, or a 'sentence' longer than any question."""
    spans = [s for c in chunks for s in c["sentences"]]
    return len(spans) < 2 or any(len(text[a:b].split()) > max_words for a, b in spans)


def document_outcome(doc: Document, sentences_per_chunk: int, num_pairs: int, rng: random.Random,
                     min_words: int = 8, max_words: int = 40) -> tuple[dict, str, bool]:
    """``(record, outcome, word_windows)`` of one document (see :func:`generate_for_document`).

    ``outcome`` is ``questions`` or why the document gave none: ``too_short`` (fewer than two questions'
    worth of words), ``one_sentence`` (one sentence and too few words for word windows), or
    ``no_usable_sentence`` (sentences, but none of ``min_words``..``max_words`` words in a chunk with
    another). A document without sentence punctuation (one sentence, or a run-on longer than
    ``max_words`` words) that gives no question from its sentences is cut into word windows of
    :func:`window_words` words instead, which then serve as its sentences (``word_windows`` True).
    """
    text = doc.text
    chunks = chunk_document(text, sentences_per_chunk)
    pairs, evaluations = _pairs_from_chunks(text, chunks, num_pairs, rng, min_words, max_words)
    windows = False
    if not pairs and len(text.split()) >= 2 * min_words and _lacks_sentences(text, chunks, max_words):
        windows = True
        chunks = chunk_document(text, max(2, sentences_per_chunk), window_words(min_words, max_words))
        pairs, evaluations = _pairs_from_chunks(text, chunks, num_pairs, rng, min_words, max_words)
    if pairs:
        outcome = "questions"
    elif len(text.split()) < 2 * min_words:
        outcome = "too_short"
    elif len(split_sentences(text)) < 2:
        outcome = "one_sentence"
    else:
        outcome = "no_usable_sentence"
    record = {
        "file_name": doc.file_name,
        "source_id": doc.source_id,
        "text": text,
        "chunks": chunks,
        "deduplicated_qa_pairs": pairs,
        "qa_evaluations": {"evaluations": evaluations},
    }
    return record, outcome, windows and bool(pairs)


def generate_for_document(doc: Document, sentences_per_chunk: int, num_pairs: int, rng: random.Random,
                          min_words: int = 8, max_words: int = 40) -> dict:
    """Build one SDG record for ``doc`` with up to ``num_pairs`` inverse-cloze questions."""
    return document_outcome(doc, sentences_per_chunk, num_pairs, rng, min_words, max_words)[0]


def generate_offline_with_outcomes(docs: list[Document], sentences_per_chunk: int, num_pairs: int, seed: int,
                                   min_words: int = 8, max_words: int = 40) -> tuple[list[dict], list[str], int]:
    """``(records, outcome per document, documents cut into word windows)``; deterministic for a seed and corpus."""
    records, outcomes, windowed = [], [], 0
    for doc in tqdm(docs, desc="offline SDG", unit="doc"):
        rng = random.Random(f"{seed}:{doc.source_id}")
        record, outcome, windows = document_outcome(doc, sentences_per_chunk, num_pairs, rng, min_words, max_words)
        records.append(record)
        outcomes.append(outcome)
        windowed += int(windows)
    return records, outcomes, windowed


def generate_offline(docs: list[Document], sentences_per_chunk: int, num_pairs: int, seed: int,
                     min_words: int = 8, max_words: int = 40) -> list[dict]:
    """Records for every document; deterministic for a given seed and corpus."""
    return generate_offline_with_outcomes(docs, sentences_per_chunk, num_pairs, seed, min_words, max_words)[0]
