"""Snakemake entry point of rule export_tensorrt: TensorRT engine + its parity against ONNX Runtime."""

import logging
import sys
from pathlib import Path

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from rerankflow.export.tensorrt import run_tensorrt  # noqa: E402

p = snakemake.params  # noqa: F821
run_tensorrt(
    snakemake.input.onnx,  # noqa: F821
    Path(snakemake.output.plan).parent,  # noqa: F821
    snakemake.input.eval_data,  # noqa: F821
    p.export,
    p.reranker,
    p.retrieval,
    device=p.device,
    seed=p.seed,
)
