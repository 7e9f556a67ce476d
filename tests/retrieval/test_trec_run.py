"""TREC run files: round trip, and every bad line named by file:line and id."""

from __future__ import annotations

import logging
import re

import pytest

from rerankflow.errors import InputError
from rerankflow.retrieval.trec_run import read_trec_run, write_trec_run

QUERIES = {"q1", "q2"}
DOCS = {"d1", "d2", "d3"}
GOOD = "q1 Q0 d2 1 7.5 es\nq1 Q0 d1 2 3.25 es\n\nq2 Q0 d3 1 -1.0 es\n"


def write(tmp_path, text: str):
    p = tmp_path / "user.run"
    p.write_text(text, encoding="utf-8")
    return p


def test_reads_a_good_run(tmp_path):
    run = read_trec_run(write(tmp_path, GOOD), QUERIES, DOCS)
    assert run == {"q1": {"d2": 7.5, "d1": 3.25}, "q2": {"d3": -1.0}}
    assert list(run["q1"]) == ["d2", "d1"]


def test_tabs_and_extra_spaces_and_zero_based_ranks(tmp_path):
    run = read_trec_run(write(tmp_path, "q1\tQ0\td1\t0\t2\tx\n  q1 0  d3 1 1 x  \n"), QUERIES, DOCS)
    assert run == {"q1": {"d1": 2.0, "d3": 1.0}}


def test_round_trip_orders_by_score_and_ranks_from_one(tmp_path):
    run = {"q1": {"d1": 0.5, "d3": 0.9, "d2": 0.5}, "q2": {"d1": 1e-12}}
    path = write_trec_run(tmp_path / "out" / "a.run", run, "rerankflow")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["q1 Q0 d3 1 0.9 rerankflow", "q1 Q0 d1 2 0.5 rerankflow", "q1 Q0 d2 3 0.5 rerankflow"]
    assert read_trec_run(path, QUERIES, DOCS) == run
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.run"]  # no temporary left behind


def test_write_refuses_whitespace_and_leaves_nothing(tmp_path):
    dest = tmp_path / "b.run"
    with pytest.raises(InputError, match="'d 1'"):
        write_trec_run(dest, {"q1": {"d 1": 1.0}}, "t")
    with pytest.raises(InputError, match="tag"):
        write_trec_run(dest, {"q1": {"d1": 1.0}}, "my tag")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_line, line_no, must_name", [
    ("q1 Q0 d3 3 1.0\n", 3, ["6 whitespace-separated columns", "got 5", "'q1'"]),
    ("q1 Q0 d3 3 1.0 es extra\n", 3, ["got 7", "'q1'"]),
    ("q1 Q0 d3 third 1.0 es\n", 3, ["'q1'", "'d3'", "rank 'third' is not an integer"]),
    ("q1 Q0 d3 3 high es\n", 3, ["'q1'", "'d3'", "score 'high' is not a finite number"]),
    ("q1 Q0 d3 3 nan es\n", 3, ["'d3'", "score 'nan'"]),
    ("q1 Q0 d3 2 1.0 es\n", 3, ["'q1'", "rank 2 given twice", "'d3'", "first on line 2"]),
    ("q1 Q0 d2 3 1.0 es\n", 3, ["'q1'", "document 'd2' listed twice", "first on line 1"]),
    ("q9 Q0 d3 1 1.0 es\n", 3, ["unknown query id 'q9'"]),
    ("q1 Q0 d99 3 1.0 es\n", 3, ["'q1'", "unknown document id 'd99'"]),
])
def test_bad_lines_name_file_line_and_id(tmp_path, bad_line, line_no, must_name):
    path = write(tmp_path, "q1 Q0 d2 1 7.5 es\nq1 Q0 d1 2 3.25 es\n" + bad_line + "q2 Q0 d3 1 1.0 es\n")
    with pytest.raises(InputError) as err:
        read_trec_run(path, QUERIES, DOCS)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line_no}: "), msg
    assert err.value.line == line_no and err.value.path == path
    for fragment in must_name:
        assert fragment in msg, (fragment, msg)


def test_unknown_ids_are_accepted_when_no_set_is_given(tmp_path):
    run = read_trec_run(write(tmp_path, "q9 Q0 d99 1 1.0 es\n"), None, None)
    assert run == {"q9": {"d99": 1.0}}


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_trec_run(tmp_path / "nope.run", QUERIES, DOCS)
    with pytest.raises(InputError, match="no lines"):
        read_trec_run(write(tmp_path, "\n\n"), QUERIES, DOCS)


def test_ranks_contradicting_scores_are_reported(tmp_path, caplog):
    path = write(tmp_path, "q1 Q0 d1 1 1.0 es\nq1 Q0 d2 2 5.0 es\n")
    with caplog.at_level(logging.WARNING, logger="rerankflow.retrieval.trec_run"):
        run = read_trec_run(path, QUERIES, DOCS)
    assert list(run["q1"]) == ["d2", "d1"]  # by score, as trec_eval
    assert re.search(r"in 1 queries \(e\.g\. 'q1'\)", caplog.text)
