"""Scoring paths: the ways stage 3 can compute a checkpoint's logits, and a scorer for each.

``eval.scoring_path`` names one of :data:`SCORING_PATHS`:

* ``torch_fp32`` — the checkpoint in PyTorch at fp32 (:class:`~rerankflow.scoring.cross_encoder.CrossEncoderScorer`,
  transformers' default attention, ``sdpa`` for BERT). The **reference**: every other path is checked
  against it.
* ``torch_bf16`` — the same model under bf16 autocast on the device's type (CUDA, or a CPU; fast on
  CPUs with AVX-512 BF16 / AMX, slow on CPUs without them).
* ``onnx`` — the checkpoint's fp32 ONNX export (:mod:`rerankflow.scoring.onnx_cache`, the stage 4
  exporter) on ONNX Runtime's CPU provider, through the serving class
  :class:`~rerankflow.scoring.onnx_scorer.OnnxScorer` (its tokenizer is the exported ``tokenizer.json``).
  Needs a 1-label checkpoint (what stage 4 exports).
* ``auto`` — the fastest of these whose scores pass the parity check against ``torch_fp32`` on real
  pairs; fp32 when none does (:mod:`rerankflow.scoring.path_choice`). Which paths it tries, fastest
  first, is :func:`auto_candidates` (measured: ``torch_bf16`` where the hardware has native bf16).

Every scorer returned by :func:`load_path_scorer` has ``score(pairs, *, sort_by_length, progress, desc)
-> float32 logits`` aligned with ``pairs`` (raw logits: the positive-class one for 1-label models).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.models import cpu_has_native_bf16  # noqa: F401  (re-exported: the scoring paths and stage 2 decide with it)

log = logging.getLogger(__name__)

SCORING_PATHS = ("auto", "torch_fp32", "torch_bf16", "onnx")
REFERENCE_PATH = "torch_fp32"


def check_scoring_path(path: str, *, key: str = "eval.scoring_path") -> str:
    """``path`` if it is one of :data:`SCORING_PATHS`, else an :class:`InputError` naming ``key``."""
    if path not in SCORING_PATHS:
        raise InputError(f"unknown scoring path {path!r}; expected one of {', '.join(SCORING_PATHS)}", key=key)
    return path


def auto_candidates(device: str) -> list[str]:
    """The paths ``auto`` tries on ``device``, fastest first (benchmarks/RESULTS.md, "Stage 3 scoring paths").

    On a CPU: ``torch_bf16`` when the CPU has native bf16 (measured 1.5x torch fp32 with AMX; without
    native bf16, autocast is slower than fp32), else nothing. ``onnx`` is not tried: ONNX Runtime fp32
    measured 0.98-1.02x torch fp32 (sdpa) here, so its export would cost time for no speed. On CUDA:
    ``torch_bf16`` when the GPU supports bf16. ``torch_fp32``, the reference and the fallback, is never
    in this list.
    """
    if str(device).startswith("cuda"):
        import torch

        return ["torch_bf16"] if torch.cuda.is_bf16_supported() else []
    return ["torch_bf16"] if cpu_has_native_bf16() else []


class OnnxPairScorer:
    """:class:`~rerankflow.scoring.onnx_scorer.OnnxScorer` with the stage 3 scorer interface (``score(pairs, ...)``).

    Pairs are tokenized with the export's tokenizer in the export's input format, a block of
    :data:`~rerankflow.scoring.cross_encoder.ENCODE_BLOCK_PAIRS` at a time, sorted by length within the block
    and run in chunks of ``batch_size`` rows (fp32 ONNX logits do not depend on the batch, so
    ``sort_by_length`` only changes speed and is always on).
    """

    def __init__(self, model_file, *, batch_size: int, threads: int, max_length: int, template: str, input_format: str):
        from rerankflow.scoring.onnx_scorer import OnnxScorer

        self.scorer = OnnxScorer(model_file, max_length=max_length, prompt_template=template, input_format=input_format,
                                 providers=["CPUExecutionProvider"], batch_size=batch_size,
                                 intra_op_threads=int(threads), max_padding=-1.0)
        self.attention = None

    def score(self, pairs: Sequence[tuple[str, str]], *, sort_by_length: bool, progress: bool = True,
              desc: str = "rerank") -> np.ndarray:
        """Raw logits (float32) aligned with ``pairs``."""
        from tqdm.auto import tqdm

        del sort_by_length  # always length-sorted (see class docstring)
        out = np.zeros(len(pairs), dtype=np.float32)
        if not pairs:
            return out
        from rerankflow.scoring.cross_encoder import pair_blocks

        s = self.scorer
        with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress, mininterval=2.0) as bar:
            for block, chunk in pair_blocks(pairs):  # tokenized a block at a time: bounded memory
                encoded = s.encode_texts([s.format(q, p) for q, p in chunk])
                for rows in s.plan(encoded):
                    out[block + np.asarray(rows)] = s.run_chunk([encoded[i] for i in rows])
                    bar.update(len(rows))
        return out


def load_path_scorer(path: str, checkpoint, *, max_length: int, template: str, input_format: str, device: str,
                     batch_size: int, onnx_cache_dir) -> tuple[object, dict]:
    """``(scorer, info)`` computing ``checkpoint``'s logits along the concrete ``path`` (not ``auto``).

    ``info`` says how: ``{"path", "device", "attention"}`` plus, for ``onnx``, the export's folder,
    key and whether it was cached. ``onnx`` runs on the CPU whatever ``device`` is; its threads are
    torch's (the rule's). Raises :class:`InputError` for a path that cannot run here (ONNX of a
    2-label checkpoint).
    """
    if path == "auto" or path not in SCORING_PATHS:
        raise ValueError(f"load_path_scorer needs a concrete scoring path, got {path!r}")
    if path in ("torch_fp32", "torch_bf16"):
        from rerankflow.scoring.cross_encoder import CrossEncoderScorer

        scorer = CrossEncoderScorer(checkpoint, max_length=max_length, template=template, device=device,
                                    bf16=path == "torch_bf16", batch_size=batch_size, input_format=input_format)
        return scorer, {"path": path, "device": str(scorer.device), "attention": scorer.attention}
    import torch

    from rerankflow.scoring.onnx_cache import cached_onnx_export

    if int(getattr(_config(checkpoint), "num_labels", 1)) != 1:
        raise InputError("the onnx scoring path needs a 1-label cross-encoder (what stage 4 exports)", path=checkpoint,
                         key="eval.scoring_path")
    model_file, export = cached_onnx_export(checkpoint, onnx_cache_dir, input_format=input_format, template=template,
                                            max_length=max_length)
    scorer = OnnxPairScorer(model_file, batch_size=batch_size, threads=torch.get_num_threads(), max_length=max_length,
                            template=template, input_format=input_format)
    return scorer, {"path": path, "device": "cpu", "attention": None, "onnx_export": export}


def _config(checkpoint):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(checkpoint))
