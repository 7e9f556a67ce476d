"""Score (query, passage) pairs with a cross-encoder checkpoint in torch: raw logits, one per pair.

One torch batch scorer for the whole package: evaluation scores checkpoints with it and fine-tuning
validates the model it is training with it (:meth:`CrossEncoderScorer.from_model`, no reload).

Pairs are tokenized in the model's input format (:func:`rerankflow.formatting.tokenize_pairs`:
the shared prompt template as one text, or a BERT sentence pair) with truncation at ``max_length``
(the end of the passage is cut, like the endpoint's ``truncate: END``), then batched **sorted by
token length** so each batch pads only to its own longest member. Logits are raw (no sigmoid), so
the scores of a checkpoint and of the endpoint serving it are directly comparable.

Pairs are tokenized and length-sorted in blocks of :data:`ENCODE_BLOCK_PAIRS`, never all at once, so
memory does not grow with the number of pairs: tokenizing ArguAna's 42,180 stage-3 pairs in one call
held 10.7 GB (benchmarks/RESULTS.md). Sorting within a block of 2,048 pairs pads about as little as
sorting all of them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np

from rerankflow.formatting import check_input_format, check_template, tokenize_pairs
from rerankflow.models import pick_device

log = logging.getLogger(__name__)

# pairs tokenized (and length-sorted) at a time by every scorer's score(): bounds the tokenizer's memory
ENCODE_BLOCK_PAIRS = 2048


def pair_blocks(pairs: Sequence) -> Iterator[tuple[int, Sequence]]:
    """``(start, pairs[start:start + ENCODE_BLOCK_PAIRS])`` over ``pairs``: what a scorer tokenizes at once."""
    for start in range(0, len(pairs), ENCODE_BLOCK_PAIRS):
        yield start, pairs[start:start + ENCODE_BLOCK_PAIRS]


class CrossEncoderScorer:
    """Score (query, passage) pairs with a sequence-classification checkpoint.

    ``score(pairs)`` returns a float32 array of raw logits aligned with ``pairs``. With one output
    label the logit is that label's; with two (a binary classifier) it is the positive-class logit
    minus the negative-class logit, which ranks identically to the positive-class probability.

    ``input_format`` (:data:`rerankflow.formatting.INPUT_FORMATS`): ``"template"`` (default) renders
    each pair with the prompt template into one text; ``"pair"`` encodes ``(query, passage)`` as a
    BERT sentence pair (``[CLS] q [SEP] p [SEP]``, segment ids 0/1), the format off-the-shelf MS
    MARCO cross-encoders were trained with. Score a fine-tuned checkpoint in the
    ``reranker.input_format`` it was trained with (its ``rerankflow.json`` records it), and a base
    model the way it is normally used.
    """

    def __init__(self, model_path, *, max_length: int, template: str, device: str, bf16: bool, batch_size: int,
                 input_format: str, threads: int | None = None):
        """Load ``model_path`` (a Hugging Face folder or hub id) onto ``device`` (``auto`` picks cuda when
        visible). ``bf16`` scores under bf16 autocast on the device's type, CPU included (the scoring path
        ``torch_bf16``, :mod:`rerankflow.scoring.paths`); ``threads`` sets torch's CPU threads when given.
        Attention is transformers' default for the architecture (``sdpa`` for BERT), see :attr:`attention`."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(int(threads))
        device = pick_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(str(model_path))
        model.to(device).eval()
        self._setup(model, AutoTokenizer.from_pretrained(str(model_path)), name=str(model_path), max_length=max_length,
                    template=template, device=device, bf16=bool(bf16), batch_size=batch_size, input_format=input_format)

    @classmethod
    def from_model(cls, model, tokenizer, *, max_length: int, template: str, device, bf16: bool, batch_size: int,
                   input_format: str) -> "CrossEncoderScorer":
        """A scorer of a model already in memory (e.g. the one being trained), on ``device`` as given.

        ``bf16`` is applied as asked (autocast on the device's type, CPU included). :meth:`score`
        switches the model to eval mode and restores training mode afterwards.
        """
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, name=type(model).__name__, max_length=max_length, template=template,
                      device=device, bf16=bool(bf16), batch_size=batch_size, input_format=input_format)
        return scorer

    def _setup(self, model, tokenizer, *, name, max_length, template, device, bf16, batch_size, input_format):
        self.model_path = name
        self.model = model
        self.tokenizer = tokenizer
        self.template = check_template(template)
        self.input_format = check_input_format(input_format)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = device
        self.bf16 = bf16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.attention = getattr(model.config, "_attn_implementation", None)
        self.num_labels = int(model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ValueError(f"{self.model_path}: a reranker needs 1 (or 2) output labels, this checkpoint has {self.num_labels}")

    def _autocast(self):
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=str(self.device).split(":")[0], dtype=torch.bfloat16)

    def _logits(self, batch_ids: list[list[int]], batch_types: list[list[int]] | None = None) -> np.ndarray:
        import torch

        width = max(len(x) for x in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        types = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):  # pad on the tokenizer's side
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention[row, span] = 1
            if batch_types is not None:
                types[row, span] = torch.tensor(batch_types[row], dtype=torch.long)
        enc = {"input_ids": input_ids, "attention_mask": attention}
        if "token_type_ids" in self.tokenizer.model_input_names:
            # template: one text segment, all zeros (what the tokenizer gives a single text);
            # pair: the tokenizer's segment ids
            enc["token_type_ids"] = types
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode(), self._autocast():
            logits = self.model(**enc).logits
        logits = logits.float()
        if self.num_labels == 1:
            out = logits[:, 0]
        else:
            out = logits[:, 1] - logits[:, 0]
        return out.cpu().numpy().astype(np.float32)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (truncated at ``max_length``, unpadded) and segment ids (``pair`` format only)."""
        pair = self.input_format == "pair"
        enc = tokenize_pairs(self.tokenizer, [q for q, _p in pairs], [p for _q, p in pairs],
                             input_format=self.input_format, template=self.template, max_length=self.max_length,
                             padding=False, return_attention_mask=False, return_token_type_ids=pair)
        return enc["input_ids"], (enc.get("token_type_ids") if pair else None)

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids of each pair as the model reads it (see :meth:`encode`)."""
        return self.encode(pairs)[0]

    def score(self, pairs: Sequence[tuple[str, str]], *, sort_by_length: bool, progress: bool = True,
              desc: str = "rerank") -> np.ndarray:
        """Raw logits for ``pairs`` (aligned with the input order); ``sort_by_length`` batches by token length."""
        from tqdm.auto import tqdm

        n = len(pairs)
        scores = np.zeros(n, dtype=np.float32)
        if n == 0:
            return scores
        bs = self.batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=n, desc=desc, unit="pair", disable=not progress, mininterval=2.0) as bar:
                for block, chunk in pair_blocks(pairs):
                    ids, types = self.encode(chunk)
                    order = np.argsort([-len(x) for x in ids], kind="stable") if sort_by_length else np.arange(len(ids))
                    for start in range(0, len(ids), bs):
                        idx = order[start:start + bs]
                        scores[block + idx] = self._logits([ids[i] for i in idx],
                                                           [types[i] for i in idx] if types is not None else None)
                        bar.update(len(idx))
                    del ids, types  # free this block's tokens before the next block is tokenized
        finally:
            if was_training:
                self.model.train()
        return scores
