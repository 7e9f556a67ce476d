"""The ``sweep`` section: which settings vary, each variant's id and its ``finetune`` / ``reranker`` sections.

A sweep varies settings that only stages 2+ read: ``finetune`` keys (written bare, ``learning_rate``, or
``finetune.learning_rate``) and ``reranker`` keys (``reranker.max_length``). Everything upstream of
fine-tuning (corpus, SDG, prep, the eval split, the first stage) and everything that defines the
comparison (eval settings, the validation set, the base model) is shared by all variants and fixed,
so a key that would change it is rejected with the reason.

Variants come from ``sweep.grid`` (the product of every key's values, keys in sorted order, values in
the order given) followed by ``sweep.variants`` (a list of mappings). A variant's id names every key it
sets, sorted: ``learning_rate=2e-05,train_n_passages=5``. It depends on that variant's own values
only, so adding a value to the grid adds one id and renames none (its directory, checkpoints and
results stay where they are).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from typing import Any, Mapping

from rerankflow.errors import InputError

SWEPT_SECTIONS = ("finetune", "reranker")

# keys a sweep never varies, with the reason (shown in the error)
_SHARED = ("is read by stages 0-1 (corpus, SDG, prep and its eval split, mining, the first stage), which a "
           "sweep builds once and shares, so that metric differences come from the variants and not from new "
           "data; sweep finetune or reranker keys, and run another configuration for this one")
# (a table of reasons, not of settings: written as pairs so it is not mistaken for a table of defaults)
REJECTED_SECTIONS = dict.fromkeys(("corpus", "sdg", "prep", "retrieval"), _SHARED) | dict((
    ("seed", "also seeds SDG, the splits and mining (stages 0-1), which a sweep shares; it cannot vary per variant"),
    ("output_dir", "is where the whole sweep lives; it cannot vary per variant"),
    ("device", "places jobs, it is not a model setting"),
    ("eval", "is held fixed across a sweep, so every variant is measured on the same first-stage candidates, "
             "top_k and metrics as the base"),
    ("export", "applies to the one variant exported (sweep.export), not per variant"),
    ("deploy", "applies to the one variant exported (sweep.export), not per variant"),
    ("sweep", "cannot sweep the sweep"),
))
REJECTED_KEYS = {
    "finetune.base_model": ("is the sweep's fixed reference: the base model's scores are computed once and every "
                            "variant is compared with them; run one sweep per base model"),
    "finetune.val_queries": "defines the validation set the variants are chosen on, which must be the same for all",
    "finetune.val_max_queries": "defines the validation set the variants are chosen on, which must be the same for all",
    "finetune.gpus": "sizes the job, not the model (a resource, not a param): set it for the whole sweep",
    "finetune.threads": "sizes the job, not the model (a resource, not a param): set it for the whole sweep",
    "finetune.mem_mb": "sizes the job, not the model (a resource, not a param): set it for the whole sweep",
    "finetune.runtime": "sizes the job, not the model (a resource, not a param): set it for the whole sweep",
}
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def full_key(key: str, where: str) -> str:
    """``learning_rate`` -> ``finetune.learning_rate``; ``reranker.max_length`` stays; anything else is rejected."""
    if not isinstance(key, str) or not key:
        raise InputError(f"a sweep key must be a non-empty string, got {key!r}", key=where)
    section, _, name = key.partition(".")
    if not name:
        if key in REJECTED_SECTIONS:
            raise InputError(f"'{key}' {REJECTED_SECTIONS[key]}", key=f"{where}.{key}")
        return f"finetune.{key}"
    if section in SWEPT_SECTIONS:
        return key
    if section in REJECTED_SECTIONS:
        raise InputError(f"{section} settings cannot be swept: '{key}' {REJECTED_SECTIONS[section]}",
                         key=f"{where}.{key}")
    raise InputError(f"'{section}' is not a section a sweep can vary (finetune keys, bare or as finetune.<key>, "
                     "and reranker.<key>)", key=f"{where}.{key}")


def short_key(key: str) -> str:
    """How a key appears in variant ids: finetune keys bare, reranker keys with their section."""
    return key.removeprefix("finetune.")


def _coerce(value, subschema: Mapping):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: take a numeric string where the schema wants a number."""
    types = subschema.get("type")
    types = types if isinstance(types, list) else [types]
    if isinstance(value, str) and ("number" in types or "integer" in types):
        try:
            number = float(value)
        except ValueError:
            return value
        if "integer" in types and number.is_integer() and "number" not in types:
            return int(number)
        return number
    return value


