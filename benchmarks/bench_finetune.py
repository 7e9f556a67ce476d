"""Training throughput and peak memory of stage 2 vs sentence-transformers' CrossEncoderTrainer, same run, same data.

Both systems train the same model with pointwise BCE on exactly the same (query, passage, label)
pairs (our trainer's epoch-0 draw: 1 positive + ``n_passages - 1`` mined negatives per query), with
the same batch (``batch_pairs`` pairs per optimizer step), max length, learning rate, warmup and
cosine schedule, weight decay and clipping, for the same number of steps. Every system variant of every
round runs in its **own process**, so its peak RSS (``ru_maxrss``: model load, training, validation) is
its own. Systems (``--st``, ``--ours``: comma lists of variants, ``fp32``/``bf16``/``auto``, ``+gc`` =
gradient checkpointing):

* ``st:fp32`` — CrossEncoderTrainer as it trains on a CPU by default; ``st:bf16`` — its ``bf16=True``
  (``torch.autocast`` on the CPU), the same lever our ``finetune.precision: bf16`` pulls;
* ``ours:<precision>`` — ``finetune.precision`` (``auto`` = what the workflow does on this machine),
  ``+gc`` = ``finetune.gradient_checkpointing: true``.

Reported per max length (``--max-lengths``, all in the same run): pairs/s of the training loop (wall) and
pairs per CPU-second (``time.process_time``, all threads: less sensitive to other users of a shared
machine), peak RSS, and each variant's ratio to the first ST variant; validation nDCG@10 and MRR of
every trained model on the same candidate lists (SciFact *test* queries: positives + TF-IDF hard
negatives), so speed is not bought with accuracy. Rounds rotate the order of the systems.

Both load the model with SDPA attention (transformers 5's default for BERT; ours asks for it). On a CPU
PyTorch's fused SDPA kernel has no dropout, so with the model's attention dropout (0.1) both run SDPA's
math kernel; ``--attn-dropout 0`` trains a copy of the model without attention dropout (both systems),
which lets the fused kernel run: an ablation, not what the workflow does.

Data: SciFact (BEIR layout) — realistic passage lengths (median ~310 tokens). Hard negatives are
mined with TF-IDF (scikit-learn) to keep the benchmark to a few minutes on 2 cores.

    PYTHONPATH=. python benchmarks/bench_finetune.py --model output/rerank/base_model/ms-marco-MiniLM-L-12-v2 \
        --max-lengths 256,512 --st fp32 --ours fp32,auto
    PYTHONPATH=. python benchmarks/bench_finetune.py            # tiny random BERT when no model is given
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_data(scifact: Path, out: Path, n_train: int, n_val: int, pool: int, seed: int):
    """Write prep-layout files (parquet + unrolled train json + val.json) from SciFact with TF-IDF negatives."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.feature_extraction.text import TfidfVectorizer

    from rerankflow.beir import load_beir, passage_text

    corpus, q_train, r_train = load_beir(scifact, "train")
    _, q_test, r_test = load_beir(scifact, "test")
    ids = list(corpus)
    texts = [passage_text(corpus[i]) for i in ids]
    vec = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit(texts)
    doc_m = vec.transform(texts)
    rng = np.random.default_rng(seed)

    def records(queries, qrels, n, unrolled):
        qids = sorted(qrels)
        qids = [qids[i] for i in sorted(rng.choice(len(qids), size=min(n, len(qids)), replace=False))]
        sims = (vec.transform([queries[q] for q in qids]) @ doc_m.T).toarray()
        out_recs = []
        for row, q in enumerate(qids):
            pos = [d for d, s in qrels[q].items() if s > 0]
            order = np.argsort(-sims[row])
            negs = [ids[j] for j in order[: pool + len(pos) + 5] if ids[j] not in pos][:pool]
            nd = [{"id": d, "score": float(sims[row][ids.index(d)])} for d in negs]
            if unrolled:
                out_recs += [{"question_id": f"{q}_{i}", "question": queries[q], "corpus_id": "scifact",
                              "pos_doc": [{"id": p, "score": 1.0}], "neg_doc": nd} for i, p in enumerate(pos)]
            else:
                out_recs.append({"question_id": q, "question": queries[q], "corpus_id": "scifact",
                                 "pos_doc": [{"id": p, "score": 1.0} for p in pos], "neg_doc": nd})
        return out_recs

    out.mkdir(parents=True, exist_ok=True)
    cpath = out / "train.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), cpath)
    train = records(q_train, r_train, n_train, True)
    val = records(q_test, r_test, n_val, False)
    (out / "train.json").write_text(json.dumps({"corpus": {"path": str(cpath)}, "data": train}))
    (out / "val.json").write_text(json.dumps({"corpus": {"path": str(cpath)}, "data": val}))
    return out / "train.json", out / "val.json"


