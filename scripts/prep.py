"""Snakemake entry point: stage 1 prep (filter, split, corpus, hard-negative mining, BEIR eval set)."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.prep.run import run_prep
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    run_prep(
        str(Path(snakemake.output.train).parent),
        snakemake.params.prep,
        snakemake.params.retrieval,
        seed=snakemake.params.seed,
        sdg_path=getattr(snakemake.input, "sdg", None),
        device=snakemake.params.device,
        val_candidates=snakemake.params.val_candidates,
        teacher=getattr(snakemake.params, "teacher", None),  # only when prep.teacher_denoise is on
    )
