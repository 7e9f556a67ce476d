"""Snakemake entry point of rule `stop_deploy`: stop the service recorded in endpoint.json, and only that."""
import _repo  # noqa: F401  (rerankflow importable under --sdm conda)
from rerankflow.deploy.service import stop
from rerankflow.scripting import rule_logging

with rule_logging(snakemake.log[0]):
    stop(snakemake.input.endpoint, out_file=snakemake.output.stopped, timeout_s=float(snakemake.params.timeout_s))
