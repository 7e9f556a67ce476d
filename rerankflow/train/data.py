"""Training data of stage 2: reading prep's files, validation split, per-epoch negatives, batch plan.

Inputs (written by stage 1, see CONTRACTS.md)::

    {"corpus": {"path": "<parquet with columns id, text>"},
     "data": [{"question_id", "question", "corpus_id", "pos_doc": [{"id", "score"}], "neg_doc": [{"id", "score"}]}]}

``train_mined.automodel_unrolled.json`` holds one record per positive (``question_id`` = ``<qid>_<i>``);
records with several positives are unrolled here too. ``neg_doc`` is the mined pool, hardest first.

Contracts of this module:

* :class:`NegativeSampler` draws ``n`` negatives per example *afresh each epoch* from the mined pool
  (NVIDIA's recipe takes the same first ``n`` every epoch). The draw is a pure function of
  ``(seed, epoch)``: identical for the same seed and epoch, different across epochs.
* :func:`holdout_split` holds out whole original queries (all unrolled copies of ``<qid>``), so a
  validation query never leaks into training.
* :func:`epoch_plan` groups examples of similar token length into micro-batches (dynamic padding
  then wastes little compute) and groups micro-batches into optimizer steps. The plan is a pure
  function of ``(seed, epoch)`` and independent of the number of processes, which is what makes
  resuming exact (the data-order state is just ``(epoch, step_in_epoch)``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import pair_overhead
from rerankflow.io import read_json

log = logging.getLogger(__name__)

_UNROLLED_SUFFIX = re.compile(r"^(.*)_(\d+)$")


@dataclass
class TrainExample:
    """One training query with one positive and its mined negative pool."""

    qid: str                 # unrolled id (``<qid>_<i>``)
    group: str               # original question id: the unit of the train/validation split
    question: str
    positive: str            # passage id
    pool: list[str]          # mined negatives, hardest first
    positives: frozenset = field(default_factory=frozenset)  # every positive of the group
    teacher: dict[str, float] = field(default_factory=dict)  # passage id -> teacher logit (prep's "teacher")

    def teacher_logits(self, passage_ids: Sequence[str]) -> list[float]:
        """The teacher's logits of ``passage_ids`` (this example's positive and sampled negatives). A passage
        the teacher never scored (a random filler of a short pool, see :class:`NegativeSampler`) gets the
        lowest logit the teacher gave this query: an easy negative, never ranked above a scored one."""
        floor = min(self.teacher.values())
        return [self.teacher.get(d, floor) for d in passage_ids]


@dataclass
class ValQuery:
    """One validation query: its candidate list and relevant ids.

    From a ``val.json`` record with ``candidates`` (what prep writes): the first stage's top candidates of
    the query, in first-stage order, with their first-stage scores in ``first_stage`` (a positive the first
    stage missed is relevant but not a candidate, exactly as on test). From an older record or a holdout:
    positives + mined negatives, ``first_stage`` empty.
    """

    qid: str
    question: str
    candidates: list[str]
    relevant: set[str]
    first_stage: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingData:
    examples: list[TrainExample]
    val: list[ValQuery]
    passages: dict[str, str]
    corpus_path: str
    val_source: str          # "val.json", "holdout" or "none"


def base_query_id(qid: str) -> str:
    """``<qid>_<i>`` -> ``<qid>`` (unrolled ids); other ids are returned unchanged."""
    m = _UNROLLED_SUFFIX.match(qid)
    return m.group(1) if m else qid


def _doc_ids(rec: dict, key: str, path, index: int) -> list[str]:
    docs = rec.get(key)
    if not isinstance(docs, list):
        raise InputError(f"record {index} ({rec.get('question_id')!r}): '{key}' must be a list of {{id, score}}", path=path)
    out = []
    for d in docs:
        if isinstance(d, dict) and "id" in d:
            out.append(str(d["id"]))
        elif isinstance(d, (str, int)):
            out.append(str(d))
        else:
            raise InputError(f"record {index} ({rec.get('question_id')!r}): '{key}' entries need an 'id'", path=path)
    return out


def read_records(path) -> tuple[str | None, list[dict]]:
    """Read a prep file; return ``(corpus parquet path or None, records)``; bad layout raises InputError."""
    obj = read_json(path)
    if not isinstance(obj, dict) or "data" not in obj:
        raise InputError("expected an object {\"corpus\": {\"path\": ...}, \"data\": [...]}", path=path)
    data = obj["data"]
    if not isinstance(data, list):
        raise InputError("'data' must be a list of records", path=path)
    corpus = obj.get("corpus") or {}
    cpath = corpus.get("path") if isinstance(corpus, dict) else None
    if cpath is not None and not os.path.isabs(cpath):
        cpath = str((Path(path).parent / cpath).resolve())
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(f"record {i} is not an object", path=path)
        for key in ("question_id", "question", "pos_doc", "neg_doc"):
            if key not in rec:
                raise InputError(f"record {i} ({rec.get('question_id')!r}) lacks '{key}'", path=path)
    return cpath, data


def load_passages(parquet_path, needed: set[str] | None = None) -> dict[str, str]:
    """``{id: text}`` from the corpus parquet (columns ``id``, ``text``), restricted to ``needed``."""
    import pyarrow.parquet as pq

    if parquet_path is None or not os.path.exists(parquet_path):
        raise InputError("corpus parquet not found (named by the training file's corpus.path)", path=parquet_path)
    table = pq.read_table(parquet_path)
    if "id" not in table.column_names or "text" not in table.column_names:
        raise InputError(f"corpus parquet needs columns 'id' and 'text', has {table.column_names}", path=parquet_path)
    ids = [str(x) for x in table.column("id").to_pylist()]
    texts = table.column("text").to_pylist()
    if needed is None:
        return dict(zip(ids, texts))
    return {i: t for i, t in zip(ids, texts) if i in needed}


def _teacher_of(rec: dict, path, index: int) -> dict[str, float]:
    """``{passage id: teacher logit}`` of a record's ``pos_doc`` / ``neg_doc`` entries that carry ``"teacher"``."""
    out = {}
    for key in ("pos_doc", "neg_doc"):
        for d in rec[key]:
            if isinstance(d, dict) and "teacher" in d:
                t = d["teacher"]
                if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t:
                    raise InputError(f"record {index} ({rec.get('question_id')!r}): '{key}' entry {d.get('id')!r} has "
                                     f"teacher {t!r}, expected a number (the teacher's logit)", path=path)
                out[str(d["id"])] = float(t)
    return out


