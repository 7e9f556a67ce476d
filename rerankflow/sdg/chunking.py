"""Sentence splitting and chunking of source documents into numbered passages.

Chunks follow NVIDIA's SDG record: ``{"chunk_id": 1-based int, "text", "start", "end"}`` where
``start``/``end`` are character offsets of the chunk's span in the document text.

The splitter is a deterministic rule-based one (no model download): a sentence ends at ``.``,
``!`` or ``?`` (optionally followed by closing quotes/brackets) before whitespace and an
upper-case letter, digit or opening quote, or at a blank line. Common abbreviations
("e.g.", "i.e.", "Mr.", ...) do not end a sentence.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = {
    "e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "fig", "no", "cf", "al", "approx", "inc", "ltd", "st",
}
_BOUNDARY = re.compile(r"([.!?][\"')\]]*)(\s+)(?=[\"'(\[]?[A-Z0-9])|\n\s*\n")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Return ``(start, end)`` spans of the sentences of ``text`` (whitespace trimmed, non-empty)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1):
            end = m.start(2)
            prev = text[start:m.start(1)].rsplit(None, 1)
            word = prev[-1].lower().lstrip("(\"'") if prev else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        else:
            end = m.start()
        _add_span(text, start, end, spans)
        start = m.end()
    _add_span(text, start, len(text), spans)
    return spans


def _add_span(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    seg = text[start:end]
    stripped = seg.strip()
    if not stripped:
        return
    lead = len(seg) - len(seg.lstrip())
    spans.append((start + lead, start + lead + len(stripped)))


def split_word_windows(text: str, window_words: int) -> list[tuple[int, int]]:
    """``(start, end)`` spans of consecutive windows of ``window_words`` words (the last may be shorter):
    the pseudo-sentences of text written without sentence punctuation."""
    if window_words < 1:
        raise ValueError("window_words must be >= 1")
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    return [(words[i][0], words[min(i + window_words, len(words)) - 1][1]) for i in range(0, len(words), window_words)]


def chunk_document(text: str, sentences_per_chunk: int, window_words: int | None = None) -> list[dict]:
    """Group consecutive sentences into chunks of ``sentences_per_chunk`` (the last may be shorter).

    Each chunk records its sentence spans under ``"sentences"`` (document offsets) so callers can
    work at sentence level; ``text`` is ``document[start:end]``. With ``window_words``, windows of that
    many words (:func:`split_word_windows`) stand in for sentences.
    """
    if sentences_per_chunk < 1:
        raise ValueError("sentences_per_chunk must be >= 1")
    sents = split_word_windows(text, window_words) if window_words else split_sentences(text)
    chunks = []
    for i in range(0, len(sents), sentences_per_chunk):
        group = sents[i:i + sentences_per_chunk]
        start, end = group[0][0], group[-1][1]
        chunks.append({
            "chunk_id": len(chunks) + 1,
            "text": text[start:end],
            "start": start,
            "end": end,
            "sentences": [list(s) for s in group],
        })
    return chunks