def run_ours(model, train, val, out, a, validate=True):
    from rerankflow.config import load_config
    from rerankflow.train.finetune import run_finetune

    config = load_config()
    ft = {**config["finetune"], "max_steps": a.steps, "learning_rate": a.lr, "loss": "bce", "train_n_passages": a.n_passages,
          "global_batch_size": a.batch_pairs // a.n_passages, "local_batch_size": a.batch_pairs // a.n_passages,
          "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "val_every_steps": 0,
          "checkpoint_every_steps": 0, "val_queries": 0, "small_data_autoscale": False,
          "group_by_length": not a.no_grouping, "precision": a.precision, "gradient_checkpointing": a.gc}
    t0, c0 = time.perf_counter(), cpu_time()
    summary = run_finetune(train, val if validate else None, model, out, ft, {**config["reranker"], "max_length": a.max_length},
                           seed=a.seed, device=a.device, threads=a.threads, gpus=0)
    wall, cpu = time.perf_counter() - t0, cpu_time() - c0
    recs = [json.loads(x) for x in (Path(out) / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "train"]
    pairs = a.steps * a.batch_pairs
    loop_s = sum(a.batch_pairs / r["pairs_per_s"] for r in steps)
    loop_cpu = sum(r["cpu_s"] for r in steps)
    vals = [r for r in recs if r["event"] == "val"]
    out = {"pairs": pairs, "loop_s": loop_s, "loop_cpu_s": loop_cpu, "end_to_end_s": wall, "end_to_end_cpu_s": cpu,
           "steps": summary["steps"], "setup": summary.get("setup"), "losses": [r["loss"] for r in steps]}
    if vals:
        out.update({"val_ndcg@10": vals[-1]["val_ndcg@10"], "val_mrr": vals[-1]["val_mrr"]})
    return out


def run_st(model_path, train, val, out, a, validate=True):
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from rerankflow.train.data import NegativeSampler, load_training_data
    from rerankflow.train.loop import validation_metrics

    data = load_training_data(train, val, 0, a.seed, 0)
    negs = NegativeSampler(data.examples, a.n_passages - 1, a.seed, data.passages.keys()).sample(0)
    rows = {"query": [], "passage": [], "label": []}
    for ex, ng in zip(data.examples, negs):
        for k, d in enumerate([ex.positive, *ng]):
            rows["query"].append(ex.question)
            rows["passage"].append(data.passages[d])
            rows["label"].append(1.0 if k == 0 else 0.0)
    torch.set_num_threads(a.threads)
    model = CrossEncoder(model_path, num_labels=1, max_length=a.max_length, device=a.device)
    args = CrossEncoderTrainingArguments(
        output_dir=str(out), num_train_epochs=1, max_steps=a.steps, per_device_train_batch_size=a.batch_pairs,
        learning_rate=a.lr, warmup_ratio=0.1, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0,
        save_strategy="no", eval_strategy="no", logging_steps=max(1, a.steps), report_to="none", seed=a.seed,
        dataloader_drop_last=True, use_cpu=a.device == "cpu", bf16=a.device == "cuda" or a.precision == "bf16",
        gradient_checkpointing=a.gc, disable_tqdm=True)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                  loss=BinaryCrossEntropyLoss(model))
    t0, c0 = time.perf_counter(), cpu_time()
    trainer.train()
    if a.device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, cpu_time() - c0
    pairs = a.steps * a.batch_pairs
    res = {"pairs": pairs, "loop_s": wall, "loop_cpu_s": cpu, "steps": trainer.state.global_step,
           "setup": {"attn_implementation": model.model.config._attn_implementation,
                     "bf16": bool(args.bf16), "gradient_checkpointing": a.gc}}
    if not validate:
        return res
    # validation: the same candidate lists as ours, scored as (query, passage) pairs, its training input
    qrels = {v.qid: {d: 1 for d in v.relevant} for v in data.val}
    pairs_v = [(v.question, data.passages[d]) for v in data.val for d in v.candidates]
    owners = [(v.qid, d) for v in data.val for d in v.candidates]
    scores = model.predict(pairs_v, batch_size=32, activation_fn=torch.nn.Identity())
    run = {}
    for (q, d), s in zip(owners, scores):
        run.setdefault(q, {})[d] = float(s)
    m = validation_metrics(run, qrels)
    res.update({"val_ndcg@10": m["val_ndcg@10"], "val_mrr": m["val_mrr"]})
    return res


