"""Benchmark: first-stage indexing and search (flat, HNSW, BM25) and hard-negative mining at 10k, 100k, 1M passages.

    nice python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--methods flat hnsw bm25 mining]
                                          [--queries 1000] [--seed 0] [--skip 1000000:hnsw] [--json out.json]

Corpora are **generated, deterministic and not downloaded** (:func:`passage_embeddings`,
:func:`passage_texts`, :func:`queries_for`): the same ``(size, seed)`` gives byte-identical texts and
vectors, and a smaller corpus is a prefix of a larger one (generation works in blocks of ``GEN_BLOCK`` rows,
each seeded by ``(seed, block)``).

* **Dense** vectors are synthetic, not encoder outputs: 384-dimensional (MiniLM's size), L2-normalised,
  drawn around ``TOPICS`` seeded topic centroids so neighbourhoods exist (HNSW is not measured on
  structureless noise), with ``DUP_RATE`` of the passages planted as near-duplicates (cosine ~0.995) of an
  earlier passage. A query is its target passage's vector plus noise (cosine ~0.8 to it); ``QUERY_ON_DUP``
  of the queries target a passage that has a near-duplicate, which mining must drop as a likely false
  negative (the margin path does real work).
* **BM25** runs over generated text: words of a seeded syllable vocabulary drawn from a Zipf-Mandelbrot
  distribution (exponent ``ZIPF_S``), 20-79 words a passage, so postings lists are skewed like real text.
  A query is 5 words of its target passage plus 2 words drawn from the same distribution.
* **The encoder's cost is excluded.** Embedding is linear in the corpus (one forward pass per passage,
  batched): MiniLM-L6 embeds ~26 passages/s on this 2-core VM (SciFact, benchmarks/RESULTS.md, stage 1), so
  1M passages would take ~11 hours here before any index is built, and 1M x 384 float32 vectors are 1.5 GB.
  This benchmark measures the machinery after it: the package's own functions, not reimplementations —
  :func:`rerankflow.retrieval.embedding.search` (exact, corpus in blocks, via ``Retriever.search``),
  :func:`rerankflow.retrieval.retriever.build_hnsw_index` + the search ``hnsw_search`` does,
  :class:`rerankflow.retrieval.bm25.BM25Index` (build + retrieve), and
  :func:`rerankflow.prep.mining.mine_hard_negatives` with a ``Retriever`` whose embed methods return the
  precomputed vectors (:class:`PrecomputedRetriever`; search and the mining rule are the package's).

Each ``(size, method)`` runs in a fresh subprocess, so its peak RSS (``ru_maxrss`` of the child) is its own;
``data MB`` is the child's peak right after generating its inputs, so ``peak - data`` is what the method
itself added. FAISS is warmed up with one tiny search before timing (a one-off ~1.3 s per process). ``load``
is the 1-minute load average when the child finished (the VM is shared). Progress bars of the package (tqdm) go to stderr, as in a rule log. Times are wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = (10_000, 100_000, 1_000_000)
METHODS = ("flat", "hnsw", "bm25", "mining")
DIM = 384
GEN_BLOCK = 10_000
TOPICS = 1_000
TOPIC_WEIGHT = 1.0        # passage = TOPIC_WEIGHT * centroid + unit noise, normalised
DUP_RATE = 0.02
DUP_NOISE = 0.1
QUERY_NOISE = 0.8
QUERY_ON_DUP = 0.2
VOCAB = 50_000
ZIPF_S, ZIPF_Q = 1.1, 2.7
WORDS_MIN, WORDS_MAX = 20, 80
TOP_K = 100
SEARCH_BLOCK = 4096       # retrieval.search_block_size's default
HNSW_M, HNSW_EF = 32, 256  # eval.hnsw_m / eval.hnsw_ef_search defaults
MINING = {"num_negatives": 8, "margin": 0.95, "depth": 100, "skip": 0, "keep_all": False}  # prep defaults (no rank range, no teacher pool)


# ---------------------------------------------------------------------------------------------- generator
def _rng(seed: int, *tags: int) -> np.random.Generator:
    """A generator seeded by ``(seed, *tags)``: independent streams per block and per purpose."""
    return np.random.default_rng([int(seed), *map(int, tags)])


def _centroids(seed: int) -> np.ndarray:
    """``TOPICS`` unit topic centroids, ``[TOPICS, DIM]`` float32."""
    c = _rng(seed, 1 << 30).standard_normal((TOPICS, DIM), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _block_duplicates(seed: int, block: int) -> dict[int, int]:
    """Planted near-duplicates of block ``block``: ``{row: earlier row it copies}``, global row numbers."""
    rng = _rng(seed, block, 2)
    is_dup = rng.random(GEN_BLOCK) < DUP_RATE
    src = (rng.random(GEN_BLOCK) * np.arange(GEN_BLOCK)).astype(np.int64)  # uniform over earlier rows
    base = block * GEN_BLOCK
    return {base + j: base + int(src[j]) for j in np.flatnonzero(is_dup) if j > 0}


def duplicates(n: int, seed: int) -> dict[int, int]:
    """Every planted near-duplicate of an ``n``-passage corpus: ``{row: source row}`` (source < row)."""
    out: dict[int, int] = {}
    for block in range((n + GEN_BLOCK - 1) // GEN_BLOCK):
        out.update({j: s for j, s in _block_duplicates(seed, block).items() if j < n})
    return out


def passage_embeddings(n: int, seed: int) -> np.ndarray:
    """``[n, DIM]`` float32 L2-normalised passage vectors (see module docstring); deterministic in ``(n, seed)``."""
    centroids = _centroids(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for block in range((n + GEN_BLOCK - 1) // GEN_BLOCK):
        rng = _rng(seed, block, 0)
        topics = rng.integers(0, TOPICS, GEN_BLOCK)
        emb = TOPIC_WEIGHT * centroids[topics] + rng.standard_normal((GEN_BLOCK, DIM), dtype=np.float32) / np.sqrt(DIM)
        for j, s in _block_duplicates(seed, block).items():
            jj, ss = j - block * GEN_BLOCK, s - block * GEN_BLOCK
            emb[jj] = emb[ss] + DUP_NOISE * rng.standard_normal(DIM, dtype=np.float32) / np.sqrt(DIM)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        start = block * GEN_BLOCK
        rows = min(GEN_BLOCK, n - start)
        out[start:start + rows] = emb[:rows]
    return out


def vocabulary(seed: int) -> list[str]:
    """``VOCAB`` distinct pseudo-words of 2-4 syllables (4+ letters: no English stopword), seeded."""
    rng = _rng(seed, 1 << 29)
    onsets = list("bcdfghjklmnprstvwz") + ["br", "cr", "dr", "st", "tr", "pl", "gr", "sh", "ch", "th"]
    syllables = [o + v for o in onsets for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < VOCAB:
        w = "".join(syllables[i] for i in rng.integers(0, len(syllables), int(rng.integers(2, 5))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _zipf_cdf() -> np.ndarray:
    p = 1.0 / (np.arange(VOCAB) + ZIPF_Q) ** ZIPF_S
    return np.cumsum(p / p.sum())


def _zipf_words(rng: np.random.Generator, count: int, cdf: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(count)), VOCAB - 1)


def passage_texts(n: int, seed: int) -> list[str]:
    """``n`` generated passages (see module docstring); deterministic in ``(n, seed)``.

    A planted near-duplicate (:func:`duplicates`) is its source's text with the last word replaced.
    """
    vocab, cdf = vocabulary(seed), _zipf_cdf()
    out: list[str] = []
    for block in range((n + GEN_BLOCK - 1) // GEN_BLOCK):
        rng = _rng(seed, block, 1)
        lengths = rng.integers(WORDS_MIN, WORDS_MAX, GEN_BLOCK)
        ranks = _zipf_words(rng, int(lengths.sum()), cdf).tolist()
        ends = np.cumsum(lengths).tolist()
        texts, start = [], 0
        for end in ends:
            texts.append(" ".join([vocab[r] for r in ranks[start:end]]))
            start = end
        for j, s in _block_duplicates(seed, block).items():
            jj, ss = j - block * GEN_BLOCK, s - block * GEN_BLOCK
            texts[jj] = texts[ss].rsplit(" ", 1)[0] + " " + vocab[int(rng.integers(0, VOCAB))]
        out.extend(texts[:n - block * GEN_BLOCK])
    return out


def query_targets(n: int, n_queries: int, seed: int) -> np.ndarray:
    """The passage each query is about: ``QUERY_ON_DUP`` of them a passage with a planted near-duplicate."""
    rng = _rng(seed, 1 << 28)
    sources = np.array(sorted(set(duplicates(n, seed).values())), dtype=np.int64)
    targets = rng.integers(0, n, n_queries)
    on_dup = rng.random(n_queries) < QUERY_ON_DUP
    if len(sources):
        targets[on_dup] = sources[rng.integers(0, len(sources), int(on_dup.sum()))]
    return targets


def query_embeddings(passage_emb: np.ndarray, targets: np.ndarray, seed: int) -> np.ndarray:
    """Query vectors: the target's vector plus noise, normalised (cosine ~0.8 to the target)."""
    rng = _rng(seed, 1 << 27)
    q = passage_emb[targets] + QUERY_NOISE * rng.standard_normal((len(targets), DIM), dtype=np.float32) / np.sqrt(DIM)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def query_texts(texts: list[str], targets: np.ndarray, seed: int) -> list[str]:
    """Query texts: 5 words of the target passage plus 2 words drawn from the corpus distribution."""
    rng, vocab, cdf = _rng(seed, 1 << 26), vocabulary(seed), _zipf_cdf()
    out = []
    for t in targets.tolist():
        words = texts[t].split()
        picked = [words[i] for i in rng.choice(len(words), 5, replace=False)]
        out.append(" ".join(picked + [vocab[r] for r in _zipf_words(rng, 2, cdf)]))
    return out


