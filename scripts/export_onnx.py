"""Snakemake entry point of rule export_onnx: ONNX export, parity report, optional INT8 model."""

import logging
import sys
from pathlib import Path

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from rerankflow.export.onnx_export import checkpoint_model_dir, run_export  # noqa: E402

p = snakemake.params  # noqa: F821
run_export(
    checkpoint_model_dir(snakemake.input.checkpoint),  # noqa: F821
    snakemake.input.eval_data,  # noqa: F821
    Path(snakemake.output.parity).parent,  # noqa: F821
    p.export,
    p.reranker,
    p.retrieval,
    device=p.device,
    threads=snakemake.threads,  # noqa: F821
    seed=p.seed,
)
