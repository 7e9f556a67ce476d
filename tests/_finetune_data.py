"""Tiny learnable reranking datasets written by hand in prep's layout (parquet + unrolled json)."""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("apple banana cherry delta echo falcon guitar harbor island jungle kettle lemon mango nectar "
         "orange pepper quartz river saddle tiger umbrella violin walnut yellow zebra anchor bridge candle "
         "dragon engine forest garden hammer igloo jacket lantern marble needle").split()
FILLER = "the of and a to in is was for on with as by at from that this it be are".split()


def write_dataset(root, n_queries=40, n_neg=6, positives_per_query=1, seed=0, val_queries=0, marker=True,
                  first_stage_candidates=False):
    """Queries name a key word; its positive passage repeats it, negatives are about other words.

    With ``marker`` every positive also carries the word "relevant" (a signal a 2-layer random
    BERT picks up in a few dozen steps, so tests can assert that the loss falls).

    Writes ``root/corpus/train.parquet``, ``root/train_mined.automodel_unrolled.json`` and
    ``root/val.json`` (with ``val_queries`` held-out queries, or empty data). With ``first_stage_candidates``
    each val record also lists ``candidates`` as prep writes them: a first stage's ranking with scores (the
    positives at ranks 2-3, after a negative). Returns the paths.
    """
    rng = random.Random(seed)
    root = Path(root)
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    ids, texts = [], []

    def passage(word, positive=False):
        body = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
        if positive and marker:
            body.insert(rng.randrange(len(body) + 1), "relevant")
        for _ in range(3):
            body.insert(rng.randrange(len(body) + 1), word)
        ids.append(f"d{len(ids)}")
        texts.append(" ".join(body))
        return ids[-1]

    def records(start, count, unrolled=True):
        out = []
        for q in range(start, start + count):
            word = WORDS[q % len(WORDS)]
            pos = [passage(word, True) for _ in range(positives_per_query)]
            others = [w for w in WORDS if w != word]
            negs = [passage(rng.choice(others)) for _ in range(n_neg)]
            question = f"which passage talks about {word} {q}"
            docs = [{"id": d, "score": 0.5} for d in negs]
            if unrolled:
                for i, p in enumerate(pos):
                    out.append({"question_id": f"q{q}_{i}", "question": question, "corpus_id": "c",
                                "pos_doc": [{"id": p, "score": 0.9}], "neg_doc": docs})
            else:
                out.append({"question_id": f"q{q}", "question": question, "corpus_id": "c",
                            "pos_doc": [{"id": p, "score": 0.9} for p in pos], "neg_doc": docs})
                if first_stage_candidates:
                    ranking = negs[:1] + pos + negs[1:]
                    out[-1]["candidates"] = [{"id": d, "score": round(1.0 - 0.1 * r, 3)} for r, d in enumerate(ranking)]
        return out

    train = records(0, n_queries)
    val = records(n_queries, val_queries, unrolled=False) if val_queries else []
    corpus_path = root / "corpus" / "train.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus_path)
    train_path = root / "train_mined.automodel_unrolled.json"
    val_path = root / "val.json"
    train_path.write_text(json.dumps({"corpus": {"path": str(corpus_path)}, "data": train}))
    val_path.write_text(json.dumps({"corpus": {"path": str(corpus_path)}, "data": val}))
    return train_path, val_path, corpus_path
