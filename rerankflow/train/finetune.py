"""Stage 2: fine-tune a cross-encoder reranker, validate it, keep BEST and LATEST, resume after a kill.

Entry points
------------
* :func:`run_finetune` — what the Snakemake script calls. It decides the number of processes
  (``finetune.nproc`` override, else the visible GPUs, limited by the ``gpus`` the job was given) and
  either trains in this process or launches ``torchrun`` (``python -m torch.distributed.run
  --standalone``) on ``python -m rerankflow.train.finetune --spec <json>`` (:func:`main`).
* :func:`rerankflow.train.loop.train` — the training loop of one process (rank).

The parts: :mod:`~rerankflow.train.spec` (checked settings, run spec, resume hash),
:mod:`~rerankflow.train.data` (examples, negatives, length-grouped plan), :mod:`~rerankflow.train.loop`,
:mod:`~rerankflow.train.distributed`, :mod:`~rerankflow.train.checkpoints`, :mod:`~rerankflow.train.report`.

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
import json
import os
import subprocess
import sys
from pathlib import Path

from rerankflow.io import read_json, write_json
from rerankflow.train.loop import train
from rerankflow.train.spec import make_spec, world_size_for


def run_finetune(train_path, val_path, base_model: str, out_dir, finetune: dict, reranker: dict, *, seed: int,
                 device: str, threads: int, gpus: int) -> dict:
    """Train (resuming when a matching checkpoint exists) and return the summary of the run.

    ``finetune`` / ``reranker``: the validated sections (``reranker``: ``prompt_template``,
    ``input_format``, ``max_length``: pairs are tokenized in that input format for training and
    validation, and the checkpoints record it). Resource keys in ``finetune`` are ignored: ``threads``
    (CPU threads of the job, 0 = all cores) and ``gpus`` (GPUs the job was given, 0 = no cap) come from
    the job. With more than one process this launches ``torchrun`` and waits for it.
    """
    spec = make_spec(train_path, val_path, base_model, out_dir, finetune, reranker, seed=seed, device=device,
                     threads=threads)
    ft, dev = spec["finetune"], spec["device"]
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    world = world_size_for(ft["nproc"], gpus, dev)
    if world <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return train(spec)
    return _launch(spec, world, out_dir)


def _launch(spec: dict, world: int, out_dir: Path) -> dict:
    """Run ``world`` processes with torchrun on the written spec; return the summary rank 0 wrote."""
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
    return read_json(out_dir / "training_summary.json")


def main(argv=None) -> int:
    """``python -m rerankflow.train.finetune --spec run_spec.json``: one process (rank) of a run."""
    ap = argparse.ArgumentParser(description="rerankflow stage 2 worker (one process of a run)")
    ap.add_argument("--spec", required=True, help="JSON run spec written by run_finetune")
    args = ap.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
