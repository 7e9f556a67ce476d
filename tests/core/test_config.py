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
