"""Snakemake entry point: stage 2 fine-tuning (train, validate, BEST/LATEST, resume after a kill)."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.train.finetune import run_finetune
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    run_finetune(
        train_path=snakemake.input.train,
        val_path=snakemake.input.val,
        base_model=str(p.base_model),
        out_dir=str(Path(snakemake.output.log).parent),
        finetune=p.finetune,
        reranker=p.reranker,
        seed=p.seed,
        device=p.device,
        threads=snakemake.threads,
        gpus=snakemake.resources.gpu,
    )
