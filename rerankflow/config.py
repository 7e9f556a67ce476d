"""Config checks with messages that name the offending key (used by the Snakefile before validate())."""

from __future__ import annotations

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
