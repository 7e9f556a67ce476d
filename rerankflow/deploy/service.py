"""Stage 5: start the ranking service, prove it answers, record where it is; stop exactly that.

Two backends (config ``deploy.backend``):

* ``builtin`` — ``python -m rerankflow serve`` started detached (new session, output appended
  to a log file), polled on ``/v1/health/ready`` until ``ready_timeout_s``, then smoke-tested
  with a request built from the eval data (first query, its relevant passages and others); the
  served logits must equal direct ONNX scoring of the same pairs.
* ``nim`` — the NVIDIA NIM container through the Docker SDK for Python, with the settings of
  NVIDIA's recipe: image, GPUs (``DeviceRequest``), shared memory, user, the HTTP port bound to
  127.0.0.1, ``NGC_API_KEY`` passed through the container environment (read from the variable
  named by ``nim.api_key_env``; never written to any file or log), the export mounted read-only
  and named by ``NIM_CUSTOM_MODEL``, a cache volume, and the label ``io.rerankflow.managed=true``.
  A container of the same name is replaced only when it carries our label and
  ``nim.replace_existing`` is true; an unlabelled one is never touched.

``endpoint.json`` (written atomically) holds url, ranking/rerank urls, backend, pid (builtin) or
container id (nim), model path and sha256, start time, the settings served and the smoke
result. :func:`stop` reads it and stops that process (after checking that the pid still runs
*our* server: same command line and start time) or that container (after checking our label).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from rerankflow.errors import InputError
from rerankflow.io import read_json, sha256_file, write_json

log = logging.getLogger("rerankflow.deploy.service")

LABEL_KEY = "io.rerankflow.managed"
LABEL_VALUE = "true"
NIM_MODEL_MOUNT = "/opt/nim/custom_model"
NIM_CACHE_MOUNT = "/opt/nim/.cache"
NIM_CONTAINER_PORT = 8000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def client_host(host: str) -> str:
    """Host a client uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((client_host(host).strip("[]"), port)) == 0


def model_file_for(output_dir: str | os.PathLike, deploy_cfg: dict) -> Path:
    """``stage4_export/onnx/model.onnx`` or, for ``deploy.model: int8``, ``onnx_int8/model.onnx``."""
    sub = "onnx_int8" if deploy_cfg.get("model", "onnx") == "int8" else "onnx"
    return Path(output_dir) / "stage4_export" / sub / "model.onnx"