def check_teacher_scores(examples: Sequence[TrainExample], path) -> None:
    """Raise unless every example has a teacher logit for its positive and every negative of its pool (what
    ``finetune.loss: distill`` trains on); the error names the file, the question and the passage."""
    for ex in examples:
        for d in [ex.positive, *ex.pool]:
            if d not in ex.teacher:
                raise InputError(
                    f"question {ex.qid!r}: passage {d!r} has no 'teacher' score, and finetune.loss distill needs one "
                    "for every pos_doc / neg_doc entry (prep writes them when finetune.loss is distill)", path=path)


def build_examples(records: Sequence[dict], path) -> list[TrainExample]:
    """Unroll records into one :class:`TrainExample` per positive (with the teacher's logits, where given)."""
    groups_pos: dict[str, set[str]] = {}
    parsed = []
    for i, rec in enumerate(records):
        pos = _doc_ids(rec, "pos_doc", path, i)
        neg = _doc_ids(rec, "neg_doc", path, i)
        teacher = _teacher_of(rec, path, i)
        if not pos:
            raise InputError(f"record {i} ({rec['question_id']!r}) has no positive in 'pos_doc'", path=path)
        group = base_query_id(str(rec["question_id"]))
        groups_pos.setdefault(group, set()).update(pos)
        parsed.append((rec, group, pos, neg, teacher))
    out = []
    for rec, group, pos, neg, teacher in parsed:
        gpos = frozenset(groups_pos[group])
        pool = [n for n in dict.fromkeys(neg) if n not in gpos]
        for j, p in enumerate(pos):
            qid = str(rec["question_id"]) if len(pos) == 1 else f"{rec['question_id']}_{j}"
            out.append(TrainExample(qid, group, str(rec["question"]), p, pool, gpos, teacher))
    return out


