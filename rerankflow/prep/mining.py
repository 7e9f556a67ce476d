"""Hard-negative mining from the chosen first stage: a bi-encoder with FAISS, BM25, a hybrid or a run file.

:func:`mine_hard_negatives` is the dense path (``retrieval.first_stage: dense``);
:func:`mine_from_first_stage` mines from the ranking of any other first stage with the same rule.

For each training query: score the corpus (a flat :class:`rerankflow.retrieval.retriever.Retriever`:
exact inner product, in blocks), mask its positives,
drop candidates that are not allowed as negatives (passages of the test split, so evaluation
passages never leak into training), drop candidates scoring above ``margin x (lowest positive
score)`` as likely false negatives, and keep the hardest ``num_negatives`` (NV-Retriever's
"TopK-PercPos" rule with NVIDIA's default margin 0.95). Optionally the first ``skip`` ranks are never
negatives (sentence-transformers' ``range_min``), and :func:`teacher_denoise` drops the candidates a
cross-encoder teacher scores near or above the query's positives before the hardest are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from rerankflow.retrieval.retriever import Retriever

log = logging.getLogger(__name__)


@dataclass
class MiningResult:
    """Per query: positives and negatives as ``(passage index, score)``, best first."""

    positives: list[list[tuple[int, float]]]
    negatives: list[list[tuple[int, float]]]
    short: int = 0  # queries that got fewer negatives than asked for
    dropped_as_false_negative: int = 0
    stats: dict = field(default_factory=dict)
    teacher_dropped: list[list[tuple[int, float]]] | None = None  # per query, when a teacher denoised
    teacher_reference: list[float] | None = None
    teacher_logits: list[dict[int, float]] | None = None  # per query: passage index -> teacher logit, as scored


def select_negatives(candidates: Sequence[tuple[int, float]], positives: set[int], min_pos_score: float,
                     margin: float, num_negatives: int | None, allowed: Callable[[int], bool],
                     skip: int = 0) -> tuple[list[tuple[int, float]], int]:
    """Apply the mining rule to ranked ``candidates``; returns (negatives, number dropped by the margin).

    ``skip``: the first ``skip`` ranks of the candidates, positives removed, never become negatives
    (``prep.negative_range_min``; not counted as dropped). ``num_negatives`` None keeps every candidate that
    passes (the pool a teacher then denoises)."""
    ceiling = margin * min_pos_score
    out: list[tuple[int, float]] = []
    dropped = 0
    rank = 0
    for idx, score in candidates:
        if idx < 0 or idx in positives:
            continue
        rank += 1
        if rank <= skip or not allowed(idx):
            continue
        if score > ceiling:
            dropped += 1
            continue
        out.append((idx, float(score)))
        if num_negatives is not None and len(out) >= num_negatives:
            break
    return out, dropped


def mine_hard_negatives(
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    passage_ids: Sequence[str],
    passage_texts: Sequence[str],
    allowed: Sequence[Callable[[int], bool]],
    *,
    retriever: Retriever,
    num_negatives: int,
    margin: float,
    depth: int,
    skip: int,
    keep_all: bool,
) -> MiningResult:
    """Mine ``num_negatives`` hard negatives per query (see module docstring).

    ``retriever`` embeds (with its prefixes, cache and batch size) and searches exactly.
    ``allowed[i](passage_index)`` says whether a passage may be a negative of query ``i``.
    ``depth`` candidates beyond the positives (and the ``skip`` first ranks, never negatives) are searched
    per query. ``keep_all``: keep every candidate that passes the rule, not just the first ``num_negatives``
    (the pool :func:`teacher_denoise` picks from); a query is short when it has fewer than ``num_negatives``.
    """
    retriever.embedder()  # one model for passages and queries
    corpus_emb = retriever.embed_passages(passage_ids, passage_texts)
    q_emb = retriever.embed_queries(queries)
    max_pos = max((len(p) for p in positives), default=1)
    k = min(len(passage_ids), num_negatives + max_pos + depth + skip)
    limit = None if keep_all else num_negatives
    scores, idx = retriever.search(q_emb, corpus_emb, k)
    res = MiningResult(positives=[], negatives=[])
    short: list[int] = []
    for i, pos in enumerate(positives):
        pos_scores = [(p, float(np.dot(q_emb[i], corpus_emb[p]))) for p in pos]
        pos_scores.sort(key=lambda x: -x[1])
        min_pos = min(s for _, s in pos_scores)
        negs, dropped = select_negatives(list(zip(idx[i].tolist(), scores[i].tolist())), set(pos), min_pos,
                                         margin, limit, allowed[i], skip)
        res.positives.append(pos_scores)
        res.negatives.append(negs)
        res.dropped_as_false_negative += dropped
        if len(negs) < num_negatives:
            short.append(i)
    deep_k = min(len(passage_ids), 8 * k)
    if short and deep_k > k:
        # Queries whose top-k was used up by positives, excluded passages or likely false negatives get one
        # deeper search, so strict margins still find enough negatives.
        log.info("re-searching %d queries at depth %d for enough negatives", len(short), deep_k)
        s2, i2 = retriever.search(q_emb[short], corpus_emb, deep_k)
        for row, i in enumerate(short):
            min_pos = min(s for _, s in res.positives[i])
            negs, _ = select_negatives(list(zip(i2[row].tolist(), s2[row].tolist())), set(positives[i]), min_pos,
                                       margin, limit, allowed[i], skip)
            res.negatives[i] = negs
    res.short = sum(1 for n in res.negatives if len(n) < num_negatives)
    res.stats = {"queries": len(queries), "passages": len(passage_ids), "search_depth": k,
                 "dim": int(corpus_emb.shape[1])}
    return res


def _dense_scorer(retriever: Retriever, queries: Sequence[str], passage_ids: Sequence[str],
                  passage_texts: Sequence[str]) -> Callable[[int, int], float]:
    """``score(query index, passage index)``: the bi-encoder's cosine (embeddings from its cache)."""
    retriever.embedder()
    p_emb = retriever.embed_passages(passage_ids, passage_texts)
    q_emb = retriever.embed_queries(queries)
    return lambda i, p: float(np.dot(q_emb[i], p_emb[p]))


