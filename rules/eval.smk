# Stage 3: first stage (retrieval.first_stage: dense, bm25, hybrid or a run file), rerank with the base and fine-tuned rerankers (and a served
# endpoint when eval.endpoint is set), pytrec_eval metrics with paired bootstrap CIs and significance
# tests, per-query results, TREC runs, a table and a plot for `snakemake --report report.html`.


rule evaluate:
    input:
        # the eval BEIR folder, plus the rerankers that are evaluated (a hub-id base model needs no input)
        data=eval_data_dir(),
        base_model=base_model_dir() if config["eval"]["eval_base"] else [],
        checkpoint=finetuned_checkpoint() if config["eval"]["eval_finetuned"] else [],
        # the first stage's own inputs: the imported bge-small-en, the user's TREC run file
        bge=bge_model_dir(),
        run_file=first_stage_inputs(),
    output:
        results=f"{OUT}/stage3_eval/eval_results.json",
        per_query=f"{OUT}/stage3_eval/per_query.json",
        runs=directory(f"{OUT}/stage3_eval/runs"),
        table=report(
            f"{OUT}/stage3_eval/eval_table.tsv",
            caption="../report/eval_table.rst",
            category="Stage 3: evaluation",
            labels={"figure": "metrics per system, paired CIs"},
        ),
        plot=report(
            f"{OUT}/stage3_eval/ndcg_plot.png",
            caption="../report/ndcg_plot.rst",
            category="Stage 3: evaluation",
            labels={"figure": "nDCG@k per system"},
        ),
    params:
        eval=config["eval"],
        retrieval=retrieval_params(),
        reranker=config["reranker"],
        base_model=lambda wildcards, input: input.base_model if input.base_model else base_model_path(),
        seed=config["seed"],
        device=config["device"],
    log:
        f"{OUT}/logs/evaluate.log",
    benchmark:
        f"{OUT}/logs/benchmarks/evaluate.tsv"
    threads: workflow.cores
    resources:
        gpu=scoring_gpus(),
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"
