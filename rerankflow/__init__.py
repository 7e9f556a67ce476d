"""rerankflow: fine-tune, evaluate, export and serve cross-encoder rerankers.

The package holds the logic of every stage of the Snakemake workflow (one module per job);
the workflow's ``scripts/`` are thin entry points that read the ``snakemake`` object and
call these functions. Everything here is usable without Snakemake.
"""

__version__ = "0.1.0"