def mine_from_first_stage(
    query_ids: Sequence[str],
    queries: Sequence[str],
    positives: Sequence[Sequence[int]],
    passage_ids: Sequence[str],
    passage_texts: Sequence[str],
    allowed: Sequence[Callable[[int], bool]],
    *,
    first_stage,
    corpus: Mapping[str, dict],
    num_negatives: int,
    margin: float,
    depth: int,
    skip: int,
    keep_all: bool,
) -> MiningResult:
    """Mine negatives from the ranking of ``first_stage`` (a :class:`rerankflow.retrieval.first_stage.FirstStage`
    of kind bm25, hybrid or run; kind dense uses :func:`mine_hard_negatives`, the exact dense search).

    Candidates come in the first stage's order. The false-negative margin (TopK-PercPos) needs scores on one
    scale for candidates and positives: when the first stage has a dense source, they are the bi-encoder's
    cosines (so a hybrid is denoised exactly like dense mining); otherwise (bm25, run) the first stage's own
    scores, with the positive's score taken from the same ranking, and no margin for a query whose positives
    the first stage did not retrieve. ``neg_doc`` / ``pos_doc`` scores are those margin scores.
    ``query_ids`` name the queries (a run file is read by them); ``corpus`` is the BEIR-style ``{passage id: {"title", "text"}}`` of ``passage_ids``.
    ``skip`` and ``keep_all`` as in :func:`mine_hard_negatives`.
    """
    index_of = {p: i for i, p in enumerate(passage_ids)}
    dense = _dense_scorer(first_stage.retriever, queries, passage_ids, passage_texts) \
        if first_stage.retriever is not None else None
    qids = dict(zip(query_ids, queries))  # real ids: a run file is looked up by them
    max_pos = max((len(p) for p in positives), default=1)
    k = min(len(passage_ids), num_negatives + max_pos + depth + skip)
    limit = None if keep_all else num_negatives

    def rank(qmap: Mapping[str, str], top_k: int) -> dict[str, list[tuple[int, float]]]:
        run, _ = first_stage.retrieve(corpus, qmap, top_k)
        return {q: [(index_of[d], s) for d, s in docs.items()] for q, docs in run.items()}

    def select(i: int, ranked_docs: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], int, list]:
        pos = set(positives[i])
        own = dict(ranked_docs)
        if dense is not None:
            score = (lambda p: dense(i, p))
            pos_scores = [(p, score(p)) for p in pos]
        else:
            score = own.get
            pos_scores = [(p, own[p]) for p in pos if p in own]
        ceiling = margin * min((s for _, s in pos_scores), default=float("inf"))
        out, dropped, seen = [], 0, 0
        for idx, _ in ranked_docs:
            if idx in pos:
                continue
            seen += 1  # rank among the candidates, positives removed
            if seen <= skip or not allowed[i](idx):
                continue
            s = float(score(idx))
            if s > ceiling:
                dropped += 1
                continue
            out.append((idx, s))
            if limit is not None and len(out) >= limit:
                break
        full_pos = pos_scores + [(p, 0.0) for p in pos if p not in dict(pos_scores)]
        return out, dropped, sorted(full_pos, key=lambda x: -x[1])

    ranked = rank(qids, k)
    res = MiningResult(positives=[], negatives=[])
    for i in range(len(queries)):
        negs, dropped, pos_scores = select(i, ranked[query_ids[i]])
        res.positives.append(pos_scores)
        res.negatives.append(negs)
        res.dropped_as_false_negative += dropped
    short = [i for i, n in enumerate(res.negatives) if len(n) < num_negatives]
    deep_k = min(len(passage_ids), 8 * k)
    if short and deep_k > k:
        log.info("re-ranking %d queries at depth %d for enough negatives", len(short), deep_k)
        deeper = rank({query_ids[i]: queries[i] for i in short}, deep_k)
        for i in short:
            res.negatives[i] = select(i, deeper[query_ids[i]])[0]
    res.short = sum(1 for n in res.negatives if len(n) < num_negatives)
    res.stats = {"queries": len(queries), "passages": len(passage_ids), "search_depth": k,
                 "first_stage": first_stage.kind, "margin_scores": "dense cosine" if dense else "first-stage scores"}
    return res


