"""INT8 for CPU serving: ONNX Runtime dynamic quantization of the exported model (``onnx_int8/``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from rerankflow.io import atomic_path, write_json
from rerankflow.scoring.export_record import EXPORT_INFO

log = logging.getLogger(__name__)


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
