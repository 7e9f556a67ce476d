"""Glue for the thin Snakemake scripts: log to the rule's log file, fail with a readable message."""

from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def rule_logging(log_path: str | None, threads: int | None = None):
    """Send stdout, stderr and ``logging`` to the rule's log file; set torch/BLAS thread counts.

    An exception is logged with its message (the traceback too) and re-raised, so Snakemake
    reports the rule as failed and the log says why.
    """
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fh = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else None
    old_out, old_err = sys.stdout, sys.stderr
    if fh is not None:
        sys.stdout = sys.stderr = fh
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if threads:
        try:
            import torch

            torch.set_num_threads(int(threads))
        except Exception:
            pass
    try:
        yield logging.getLogger("rerankflow")
    except Exception as exc:
        logging.getLogger("rerankflow").error("%s: %s", type(exc).__name__, exc, exc_info=True)
        if fh is not None:
            print(f"rerankflow: {type(exc).__name__}: {exc}", file=old_err)
        raise
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        if fh is not None:
            fh.close()
