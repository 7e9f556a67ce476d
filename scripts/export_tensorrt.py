"""Snakemake entry point of rule export_tensorrt: TensorRT engine + its parity against ONNX Runtime."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.export.tensorrt import run_tensorrt
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    run_tensorrt(
        snakemake.input.onnx,
        Path(snakemake.output.plan).parent,
        snakemake.input.eval_data,
        p.export,
        p.reranker,
        p.retrieval,
        device=p.device,
        seed=p.seed,
    )
