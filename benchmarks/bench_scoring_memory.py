"""Stage 3 scoring memory: tokenizing the pairs in blocks vs all at once (issue 16, "bounded memory").

``CrossEncoderScorer.score`` tokenizes and length-sorts pairs a block of
``rerankflow.scoring.cross_encoder.ENCODE_BLOCK_PAIRS`` at a time. Before, it tokenized every pair in
one call, and stage 3 on ArguAna (42,180 pairs per reranker) peaked at 13.4 GB. This script scores
``--pairs`` real pairs (random ArguAna test queries x random ArguAna arguments: long queries and
passages, as stage 3 sees them) through the real ``score`` path, once per mode in a fresh process, with
the model's forward replaced by zeros. What is measured is what tokenizing and batching hold: peak RSS,
the padded tokens the batches would feed the model (the cost of sorting within blocks instead of across
all pairs), and the seconds.

    PYTHONPATH=. python benchmarks/bench_scoring_memory.py --model <a cross-encoder folder> --data ../shared/data/arguana
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child(args) -> dict:
    import numpy as np

    import rerankflow.scoring.cross_encoder as ce
    from rerankflow.beir import load_corpus, load_queries, passage_text

    corpus = load_corpus(Path(args.data) / "corpus.jsonl")
    queries, _ = load_queries(Path(args.data) / "queries.jsonl")
    rng = random.Random(0)
    qtexts, docs = list(queries.values()), list(corpus.values())
    pairs = [(rng.choice(qtexts), passage_text(rng.choice(docs))) for _ in range(args.pairs)]
    scorer = ce.CrossEncoderScorer(args.model, max_length=args.max_length, template="{query} {passage}", device="cpu",
                                   bf16=False, batch_size=args.batch_size, input_format="pair", threads=args.threads)
    if args.mode == "all_at_once":
        ce.ENCODE_BLOCK_PAIRS = len(pairs)  # the previous behaviour: one tokenizer call for every pair
    widths = []

    def no_forward(ids, types=None):
        widths.append((len(ids), max(len(x) for x in ids)))
        return np.zeros(len(ids), dtype=np.float32)

    scorer._logits = no_forward
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    t0 = time.perf_counter()
    scorer.score(pairs, sort_by_length=True, progress=False)
    return {"mode": args.mode, "pairs": len(pairs), "block_pairs": ce.ENCODE_BLOCK_PAIRS,
            "peak_rss_mb_before_scoring": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "padded_tokens": sum(n * w for n, w in widths), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face cross-encoder folder (its tokenizer is what counts)")
    ap.add_argument("--data", default=os.environ.get("RERANKFLOW_ARGUANA", str(ROOT.parent / "shared" / "data" / "arguana")))
    ap.add_argument("--pairs", type=int, default=42180, help="default: ArguAna's stage 3 (1,406 queries x top 30)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--mode", choices=["blocks", "all_at_once"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in ("all_at_once", "blocks"):  # a fresh process each: peak RSS is per process
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--data", args.data, "--pairs", str(args.pairs),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    old, new = rows
    summary = {"peak_rss_ratio": round(new["peak_rss_mb"] / old["peak_rss_mb"], 3),
               "padded_tokens_ratio": round(new["padded_tokens"] / old["padded_tokens"], 4), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
