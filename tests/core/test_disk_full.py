"""A full disk while writing an eval result, a checkpoint or an export (issue 19, fault tests).

A small tmpfs needs root, so the equivalent: the write itself fails with ``OSError(ENOSPC)`` after part of
the bytes reached the disk. In every case the final path holds no half-written file, nothing temporary is
left beside it, and the previous output still loads.
"""

from __future__ import annotations

import errno
import io
import json

import pytest

from rerankflow.config import load_config
from rerankflow.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class FillsUp(io.TextIOWrapper):
    """A text file that accepts ``budget`` characters, then fails like a full disk (what got written stays)."""

    budget = 0

    def write(self, s):
        room = FillsUp.budget
        if len(s) > room:
            super().write(s[:room])
            self.flush()
            FillsUp.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        FillsUp.budget -= len(s)
        return super().write(s)


def full_disk_open(budget):
    def _open(file, mode="r", *args, **kwargs):
        if "w" not in mode or "b" in mode:
            return open(file, mode, *args, **kwargs)
        FillsUp.budget = budget
        return FillsUp(open(file, mode.replace("w", "wb").replace("t", ""), buffering=0), encoding=kwargs.get("encoding", "utf-8"),
                       write_through=True)
    return _open


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_eval_results_written_on_a_full_disk_keep_the_previous_results(tmp_path, monkeypatch):
    import rerankflow.io as rio

    out = tmp_path / "stage3_eval"
    old = {"base": {"NDCG": {"NDCG@10": 0.431}}, "meta": {"run": 1}}
    write_json(out / "eval_results.json", old)
    write_jsonl(out / "runs.jsonl", [{"q": 1}])
    new = {"base": {"NDCG": {"NDCG@10": 0.5}}, "meta": {"run": 2, "pad": "x" * 5000}}
    monkeypatch.setattr(rio, "open", full_disk_open(budget=100), raising=False)
    with pytest.raises(OSError) as err:
        write_json(out / "eval_results.json", new)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        write_jsonl(out / "runs.jsonl", [{"q": i, "pad": "y" * 100} for i in range(50)])
    monkeypatch.undo()
    assert read_json(out / "eval_results.json") == old  # untouched, still valid JSON
    assert read_jsonl(out / "runs.jsonl") == [{"q": 1}]
    assert leftovers(out) == []  # the partial temporary files were removed
    # a first write that fails leaves no file at all
    monkeypatch.setattr(rio, "open", full_disk_open(budget=10), raising=False)
    with pytest.raises(OSError):
        write_json(out / "other.json", new)
    monkeypatch.undo()
    assert not (out / "other.json").exists() and leftovers(out) == []


def test_a_checkpoint_written_on_a_full_disk_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    """The trainer writes each step folder inside ``atomic_path(dest, is_dir=True)`` (rerankflow/train/loop.py)."""
    import transformers.modeling_utils as mu
    from transformers import AutoModelForSequenceClassification

    from rerankflow.testing import tiny_bert

    ckpts = tmp_path / "checkpoints"
    model_dir = tiny_bert(tmp_path / "src")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with atomic_path(ckpts / "epoch_0_step_1", is_dir=True) as tmp:
        model.save_pretrained(tmp / "model" / "consolidated", safe_serialization=True)

    real_save = mu.safe_save_file  # what save_pretrained writes safetensors with

    def save_then_fill(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # half the bytes made it, then the disk was full
            fh.truncate(max(1, fh.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", save_then_fill)
    with pytest.raises(OSError):
        with atomic_path(ckpts / "epoch_0_step_2", is_dir=True) as tmp:
            model.save_pretrained(tmp / "model" / "consolidated", safe_serialization=True)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0_step_1"]  # no half checkpoint, no temp folder
    reloaded = AutoModelForSequenceClassification.from_pretrained(ckpts / "epoch_0_step_1" / "model" / "consolidated")
    assert reloaded.config.num_labels == 1


def test_an_export_on_a_full_disk_keeps_the_previous_export_serving(tmp_path, monkeypatch):
    import numpy as np
    import onnx

    from rerankflow.export.onnx_export import export_onnx
    from rerankflow.scoring.onnx_scorer import OnnxScorer
    from rerankflow.scoring.onnx_session import choose_providers
    from rerankflow.testing import tiny_bert

    cfg = load_config()
    ex, rr = cfg["export"], cfg["reranker"]
    kw = dict(opset=ex["opset"], dtype="fp32", max_length=64, prompt_template=rr["prompt_template"],
              input_format=rr["input_format"], external_data_threshold_mb=ex["external_data_threshold_mb"])
    out = tmp_path / "onnx"
    export_onnx(tiny_bert(tmp_path / "ckpt"), out, **kw)
    scorer_args = dict(providers=choose_providers("cpu", key="deploy.device"), batch_size=8, intra_op_threads=1, max_padding=-1)
    before = OnnxScorer(out, **scorer_args).score("a query", ["a passage", "another passage"])
    record = (out / "rerankflow_export.json").read_text()

    real_save = onnx.save_model

    def save_then_fill(proto, path, *a, **k):
        real_save(proto, path, *a, **k)
        with open(path, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", save_then_fill)
    with pytest.raises(OSError):
        export_onnx(tiny_bert(tmp_path / "ckpt2", seed=1), out, **kw)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt2", "onnx"]  # no temporary export folder
    assert (out / "rerankflow_export.json").read_text() == record
    after = OnnxScorer(out, **scorer_args).score("a query", ["a passage", "another passage"])
    np.testing.assert_array_equal(before, after)  # the previous export, whole
    assert json.loads(record)["max_length"] == 64
