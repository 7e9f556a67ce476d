"""Benchmark: the bm25 first stage (rerankflow.retrieval.bm25) on SciFact test, no reranker.

    python benchmarks/bench_bm25.py [--scifact ../shared/data/scifact]

Prints, per (k1, b): nDCG@10, R@30, R@100 over the 300 test queries (pytrec_eval; a query that
retrieves nothing scores 0), the cold indexing time (tokenize + stem + index + write the cache), the
time to load the cached index, and the search time for all queries at top 100. Reference (issue 14):
bm25s 0.3.16 + PyStemmer, English stopwords, title + text: nDCG@10 0.686, R@30 0.870, R@100 0.913;
target: indexing SciFact in < 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = [(1.5, 0.75), (1.2, 0.75), (0.9, 0.4)]  # bm25s's default, a common Lucene one, Anserini's


def evaluate(run: dict, qrels: dict) -> dict:
    import numpy as np
    import pytrec_eval

    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.30", "recall.100"})
    res = ev.evaluate({q: d for q, d in run.items() if d})
    keys = [("nDCG@10", "ndcg_cut_10"), ("R@30", "recall_30"), ("R@100", "recall_100")]
    return {name: round(float(np.mean([res.get(q, {}).get(key, 0.0) for q in qrels])), 4) for name, key in keys}


def main() -> None:
    from rerankflow.beir import load_beir, passage_text
    from rerankflow.retrieval.bm25 import BM25Index, BM25Settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--scifact", type=Path,
                    default=Path(os.environ.get("RERANKFLOW_SCIFACT", REPO.parent / "shared" / "data" / "scifact")))
    args = ap.parse_args()
    corpus, queries, qrels = load_beir(args.scifact, "test")
    ids = list(corpus)
    texts = [passage_text(corpus[d]) for d in ids]
    for k1, b in SETTINGS:
        settings = BM25Settings(k1=k1, b=b, stemmer="english", stopwords="en")
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            BM25Index.build(ids, texts, settings, cache)
            t1 = time.perf_counter()
            index = BM25Index.build(ids, texts, settings, cache)
            t2 = time.perf_counter()
            run = index.retrieve(queries, 100)
            t3 = time.perf_counter()
        assert index.from_cache
        print(json.dumps({"k1": k1, "b": b, **evaluate(run, qrels), "queries": len(qrels), "documents": len(ids),
                          "index_cold_s": round(t1 - t0, 2), "index_cached_s": round(t2 - t1, 3),
                          "search_s": round(t3 - t2, 2)}), flush=True)


if __name__ == "__main__":
    main()
