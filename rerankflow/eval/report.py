"""What stage 3 writes besides the results JSON: TREC runs, the metrics table (log and TSV), the nDCG plot."""

from __future__ import annotations

import math

from rerankflow.eval.metrics import FAMILIES, metric_value, rank_documents
from rerankflow.io import atomic_path, write_text

SYSTEMS = ("first_stage", "base", "finetuned", "fused", "endpoint")


def write_trec_run(path, run: dict, system: str) -> None:
    """TREC run format: ``qid Q0 doc_id rank score run_name``, ranked as trec_eval ranks."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for qid in sorted(run):
                docs = run[qid]
                for rank, did in enumerate(rank_documents(docs), start=1):
                    fh.write(f"{qid} Q0 {did} {rank} {docs[did]:.6f} {system}\n")


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def table_rows(results: dict, k_values) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the eval table: metrics per system plus its comparison to the previous one."""
    names = [f"{p}@{k}" for _f, p in FAMILIES for k in k_values]
    cmp_by_to = {c["to"]: c for c in results.get("comparisons", [])}
    metric = results["meta"]["comparison_metric"]
    conf = int(round(results["meta"]["confidence"] * 100))
    header = ["system", *names, "compared_to", f"delta_{metric}", f"ci{conf}_low", f"ci{conf}_high", "p_value"]
    rows = []
    for system in SYSTEMS:
        if system not in results:
            continue
        row = [system] + [_fmt(metric_value(results[system], n)) for n in names]
        c = cmp_by_to.get(system)
        if c:
            row += [c["from"], f"{c['delta']:+.4f}", f"{c['ci_low']:+.4f}", f"{c['ci_high']:+.4f}", _fmt(c["p_value"])]
        else:
            row += ["-", "-", "-", "-", "-"]
        rows.append(row)
    return header, rows


def format_table(results: dict, k_values) -> str:
    """A plain-text table for the log: metrics per system, comparisons with CIs, breakdown, parity."""
    header, rows = table_rows(results, k_values)
    keep = [0] + [i for i, h in enumerate(header) if h.startswith(("NDCG@", "MRR@", "Recall@"))]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in keep] if rows else []
    lines = ["  ".join(header[i].ljust(w) for i, w in zip(keep, widths))]
    lines += ["  ".join(r[i].ljust(w) for i, w in zip(keep, widths)) for r in rows]
    meta = results["meta"]
    conf = int(round(meta["confidence"] * 100))
    if results.get("comparisons"):
        lines.append("")
        lines.append(f"paired comparisons on {meta['comparison_metric']} ({meta['counts']['queries_evaluated']} queries, "
                     f"{meta['bootstrap_samples']} bootstrap samples):")
        for c in results["comparisons"]:
            lines.append(f"  {c['from']:>11} -> {c['to']:<10} delta {c['delta']:+.4f}  {conf}% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
                         f"  p={c['p_value']:.4f} (randomization)  wilcoxon p={_fmt(c['wilcoxon_p'])}"
                         f"  wins/losses/ties {c['wins']}/{c['losses']}/{c['ties']}")
    for field, groups in results.get("breakdown", {}).items():
        lines.append("")
        lines.append(f"{meta['comparison_metric']} by {field}:")
        systems = [s for s in SYSTEMS if s in results]
        lines.append("  " + "value".ljust(24) + "n".rjust(5) + "".join(s.rjust(13) for s in systems))
        for value, row in groups.items():
            lines.append("  " + value[:24].ljust(24) + str(row["n"]).rjust(5)
                         + "".join(_fmt(row[s][meta["comparison_metric"]]).rjust(13) for s in systems))
    parity = results.get("endpoint_parity")
    if parity:
        lines.append("")
        lines.append("endpoint parity (finetuned vs endpoint): " + ("PASSED" if parity["passed"] else "FAILED on " + ", ".join(parity["failed"])))
    return "\n".join(lines)


def write_table_tsv(path, results: dict, k_values) -> None:
    """The eval table as TSV (header + one row per system)."""
    header, rows = table_rows(results, k_values)
    write_text(path, "\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def plot_ndcg(path, results: dict, per_query: dict, k_values, confidence: float, seed: int) -> None:
    """Grouped bar plot of nDCG@k per system, with bootstrap CIs of each mean as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = [s for s in SYSTEMS if s in results]
    x = np.arange(len(k_values))
    width = 0.8 / max(1, len(systems))
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(k_values) + 0.3 * len(systems), 4.2))
    for i, system in enumerate(systems):
        means, lo, hi = [], [], []
        for k in k_values:
            vals = np.array([q[f"NDCG@{k}"] for q in per_query[system].values()])
            m = float(vals.mean()) if vals.size else 0.0
            if vals.size > 1:
                boots = vals[rng.integers(0, vals.size, size=(1000, vals.size))].mean(axis=1)
                a, b = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
            else:
                a = b = m
            means.append(m)
            lo.append(m - a)
            hi.append(b - m)
        bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=3, label=system)
        ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [f"nDCG@{k}" for k in k_values])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean over queries")
    n = len(next(iter(per_query.values()))) if per_query else 0
    ax.set_title(f"nDCG@k per system ({n} queries; error bars: {int(round(confidence * 100))}% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=len(systems))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
