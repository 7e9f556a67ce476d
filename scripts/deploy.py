"""Snakemake entry point of rule `deploy`: start the ranking service, smoke-test it, write endpoint.json."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.deploy.service import deploy
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0]):
    deploy(
        snakemake.input.model,
        snakemake.input.eval_data,
        snakemake.output.endpoint,
        dict(snakemake.params.deploy),
        dict(snakemake.params.reranker),
        server_log=snakemake.params.server_log,
        state_file=snakemake.params.state_file,
    )
