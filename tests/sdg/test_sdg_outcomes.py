"""Stage 0 says what it could not use (issue 19, item 8): per-document outcomes by reason in the manifest,
a failure at stage 0 naming the reason when nothing usable came out, and word windows for text written
without sentence punctuation."""

from __future__ import annotations

import re

import pytest

from conftest import TEST_CORPUS
from rerankflow.config import load_config
from rerankflow.errors import InputError
from rerankflow.io import read_json
from rerankflow.sdg.chunking import split_word_windows
from rerankflow.sdg.corpus import Document
from rerankflow.sdg.offline import document_outcome, generate_offline_with_outcomes
from rerankflow.sdg.run import final_outcomes, run_sdg

CFG = load_config({"corpus": {"min_text_length": 0}, "sdg": {"backend": "offline"}})
OFF = CFG["sdg"]["offline"]


def unpunctuated(text: str) -> str:
    """How some collections are written: lower case, no full stops or other sentence punctuation, one line."""
    return re.sub(r"\s+", " ", re.sub(r"[.!?;:,]", " ", text.lower())).strip()


def test_word_windows_cover_the_text_in_order():
    text = "one two three  four five\nsix seven"
    spans = split_word_windows(text, 3)
    assert [text[a:b] for a, b in spans] == ["one two three", "four five\nsix", "seven"]


def test_text_without_sentence_punctuation_still_gives_questions(tmp_path):
    """Before: every document was one 'sentence' longer than max_question_words, so 0 questions, silently."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(TEST_CORPUS.glob("*.txt")):
        (corpus / f.name).write_text(unpunctuated(f.read_text()))
    manifest = read_json(run_sdg(corpus, tmp_path / "s0", CFG["corpus"], CFG["sdg"], CFG["retrieval"], seed=42, device="cpu"))
    n_docs = len(list(corpus.glob("*.txt")))
    assert manifest["num_qa_pairs"] > n_docs  # several questions per document
    assert manifest["num_documents_cut_into_word_windows"] == n_docs
    assert manifest["documents_by_outcome"]["questions"] == n_docs
    record_text = (tmp_path / "s0" / f"{CFG['sdg']['dataset_name']}.jsonl").read_text()
    assert '"question": "' in record_text


def test_punctuated_text_is_chunked_by_sentences_as_before():
    text = (TEST_CORPUS / "honeybees.txt").read_text()
    import random

    record, outcome, windows = document_outcome(Document("hb", "honeybees.txt", text), 3, 2, random.Random(1),
                                                OFF["min_question_words"], OFF["max_question_words"])
    assert outcome == "questions" and not windows
    for pair in record["deduplicated_qa_pairs"]:  # a question is a whole sentence of the document
        assert pair["question"][-1] in ".!?" and pair["question"] in re.sub(r"\s+", " ", text)


def test_outcomes_by_reason():
    docs = [
        Document("short", "short.txt", "far too few words here"),
        Document("ok", "ok.txt", (TEST_CORPUS / "composting.txt").read_text()),
        Document("lines", "lines.txt", "\n\n".join(["A heading."] * 30)),  # many sentences, none of question size
    ]
    records, outcomes, windowed = generate_offline_with_outcomes(docs, 3, 2, 42, OFF["min_question_words"], OFF["max_question_words"])
    assert outcomes == ["too_short", "questions", "no_usable_sentence"] and windowed == 0
    # after near-duplicate removal and with prep's quality threshold
    records[1]["deduplicated_qa_pairs"], records[1]["qa_evaluations"]["evaluations"] = [], []
    assert final_outcomes(records, outcomes, None)[1] == "duplicate"
    rec = {"deduplicated_qa_pairs": [{"question": "q"}], "qa_evaluations": {"evaluations": [{"overall": {"score": 6.5}}]}}
    assert final_outcomes([rec], ["questions"], 7.0) == ["judged_low"]
    assert final_outcomes([rec], ["questions"], 6.0) == ["questions"]


def test_a_corpus_nothing_usable_comes_from_fails_at_stage_0_naming_the_reason(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"note {i} a few words only")
    with pytest.raises(InputError, match=r"config key 'corpus.dir': stage 0 made no usable question from the 4 documents "
                                         r"of the corpus: 4 too short"):
        run_sdg(corpus, tmp_path / "s0", CFG["corpus"], CFG["sdg"], CFG["retrieval"], seed=42, device="cpu")
    assert not (tmp_path / "s0" / "generation_result.json").exists()
