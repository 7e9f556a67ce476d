"""The ``builtin`` backend: ``python -m rerankflow serve`` started detached, proven, recorded.

:func:`deploy_builtin` resolves the serving settings (``deploy`` section + the export's record),
writes them to ``server_settings.json`` (the NAME of the token variable, never its value), starts
the server in its own session, waits for ``/v1/health/ready`` (``deploy.ready_timeout_s``), sends
the smoke request and checks the served logits against direct scoring of the same pairs with the
same scorer class (:class:`~rerankflow.scoring.onnx_scorer.OnnxScorer`). On any failure the server
it started is stopped again. ``state_file`` remembers the server across Snakemake's removal of
``endpoint.json``, so a re-deploy stops the previous server (and nothing else).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from rerankflow.deploy.process import (
    client_host, free_port, now_utc, port_in_use, proc_stat, process_is_ours, start_detached, terminate,
)
from rerankflow.deploy.smoke import auth_headers, build_smoke_request, run_smoke, wait_ready
from rerankflow.errors import InputError
from rerankflow.io import read_json, sha256_file, write_json
from rerankflow.scoring.export_record import resolve_text_settings
from rerankflow.scoring.onnx_scorer import OnnxScorer, find_model_file, find_tokenizer_file
from rerankflow.scoring.onnx_session import choose_providers
from rerankflow.serve.settings import ServeSettings, read_auth_token

log = logging.getLogger(__name__)

MAX_SERVED_VS_DIRECT = 1e-3  # largest |served logit - direct logit| of the smoke pairs


def deploy_builtin(
    model: str | os.PathLike,
    eval_dir: str | os.PathLike,
    endpoint_file: str | os.PathLike,
    deploy_cfg: dict,
    reranker_cfg: dict,
    *,
    server_log: str | os.PathLike,
    state_file: str | os.PathLike | None = None,
    python: str = sys.executable,
    smoke_first_stage: tuple[str, dict[str, float]] | None = None,
) -> dict:
    """Start ``rerankflow serve`` detached, wait for ready, smoke-test, write ``endpoint_file``."""
    endpoint_file = Path(endpoint_file)
    model_file = find_model_file(model).absolute()
    tokenizer_file = find_tokenizer_file(model_file).absolute()
    smoke = build_smoke_request(eval_dir, int(deploy_cfg["smoke_passages"]), smoke_first_stage)
    host = deploy_cfg["host"]
    if state_file is not None:  # a server this workflow started before (endpoint.json was deleted by Snakemake)
        stop_previous(state_file)
    port = int(deploy_cfg["port"]) or free_port(client_host(host).strip("[]"))
    if port_in_use(host, port):
        raise InputError(f"port {port} on {host} is already in use; free it or set deploy.port (0 picks a free port)", key="deploy.port")

    settings = ServeSettings.from_config(deploy_cfg, reranker_cfg, model_file, port=port, tokenizer=str(tokenizer_file)).validate()
    settings.max_length, settings.prompt_template, settings.input_format = resolve_text_settings(
        model_file, settings.max_length, settings.prompt_template, settings.input_format)
    read_auth_token(settings)  # fail here, not in the detached child, when the token variable is empty
    headers = auth_headers(deploy_cfg)
    settings_file = endpoint_file.parent / "server_settings.json"
    write_json(settings_file, settings.to_json())  # holds the NAME of the token variable, never its value

    server_log = Path(server_log).resolve()
    server_log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "rerankflow", "serve", "--settings", str(settings_file.resolve())]
    proc = start_detached(cmd, server_log)
    url = f"http://{client_host(host)}:{port}"
    log.info("started server pid %d on %s (log %s)", proc.pid, url, server_log)
    stat = proc_stat(proc.pid)
    if state_file is not None:  # recorded at once: should this job die now, the next deploy stops the orphan
        write_json(state_file, {"backend": "builtin", "url": url, "pid": proc.pid,
                                "proc_start_ticks": stat[1] if stat else None, "cmdline": cmd})
    ready_s, smoke_result = _prove_or_stop(proc, url, smoke, headers, settings, server_log, float(deploy_cfg["ready_timeout_s"]))
    record = {
        "backend": "builtin",
        "url": url,
        "ranking_url": f"{url}/v1/ranking",
        "rerank_url": f"{url}/v1/rerank",
        "health_url": f"{url}/v1/health/ready",
        "host": host,
        "port": port,
        "pid": proc.pid,
        "proc_start_ticks": stat[1] if stat else None,
        "cmdline": cmd,
        "server_log": str(server_log),
        "settings_file": str(settings_file.resolve()),
        "model_name": smoke_result["model_id"],
        "model_path": str(model_file),
        "model_sha256": sha256_file(model_file),
        "tokenizer_path": str(tokenizer_file),
        "max_length": settings.max_length,
        "prompt_template": settings.prompt_template,
        "input_format": settings.input_format,
        "dynamic_batching": settings.dynamic_batching,
        "auth": bool(settings.auth_token_env),
        "auth_token_env": settings.auth_token_env,
        "started_at": now_utc(),
        "ready_after_s": round(ready_s, 2),
        "health": "ready",
        "smoke": smoke_result,
    }
    write_json(endpoint_file, record)
    if state_file is not None:
        write_json(state_file, record)
    log.info("deployed: %s (pid %d); stop with: python -m rerankflow stop --endpoint-file %s", url, proc.pid, endpoint_file)
    return record


def _prove_or_stop(proc: subprocess.Popen, url: str, smoke: dict, headers: dict, settings: ServeSettings,
                   server_log: Path, ready_timeout_s: float) -> tuple[float, dict]:
    """``(seconds until ready, smoke result)``; on any failure (or SIGTERM) the server is stopped and the error re-raised."""
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigterm(signum, frame):  # Snakemake cancelling the job: clean up through the except below
            raise SystemExit(f"deploy interrupted by signal {signum}")

        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        ready_s = wait_ready(
            url, ready_timeout_s,
            alive=lambda: None if proc.poll() is None else f"exit code {proc.returncode}; see {server_log}",
        )
        smoke_result = run_smoke(url, smoke, headers)
        smoke_result["max_abs_diff_vs_direct_onnx"] = _served_vs_direct(smoke_result, smoke, settings)
        return ready_s, smoke_result
    except BaseException:
        log.error("deploy failed; stopping the server it started (pid %d); its log: %s", proc.pid, server_log)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        try:
            tail = server_log.read_text(errors="replace").splitlines()[-20:]
            log.error("last lines of the server log:\n%s", "\n".join(tail))
        except OSError:
            pass
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _served_vs_direct(smoke_result: dict, smoke: dict, settings: ServeSettings) -> float:
    """Max |served - direct| logit of the smoke pairs, direct = the same scorer in this process; raises above tolerance."""
    direct = OnnxScorer(
        settings.model, tokenizer=settings.tokenizer, max_length=settings.max_length,
        prompt_template=settings.prompt_template, input_format=settings.input_format,
        providers=choose_providers(settings.device, key="deploy.device"), batch_size=settings.max_batch_size,
        intra_op_threads=settings.intra_op_threads, max_padding=settings.max_padding,
        max_batch_tokens=settings.max_batch_tokens,
    ).score(smoke["query"], smoke["passages"])
    diff = max(abs(a - float(b)) for a, b in zip(smoke_result["logits"], direct))
    if diff > MAX_SERVED_VS_DIRECT:
        raise RuntimeError(f"served logits differ from direct ONNX scoring of the same pairs by {diff:.4g}")
    return diff


def stop_previous(state_file: str | os.PathLike) -> dict | None:
    """Stop the server recorded in ``state_file`` if it is still ours; ignore anything else."""
    state_file = Path(state_file)
    if not state_file.exists():
        return None
    try:
        record = read_json(state_file)
    except InputError:
        return None
    if record.get("backend") != "builtin":
        return None
    result = stop_builtin(record, timeout_s=20.0)
    log.info("previous server (pid %s): %s", record.get("pid"), result["status"])
    return result


def stop_builtin(record: dict, *, timeout_s: float) -> dict:
    """Stop the server process of a builtin endpoint record, after checking it is still ours."""
    pid = int(record["pid"])
    result = {"pid": pid}
    ours, why = process_is_ours(pid, record)
    if not ours:
        result.update(status="not_running", reason=why)
        return result
    result["status"] = terminate(pid, record, timeout_s)
    return result
