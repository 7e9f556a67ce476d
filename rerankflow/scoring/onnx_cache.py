"""The ONNX export of a checkpoint for scoring, made once per checkpoint content and kept in a cache folder.

Stage 3's ``onnx`` scoring path (:mod:`rerankflow.scoring.paths`) scores a checkpoint with ONNX
Runtime. The model it runs is the stage 4 export of that checkpoint
(:func:`rerankflow.scoring.onnx_graph.export_onnx`: fp32, TorchScript exporter, the tokenizer and the
export record beside it), written to ``<cache_dir>/<key>/`` where ``key`` names

* the checkpoint's content (:func:`rerankflow.scoring.score_cache.checkpoint_digest`: weights,
  config and tokenizer files), and
* the export settings that reach the graph or its record: input format, prompt template (template
  format only), max length, opset.

So a changed checkpoint is exported again, an unchanged one never is (a SciFact evaluation that
re-runs after only the fine-tuned model changed reuses the base's export). The folder appears
atomically (``export_onnx`` writes it that way); two evaluations exporting the same key at once
both succeed and one export wins. The opset and external-data threshold are the ``export``
section's schema defaults, the settings stage 4 exports with unless configured otherwise.

Whether the export reproduces the checkpoint is not assumed: the caller measures it on real pairs
(:mod:`rerankflow.scoring.path_choice`), as stage 4 does for the deployed export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from rerankflow.scoring.score_cache import checkpoint_digest

log = logging.getLogger(__name__)


def export_defaults() -> dict:
    """``{"opset", "external_data_threshold_mb"}``: the export section's schema defaults."""
    from rerankflow.config import load_schema

    props = load_schema()["properties"]["export"]["properties"]
    return {k: props[k]["default"] for k in ("opset", "external_data_threshold_mb")}


def export_key(checkpoint, *, input_format: str, template: str, max_length: int, opset: int) -> str:
    """Hex key of the export of ``checkpoint`` with these settings (see module docstring)."""
    settings = {"input_format": input_format, "template": template if input_format == "template" else None,
                "max_length": int(max_length), "opset": int(opset), "dtype": "fp32"}
    h = hashlib.sha256(checkpoint_digest(checkpoint).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def cached_onnx_export(checkpoint, cache_dir, *, input_format: str, template: str, max_length: int) -> tuple[Path, dict]:
    """``(model.onnx path, info)`` of the fp32 export of ``checkpoint``, exported now only if not cached.

    ``info``: ``{"dir", "key", "cached", "export_s"}`` (``export_s`` 0 when cached).
    """
    from rerankflow.scoring.onnx_graph import export_onnx

    settings = export_defaults()
    key = export_key(checkpoint, input_format=input_format, template=template, max_length=max_length,
                     opset=settings["opset"])
    out = Path(cache_dir) / key[:24]
    info = {"dir": str(out), "key": key, "cached": True, "export_s": 0.0}
    if (out / "model.onnx").is_file():
        log.info("ONNX scoring export of %s: cached in %s", checkpoint, out)
        return out / "model.onnx", info
    t0 = time.perf_counter()
    path = export_onnx(checkpoint, out, opset=settings["opset"], dtype="fp32", max_length=max_length,
                       prompt_template=template, input_format=input_format,
                       external_data_threshold_mb=settings["external_data_threshold_mb"])
    info.update(cached=False, export_s=round(time.perf_counter() - t0, 3))
    log.info("ONNX scoring export of %s -> %s in %.1fs", checkpoint, out, info["export_s"])
    return path, info