def _auth_headers(deploy_cfg: dict) -> dict:
    env = deploy_cfg.get("auth_token_env")
    if not env:
        return {}
    token = os.environ.get(env, "")
    if not token:
        raise InputError(f"auth is on but environment variable {env} is unset or empty", key="deploy.auth_token_env")
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ smoke request
def build_smoke_request(eval_dir: str | os.PathLike, n_passages: int = 8) -> dict:
    """First query of ``eval_beir`` with its relevant passages and others from the corpus.

    Returns ``{"query_id", "query", "doc_ids", "passages", "relevant"}`` (passage texts are
    ``title + " " + text``, as eval reads them). Non-relevant passages come first so that a
    working reranker has to move the relevant ones up.
    """
    from rerankflow.beir import load_beir, passage_text

    corpus, queries, qrels = load_beir(eval_dir)
    if not queries:
        raise InputError("no query with relevance judgements; cannot build a smoke request", path=eval_dir)
    qid = next(iter(queries))
    relevant = [d for d, s in qrels.get(qid, {}).items() if s > 0 and d in corpus]
    n_rel = min(len(relevant), max(1, n_passages // 2))
    others = [d for d in corpus if d not in set(relevant)][: max(1, n_passages - n_rel)]
    doc_ids = others + relevant[:n_rel]
    return {
        "query_id": qid,
        "query": queries[qid],
        "doc_ids": doc_ids,
        "passages": [passage_text(corpus[d]) for d in doc_ids],
        "relevant": relevant[:n_rel],
    }


def run_smoke(url: str, smoke: dict, headers: dict | None = None, timeout_s: float = 120.0) -> dict:
    """Send the smoke request to ``/v1/models``, ``/v1/ranking`` and ``/v1/rerank``; assert sane answers.

    Raises ``RuntimeError`` naming what was wrong. Returns a summary with the served logits.
    """
    import httpx

    headers = headers or {}
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as c:
        r = c.get("/v1/models")
        if r.status_code != 200:
            raise RuntimeError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
        models = r.json().get("data") or []
        model_id = models[0]["id"] if models else None
        body = {"model": model_id, "query": {"text": smoke["query"]}, "passages": [{"text": p} for p in smoke["passages"]], "truncate": "END"}
        t0 = time.perf_counter()
        r = c.post("/v1/ranking", json=body)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if r.status_code != 200:
            raise RuntimeError(f"smoke POST /v1/ranking answered {r.status_code}: {r.text[:300]}")
        rankings = r.json().get("rankings")
        n = len(smoke["passages"])
        if not isinstance(rankings, list) or sorted(x.get("index") for x in rankings) != list(range(n)):
            raise RuntimeError(f"smoke /v1/ranking: rankings are not a permutation of the {n} passages: {rankings!r:.300}")
        logits = [x.get("logit") for x in rankings]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in logits):
            raise RuntimeError(f"smoke /v1/ranking: non-finite logits {logits}")
        if any(a < b for a, b in zip(logits, logits[1:])):
            raise RuntimeError(f"smoke /v1/ranking: rankings not sorted by logit: {logits}")
        r2 = c.post("/v1/rerank", json={"model": model_id, "query": smoke["query"], "documents": smoke["passages"], "top_n": n})
        rerank_ok = r2.status_code == 200 and [x["index"] for x in r2.json().get("results", [])] == [x["index"] for x in rankings]
    by_index = {x["index"]: float(x["logit"]) for x in rankings}
    order = [x["index"] for x in rankings]
    rel_idx = [smoke["doc_ids"].index(d) for d in smoke["relevant"]]
    return {
        "passed": True,
        "query_id": smoke["query_id"],
        "n_passages": n,
        "model_id": model_id,
        "latency_ms": round(latency_ms, 1),
        "ranking_doc_ids": [smoke["doc_ids"][i] for i in order],
        "logits": [by_index[i] for i in range(n)],
        "best_relevant_rank": (min(order.index(i) for i in rel_idx) + 1) if rel_idx else None,
        "rerank_api_agrees": bool(rerank_ok),
    }


def wait_ready(url: str, timeout_s: float, *, alive: Callable[[], str | None] | None = None, interval_s: float = 0.5, headers: dict | None = None) -> float:
    """Poll ``url/v1/health/ready`` until 200; returns seconds waited.

    ``alive()`` returns a reason string when the server died (checked every poll), so a crash
    fails fast instead of waiting out the timeout.
    """
    import httpx

    t0 = time.monotonic()
    last = "no answer yet"
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"server exited before it was ready: {dead}")
        try:
            r = httpx.get(f"{url}/v1/health/ready", timeout=5.0, headers=headers or {})
            if r.status_code == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        waited = time.monotonic() - t0
        if waited > timeout_s:
            raise TimeoutError(f"{url}/v1/health/ready not ready after {timeout_s:.0f}s (last: {last})")
        time.sleep(interval_s)


# ------------------------------------------------------------------ process identity (builtin)
def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[19])


def process_is_ours(pid: int, record: dict) -> tuple[bool, str]:
    """Whether ``pid`` is still the server recorded in ``record`` (command line and start time)."""
    if not Path("/proc").is_dir():
        raise RuntimeError("stopping needs /proc (Linux) to verify the process before killing it")
    stat = _proc_stat(pid)
    cmd = _proc_cmdline(pid)
    if stat is None or cmd is None:
        return False, "not running"
    if stat[0] in ("Z", "X"):
        return False, "exited (zombie)"
    if record.get("proc_start_ticks") is not None and stat[1] != record["proc_start_ticks"]:
        return False, "pid now belongs to another process (different start time)"
    if cmd != record.get("cmdline"):
        return False, f"pid now runs something else: {' '.join(cmd)[:200]}"
    return True, "running"


