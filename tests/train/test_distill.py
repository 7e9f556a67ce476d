"""finetune.loss distill: prep's teacher scores on every training pair, and stage 2's listwise distillation
of them (a real tiny training run, the real base cross-encoder as teacher in prep)."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _finetune_data import write_dataset  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.errors import InputError  # noqa: E402
from rerankflow.testing import tiny_bert  # noqa: E402
from rerankflow.train.finetune import run_finetune  # noqa: E402
from rerankflow.train.loop import distill_loss  # noqa: E402

CONFIG = load_config()
FT = {**CONFIG["finetune"], "num_epochs": 1, "max_steps": 40, "learning_rate": 5e-3, "global_batch_size": 8,
      "local_batch_size": 4, "train_n_passages": 4, "val_every_steps": 0, "checkpoint_every_steps": 0,
      "val_queries": 6, "small_data_autoscale": False, "warmup_ratio": 0.1, "precision": "fp32",
      "loss": "distill", "distill_alpha": 0.0, "distill_temperature": 1.0}
RERANKER = {**CONFIG["reranker"], "max_length": 96, "input_format": "pair"}


def test_distill_loss_is_the_label_loss_at_alpha_one_and_zero_when_the_student_is_the_teacher():
    import torch

    F = torch.nn.functional
    student = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0]])
    teacher = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, -2.0]])
    ce = F.cross_entropy(student, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(distill_loss(student, teacher, 1.0, 1.0), ce)
    assert float(distill_loss(teacher, teacher, 0.0, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # hand-computed KL(teacher || student) at T = 2, scaled by T^2, mixed 30/70 with the label loss
    p, q = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean()) * 4
    assert float(distill_loss(student, teacher, 0.3, 2.0)) == pytest.approx(0.3 * float(ce) + 0.7 * kl, rel=1e-5)
    # the gradient moves the student toward the teacher's order and never into the teacher
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    distill_loss(s, t, 0.0, 1.0).backward()
    assert t.grad is None
    assert s.grad[0, 1] < 0 < s.grad[0, 0]  # the teacher puts passage 1 first in group 0: raise it, lower 0


def _with_teacher(train_path, logit):
    """Add ``"teacher": logit(passage text)`` to every pos_doc / neg_doc entry of a training file."""
    import pyarrow.parquet as pq

    obj = json.loads(train_path.read_text())
    t = pq.read_table(obj["corpus"]["path"])
    text = dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))
    for rec in obj["data"]:
        for d in rec["pos_doc"] + rec["neg_doc"]:
            d["teacher"] = logit(text[d["id"]])
    train_path.write_text(json.dumps(obj))
    return obj


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("distill_base") / "base")


def _scores(model_dir, pairs):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir), device="cpu").predict(pairs)


def test_teacher_targets_are_the_teachers_scores_of_exactly_the_pairs_trained_on(tmp_path, base):
    from rerankflow.train.loop import Training
    from rerankflow.train.spec import make_spec

    train, val, _ = write_dataset(tmp_path / "data", n_queries=16, n_neg=6)
    obj = _with_teacher(train, lambda text: round(len(text) / 10.0, 3))  # any value distinct per passage
    teacher = {(r["question"], d["id"]): d["teacher"] for r in obj["data"] for d in r["pos_doc"] + r["neg_doc"]}
    spec = make_spec(train, val, str(base), tmp_path / "out", FT, RERANKER, seed=5, device="cpu", threads=1)
    tr = Training(spec)
    from rerankflow.train.batches import _MicroBatches

    plan = tr.builder.plan(0)
    mb = _MicroBatches(plan, 0, tr.D, tr.data, tr.collator)
    seen = 0
    for i in range(len(mb)):
        labels, _enc, targets = mb[i]
        assert len(targets) == len(labels) == len(mb.items[i])
        for (ei, slot), target in zip(mb.items[i], targets):
            ex = tr.data.examples[ei]
            pid = plan.passage_id(tr.data.examples, ei, slot)
            assert target == teacher[(ex.question, pid)]
            seen += 1
    assert seen == len(mb.items) * 4 * 4 > 0  # every pair of every group: 4 groups of 4 passages per micro-batch


def test_distillation_alone_teaches_the_teachers_order_and_a_seeded_rerun_repeats_the_loss_curve(tmp_path, base):
    """alpha 0: the labels are not used. A teacher that prefers each query's negatives about a wrong word
    over the labelled positive makes the student rank them so; a teacher that prefers the positive makes it
    rank the positive first. The same seed gives the same loss at every step."""
    pairs = [("which passage talks about apple 0", "the apple of relevant apple in apple"),
             ("which passage talks about apple 0", "the of zebra and zebra a to zebra")]
    runs = {}
    for name, logit in (("right", lambda t: 6.0 if "relevant" in t else 0.0),
                        ("wrong", lambda t: 0.0 if "relevant" in t else 6.0)):
        train, val, _ = write_dataset(tmp_path / name / "data", n_queries=48, n_neg=6)
        _with_teacher(train, logit)
        out = tmp_path / name / "out"
        summary = run_finetune(train, val, str(base), out, FT, RERANKER, seed=3, device="cpu", threads=1, gpus=0)
        runs[name] = (summary, out, train, val)
    right = _scores(runs["right"][1] / "checkpoints" / "LATEST" / "model" / "consolidated", pairs)
    wrong = _scores(runs["wrong"][1] / "checkpoints" / "LATEST" / "model" / "consolidated", pairs)
    assert right[0] - right[1] > 0.3, right  # CrossEncoder.predict: sigmoid of the logit
    assert wrong[1] - wrong[0] > 0.3, wrong

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "training_log.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "train"]
    first = losses(runs["right"][1])
    assert len(first) == FT["max_steps"] and np.mean(first[-10:]) < 0.5 * np.mean(first[:10])
    _summary, _out, train, val = runs["right"]
    run_finetune(train, val, str(base), tmp_path / "again", FT, RERANKER, seed=3, device="cpu", threads=1, gpus=0)
    assert losses(tmp_path / "again") == first


def test_distill_without_teacher_scores_names_the_file_question_and_passage(tmp_path, base):
    train, val, _ = write_dataset(tmp_path / "data", n_queries=8, n_neg=3)
    obj = _with_teacher(train, lambda t: 1.0)
    rec = obj["data"][2]
    del rec["neg_doc"][1]["teacher"]
    train.write_text(json.dumps(obj))
    with pytest.raises(InputError) as err:
        run_finetune(train, val, str(base), tmp_path / "out", FT, RERANKER, seed=3, device="cpu", threads=1, gpus=0)
    msg = str(err.value)
    assert str(train) in msg and rec["question_id"] in msg and rec["neg_doc"][1]["id"] in msg and "teacher" in msg
    rec["neg_doc"][1]["teacher"] = "high"
    train.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="expected a number"):
        run_finetune(train, val, str(base), tmp_path / "out2", FT, RERANKER, seed=3, device="cpu", threads=1, gpus=0)


def test_other_losses_need_no_distill_keys(tmp_path, base):
    from rerankflow.train.spec import check_finetune_config

    plain = {k: v for k, v in {**FT, "loss": "listwise"}.items() if not k.startswith("distill_")}
    assert check_finetune_config(plain)["loss"] == "listwise"
    with pytest.raises(InputError, match="distill_alpha"):
        check_finetune_config({k: v for k, v in FT.items() if k != "distill_alpha"})
