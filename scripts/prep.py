"""Snakemake entry point: stage 1 prep (filter, split, corpus, hard-negative mining, BEIR eval set)."""
from rerankflow.prep import run_prep
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    run_prep(
        snakemake.params.out_dir,
        snakemake.params.prep,
        snakemake.params.retrieval,
        seed=snakemake.params.seed,
        sdg_path=snakemake.input[0] if len(snakemake.input) else None,
        device=snakemake.config["device"],
    )
