"""The ``nim`` backend: NVIDIA's NIM container through the Docker SDK for Python.

Started with the settings of NVIDIA's recipe: image, GPUs (``DeviceRequest``), shared memory, user,
the HTTP port bound to ``deploy.host``, ``NGC_API_KEY`` passed through the container environment
(read from the variable named by ``nim.api_key_env``; never written to any file or log), the export
mounted read-only and named by ``NIM_CUSTOM_MODEL``, a cache volume, and the label
``io.rerankflow.managed=true``. A container of the same name is replaced only when it carries our
label and ``nim.replace_existing`` is true; an unlabelled one is never touched, not even by stop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rerankflow.deploy.process import client_host, now_utc
from rerankflow.deploy.smoke import auth_headers, build_smoke_request, run_smoke, wait_ready
from rerankflow.errors import InputError
from rerankflow.io import sha256_file, write_json
from rerankflow.scoring.export_record import resolve_text_settings
from rerankflow.scoring.onnx_scorer import find_model_file

log = logging.getLogger(__name__)

LABEL_KEY = "io.rerankflow.managed"
LABEL_VALUE = "true"
NIM_MODEL_MOUNT = "/opt/nim/custom_model"
NIM_CACHE_MOUNT = "/opt/nim/.cache"
NIM_CONTAINER_PORT = 8000


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
    nim = deploy_cfg["nim"]
    host = deploy_cfg["host"]
    port = int(deploy_cfg["port"])
    cache_dir = Path(os.path.expanduser(nim["cache_dir"])).resolve()
    user = nim["user"]
    if user is None and hasattr(os, "getuid"):
        user = f"{os.getuid()}"
    spec = {
        "image": nim["image"],
        "name": nim["container_name"],
        "detach": True,
        "labels": {LABEL_KEY: LABEL_VALUE, "io.rerankflow.stage": "deploy"},
        "device_requests": [_device_request(nim["gpus"])],
        "shm_size": nim["shm_size"],
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
    smoke_first_stage: tuple[str, dict[str, float]] | None = None,
) -> dict:
    """Start the NIM container for the export folder of ``model``; wait, smoke-test, record."""
    nim = deploy_cfg["nim"]
    key_env = nim["api_key_env"]
    api_key = os.environ.get(key_env, "")
    if not api_key:
        raise InputError(f"the NIM backend needs an NGC API key in environment variable {key_env}", key="deploy.nim.api_key_env")
    model_file = find_model_file(model).absolute()
    export_dir = model_file.parent
    max_length, template, input_format = resolve_text_settings(model_file, reranker_cfg.get("max_length"), reranker_cfg.get("prompt_template"),
                                                    reranker_cfg.get("input_format"))
    smoke = build_smoke_request(eval_dir, int(deploy_cfg["smoke_passages"]), smoke_first_stage)
    if client is None:
        import docker

        client = docker.from_env()
    spec = nim_container_spec(export_dir, deploy_cfg, api_key)
    cache_host_dir = next(k for k, v in spec["volumes"].items() if v["bind"] == NIM_CACHE_MOUNT)
    Path(cache_host_dir).mkdir(parents=True, exist_ok=True)  # so the container user (not root) owns it
    replaced = ensure_name_free(client, spec["name"], bool(nim["replace_existing"]))
    log.info("starting NIM container: %s", json.dumps(redact_spec(spec), default=str))
    container = client.containers.run(**spec)
    host = deploy_cfg["host"]
    url = f"http://{client_host(host)}:{int(deploy_cfg['port'])}"

    def alive() -> str | None:
        container.reload()
        if container.status in ("exited", "dead"):
            tail = container.logs(tail=30)
            tail = tail.decode("utf-8", "replace") if isinstance(tail, bytes) else str(tail)
            return f"container {container.status}; last log lines:\n{_scrub(tail, api_key)}"
        return None

    try:
        ready_s = wait_ready(url, float(nim["ready_timeout_s"]), alive=alive, interval_s=5.0)
        smoke_result = run_smoke(url, smoke, auth_headers(deploy_cfg), check_fusion=False)  # NIM: no first_stage_score
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
        "port": int(deploy_cfg["port"]),
        "container_id": getattr(container, "id", None),
        "container_name": spec["name"],
        "image": spec["image"],
        "replaced_previous": replaced == "replaced",
        "model_name": smoke_result["model_id"],
        "model_path": str(model_file),
        "model_sha256": sha256_file(model_file),
        "export_dir": str(export_dir),
        "max_length": max_length,
        "prompt_template": template,
        "input_format": input_format,
        "started_at": now_utc(),
        "ready_after_s": round(ready_s, 2),
        "health": "ready",
        "smoke": smoke_result,
    }
    write_json(endpoint_file, record)
    return record


def stop_nim(record: dict, *, docker_client=None) -> dict:
    """Stop and remove the container of a nim endpoint record, only when it carries our label."""
    import docker

    client = docker_client or docker.from_env()
    ref = record.get("container_id") or record.get("container_name")
    result = {"container": ref}
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
