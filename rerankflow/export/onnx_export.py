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

The parts: :mod:`~rerankflow.scoring.torch_model` (checkpoint, PyTorch loading) and
:mod:`~rerankflow.scoring.onnx_graph` (the graph export, shared with stage 3's ``onnx`` scoring path),
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
import time
from pathlib import Path


from rerankflow.errors import InputError
from rerankflow.export.candidates import eval_groups
from rerankflow.export.parity import ParityError, check_parity, measure
from rerankflow.export.quantize import quantize_int8
from rerankflow.scoring.onnx_graph import export_onnx
from rerankflow.scoring.torch_model import check_checkpoint_input_format, checkpoint_model_dir
from rerankflow.formatting import check_input_format, check_template
from rerankflow.io import write_json
from rerankflow.scoring.onnx_session import choose_providers

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")


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
