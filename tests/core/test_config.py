"""rerankflow.config.load_config gives code outside Snakemake exactly the config the workflow sees.

The Snakefile merges config/config.yaml with the --configfile overlays (Snakemake's ``update_config``)
and completes it with ``snakemake.utils.validate(config, schema, set_default=True)``. ``load_config``
must give the same dict, key for key, so a test, benchmark or CLI run uses the workflow's settings.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from rerankflow.config import SCHEMA_PATH, load_config


def _yaml(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text(encoding="utf-8")) or {}


def snakemake_config(files: list[str]) -> dict:
    """What the Snakefile holds after ``configfile:`` + ``--configfile files`` and ``validate(..., set_default=True)``."""
    from snakemake.utils import update_config, validate

    config: dict = {}
    for rel in files:
        update_config(config, copy.deepcopy(_yaml(rel)))
    validate(config, str(SCHEMA_PATH), set_default=True)
    return config


@pytest.mark.parametrize("files", [
    ["config/config.yaml"],                              # the embedded default
    ["config/config.yaml", "config/nemotron.yaml"],      # NVIDIA-scale overlay
    ["config/config.yaml", "tests/config/tiny.yaml"],    # the tiny pipeline
    [],                                                  # nothing given: the schema's defaults alone
], ids=["default", "nemotron", "tiny", "schema-only"])
def test_load_config_equals_snakemake_validate(files):
    expected = snakemake_config(files)
    assert load_config(*[_yaml(rel) for rel in files]) == expected


def test_load_config_leaves_its_overlays_alone():
    tiny = _yaml("tests/config/tiny.yaml")
    before = copy.deepcopy(tiny)
    cfg = load_config(_yaml("config/config.yaml"), tiny)
    assert tiny == before
    assert cfg["reranker"]["max_length"] == tiny["reranker"]["max_length"]


def test_too_few_mined_negatives_for_the_training_group_is_one_warning():
    from rerankflow.config import config_warnings, load_config

    assert config_warnings(load_config()) == []
    cfg = load_config({"prep": {"hard_negatives_to_mine": 2}, "finetune": {"train_n_passages": 5}})
    assert config_warnings(cfg) == ["prep.hard_negatives_to_mine=2 < finetune.train_n_passages - 1 = 4: "
                                    "training fills the missing negatives with random corpus passages (easy negatives); "
                                    "mine at least train_n_passages - 1"]


def test_a_first_stage_weight_for_the_teacher_without_distillation_is_one_warning():
    from rerankflow.config import config_warnings, load_config

    cfg = load_config({"prep": {"teacher_first_stage_weight": 1.0}})
    assert config_warnings(cfg) == ["prep.teacher_first_stage_weight=1.0 has no effect: it shapes the teacher of "
                                    "finetune.loss distill, and the loss is listwise"]
    assert config_warnings(load_config({"prep": {"teacher_first_stage_weight": 1.0},
                                        "finetune": {"loss": "distill"}})) == []


# ------------------------------------------------------------------ configured input paths (issue 19, item 5)
def _beir(folder, files=("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv")):
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("")
    return folder


def test_input_paths_of_the_shipped_configs_are_fine():
    from rerankflow.config import input_path_errors

    assert input_path_errors(load_config()) == []
    assert input_path_errors(load_config({"corpus": {"dir": str(REPO / "tests/data/corpus")}})) == []


def test_each_configured_input_path_is_checked_naming_the_key_and_what_is_missing(tmp_path):
    from rerankflow.config import check_input_paths, input_path_errors

    empty = tmp_path / "empty"
    empty.mkdir()
    half = _beir(tmp_path / "half", ("corpus.jsonl", "queries.jsonl"))
    ok = _beir(tmp_path / "ok")
    cases = [
        ({"eval": {"eval_data_path": str(half)}}, "config key 'eval.eval_data_path': the BEIR folder", "lacks qrels/test.tsv"),
        ({"eval": {"eval_data_path": str(tmp_path / "nowhere")}}, "config key 'eval.eval_data_path'", "not found"),
        ({"prep": {"input_beir": str(half)}}, "config key 'prep.input_beir'", "lacks qrels/train.tsv, qrels/test.tsv"),
        ({"corpus": {"dir": str(empty)}}, "config key 'corpus.dir'", "holds no file ending in .txt, .md, .text"),
        ({"corpus": {"dir": str(tmp_path / "nowhere")}}, "config key 'corpus.dir'", "not found"),
        ({"prep": {"sdg_input_path": str(tmp_path / "nowhere.jsonl")}}, "config key 'prep.sdg_input_path'", "not found"),
        ({"retrieval": {"first_stage": "run", "run_file": str(tmp_path / "run.trec")}}, "config key 'retrieval.run_file'", "not found"),
        ({"export": {"checkpoint": str(empty)}}, "config key 'export.checkpoint'", "holds no Hugging Face checkpoint"),
        ({"eval": {"finetuned_checkpoint": str(tmp_path / "ckpt")}}, "config key 'eval.finetuned_checkpoint'", "not found"),
        ({"finetune": {"base_model": str(tmp_path / "model")}}, "config key 'finetune.base_model'", "not found"),
    ]
    for overlay, key, what in cases:
        (problem,) = input_path_errors(load_config(overlay))
        assert problem.startswith(key) and what in problem, (overlay, problem)
    # a corpus that is not read (a labelled BEIR folder replaces SDG) is not checked; complete folders pass
    assert input_path_errors(load_config({"corpus": {"dir": str(empty)}, "prep": {"input_beir": str(ok)},
                                          "eval": {"eval_data_path": str(ok)}})) == []
    with pytest.raises(ValueError, match=r"(?s)corpus.dir.*holds no file.*eval.eval_data_path.*lacks qrels/test.tsv"):
        check_input_paths(load_config({"eval": {"eval_data_path": str(half)}, "corpus": {"dir": str(empty)}}))


def test_a_dry_run_refuses_an_eval_folder_without_qrels(tmp_path):
    """Found when the workflow is parsed (dry run), not after fine-tuning."""
    from conftest import TEST_CORPUS, run_snakemake

    half = _beir(tmp_path / "half", ("corpus.jsonl", "queries.jsonl"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "corpus": {"dir": str(TEST_CORPUS)},
                                   "eval": {"eval_data_path": str(half)}}))
    proc = run_snakemake(tmp_path, "-n", configfile=cfg, check=False, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key 'eval.eval_data_path'" in out and "lacks qrels/test.tsv" in out, out[-3000:]
