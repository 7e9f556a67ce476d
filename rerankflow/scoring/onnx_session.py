"""The one way an ONNX Runtime session is made: provider choice and session options.

Used by the ranking service (``deploy.device``), stage 4's parity check (``export.execution_provider``)
and the TensorRT build's reference run, so all three run the model the same way.

Provider rule (:func:`choose_providers`), stated once:

* ``cpu`` -> ``CPUExecutionProvider``;
* ``auto`` -> CUDA when onnxruntime offers ``CUDAExecutionProvider`` **and** a GPU is visible
  (:func:`gpu_visible`), else CPU;
* ``cuda`` / ``tensorrt`` -> that provider (TensorRT backed by CUDA), CPU last; asking for one
  where onnxruntime does not offer it or no GPU is visible is an :class:`~rerankflow.errors.InputError`,
  never a silent CPU fallback.

Sessions (:func:`make_session`): all graph optimisations, ``intra_op_threads`` (0 = one per core),
one inter-op thread, idle threads sleep instead of spinning (``RERANKFLOW_ORT_SPIN=1`` restores
spinning), warnings and below not logged, and CUDA without TF32 so fp32 logits are computed at
fp32 precision (parity is measured at, and serving runs at, the precision of the export).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rerankflow.errors import InputError

EXECUTION_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def gpu_visible() -> bool:
    """Whether this process sees a CUDA GPU: torch's answer where torch is installed, else an
    NVIDIA device node (``/dev/nvidia0``...) not hidden by ``CUDA_VISIBLE_DEVICES``."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # pragma: no cover - a broken torch install: decide from the device nodes
            pass
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def choose_providers(execution_provider: str, *, key: str) -> list[str]:
    """ONNX Runtime providers, in order, for ``auto|cpu|cuda|tensorrt`` (rule in the module docstring).

    ``key`` is the config key the value came from (``deploy.device``, ``export.execution_provider``),
    named in errors.
    """
    import onnxruntime as ort

    if execution_provider == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    visible = gpu_visible()
    if execution_provider == "auto":
        if "CUDAExecutionProvider" in available and visible:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    name = EXECUTION_PROVIDERS.get(execution_provider)
    if name is None:
        raise InputError(f"unknown execution provider {execution_provider!r}; expected auto, cpu, "
                         f"{', '.join(EXECUTION_PROVIDERS)}", key=key)
    if name not in available or not visible:
        raise InputError(
            f"{name} is not available here (onnxruntime providers: {available}, GPU visible: {visible}); "
            f"install onnxruntime-gpu on a GPU machine or set {key}: auto",
            key=key,
        )
    if name == "TensorrtExecutionProvider":
        return [name, "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [name, "CPUExecutionProvider"]


def make_session(model_file: str | os.PathLike, providers: Sequence[str], intra_op_threads: int):
    """An ``onnxruntime.InferenceSession`` of ``model_file`` on ``providers`` (options in the module docstring)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("RERANKFLOW_ORT_SPIN", "0") != "1":
        # idle intra-op threads sleep instead of spinning: spinning burns a core between
        # runs, which on a shared or busy CPU costs more than it saves
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with_options = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=with_options)
