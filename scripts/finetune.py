"""Snakemake entry point of rule `finetune` (stage 2): train, validate, write BEST/LATEST."""

import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from rerankflow.finetune import run_finetune  # noqa: E402

p = snakemake.params  # noqa: F821
run_finetune(
    train_path=snakemake.input.train,  # noqa: F821
    val_path=snakemake.input.val,  # noqa: F821
    base_model=p.base_model,
    out_dir=p.out_dir,
    finetune=p.finetune,
    reranker=p.reranker,
    seed=p.seed,
    device=p.device,
    threads=snakemake.threads,  # noqa: F821
)