def _terminate(pid: int, record: dict, timeout_s: float) -> str:
    """SIGTERM (graceful), then SIGKILL after ``timeout_s``; re-verifies identity before SIGKILL."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ours, _ = process_is_ours(pid, record)
        if not ours:
            return "stopped"
        time.sleep(0.1)
    ours, _ = process_is_ours(pid, record)
    if ours:
        os.kill(pid, signal.SIGKILL)
        return "killed"
    return "stopped"


# ------------------------------------------------------------------ builtin backend
def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def deploy_builtin(
    model: str | os.PathLike,
    eval_dir: str | os.PathLike,
    endpoint_file: str | os.PathLike,
    deploy_cfg: dict,
    reranker_cfg: dict,
    *,
    server_log: str | os.PathLike = "logs/deploy_server.log",
    state_file: str | os.PathLike | None = None,
    python: str = sys.executable,
) -> dict:
    """Start ``rerankflow serve`` detached, wait for ready, smoke-test, write ``endpoint_file``."""
    from rerankflow.scoring.onnx_scorer import OnnxScorer, find_model_file, find_tokenizer_file, resolve_text_settings
    from rerankflow.serve.app import ServeSettings, _read_token

    endpoint_file = Path(endpoint_file)
    model_file = find_model_file(model).absolute()
    tokenizer_file = find_tokenizer_file(model_file).absolute()
    smoke = build_smoke_request(eval_dir, int(deploy_cfg.get("smoke_passages", 8)))
    host = deploy_cfg.get("host", "127.0.0.1")

    if state_file is not None:  # a server this workflow started before (endpoint.json was deleted by Snakemake)
        stop_previous(state_file)
    port = int(deploy_cfg.get("port", 8000)) or free_port(client_host(host).strip("[]"))
    if port_in_use(host, port):
        raise InputError(f"port {port} on {host} is already in use; free it or set deploy.port (0 picks a free port)", key="deploy.port")

    settings = ServeSettings.from_config(deploy_cfg, reranker_cfg, model_file, port=port, tokenizer=str(tokenizer_file)).validate()
    settings.max_length, settings.prompt_template, settings.input_format = resolve_text_settings(
        model_file, settings.max_length, settings.prompt_template, settings.input_format)
    _read_token(settings)  # fail here, not in the detached child, when the token variable is empty
    headers = _auth_headers(deploy_cfg)
    settings_file = endpoint_file.parent / "server_settings.json"
    write_json(settings_file, settings.to_json())  # holds the NAME of the token variable, never its value

    server_log = Path(server_log).resolve()
    server_log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "rerankflow", "serve", "--settings", str(settings_file.resolve())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(server_log, "ab") as fh:
        fh.write(f"\n===== {_now()} starting: {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env, cwd=os.getcwd(),
        )
    url = f"http://{client_host(host)}:{port}"
    log.info("started server pid %d on %s (log %s)", proc.pid, url, server_log)
    stat = _proc_stat(proc.pid)
    if state_file is not None:  # recorded at once: should this job die now, the next deploy stops the orphan
        write_json(state_file, {"backend": "builtin", "url": url, "pid": proc.pid,
                                "proc_start_ticks": stat[1] if stat else None, "cmdline": cmd})
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigterm(signum, frame):  # Snakemake cancelling the job: clean up through the except below
            raise SystemExit(f"deploy interrupted by signal {signum}")

        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        ready_s = wait_ready(
            url, float(deploy_cfg.get("ready_timeout_s", 120)),
            alive=lambda: None if proc.poll() is None else f"exit code {proc.returncode}; see {server_log}",
        )
        smoke_result = run_smoke(url, smoke, headers)
        direct = OnnxScorer(
            model_file, tokenizer=tokenizer_file, max_length=settings.max_length,
            prompt_template=settings.prompt_template, input_format=settings.input_format, device=settings.device,
            batch_size=settings.max_batch_size,
            max_padding=settings.max_padding,
        ).score(smoke["query"], smoke["passages"])
        diff = max(abs(a - float(b)) for a, b in zip(smoke_result["logits"], direct))
        smoke_result["max_abs_diff_vs_direct_onnx"] = diff
        if diff > 1e-3:
            raise RuntimeError(f"served logits differ from direct ONNX scoring of the same pairs by {diff:.4g}")
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
        "started_at": _now(),
        "ready_after_s": round(ready_s, 2),
        "health": "ready",
        "smoke": smoke_result,
    }
    write_json(endpoint_file, record)
    if state_file is not None:
        write_json(state_file, record)
    log.info("deployed: %s (pid %d); stop with: python -m rerankflow stop --endpoint-file %s", url, proc.pid, endpoint_file)
    return record


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
    result = stop_record(record)
    log.info("previous server (pid %s): %s", record.get("pid"), result["status"])
    return result


# ------------------------------------------------------------------ NIM backend
def _device_request(gpus):
    import docker

    g = str(gpus).strip()
    if g in ("all", "-1"):
        return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    if g.isdigit():
        return docker.types.DeviceRequest(count=int(g), capabilities=[["gpu"]])
    ids = [x.strip() for x in g.removeprefix("device=").split(",") if x.strip()]
    return docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])


def nim_container_spec(export_dir: str | os.PathLike, deploy_cfg: dict, api_key: str) -> dict:
    """Keyword arguments for ``client.containers.run`` that start the NIM as NVIDIA's recipe does.

    The API key goes into ``environment`` only (the Docker engine hands it to the container);
    use :func:`redact_spec` before logging the spec.
    """
    nim = deploy_cfg.get("nim") or {}
    host = deploy_cfg.get("host", "127.0.0.1")
    port = int(deploy_cfg.get("port", 8000))
    cache_dir = Path(os.path.expanduser(nim.get("cache_dir") or "~/.cache/nim")).resolve()
    user = nim.get("user")
    if user is None and hasattr(os, "getuid"):
        user = f"{os.getuid()}"
    spec = {
        "image": nim.get("image", "nvcr.io/nim/nvidia/llama-nemotron-rerank-1b-v2:1.10.0"),
        "name": nim.get("container_name", "nemotron-rerank-nim"),
        "detach": True,
        "labels": {LABEL_KEY: LABEL_VALUE, "io.rerankflow.stage": "deploy"},
        "device_requests": [_device_request(nim.get("gpus", "all"))],
        "shm_size": nim.get("shm_size", "16g"),
        "ports": {f"{NIM_CONTAINER_PORT}/tcp": (host, port)},
        "environment": {
            "NGC_API_KEY": api_key,
            "NIM_CUSTOM_MODEL": NIM_MODEL_MOUNT,
            "NIM_CACHE_PATH": NIM_CACHE_MOUNT,
            "NIM_HTTP_API_PORT": str(NIM_CONTAINER_PORT),
        },
        "volumes": {
            str(Path(export_dir).absolute()): {"bind": NIM_MODEL_MOUNT, "mode": "ro"},
            str(cache_dir): {"bind": NIM_CACHE_MOUNT, "mode": "rw"},
        },
    }
    if user:
        spec["user"] = str(user)
    return spec


def redact_spec(spec: dict) -> dict:
    """Copy of a container spec safe to log or store: environment values of secrets masked."""
    out = dict(spec)
    out["environment"] = {k: ("***" if k == "NGC_API_KEY" else v) for k, v in spec.get("environment", {}).items()}
    out["device_requests"] = [dict(d) for d in spec.get("device_requests", [])]
    return out


def _labels(container) -> dict:
    labels = getattr(container, "labels", None)
    if labels is None:
        labels = ((getattr(container, "attrs", None) or {}).get("Config") or {}).get("Labels")
    return labels or {}


def ensure_name_free(client, name: str, replace_existing: bool) -> str | None:
    """Make ``name`` free for our container; returns what was done, raises if not allowed.

    An existing container without our label is refused (never touched). One of ours is stopped
    and removed only when ``replace_existing`` is true.
    """
    import docker

    try:
        existing = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    if _labels(existing).get(LABEL_KEY) != LABEL_VALUE:
        raise InputError(
            f"a Docker container named {name!r} exists and was not started by rerankflow (no {LABEL_KEY}={LABEL_VALUE} label); "
            "it is left alone: remove or rename it yourself, or choose another deploy.nim.container_name",
            key="deploy.nim.container_name",
        )
    if not replace_existing:
        raise InputError(
            f"our container {name!r} already exists; set deploy.nim.replace_existing: true to replace it, "
            "or stop it with the stop_deploy rule",
            key="deploy.nim.replace_existing",
        )
    log.info("replacing our previous container %s", name)
    existing.stop()
    existing.remove()
    return "replaced"


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def deploy_nim(
    model: str | os.PathLike,
    eval_dir: str | os.PathLike,
    endpoint_file: str | os.PathLike,
    deploy_cfg: dict,
    reranker_cfg: dict,
    *,
    client=None,
) -> dict:
    """Start the NIM container for the export folder of ``model``; wait, smoke-test, record."""
    from rerankflow.scoring.onnx_scorer import find_model_file, resolve_text_settings

    nim = deploy_cfg.get("nim") or {}
    key_env = nim.get("api_key_env", "NGC_API_KEY")
    api_key = os.environ.get(key_env, "")
    if not api_key:
        raise InputError(f"the NIM backend needs an NGC API key in environment variable {key_env}", key="deploy.nim.api_key_env")
    model_file = find_model_file(model).absolute()
    export_dir = model_file.parent
    _ml, _tpl, input_format = resolve_text_settings(model_file, reranker_cfg.get("max_length"), reranker_cfg.get("prompt_template"),
                                                    reranker_cfg.get("input_format"))
    smoke = build_smoke_request(eval_dir, int(deploy_cfg.get("smoke_passages", 8)))
    if client is None:
        import docker

        client = docker.from_env()
    spec = nim_container_spec(export_dir, deploy_cfg, api_key)
    cache_host_dir = next(k for k, v in spec["volumes"].items() if v["bind"] == NIM_CACHE_MOUNT)
    Path(cache_host_dir).mkdir(parents=True, exist_ok=True)  # so the container user (not root) owns it
    replaced = ensure_name_free(client, spec["name"], bool(nim.get("replace_existing", False)))
    log.info("starting NIM container: %s", json.dumps(redact_spec(spec), default=str))
    container = client.containers.run(**spec)
    host = deploy_cfg.get("host", "127.0.0.1")
    url = f"http://{client_host(host)}:{int(deploy_cfg.get('port', 8000))}"

    def alive() -> str | None:
        container.reload()
        if container.status in ("exited", "dead"):
            tail = container.logs(tail=30)
            tail = tail.decode("utf-8", "replace") if isinstance(tail, bytes) else str(tail)
            return f"container {container.status}; last log lines:\n{_scrub(tail, api_key)}"
        return None

    try:
        ready_s = wait_ready(url, float(nim.get("ready_timeout_s", 1800)), alive=alive, interval_s=5.0)
        smoke_result = run_smoke(url, smoke, _auth_headers(deploy_cfg))
    except BaseException:
        log.error("NIM did not come up; leaving container %s for inspection (docker logs %s)", spec["name"], spec["name"])
        raise
    record = {
        "backend": "nim",
        "url": url,
        "ranking_url": f"{url}/v1/ranking",
        "rerank_url": None,
        "health_url": f"{url}/v1/health/ready",
        "host": host,
        "port": int(deploy_cfg.get("port", 8000)),
        "container_id": getattr(container, "id", None),
        "container_name": spec["name"],
        "image": spec["image"],
        "replaced_previous": replaced == "replaced",
        "model_name": smoke_result["model_id"],
        "model_path": str(model_file),
        "model_sha256": sha256_file(model_file),
        "export_dir": str(export_dir),
        "max_length": int(reranker_cfg.get("max_length", 512)),
        "prompt_template": reranker_cfg.get("prompt_template"),
        "input_format": input_format,
        "started_at": _now(),
        "ready_after_s": round(ready_s, 2),
        "health": "ready",
        "smoke": smoke_result,
    }
    write_json(endpoint_file, record)
    return record


# ------------------------------------------------------------------ entry points
def deploy(
    model: str | os.PathLike,
    eval_dir: str | os.PathLike,
    endpoint_file: str | os.PathLike,
    deploy_cfg: dict,
    reranker_cfg: dict,
    *,
    server_log: str | os.PathLike = "logs/deploy_server.log",
    state_file: str | os.PathLike | None = None,
    docker_client=None,
) -> dict:
    """The deploy rule: dispatch on ``deploy.backend`` (``builtin`` or ``nim``)."""
    backend = deploy_cfg.get("backend", "builtin")
    if backend == "builtin":
        return deploy_builtin(model, eval_dir, endpoint_file, deploy_cfg, reranker_cfg, server_log=server_log, state_file=state_file)
    if backend == "nim":
        return deploy_nim(model, eval_dir, endpoint_file, deploy_cfg, reranker_cfg, client=docker_client)
    raise InputError(f"unknown backend {backend!r}; expected builtin or nim", key="deploy.backend")


def stop_record(record: dict, *, timeout_s: float = 20.0, docker_client=None) -> dict:
    """Stop what ``record`` (an endpoint.json) describes, and only that."""
    result: dict[str, Any] = {"backend": record.get("backend"), "url": record.get("url"), "stopped_at": _now()}
    if record.get("backend") == "builtin":
        pid = int(record["pid"])
        result["pid"] = pid
        ours, why = process_is_ours(pid, record)
        if not ours:
            result.update(status="not_running", reason=why)
            return result
        result["status"] = _terminate(pid, record, timeout_s)
        return result
    if record.get("backend") == "nim":
        import docker

        client = docker_client or docker.from_env()
        ref = record.get("container_id") or record.get("container_name")
        result["container"] = ref
        try:
            c = client.containers.get(ref)
        except docker.errors.NotFound:
            result.update(status="not_running", reason="container not found")
            return result
        if _labels(c).get(LABEL_KEY) != LABEL_VALUE:
            result.update(status="refused", reason="container does not carry the rerankflow label; left alone")
            return result
        c.stop()
        c.remove()
        result["status"] = "stopped"
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
