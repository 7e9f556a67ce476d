"""What a Snakemake run prints when it ends (issue 19, item 7): rerankflow.run_summary, used by the
Snakefile's onsuccess/onerror handlers."""

from __future__ import annotations

import json

from rerankflow.run_summary import failed_rules, failure_summary, success_summary


def _system(ndcg, mrr):
    return {"NDCG": {"NDCG@1": 0.1, "NDCG@10": ndcg}, "MRR": {"MRR@10": mrr}, "Recall": {"Recall@10": 0.9}}


RESULTS = {
    "first_stage": _system(0.2971, 0.2384),
    "base": _system(0.4312, 0.3951),
    "finetuned": _system(0.4240, 0.3680),
    "comparisons": [
        {"from": "first_stage", "to": "base", "metric": "NDCG@10", "delta": 0.1341, "ci_low": 0.05, "ci_high": 0.21,
         "confidence": 0.95, "p_value": 0.002},
        {"from": "base", "to": "finetuned", "metric": "NDCG@10", "delta": -0.0072, "ci_low": -0.06, "ci_high": 0.04,
         "confidence": 0.95, "p_value": 0.81},
    ],
    "breakdown": {"query_type": {}},
    "meta": {"counts": {"queries_evaluated": 35}},
}


def test_success_prints_the_final_table_and_where_things_are(tmp_path):
    (tmp_path / "stage3_eval").mkdir()
    (tmp_path / "stage3_eval" / "eval_results.json").write_text(json.dumps(RESULTS))
    text = success_summary(str(tmp_path), ["my config.yaml"])
    lines = text.splitlines()
    assert lines[0] == "rerankflow: the run finished."
    assert f"{tmp_path}/stage3_eval/eval_results.json, 35 queries" in text
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()[0] in RESULTS}
    assert set(rows) == {"first_stage", "base", "finetuned"}  # breakdown/meta/comparisons are not systems
    assert rows["first_stage"].split()[1:3] == ["0.297", "0.238"] and "vs" not in rows["first_stage"]
    assert rows["base"].split()[1:3] == ["0.431", "0.395"]
    assert "NDCG@10 +0.134 vs first_stage, 95% CI [+0.050, +0.210], p=0.002" in rows["base"]
    assert "NDCG@10 -0.007 vs base, 95% CI [-0.060, +0.040], p=0.81" in rows["finetuned"]
    assert f"snakemake --configfile 'my config.yaml' --report {tmp_path}/report.html" in text
    assert f"Outputs: {tmp_path}/" in text


def test_success_without_evaluation_or_with_a_broken_file_still_says_where_things_are(tmp_path):
    text = success_summary(str(tmp_path))
    assert "No evaluation in this run's outputs yet" in text and "--report" in text
    (tmp_path / "stage3_eval").mkdir()
    (tmp_path / "stage3_eval" / "eval_results.json").write_text("{not json")
    assert "could not read" in success_summary(str(tmp_path))


SNAKEMAKE_LOG = """\
Select jobs to execute...
[Sat Dec  5 05:07:49 2026]
localrule prep:
    output: out/stage1_prep/train.json
    log: out/logs/prep.log
RuleException:
CalledProcessError in file "rules/prep.smk", line 6:
Error in rule prep:
    message: None
    jobid: 2
    output: out/stage1_prep/train.json
    log: out/logs/prep.log (check log file(s) for error details)
    shell:
        python ...
Error in rule export_onnx:
    jobid: 5
    log: out/logs/export_onnx.log, out/logs/export_parity.log (check log file(s) for error details)
Error in rule no_log_rule:
    jobid: 7
Shutting down, this might take some time.
Exiting because a job execution failed. Look above for error messages
"""


def test_failure_names_each_failed_rule_and_its_log(tmp_path):
    assert failed_rules(SNAKEMAKE_LOG) == [("prep", ["out/logs/prep.log"]),
                                           ("export_onnx", ["out/logs/export_onnx.log", "out/logs/export_parity.log"]),
                                           ("no_log_rule", [])]
    log = tmp_path / "run.snakemake.log"
    log.write_text(SNAKEMAKE_LOG)
    text = failure_summary([str(log)])
    assert text.splitlines()[0] == "rerankflow: the run FAILED."
    assert "  rule prep failed; its log: out/logs/prep.log" in text
    assert "rule no_log_rule failed; its log: (the rule has no log file)" in text
    assert f"Snakemake's log: {log}" in text
    assert "no rule failed" in failure_summary([str(tmp_path / "missing.log")])
