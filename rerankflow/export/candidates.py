"""Real (query, candidate passages) groups of the eval data: what stage 4's parity and INT8 checks score."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from rerankflow.errors import InputError
from rerankflow.models import pick_device
from rerankflow.retrieval.first_stage import FirstStage


@dataclass
class QueryGroup:
    """One eval query with the candidate passages to score (positives included)."""

    qid: str
    query: str
    doc_ids: list[str]
    passages: list[str]
    qrels: dict[str, int] = field(default_factory=dict)


def load_eval_groups(
    eval_dir,
    *,
    n_pairs: int,
    passages_per_query: int,
    candidates: str,
    seed: int,
    first_stage: FirstStage | None = None,
) -> list[QueryGroup]:
    """Real (query, candidate passages) groups from an eval BEIR folder, about ``n_pairs`` pairs.

    Queries are a seeded sample of the split's queries (``ceil(n_pairs / passages_per_query)``).
    Each query's candidates are its qrels positives plus, with ``candidates="dense"``, the
    ``first_stage``'s top hits (:class:`~rerankflow.retrieval.first_stage.FirstStage` built from the
    ``retrieval`` section: the same first stage as evaluation, dense, bm25, hybrid or a run file, sharing
    its caches) or, with ``candidates="corpus"``, seeded random corpus passages; ``passages_per_query`` in total.
    """
    from rerankflow.beir import load_beir, passage_text

    if candidates not in ("dense", "corpus"):
        raise InputError(f"candidates must be 'dense' or 'corpus', got {candidates!r}", key="export.candidates")
    if candidates == "dense" and first_stage is None:
        raise ValueError("candidates 'dense' need the first stage (FirstStage.from_config(retrieval section, device=...))")
    corpus, queries, qrels = load_beir(eval_dir, missing_docs_ok=True)  # BEIR keeps them; positives are filtered below
    if not queries:
        raise InputError("eval data has no queries with qrels", path=Path(eval_dir) / "qrels" / "test.tsv")
    ppq = max(2, int(passages_per_query))
    n_queries = max(1, math.ceil(int(n_pairs) / ppq))
    qids = sorted(queries)
    random.Random(seed).shuffle(qids)
    qids = sorted(qids[:n_queries])
    doc_ids = list(corpus)
    ranked: dict[str, list[str]] = {}
    if candidates == "dense":
        run, _info = first_stage.retrieve(corpus, {q: queries[q] for q in qids}, min(ppq, len(doc_ids)))
        ranked = {q: list(docs) for q, docs in run.items()}
    rng = random.Random(seed + 1)
    groups = []
    for qid in qids:
        pos = [d for d, g in qrels[qid].items() if g > 0 and d in corpus]
        chosen = list(dict.fromkeys(pos))[:ppq]
        pool = ranked.get(qid) or rng.sample(doc_ids, min(len(doc_ids), ppq * 3))
        for d in pool:
            if len(chosen) >= ppq:
                break
            if d not in chosen:
                chosen.append(d)
        groups.append(QueryGroup(qid, queries[qid], chosen, [passage_text(corpus[d]) for d in chosen], dict(qrels[qid])))
    return groups


def eval_groups(eval_dir, export_cfg: dict, n_pairs: int, retrieval_cfg: dict, *, device: str, seed: int) -> list[QueryGroup]:
    """The eval groups of a parity check: ``export.passages_per_query`` candidates per query from
    ``export.candidates`` (``dense``: the :class:`FirstStage` of the ``retrieval`` section on ``device``,
    exact search when dense)."""
    first_stage = None
    if export_cfg["candidates"] == "dense":
        first_stage = FirstStage.from_config(retrieval_cfg, device=pick_device(device))
    return load_eval_groups(eval_dir, n_pairs=n_pairs, passages_per_query=export_cfg["passages_per_query"],
                            candidates=export_cfg["candidates"], seed=seed, first_stage=first_stage)
