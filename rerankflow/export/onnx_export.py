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

The parts: :mod:`~rerankflow.export.torch_model` (checkpoint, PyTorch loading),
:mod:`~rerankflow.export.candidates` (eval pairs), :mod:`~rerankflow.export.parity` (the parity
check, scored by the serving class :class:`~rerankflow.scoring.onnx_scorer.OnnxScorer`),
:mod:`~rerankflow.export.quantize` (INT8). The export record (``rerankflow_export.json``) is
defined in :mod:`rerankflow.scoring.export_record`, where serving reads it. The TensorRT engine is
built by :mod:`rerankflow.export.tensorrt`.

Every setting comes from the validated config (``export``, ``reranker``, ``retrieval`` sections;
``rerankflow.config.load_config`` outside Snakemake): no defaults are held here.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from rerankflow.errors import InputError
from rerankflow.export.candidates import eval_groups
from rerankflow.export.parity import ParityError, check_parity, measure
from rerankflow.export.quantize import quantize_int8
from rerankflow.export.torch_model import (
    MODEL_INPUTS, LogitsOnly, check_checkpoint_input_format, checkpoint_model_dir, load_torch_reranker, uses_token_type_ids,
)
from rerankflow.formatting import check_input_format, check_template, tokenize_pairs
from rerankflow.io import atomic_path, write_json
from rerankflow.scoring.export_record import EXPORT_INFO
from rerankflow.scoring.fusion import read_fusion_record
from rerankflow.scoring.onnx_session import choose_providers

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")


# ----------------------------------------------------------------------------------------- export
def export_onnx(
    checkpoint,
    out_dir,
    *,
    opset: int,
    dtype: str,
    max_length: int,
    prompt_template: str,
    input_format: str,
    external_data_threshold_mb: float,
) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` (+ ``tokenizer/``, ``rerankflow_export.json``, which also
    carries the checkpoint's fusion record as ``fusion``, or null).

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
        raise InputError(f"opset {opset} is too old for BERT attention export; use >= 14", key="export.opset")
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

    with atomic_path(out_dir, is_dir=True) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        proto = _trace(model, args, input_names, opset, scratch / "model.onnx")
        if dtype == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(proto, keep_io_types=True, op_block_list=["LayerNormalization"])
            _topological_sort(proto.graph)  # the converter appends its Cast nodes out of order
        meta = {"input_format": input_format, "prompt_template": prompt_template, "max_length": str(int(max_length)),
                "dtype": dtype, "source_checkpoint": str(checkpoint.resolve()), "producer": "rerankflow"}
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
            "inputs": input_names, "outputs": ["logits"], "logits_shape": ["batch", 1], "opset": int(opset), "dtype": dtype,
            "input_format": input_format, "prompt_template": prompt_template, "max_length": int(max_length),
            "uses_token_type_ids": "token_type_ids" in input_names, "external_data": external, "weight_bytes": weight_bytes,
            "source_checkpoint": str(checkpoint.resolve()), "exporter": f"torch.onnx.export (TorchScript, torch {torch.__version__})",
            # the reranker + first-stage fusion weight stage 2 chose on validation (None without one): the
            # server applies it when a request carries first-stage scores
            "fusion": read_fusion_record(checkpoint),
        })
    log.info("exported %s -> %s (%s, opset %s, %.1f MB weights%s)", checkpoint, out_dir / "model.onnx", dtype, opset,
             weight_bytes / 1e6, ", external data" if external else "")
    return out_dir / "model.onnx"


def _trace(model, args, input_names: list[str], opset: int, raw_path: Path):
    """The ONNX graph (``onnx.ModelProto``) of ``model``'s logits traced on ``args``, dynamic batch and sequence axes."""
    import onnx
    import torch

    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    dynamic_axes["logits"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated upstream but is the one that exports BERT
        # correctly with dynamic axes on torch 2.13 (see module docstring); keep logs readable
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            LogitsOnly.wrap(model, input_names), args, str(raw_path),
            input_names=input_names, output_names=["logits"], dynamic_axes=dynamic_axes,
            opset_version=int(opset), do_constant_folding=True, dynamo=False,
        )
    return onnx.load(str(raw_path))  # also pulls in external tensors the exporter may have written


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


# ----------------------------------------------------------------------------------------- stage
def run_export(
    checkpoint,
    eval_dir,
    out_dir,
    export_cfg: dict,
    reranker_cfg: dict,
    retrieval_cfg: dict,
    *,
    device: str,
    threads: int | None = None,
    seed: int,
) -> dict:
    """The whole ONNX stage: export, parity report, optional INT8 model with its measured cost.

    Writes ``out_dir/onnx/``, ``out_dir/parity.json`` and (``quantize: int8``) ``out_dir/onnx_int8/``.
    ``export_cfg``, ``reranker_cfg`` and ``retrieval_cfg`` are the validated config sections;
    ``reranker_cfg`` (``input_format``, ``prompt_template``, ``max_length``) is how pairs are tokenized;
    a stage-2 checkpoint trained in another input format is refused (:func:`check_checkpoint_input_format`).
    Returns the parity report; raises :class:`ParityError` after writing it when parity fails.
    ``device`` is where the first-stage embedder runs for ``candidates: dense``; PyTorch parity
    runs on the device of the ONNX Runtime provider chosen by ``export.execution_provider``.
    """
    import torch

    cfg = dict(export_cfg)
    if cfg["quantize"] not in QUANTIZE_MODES:
        raise InputError(f"quantize must be none or int8, got {cfg['quantize']!r}", key="export.quantize")
    template = check_template(reranker_cfg["prompt_template"])
    input_format = check_input_format(reranker_cfg["input_format"])
    max_length = int(reranker_cfg["max_length"])
    out_dir = Path(out_dir)
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()

    check_checkpoint_input_format(checkpoint_model_dir(checkpoint), input_format)
    providers = choose_providers(cfg["execution_provider"], key="export.execution_provider")
    onnx_path = export_onnx(checkpoint, out_dir / "onnx", opset=cfg["opset"], dtype=cfg["dtype"], max_length=max_length,
                            prompt_template=template, input_format=input_format,
                            external_data_threshold_mb=cfg["external_data_threshold_mb"])
    int8_path = quantize_int8(onnx_path, out_dir / "onnx_int8") if cfg["quantize"] == "int8" else None
    groups = eval_groups(eval_dir, cfg, cfg["parity_pairs"], retrieval_cfg, device=device, seed=seed)
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
    return _write_report(report, out_dir / "parity.json", tolerance, time.perf_counter() - t_start)


def _write_report(report: dict, path: Path, tolerance: float, seconds: float) -> dict:
    """Mark ``report`` passed or not, write it to ``path``, log its summary; raise :class:`ParityError` after writing."""
    failure = None
    try:
        check_parity(report, tolerance)
        report["passed"] = True
    except ParityError as exc:
        report["passed"] = False
        failure = exc
    report["wall_seconds"] = round(seconds, 2)
    write_json(path, report)
    summary = {k: report[k] for k in ("pairs", "queries", "max_abs_diff", "mean_abs_diff", "spearman", "top10_overlap_mean",
                                      "execution_provider", "pytorch_pairs_per_s", "onnx_pairs_per_s", "passed")}
    log.info("parity: %s", json.dumps(summary))
    if "int8" in report:
        log.info("int8: %s", json.dumps({k: v for k, v in report["int8"].items() if k != "parity_vs_fp32"}))
    if failure is not None:
        raise failure
    return report
