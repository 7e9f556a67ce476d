"""Snakemake entry point: stage 0 synthetic data generation."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.scripting import rule_logging
from rerankflow.sdg.run import run_sdg

with rule_logging(snakemake.log[0], snakemake.threads):
    run_sdg(
        snakemake.params.corpus_dir,
        str(Path(snakemake.output[0]).parent),
        snakemake.params.corpus,
        snakemake.params.sdg,
        snakemake.params.retrieval,
        seed=snakemake.params.seed,
        device=snakemake.params.device,
    )
