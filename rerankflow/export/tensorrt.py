"""TensorRT engine for the exported ONNX reranker (``stage4_export/tensorrt/model.plan``).

:func:`build_engine` hands TensorRT (Python API, 8.6 or 10.x) exactly this:

* the ONNX file, parsed with ``trt.OnnxParser`` (parser errors are reported, never ignored);
* one optimisation profile with ``(batch, sequence)`` min/opt/max from ``export.trt`` — set on
  *every* network input (``input_ids``, ``attention_mask`` and
  ``token_type_ids`` when the graph has it);
* ``BuilderFlag.FP16`` (``fp16: true``) with every LayerNorm layer pinned to fp32
  (``layer.precision``, output types and, for ``INormalizationLayer``, ``compute_precision`` =
  ``float32``, plus ``OBEY_PRECISION_CONSTRAINTS``) so the variance reduction does not overflow in
  half precision;
* a workspace memory-pool limit (``workspace_gb``).

Where ``tensorrt`` is not importable, :func:`require_tensorrt` raises :class:`TensorRTUnavailable`
with what to install — the workflow never writes a placeholder plan. :func:`run_tensorrt` builds
the engine, then checks its logits against the serving path on real eval pairs (``tensorrt/parity.json``):
:class:`~rerankflow.scoring.onnx_scorer.OnnxScorer` tokenizes them in the input format and prompt
template of the ONNX export's record, plans the batches and scores them with ONNX Runtime; the
engine gets the very same batches. What it shares with the ONNX stage: the eval groups
(:mod:`~rerankflow.export.candidates`) and the comparison (:mod:`~rerankflow.export.parity`).
Settings come from the validated ``export`` (and its ``trt``) section: no defaults are held here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rerankflow.errors import InputError
from rerankflow.export.candidates import eval_groups
from rerankflow.export.parity import NO_PADDING_CUT, ParityError, check_parity, compare_scores, in_input_order, score_interleaved
from rerankflow.io import atomic_path, write_json
from rerankflow.scoring.export_record import resolve_text_settings
from rerankflow.scoring.onnx_scorer import OnnxScorer
from rerankflow.scoring.onnx_session import choose_providers

log = logging.getLogger(__name__)

class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU for it) is not available on this machine."""


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise :class:`TensorRTUnavailable` saying why."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed, so stage4_export/tensorrt/model.plan cannot be built here "
            f"({exc}). Install it on a machine with an NVIDIA GPU (pip install -r requirements-gpu.txt, "
            "which provides tensorrt), or set export.export_to_trt: false and do not request the "
            "tensorrt target. The ONNX model (stage4_export/onnx/model.onnx) does not need TensorRT."
        ) from None
    return trt


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: min/opt/max of (batch, sequence) for every input."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    @classmethod
    def from_config(cls, trt_cfg: dict) -> "Profile":
        """The profile of the ``export.trt`` section; raises unless min <= opt <= max."""
        p = cls(*(int(trt_cfg[k]) for k in ("min_batch", "opt_batch", "max_batch", "min_seq", "opt_seq", "max_seq")))
        if not (1 <= p.min_batch <= p.opt_batch <= p.max_batch):
            raise InputError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {p.min_batch}/{p.opt_batch}/{p.max_batch}", key="export.trt")
        if not (1 <= p.min_seq <= p.opt_seq <= p.max_seq):
            raise InputError(f"need 1 <= min_seq <= opt_seq <= max_seq, got {p.min_seq}/{p.opt_seq}/{p.max_seq}", key="export.trt")
        return p

    def shapes(self):
        return (self.min_batch, self.min_seq), (self.opt_batch, self.opt_seq), (self.max_batch, self.max_seq)


def _is_layernorm(trt, layer) -> bool:
    norm = getattr(trt.LayerType, "NORMALIZATION", None)
    if norm is not None and layer.type == norm:
        return True
    # older parsers decompose LayerNormalization into primitives named after the ONNX node
    return "layernorm" in (layer.name or "").lower().replace("_", "")


