"""Choose a scoring path by parity with fp32 on real pairs, and record the choice.

The **parity check** scores a sample of the real candidate pairs (:func:`parity_sample`) with the
reference path ``torch_fp32`` and with a candidate path and compares them (:func:`parity_figures`).
A path **passes** (:func:`passes`) when, over the sample, every logit is finite and
``max |logit - fp32 logit| <= max_abs_logit_diff``. That bounds how far any score moves, so what it
allows to change in a ranking is stated too: a logit error of at most d cannot swap two candidates
whose fp32 logits are more than 2d apart; only near-ties may swap. The ranking agreement (per-query
Kendall tau of the candidates' order, whether each query's top candidate is the same) is measured and
recorded beside it, not tested: it counts swaps of near-tied irrelevant candidates (logits of -11.00
and -11.02) as much as swaps at the top.

:func:`choose_scoring_path` applies ``eval.scoring_path``: a concrete path is used as asked (for
one other than ``torch_fp32`` the parity figures are measured, recorded, and a failure is logged as
a warning); ``auto`` tries :func:`rerankflow.scoring.paths.auto_candidates` fastest first and uses
the first that passes, else falls back to ``torch_fp32`` and says so (log and record). The
**record** (``eval_results.json`` ``meta.scoring``) names the requested and used path, each tried
candidate with its parity figures and its speed on the sample, the tolerance and whether it fell back.

A decision is stored (:func:`save_decision`) under a key of the checkpoint's content, the scoring
settings, the request, the candidates, the tolerance and the sample's pairs (:func:`decision_key`),
so a re-evaluation whose scores are all cached loads no model at all, and one with new pairs scores
them along the path chosen before.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.io import write_json
from rerankflow.scoring.paths import REFERENCE_PATH
from rerankflow.scoring.score_cache import checkpoint_digest, pair_key

log = logging.getLogger(__name__)

# candidates per sampled query: the first stage's top ones, where the reranker's order decides the metrics
PER_QUERY = 8


@dataclass(frozen=True)
class ParityTolerance:
    """How close to fp32 a path's scores must be (module docstring)."""

    max_abs_logit_diff: float


