"""The training loop of one process (rank) of a run described by a spec (:mod:`rerankflow.train.spec`).

:func:`train` runs (or resumes, or finishes) the run: data and length-grouped plan
(:mod:`rerankflow.train.data`), model, AdamW with linear warmup and cosine decay, optional DDP
(:mod:`rerankflow.train.distributed`), validation every ``val_every_steps`` with the package's torch
scorer (:class:`rerankflow.scoring.cross_encoder.CrossEncoderScorer` on the model in memory) and
pytrec_eval metrics (:mod:`rerankflow.eval.metrics`), checkpoints (:mod:`rerankflow.train.checkpoints`),
early stopping. Events go to ``training_log.partial.jsonl`` as they happen and to ``training_log.jsonl``
when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from rerankflow.errors import InputError
from rerankflow.eval.fusion import choose_fusion_weight
from rerankflow.eval.metrics import per_query_metrics
from rerankflow.io import atomic_path, sha256_file, write_json, write_jsonl, write_text
from rerankflow.scoring.cross_encoder import CrossEncoderScorer
from rerankflow.scoring.fusion import FUSION_RECORD
from rerankflow.scoring.paths import cpu_has_native_bf16
from rerankflow.train.batches import Collator, epoch_batches
from rerankflow.train.checkpoints import finish, prepare_checkpoint_dir, prune, set_link
from rerankflow.train.distributed import Dist, rng_state, seed_all, set_rng_state
from rerankflow.train.report import model_card
from rerankflow.train.spec import autoscale_batch, run_hash, spec_input_format

log = logging.getLogger("rerankflow.train.finetune")

FEW_STEPS_WARNING = 20          # warn when the whole run has fewer optimizer steps


def validation_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict:
    """Mean MRR (over the whole candidate list) and nDCG@10 of the validation queries in ``run``."""
    run = {q: docs for q, docs in run.items() if docs and q in qrels}
    if not run:
        return {}
    depth = max(len(docs) for docs in run.values())
    per_query = per_query_metrics({q: qrels[q] for q in run}, run, [10, depth])
    n = len(per_query)
    return {
        "val_mrr": round(sum(r[f"MRR@{depth}"] for r in per_query.values()) / n, 6),
        "val_ndcg@10": round(sum(r["NDCG@10"] for r in per_query.values()) / n, 6),
        "val_queries": n,
    }


def fusion_metrics(run: dict[str, dict[str, float]], val: list, qrels: dict[str, dict[str, int]]) -> dict:
    """The fusion weight chosen on this validation (``val`` queries that carry first-stage scores), as
    ``{"fusion": choice}`` (see :func:`rerankflow.eval.fusion.choose_fusion_weight`), or ``{}`` without them."""
    first = {v.qid: v.first_stage for v in val if v.first_stage and v.qid in run}
    if not first or len(first) < len(val):
        return {}
    choice = choose_fusion_weight({q: run[q] for q in first}, first, {q: qrels[q] for q in first})
    return {"val_fused_ndcg@10": choice["score"], "val_first_stage_ndcg@10": choice["first_stage_score"],
            "fusion": choice}


def distill_loss(logits, teacher, alpha: float, temperature: float):
    """Listwise knowledge distillation over ``[groups, passages]`` logits (positive in column 0):
    ``alpha`` x cross-entropy on the label + ``(1 - alpha)`` x ``T^2`` x KL(softmax(teacher / T) ||
    softmax(student / T)), T = ``temperature`` (Hinton et al.: T^2 keeps the soft term's gradient scale
    independent of T). The teacher's logits are targets only: no gradient flows into them."""
    import torch

    F = torch.nn.functional
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    hard = F.cross_entropy(logits, target)
    if alpha >= 1.0:
        return hard
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher.detach() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    return alpha * hard + (1.0 - alpha) * soft


