# Sweeps (docs/sweeps.md): many fine-tuning variants over ONE shared upstream, compared in one summary.
#
#   snakemake --cores all sweep                                    # = <output_dir>/sweeps/<name>/summary.json
#   snakemake -n output/rerank/sweeps/<name>/summary.json          # exactly the variants that are stale
#   snakemake --cores all output/rerank/sweeps/<name>/stage4_export/onnx/model.onnx   # export sweep.export
#
# Shared, built once: SDG, prep (its eval split and mined negatives), the base model import, and the
# sweep's base evaluation (sweep_base_eval: the first stage and the base reranker's scores). Each
# variant (rerankflow.sweep.grid: readable, stable id such as learning_rate=2e-05,train_n_passages=5)
# has its own training (sweep_finetune) and evaluation (sweep_evaluate), which reranks the base
# evaluation's first-stage run (runs/first_stage.trec) with the variant's BEST checkpoint. The rules
# reuse the finetune/evaluate/export/deploy scripts; only the summary has its own.
#
#   <output_dir>/sweeps/<name>/base/stage3_eval/                     first stage + base (shared)
#   <output_dir>/sweeps/<name>/variants/<id>/stage2_finetune/        checkpoints/BEST, training log, summary
#   <output_dir>/sweeps/<name>/variants/<id>/stage3_eval/            eval_results.json, per_query.json, ...
#   <output_dir>/sweeps/<name>/summary.{json,md,tsv,png}             the comparison, the chosen variant
#   <output_dir>/sweeps/<name>/stage4_export/, stage5_deploy/        the exported / served variant
#
# A variant's directory depends on its own values only: adding a grid value adds one variant (the
# others stay up to date); removing one re-makes the summary and deletes nothing.

# The sweep's settings and path helpers (SWEEP_*, sweep_*) are at the end of rules/common.smk. Wildcard
# constraints are per rule, so they never reach another stage's rules.


# The base reranker and the first stage on the eval split, once per sweep (its scores also go to the
# eval score cache, so a second sweep or the main evaluate rule finds them there).
rule sweep_base_eval:
    input:
        data=eval_data_dir(),
        base_model=base_model_dir(),
        bge=bge_model_dir(),
        run_file=first_stage_inputs(),
    wildcard_constraints:
        name=SWEEP_NAME_RE,
    output:
        results=f"{SWEEP_DIR}/base/stage3_eval/eval_results.json",
        per_query=f"{SWEEP_DIR}/base/stage3_eval/per_query.json",
        runs=directory(f"{SWEEP_DIR}/base/stage3_eval/runs"),
        table=f"{SWEEP_DIR}/base/stage3_eval/eval_table.tsv",
        plot=f"{SWEEP_DIR}/base/stage3_eval/ndcg_plot.png",
    params:
        eval=sweep_base_eval_settings,
        retrieval=retrieval_params(),
        reranker=config["reranker"],
        base_model=lambda wildcards, input: input.base_model if input.base_model else base_model_path(),
        seed=config["seed"],
        device=config["device"],
    log:
        f"{SWEEP_LOGS}/base_eval.log",
    benchmark:
        f"{SWEEP_BENCH}/base_eval.tsv"
    threads: finetune_threads()
    resources:
        gpu=scoring_gpus(),
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime"],
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"


# One variant's training: the finetune rule's inputs (the one prep output, the one imported base
# model) with the variant's settings; checkpoints resume after a kill exactly as in rule finetune.
rule sweep_finetune:
    input:
        train=f"{OUT}/stage1_prep/train_mined.automodel_unrolled.json",
        val=f"{OUT}/stage1_prep/val.json",
        corpus=f"{OUT}/stage1_prep/corpus/train.parquet",
        base=base_model_dir(),
    wildcard_constraints:
        name=SWEEP_NAME_RE,
        variant=SWEEP_VARIANT_RE,
    output:
        best=directory(f"{VARIANT_DIR}/stage2_finetune/checkpoints/BEST"),
        latest=directory(f"{VARIANT_DIR}/stage2_finetune/checkpoints/LATEST"),
        log=f"{VARIANT_DIR}/stage2_finetune/training_log.jsonl",
        summary=f"{VARIANT_DIR}/stage2_finetune/training_summary.json",
        curve=f"{VARIANT_DIR}/stage2_finetune/training_curve.png",
    params:
        finetune=lambda w: sweep_sections(w)["finetune"],
        reranker=lambda w: sweep_sections(w)["reranker"],
        seed=config["seed"],
        device=config["device"],
        base_model=lambda wildcards, input: input.base if input.base else base_model_path(),
    threads: finetune_threads()
    resources:
        gpu=config["finetune"]["gpus"],
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime"],
    log:
        f"{SWEEP_LOGS}/{{variant}}/finetune.log",
    benchmark:
        f"{SWEEP_BENCH}/{{variant}}/finetune.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/finetune.py"


