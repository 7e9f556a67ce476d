"""The sweep summary: one row per variant, the variant chosen on validation, and the files that show it.

Each variant row holds

* ``val``: the best validation nDCG@10 its training recorded (the ``BEST`` checkpoint, from
  ``training_summary.json``, else the ``val`` events of ``training_log.jsonl``) and that checkpoint;
* ``test``: the fine-tuned checkpoint's stage 3 metrics on the eval split (``eval_results.json``);
* ``vs_base`` / ``vs_chosen``: paired comparisons (:func:`rerankflow.eval.metrics.compare_systems`:
  bootstrap CI, randomization p-value, wins/losses/ties) of the per-query ``comparison_metric``
  against the base reranker and against the chosen variant;
* ``train``: steps, wall time from the training log (start -> end, validation included) and the
  trained pairs per second.

The chosen variant is the one with the highest validation metric (ties: the earlier variant in sweep
order). Test metrics are never read by :func:`choose`: choosing on test would report an optimistic,
selected test number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from rerankflow.eval.metrics import compare_systems, metric_value
from rerankflow.io import atomic_path, read_json, read_jsonl, write_json, write_text

VAL_METRIC = "val_ndcg@10"  # what stage 2 validates on and picks BEST by
FAMILY_PREFIXES = ("NDCG", "MRR", "Recall")


def validation_of(training_summary: Mapping, training_log: Sequence[Mapping]) -> dict:
    """The best validation metric a training run recorded and the checkpoint that holds it."""
    vals = [r for r in training_log if r.get("event") == "val" and r.get(VAL_METRIC) is not None]
    best = training_summary.get("best_val_ndcg@10")
    if best is None and vals:
        best = max(r[VAL_METRIC] for r in vals)
    step = next((r["step"] for r in vals if r[VAL_METRIC] == best), None)
    return {"metric": VAL_METRIC, "best": best, "best_step": step, "best_checkpoint": training_summary.get("best"),
            "validations": len(vals)}


def training_of(training_summary: Mapping, training_log: Sequence[Mapping]) -> dict:
    """Steps, wall time (training log start -> end) and pairs/s of a training run."""
    times = {r["event"]: r["time"] for r in training_log if r.get("event") in ("start", "end") and "time" in r}
    wall = times["end"] - times["start"] if {"start", "end"} <= set(times) else None
    return {"steps": training_summary.get("steps"), "wall_s": round(wall, 2) if wall is not None else None,
            "pairs_per_s": training_summary.get("pairs_per_s"),
            "resumed": any(r.get("event") == "resume" for r in training_log),
            "stopped_early": training_summary.get("stopped_early")}


def test_metrics(system_results: Mapping, k_values: Sequence[int]) -> dict:
    out = {}
    for prefix in FAMILY_PREFIXES:
        for k in k_values:
            try:
                out[f"{prefix}@{k}"] = metric_value(system_results, f"{prefix}@{k}")
            except KeyError:
                continue
    return out


def choose(rows: Sequence[Mapping]) -> str | None:
    """Id of the row with the highest validation metric; ties go to the earlier row. Reads ``val`` only."""
    best_id, best = None, None
    for row in rows:
        value = row["val"]["best"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or value > best:
            best_id, best = row["id"], value
    return best_id


def summarize(name: str, variants: Sequence[Mapping], base_dir, variant_dirs: Mapping[str, Mapping[str, str]], *,
              metric: str, bootstrap_samples: int, confidence: float, seed: int) -> dict:
    """The summary of a sweep (see module docstring).

    ``variants``: ``[{"id", "settings"}]`` in sweep order; ``base_dir``: the shared base evaluation
    (``eval_results.json`` + ``per_query.json``); ``variant_dirs``: id -> {"training": stage 2 folder,
    "eval": stage 3 folder}. ``metric`` / ``bootstrap_samples`` / ``confidence`` / ``seed``: the
    ``eval`` section's comparison settings.
    """
    base_dir = Path(base_dir)
    base_results = read_json(base_dir / "eval_results.json")
    base_pq = read_json(base_dir / "per_query.json")["systems"]
    k_values = base_results["meta"]["k_values"]
    rows, per_query, warnings = [], {}, []
    for v in variants:
        dirs = variant_dirs[v["id"]]
        tdir, edir = Path(dirs["training"]), Path(dirs["eval"])
        tsum = read_json(tdir / "training_summary.json")
        tlog = read_jsonl(tdir / "training_log.jsonl")
        results = read_json(edir / "eval_results.json")
        per_query[v["id"]] = read_json(edir / "per_query.json")["systems"]["finetuned"]
        same_first = results["first_stage"] == base_results["first_stage"]
        if not same_first:
            warnings.append(f"variant {v['id']}: its first-stage metrics differ from the base evaluation's; "
                            "it was not evaluated on the same candidates")
        rows.append({"id": v["id"], "settings": dict(v["settings"]),
                     "val": validation_of(tsum, tlog), "test": test_metrics(results["finetuned"], k_values),
                     "train": training_of(tsum, tlog), "same_first_stage_as_base": same_first,
                     "eval_timing": results["meta"]["timings"].get("finetuned"),
                     "files": {"training": str(tdir), "eval": str(edir)}})
    chosen = choose(rows)
    if chosen is None:
        warnings.append("no variant recorded a validation metric (validation is off or val.json is empty): "
                        "no variant is chosen")

    def cmp(a, b):
        return compare_systems(a, b, metric, int(bootstrap_samples), float(confidence), int(seed))

    for row in rows:
        row["chosen"] = row["id"] == chosen
        row["vs_base"] = cmp(base_pq["base"], per_query[row["id"]])
        row["vs_chosen"] = None if chosen is None or row["chosen"] else cmp(per_query[chosen], per_query[row["id"]])
    return {
        "name": name,
        "chosen": chosen,
        "chosen_on": f"validation {VAL_METRIC} of each variant's BEST checkpoint (ties: the earlier variant); "
                     "test metrics are reported, never used to choose",
        "comparison_metric": metric,
        "confidence": float(confidence),
        "bootstrap_samples": int(bootstrap_samples),
        "k_values": k_values,
        "queries": base_results["meta"]["counts"].get("queries_evaluated"),
        "first_stage": {"test": test_metrics(base_results["first_stage"], k_values)},
        "base": {"model": base_results["meta"]["models"].get("base"),
                 "test": test_metrics(base_results["base"], k_values),
                 "scoring": base_results["meta"]["timings"].get("base"), "eval": str(base_dir)},
        "variants": rows,
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------------------ files

def _f(x, digits=4, sign=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(c: Mapping | None) -> str:
    if not c:
        return "-"
    return f"{c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"


def table(summary: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and rows: base, then one row per variant (the chosen one marked)."""
    m = summary["comparison_metric"]
    conf = int(round(summary["confidence"] * 100))
    shown = [m] + [x for x in (f"MRR@{k}" for k in summary["k_values"]) if x != m][-1:]
    header = ["variant", "chosen", "val_ndcg@10", "best_checkpoint", *[f"test_{x}" for x in shown],
              f"vs_base_delta [{conf}% CI]", "vs_base_p", f"vs_chosen_delta [{conf}% CI]", "train_wall_s", "pairs_per_s"]
    rows = [["first_stage", "", "-", "-", *[_f(summary["first_stage"]["test"].get(x)) for x in shown],
             "-", "-", "-", "-", "-"],
            ["base", "", "-", "-", *[_f(summary["base"]["test"].get(x)) for x in shown], "-", "-", "-", "-", "-"]]
    for r in summary["variants"]:
        rows.append([r["id"], "CHOSEN (validation)" if r["chosen"] else "", _f(r["val"]["best"]),
                     str(r["val"]["best_checkpoint"] or "-"), *[_f(r["test"].get(x)) for x in shown],
                     _ci(r["vs_base"]), _f(r["vs_base"]["p_value"]), _ci(r["vs_chosen"]),
                     _f(r["train"]["wall_s"], 1), _f(r["train"]["pairs_per_s"], 2)])
    return header, rows


