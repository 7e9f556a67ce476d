"""The end of a real Snakemake run (issue 19, items 7 and 8): a corpus the offline SDG cannot use fails at
stage 0 naming the reason, and the run's last words name the failed rule and its log."""

from __future__ import annotations

import yaml

from conftest import REPO, run_snakemake


def test_an_unusable_corpus_fails_in_rule_sdg_and_the_run_says_so(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"note{i}.txt").write_text(f"note {i} with a few words")
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cfg["corpus"] = {"dir": str(corpus), "min_text_length": 0}
    cfg["output_dir"] = str(tmp_path / "out")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    target = f"{tmp_path}/out/stage0_sdg/generation_result.json"
    proc = run_snakemake(tmp_path, target, configfile=cfgfile, check=False, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    tail = out[out.index("rerankflow: the run FAILED."):]
    assert f"rule sdg failed; its log: {tmp_path}/out/logs/sdg.log" in tail, tail
    log = (tmp_path / "out" / "logs" / "sdg.log").read_text()
    assert "stage 0 made no usable question from the 3 documents of the corpus: 3 too short" in log, log[-2000:]


def test_a_finished_run_says_where_the_results_and_the_report_are(tmp_path):
    from conftest import TEST_CORPUS

    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cfg["corpus"]["dir"] = str(TEST_CORPUS)
    cfg["output_dir"] = str(tmp_path / "out")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, f"{tmp_path}/out/stage0_sdg/generation_result.json", configfile=cfgfile, timeout=600)
    out = proc.stdout + proc.stderr
    tail = out[out.index("rerankflow: the run finished."):]
    assert f"No evaluation in this run's outputs yet ({tmp_path}/out/stage3_eval/eval_results.json" in tail
    assert f"snakemake --configfile {cfgfile} --report {tmp_path}/out/report.html" in tail, tail
