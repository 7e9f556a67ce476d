# Stage 4: ONNX export with a parity report against PyTorch (+ INT8 when export.quantize: int8)
# and, when asked, a TensorRT engine. Logic lives in rerankflow/export/onnx_export.py and
# rerankflow/export/tensorrt.py; see docs/export.md.
# Default target: export_onnx's outputs (onnx_int8/model.onnx included when export.quantize is int8);
# add f"{EXPORT_DIR}/tensorrt/model.plan" when export.export_to_trt is true.

EXPORT_DIR = f"{OUT}/stage4_export"


rule export_onnx:
    input:
        checkpoint=finetuned_checkpoint("export"),
        eval_data=eval_data_dir(),
        bge=bge_model_dir(),
        run_file=first_stage_inputs(),
    output:
        onnx=f"{EXPORT_DIR}/onnx/model.onnx",
        tokenizer=directory(f"{EXPORT_DIR}/onnx/tokenizer"),
        parity=f"{EXPORT_DIR}/parity.json",
        **({"int8": f"{EXPORT_DIR}/onnx_int8/model.onnx"} if config["export"]["quantize"] == "int8" else {}),
    params:
        export=config["export"],
        reranker=config["reranker"],
        retrieval=retrieval_params(),
        device=config["device"],
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        f"{OUT}/logs/export_onnx.log",
    benchmark:
        f"{OUT}/logs/benchmarks/export_onnx.tsv"
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/export_onnx.py"


rule export_tensorrt:
    input:
        onnx=f"{EXPORT_DIR}/onnx/model.onnx",
        parity=f"{EXPORT_DIR}/parity.json",
        eval_data=eval_data_dir(),
        bge=bge_model_dir(),
        run_file=first_stage_inputs(),
    output:
        plan=f"{EXPORT_DIR}/tensorrt/model.plan",
        parity=f"{EXPORT_DIR}/tensorrt/parity.json",
    params:
        export=config["export"],
        reranker=config["reranker"],
        retrieval=retrieval_params(),
        device=config["device"],
        seed=config["seed"],
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    log:
        f"{OUT}/logs/export_tensorrt.log",
    benchmark:
        f"{OUT}/logs/benchmarks/export_tensorrt.tsv"
    conda:
        "../envs/export.yaml"
    script:
        "../scripts/export_tensorrt.py"
