"""Snakemake entry point: write the embedded default corpus (the interpreter's Python documentation)."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.sdg.corpus import write_default_corpus
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0]):
    write_default_corpus(snakemake.output[0])