def eval_base(model_path, train, val, a) -> dict:
    """nDCG@10/MRR of the untrained model on the same candidates, in both input formats."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    from rerankflow.config import load_config
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer
    from rerankflow.train.data import load_training_data
    from rerankflow.train.loop import validation_metrics

    data = load_training_data(train, val, 0, a.seed, 0)
    qrels = {v.qid: {d: 1 for d in v.relevant} for v in data.val}
    pairs = [(v.question, data.passages[d]) for v in data.val for d in v.candidates]
    owners = [(v.qid, d) for v in data.val for d in v.candidates]

    def metrics(scores):
        run = {}
        for (q, d), s in zip(owners, scores):
            run.setdefault(q, {})[d] = float(s)
        return validation_metrics(run, qrels)

    out = {}
    ce = CrossEncoder(model_path, num_labels=1, max_length=a.max_length, device=a.device)
    out["pair_encoding"] = metrics(ce.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity()))
    scorer = CrossEncoderScorer(model_path, max_length=a.max_length, template=load_config()["reranker"]["prompt_template"],
                                device=a.device, bf16=False, batch_size=32, input_format="template")
    out["prompt_template"] = metrics(scorer.score(pairs, sort_by_length=True, progress=False))
    return out


def parse_variants(system: str, spec: str) -> list[dict]:
    """``"fp32,bf16+gc"`` -> [{"system": system, "precision": "fp32", "gc": False}, ...]."""
    out = []
    for v in filter(None, (x.strip() for x in spec.split(","))):
        prec, _, mod = v.partition("+")
        if prec not in ("auto", "fp32", "bf16") or mod not in ("", "gc"):
            raise SystemExit(f"bad variant {v!r}: <auto|fp32|bf16>[+gc]")
        if system == "st" and prec == "auto":
            raise SystemExit("st variants are fp32 or bf16")
        out.append({"system": system, "precision": prec, "gc": mod == "gc", "name": f"{system}:{v}"})
    return out


def model_without_attn_dropout(model: str, work: Path, p: float) -> str:
    """A copy of ``model`` (config changed, weights linked) with attention dropout ``p``."""
    dest = work / f"model_attn_dropout_{p}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.is_file() and f.name != "config.json" and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    conf = json.loads((Path(model) / "config.json").read_text())
    conf["attention_probs_dropout_prob"] = p
    (dest / "config.json").write_text(json.dumps(conf, indent=2))
    return str(dest)


def child(a) -> None:
    """One system variant in this process: train (and validate), write the result with the peak RSS."""
    import torch

    torch.set_num_threads(a.threads)
    fn = run_st if a.child == "st" else run_ours
    out = fn(a.model, Path(a.train), Path(a.val), Path(a.out), a, validate=a.validate)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    Path(a.result).write_text(json.dumps(out))


def run_child(v: dict, a, model, train, val, out: Path, max_length: int, validate: bool) -> dict:
    result = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--child", v["system"], "--model", model, "--train", str(train), "--val", str(val),
           "--out", str(out), "--result", str(result), "--precision", v["precision"], "--max-length", str(max_length),
           "--steps", str(a.steps), "--batch-pairs", str(a.batch_pairs), "--n-passages", str(a.n_passages),
           "--lr", str(a.lr), "--threads", str(a.threads), "--device", a.device, "--seed", str(a.seed)]
    cmd += ["--gradient-checkpointing"] * v["gc"] + ["--no-grouping"] * a.no_grouping + ["--validate"] * validate
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logf = out.with_suffix(".log")
    with open(logf, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=None if a.verbose else fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{v['name']} failed ({proc.returncode}):\n{logf.read_text()[-4000:]}")
    return json.loads(result.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF checkpoint dir (e.g. the imported MiniLM-L12); default tiny BERT")
    ap.add_argument("--scifact", default=os.environ.get("RERANKFLOW_SCIFACT", str(REPO.parent / "shared/data/scifact")))
    ap.add_argument("--train-queries", type=int, default=0, help="default: steps x batch_pairs / n_passages")
    ap.add_argument("--val-queries", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-pairs", type=int, default=16)
    ap.add_argument("--n-passages", type=int, default=4)
    ap.add_argument("--max-lengths", default="256,512", help="comma list, all measured in this run")
    ap.add_argument("--st", default="fp32", help="sentence-transformers variants: fp32,bf16 (+gc)")
    ap.add_argument("--ours", default="fp32,auto", help="our variants: auto,fp32,bf16 (+gc)")
    ap.add_argument("--bf16", action="store_true", help="shortcut: add ours:bf16 and st:bf16")
    ap.add_argument("--gradient-checkpointing", dest="gc", action="store_true",
                    help="shortcut: add ours:<first ours precision>+gc")
    ap.add_argument("--attn-dropout", type=float, default=None,
                    help="ablation: train a copy of the model with this attention dropout (0 = fused CPU SDPA kernel)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per variant, order rotated (load fairness)")
    ap.add_argument("--no-grouping", action="store_true", help="ablation: our loop without length grouping")
    ap.add_argument("--eval-base", action="store_true", help="also score the untrained model (both input formats)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    # one variant in a child process (internal)
    ap.add_argument("--child", choices=["st", "ours"], help=argparse.SUPPRESS)
    for k in ("train", "val", "out", "result"):
        ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--validate", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import torch

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    model = a.model
    if not model:
        from rerankflow.testing import tiny_bert

        model = str(tiny_bert(work / "tiny", layers=2, hidden=64))
    if a.attn_dropout is not None:
        model = model_without_attn_dropout(model, work, a.attn_dropout)
    variants = parse_variants("st", a.st) + parse_variants("ours", a.ours)
    if a.bf16:
        variants += [v for v in parse_variants("st", "bf16") + parse_variants("ours", "bf16")
                     if v["name"] not in {x["name"] for x in variants}]
    if a.gc:
        first = next(v for v in variants if v["system"] == "ours")["precision"]
        variants += [v for v in parse_variants("ours", f"{first}+gc") if v["name"] not in {x["name"] for x in variants}]
    ref = variants[0]["name"]
    n_train = a.train_queries or a.steps * a.batch_pairs // a.n_passages
    train, val = build_data(Path(a.scifact), work / "data", n_train, a.val_queries, pool=2 * a.n_passages, seed=a.seed)
    lengths = [int(x) for x in a.max_lengths.split(",")]
    print(f"model {model}; {n_train} SciFact train queries, {a.val_queries} val queries; {a.steps} steps x "
          f"{a.batch_pairs} pairs, max_length {lengths}, {a.threads} threads, {a.device}; variants "
          f"{[v['name'] for v in variants]}; {platform.processor() or platform.machine()}, load {os.getloadavg()}",
          flush=True)
    results = {"args": vars(a), "machine": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
               "by_max_length": {}}
    for max_length in lengths:
        a.max_length = max_length
        if a.eval_base:
            print(f"[{max_length}] base model, untrained:", json.dumps(eval_base(model, train, val, a)), flush=True)
        runs = {v["name"]: [] for v in variants}
        for r in range(a.rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                out = run_child(v, a, model, train, val, work / f"{v['name'].replace(':', '_').replace('+', '_')}_{max_length}_{r}",
                                max_length, validate=r == a.rounds - 1)
                runs[v["name"]].append(out)
                print(f"[{max_length}] round {r} {v['name']}: {json.dumps({x: y for x, y in out.items() if x != 'losses'})}",
                      flush=True)
        res = {}
        for name, rs in runs.items():
            pairs = sum(x["pairs"] for x in rs)
            res[name] = {"pairs": pairs, "pairs_per_s": pairs / sum(x["loop_s"] for x in rs),
                         "pairs_per_cpu_s": pairs / sum(x["loop_cpu_s"] for x in rs),
                         "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "setup": rs[-1].get("setup"),
                         "val_ndcg@10": rs[-1].get("val_ndcg@10"), "val_mrr": rs[-1].get("val_mrr"), "runs": rs}
        print(f"\nmax_length {max_length} (ratios against {ref}; load now {os.getloadavg()}):")
        print(f"{'system':<16} {'pairs/s':>8} {'ratio':>6} {'pairs/CPU-s':>11} {'ratio':>6} {'peak RSS MB':>11} "
              f"{'val nDCG@10':>11} {'val MRR':>8}  setup")
        for name, x in res.items():
            x["ratio_wall"] = x["pairs_per_s"] / res[ref]["pairs_per_s"]
            x["ratio_cpu"] = x["pairs_per_cpu_s"] / res[ref]["pairs_per_cpu_s"]
            nd, mrr = x["val_ndcg@10"], x["val_mrr"]
            print(f"{name:<16} {x['pairs_per_s']:8.3f} {x['ratio_wall']:5.2f}x {x['pairs_per_cpu_s']:11.3f} "
                  f"{x['ratio_cpu']:5.2f}x {x['peak_rss_mb']:11.0f} {nd if nd is None else f'{nd:.4f}':>11} "
                  f"{mrr if mrr is None else f'{mrr:.4f}':>8}  {json.dumps(x['setup'])}", flush=True)
        results["by_max_length"][str(max_length)] = res
    results["load_avg_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
