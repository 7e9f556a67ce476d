# Stage 5: serve the stage 4 export and record where it listens; stop_deploy stops exactly that.
#
#   snakemake --cores all output/rerank/stage5_deploy/endpoint.json   # start (detached) + smoke test
#   snakemake --cores 1 output/rerank/stage5_deploy/stopped.json       # stop what deploy started
#
# Deploy is never part of the default target. Both rules run on the machine that runs
# Snakemake (localrules), since the service must outlive the job.

localrules: deploy, stop_deploy


rule deploy:
    input:
        # the export served: onnx/model.onnx, or onnx_int8/model.onnx for deploy.model: int8
        model=f"{OUT}/stage4_export/{'onnx_int8' if config['deploy']['model'] == 'int8' else 'onnx'}/model.onnx",
        eval_data=eval_data_dir(),
        bge=bge_model_dir(),  # the first stage of the smoke request may embed with the imported bge-small-en
        run_file=first_stage_inputs(),
    output:
        endpoint=f"{OUT}/stage5_deploy/endpoint.json",
    params:
        deploy=config["deploy"],
        retrieval=retrieval_params(),  # the smoke request sends the first stage's candidates of one eval query
        device=config["device"],
        reranker=config["reranker"],
        server_log=f"{OUT}/logs/deploy_server.log",
        # survives Snakemake's removal of endpoint.json before a re-run, so a re-deploy can
        # stop the server it started before (and nothing else)
        state_file=f"{OUT}/stage5_deploy/.running.json",
    log:
        f"{OUT}/logs/deploy.log",
    benchmark:
        f"{OUT}/logs/benchmarks/deploy.tsv"
    conda:
        "../envs/serve.yaml"
    script:
        "../scripts/deploy.py"


rule stop_deploy:
    input:
        endpoint=f"{OUT}/stage5_deploy/endpoint.json",
    output:
        stopped=f"{OUT}/stage5_deploy/stopped.json",
    params:
        timeout_s=20,
    log:
        f"{OUT}/logs/stop_deploy.log",
    benchmark:
        f"{OUT}/logs/benchmarks/stop_deploy.tsv"
    conda:
        "../envs/serve.yaml"
    script:
        "../scripts/stop_deploy.py"
