"""Stage 2 on CPU: does ``torch.compile`` speed up a training step over today's eager step?

Both variants train the same model (a fresh copy each) with what stage 2 does per step at the SciFact A
settings: bf16 autocast, SDPA attention with attention dropout 0, groups of ``--n-passages`` (1 positive
+ negatives) under the listwise loss, AdamW, gradient clipping. Batches are real SciFact pairs (train
queries x their BM25 top candidates, the labelled positive first), tokenized once and padded to
``--max-length`` so the compiled graph sees one shape (its most favourable case). Steps run **in turn**
(eager, compiled, eager, ...) so load on a shared machine slows both alike. The compiled variant's first
step (compilation) is reported apart and left out of its pairs/s.

    PYTHONPATH=. python benchmarks/bench_train_compile.py --model <ms-marco-MiniLM-L-12-v2 folder> --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scifact_groups(n_queries: int, n_passages: int, cache_dir: str) -> list[tuple[str, list[str]]]:
    """``[(query, [positive, negative, ...])]`` for the first ``n_queries`` SciFact train queries: the
    labelled positive and the BM25 top candidates that are not labelled relevant."""
    from rerankflow.beir import load_corpus, load_qrels, load_queries, passage_text
    from rerankflow.config import load_config
    from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve

    path = Path(os.environ.get("RERANKFLOW_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
    corpus = load_corpus(path / "corpus.jsonl")
    queries, _ = load_queries(path / "queries.jsonl")
    qrels = load_qrels(path / "qrels" / "train.tsv")
    qids = [q for q in qrels if any(d in corpus for d in qrels[q])][:n_queries]
    settings = BM25Settings.from_config(load_config()["retrieval"]["bm25"])
    run, _ = bm25_retrieve(corpus, {q: queries[q] for q in qids}, n_passages + 4, settings, cache_dir)
    groups = []
    for q in qids:
        pos = next(d for d in qrels[q] if d in corpus)
        negs = [d for d in run[q] if d not in qrels[q]][:n_passages - 1]
        groups.append((queries[q], [passage_text(corpus[d]) for d in [pos, *negs]]))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face cross-encoder folder (the base of stage 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after the first)")
    ap.add_argument("--queries-per-step", type=int, default=8)
    ap.add_argument("--n-passages", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(ROOT / "output" / "bench" / "bm25"))
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    n_q = args.queries_per_step * (args.steps + 1)
    groups = scifact_groups(n_q, args.n_passages, args.cache_dir)
    batches = []
    for i in range(0, len(groups) - args.queries_per_step + 1, args.queries_per_step):
        chunk = groups[i:i + args.queries_per_step]
        qs = [q for q, ps in chunk for _ in ps]
        ps = [p for _, ps in chunk for p in ps]
        batches.append(tok(qs, ps, truncation="longest_first", max_length=args.max_length, padding="max_length",
                           return_tensors="pt"))
    base = AutoModelForSequenceClassification.from_pretrained(args.model, attn_implementation="sdpa",
                                                              attention_probs_dropout_prob=0.0)
    variants = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=4e-5)
        forward = torch.compile(model) if name == "compiled" else model
        variants[name] = {"model": model, "opt": opt, "forward": forward, "secs": [], "losses": []}

    def step(v, enc):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = v["forward"](**enc).logits.float().view(-1, args.n_passages)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v["model"].parameters(), 1.0)
        v["opt"].step()
        v["opt"].zero_grad(set_to_none=True)
        v["secs"].append(time.perf_counter() - t0)
        v["losses"].append(round(float(loss.detach()), 4))

    for enc in batches:
        for v in variants.values():
            step(v, enc)
    pairs = args.queries_per_step * args.n_passages
    result = {"model": args.model, "max_length": args.max_length, "pairs_per_step": pairs, "timed_steps": len(batches) - 1,
              "threads": args.threads, "torch": torch.__version__, "load_average": os.getloadavg()}
    for name, v in variants.items():
        timed = v["secs"][1:]
        result[name] = {"first_step_s": round(v["secs"][0], 2), "pairs_per_s": round(pairs * len(timed) / sum(timed), 2),
                        "losses": v["losses"]}
    result["compiled_vs_eager"] = round(result["compiled"]["pairs_per_s"] / result["eager"]["pairs_per_s"], 3)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