def teacher_denoise(mined: MiningResult, queries: Sequence[str], passage_texts: Sequence[str], *,
                    score_pairs: Callable[[list[tuple[str, str]], str], np.ndarray], num_negatives: int,
                    margin: float) -> dict:
    """Drop the likely unlabelled positives among the mined candidates with a cross-encoder teacher.

    ``mined.negatives`` holds, per query, every candidate the first-stage rule kept, in first-stage order
    (mined with ``keep_all``). The teacher scores each query's positives; its **lowest** positive logit is
    the query's reference (one reference per query: every training example of the query shares its
    negatives, and a candidate the teacher ranks above any labelled positive is as likely relevant as that
    positive). A candidate whose teacher logit exceeds ``reference - margin`` is dropped; the others are
    kept in first-stage order until ``num_negatives``. Candidates are scored lazily, in rounds: each query
    first sends its next ``num_negatives - kept`` candidates, and only queries that lost some send more, so
    a dropped candidate is replaced by the next one and the teacher scores few more pairs than it keeps.

    ``score_pairs(pairs, desc)`` returns one logit per (query, passage text) pair. Updates ``mined``
    (negatives, short, ``teacher_dropped``: per query the dropped ``(passage index, teacher logit)``,
    ``teacher_reference``: per query the lowest positive logit, ``teacher_logits``: every logit scored, so
    :func:`teacher_scores` does not score a pair twice) and returns the counts.
    """
    n = len(queries)
    pos_pairs = [(i, p) for i in range(n) for p, _s in mined.positives[i]]
    pos_logits = score_pairs([(queries[i], passage_texts[p]) for i, p in pos_pairs], "teacher: positives")
    reference = [float("inf")] * n
    seen: list[dict[int, float]] = [{} for _ in range(n)]
    for (i, p), s in zip(pos_pairs, pos_logits):
        reference[i] = min(reference[i], float(s))
        seen[i][p] = float(s)
    pools = mined.negatives
    kept: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    dropped: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    cursor = [0] * n
    pending = list(range(n))
    scored = rounds = 0
    while pending:
        batch = []
        for i in pending:
            take = pools[i][cursor[i]:cursor[i] + num_negatives - len(kept[i])]
            cursor[i] += len(take)
            batch += [(i, c) for c in take]
        if not batch:
            break
        rounds += 1
        logits = score_pairs([(queries[i], passage_texts[c[0]]) for i, c in batch], f"teacher: candidates, round {rounds}")
        scored += len(batch)
        for (i, cand), s in zip(batch, logits):  # per query in first-stage order
            seen[i][cand[0]] = float(s)
            if float(s) > reference[i] - margin:
                dropped[i].append((cand[0], float(s)))
            else:
                kept[i].append(cand)
        pending = [i for i in pending if len(kept[i]) < num_negatives and cursor[i] < len(pools[i])]
    short_before = sum(1 for p in pools if len(p) < num_negatives)
    mined.negatives = kept
    mined.short = sum(1 for k in kept if len(k) < num_negatives)
    mined.teacher_dropped = dropped
    mined.teacher_reference = reference
    mined.teacher_logits = seen
    n_dropped = sum(len(d) for d in dropped)
    return {"positives_scored": len(pos_pairs), "candidates_scored": scored, "rounds": rounds,
            "dropped_as_likely_positive": n_dropped,
            "dropped_fraction": round(n_dropped / scored, 4) if scored else 0.0,
            "queries_with_a_drop": sum(1 for d in dropped if d),
            "queries_short_of_negatives": mined.short,
            "queries_short_because_of_teacher": mined.short - short_before}