# One variant's evaluation: the shared first-stage run reranked by the variant's BEST checkpoint, in the
# variant's reranker settings; eval settings are the sweep's (fixed). The base is not re-scored here:
# the summary compares every variant with the sweep's one base evaluation, query by query.
rule sweep_evaluate:
    input:
        data=eval_data_dir(),
        checkpoint=f"{VARIANT_DIR}/stage2_finetune/checkpoints/BEST",
        first_stage=f"{SWEEP_DIR}/base/stage3_eval/runs",
    wildcard_constraints:
        name=SWEEP_NAME_RE,
        variant=SWEEP_VARIANT_RE,
    output:
        results=f"{VARIANT_DIR}/stage3_eval/eval_results.json",
        per_query=f"{VARIANT_DIR}/stage3_eval/per_query.json",
        runs=directory(f"{VARIANT_DIR}/stage3_eval/runs"),
        table=f"{VARIANT_DIR}/stage3_eval/eval_table.tsv",
        plot=f"{VARIANT_DIR}/stage3_eval/ndcg_plot.png",
    params:
        eval=sweep_eval_settings,
        retrieval=lambda w: {**retrieval_params(), "first_stage": "run", "run_file": sweep_first_stage_run(w.name)},
        reranker=lambda w: sweep_sections(w)["reranker"],
        base_model=None,
        seed=config["seed"],
        device=config["device"],
    log:
        f"{SWEEP_LOGS}/{{variant}}/evaluate.log",
    benchmark:
        f"{SWEEP_BENCH}/{{variant}}/evaluate.tsv"
    threads: finetune_threads()
    resources:
        gpu=scoring_gpus(),
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime"],
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"


rule sweep_summary:
    input:
        unpack(sweep_variant_files),
    wildcard_constraints:
        name=SWEEP_NAME_RE,
    output:
        json=f"{SWEEP_DIR}/summary.json",
        md=f"{SWEEP_DIR}/summary.md",
        tsv=report(
            f"{SWEEP_DIR}/summary.tsv",
            caption="../report/sweep_summary.rst",
            category="Sweeps",
            labels={"figure": "sweep {name}: variants compared"},
        ),
        png=report(
            f"{SWEEP_DIR}/summary.png",
            caption="../report/sweep_summary.rst",
            category="Sweeps",
            labels={"figure": "sweep {name}: validation (chooses) and test (reports)"},
        ),
    params:
        variants=lambda w: SWEEP_VARIANTS if sweep_name(w) else [],
        variant_dirs=sweep_variant_dirs,
        base_dir=lambda w: sweep_path(w.name, "base/stage3_eval"),
        metric=config["eval"]["comparison_metric"],
        bootstrap_samples=config["eval"]["bootstrap_samples"],
        confidence=config["eval"]["confidence"],
        seed=config["eval"]["seed"] if config["eval"]["seed"] is not None else config["seed"],
    log:
        f"{SWEEP_LOGS}/summary.log",
    benchmark:
        f"{SWEEP_BENCH}/summary.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/sweep_summary.py"


# The variant named by sweep.export (best = the one chosen on validation in summary.json), exported
# exactly as rule export_onnx exports the main checkpoint, in that variant's reranker settings.
rule sweep_export_onnx:
    input:
        unpack(sweep_export_inputs),
        eval_data=eval_data_dir(),
        bge=bge_model_dir(),
        run_file=first_stage_inputs(),
    wildcard_constraints:
        name=SWEEP_NAME_RE,
    output:
        onnx=f"{SWEEP_DIR}/stage4_export/onnx/model.onnx",
        tokenizer=directory(f"{SWEEP_DIR}/stage4_export/onnx/tokenizer"),
        parity=f"{SWEEP_DIR}/stage4_export/parity.json",
        variant=f"{SWEEP_DIR}/stage4_export/variant.json",
        **({"int8": f"{SWEEP_DIR}/stage4_export/onnx_int8/model.onnx"} if config["export"]["quantize"] == "int8" else {}),
    params:
        choice=lambda w: SWEEP_EXPORT if sweep_name(w) else None,
        checkpoints=lambda w: {vid: sweep_path(w.name, "variants", vid, "stage2_finetune/checkpoints/BEST")
                               for vid in sweep_exported_ids(w)},
        rerankers=lambda w: {vid: variant_sections(config, SWEEP_BY_ID[vid]["settings"])["reranker"]
                             for vid in sweep_exported_ids(w)},
        export=config["export"],
        retrieval=retrieval_params(),
        device=config["device"],
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        f"{SWEEP_LOGS}/export_onnx.log",
    benchmark:
        f"{SWEEP_BENCH}/export_onnx.tsv"
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/sweep_export_onnx.py"


# Serve the sweep's export (as rule deploy serves stage 4's); the reranker settings come from the
# export's own record, i.e. the exported variant's.
rule sweep_deploy:
    input:
        model=f"{SWEEP_DIR}/stage4_export/{'onnx_int8' if config['deploy']['model'] == 'int8' else 'onnx'}/model.onnx",
        eval_data=eval_data_dir(),
    wildcard_constraints:
        name=SWEEP_NAME_RE,
    output:
        endpoint=f"{SWEEP_DIR}/stage5_deploy/endpoint.json",
    params:
        deploy=config["deploy"],
        reranker={},
        server_log=lambda w: f"{OUT}/logs/sweeps/{w.name}/deploy_server.log",
        state_file=lambda w: sweep_path(w.name, "stage5_deploy/.running.json"),
    log:
        f"{SWEEP_LOGS}/deploy.log",
    benchmark:
        f"{SWEEP_BENCH}/deploy.tsv"
    conda:
        "../envs/serve.yaml"
    script:
        "../scripts/deploy.py"


rule sweep_stop_deploy:
    input:
        endpoint=f"{SWEEP_DIR}/stage5_deploy/endpoint.json",
    wildcard_constraints:
        name=SWEEP_NAME_RE,
    output:
        stopped=f"{SWEEP_DIR}/stage5_deploy/stopped.json",
    params:
        timeout_s=20,
    log:
        f"{SWEEP_LOGS}/stop_deploy.log",
    benchmark:
        f"{SWEEP_BENCH}/stop_deploy.tsv"
    conda:
        "../envs/serve.yaml"
    script:
        "../scripts/stop_deploy.py"


localrules:
    sweep,
    sweep_summary,
    sweep_deploy,
    sweep_stop_deploy,


rule sweep:
    input:
        sweep_targets,
