# Stage 0: source corpus and synthetic question generation.


rule write_default_corpus:
    output:
        directory(f"{OUT}/corpus/pydoc"),
    params:
        python=python_version(),
    log:
        f"{OUT}/logs/write_default_corpus.log",
    benchmark:
        f"{OUT}/logs/benchmarks/write_default_corpus.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/write_default_corpus.py"


rule sdg:
    input:
        corpus=corpus_input(),
        bge=bge_model_dir(),
    output:
        sdg_outputs(),
    params:
        corpus_dir=lambda wildcards, input: input.corpus[0] if input.corpus else corpus_dir(),
        corpus=config["corpus"],
        sdg=config["sdg"],
        retrieval=retrieval_params(first_stage=False),  # the embedder of near-duplicate removal
        seed=config["seed"],
        device=config["device"],
    log:
        f"{OUT}/logs/sdg.log",
    benchmark:
        f"{OUT}/logs/benchmarks/sdg.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/sdg.py"
