"""The ``eval`` section checked (messages name the key) and the first-stage depth it implies."""

from __future__ import annotations

from rerankflow.config import load_schema
from rerankflow.errors import InputError
from rerankflow.eval.metrics import check_k_values, metric_names
from rerankflow.scoring.paths import check_scoring_path


class EvalConfigError(InputError):
    """A bad ``eval`` config value (the message names the key)."""


def eval_keys() -> set[str]:
    """The keys of the ``eval`` section in config/schema.yaml."""
    return set(load_schema()["properties"]["eval"]["properties"])


def check_eval_config(eval_cfg: dict) -> dict:
    """A checked copy of the validated ``eval`` section (every key present: ``rerankflow.config.load_config``
    fills the schema's defaults); raise :class:`EvalConfigError` naming the key."""
    known = eval_keys()
    unknown = sorted(set(eval_cfg) - known)
    if unknown:
        raise EvalConfigError(f"unknown key(s) {unknown}; known keys: {sorted(known)}", key="eval")
    missing = sorted(known - set(eval_cfg))
    if missing:
        raise EvalConfigError(f"missing key(s) {missing}: pass the validated config "
                              "(rerankflow.config.load_config fills the schema's defaults)", key="eval")
    cfg = dict(eval_cfg)
    try:
        cfg["k_values"] = check_k_values(cfg["k_values"])
    except ValueError as exc:
        raise EvalConfigError(str(exc), key="eval.k_values") from None
    if not isinstance(cfg["top_k"], int) or cfg["top_k"] < 1:
        raise EvalConfigError(f"must be a positive integer, got {cfg['top_k']!r}", key="eval.top_k")
    depth = cfg["first_stage_depth"]
    if not isinstance(depth, int) or depth < 0 or (depth and depth < cfg["top_k"]):
        raise EvalConfigError(f"must be 0 (= top_k) or an integer >= top_k={cfg['top_k']}, got {depth!r}",
                              key="eval.first_stage_depth")
    if candidate_depth(cfg) < max(cfg["k_values"]):
        raise EvalConfigError(
            f"the first stage retrieves {candidate_depth(cfg)} passages per query (max(top_k, first_stage_depth)) but "
            f"max(k_values)={max(cfg['k_values'])}: metrics at k beyond the candidate depth would be silently capped. "
            f"Raise eval.first_stage_depth (or eval.top_k) or drop the larger k from eval.k_values.",
            key="eval.k_values")
    if cfg["index"] not in ("flat", "hnsw"):
        raise EvalConfigError(f"must be 'flat' or 'hnsw', got {cfg['index']!r}", key="eval.index")
    if cfg["comparison_metric"] not in metric_names(cfg["k_values"]):
        raise EvalConfigError(f"{cfg['comparison_metric']!r} is not computed; choose one of {metric_names(cfg['k_values'])}",
                              key="eval.comparison_metric")
    if not 0.0 < float(cfg["confidence"]) < 1.0:
        raise EvalConfigError(f"must be in (0, 1), got {cfg['confidence']!r}", key="eval.confidence")
    if int(cfg["bootstrap_samples"]) < 100:
        raise EvalConfigError(f"must be >= 100, got {cfg['bootstrap_samples']!r}", key="eval.bootstrap_samples")
    if cfg["base_input_format"] not in ("template", "pair"):
        raise EvalConfigError(f"must be 'template' or 'pair', got {cfg['base_input_format']!r}", key="eval.base_input_format")
    check_scoring_path(cfg["scoring_path"])
    if not float(cfg["scoring_parity_max_abs_diff"]) >= 0.0:
        raise EvalConfigError(f"must be >= 0, got {cfg['scoring_parity_max_abs_diff']!r}", key="eval.scoring_parity_max_abs_diff")
    if cfg["endpoint_truncate"] not in ("END", "NONE"):
        raise EvalConfigError(f"must be 'END' or 'NONE', got {cfg['endpoint_truncate']!r}", key="eval.endpoint_truncate")
    return cfg


def candidate_depth(cfg: dict) -> int:
    """Passages the first stage retrieves per query: ``max(top_k, first_stage_depth)``."""
    return max(int(cfg["top_k"]), int(cfg["first_stage_depth"] or 0))
