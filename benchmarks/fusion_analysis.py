"""How much can the choice of fusion weight give? An after-the-fact analysis of one finished variant.

Reads a variant's output folder (a finished ``stage3_eval``: the TREC runs of ``first_stage``, ``base`` and
``finetuned``; ``stage1_prep/val.json``; the BEST checkpoint) and reports, for the fusion of the
fine-tuned reranker with the first stage (``rerankflow.scoring.fusion.fuse_run``, the formula of stage 3):

* **validation** nDCG@10 at every weight of the grid (:data:`rerankflow.eval.fusion.WEIGHT_GRID`), on the
  seeded subset of ``--val-queries`` queries stage 2 validated on (``finetune.val_max_queries``; 0 = all of
  val.json). The BEST checkpoint is rescored under bf16 autocast, as stage 2 validates.
* the weight each **selection rule** picks on that validation: ``best`` (stage 2's rule: the best mean, ties
  to the larger weight) and ``one_se`` (the smallest weight whose paired per-query difference to the best is
  within one standard error, i.e. lean to the training-free first stage unless validation clearly says
  otherwise), and the **test** nDCG@10 each gives, with the paired bootstrap CI against the first stage;
* the **test-oracle ceiling**: the best test nDCG@10 over every weight, and over every convex combination
  (step 0.1) of fine-tuned, base and first stage. It reads test labels, so it is a ceiling for what any
  fusion rule could reach, never a setting.

    PYTHONPATH=. python benchmarks/fusion_analysis.py output/scifact/supervised --qrels ../shared/data/scifact/qrels/test.tsv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_ranked_run(path) -> dict[str, dict[str, float]]:
    """A TREC run stage 3 wrote, each query's documents in the file's rank order.

    Not :func:`rerankflow.retrieval.trec_run.read_trec_run`: that one orders tied scores by document id,
    as trec_eval does, while stage 3 cut its top-k candidates in its own rank order. Tied RRF scores are
    common, so that ordering moves documents across the top-30 boundary and the figures stop matching
    stage 3's (by up to 0.002 nDCG@10 on SciFact). Reading the ranks reproduces them exactly."""
    rows: dict[str, list[tuple[int, str, float]]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            qid, _q0, doc, rank, score, _tag = line.split()
            rows.setdefault(qid, []).append((int(rank), doc, float(score)))
    return {q: {doc: score for _rank, doc, score in sorted(r)} for q, r in rows.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pick(per_query_by_weight: dict[float, dict[str, float]], rule: str) -> float:
    """The weight ``rule`` picks from per-query validation nDCG@10 at each weight."""
    import numpy as np

    weights = sorted(per_query_by_weight)
    qids = sorted(per_query_by_weight[weights[0]])
    m = {w: np.array([per_query_by_weight[w][q] for q in qids]) for w in weights}
    best = max(weights, key=lambda w: (m[w].mean(), w))
    if rule == "best":
        return best
    for w in weights:
        diff = m[best] - m[w]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean() <= se:
            return w
    return best


def validation_runs(variant: Path, val_queries: int, seed: int):
    """``(reranker run, first-stage run, qrels)`` of the validation queries, rescored with the BEST checkpoint."""
    from rerankflow.models import cpu_has_native_bf16
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer
    from rerankflow.train.data import load_training_data

    data = load_training_data(variant / "stage1_prep" / "train_mined.automodel_unrolled.json",
                              variant / "stage1_prep" / "val.json", 0, seed, val_queries)
    scorer = CrossEncoderScorer(variant / "stage2_finetune" / "checkpoints" / "BEST" / "model" / "consolidated",
                                max_length=256, template="{query} {passage}", device="cpu", bf16=cpu_has_native_bf16(),
                                batch_size=32, input_format="pair")
    pairs, owners = [], []
    for v in data.val:
        for d in v.candidates:
            pairs.append((v.question, data.passages[d]))
            owners.append((v.qid, d))
    run: dict[str, dict[str, float]] = {}
    for (q, d), s in zip(owners, scorer.score(pairs, sort_by_length=True, progress=False)):
        run.setdefault(q, {})[d] = float(s)
    return run, {v.qid: v.first_stage for v in data.val}, {v.qid: {d: 1 for d in v.relevant} for v in data.val}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", help="a variant's output_dir with a finished stage3_eval")
    ap.add_argument("--qrels", required=True, help="the test qrels stage 3 evaluated on")
    ap.add_argument("--val-queries", type=int, default=40, help="finetune.val_max_queries of the run (0 = all)")
    ap.add_argument("--seed", type=int, default=42, help="the run's seed (picks the validation subset)")
    ap.add_argument("--top-k", type=int, default=30, help="eval.top_k of the run (candidates reranked)")
    ap.add_argument("--ignore-identical-ids", action="store_true", help="BEIR's convention (ArguAna)")
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args()

    from rerankflow.beir import load_qrels
    from rerankflow.eval.fusion import WEIGHT_GRID
    from rerankflow.eval.metrics import compare_systems, drop_identical_ids, per_query_metrics
    from rerankflow.normalization import min_max
    from rerankflow.scoring.fusion import fuse_run

    variant = Path(args.variant)
    rr, fs, vq = validation_runs(variant, args.val_queries, args.seed)
    val = {w: {q: r["NDCG@10"] for q, r in per_query_metrics(vq, fuse_run(rr, fs, w), [10]).items()} for w in WEIGHT_GRID}

    runs = {s: read_ranked_run(variant / "stage3_eval" / "runs" / f"{s}.trec") for s in ("first_stage", "base", "finetuned")}
    qrels = load_qrels(args.qrels)
    top = {q: list(docs)[:args.top_k] for q, docs in runs["first_stage"].items()}
    cand = {s: {q: {d: runs[s][q][d] for d in top[q]} for q in top} for s in runs}

    def test_per_query(run):
        if args.ignore_identical_ids:
            run, _ = drop_identical_ids(run)
        return {q: r["NDCG@10"] for q, r in per_query_metrics({q: qrels[q] for q in run if q in qrels}, run, [10]).items()}

    test = {w: test_per_query(fuse_run(cand["finetuned"], cand["first_stage"], w)) for w in WEIGHT_GRID}
    first = test[0.0]

    def versus_first(pq):
        c = compare_systems({q: {"NDCG@10": v} for q, v in first.items()}, {q: {"NDCG@10": v} for q, v in pq.items()},
                            "NDCG@10", 10000, 0.95, 42)
        return {"ndcg@10": round(mean(pq.values()), 4), "delta": round(c["delta"], 4),
                "ci": [round(c["ci_low"], 4), round(c["ci_high"], 4)]}

    rules = {rule: {"weight": pick(val, rule), **versus_first(test[pick(val, rule)])} for rule in ("best", "one_se")}
    oracle_w = max(WEIGHT_GRID, key=lambda w: mean(test[w].values()))

    norm = {s: {q: min_max(cand[s][q]) for q in top} for s in cand}
    three = []
    for a in range(11):
        for b in range(11 - a):
            wa, wb, wc = a / 10, b / 10, (10 - a - b) / 10
            run = {q: {d: wa * norm["finetuned"][q][d] + wb * norm["base"][q][d] + wc * norm["first_stage"][q][d]
                       for d in top[q]} for q in top}
            three.append((round(mean(test_per_query(run).values()), 4), {"finetuned": wa, "base": wb, "first_stage": wc}))
    three.sort(key=lambda t: -t[0])
    result = {
        "variant": str(variant), "val_queries": len(vq), "test_queries": len(first),
        "by_weight": {f"{w:.2f}": {"val": round(mean(val[w].values()), 4), "test": round(mean(test[w].values()), 4)}
                      for w in WEIGHT_GRID},
        "rules": rules,
        "oracle_weight": {"weight": oracle_w, **versus_first(test[oracle_w])},
        "oracle_three_way": {"ndcg@10": three[0][0], "weights": three[0][1]},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
