"""benchmarks/bench_scale.py: its corpus generator is deterministic, and a tiny size runs every method end to end
through the code path the benchmark times (figures sane; no timing asserted)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
bench_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_scale)


def test_generator_is_deterministic_in_the_seed():
    n = 3_000
    emb_a, emb_b, emb_c = (bench_scale.passage_embeddings(n, s) for s in (1, 1, 2))
    text_a, text_b, text_c = (bench_scale.passage_texts(n, s) for s in (1, 1, 2))
    assert np.array_equal(emb_a, emb_b) and text_a == text_b
    assert not np.array_equal(emb_a, emb_c) and text_a != text_c
    assert emb_a.shape == (n, bench_scale.DIM) and emb_a.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb_a, axis=1), 1.0, atol=1e-5)
    targets = bench_scale.query_targets(n, 50, 1)
    assert np.array_equal(targets, bench_scale.query_targets(n, 50, 1))
    assert np.array_equal(bench_scale.query_embeddings(emb_a, targets, 1), bench_scale.query_embeddings(emb_b, targets, 1))
    assert bench_scale.query_texts(text_a, targets, 1) == bench_scale.query_texts(text_b, targets, 1)


def test_smaller_corpus_is_a_prefix_of_a_larger_one_and_has_planted_duplicates():
    small, large = bench_scale.passage_embeddings(2_000, 0), bench_scale.passage_embeddings(12_000, 0)
    assert np.array_equal(small, large[:2_000])
    assert bench_scale.passage_texts(2_000, 0) == bench_scale.passage_texts(12_000, 0)[:2_000]
    dups = bench_scale.duplicates(12_000, 0)
    assert dups and all(src < row for row, src in dups.items())
    cos = [float(large[row] @ large[src]) for row, src in dups.items()]
    assert min(cos) > 0.98  # near-duplicates, as the mining margin needs


@pytest.mark.parametrize("method", bench_scale.METHODS)
def test_tiny_size_runs_end_to_end(method):
    row = bench_scale.measure(2_000, method, 40, seed=0)
    assert row["size"] == 2_000 and row["method"] == method and row["queries"] == 40
    # search_s is printed to 0.01 s, and a warm 2,000-passage search can take under 5 ms (then 0.0): the
    # per-query figure comes from the unrounded time
    assert row["index_s"] >= 0 and row["search_s"] >= 0 and row["ms_per_query"] > 0
    assert 0 < row["data_mb"] <= row["peak_rss_mb"]
    checks = {"flat": ("target_at_1", 0.8), "hnsw": ("recall_at_10_vs_exact", 0.9), "bm25": ("target_in_top100", 0.8)}
    if method in checks:
        key, floor = checks[method]
        assert row[key] >= floor
    else:
        assert row["negatives_per_query"] == 8.0 and row["short"] == 0
        assert row["dropped_as_false_negative"] > 0  # the planted near-duplicates went through the margin


def test_driver_runs_a_child_and_prints_the_table():
    row = bench_scale.measure_in_child(2_000, "bm25", 20, 0, timeout=300)
    assert "skipped" not in row and row["size"] == 2_000
    text = bench_scale.table([row, {"size": 10, "method": "hnsw", "skipped": "--skip"}])
    assert "| 2,000 | bm25 |" in text and "skipped: --skip" in text
