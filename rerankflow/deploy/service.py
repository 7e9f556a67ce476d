"""Stage 5: start the ranking service, prove it answers, record where it is; stop exactly that.

The entry points of the deploy and stop_deploy rules and of ``rerankflow stop``. Two backends
(config ``deploy.backend``):

* ``builtin`` (:mod:`rerankflow.deploy.builtin`) — ``python -m rerankflow serve`` started detached
  (new session, output appended to a log file), polled on ``/v1/health/ready`` until
  ``ready_timeout_s``, then smoke-tested with a request built from the eval data (first query, its
  relevant passages and others); the served logits must equal direct ONNX scoring of the same pairs.
* ``nim`` (:mod:`rerankflow.deploy.nim`) — the NVIDIA NIM container through the Docker SDK.

``endpoint.json`` (written atomically) holds url, ranking/rerank urls, backend, pid (builtin) or
container id (nim), model path and sha256, start time, the settings served and the smoke
result. :func:`stop` reads it and stops that process (after checking that the pid still runs
*our* server: same command line and start time, :mod:`rerankflow.deploy.process`) or that
container (after checking our label).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rerankflow.deploy.builtin import deploy_builtin, stop_builtin
from rerankflow.deploy.nim import deploy_nim, stop_nim
from rerankflow.deploy.process import now_utc
from rerankflow.errors import InputError
from rerankflow.io import read_json, write_json

log = logging.getLogger(__name__)


def deploy(
    model: str | os.PathLike,
    eval_dir: str | os.PathLike,
    endpoint_file: str | os.PathLike,
    deploy_cfg: dict,
    reranker_cfg: dict,
    *,
    server_log: str | os.PathLike | None = None,
    state_file: str | os.PathLike | None = None,
    docker_client=None,
    smoke_first_stage: tuple[str, dict[str, float]] | None = None,
) -> dict:
    """The deploy rule: dispatch on ``deploy.backend`` (``builtin`` or ``nim``).

    ``deploy_cfg`` is the validated ``deploy`` section; ``reranker_cfg`` the ``reranker`` keys to
    check against the export's record (absent keys: the record's values). ``server_log`` (where the
    built-in server's output goes) and ``state_file`` are used by the builtin backend only.
    ``smoke_first_stage``: the first stage's candidates of the smoke query (``(query id, {doc id: score})``,
    :func:`rerankflow.retrieval.first_stage.first_query_candidates`); the smoke request then sends those.
    """
    backend = deploy_cfg["backend"]
    if backend == "builtin":
        if server_log is None:
            raise ValueError("the builtin backend needs server_log (the file the detached server logs to)")
        return deploy_builtin(model, eval_dir, endpoint_file, deploy_cfg, reranker_cfg, server_log=server_log, state_file=state_file,
                              smoke_first_stage=smoke_first_stage)
    if backend == "nim":
        return deploy_nim(model, eval_dir, endpoint_file, deploy_cfg, reranker_cfg, client=docker_client,
                          smoke_first_stage=smoke_first_stage)
    raise InputError(f"unknown backend {backend!r}; expected builtin or nim", key="deploy.backend")


def stop_record(record: dict, *, timeout_s: float = 20.0, docker_client=None) -> dict:
    """Stop what ``record`` (an endpoint.json) describes, and only that."""
    result: dict[str, Any] = {"backend": record.get("backend"), "url": record.get("url"), "stopped_at": now_utc()}
    if record.get("backend") == "builtin":
        result.update(stop_builtin(record, timeout_s=timeout_s))
        return result
    if record.get("backend") == "nim":
        result.update(stop_nim(record, docker_client=docker_client))
        return result
    raise InputError(f"unknown backend {record.get('backend')!r} in endpoint record")


def stop(endpoint_file: str | os.PathLike, *, out_file: str | os.PathLike | None = None, timeout_s: float = 20.0, docker_client=None) -> dict:
    """Stop the service recorded in ``endpoint_file``; optionally write the result to ``out_file``."""
    record = read_json(endpoint_file)
    if not isinstance(record, dict) or "backend" not in record:
        raise InputError("not an endpoint record (no 'backend')", path=endpoint_file)
    result = stop_record(record, timeout_s=timeout_s, docker_client=docker_client)
    result["endpoint_file"] = str(Path(endpoint_file).resolve())
    log.info("stop: %s", json.dumps(result))
    if out_file is not None:
        write_json(out_file, result)
    return result
