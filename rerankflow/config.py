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


def canonical(obj):
    """The same config with every mapping's keys sorted (recursively); lists keep their order."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    return obj
