"""Stage 2 step numerics: bf16 autocast on CPU moves the loss like fp32; gradient checkpointing changes
nothing but memory. Real tiny training runs through ``run_finetune`` (behaviour, never timing)."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _finetune_data import write_dataset  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.testing import tiny_bert  # noqa: E402
from rerankflow.train.finetune import run_finetune  # noqa: E402
from rerankflow.train.loop import (  # noqa: E402
    enable_gradient_checkpointing, gradient_checkpointing_on, resolve_bf16, train_setup,
)
from rerankflow.train.spec import make_spec, run_hash  # noqa: E402

STEPS = 30
CONFIG = load_config()
FT = {**CONFIG["finetune"], "max_steps": STEPS, "learning_rate": 5e-3, "global_batch_size": 8, "local_batch_size": 4,
      "train_n_passages": 5, "val_queries": 0, "val_every_steps": 0, "checkpoint_every_steps": 0,
      "small_data_autoscale": False, "warmup_ratio": 0.1}
RERANKER = {**CONFIG["reranker"], "max_length": 96}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    train, val, _ = write_dataset(root / "data", n_queries=40)
    return root, train, val, tiny_bert(root / "base")


def _train(data, name, **settings):
    root, train, val, base = data
    out = root / name
    summary = run_finetune(train, val, str(base), out, {**FT, **settings}, RERANKER, seed=5, device="cpu", threads=1, gpus=0)
    recs = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r["event"] == "start")
    return np.array([r["loss"] for r in recs if r["event"] == "train"]), start, summary


@pytest.fixture(scope="module")
def fp32(data):
    return _train(data, "fp32", precision="fp32")


def test_bf16_step_moves_the_loss_like_fp32(data, fp32):
    """Same seed, same batches: the loss after each step in bf16 autocast is within 5% (relative) of fp32's,
    and training lowers the loss by the same amount (within 10%). A broken bf16 backward (no gradient, a
    wrong scale, an overflow) would leave the loss where it started or send it elsewhere."""
    loss32, start32, _ = fp32
    loss16, start16, summary = _train(data, "bf16", precision="bf16")
    assert start16["bf16"] is True and start32["bf16"] is False and summary["setup"]["bf16"] is True
    assert loss32[-3:].mean() < 0.7 * loss32[0], loss32            # fp32 learns in these steps
    assert not np.array_equal(loss16, loss32)                       # autocast really ran in bf16
    rel = np.abs(loss16 - loss32) / loss32
    assert rel.max() < 0.05, (loss32, loss16)
    drop32, drop16 = loss32[0] - loss32[-3:].mean(), loss16[0] - loss16[-3:].mean()
    assert abs(drop16 - drop32) < 0.10 * drop32, (drop32, drop16)


def test_gradient_checkpointing_same_loss_and_really_on(data, fp32):
    loss32, start32, _ = fp32
    loss_gc, start_gc, summary = _train(data, "gc", precision="fp32", gradient_checkpointing=True)
    assert start_gc["gradient_checkpointing"] is True and start32["gradient_checkpointing"] is False
    assert summary["setup"]["gradient_checkpointing"] is True
    np.testing.assert_allclose(loss_gc, loss32, rtol=0, atol=1e-5)  # recomputation replays dropout's RNG
    # same weights, so a checkpoint of one resumes the other
    root, train, val, base = data
    specs = [make_spec(train, val, str(base), root / "h", {**FT, "gradient_checkpointing": g}, RERANKER, seed=5,
                       device="cpu", threads=1) for g in (False, True)]
    assert run_hash(specs[0]) == run_hash(specs[1])


def test_gradient_checkpointing_recomputes_layers(data):
    """Enabled, every encoder layer runs its forward twice per training step (once more in backward)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    base = data[3]
    calls = {}
    for on in (False, True):
        model = AutoModelForSequenceClassification.from_pretrained(str(base))
        if on:
            enable_gradient_checkpointing(model)
        assert gradient_checkpointing_on(model) is on and train_setup(model, False)["gradient_checkpointing"] is on
        model.train()
        calls[on] = 0

        def count(*_, key=on):
            calls[key] += 1

        # a submodule: the layer's own hooks stay outside the checkpoint, what its forward calls is replayed
        model.bert.encoder.layer[0].intermediate.register_forward_hook(count)
        ids = torch.randint(5, 1000, (4, 16))
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert calls == {False: 1, True: 2}


def test_training_records_attention_implementation(fp32):
    _, start, summary = fp32
    assert start["attn_implementation"] == "sdpa" == summary["setup"]["attn_implementation"]
    assert start["attention_dropout"] == summary["setup"]["attention_dropout"]


def test_auto_precision_is_bf16_exactly_on_a_cpu_with_native_bf16(monkeypatch):
    """auto follows the CPU's flags (AVX-512 BF16 / AMX: bf16; otherwise fp32); bf16 and fp32 are what they say."""
    import rerankflow.train.loop as loop

    for native in (True, False):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_bf16("auto", "cpu") is native
        assert resolve_bf16("bf16", "cpu") is True and resolve_bf16("fp32", "cpu") is False


def test_attention_dropout_reaches_the_model_and_the_hash(data, fp32):
    """finetune.attention_dropout: 0 trains without dropout on the attention probabilities (recorded in the
    setup), changes the losses of the same seed and batches, and is part of the resume hash; null keeps the
    model's own dropout and the hash of runs written before the key existed."""
    loss32, start32, _ = fp32
    loss0, start0, summary = _train(data, "ad0", precision="fp32", attention_dropout=0.0)
    assert start32["attention_dropout"] > 0 and start0["attention_dropout"] == 0.0
    assert summary["setup"]["attention_dropout"] == 0.0
    assert not np.array_equal(loss0, loss32)
    root, train, val, base = data
    specs = {ad: make_spec(train, val, str(base), root / "h2", {**FT, "attention_dropout": ad}, RERANKER, seed=5,
                           device="cpu", threads=1) for ad in (None, 0.0)}
    old = dict(specs[None], finetune={k: v for k, v in specs[None]["finetune"].items() if k != "attention_dropout"})
    assert run_hash(specs[None]) == run_hash(old) != run_hash(specs[0.0])
