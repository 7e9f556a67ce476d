"""The PyTorch side of stage 4: which checkpoint, loaded how, and a logits-only view of it.

The checkpoint is a Hugging Face 1-label sequence-classification model (a cross-encoder), loaded
with eager attention (what the TorchScript exporter traces correctly). Stage 2's record
(``rerankflow.json``) says which input format it was fine-tuned in; exporting it in another one is
refused here, because parity cannot see that mix-up (both sides would read the same wrong input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rerankflow.errors import InputError
from rerankflow.formatting import UNRECORDED_INPUT_FORMAT

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def checkpoint_model_dir(path) -> Path:
    """The Hugging Face model folder of a checkpoint path.

    Accepts the model folder itself (has ``config.json``) or a stage-2 step folder / ``BEST`` /
    ``LATEST`` link, whose model lives at ``model/consolidated``.
    """
    path = Path(path)
    for cand in (path, path / "model" / "consolidated"):
        if (cand / "config.json").is_file():
            return cand
    raise InputError("no Hugging Face checkpoint here (expected config.json, or model/consolidated/config.json)",
                     path=path, key="export.checkpoint")


def check_checkpoint_input_format(model_dir, input_format: str) -> None:
    """Raise when the checkpoint's stage-2 record (``rerankflow.json``) says it was trained in another
    input format than ``input_format`` (a record without the key means ``template``).

    Parity cannot catch this (both sides would read the same wrong input), so it is checked here.
    Checkpoints without a record (a base model) are not checked.
    """
    record = Path(model_dir) / "rerankflow.json"
    if not record.is_file():
        return
    try:
        trained = json.loads(record.read_text(encoding="utf-8")).get("input_format") or UNRECORDED_INPUT_FORMAT
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"unreadable checkpoint record: {exc}", path=record) from None
    if trained != input_format:
        raise InputError(f"the checkpoint was fine-tuned with input_format {trained!r}, but reranker.input_format is "
                         f"{input_format!r}; export (and serve) it in the format it was trained in",
                         path=record, key="reranker.input_format")


def uses_token_type_ids(tokenizer) -> bool:
    """Whether the tokenizer feeds ``token_type_ids`` to the model (BERT does, XLM-R/Llama do not)."""
    return "token_type_ids" in getattr(tokenizer, "model_input_names", ())


def load_torch_reranker(checkpoint, device: str, dtype: str):
    """``(model, tokenizer)`` with eager attention, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), attn_implementation="eager")
    if int(getattr(model.config, "num_labels", 1)) != 1:
        raise InputError(f"expected a 1-label cross-encoder, got num_labels={model.config.num_labels}", path=checkpoint)
    model = model.to(device=device, dtype=torch.float16 if dtype == "fp16" else torch.float32).eval()
    return model, tokenizer


class LogitsOnly:
    """Factory for a module that maps named int64 inputs to ``logits`` (what the ONNX graph exposes)."""

    @staticmethod
    def wrap(model, input_names: Sequence[str]):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            if "token_type_ids" in input_names:

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

            else:

                def forward(self, input_ids, attention_mask):
                    return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        return Wrapper().eval()


def torch_runner(model, device: str):
    """``batch -> logits [n]`` for a PyTorch sequence-classification model (numpy int64 batches in)."""
    import torch

    def run(batch):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()}).logits.float().reshape(-1)
            return out.cpu().numpy()

    return run