# ---------------------------------------------------------------------------------------------- methods
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_faiss() -> None:
    """One tiny search first: FAISS/BLAS's one-off start-up (~1.3 s here) is not charged to the first size."""
    from rerankflow.retrieval.embedding import search

    x = _rng(0, 1).standard_normal((256, DIM), dtype=np.float32)
    search(x[:8], x, 10, SEARCH_BLOCK)


def precomputed_retriever(passage_emb: np.ndarray, query_emb: np.ndarray, index: str = "flat"):
    """A :class:`rerankflow.retrieval.retriever.Retriever` whose embed methods return the given vectors."""
    from rerankflow.formatting import Prefixes
    from rerankflow.retrieval.retriever import Retriever

    class PrecomputedRetriever(Retriever):
        """Embedding replaced by lookup; search (and whatever calls it) is the package's own."""

        def embedder(self):
            return None

        def embed_passages(self, ids, texts):
            return passage_emb

        def embed_queries(self, texts):
            return query_emb

    return PrecomputedRetriever(model_name="synthetic", prefixes=Prefixes("", ""), max_length=0, batch_size=0,
                                cache_dir=None, block_size=SEARCH_BLOCK, device="cpu", index=index,
                                hnsw_m=HNSW_M, hnsw_ef_search=HNSW_EF)


