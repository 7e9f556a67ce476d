"""rerankflow.sweep.grid: the sweep section's keys and values checked, stable readable variant ids."""

from __future__ import annotations

import copy

import pytest

from rerankflow.config import load_config, load_schema
from rerankflow.errors import InputError
from rerankflow.sweep.grid import export_choice, plan_variants, variant_config, variant_id, variant_sections

SCHEMA = load_schema()


def sweep(**kw) -> dict:
    return load_config({"sweep": {"name": "s", **kw}})["sweep"]


def ids(**kw) -> list[str]:
    return [v["id"] for v in plan_variants(sweep(**kw), SCHEMA)]


def test_schema_defaults_leave_the_sweep_off():
    assert load_config()["sweep"] == {"name": None, "grid": {}, "variants": [], "export": "best"}


def test_grid_is_the_product_in_key_then_value_order_with_readable_ids():
    assert ids(grid={"train_n_passages": [5, 9], "learning_rate": [1.0e-5, 2.0e-5]}) == [
        "learning_rate=1e-05,train_n_passages=5", "learning_rate=1e-05,train_n_passages=9",
        "learning_rate=2e-05,train_n_passages=5", "learning_rate=2e-05,train_n_passages=9"]
    # finetune.<key> is the same key; reranker keys keep their section
    assert ids(grid={"finetune.learning_rate": [2.0e-5], "reranker.max_length": [128]}) == [
        "learning_rate=2e-05,reranker.max_length=128"]


def test_adding_a_value_renames_no_existing_variant():
    before = ids(grid={"learning_rate": [1.0e-5, 2.0e-5], "train_n_passages": [5]})
    after = ids(grid={"learning_rate": [1.0e-5, 2.0e-5, 5.0e-5], "train_n_passages": [5]})
    assert set(before) < set(after) and len(set(after) - set(before)) == 1
    # the grid's key order in the YAML does not matter either
    assert ids(grid={"train_n_passages": [5], "learning_rate": [1.0e-5]}) == ids(grid={"learning_rate": [1.0e-5], "train_n_passages": [5]})


def test_yaml_numbers_without_a_dot_are_numbers():
    """PyYAML reads 1e-5 as the string '1e-5' (YAML 1.1): the schema says number, so it is one."""
    (v,) = plan_variants(sweep(grid={"learning_rate": ["1e-5"]}), SCHEMA)
    assert v["settings"] == {"finetune.learning_rate": 1e-5} and v["id"] == "learning_rate=1e-05"


def test_listed_variants_follow_the_grid_and_duplicates_are_refused():
    assert ids(grid={"learning_rate": [1.0e-5]}, variants=[{"learning_rate": 3.0e-6, "loss": "bce"}]) == [
        "learning_rate=1e-05", "learning_rate=3e-06,loss=bce"]
    with pytest.raises(InputError, match="listed twice"):
        ids(grid={"learning_rate": [1.0e-5]}, variants=[{"finetune.learning_rate": 1.0e-5}])


@pytest.mark.parametrize("key, words", [
    ("learnin_rate", "not a known finetune setting"),
    ("prep.quality_threshold", "stages 0-1"),
    ("retrieval.model", "stages 0-1"),
    ("sdg.num_pairs", "stages 0-1"),
    ("corpus.max_documents", "stages 0-1"),
    ("seed", "stages 0-1"),
    ("eval.top_k", "same first-stage candidates"),
    ("base_model", "fixed reference"),
    ("val_max_queries", "validation set"),
    ("mem_mb", "sizes the job"),
    ("reranker.bogus", "not a known reranker setting"),
    ("nonsense.key", "not a section a sweep can vary"),
])
def test_keys_a_sweep_cannot_vary_are_refused_with_the_key_and_the_reason(key, words):
    with pytest.raises(InputError) as err:
        ids(grid={key: [1]})
    assert f"config key 'sweep.grid.{key.removeprefix('finetune.')}'" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("key, value", [("learning_rate", "fast"), ("train_n_passages", 1), ("loss", "hinge"),
                                        ("reranker.input_format", "triple")])
def test_values_are_checked_against_the_schema(key, value):
    with pytest.raises(InputError, match=f"sweep.grid.{key}"):
        ids(grid={key: [value]})
    with pytest.raises(InputError, match=r"sweep.variants\[0\]"):
        ids(variants=[{key: value}])


def test_a_sweep_needs_variants_and_export_names_one():
    with pytest.raises(InputError, match="sweep.grid"):
        ids()
    variants = plan_variants(sweep(grid={"learning_rate": [1.0e-5, 2.0e-5]}), SCHEMA)
    assert export_choice({"export": "best"}, variants) == "best"
    assert export_choice({"export": "learning_rate=2e-05"}, variants) == "learning_rate=2e-05"
    with pytest.raises(InputError, match="sweep.export"):
        export_choice({"export": "learning_rate=3e-05"}, variants)


def test_variant_sections_apply_the_settings_and_leave_the_config_alone():
    cfg = load_config()
    before = copy.deepcopy(cfg)
    sections = variant_sections(cfg, {"finetune.learning_rate": 5e-5, "reranker.max_length": 128})
    assert sections["finetune"]["learning_rate"] == 5e-5 and sections["reranker"]["max_length"] == 128
    assert sections["finetune"]["max_steps"] == cfg["finetune"]["max_steps"]
    assert cfg == before
    assert variant_config(cfg, {"finetune.train_n_passages": 9})["finetune"]["train_n_passages"] == 9


def test_text_values_that_cannot_name_a_folder_become_a_stable_hash():
    vid = variant_id({"reranker.prompt_template": "q: {query} p: {passage}"})
    assert vid.startswith("reranker.prompt_template=h") and "/" not in vid and " " not in vid
    assert vid == variant_id({"reranker.prompt_template": "q: {query} p: {passage}"})
