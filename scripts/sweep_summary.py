"""Snakemake entry point of rule sweep_summary: one row per variant, the variant chosen on validation."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)

from rerankflow.scripting import rule_logging
from rerankflow.sweep.summary import summarize, write_summary

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    summary = summarize(snakemake.wildcards.name, p.variants, p.base_dir, p.variant_dirs, metric=p.metric,
                        bootstrap_samples=p.bootstrap_samples, confidence=p.confidence, seed=p.seed)
    out = snakemake.output
    write_summary(summary, json_path=out.json, md_path=out.md, tsv_path=out.tsv, png_path=out.png)
