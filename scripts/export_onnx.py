"""Snakemake entry point of rule export_onnx: ONNX export, parity report, optional INT8 model."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.export.onnx_export import checkpoint_model_dir, run_export
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    run_export(
        checkpoint_model_dir(snakemake.input.checkpoint),
        snakemake.input.eval_data,
        Path(snakemake.output.parity).parent,
        p.export,
        p.reranker,
        p.retrieval,
        device=p.device,
        threads=snakemake.threads,
        seed=p.seed,
    )