def _param_groups(model, weight_decay: float):
    """AdamW groups: no weight decay on biases and norm weights (every parameter with < 2 dims)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT family; most others


def _load_model(path: str, attention_dropout: float | None = None):
    """The base model and tokenizer for training: a 1-logit head, SDPA attention where the architecture has it,
    and, when ``attention_dropout`` is a number, that dropout on the attention probabilities instead of the
    model's own (``finetune.attention_dropout``; 0 lets PyTorch's fused CPU attention kernel run)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    conf = AutoConfig.from_pretrained(path)
    kwargs = {}
    if getattr(conf, "num_labels", 1) != 1:
        kwargs = {"num_labels": 1, "ignore_mismatched_sizes": True}
        log.warning("base model has num_labels=%s; training a fresh 1-logit head", conf.num_labels)
    if attention_dropout is not None:
        keys = [k for k in ATTENTION_DROPOUT_KEYS if hasattr(conf, k)]
        if not keys:
            raise InputError(f"{type(conf).__name__} has no attention dropout setting ({', '.join(ATTENTION_DROPOUT_KEYS)}); "
                             "set finetune.attention_dropout: null for this model", key="finetune.attention_dropout")
        kwargs.update({k: float(attention_dropout) for k in keys})
    try:  # PyTorch's fused attention where the architecture has it (transformers 5 defaults to it already)
        model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as e:
        log.warning("%s: no SDPA attention (%s); training with the model's default attention",
                    type(conf).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def enable_gradient_checkpointing(model) -> None:
    """``finetune.gradient_checkpointing``: recompute each layer's activations in the backward pass
    (non-reentrant checkpointing: works with DDP, frozen inputs and ``torch.no_grad`` validation)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing",
                         key="finetune.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_setup(model, use_bf16: bool) -> dict:
    """How the steps run, for the log and the summary: attention implementation (and the attention dropout
    that decides PyTorch's CPU SDPA kernel: its fused kernel has no dropout, so training with dropout > 0
    runs SDPA's math kernel), bf16 autocast, gradient checkpointing."""
    conf = model.config
    return {"attn_implementation": getattr(conf, "_attn_implementation", None),
            "attention_dropout": getattr(conf, "attention_probs_dropout_prob", getattr(conf, "attention_dropout", None)),
            "bf16": use_bf16, "gradient_checkpointing": gradient_checkpointing_on(model)}


def gradient_checkpointing_on(model) -> bool:
    """Whether ``model`` recomputes activations in backward (transformers 5 renamed the flag)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def resolve_bf16(precision: str, device: str) -> bool:
    """Whether stage 2 trains under bf16 autocast: ``bf16`` always; ``fp32`` never; ``auto`` on a GPU that
    supports bf16, and on a CPU that computes bf16 natively (AVX-512 BF16 or AMX: measured at the SciFact A
    settings, 1.27x the pairs/s of fp32 with the loss within 2.3% of fp32's at every step of a 30-step curve;
    benchmarks/RESULTS.md).
    A CPU without native bf16 would emulate it, slower than fp32, so ``auto`` stays fp32 there."""
    if precision == "bf16":
        return True
    if precision != "auto":
        return False
    if str(device).startswith("cuda"):
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


class Training:
    """One rank's state of a run: data plan, model, optimizer, schedule, progress (``state``) and log."""

    def __init__(self, spec: dict):
        from rerankflow.train.data import load_training_data

        import torch

        self.ft = ft = spec["finetune"]
        self.out_dir = Path(spec["out_dir"])
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.device = spec["device"]
        self.D = Dist(self.device)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(spec["threads"]) // self.D.world))
        self.seed = int(spec["seed"])
        seed_all(self.seed + self.D.rank)
        self.distill = ft["loss"] == "distill"
        self.data = load_training_data(spec["train_path"], spec.get("val_path"), int(ft["val_queries"]), self.seed,
                                       int(ft["val_max_queries"]), need_teacher=self.distill)
        self.spec = dict(spec, corpus_sha256=sha256_file(self.data.corpus_path))
        self.hash = run_hash(self.spec)
        self.n_pass = int(ft["train_n_passages"])
        self.listwise = ft["loss"] in ("listwise", "distill")  # distill: whole groups too
        self.model, self.tok = _load_model(self.spec["base_model"], self.ft.get("attention_dropout"))
        self.warnings: list[str] = []
        if ft["gradient_checkpointing"]:
            enable_gradient_checkpointing(self.model)
        self._plan_batches()
        self._build_optimizer()
        self.records: list[dict] = []
        self.state = {"hash": self.hash, "step": 0, "epoch": 0, "step_in_epoch": 0, "best_metric": None,
                      "best_step": None, "best_name": None, "bad_evals": 0, "done": False, "stopped_early": False,
                      "total_steps": self.total, "global_batch_size": self.gb,
                      "n_train_examples": len(self.data.examples), "n_val_queries": len(self.data.val),
                      "val_source": self.data.val_source, "last_val": None, "base_val": None}
        self.qrels = {v.qid: {d: 1 for d in v.relevant} for v in self.data.val}
        self.live_log = self.out_dir / "training_log.partial.jsonl"
        self.live_fh = None

    def _plan_batches(self) -> None:
        """Global batch (small-data rule), gradient accumulation, the epoch plan builder, total steps, warnings."""
        from rerankflow.train.data import PlanBuilder

        ft, D, data = self.ft, self.D, self.data
        local_bs = self.local_bs = int(ft["local_batch_size"])
        gb, note = autoscale_batch(len(data.examples), int(ft["global_batch_size"]), local_bs, D.world,
                                   bool(ft["small_data_autoscale"]))
        if gb % (local_bs * D.world):
            raise InputError(f"global_batch_size {gb} must be a multiple of local_batch_size x processes "
                             f"({local_bs} x {D.world})", key="finetune.global_batch_size")
        self.gb, self.accum = gb, gb // (local_bs * D.world)
        micro_per_step = gb // local_bs            # world-independent: rank r takes micro-batches r, r+world, ...
        if note:
            self.warnings.append(note)
        self.builder = PlanBuilder(data.examples, data.passages, self.tok, self.spec["prompt_template"],
                                   self.spec["max_length"], self.n_pass - 1, local_bs, micro_per_step, self.seed,
                                   bool(ft["group_by_length"]), listwise=self.listwise,
                                   input_format=spec_input_format(self.spec))
        self.spe = self.builder.steps_per_epoch()
        if self.spe < 1:
            raise InputError(f"{len(data.examples)} training examples are fewer than one optimizer step of "
                             f"{gb} queries; lower global_batch_size", key="finetune.global_batch_size")
        self.total = int(ft["max_steps"]) if int(ft["max_steps"]) > 0 else self.spe * int(ft["num_epochs"])
        if self.builder.sampler.short:
            self.warnings.append(
                f"{self.builder.sampler.short} of {len(data.examples)} examples have fewer mined negatives than "
                f"train_n_passages - 1 = {self.n_pass - 1}; they are filled with random corpus passages "
                "(mine more: prep.hard_negatives_to_mine >= train_n_passages - 1)")
        if self.total < FEW_STEPS_WARNING:
            self.warnings.append(f"only {self.total} optimizer steps: too few to learn much; raise num_epochs or "
                                 "lower global_batch_size")
        if not data.val:
            self.warnings.append("no validation queries (val.json empty and val_queries = 0): BEST = LATEST")
        if D.main:
            for w in self.warnings:
                log.warning(w)

    def _build_optimizer(self) -> None:
        """Precision, AdamW, schedule, DDP wrapper, collator and the validation scorer."""
        import torch
        from transformers import get_cosine_schedule_with_warmup

        ft, D, device = self.ft, self.D, self.device
        precision = ft["precision"]
        self.use_bf16 = use_bf16 = resolve_bf16(precision, device)
        self.autocast_ctx = (lambda: torch.autocast(device_type=D.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.model.to(D.device)
        self.model.train()
        opt_kwargs = {"fused": True} if device == "cuda" else {}
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, float(ft["weight_decay"])),
                                           lr=float(ft["learning_rate"]), **opt_kwargs)
        warmup = int(math.ceil(float(ft["warmup_ratio"]) * self.total))
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total)
        self.ddp_model = self.model
        if D.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=[D.local_rank] if device == "cuda" else None)
        fmt = spec_input_format(self.spec)
        self.collator = Collator(self.tok, self.spec["prompt_template"], self.spec["max_length"],
                                  8 if device == "cuda" else None, input_format=fmt)
        self.scorer = CrossEncoderScorer.from_model(
            self.model, self.tok, max_length=self.spec["max_length"], template=self.spec["prompt_template"],
            device=D.device, bf16=use_bf16, batch_size=int(ft["val_batch_size"]), input_format=fmt)

    # ------------------------------------------------------------------ resume, log
    def resume_or_start(self) -> None:
        """Resume from the newest checkpoint of this run's hash (others are moved aside), else log the start."""
        import torch

        D, state = self.D, self.state
        resume_from = prepare_checkpoint_dir(self.ckpt_dir, self.hash, self.out_dir) if D.main else None
        resume_from = D.gather(resume_from)[0]
        if resume_from:
            tdir = self.ckpt_dir / resume_from / "training_state"
            saved = json.loads((tdir / "trainer_state.json").read_text())
            self.records = saved.pop("log")
            state.update(saved)
            blob = torch.load(tdir / "state.pt", map_location="cpu", weights_only=False)
            from transformers import AutoModelForSequenceClassification

            loaded = AutoModelForSequenceClassification.from_pretrained(self.ckpt_dir / resume_from / "model" / "consolidated")
            self.model.load_state_dict(loaded.state_dict())
            del loaded
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            rngs = blob.get("rng") or []
            if len(rngs) == D.world:
                set_rng_state(rngs[D.rank])
            else:
                seed_all(self.seed + 1000 * state["step"] + D.rank)
            self.records.append({"event": "resume", "from_step": state["step"], "checkpoint": resume_from,
                                 **train_setup(self.model, self.use_bf16), "time": time.time()})
            if D.main:
                log.info("resuming from %s (step %d of %d)", resume_from, state["step"], self.total)
        else:
            self.records.append({"event": "start", "hash": self.hash, "total_steps": self.total,
                                 "steps_per_epoch": self.spe, "global_batch_size": self.gb,
                                 "local_batch_size": self.local_bs, "grad_accum": self.accum, "world_size": D.world,
                                 "train_examples": len(self.data.examples), "val_queries": len(self.data.val),
                                 "val_source": self.data.val_source, **train_setup(self.model, self.use_bf16),
                                 "warnings": self.warnings, "time": time.time()})
        state["setup"] = train_setup(self.model, self.use_bf16)  # this process's, also after a resume
        if D.main:
            log.info("training with %s", state["setup"])
            write_jsonl(self.live_log, self.records)
            self.live_fh = open(self.live_log, "a", encoding="utf-8")

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        if self.live_fh:
            self.live_fh.write(json.dumps(rec) + "\n")
            self.live_fh.flush()

    # ------------------------------------------------------------------ validation, checkpoints
    def validate(self) -> dict:
        """This rank's share of the validation queries scored, gathered, and the metrics of all of them."""
        D, data = self.D, self.data
        mine = [v for i, v in enumerate(data.val) if i % D.world == D.rank]
        pairs, owners = [], []
        for v in mine:
            for d in v.candidates:
                pairs.append((v.question, data.passages[d]))
                owners.append((v.qid, d))
        scores = self.scorer.score(pairs, sort_by_length=True, progress=False, desc="validation")
        run: dict[str, dict[str, float]] = {}
        for (q, d), s in zip(owners, scores):
            run.setdefault(q, {})[d] = float(s)
        merged = {}
        for part in D.gather(run):
            merged.update(part)
        return {**validation_metrics(merged, self.qrels), **fusion_metrics(merged, data.val, self.qrels)}

    def validate_base(self) -> None:
        """Validate the untouched base model once, before the first step (``finetune.val_at_start``): the
        reference every later validation is read against, and the base's own fusion weight."""
        state = self.state
        if not (self.data.val and self.ft["val_at_start"]) or state["step"] > 0 or state.get("base_val") is not None:
            return
        self.model.eval()
        import torch

        with torch.no_grad():
            metrics = self.validate()
        self.model.train()
        state["base_val"] = metrics
        self.emit({"event": "val", "step": 0, "epoch": 0, "base": True, **metrics})
        if self.D.main:
            log.info("base model: val MRR %.4f nDCG@10 %.4f%s", metrics["val_mrr"], metrics["val_ndcg@10"],
                     f" (fused with the first stage: {metrics['val_fused_ndcg@10']:.4f} at weight "
                     f"{metrics['fusion']['weight']:.2f})" if "fusion" in metrics else "")

    def save(self, step_metrics) -> str:
        """Write the checkpoint of the current step (all ranks' RNG states), move LATEST/BEST, prune."""
        import torch

        state, spec = self.state, self.spec
        name = f"epoch_{state['epoch']}_step_{state['step']}"
        rngs = self.D.gather(rng_state())
        if self.D.main:
            dest = self.ckpt_dir / name
            if dest.exists():
                shutil.rmtree(dest)
            with atomic_path(dest, is_dir=True) as tmp:
                cons = tmp / "model" / "consolidated"
                self.model.save_pretrained(cons, safe_serialization=True)
                self.tok.save_pretrained(cons)
                write_text(cons / "README.md", model_card(spec, state, step_metrics))
                if step_metrics and "fusion" in step_metrics:
                    write_json(cons / FUSION_RECORD, {**step_metrics["fusion"], "chosen_on": "validation",
                                                      "step": state["step"]})
                write_json(cons / "rerankflow.json", {"prompt_template": spec["prompt_template"],
                                                      "input_format": spec_input_format(spec),
                                                      "max_length": spec["max_length"], "step": state["step"],
                                                      "metrics": step_metrics, "base_model": spec["base_model"]})
                tdir = tmp / "training_state"
                tdir.mkdir()
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": rngs}, tdir / "state.pt")
                write_json(tdir / "trainer_state.json", {**state, "log": self.records}, indent=None)
            set_link(self.ckpt_dir, "LATEST", name)
            if state["best_name"] == name or not self.data.val:
                set_link(self.ckpt_dir, "BEST", name)
            prune(self.ckpt_dir, int(self.ft["keep_checkpoints"]), keep={name, state["best_name"]})
        self.D.barrier()
        return name

    # ------------------------------------------------------------------ the loop
    def step(self, batches) -> tuple[float, int, float, float]:
        """One optimizer step over ``accum`` micro-batches; returns (mean loss, pairs, seconds, cpu seconds)."""
        import torch

        D = self.D
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum, n_pairs = 0.0, 0
        for mi in range(self.accum):
            labels, enc, teacher = next(batches)
            enc = enc.to(D.device)
            sync = mi == self.accum - 1
            ctx = self.ddp_model.no_sync() if (D.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with self.autocast_ctx():
                    logits = self.ddp_model(**enc).logits.float().view(-1)
                if self.distill:
                    loss = distill_loss(logits.view(-1, self.n_pass),
                                        torch.tensor(teacher, dtype=torch.float32, device=D.device).view(-1, self.n_pass),
                                        float(self.ft["distill_alpha"]), float(self.ft["distill_temperature"]))
                elif self.listwise:  # rows are whole groups, positive first
                    logits = logits.view(-1, self.n_pass)
                    target = torch.zeros(logits.shape[0], dtype=torch.long, device=D.device)
                    loss = torch.nn.functional.cross_entropy(logits, target)
                else:
                    target = torch.tensor(labels, dtype=torch.float32, device=D.device)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
                (loss / self.accum).backward()
            loss_sum += float(loss.detach())
            n_pairs += int(enc["input_ids"].shape[0])
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.ft["max_grad_norm"]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["step_in_epoch"] += 1
        if self.device == "cuda":
            torch.cuda.synchronize()
        return D.mean(loss_sum / self.accum), n_pairs * D.world, time.perf_counter() - t0, time.process_time() - c0

    def after_step(self) -> None:
        """Validate when due (BEST, early stopping), then checkpoint when due."""
        state, ft = self.state, self.ft
        val_every, ckpt_every, patience = int(ft["val_every_steps"]), int(ft["checkpoint_every_steps"]), int(ft["patience"])
        final = state["step"] >= self.total
        metrics = None
        improved = False
        if self.data.val and (final or (val_every > 0 and state["step"] % val_every == 0)):
            metrics = self.validate()
            state["last_val"] = metrics
            self.emit({"event": "val", "step": state["step"], "epoch": state["epoch"], **metrics})
            if self.D.main:
                log.info("step %d: val MRR %.4f nDCG@10 %.4f%s", state["step"], metrics["val_mrr"], metrics["val_ndcg@10"],
                         f" (fused {metrics['val_fused_ndcg@10']:.4f} at weight {metrics['fusion']['weight']:.2f})"
                         if "fusion" in metrics else "")
            if state["best_metric"] is None or metrics["val_ndcg@10"] > state["best_metric"]:
                improved = True
                state.update(best_metric=metrics["val_ndcg@10"], best_step=state["step"], bad_evals=0,
                             best_name=f"epoch_{state['epoch']}_step_{state['step']}")
            else:
                state["bad_evals"] += 1
                if patience > 0 and state["bad_evals"] >= patience:
                    state["stopped_early"] = True
                    self.emit({"event": "early_stop", "step": state["step"], "best_step": state["best_step"],
                               "best_val_ndcg@10": state["best_metric"]})
                    if self.D.main:
                        log.info("early stopping at step %d (best step %d)", state["step"], state["best_step"])
        if final or state["stopped_early"]:
            state["done"] = True
        if state["done"] or improved or (ckpt_every > 0 and state["step"] % ckpt_every == 0):
            name = self.save(metrics)
            self.emit({"event": "checkpoint", "step": state["step"], "name": name})

    def run(self) -> tuple[int, float]:
        """Steps until the total (or early stopping); returns (pairs trained, seconds spent in steps)."""
        from tqdm.auto import tqdm

        state = self.state
        pbar = tqdm(total=self.total, initial=state["step"], desc="finetune", disable=not self.D.main,
                    dynamic_ncols=True, mininterval=1.0)
        plan_epoch, batches = None, None
        pairs_done, t_train = 0, 0.0
        while state["step"] < self.total and not state["done"]:
            if state["step_in_epoch"] >= self.spe:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
            if plan_epoch != state["epoch"]:
                plan = self.builder.plan(state["epoch"])
                plan_epoch = state["epoch"]
                batches = epoch_batches(plan, state["step_in_epoch"], self.D, self.data, self.collator,
                                         int(self.ft["num_workers"]))
            loss_val, step_pairs, dt, dcpu = self.step(batches)
            pairs_done += step_pairs
            t_train += dt
            self.emit({"event": "train", "step": state["step"], "epoch": state["epoch"], "loss": round(loss_val, 6),
                       "lr": self.scheduler.get_last_lr()[0], "grad_norm": round(float(self.grad_norm), 6),
                       "pairs_per_s": round(step_pairs / dt, 3) if dt > 0 else None, "cpu_s": round(dcpu, 4)})
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_val:.4f}", pairs_s=f"{pairs_done / max(t_train, 1e-9):.1f}")
            self.after_step()
        pbar.close()
        return pairs_done, t_train


def train(spec: dict) -> dict:
    """Run (or resume, or finish) the training described by ``spec`` in this process / rank.

    Returns the run summary on the main rank (None on the others).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t = Training(spec)
    t.resume_or_start()
    t.validate_base()
    pairs_done, t_train = t.run()
    summary = None
    if t.D.main:  # also reached directly when resuming a finished run
        summary = finish(t.ckpt_dir, t.out_dir, t.state, t.records, t.data, pairs_done, t_train)
        if t.live_fh:
            t.live_fh.close()
        t.live_log.unlink(missing_ok=True)
    t.D.barrier()
    t.D.close()
    return summary
