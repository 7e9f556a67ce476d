"""Snakemake entry point of rule sweep_export_onnx: export the variant named by sweep.export (best = chosen on validation)."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from pathlib import Path

from rerankflow.export.onnx_export import checkpoint_model_dir, run_export
from rerankflow.io import read_json, write_json
from rerankflow.scripting import rule_logging
from rerankflow.sweep.summary import exported_variant

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    summary = read_json(snakemake.input.summary) if p.choice == "best" else None
    vid = exported_variant(p.choice, summary)
    print(f"exporting sweep {snakemake.wildcards.name} variant {vid} (sweep.export: {p.choice})", flush=True)
    run_export(
        checkpoint_model_dir(p.checkpoints[vid]),
        snakemake.input.eval_data,
        Path(snakemake.output.parity).parent,
        p.export,
        p.rerankers[vid],
        p.retrieval,
        device=p.device,
        threads=snakemake.threads,
        seed=p.seed,
    )
    write_json(snakemake.output.variant, {"sweep": snakemake.wildcards.name, "variant": vid, "export": p.choice,
                                          "checkpoint": p.checkpoints[vid], "reranker": p.rerankers[vid]})
