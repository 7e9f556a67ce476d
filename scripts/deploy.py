"""Snakemake entry point of rule `deploy`: start the ranking service, smoke-test it, write endpoint.json."""
import logging
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from rerankflow.deploy import deploy  # noqa: E402

deploy(
    snakemake.input.model,  # noqa: F821
    snakemake.input.eval_data,  # noqa: F821
    snakemake.output.endpoint,  # noqa: F821
    dict(snakemake.params.deploy),  # noqa: F821
    dict(snakemake.params.reranker),  # noqa: F821
    server_log=snakemake.params.server_log,  # noqa: F821
    state_file=snakemake.params.state_file,  # noqa: F821
)