def _dense_inputs(n: int, n_queries: int, seed: int):
    """``(passage embeddings, query targets, query embeddings, RSS MB once they are built and FAISS is warm)``:
    the inputs every dense measurement starts from, so its time and memory exclude them."""
    emb = passage_embeddings(n, seed)
    targets = query_targets(n, n_queries, seed)
    q = query_embeddings(emb, targets, seed)
    _warm_faiss()
    return emb, targets, q, _peak_rss_mb()


def run_flat(n: int, n_queries: int, seed: int) -> dict:
    """Exact search (``Retriever.search``, index flat): no index to build, the corpus walked in blocks."""
    emb, targets, q, data_mb = _dense_inputs(n, n_queries, seed)
    t0 = time.perf_counter()
    scores, idx = precomputed_retriever(emb, q).search(q, emb, TOP_K)
    t1 = time.perf_counter()
    return {"data_mb": data_mb, "index_s": 0.0, "search_s": t1 - t0,
            "check": {"target_at_1": round(float(np.mean(idx[:, 0] == targets)), 3)}}


def run_hnsw(n: int, n_queries: int, seed: int) -> dict:
    """HNSW: :func:`build_hnsw_index` timed apart from the search ``hnsw_search`` runs; recall@10 vs exact."""
    from rerankflow.retrieval.embedding import search
    from rerankflow.retrieval.retriever import build_hnsw_index

    emb, targets, q, data_mb = _dense_inputs(n, n_queries, seed)
    t0 = time.perf_counter()
    index = build_hnsw_index(emb, HNSW_M)
    t1 = time.perf_counter()
    index.hnsw.efSearch = max(HNSW_EF, TOP_K)  # as hnsw_search sets it
    _, idx = index.search(q, TOP_K)
    t2 = time.perf_counter()
    sample = min(100, n_queries)
    _, exact = search(q[:sample], emb, 10, SEARCH_BLOCK)
    recall = np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(idx[:sample].tolist(), exact.tolist())])
    return {"data_mb": data_mb, "index_s": t1 - t0, "search_s": t2 - t1,
            "check": {"recall_at_10_vs_exact": round(float(recall), 3)}}


def run_bm25(n: int, n_queries: int, seed: int) -> dict:
    """BM25: ``BM25Index.build`` (tokenize, stem, index; no cache folder) then ``retrieve`` top 100."""
    from rerankflow.retrieval.bm25 import BM25Index, BM25Settings

    texts = passage_texts(n, seed)
    targets = query_targets(n, n_queries, seed)
    queries = {f"q{i}": t for i, t in enumerate(query_texts(texts, targets, seed))}
    ids = [f"d{i}" for i in range(n)]
    data_mb = _peak_rss_mb()
    settings = BM25Settings(k1=1.5, b=0.75, stemmer="english", stopwords="en")
    t0 = time.perf_counter()
    index = BM25Index.build(ids, texts, settings, None)
    t1 = time.perf_counter()
    run = index.retrieve(queries, TOP_K)
    t2 = time.perf_counter()
    hit = np.mean([f"d{t}" in run[f"q{i}"] for i, t in enumerate(targets.tolist())])
    return {"data_mb": data_mb, "index_s": t1 - t0, "search_s": t2 - t1,
            "check": {"target_in_top100": round(float(hit), 3)}}