def build_val_queries(examples: Sequence[TrainExample]) -> list[ValQuery]:
    """Group examples by original query: candidates = all its positives + its mined negatives."""
    by_group: dict[str, ValQuery] = {}
    for ex in examples:
        vq = by_group.get(ex.group)
        if vq is None:
            vq = by_group[ex.group] = ValQuery(ex.group, ex.question, [], set())
        vq.relevant.update(ex.positives)
        for d in [*sorted(ex.positives), *ex.pool]:
            if d not in vq.candidates:
                vq.candidates.append(d)
    return list(by_group.values())


def val_queries_from_candidates(records: Sequence[dict], path) -> list[ValQuery]:
    """One :class:`ValQuery` per record that carries the first stage's ``candidates`` (``[{id, score}]``)."""
    out = []
    for i, rec in enumerate(records):
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not all(isinstance(c, dict) and "id" in c and "score" in c for c in cands):
            raise InputError(f"record {i} ({rec.get('question_id')!r}): 'candidates' must be a list of {{id, score}}",
                             path=path)
        scores = {str(c["id"]): float(c["score"]) for c in cands}
        out.append(ValQuery(str(rec["question_id"]), str(rec["question"]), list(scores),
                            set(_doc_ids(rec, "pos_doc", path, i)), scores))
    return out


