"""Stage 4's parity check: PyTorch against the ONNX export on real eval pairs, scored by the serving path.

:func:`measure` scores the same (query, passage) pairs three ways, batch by batch in turn
(:func:`score_interleaved`), and compares them (:func:`compare_scores`):

* **ONNX** with :class:`~rerankflow.scoring.onnx_scorer.OnnxScorer`, the class the ranking service
  runs: its tokenizer (the exported ``tokenizer/``, so a wrong exported tokenizer fails parity),
  its session factory and provider choice (:mod:`rerankflow.scoring.onnx_session`) and its batching
  plan (length-sorted chunks of ``export.batch_size`` rows, :meth:`OnnxScorer.plan`);
* **PyTorch** (the reference) on the checkpoint with the checkpoint's own tokenizer, in exactly the
  same chunks of rows; on CUDA when the ONNX provider is a GPU one, else on CPU;
* with an INT8 model, **ONNX INT8** on the CPU, fed the very batches the fp32 model got.

Its nDCG@10 comes from :mod:`rerankflow.eval.metrics` (pytrec_eval), the metrics of stage 3.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.eval.metrics import evaluate_run
from rerankflow.export.candidates import QueryGroup
from rerankflow.scoring.torch_model import MODEL_INPUTS, load_torch_reranker, torch_runner, uses_token_type_ids
from rerankflow.formatting import tokenize_pairs
from rerankflow.scoring.onnx_scorer import OnnxScorer

# Parity batches are export.batch_size rows of similar length: the plan's padding cut is off, so
# batch_size alone sets the batch (fp32 logits do not depend on the batch either way).
NO_PADDING_CUT = -1.0


class ParityError(RuntimeError):
    """The exported model does not reproduce the checkpoint's logits within tolerance."""


def measure(checkpoint, onnx_path, groups: Sequence[QueryGroup], pairs, *, providers: Sequence[str], max_length: int,
            batch_size: int, threads: int | None, input_format: str, template: str, int8_path=None,
            tokenizer_dir=None) -> dict:
    """Score (query, passage) ``pairs`` (aligned with ``groups``' passages) tokenized in ``input_format``
    with the PyTorch checkpoint, the ONNX file (and the INT8 file) and compare (module docstring).

    ``tokenizer_dir`` overrides the tokenizer beside the ONNX file. Returns :func:`compare_scores`
    (PyTorch reference vs ONNX) plus provider, throughput and, with ``int8_path``, the ``int8``
    section: nDCG@10 of fp32 and INT8 on the groups, the change in points, and CPU speed-ups.
    """
    torch_device = "cpu" if providers[0] == "CPUExecutionProvider" else "cuda"
    model, ckpt_tok = load_torch_reranker(checkpoint, torch_device, "fp32")
    text = {"max_length": max_length, "prompt_template": template, "input_format": input_format}
    plan = {"batch_size": batch_size, "intra_op_threads": int(threads or 0), "max_padding": NO_PADDING_CUT}
    tokenizer = Path(tokenizer_dir) if tokenizer_dir else None
    scorer = OnnxScorer(onnx_path, tokenizer=tokenizer, providers=providers, **text, **plan)
    encoded = scorer.encode_texts([scorer.format(q, p) for q, p in pairs])
    chunks = scorer.plan(encoded)
    o_batches = [scorer.feeds([encoded[i] for i in rows]) for rows in chunks]
    torch_inputs = [n for n in MODEL_INPUTS if n != "token_type_ids" or uses_token_type_ids(ckpt_tok)]
    t_batches = encode_chunks(ckpt_tok, pairs, chunks, torch_inputs, max_length, input_format=input_format, template=template)
    backends = {"pytorch": (torch_runner(model, torch_device), t_batches), "onnx": (scorer.run_feeds, o_batches)}
    if int8_path is not None:
        int8 = OnnxScorer(int8_path, tokenizer=tokenizer, providers=["CPUExecutionProvider"], **text, **plan)
        backends["onnx_int8"] = (int8.run_feeds, o_batches)
    scores, secs = score_interleaved(backends)
    scores = {name: in_input_order(s, chunks) for name, s in scores.items()}
    n = len(pairs)
    report = compare_scores(scores["pytorch"], scores["onnx"], groups)
    report.update({
        "execution_provider": scorer.session.get_providers()[0],
        "providers": scorer.session.get_providers(),
        "torch_device": torch_device,
        "onnx_inputs": scorer.input_names,
        "input_format": input_format,
        # the segment ids the graph was fed: [0, 1] for sentence pairs, [0] for one text
        "onnx_token_type_ids": (sorted({int(v) for b in o_batches for v in np.unique(b["token_type_ids"])})
                                if "token_type_ids" in scorer.input_names else None),
        "batch_size": batch_size,
        "threads": threads,
        "pytorch_pairs_per_s": round(n / secs["pytorch"], 2) if secs["pytorch"] else None,
        "onnx_pairs_per_s": round(n / secs["onnx"], 2) if secs["onnx"] else None,
    })
    if int8_path is not None:
        report["int8"] = int8_section(scores, secs, groups, onnx_path, int8_path,
                                      on_cpu=providers[0] == "CPUExecutionProvider")
    return report