def run_mining(n: int, n_queries: int, seed: int) -> dict:
    """``mine_hard_negatives`` (prep defaults: 8 negatives, margin 0.95, depth 100) on precomputed vectors."""
    from rerankflow.prep.mining import mine_hard_negatives

    ids = [f"d{i}" for i in range(n)]  # before the inputs' RSS is read, as part of them
    emb, targets, q, data_mb = _dense_inputs(n, n_queries, seed)
    t0 = time.perf_counter()
    # texts are not read: the precomputed retriever's embed methods ignore them
    res = mine_hard_negatives([""] * n_queries, [[int(t)] for t in targets], ids, ids, [lambda p: True] * n_queries,
                              retriever=precomputed_retriever(emb, q), **MINING)
    t1 = time.perf_counter()
    return {"data_mb": data_mb, "index_s": 0.0, "search_s": t1 - t0,
            "check": {"dropped_as_false_negative": res.dropped_as_false_negative, "short": res.short,
                      "negatives_per_query": round(float(np.mean([len(x) for x in res.negatives])), 2)}}


RUNNERS = {"flat": run_flat, "hnsw": run_hnsw, "bm25": run_bm25, "mining": run_mining}


def measure(n: int, method: str, n_queries: int, seed: int) -> dict:
    """Run one method on one size in this process; times in s, RSS in MB (peak of this process)."""
    t0 = time.perf_counter()
    r = RUNNERS[method](n, n_queries, seed)
    total = time.perf_counter() - t0
    return {"size": n, "method": method, "queries": n_queries, "generate_s": round(total - r["index_s"] - r["search_s"], 2),
            "index_s": round(r["index_s"], 2), "search_s": round(r["search_s"], 2),
            "ms_per_query": round(1000 * r["search_s"] / n_queries, 3),
            "data_mb": round(r["data_mb"]), "peak_rss_mb": round(_peak_rss_mb()), "load": round(os.getloadavg()[0], 1),
            **r["check"]}


# ---------------------------------------------------------------------------------------------- driver
def measure_in_child(n: int, method: str, n_queries: int, seed: int, timeout: float) -> dict:
    """:func:`measure` in a fresh interpreter (stderr, the progress bars, passes through)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), method, "--queries", str(n_queries),
           "--seed", str(seed)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        return {"size": n, "method": method, "skipped": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"size": n, "method": method, "skipped": f"child exited {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """A markdown table of the measurements (skipped runs say why)."""
    head = ("| passages | method | index s | search s (1 query set) | ms/query | 20k-query est. s | data MB | peak RSS MB | check |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['size']:,} | {r['method']} | skipped: {r['skipped']} | | | | | | |")
            continue
        check = ", ".join(f"{k} {v}" for k, v in r.items() if k not in
                          {"size", "method", "queries", "generate_s", "index_s", "search_s", "ms_per_query", "data_mb",
                           "peak_rss_mb", "load"})
        lines.append(f"| {r['size']:,} | {r['method']} | {r['index_s']} | {r['search_s']} | {r['ms_per_query']} | "
                     f"{r['ms_per_query'] * 20:.0f} | {r['data_mb']} | {r['peak_rss_mb']} | {check} |")
    return "\n".join(lines)


def growth(rows: list[dict]) -> str:
    """Per method, the ratio of (index + search) time and of (peak - data) RSS between consecutive sizes."""
    out = []
    for method in METHODS:
        ok = sorted((r for r in rows if r["method"] == method and "skipped" not in r), key=lambda r: r["size"])
        for a, b in zip(ok, ok[1:]):
            ta, tb = a["index_s"] + a["search_s"], b["index_s"] + b["search_s"]
            ma, mb = max(a["peak_rss_mb"] - a["data_mb"], 1), max(b["peak_rss_mb"] - b["data_mb"], 1)
            out.append(f"{method}: {a['size']:,} -> {b['size']:,} passages (x{b['size'] / a['size']:.0f}): "
                       f"time x{tb / max(ta, 1e-9):.1f}, method RSS x{mb / ma:.1f}, peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.1f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[], help="SIZE:METHOD pairs not to run (said in the table)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per (size, method) child")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.queries, args.seed)), flush=True)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n in args.sizes:
        for method in args.methods:
            if f"{n}:{method}" in args.skip:
                rows.append({"size": n, "method": method, "skipped": "--skip"})
                continue
            rows.append(measure_in_child(n, method, args.queries, args.seed, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(growth(rows))


if __name__ == "__main__":
    main()
