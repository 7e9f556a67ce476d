"""Settings of the built-in ranking service (:class:`ServeSettings`) and the bearer token they name.

Every serving knob is a ``deploy`` config key and takes its value from the validated config
(``ServeSettings.from_config(load_config()["deploy"], reranker, model)``; the deploy rule writes the
result to ``server_settings.json``, which ``rerankflow serve --settings`` reads back). The text
settings ``max_length``/``prompt_template``/``input_format`` may stay ``None``: the server then
takes the export's record (:mod:`rerankflow.scoring.export_record`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from rerankflow.errors import InputError
from rerankflow.formatting import INPUT_FORMATS


@dataclass
class ServeSettings:
    """Everything the server needs; the ``deploy`` and ``reranker`` config sections map onto it."""

    model: str
    host: str
    port: int
    device: str
    intra_op_threads: int
    max_batch_size: int
    max_wait_ms: float
    batch_workers: int
    max_padding: float
    dynamic_batching: bool
    max_passages: int
    max_body_bytes: int
    max_text_chars: int
    default_truncate: str
    max_queued_pairs: int
    retry_after_s: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float
    limit_concurrency: int | None
    max_batch_tokens: int | None = None  # None: batches bounded by max_batch_size pairs only
    fusion_weight: float | None = None  # None: the export record's fusion weight (rerankflow_export.json 'fusion'), if any
    tokenizer: str | None = None
    model_name: str | None = None
    max_length: int | None = None  # None: the export's record (rerankflow_export.json), else the schema's
    prompt_template: str | None = None  # None: the export's record, else the schema's
    input_format: str | None = None  # None: the export's record (no key there: template), else the schema's
    auth_token_env: str | None = None
    graceful_timeout_s: float = 10.0  # seconds uvicorn lets in-flight requests finish on shutdown
    log_level: str = "info"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeSettings":
        """Build from a flat dict, ignoring keys that are not settings (e.g. the ``nim`` block)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_config(cls, deploy: dict, reranker: dict, model: str | os.PathLike, **overrides) -> "ServeSettings":
        """Settings from the validated ``deploy`` section and the ``reranker`` keys given (absent = the export's)."""
        d = {k: v for k, v in deploy.items() if k != "model"}  # deploy.model names the export folder, not a path
        d.update(
            model=str(model),
            port=int(deploy["port"]),
            max_length=reranker.get("max_length"),
            prompt_template=reranker.get("prompt_template"),
            input_format=reranker.get("input_format"),
        )
        d.update(overrides)
        return cls.from_dict(d)

    def validate(self) -> "ServeSettings":
        for name in ("max_batch_size", "batch_workers", "max_passages", "max_body_bytes", "max_text_chars",
                     "max_queued_pairs", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)!r}", key=f"deploy.{name}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise InputError(f"must be > 0 seconds, got {getattr(self, name)!r}", key=f"deploy.{name}")
        if self.limit_concurrency is not None and int(self.limit_concurrency) < 1:
            raise InputError(f"must be >= 1 or null, got {self.limit_concurrency!r}", key="deploy.limit_concurrency")
        self.check_batch_tokens()
        if self.fusion_weight is not None:
            from rerankflow.scoring.fusion import check_fusion_weight

            self.fusion_weight = check_fusion_weight(self.fusion_weight, where="deploy.fusion_weight")
        if self.max_wait_ms < 0:
            raise InputError(f"must be >= 0, got {self.max_wait_ms!r}", key="deploy.max_wait_ms")
        if self.default_truncate not in ("NONE", "END"):
            raise InputError(f"must be NONE or END, got {self.default_truncate!r}", key="deploy.default_truncate")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise InputError(f"must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}", key="reranker.input_format")
        return self

    def check_batch_tokens(self, max_length: int | None = None) -> None:
        """``max_batch_tokens`` is null or an integer that holds at least one pair of ``max_length`` tokens (the
        argument, else the setting when known: the server checks again with the length it serves)."""
        budget = self.max_batch_tokens
        max_length = self.max_length if max_length is None else max_length
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InputError(f"must be a positive integer (padded tokens per batch) or null, got {budget!r}",
                             key="deploy.max_batch_tokens")
        if max_length is not None and budget < int(max_length):
            raise InputError(f"must be >= max_length={max_length} so that one pair of max_length tokens fits in a "
                             f"batch, got {budget}", key="deploy.max_batch_tokens")

    def to_json(self) -> dict:
        return asdict(self)


def read_auth_token(settings: ServeSettings) -> str | None:
    """The bearer token clients must send (the value of ``$auth_token_env``), or None without auth.

    Raises when auth is configured but the variable is unset or empty, so a deploy fails before it
    starts a server nobody can use. The value is never logged or written.
    """
    if not settings.auth_token_env:
        return None
    token = os.environ.get(settings.auth_token_env, "")
    if not token:
        raise InputError(
            f"auth is configured but environment variable {settings.auth_token_env} is unset or empty; "
            "export the token there or set auth_token_env to null",
            key="deploy.auth_token_env",
        )
    return token


def load_settings_file(path: str | os.PathLike) -> dict:
    """Read a JSON settings file written by the deploy rule (:mod:`rerankflow.deploy.builtin`)."""
    from rerankflow.io import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError("expected a JSON object of server settings", path=path)
    return data