def in_input_order(scores: np.ndarray, chunks: Sequence[Sequence[int]]) -> np.ndarray:
    """Scores given chunk after chunk (the plan's order) back in the order of the pairs."""
    rows = [i for chunk in chunks for i in chunk]
    out = np.empty(len(rows), dtype=np.float64)
    out[rows] = scores
    return out


def encode_chunks(tokenizer, pairs: Sequence[tuple[str, str]], chunks: Sequence[Sequence[int]], input_names: Sequence[str],
                  max_length: int, *, input_format: str, template: str) -> list[dict[str, np.ndarray]]:
    """The rows of each chunk of ``pairs`` tokenized by a ``transformers`` tokenizer in ``input_format``,
    as int64 numpy batches of ``input_names`` padded to their longest row (``pair`` format gives
    ``token_type_ids`` 0 for the query, 1 for the passage)."""
    batches = []
    for rows in chunks:
        chunk = [pairs[i] for i in rows]
        enc = tokenize_pairs(tokenizer, [q for q, _p in chunk], [p for _q, p in chunk], input_format=input_format,
                             template=template, max_length=max_length, padding=True, return_tensors="np")
        batches.append({n: enc[n].astype(np.int64) for n in input_names})
    return batches


def int8_section(scores: dict, secs: dict, groups: Sequence[QueryGroup], onnx_path, int8_path, *, on_cpu: bool) -> dict:
    """``parity.json["int8"]``: nDCG@10 of the three backends, INT8's change and agreement, CPU speeds.

    Speed ratios are only meaningful when all three ran on the CPU in this run (``on_cpu``).
    """
    n = len(scores["onnx"])
    nd = {k: ndcg_at_10(v, groups) for k, v in scores.items()}
    cmp = compare_scores(scores["onnx"], scores["onnx_int8"], groups)
    return {
        "model": str(int8_path),
        "execution_provider": "CPUExecutionProvider",
        "queries": len(groups),
        "pairs": n,
        "ndcg@10_pytorch_fp32": round(nd["pytorch"], 5),
        "ndcg@10_onnx_fp32": round(nd["onnx"], 5),
        "ndcg@10_onnx_int8": round(nd["onnx_int8"], 5),
        "ndcg@10_change_points": round(100 * (nd["onnx_int8"] - nd["onnx"]), 3),
        "onnx_int8_pairs_per_s": round(n / secs["onnx_int8"], 2),
        "onnx_fp32_pairs_per_s": round(n / secs["onnx"], 2) if on_cpu else None,
        "pytorch_fp32_pairs_per_s": round(n / secs["pytorch"], 2) if on_cpu else None,
        "speedup_vs_onnx_fp32": round(secs["onnx"] / secs["onnx_int8"], 3) if on_cpu else None,
        "speedup_vs_pytorch_fp32": round(secs["pytorch"] / secs["onnx_int8"], 3) if on_cpu else None,
        "size_mb_fp32": round(_file_mb(onnx_path), 2),
        "size_mb_int8": round(_file_mb(int8_path), 2),
        "parity_vs_fp32": {k: v for k, v in cmp.items() if k != "per_query"},
        "note": "CPU throughput on the same tokenized batches, backends interleaved batch by batch in one run; "
                "the machine may be shared with other work",
    }


def ndcg_at_10(scores: np.ndarray, groups: Sequence[QueryGroup]) -> float:
    """Mean nDCG@10 of reranking each group's candidates by ``scores`` (:func:`rerankflow.eval.metrics.evaluate_run`)."""
    run, qrels, start = {}, {}, 0
    for g in groups:
        n = len(g.doc_ids)
        run[g.qid] = {d: float(s) for d, s in zip(g.doc_ids, scores[start:start + n])}
        qrels[g.qid] = {d: int(v) for d, v in g.qrels.items()}
        start += n
    _aggregate, per_query = evaluate_run(qrels, run, [10])
    return float(np.mean([m["NDCG@10"] for m in per_query.values()])) if per_query else float("nan")


