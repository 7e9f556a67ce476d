"""Benchmark: prep.teacher_denoise's cost and drop rate on a sample of SciFact's training queries.

    python benchmarks/bench_teacher.py --base /path/to/imported/ms-marco-MiniLM-L-12-v2 \
        [--scifact ../shared/data/scifact] [--queries 40] [--margin 0.0] [--negatives 8] [--depth 40]

The base is the folder rule import_base_model writes (output/.../base_model/ms-marco-MiniLM-L-12-v2), or
any checkpoint. For ``--queries`` seeded train queries: BM25's top ``--depth`` (positives removed; a proxy
for the configured first stage: no first-stage margin, no split exclusions) is the pool that
:func:`rerankflow.prep.mining.teacher_denoise` picks ``--negatives`` from, with the teacher scored as stage 3
scores the base (sentence pairs, 256 tokens, fp32, 2 threads). Prints the teacher's counts, wall time,
pairs/s and pairs per CPU-second (less sensitive to other users' load), and one dropped candidate per query.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--scifact", default=str(REPO.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--negatives", type=int, default=8)
    ap.add_argument("--depth", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    from rerankflow.beir import load_beir, passage_text
    from rerankflow.config import load_config
    from rerankflow.prep.mining import MiningResult, teacher_denoise
    from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer

    corpus, queries, qrels = load_beir(args.scifact, "train")
    qids = sorted(qrels)
    random.Random(0).shuffle(qids)
    qids = qids[:args.queries]
    cfg = load_config({})
    run, _ = bm25_retrieve(corpus, {q: queries[q] for q in qids}, args.depth,
                           BM25Settings.from_config(cfg["retrieval"]["bm25"]), None)
    ids = list(corpus)
    index = {d: i for i, d in enumerate(ids)}
    texts = [passage_text(corpus[d]) for d in ids]
    positives = [[(index[d], 0.0) for d, s in qrels[q].items() if s > 0] for q in qids]
    pools = [[(index[d], s) for d, s in run[q].items() if d not in qrels[q]] for q in qids]
    mined = MiningResult(positives=positives, negatives=pools)
    scorer = CrossEncoderScorer(args.base, max_length=args.max_length, template=cfg["reranker"]["prompt_template"],
                                device="cpu", bf16=False, batch_size=32, input_format="pair", threads=2)
    t, c = time.time(), time.process_time()
    stats = teacher_denoise(mined, [queries[q] for q in qids], texts,
                            score_pairs=lambda p, d: scorer.score(p, sort_by_length=True, desc=d),
                            num_negatives=args.negatives, margin=args.margin)
    wall, cpu = time.time() - t, time.process_time() - c
    pairs = stats["positives_scored"] + stats["candidates_scored"]
    print(stats)
    print(f"{pairs} pairs in {wall:.0f} s wall ({pairs / wall:.1f} pairs/s), {pairs / cpu:.2f} pairs per CPU-s; "
          f"{stats['candidates_scored'] / len(qids):.1f} candidates per query for {args.negatives} negatives")
    for i, q in enumerate(qids):
        for p, logit in mined.teacher_dropped[i][:1]:
            print(f"{q}: {queries[q][:80]!r} dropped {ids[p]} (logit {logit:.2f}, lowest positive "
                  f"{mined.teacher_reference[i]:.2f}, {len(mined.teacher_dropped[i])} dropped)")


if __name__ == "__main__":
    main()
