"""Dense embeddings with a safe on-disk cache, and exact inner-product search with FAISS in blocks.

Cache key = sha256 over (the model: the content of its files for a local folder, else its name; query
and passage prefixes, max length, normalisation, corpus hash over every (id, text); and ``bf16`` when the
vectors are computed under bf16 autocast, so fp32 keys are the same as before that option). A changed corpus,
model or prefix therefore can never reuse stale vectors (NVIDIA's recipe does). Vectors are stored as ``.npy``
and opened memory-mapped, and the search walks the corpus in blocks of ``block_size`` rows, so
resident memory is bounded by the block size rather than the corpus size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.formatting import Prefixes
from rerankflow.io import atomic_path, sha256_file, write_json
from rerankflow.errors import InputError
from rerankflow.models import bf16_is_native, load_embedder, pick_device, resolve_model_path

log = logging.getLogger(__name__)

EMBED_PRECISIONS = ("auto", "fp32", "bf16")
PARITY_SAMPLE = 32  # passages embedded both ways by the bf16 parity check


def resolve_embed_precision(precision: str | None, device: str) -> str:
    """``fp32`` or ``bf16``: how the embedder runs for ``retrieval.precision`` on ``device``.

    ``auto`` = bf16 autocast where bf16 is native (a CPU with AVX-512 BF16 or AMX, a GPU that supports it;
    measured 2.75x the passages/s of fp32 for bge-small-en on this project's 2-core CPU, cosine to fp32 > 0.9999,
    benchmarks/RESULTS.md), fp32 elsewhere (emulated bf16 is slower than fp32). ``None`` = fp32.
    """
    if precision is None or precision == "fp32":
        return "fp32"
    if precision not in EMBED_PRECISIONS:
        raise InputError(f"unknown embedding precision {precision!r}; expected one of {', '.join(EMBED_PRECISIONS)}",
                         key="retrieval.precision")
    if precision == "bf16":
        return "bf16"
    return "bf16" if bf16_is_native(pick_device(device)) else "fp32"


def _autocast(model, bf16: bool):
    """bf16 autocast on the model's device type when ``bf16``, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(str(getattr(model, "device", "cpu")).split(":")[0], dtype=torch.bfloat16)