def teacher_scores(mined: MiningResult, queries: Sequence[str], passage_texts: Sequence[str], *,
                   score_pairs: Callable[[list[tuple[str, str]], str], np.ndarray], only: Sequence[int]) -> dict:
    """The teacher's logit for every positive and kept negative of the queries in ``only`` (the training
    split), the targets of stage 2's ``finetune.loss: distill``.

    Pairs :func:`teacher_denoise` already scored are taken from ``mined.teacher_logits``, not scored again.
    Updates ``mined.teacher_logits`` (per query: passage index -> logit; queries outside ``only`` keep what
    they had) and returns ``{"pairs": scored here, "reused": taken from denoising}``.
    """
    seen = mined.teacher_logits or [{} for _ in queries]
    todo = [(i, p) for i in only for p in dict.fromkeys([p for p, _s in mined.positives[i]]
                                                         + [p for p, _s in mined.negatives[i]]) if p not in seen[i]]
    wanted = sum(len({p for p, _s in mined.positives[i]} | {p for p, _s in mined.negatives[i]}) for i in only)
    if todo:
        logits = score_pairs([(queries[i], passage_texts[p]) for i, p in todo], "teacher: training pairs")
        for (i, p), s in zip(todo, logits):
            seen[i][p] = float(s)
    mined.teacher_logits = seen
    return {"pairs": len(todo), "reused": wanted - len(todo)}


def mix_first_stage(mined: MiningResult, only: Sequence[int], weight: float) -> None:
    """Make the teacher an ensemble of the cross-encoder and the first stage, per training query.

    Over each query's pool (positives and kept negatives), the first stage's scores (the mining scores of
    ``pos_doc`` / ``neg_doc``: the bi-encoder's cosines when the first stage has a dense source, else its own
    scores) are standardized and put on the cross-encoder's scale: ``teacher = logit + weight x std(logits)
    x z(first stage)``. ``weight`` 1 gives both the same spread; 0 leaves the cross-encoder alone. A pool
    whose first-stage or teacher scores are all equal is left as it is. Updates ``mined.teacher_logits``.
    """
    for i in only:
        fs = dict(mined.positives[i])
        fs.update(dict(mined.negatives[i]))
        ids = list(fs)
        ce = np.array([mined.teacher_logits[i][p] for p in ids], dtype=np.float64)
        f = np.array([fs[p] for p in ids], dtype=np.float64)
        if len(ids) < 2 or f.std() == 0 or ce.std() == 0:
            continue
        mixed = ce + weight * ce.std() * (f - f.mean()) / f.std()
        mined.teacher_logits[i].update({p: float(v) for p, v in zip(ids, mixed)})