def holdout_split(examples: list[TrainExample], n_queries: int, seed: int):
    """Hold out ``n_queries`` whole original queries (seeded); return ``(train, val_queries)``."""
    groups = sorted({ex.group for ex in examples})
    if n_queries <= 0 or len(groups) < 2:
        return examples, []
    n = min(n_queries, len(groups) // 2)  # never hold out more than half the data
    rng = np.random.default_rng([int(seed), 0x5EED])
    held = set(rng.choice(groups, size=n, replace=False).tolist())
    train = [ex for ex in examples if ex.group not in held]
    val = build_val_queries([ex for ex in examples if ex.group in held])
    return train, val


def load_training_data(train_path, val_path, val_queries: int, seed: int, val_max_queries: int,
                       need_teacher: bool = False) -> TrainingData:
    """Read prep's unrolled training file and ``val.json``; hold out queries when val.json is empty.

    ``val_max_queries`` > 0 caps the validation set (a seeded subset of val.json's queries), so
    validating every few steps stays cheap on a CPU. ``need_teacher``: every training pair must carry the
    teacher's logit (:func:`check_teacher_scores`).
    """
    cpath, records = read_records(train_path)
    if not records:
        raise InputError("training file has no records", path=train_path)
    examples = build_examples(records, train_path)
    if need_teacher:
        check_teacher_scores(examples, train_path)
    val: list[ValQuery] = []
    val_source = "none"
    vcpath = None
    if val_path and os.path.exists(val_path):
        vcpath, vrecords = read_records(val_path)
        if vrecords and all("candidates" in r for r in vrecords):
            val = val_queries_from_candidates(vrecords, val_path)
            val_source = "val.json (first-stage candidates)"
        elif vrecords:
            val = build_val_queries(build_examples(vrecords, val_path))
            val_source = "val.json"
    if val and 0 < val_max_queries < len(val):
        rng = np.random.default_rng([int(seed), 0x7A1])
        keep = sorted(rng.choice(len(val), size=val_max_queries, replace=False).tolist())
        val = [val[i] for i in keep]
    if not val:
        examples, val = holdout_split(examples, val_queries, seed)
        val_source = "holdout" if val else "none"
    else:
        overlap = {v.qid for v in val} & {ex.group for ex in examples}
        if overlap:
            log.warning("%d validation query ids also occur in the training data (e.g. %s)", len(overlap), sorted(overlap)[:3])
    needed = set()
    for ex in examples:
        needed.add(ex.positive)
        needed.update(ex.pool)
    vneeded = set()
    for v in val:
        vneeded.update(v.candidates)
    passages = load_passages(cpath)
    if vcpath and vcpath != cpath and val_source.startswith("val.json"):
        passages.update(load_passages(vcpath))
    missing = sorted((needed | vneeded) - passages.keys())
    if missing:
        raise InputError(
            f"{len(missing)} passage ids named by the training/validation records are not in the corpus parquet "
            f"(e.g. {missing[:3]})", path=cpath)
    return TrainingData(examples, val, passages, cpath, val_source)


class NegativeSampler:
    """Per-epoch seeded draw of ``n_neg`` negatives per example from its mined pool.

    When a pool is smaller than ``n_neg``, the whole pool is used and the rest is filled with
    random passages of the corpus that are not positives of the query (counted in ``short``;
    the trainer warns about it, as NVIDIA's recipe does).
    """

    def __init__(self, examples: Sequence[TrainExample], n_neg: int, seed: int, fill_ids: Sequence[str]):
        self.examples = examples
        self.n_neg = int(n_neg)
        self.seed = int(seed)
        self.fill_ids = sorted(fill_ids)
        self.short = sum(1 for ex in examples if len(ex.pool) < self.n_neg)

    def sample(self, epoch: int) -> list[list[str]]:
        rng = np.random.default_rng([self.seed, int(epoch), 0xE9])
        out = []
        for ex in self.examples:
            pool = ex.pool
            if len(pool) >= self.n_neg:
                idx = rng.choice(len(pool), size=self.n_neg, replace=False)
                out.append([pool[i] for i in idx])
                continue
            negs = list(pool)
            taken = set(negs) | set(ex.positives)
            tries = 0
            while len(negs) < self.n_neg and self.fill_ids and tries < 50 * self.n_neg:
                cand = self.fill_ids[int(rng.integers(len(self.fill_ids)))]
                tries += 1
                if cand not in taken:
                    negs.append(cand)
                    taken.add(cand)
            if not negs:
                raise InputError(f"query {ex.qid!r} has no negative: its mined pool is empty and the corpus "
                                 "has no other passage")
            while len(negs) < self.n_neg:  # corpus too small: repeat (every group must have n_neg)
                negs.append(negs[int(rng.integers(len(negs)))])
            out.append(negs)
        return out


def token_lengths(tokenizer, texts: Sequence[str], batch: int = 2048) -> np.ndarray:
    """Number of tokens (no special tokens, no truncation) of each text."""
    out = np.zeros(len(texts), dtype=np.int64)
    for s in range(0, len(texts), batch):
        enc = tokenizer(list(texts[s:s + batch]), add_special_tokens=False, truncation=False)["input_ids"]
        out[s:s + batch] = [len(e) for e in enc]
    return out


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega: int = 50) -> list[list[int]]:
    """Shuffle, cut into mega-batches of ``mega * batch_size``, sort each by length, chunk, shuffle chunks.

    The same scheme as transformers' ``LengthGroupedSampler``: batches are random but their
    members have similar lengths, so padding to the longest member wastes little. Only full
    batches are returned (the remainder is dropped; it changes every epoch).
    """
    n = len(lengths)
    perm = rng.permutation(n)
    size = mega * batch_size
    batches = []
    for s in range(0, n, size):
        chunk = perm[s:s + size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    batches = [b for b in batches if len(b) == batch_size]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


@dataclass
class EpochPlan:
    """Negatives per example, and steps -> micro-batches -> ``(example index, slot)`` items.

    Slot 0 is the example's positive, slot ``k`` its ``negatives[k - 1]``. Listwise micro-batches
    hold whole groups (all slots of an example, in order); pointwise ones hold single pairs.
    """

    negatives: list[list[str]]
    steps: list[list[list[tuple[int, int]]]]

    def passage_id(self, examples, ei: int, slot: int) -> str:
        return examples[ei].positive if slot == 0 else self.negatives[ei][slot - 1]


class PlanBuilder:
    """Builds the (deterministic) data plan of an epoch: negatives, length-grouped micro-batches, steps.

    Pair lengths are estimated as query tokens + passage tokens + the overhead of ``input_format``
    (:func:`rerankflow.formatting.pair_overhead`: the template's words and special tokens, or in
    ``pair`` format the special tokens of a sentence pair), capped at ``max_length``.

    ``listwise``: a micro-batch is ``local_batch`` whole query groups (the loss needs a query's
    passages together), grouped by the group's longest pair. Pointwise (BCE): pairs are independent,
    so a micro-batch is ``local_batch x n_passages`` single pairs grouped by their own length — much
    less padding than groups or random pairs (SciFact passages: median 311, p90 490 tokens).
    """

    def __init__(self, examples, passages, tokenizer, template: str, max_length: int, n_neg: int,
                 local_batch: int, micro_per_step: int, seed: int, group_by_length: bool,
                 listwise: bool, input_format: str):
        self.examples = examples
        self.local_batch = int(local_batch)
        self.micro_per_step = int(micro_per_step)
        self.seed = int(seed)
        self.max_length = int(max_length)
        self.group_by_length = group_by_length
        self.listwise = listwise
        self.n_pass = int(n_neg) + 1
        self.sampler = NegativeSampler(examples, n_neg, seed, passages.keys())
        used = sorted({ex.positive for ex in examples} | {d for ex in examples for d in ex.pool}
                      | (set(passages) if self.sampler.short else set()))
        self._plen = dict(zip(used, token_lengths(tokenizer, [passages[d] for d in used]).tolist()))
        self._qlen = token_lengths(tokenizer, [ex.question for ex in examples])
        self._overhead = pair_overhead(tokenizer, input_format=input_format, template=template)

    def steps_per_epoch(self) -> int:
        return (len(self.examples) // self.local_batch) // self.micro_per_step

    def pair_lengths(self, negatives: list[list[str]]) -> np.ndarray:
        """Token length estimate of every (example, slot) pair, capped at max_length: ``[n_examples, n_pass]``."""
        lens = np.empty((len(self.examples), self.n_pass), dtype=np.int64)
        for i, ex in enumerate(self.examples):
            base = self._overhead + int(self._qlen[i])
            for k, d in enumerate([ex.positive, *negatives[i]]):
                lens[i, k] = min(self.max_length, base + self._plen[d])
        return lens

    def plan(self, epoch: int) -> EpochPlan:
        negatives = self.sampler.sample(epoch)
        rng = np.random.default_rng([self.seed, int(epoch), 0xBA7C])
        n = len(self.examples)
        if self.listwise:
            unit = self.local_batch
            lengths = self.pair_lengths(negatives).max(axis=1) if self.group_by_length else None
            expand = lambda b: [(ei, k) for ei in b for k in range(self.n_pass)]  # noqa: E731
        else:
            unit = self.local_batch * self.n_pass
            lengths = self.pair_lengths(negatives).reshape(-1) if self.group_by_length else None
            expand = lambda b: [divmod(j, self.n_pass) for j in b]  # noqa: E731
        count = n if self.listwise else n * self.n_pass
        if self.group_by_length:
            micro = length_grouped_batches(lengths, unit, rng)
        else:
            perm = rng.permutation(count).tolist()
            micro = [perm[i:i + unit] for i in range(0, count - unit + 1, unit)]
        micro = [expand(b) for b in micro]
        n_steps = min(len(micro) // self.micro_per_step, self.steps_per_epoch())
        steps = [micro[s * self.micro_per_step:(s + 1) * self.micro_per_step] for s in range(n_steps)]
        return EpochPlan(negatives, steps)
