"""Snakemake entry point: stage 3 evaluation (first stage, base, fine-tuned, endpoint)."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.eval.evaluate import evaluate
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    evaluate(
        snakemake.input.data,
        Path(snakemake.output.results).parent,
        eval_cfg=snakemake.params.eval,
        retrieval_cfg=snakemake.params.retrieval,
        reranker_cfg=snakemake.params.reranker,
        base_model=str(snakemake.params.base_model) if snakemake.params.eval["eval_base"] else None,
        finetuned_checkpoint=str(snakemake.input.checkpoint) if snakemake.params.eval["eval_finetuned"] else None,
        device=snakemake.params.device,
        seed=snakemake.params.seed,
    )
