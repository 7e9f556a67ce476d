"""Checkpoint -> ONNX graph: the one graph export, used by stage 4 and by stage 3's ``onnx`` scoring path.

:func:`export_onnx` traces a cross-encoder checkpoint (loaded by :mod:`rerankflow.scoring.torch_model`)
to an ONNX graph that outputs one logit per pair, writes the tokenizer and the export record
(:mod:`rerankflow.scoring.export_record`) beside it, and makes the folder appear atomically. It
lives in ``scoring`` (not ``export``) so stage 3 can score along the exported graph without
importing stage 4 (docs/architecture.md: scoring imports only core). Stage 4
(:mod:`rerankflow.export.onnx_export`) adds parity, INT8 and its report around it.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import check_input_format, tokenize_pairs
from rerankflow.io import atomic_path, write_json
from rerankflow.scoring.export_record import EXPORT_INFO
from rerankflow.scoring.fusion import read_fusion_record
from rerankflow.scoring.torch_model import (
    MODEL_INPUTS, LogitsOnly, load_torch_reranker, uses_token_type_ids,
)

log = logging.getLogger(__name__)

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