def markdown(summary: Mapping) -> str:
    header, rows = table(summary)
    lines = [f"# Sweep `{summary['name']}`: {len(summary['variants'])} variants", ""]
    if summary["chosen"]:
        lines.append(f"Chosen on validation: **`{summary['chosen']}`** ({summary['chosen_on']}).")
    else:
        lines.append("No variant chosen: no validation metric was recorded.")
    lines += ["", f"Test split: {summary['queries']} queries. Deltas are paired differences of the mean "
              f"{summary['comparison_metric']} with a {int(round(summary['confidence'] * 100))}% bootstrap CI "
              f"({summary['bootstrap_samples']} resamples); `vs_chosen` compares each variant with the chosen one.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [f"**{c}**" if row[1] and c else c for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["warnings"]:
        lines += ["", "Warnings:", *[f"- {w}" for w in summary["warnings"]]]
    return "\n".join(lines) + "\n"


def plot(path, summary: Mapping) -> None:
    """Two panels, one line per variant: validation nDCG@10 (what chose) and the test delta vs the base with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["variants"]
    labels = [r["id"] for r in rows]
    y = list(range(len(rows)))[::-1]
    colors = ["tab:orange" if r["chosen"] else "tab:blue" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(10, 1.4 + 0.45 * len(rows)))
    vals = [r["val"]["best"] if r["val"]["best"] is not None else 0.0 for r in rows]
    bars = ax1.barh(y, vals, color=colors)
    ax1.bar_label(bars, labels=[_f(r["val"]["best"], 3) for r in rows], fontsize=7, padding=2)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlim(0, 1.1)
    ax1.set_xlabel("validation nDCG@10 (BEST checkpoint)")
    ax1.set_title("chooses (orange = chosen)", fontsize=9)
    m = summary["comparison_metric"]
    for yi, r, c in zip(y, rows, colors):
        cb = r["vs_base"]
        ax2.errorbar([cb["delta"]], [yi], xerr=[[cb["delta"] - cb["ci_low"]], [cb["ci_high"] - cb["delta"]]],
                     fmt="o", color=c, capsize=3)
        ax2.annotate(f"{r['test'].get(m, float('nan')):.3f}", (cb["delta"], yi), textcoords="offset points",
                     xytext=(0, 6), ha="center", fontsize=7)
    ax2.axvline(0.0, color="grey", lw=1, ls="--")
    ax2.set_xlabel(f"test {m}: fine-tuned - base ({int(round(summary['confidence'] * 100))}% paired CI)")
    ax2.set_title(f"reports (base test {m} = {_f(summary['base']['test'].get(m), 3)})", fontsize=9)
    fig.suptitle(f"sweep {summary['name']}: chosen on validation = {summary['chosen'] or 'none'}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_summary(summary: Mapping, *, json_path, md_path, tsv_path, png_path) -> None:
    """summary.json, summary.md (the table), summary.tsv (the same table, for ``snakemake --report``), summary.png."""
    write_json(json_path, summary)
    write_text(md_path, markdown(summary))
    header, rows = table(summary)
    write_text(tsv_path, "\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    plot(png_path, summary)
    print(markdown(summary), flush=True)


def exported_variant(choice: str, summary: Mapping | None) -> str:
    """The variant ``sweep.export`` names: a variant id as given, or for ``best`` the summary's chosen one."""
    if choice != "best":
        return choice
    if not summary or not summary.get("chosen"):
        raise ValueError("sweep.export is 'best' but the sweep summary chose no variant (no validation metric was "
                         "recorded); name a variant id in sweep.export instead")
    return summary["chosen"]
