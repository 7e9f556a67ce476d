"""Errors name the line (issue 19, item 9): a qrels id missing from the corpus or queries, a malformed JSONL line."""

from __future__ import annotations

import re

import pytest

from rerankflow.beir import load_beir, write_beir
from rerankflow.errors import InputError
from rerankflow.io import read_jsonl


def test_a_qrels_id_not_in_the_corpus_names_file_and_line(tmp_path):
    write_beir(tmp_path / "b", {"d1": {"title": "", "text": "x"}, "d2": {"title": "", "text": "y"}}, {"q1": "a", "q2": "b"},
               {"q1": {"d1": 1}})
    (tmp_path / "b/qrels/train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td77\t1\n")
    with pytest.raises(InputError, match=re.escape("qrels/train.tsv:4: qrels names corpus id 'd77' (query 'q2')")):
        load_beir(tmp_path / "b", split="train")
    (tmp_path / "b/qrels/train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq9\td1\t1\n")
    with pytest.raises(InputError, match=re.escape("qrels/train.tsv:4: qrels names query id 'q9'")):
        load_beir(tmp_path / "b", split="train")


def test_a_malformed_jsonl_line_gives_the_decoders_message_with_line_and_column(tmp_path):
    p = tmp_path / "queries.jsonl"
    p.write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2" "text": "b"}\n')
    with pytest.raises(InputError) as err:
        read_jsonl(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: malformed JSON line: Expecting ',' delimiter at line 2 column 14"), msg
