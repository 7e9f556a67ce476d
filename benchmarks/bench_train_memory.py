"""Stage 2 at a config's settings: peak RSS per phase, pairs/s and the loss curve of a short run.

Runs our trainer (:class:`rerankflow.train.loop.Training`, exactly what the ``finetune`` rule runs) on a
prepared ``stage1_prep`` folder with the ``finetune`` / ``reranker`` sections of a config file (default
``config/scifact.yaml``: SciFact A) plus overrides, for ``--steps`` optimizer steps, in **this process**
(run one setting per process: ``ru_maxrss`` is the process's). A thread samples the resident set
(``/proc/self/statm``) every 10 ms and charges it to the phase running: ``load`` (data, model, optimizer),
``val_base`` (validation of the untouched base), ``step`` (forward + backward + AdamW), ``val``, ``save``.

Prints one JSON line: peak RSS per phase and overall, pairs/s of the steps, the loss per step, the
last validation and the training setup (attention, bf16, checkpointing).

    PYTHONPATH=. python benchmarks/bench_train_memory.py --prep /work/runs/scifact_hybA/stage1_prep \\
        --base /work/runs/scifact_hybA/base_model/ms-marco-MiniLM-L-12-v2 --steps 5 --set gradient_checkpointing=true
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Peak resident set size (MB) per phase, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peak, self.stop = interval, "start", {}, False

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE / 2**20

    def run(self):
        while not self.stop:
            rss = self.rss_mb()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), rss)
            time.sleep(self.interval)


def parse_value(text: str):
    return yaml.safe_load(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prep", required=True, help="a stage1_prep folder (train_mined.automodel_unrolled.json, val.json)")
    ap.add_argument("--base", required=True, help="the base model folder (HF checkpoint)")
    ap.add_argument("--config", default=str(REPO / "config" / "scifact.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="finetune override (reranker.max_length=512 for the reranker section); repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    ap.add_argument("--out", default="", help="output folder (default: a temporary one)")
    ap.add_argument("--json", default="", help="also write the result here")
    a = ap.parse_args()

    sampler = RssSampler()
    sampler.start()
    sampler.phase = "load"
    import torch  # noqa: F401  (counted in load)

    from rerankflow.config import load_config
    from rerankflow.train.loop import Training
    from rerankflow.train.spec import make_spec

    overlay = yaml.safe_load(Path(a.config).read_text())
    for kv in a.set:
        key, _, value = kv.partition("=")
        section, _, name = key.rpartition(".")
        overlay.setdefault(section or "finetune", {})[name] = parse_value(value)
    overlay.setdefault("finetune", {})["max_steps"] = a.steps
    config = load_config(overlay)
    ft = dict(config["finetune"])
    # checkpoints only at the end; validation at the start (val_at_start) and at the end
    ft.update(checkpoint_every_steps=0, val_every_steps=0)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_train_memory_"))
    prep = Path(a.prep)
    spec = make_spec(prep / "train_mined.automodel_unrolled.json", prep / "val.json", a.base, out, ft,
                     config["reranker"], seed=config["seed"] if a.seed is None else a.seed, device="cpu",
                     threads=a.threads)
    t0 = time.perf_counter()
    t = Training(spec)

    def phased(name, fn):
        def wrapper(*args, **kwargs):
            before = sampler.phase
            sampler.phase = "val_base" if name == "val" and t.state["step"] == 0 else name
            try:
                return fn(*args, **kwargs)
            finally:
                sampler.phase = before
        return wrapper

    t.step = phased("step", t.step)
    t.validate = phased("val", t.validate)
    t.save = phased("save", t.save)
    t.resume_or_start()
    t.validate_base()
    sampler.phase = "loop"
    pairs, secs = t.run()
    sampler.phase = "end"
    time.sleep(0.05)
    sampler.stop = True
    wall = time.perf_counter() - t0
    recs = t.records
    res = {
        "settings": {k: ft[k] for k in ("local_batch_size", "global_batch_size", "train_n_passages", "precision",
                                        "gradient_checkpointing", "val_batch_size", "val_max_queries", "loss")},
        "max_length": config["reranker"]["max_length"], "input_format": config["reranker"]["input_format"],
        "steps": t.state["step"], "pairs": pairs, "pairs_per_s": round(pairs / secs, 3) if secs else None,
        "cpu_s_steps": round(sum(r["cpu_s"] for r in recs if r["event"] == "train"), 2),
        "pairs_per_cpu_s": round(pairs / max(1e-9, sum(r["cpu_s"] for r in recs if r["event"] == "train")), 3),
        "wall_s": round(wall, 1),
        "peak_rss_mb": {k: round(v) for k, v in sampler.peak.items()},
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "losses": [r["loss"] for r in recs if r["event"] == "train"],
        "val": [{k: r.get(k) for k in ("step", "val_ndcg@10", "val_mrr")} for r in recs if r["event"] == "val"],
        "setup": t.state.get("setup"), "load_avg": os.getloadavg(), "out": str(out),
    }
    if t.live_fh:
        t.live_fh.close()
    print(json.dumps(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