def bf16_parity(model, texts: Sequence[str], batch_size: int) -> dict:
    """Cosine between the fp32 and bf16-autocast embeddings of ``texts`` (the first :data:`PARITY_SAMPLE`):
    ``{"texts", "cosine_min", "cosine_mean"}``."""
    sample = list(texts)[:PARITY_SAMPLE]
    ref = _encode(model, sample, batch_size, bf16=False)
    low = _encode(model, sample, batch_size, bf16=True)
    cos = (ref * low).sum(axis=1)
    return {"texts": len(sample), "cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}


def corpus_hash(ids: Sequence[str], texts: Sequence[str]) -> str:
    """Order-sensitive sha256 over every (id, text) of a corpus."""
    h = hashlib.sha256()
    for did, text in zip(ids, texts):
        h.update(str(did).encode("utf-8"))
        h.update(b"\x00")
        h.update(text.encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()


# files of a model folder that decide its embeddings (weights, configs of every module, tokenizer);
# walked recursively, since a sentence-transformers folder keeps pooling/normalisation in subfolders
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_PROVENANCE_FILES = ("README", "import_info")  # say where a model came from, not what it computes


@functools.lru_cache(maxsize=16)
def _content_digest(path: str, stamp: tuple) -> str:
    """sha256 over the relative name and bytes of every model file under ``path`` (``stamp``: the files'
    names, sizes and mtimes, so an edited folder is hashed again within one process)."""
    h = hashlib.sha256()
    for rel, _, _ in stamp:
        h.update(rel.encode() + b"\0" + sha256_file(Path(path) / rel).encode())
    return h.hexdigest()


def _model_fingerprint(model_name: str) -> dict:
    """What identifies an embedder: the content of its files for a local folder (so two copies of one model,
    e.g. the ``import_bge`` output of two experiments, share cached embeddings), its name otherwise."""
    path = resolve_model_path(model_name)
    p = Path(path)
    if not p.is_dir():
        return {"model": path}
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_MODEL_FILE_SUFFIXES)
                   and not f.name.startswith(_PROVENANCE_FILES))
    stamp = tuple((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return {"model_sha256": _content_digest(str(p.resolve()), stamp)}


def cache_key(model_name: str, prefixes: Prefixes, max_length: int, chash: str, normalize: bool = True,
              bf16: bool = False) -> str:
    """The cache key of a corpus embedding (see module docstring)."""
    payload = {
        "model": _model_fingerprint(model_name),
        "query_prefix": prefixes.query_prefix,
        "passage_prefix": prefixes.passage_prefix,
        "max_length": int(max_length),
        "normalize": bool(normalize),
        "corpus": chash,
    }
    if bf16:
        payload["autocast"] = "bf16"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _encode(model, texts: Sequence[str], batch_size: int, bf16: bool = False) -> np.ndarray:
    with _autocast(model, bf16):
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=len(texts) > batch_size,
        )
    return np.ascontiguousarray(emb, dtype=np.float32)


def embed_corpus(
    ids: Sequence[str],
    texts: Sequence[str],
    model_name: str,
    prefixes: Prefixes,
    max_length: int,
    batch_size: int,
    cache_dir: str | os.PathLike | None,
    device: str,
    model=None,
    bf16: bool = False,
    bf16_min_cosine: float | None = None,
) -> np.ndarray:
    """Embed passages (with the passage prefix), L2-normalised float32 ``[len(texts), dim]``.

    With ``cache_dir`` the result is stored under its cache key and returned memory-mapped;
    a later call with the same key loads it instead of embedding again.

    ``bf16`` embeds under bf16 autocast, after a parity check: the first :data:`PARITY_SAMPLE` passages are
    embedded both ways, and a cosine to fp32 below ``bf16_min_cosine`` is an error naming the model (the
    parity figures go to the log and the cache's ``.json`` record).
    """
    if len(ids) != len(texts):
        raise ValueError("ids and texts differ in length")
    key = cache_key(model_name, prefixes, max_length, corpus_hash(ids, texts), bf16=bf16)
    npy = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    if npy is not None and npy.exists():
        arr = np.load(npy, mmap_mode="r")
        if arr.shape[0] == len(texts):
            log.info("embedding cache hit %s (%d passages)", npy.name, len(texts))
            return arr
    if model is None:
        model = load_embedder(model_name, max_length, device)
    passages = [prefixes.passage(t) for t in texts]
    parity = None
    if bf16:
        parity = bf16_parity(model, passages, batch_size)
        log.info("bf16 embedding parity on %d passages: cosine to fp32 min %.6f, mean %.6f", parity["texts"],
                 parity["cosine_min"], parity["cosine_mean"])
        if bf16_min_cosine is not None and parity["cosine_min"] < bf16_min_cosine:
            raise InputError(
                f"bf16 embeddings of {model_name} differ from fp32: cosine min {parity['cosine_min']} on "
                f"{parity['texts']} passages, below {bf16_min_cosine}; set retrieval.precision: fp32",
                key="retrieval.precision")
    log.info("embedding %d passages with %s (%s)", len(texts), model_name, "bf16 autocast" if bf16 else "fp32")
    emb = _encode(model, passages, batch_size, bf16=bf16)
    if npy is None:
        return emb
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    write_json(npy.with_suffix(".json"), {
        "key": key, "model": model_name, "query_prefix": prefixes.query_prefix,
        "passage_prefix": prefixes.passage_prefix, "max_length": int(max_length), "count": len(texts),
        "precision": "bf16" if bf16 else "fp32", **({"bf16_parity": parity} if parity else {}),
    })
    return np.load(npy, mmap_mode="r")


def embed_queries(texts: Sequence[str], model_name: str, prefixes: Prefixes, max_length: int,
                  batch_size: int, device: str, model=None, bf16: bool = False) -> np.ndarray:
    """Embed queries (with the query prefix), L2-normalised float32; under bf16 autocast when ``bf16``."""
    if model is None:
        model = load_embedder(model_name, max_length, device)
    return _encode(model, [prefixes.query(t) for t in texts], batch_size, bf16=bf16)


def _gpu_resources():
    import faiss

    if pick_device("auto") != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        if faiss.get_num_gpus() < 1:
            return None
        return faiss.StandardGpuResources()
    except Exception:  # faiss-cpu builds lack the GPU symbols
        return None


def search(query_emb: np.ndarray, corpus_emb: np.ndarray, top_k: int, block_size: int):
    """Exact inner-product top-k of every query over the corpus, corpus walked in blocks.

    Returns ``(scores, indices)`` of shape ``[n_queries, min(top_k, n_corpus)]``, best first.
    Memory: one block of corpus vectors plus ``n_queries x 2k`` running results. A tqdm bar (stderr, so
    the rule log) shows the blocks searched when there is more than one.
    """
    import faiss
    from tqdm.auto import tqdm

    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    n, dim = corpus_emb.shape
    k = min(int(top_k), n)
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
    gpu = _gpu_resources()
    starts = range(0, n, block_size)
    for start in tqdm(starts, desc="search", unit="block", disable=len(starts) < 2, mininterval=5.0):
        block = np.ascontiguousarray(corpus_emb[start:start + block_size], dtype=np.float32)
        index = faiss.IndexFlatIP(dim)
        if gpu is not None:
            index = faiss.index_cpu_to_gpu(gpu, 0, index)
        index.add(block)
        s, i = index.search(q, min(k, block.shape[0]))
        i = np.where(i >= 0, i + start, -1)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i