def score_interleaved(backends: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Score with several backends ``{name: (runner, batches)}``, batch by batch in turn.

    Interleaving means a load spike on a shared machine slows every backend alike, so their
    speed ratio stays meaningful. Each backend runs its first batch once untimed (warm-up).
    Returns ``(scores {name: float64 [n]}, seconds {name: total})``.
    """
    names = list(backends)
    for name in names:
        runner, batches = backends[name]
        if batches:
            runner(batches[0])
    n_batches = {len(b) for _, b in backends.values()}
    if len(n_batches) > 1:
        raise ValueError("backends were given different numbers of batches")
    outs = {n: [] for n in names}
    secs = {n: 0.0 for n in names}
    for i in range(n_batches.pop() if n_batches else 0):
        for name in names:
            runner, batches = backends[name]
            t0 = time.perf_counter()
            outs[name].append(np.asarray(runner(batches[i]), dtype=np.float64))
            secs[name] += time.perf_counter() - t0
    scores = {n: (np.concatenate(o) if o else np.zeros(0)) for n, o in outs.items()}
    return scores, secs


# ------------------------------------------------------------------------------------ reporting
def compare_scores(reference: np.ndarray, candidate: np.ndarray, groups: Sequence[QueryGroup], k: int = 10) -> dict:
    """Max/mean abs difference, Spearman (pooled, per query) and top-``k`` agreement per query."""
    from scipy.stats import spearmanr

    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    diff = np.abs(reference - candidate)
    finite = bool(np.all(np.isfinite(candidate)))
    per_query, start = [], 0
    for g in groups:
        n = len(g.doc_ids)
        r, c = reference[start:start + n], candidate[start:start + n]
        start += n
        kk = min(k, n)
        top_r, top_c = list(np.argsort(-r, kind="stable")[:kk]), list(np.argsort(-c, kind="stable")[:kk])
        rho = spearmanr(r, c).statistic if n > 2 else float("nan")
        per_query.append({
            "qid": g.qid,
            "n": n,
            "max_abs_diff": float(np.max(np.abs(r - c))) if n else 0.0,
            "spearman": None if rho is None or not np.isfinite(rho) else float(rho),
            f"top{k}_overlap": len(set(top_r) & set(top_c)) / kk if kk else 1.0,
            f"top{k}_same_order": top_r == top_c,
        })
    pooled = spearmanr(reference, candidate).statistic if len(reference) > 2 else float("nan")
    rhos = [q["spearman"] for q in per_query if q["spearman"] is not None]
    return {
        "pairs": int(len(reference)),
        "queries": len(groups),
        "all_finite": finite,
        "max_abs_diff": float(np.max(diff)) if diff.size and finite else float("inf"),
        "mean_abs_diff": float(np.mean(diff)) if diff.size and finite else float("inf"),
        "spearman": float(pooled) if np.isfinite(pooled) else None,
        "spearman_per_query_mean": float(np.mean(rhos)) if rhos else None,
        f"top{k}_overlap_mean": float(np.mean([q[f"top{k}_overlap"] for q in per_query])) if per_query else None,
        f"top{k}_overlap_min": float(np.min([q[f"top{k}_overlap"] for q in per_query])) if per_query else None,
        f"top{k}_same_order_fraction": float(np.mean([q[f"top{k}_same_order"] for q in per_query])) if per_query else None,
        "per_query": per_query,
    }


def check_parity(report: dict, tolerance: float) -> None:
    """Raise :class:`ParityError` when logits are not finite or differ by more than ``tolerance``."""
    if not report.get("all_finite", False):
        raise ParityError("ONNX Runtime produced non-finite logits (NaN/inf): the exported model is broken")
    if report["max_abs_diff"] > tolerance:
        raise ParityError(
            f"ONNX export parity failed: max |logit difference| {report['max_abs_diff']:.3g} over "
            f"{report['pairs']} eval pairs exceeds the tolerance {tolerance:g} "
            f"(mean {report['mean_abs_diff']:.3g}, Spearman {report['spearman']}); the exported graph or "
            "its tokenizer does not reproduce the checkpoint"
        )


def _file_mb(path) -> float:
    path = Path(path)
    size = path.stat().st_size
    data = path.parent / "model.onnx.data"
    if data.exists():
        size += data.stat().st_size
    return size / 1e6
