"""Cache of reranker scores, one file per (model weights, scoring settings), one entry per pair.

Stage 3 scores the same (query, passage) pairs with the same base model again and again: when only
the fine-tuned model changed, when ``top_k`` grew, when a second experiment (another config over
the same eval set) compares against the same base. On a 2-core CPU that is ~12 minutes per model
on SciFact (9,000 pairs at ~13 pairs/s), so evaluation looks scores up here first and scores only
the pairs it has never seen.

* The **identity** of a scorer (:func:`scorer_identity`) is the sha256 of the checkpoint's files
  that decide its outputs (weights, ``config.json``, tokenizer files; not optimizer or trainer
  state) plus every setting that changes a logit: input format, prompt template (template format
  only), max length and the **scoring path** that computed it (``torch_fp32``, ``torch_bf16``, ``onnx``:
  :mod:`rerankflow.scoring.paths`), so bf16 or ONNX scores never replay as fp32 ones. A changed
  checkpoint or setting therefore never reuses a score.
* A **pair** is keyed by the sha256 of its query and passage texts, so a different corpus
  version, query set or candidate list reuses exactly the pairs that are unchanged.
* Files are written atomically (temp file + rename), and a save first merges the entries another job
  saved since this one read the file (a prep's teacher and an evaluation share the base's file). Two
  saves in the same instant can still lose one side's new entries, never the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.io import write_json

log = logging.getLogger(__name__)

# files of a Hugging Face checkpoint folder that change what the model outputs
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_NOT_MODEL_FILES = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "rerankflow", "README",
                    "import_info")  # import_info.json: where an import came from (a path), not what it computes


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)


def checkpoint_digest(checkpoint) -> str:
    """Hex sha256 of what a checkpoint computes: the content of its model files (see module docstring).

    ``checkpoint`` is a local Hugging Face folder; a hub id (no local folder) is identified by its
    name only, which is as stable as the hub revision the local cache holds.
    """
    return _checkpoint_hash(checkpoint).hexdigest()


def _checkpoint_hash(checkpoint):
    h = hashlib.sha256()
    root = Path(checkpoint)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_MODEL_FILE_SUFFIXES)
                       and not p.name.startswith(_NOT_MODEL_FILES))
        if not files:
            raise FileNotFoundError(f"{root}: no model files to identify the scorer by")
        for p in files:
            h.update(p.name.encode() + b"\0")
            _hash_file(h, p)
    else:
        h.update(b"hub:" + str(checkpoint).encode())
    return h


def scorer_identity(checkpoint, *, input_format: str, template: str, max_length: int, scoring_path: str) -> str:
    """Hex digest naming what a scorer computes: checkpoint content (:func:`checkpoint_digest`) + scoring
    settings, the concrete ``scoring_path`` included (never ``auto``: key on the path that scored)."""
    if scoring_path == "auto":
        raise ValueError("key the score cache on the scoring path actually used, not 'auto'")
    h = _checkpoint_hash(checkpoint)
    settings = {"input_format": input_format, "template": template if input_format == "template" else None,
                "max_length": int(max_length)}
    if scoring_path == "torch_fp32":
        settings["bf16"] = False  # the key fp32 scores had before scoring paths existed: their caches stay valid
    else:
        settings["scoring_path"] = str(scoring_path)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def pair_key(query: str, passage: str) -> str:
    """Key of one (query, passage) pair: sha256 of both texts (unambiguous separator)."""
    return hashlib.sha256(query.encode() + b"\0\x1f\0" + passage.encode()).hexdigest()[:32]


class ScoreCache:
    """Scores of one scorer identity, stored as ``<cache_dir>/<identity[:24]>.json``."""

    def __init__(self, cache_dir, identity: str, description: dict | None = None):
        self.path = Path(cache_dir) / f"{identity[:24]}.json"
        self.identity = identity
        self.description = description or {}
        self.scores: dict[str, float] = {}
        self._dirty = False
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("identity") == identity:
                    self.scores = {str(k): float(v) for k, v in doc["scores"].items()}
                else:
                    log.warning("score cache %s belongs to another scorer; ignoring it", self.path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("score cache %s is unreadable (%s); rescoring", self.path, exc)

    def lookup(self, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, list[int]]:
        """``(scores, missing)``: cached scores aligned with ``pairs`` (NaN where missing) and the missing indices."""
        out = np.full(len(pairs), np.nan, dtype=np.float32)
        missing = []
        for i, (q, p) in enumerate(pairs):
            s = self.scores.get(pair_key(q, p))
            if s is None:
                missing.append(i)
            else:
                out[i] = s
        return out, missing

    def add(self, pairs: Sequence[tuple[str, str]], scores) -> None:
        for (q, p), s in zip(pairs, scores):
            self.scores[pair_key(q, p)] = float(s)
        self._dirty = self._dirty or len(pairs) > 0

    def save(self) -> None:
        """Write the file (atomically) when something was added."""
        if not self._dirty:
            return
        if self.path.exists():  # merge what another job saved since this one read the file
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("identity") == self.identity:
                    self.scores = {**{str(k): float(v) for k, v in doc["scores"].items()}, **self.scores}
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: overwritten with this job's scores
        write_json(self.path, {"identity": self.identity, "scorer": self.description, "scores": self.scores})
        self._dirty = False


def cached_score(pairs: Sequence[tuple[str, str]], cache: ScoreCache | None, make_scorer, **score_kwargs) -> tuple[np.ndarray, dict]:
    """Scores of ``pairs``, from ``cache`` where present; ``make_scorer()`` is called only when some are missing.

    Returns ``(scores, info)`` with ``info = {"cached_pairs", "scored_pairs"}``. The new scores are
    added to the cache and saved before returning.
    """
    if cache is None:
        scores = make_scorer().score(pairs, **score_kwargs)
        return np.asarray(scores, dtype=np.float32), {"cached_pairs": 0, "scored_pairs": len(pairs)}
    scores, missing = cache.lookup(pairs)
    if missing:
        todo = [pairs[i] for i in missing]
        new = make_scorer().score(todo, **score_kwargs)
        scores[missing] = new
        cache.add(todo, new)
        cache.save()
    log.info("score cache %s: %d pairs cached, %d scored", cache.path, len(pairs) - len(missing), len(missing))
    return scores, {"cached_pairs": len(pairs) - len(missing), "scored_pairs": len(missing)}
