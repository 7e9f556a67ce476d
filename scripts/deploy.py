"""Snakemake entry point of rule `deploy`: start the ranking service, smoke-test it, write endpoint.json."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.deploy.service import deploy
from rerankflow.retrieval.first_stage import first_query_candidates
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0]):
    # the smoke request sends the first stage's candidates of the first eval query, as a search system would
    smoke_first_stage = first_query_candidates(snakemake.input.eval_data, snakemake.params.retrieval,
                                               snakemake.params.deploy["smoke_passages"], device=snakemake.params.device)
    deploy(
        snakemake.input.model,
        snakemake.input.eval_data,
        snakemake.output.endpoint,
        dict(snakemake.params.deploy),
        dict(snakemake.params.reranker),
        server_log=snakemake.params.server_log,
        state_file=snakemake.params.state_file,
        smoke_first_stage=smoke_first_stage,
    )
