"""Snakemake entry point of rule `stop_deploy`: stop the service recorded in endpoint.json, only that."""
import logging
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from rerankflow.deploy import stop  # noqa: E402

stop(snakemake.input.endpoint, out_file=snakemake.output.stopped, timeout_s=float(snakemake.params.timeout_s))  # noqa: F821
