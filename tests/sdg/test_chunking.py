from rerankflow.sdg.chunking import chunk_document, split_sentences

TEXT = (
    "The first sentence is here. The second one follows, e.g. with an abbreviation. Is this the third? "
    "Yes! Dr. Smith wrote the fifth sentence in 3.5 minutes.\n\nA new paragraph starts a sentence. Last one"
)


def test_sentences_respect_abbreviations_and_paragraphs():
    sents = [TEXT[s:e] for s, e in split_sentences(TEXT)]
    assert sents == [
        "The first sentence is here.",
        "The second one follows, e.g. with an abbreviation.",
        "Is this the third?",
        "Yes!",
        "Dr. Smith wrote the fifth sentence in 3.5 minutes.",
        "A new paragraph starts a sentence.",
        "Last one",
    ]


def test_chunk_boundaries_are_sentence_groups_with_exact_spans():
    chunks = chunk_document(TEXT, 3)
    assert [c["chunk_id"] for c in chunks] == [1, 2, 3]
    assert [len(c["sentences"]) for c in chunks] == [3, 3, 1]
    for c in chunks:
        assert TEXT[c["start"]:c["end"]] == c["text"]
        assert c["text"] == c["text"].strip()
    assert chunks[0]["text"].endswith("Is this the third?")
    assert chunks[1]["text"].startswith("Yes!") and chunks[1]["text"].endswith("A new paragraph starts a sentence.")
    assert chunks[2]["text"] == "Last one"
    # consecutive chunks neither overlap nor skip a sentence
    assert chunks[0]["end"] < chunks[1]["start"] and chunks[1]["end"] < chunks[2]["start"]


def test_one_sentence_per_chunk_and_empty_text():
    assert len(chunk_document(TEXT, 1)) == 7
    assert chunk_document("   \n ", 4) == []
