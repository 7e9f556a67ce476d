# rerankflow: fine-tune, evaluate, export and serve cross-encoder rerankers, as Snakemake file targets.
#
#   snakemake --cores all                                     # default target: stages 0-4
#   snakemake --cores all output/rerank/stage3_eval/eval_results.json
#   snakemake --cores all output/rerank/stage5_deploy/endpoint.json   # deploy is asked for by name
#   snakemake --configfile tests/config/tiny.yaml --cores all # the tiny pipeline (minutes on 2 cores)
#
# Every rule logs to <output_dir>/logs/<rule>.log and benchmarks to <output_dir>/logs/benchmarks/<rule>.tsv,
# so each configuration keeps its own. Scripts read only params/input/output/log/threads (+ resources.gpu).

import sys

from snakemake.utils import min_version, validate

min_version("9.0")
sys.path.insert(0, workflow.basedir)  # the rerankflow package, also without pip install -e

from rerankflow.config import canonical, check_config, check_input_paths, config_warnings
from rerankflow.retrieval.first_stage import check_first_stage_config


configfile: f"{workflow.basedir}/config/config.yaml"


check_config(config, f"{workflow.basedir}/config/schema.yaml")  # errors that name the key
validate(config, "config/schema.yaml", set_default=True)
check_input_paths(config)  # every configured input path exists and holds what is read (errors name the key)
check_first_stage_config(config["retrieval"])  # cross-key checks: hybrid weights, run_file (errors name the key)
for _warning in config_warnings(config):
    print(f"rerankflow config warning: {_warning}", file=sys.stderr)
# Derived default: the embedding cache lives with the outputs unless placed elsewhere.
config["retrieval"]["cache_dir"] = config["retrieval"]["cache_dir"] or f"{config['output_dir']}/cache/embeddings"
config["eval"]["score_cache_dir"] = config["eval"]["score_cache_dir"] or f"{config['output_dir']}/cache/rerank_scores"
config["eval"]["onnx_cache_dir"] = config["eval"]["onnx_cache_dir"] or f"{config['output_dir']}/cache/onnx_scoring"
# Canonical key order: Snakemake compares params as serialized, so the order in which a user's YAML
# files list keys must not trigger re-runs.
config.update(canonical(config))


include: "rules/common.smk"
include: "rules/sdg.smk"
include: "rules/prep.smk"
include: "rules/finetune.smk"
include: "rules/eval.smk"
include: "rules/export.smk"
include: "rules/deploy.smk"
include: "rules/sweep.smk"


report: "report/workflow.rst"


localrules:
    all,
    write_default_corpus,


rule all:
    default_target: True
    input:
        default_targets(),


# How the run ended, said last: the final table and where things are, or which rule failed and its log
# (rerankflow/run_summary.py). Not run for dry runs or with --no-hooks.
onsuccess:
    from rerankflow.run_summary import success_summary

    print(success_summary(config["output_dir"], [str(p) for p in workflow.overwrite_configfiles or []]), file=sys.stderr)


onerror:
    from rerankflow.run_summary import failure_summary

    print(failure_summary(log), file=sys.stderr)