def build_engine(onnx_path, plan_path, trt_cfg: dict, trt=None) -> dict:
    """Build and atomically write a serialized engine; return a description of what was configured.

    ``trt_cfg`` is the ``export.trt`` section; ``trt`` the tensorrt module (tests pass a fake one to
    check the configuration handed over).
    """
    trt = trt or require_tensorrt()
    cfg = trt_cfg
    profile_cfg = Profile.from_config(cfg)
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(getattr(trt, "__version__", "10")).split(".")[0])
    flags = 0
    if major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(cfg["workspace_gb"]) * (1 << 30)))
    pinned = []
    if cfg["fp16"]:
        config.set_flag(trt.BuilderFlag.FP16)
        if cfg["layernorm_fp32"]:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if _is_layernorm(trt, layer):
                    norm_cls = getattr(trt, "INormalizationLayer", None)
                    if norm_cls is not None and layer.type == getattr(trt.LayerType, "NORMALIZATION", None):
                        layer.__class__ = norm_cls  # TensorRT's documented down-cast of an ILayer
                        layer.compute_precision = trt.float32  # accumulate mean/variance in fp32
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
                    pinned.append(layer.name)
            if not pinned:
                log.warning("fp16 with layernorm_fp32 requested but no LayerNorm layer was found in the network")

    profile = builder.create_optimization_profile()
    mn, opt, mx = profile_cfg.shapes()
    inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, mn, opt, mx)
        inputs.append(tensor.name)
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise InputError(f"the ONNX graph's inputs {inputs} lack input_ids/attention_mask", path=onnx_path)
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(bytes(serialized))
    return {
        "plan": str(plan_path),
        "tensorrt_version": str(getattr(trt, "__version__", "?")),
        "inputs": inputs,
        "profile": {"min": list(mn), "opt": list(opt), "max": list(mx)},
        "fp16": bool(cfg["fp16"]),
        "layernorm_fp32_layers": pinned,
        "workspace_gb": float(cfg["workspace_gb"]),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }


class TrtRunner:
    """Run a serialized engine on CUDA with torch tensors as buffers (TensorRT >= 8.5 name-based API)."""

    def __init__(self, plan_path, trt=None):
        import torch

        self.trt = trt or require_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU, and torch sees none")
        self.torch = torch
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.output = "logits"

    def __call__(self, batch: dict) -> np.ndarray:
        torch = self.torch
        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            arr = torch.from_numpy(np.ascontiguousarray(batch[name])).to("cuda")
            want = self.trt.nptype(self.engine.get_tensor_dtype(name))
            arr = arr.to(getattr(torch, np.dtype(want).name))
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, arr.data_ptr())
            keep.append(arr)
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.output))).name
        out = torch.empty(out_shape, dtype=getattr(torch, out_dtype), device="cuda")
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.float().reshape(-1).cpu().numpy()


def run_tensorrt(onnx_path, out_dir, eval_dir, export_cfg: dict, reranker_cfg: dict, retrieval_cfg: dict, *,
                 device: str, seed: int) -> dict:
    """Build ``out_dir/model.plan`` from the ONNX export and check it against ONNX Runtime.

    Writes ``out_dir/parity.json`` (max/mean abs logit difference, Spearman, top-10 agreement on
    real eval pairs, TensorRT vs ONNX Runtime); raises when the max difference exceeds
    ``export.trt.parity_tolerance`` after writing it.
    """
    trt = require_tensorrt()
    tcfg = export_cfg["trt"]
    profile = Profile.from_config(tcfg)
    # the pairs are tokenized as the ONNX model was exported (its record), which must agree with the config
    _ml, template, input_format = resolve_text_settings(onnx_path, None, reranker_cfg["prompt_template"], reranker_cfg["input_format"])
    out_dir = Path(out_dir)
    build = build_engine(onnx_path, out_dir / "model.plan", tcfg, trt=trt)
    log.info("built %s", build)

    groups = eval_groups(eval_dir, export_cfg, tcfg["parity_pairs"], retrieval_cfg, device=device, seed=seed)
    pairs = [(g.query, p) for g in groups for p in g.passages]
    scorer = OnnxScorer(
        onnx_path, max_length=min(int(reranker_cfg["max_length"]), profile.max_seq), prompt_template=template,
        input_format=input_format, providers=choose_providers(export_cfg["execution_provider"], key="export.execution_provider"),
        batch_size=min(int(export_cfg["batch_size"]), profile.max_batch), intra_op_threads=0, max_padding=NO_PADDING_CUT,
    )
    encoded = scorer.encode_texts([scorer.format(q, p) for q, p in pairs])
    chunks = scorer.plan(encoded)
    batches = [scorer.feeds([encoded[i] for i in rows]) for rows in chunks]
    scores, secs = score_interleaved({"onnx": (scorer.run_feeds, batches), "tensorrt": (TrtRunner(out_dir / "model.plan", trt), batches)})
    scores = {name: in_input_order(s, chunks) for name, s in scores.items()}
    report = compare_scores(scores["onnx"], scores["tensorrt"], groups)
    report.update({
        "reference": f"ONNX Runtime ({scorer.session.get_providers()[0]})",
        "tolerance": float(tcfg["parity_tolerance"]),
        "build": build,
        "input_format": input_format,
        "onnx_pairs_per_s": round(len(pairs) / secs["onnx"], 2),
        "tensorrt_pairs_per_s": round(len(pairs) / secs["tensorrt"], 2),
    })
    try:
        check_parity(report, float(tcfg["parity_tolerance"]))
        report["passed"] = True
    except ParityError:
        report["passed"] = False
        write_json(out_dir / "parity.json", report)
        raise
    write_json(out_dir / "parity.json", report)
    return report
