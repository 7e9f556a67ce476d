"""What the user reads when a Snakemake run ends (the Snakefile's ``onsuccess:`` / ``onerror:`` handlers).

* :func:`success_summary`: the final table (nDCG@10 and MRR@10 of each system, and the paired CI of each
  system against the one before it, as stage 3 computed them) read from
  ``<output_dir>/stage3_eval/eval_results.json`` when it exists, then where the results are and the
  ``snakemake --report`` command.
* :func:`failure_summary`: which rule(s) failed and their log files, read from Snakemake's own log.

Both only read files and return text; neither raises on a missing or unexpected file (a summary must never
hide the run's real outcome).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Iterable, Sequence

EVAL_RESULTS = "stage3_eval/eval_results.json"
TABLE_METRICS = ("NDCG@10", "MRR@10")


def _metric(system: dict, name: str) -> float | None:
    family = re.match(r"[A-Za-z]+", name).group(0)
    value = (system.get(family) or {}).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def results_table(results: dict) -> list[str]:
    """Lines of the final table of an ``eval_results.json`` (systems in the file's order)."""
    systems = [name for name, v in results.items() if isinstance(v, dict) and isinstance(v.get("NDCG"), dict)]
    comparisons = {c.get("to"): c for c in results.get("comparisons") or [] if isinstance(c, dict)}
    width = max([len(s) for s in systems] + [6])
    head = f"  {'system':<{width}}  " + "  ".join(f"{m:>7}" for m in TABLE_METRICS) + "  vs previous system (paired CI)"
    lines = [head]
    for name in systems:
        row = f"  {name:<{width}}  " + "  ".join(f"{_fmt(_metric(results[name], m)):>7}" for m in TABLE_METRICS)
        c = comparisons.get(name)
        if c:
            conf = c.get("confidence")
            conf_txt = f"{round(100 * conf)}% CI " if isinstance(conf, (int, float)) else "CI "
            row += (f"  {c.get('metric', '?')} {_fmt(c.get('delta'), signed=True)} vs {c.get('from')}, "
                    f"{conf_txt}[{_fmt(c.get('ci_low'), signed=True)}, {_fmt(c.get('ci_high'), signed=True)}]")
            if isinstance(c.get("p_value"), (int, float)):
                row += f", p={c['p_value']:.3g}"
        lines.append(row)
    return lines


def report_command(output_dir: str, configfiles: Sequence[str] = ()) -> str:
    args = ["snakemake"] + (["--configfile", *configfiles] if configfiles else []) + ["--report", f"{output_dir}/report.html"]
    return " ".join(shlex.quote(a) for a in args)


def success_summary(output_dir: str | Path, configfiles: Sequence[str] = ()) -> str:
    """The text printed when a run succeeds (see module docstring)."""
    out = Path(output_dir)
    path = out / EVAL_RESULTS
    lines = ["rerankflow: the run finished."]
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            lines.append(f"  (could not read {path}: {exc})")
        else:
            n = ((results.get("meta") or {}).get("counts") or {}).get("queries_evaluated")
            lines.append(f"Final results ({path}{f', {n} queries' if n else ''}):")
            lines += results_table(results)
            lines.append(f"Results: {out / 'stage3_eval'}/ (eval_results.json, per-query scores, TREC runs, plot)")
    else:
        lines.append(f"No evaluation in this run's outputs yet ({path} does not exist).")
    lines.append(f"Outputs: {out}/   logs: {out / 'logs'}/")
    lines.append(f"HTML report: {report_command(str(output_dir), configfiles)}")
    return "\n".join(lines)


ERROR_RULE = re.compile(r"^Error in rule (\S+?):\s*$")
LOG_LINE = re.compile(r"^\s+log: (.+?)(?: \(check log file\(s\) for error details\))?\s*$")


def failed_rules(snakemake_log_text: str) -> list[tuple[str, list[str]]]:
    """``(rule, [its log files])`` for every ``Error in rule`` block of a Snakemake log, in order, once each."""
    found: dict[str, list[str]] = {}
    current = None
    for line in snakemake_log_text.splitlines():
        m = ERROR_RULE.match(line)
        if m:
            current = m.group(1)
            found.setdefault(current, [])
            continue
        if current is None:
            continue
        m = LOG_LINE.match(line)
        if m:
            found[current] += [p.strip() for p in m.group(1).split(",") if p.strip() and p.strip() not in found[current]]
        elif line and not line.startswith((" ", "\t")):
            current = None  # the block ended
    return list(found.items())


def failure_summary(snakemake_logs: str | Iterable[str] | None) -> str:
    """The text printed when a run fails: the failed rule(s) and their logs, and Snakemake's own log."""
    if isinstance(snakemake_logs, (str, Path)):
        snakemake_logs = [str(snakemake_logs)]
    logs = [str(p) for p in snakemake_logs or []]
    text = ""
    for p in logs:
        try:
            text += Path(p).read_text(encoding="utf-8", errors="replace") + "\n"
        except OSError:
            pass
    rules = failed_rules(text)
    lines = ["rerankflow: the run FAILED."]
    for rule, rule_logs in rules:
        lines.append(f"  rule {rule} failed; its log: {', '.join(rule_logs) if rule_logs else '(the rule has no log file)'}")
    if not rules:
        lines.append("  no rule failed: the workflow itself stopped (see the error above)")
    if logs:
        lines.append(f"  Snakemake's log: {', '.join(logs)}")
    return "\n".join(lines)