def check_value(key: str, value, schema: Mapping, where: str):
    """``value`` checked against the schema of ``key`` (``section.name``); returns it (numeric strings made numbers)."""
    from jsonschema import Draft202012Validator

    section, name = key.split(".", 1)
    props = schema["properties"][section]["properties"]
    shown = f"{where}.{short_key(key)}"
    if key in REJECTED_KEYS:
        raise InputError(f"'{key}' {REJECTED_KEYS[key]}", key=shown)
    if name not in props:
        raise InputError(f"'{name}' is not a known {section} setting (known keys: {', '.join(sorted(props))})",
                         key=shown)
    sub = props[name]
    value = _coerce(value, sub)
    errors = sorted(Draft202012Validator(sub).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        raise InputError(f"value {value!r}: {errors[0].message} — expected: {sub.get('description', '')}".rstrip(" —:"),
                         key=shown)
    return value


def format_value(value) -> str:
    """A value as it appears in a variant id: ``2e-05``, ``5``, ``true``, ``pair``; other text as a short hash."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _SAFE_VALUE.match(text):
        return text
    return "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def variant_id(settings: Mapping[str, Any]) -> str:
    """``learning_rate=2e-05,train_n_passages=5``: every key the variant sets, sorted, with its value."""
    return ",".join(f"{short_key(k)}={format_value(settings[k])}" for k in sorted(settings))


def check_name(sweep: Mapping) -> str:
    name = sweep["name"]
    if not name:
        raise InputError("a sweep needs a name (its outputs go to <output_dir>/sweeps/<name>/)", key="sweep.name")
    if not _SAFE_NAME.match(str(name)):
        raise InputError(f"{name!r}: use letters, digits, '_', '.', '-' (it names a directory)", key="sweep.name")
    return str(name)


def plan_variants(sweep: Mapping, schema: Mapping) -> list[dict]:
    """The sweep's variants in order: ``[{"id", "settings": {"finetune.learning_rate": 2e-05, ...}}]``.

    ``sweep``: the validated ``sweep`` section; ``schema``: the configuration's JSON schema. Raises
    :class:`~rerankflow.errors.InputError` naming ``sweep.grid.<key>`` / ``sweep.variants[i].<key>``.
    """
    grid = sweep["grid"] or {}
    listed = sweep["variants"] or []
    if not grid and not listed:
        raise InputError("the sweep has no variants: give sweep.grid (key: [values]) or sweep.variants", key="sweep.grid")
    out: list[dict] = []
    if grid:
        keys, values = [], []
        for key in sorted(grid):
            full = full_key(key, "sweep.grid")
            if full in keys:
                raise InputError(f"'{key}' is given twice (as {short_key(full)} and finetune.{short_key(full)})",
                                 key=f"sweep.grid.{key}")
            vals = grid[key] if isinstance(grid[key], list) else [grid[key]]
            if not vals:
                raise InputError("give at least one value", key=f"sweep.grid.{key}")
            keys.append(full)
            values.append([check_value(full, v, schema, "sweep.grid") for v in vals])
        for combo in itertools.product(*values):
            out.append(dict(zip(keys, combo)))
    for i, item in enumerate(listed):
        where = f"sweep.variants[{i}]"
        if not isinstance(item, Mapping) or not item:
            raise InputError("each variant is a non-empty mapping of setting: value", key=where)
        settings = {}
        for key, value in item.items():
            full = full_key(key, where)
            settings[full] = check_value(full, value, schema, where)
        out.append(settings)
    variants, seen = [], {}
    for i, settings in enumerate(out):
        vid = variant_id(settings)
        if vid in seen:
            raise InputError(f"variant {vid} is listed twice (variants {seen[vid] + 1} and {i + 1} of the sweep)",
                             key="sweep.variants" if listed else "sweep.grid")
        seen[vid] = i
        variants.append({"id": vid, "settings": settings})
    return variants


def variant_sections(config: Mapping, settings: Mapping[str, Any]) -> dict[str, dict]:
    """The variant's ``finetune`` and ``reranker`` sections: the config's, with the variant's settings applied."""
    sections = {s: copy.deepcopy(dict(config[s])) for s in SWEPT_SECTIONS}
    for key, value in settings.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return sections


def variant_config(config: Mapping, settings: Mapping[str, Any]) -> dict:
    """The whole config as one variant sees it (for cross-key checks such as ``config_warnings``)."""
    out = copy.deepcopy(dict(config))
    out.update(variant_sections(config, settings))
    return out


def export_choice(sweep: Mapping, variants: list[dict]) -> str:
    """``sweep.export``: ``best`` (the variant chosen on validation) or the id of a variant of this sweep."""
    choice = str(sweep["export"])
    if choice == "best" or choice in {v["id"] for v in variants}:
        return choice
    raise InputError(f"{choice!r} is neither 'best' nor a variant of this sweep "
                     f"({', '.join(v['id'] for v in variants)})", key="sweep.export")