def parity_sample(keys: Sequence[tuple[str, str]], candidates: dict, *, n_pairs: int, seed: int,
                  per_query: int = PER_QUERY) -> list[list[int]]:
    """Groups of indices into ``keys`` (the ``(qid, doc_id)`` of the candidate pairs): one group per sampled
    query holding its first-stage top ``per_query`` candidates, ``n_pairs // per_query`` queries (at least 1)
    drawn with ``seed`` among those with two or more candidates. ``candidates``: ``{qid: {doc_id: first-stage score}}``."""
    index = {k: i for i, k in enumerate(keys)}
    eligible = sorted(q for q, docs in candidates.items() if len(docs) >= 2)
    n_queries = min(len(eligible), max(1, int(n_pairs) // per_query))
    groups = []
    for qid in random.Random(seed).sample(eligible, n_queries):
        docs = sorted(candidates[qid], key=lambda d: (-candidates[qid][d], d))[:per_query]
        groups.append([index[(qid, d)] for d in docs])
    return groups


def parity_figures(reference: np.ndarray, candidate: np.ndarray, groups: Sequence[Sequence[int]]) -> dict:
    """``{pairs, queries, all_finite, max_abs_logit_diff, mean_abs_logit_diff, kendall_tau_mean, kendall_tau_min,
    same_top1_fraction}`` of ``candidate`` against ``reference`` (both aligned with the flattened ``groups``)."""
    from scipy.stats import kendalltau

    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    finite = bool(np.all(np.isfinite(candidate)))
    diff = np.abs(reference - candidate)
    taus, top1, start = [], [], 0
    for g in groups:
        n = len(g)
        r, c = reference[start:start + n], candidate[start:start + n]
        start += n
        taus.append(float(kendalltau(r, c).statistic) if n >= 2 else float("nan"))
        if n:
            top1.append(bool(np.argmax(r) == np.argmax(c)))
    taus = [t for t in taus if np.isfinite(t)]  # a query whose scores are all tied has no order to compare
    return {
        "pairs": int(len(reference)),
        "queries": len(groups),
        "all_finite": finite,
        "max_abs_logit_diff": round(float(diff.max()), 6) if diff.size and finite else float("inf"),
        "mean_abs_logit_diff": round(float(diff.mean()), 6) if diff.size and finite else float("inf"),
        "kendall_tau_mean": round(float(np.mean(taus)), 6) if taus else None,
        "kendall_tau_min": round(float(np.min(taus)), 6) if taus else None,
        "same_top1_fraction": round(float(np.mean(top1)), 6) if top1 else None,
    }


def passes(figures: dict, tolerance: ParityTolerance) -> tuple[bool, str]:
    """``(passed, reason)`` of parity figures against ``tolerance`` (module docstring)."""
    if not figures["all_finite"]:
        return False, "non-finite logits"
    if figures["max_abs_logit_diff"] > tolerance.max_abs_logit_diff:
        return False, (f"max |logit diff| {figures['max_abs_logit_diff']:.4g} > {tolerance.max_abs_logit_diff:g}")
    return True, "within tolerance"


def decision_key(checkpoint, *, settings: dict, requested: str, candidates: Sequence[str], tolerance: ParityTolerance,
                 sample_pairs: Sequence[tuple[str, str]], device: str) -> str:
    """Hex key of a path decision (module docstring): what it was decided for and on."""
    h = hashlib.sha256(checkpoint_digest(checkpoint).encode())
    h.update(json.dumps({"settings": settings, "requested": requested, "candidates": list(candidates),
                         "tolerance": asdict(tolerance), "device": str(device).split(":")[0]}, sort_keys=True).encode())
    for q, p in sample_pairs:
        h.update(pair_key(q, p).encode())
    return h.hexdigest()


def decision_file(cache_dir, key: str) -> Path:
    return Path(cache_dir) / "scoring_paths" / f"{key[:24]}.json"


def load_decision(cache_dir, key: str) -> dict | None:
    """The stored record of decision ``key``, or None (missing, unreadable or of another key)."""
    path = decision_file(cache_dir, key)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc["record"] if doc.get("key") == key else None


def save_decision(cache_dir, key: str, record: dict) -> None:
    write_json(decision_file(cache_dir, key), {"key": key, "record": record})


def _timed_score(scorer, pairs) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    scores = scorer.score(pairs, sort_by_length=True, progress=False)
    return np.asarray(scores, dtype=np.float64), time.perf_counter() - t0


def choose_scoring_path(requested: str, *, load: Callable[[str], tuple[object, dict]], candidates: Sequence[str],
                        sample_pairs: Sequence[tuple[str, str]], groups: Sequence[Sequence[int]],
                        tolerance: ParityTolerance, name: str) -> tuple[object, dict]:
    """``(scorer, record)`` for ``eval.scoring_path`` = ``requested`` (module docstring).

    ``load(path) -> (scorer, info)`` builds a scorer of the checkpoint along a concrete path
    (:func:`rerankflow.scoring.paths.load_path_scorer`); ``candidates`` are the paths ``auto`` tries,
    fastest first; ``sample_pairs`` are the sample's pairs, flattened in the order of ``groups``
    (whose indices are only used for their sizes here). ``name`` labels log lines (e.g. ``base``).
    """
    sizes = [range(len(g)) for g in groups]
    label = f"{name}: " if name else ""
    record = {"requested": requested, "used": None, "reference": REFERENCE_PATH, "tolerance": asdict(tolerance),
              "sample": {"pairs": len(sample_pairs), "queries": len(groups), "per_query": PER_QUERY},
              "tried": [], "fallback": False, "note": None}
    t0 = time.perf_counter()
    order = [] if requested == REFERENCE_PATH else list(candidates) if requested == "auto" else [requested]
    ref_scorer, ref_info = load(REFERENCE_PATH)
    if not order:
        record.update(used=REFERENCE_PATH, info=ref_info, sample=None, choice_s=round(time.perf_counter() - t0, 3),
                      note="the fp32 reference: no parity check needed" if requested == REFERENCE_PATH
                      else "no faster path to try on this device: scoring in torch_fp32")
        return ref_scorer, record
    ref, ref_s = _timed_score(ref_scorer, sample_pairs)
    record["reference_sample_pairs_per_s"] = round(len(sample_pairs) / max(ref_s, 1e-9), 2)
    chosen = None
    for path in order:
        entry = {"path": path}
        try:
            scorer, info = load(path)
        except (InputError, ImportError, RuntimeError) as exc:
            if requested != "auto":
                raise
            entry.update(available=False, reason=str(exc))
            record["tried"].append(entry)
            log.info("%sscoring path %s is not available here: %s", label, path, exc)
            continue
        scorer.score(sample_pairs[:1], sort_by_length=True, progress=False)  # warm-up, not timed
        scores, secs = _timed_score(scorer, sample_pairs)
        figures = parity_figures(ref, scores, sizes)
        ok, reason = passes(figures, tolerance)
        entry.update(available=True, info=info, parity=figures, passed=ok, reason=reason,
                     sample_pairs_per_s=round(len(sample_pairs) / max(secs, 1e-9), 2))
        record["tried"].append(entry)
        log.info("%sscoring path %s vs fp32 on %d real pairs: %s (%s)", label, path, len(sample_pairs),
                 "passed" if ok else "FAILED", reason)
        if ok or requested != "auto":
            if not ok:
                log.warning("%sscoring path %s was asked for explicitly and is used although it fails parity with fp32: %s",
                            label, path, reason)
            chosen = (scorer, path, info)
            break
        del scorer
        gc.collect()
    if chosen is None:
        record.update(used=REFERENCE_PATH, info=ref_info, fallback=True,
                      note="no faster path passed parity with fp32 on the sample: scoring in torch_fp32")
        log.warning("%s%s", label, record["note"])
        record["choice_s"] = round(time.perf_counter() - t0, 3)
        return ref_scorer, record
    scorer, path, info = chosen
    del ref_scorer
    gc.collect()
    record.update(used=path, info=info, choice_s=round(time.perf_counter() - t0, 3))
    return scorer, record
