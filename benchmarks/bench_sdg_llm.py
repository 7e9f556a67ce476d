"""Benchmark of the llm SDG backend's call machinery against the fake OpenAI-compatible server.

What it measures (no real model: the fake server answers after a fixed simulated latency, so the
figures are about concurrency, caching and retries, not about an LLM's speed):

1. bounded concurrency: documents/s with max_parallel_requests = 1 (the obvious sequential loop)
   versus 4 and 8, same documents, same latency;
2. resume from the cache: a re-run of the same generation (what happens after a kill) versus the
   fresh run — requests sent and wall time;
3. a rate-limited server (every 4th request answered 429 with Retry-After: 0.2 s): documents/s and
   retries counted.

Usage: PYTHONPATH=. python benchmarks/bench_sdg_llm.py [--docs 24] [--latency 0.25]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.sdg.corpus import Document  # noqa: E402
from rerankflow.sdg.llm import generate_llm  # noqa: E402

TEXT = ("Sentence number {i} of document {d} talks about topic {d} in detail. " * 12).strip()


def cfg(server, cache, parallel):
    return load_config({"sdg": {"num_pairs": 4, "sentences_per_chunk": 3, "llm": {
        "base_url": server.base_url, "api_key_env": "BENCH_KEY", "max_parallel_requests": parallel,
        "cache_dir": str(cache), "round_trip_filter": False, "retry_backoff_initial": 0.05, "timeout": 10}}})["sdg"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--latency", type=float, default=0.25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["BENCH_KEY"] = "bench-dummy-key"
    docs = [Document(f"d{d}", f"d{d}.txt", " ".join(TEXT.format(i=i, d=d) for i in range(3))) for d in range(args.docs)]
    server = FakeOpenAIServer().start()
    print(f"{args.docs} documents, 2 calls each, simulated latency {args.latency:.2f} s per call")
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for par in (1, 4, 8):
            server.delay = args.latency
            dt, nreq, _ = run_with_delay(server, docs, Path(tmp) / f"cache{par}", par, args.latency)
            times[par] = dt
            print(f"max_parallel_requests={par}: {dt:6.2f} s, {args.docs / dt:6.2f} docs/s, {nreq} requests")
        print(f"speed-up parallel 4 vs 1: {times[1] / times[4]:.2f}x; 8 vs 1: {times[1] / times[8]:.2f}x")
        dt_fresh = times[4]
        dt_re, nreq_re, summ = run_with_delay(server, docs, Path(tmp) / "cache4", 4, args.latency)
        print(f"re-run from cache: {dt_re:6.2f} s, {nreq_re} requests, {summ['cache_hits']} cache hits "
              f"(fresh run {dt_fresh:.2f} s: {dt_fresh / max(dt_re, 1e-6):.0f}x faster, 0 calls repeated)")
        server.reset()
        server.delay = args.latency
        server.retry_after = "0.2"
        server.inject = ["429" if i % 4 == 3 else None for i in range(4 * args.docs)]
        t0 = time.perf_counter()
        _recs, summ = generate_llm(docs, cfg(server, Path(tmp) / "cache_rl", 4), load_config()["retrieval"], 0,
                                   device="cpu")
        dt = time.perf_counter() - t0
        print(f"rate-limited server (every 4th request 429, Retry-After 0.2 s), parallel 4: {dt:6.2f} s, "
              f"{args.docs / dt:6.2f} docs/s, retries {summ['retries']} {summ['retry_reasons']}, "
              f"documents failed {summ['documents_failed']}; vs unthrottled {times[4]:.2f} s: "
              f"{dt / times[4]:.2f}x slower")
    server.stop()


def run_with_delay(server, docs, cache, parallel, latency):
    server.reset()
    server.delay = latency
    t0 = time.perf_counter()
    _recs, summary = generate_llm(docs, cfg(server, cache, parallel), load_config()["retrieval"], 0, device="cpu")
    return time.perf_counter() - t0, len(server.requests), summary


if __name__ == "__main__":
    main()
