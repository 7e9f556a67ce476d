"""Candidate pairs of a first-stage run: what a second stage (a reranker) scores."""

from __future__ import annotations

from typing import Mapping

from rerankflow.beir import passage_text


def candidate_pairs(run: Mapping[str, Mapping[str, float]], queries: Mapping[str, str],
                    corpus: Mapping[str, dict]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Flatten a first-stage run into ``(keys [(qid, doc_id)], pairs [(query, passage text)])``.

    Passage text is BEIR's ``title + " " + text`` (:func:`rerankflow.beir.passage_text`), the text the
    first stage embedded.
    """
    keys, pairs = [], []
    for qid, docs in run.items():
        for did in docs:
            keys.append((qid, did))
            pairs.append((queries[qid], passage_text(corpus[did])))
    return keys, pairs
