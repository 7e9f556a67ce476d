"""What a run reports: the training curve (PNG) and the model card of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rerankflow.formatting import check_input_format
from rerankflow.io import atomic_path
from rerankflow.train.spec import spec_input_format


def plot_curve(records: list[dict], path: Path) -> None:
    """Training loss (and its moving average) and validation metrics by step, as a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in records if r.get("event") == "train"]
    va = [r for r in records if r.get("event") == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        steps = [r["step"] for r in tr]
        loss = np.array([r["loss"] for r in tr], dtype=float)
        ax[0].plot(steps, loss, alpha=0.35, label="loss")
        w = max(1, len(loss) // 20)
        if w > 1:
            ma = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax[0].plot(steps[w - 1:], ma, label=f"moving avg ({w})")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss")
    ax[0].legend()
    if va:
        vs = [r["step"] for r in va]
        ax[1].plot(vs, [r["val_ndcg@10"] for r in va], marker="o", label="val nDCG@10")
        ax[1].plot(vs, [r["val_mrr"] for r in va], marker="s", label="val MRR")
        ax[1].legend()
    else:
        ax[1].text(0.5, 0.5, "no validation set", ha="center", va="center")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("validation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def model_card(spec: dict, state: dict, metrics: dict | None) -> str:
    """The README.md of a checkpoint: base model, data, settings, validation, how to score it."""
    ft = spec["finetune"]
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: text-ranking",
        "tags: [cross-encoder, reranker, rerankflow]",
        f"base_model: {spec['base_model']}",
        "---",
        "",
        "# Fine-tuned cross-encoder reranker (rerankflow stage 2)",
        "",
        f"- base model: `{spec['base_model']}`",
        f"- training data: `{spec['train_path']}` ({state['n_train_examples']} examples), "
        f"validation: {state['val_source']} ({state['n_val_queries']} queries)",
        f"- step {state['step']} of {state['total_steps']} (epoch {state['epoch']}), loss `{ft['loss']}`, "
        f"{ft['train_n_passages']} passages per query, global batch {state['global_batch_size']} queries, "
        f"lr {ft['learning_rate']}, seed {spec['seed']}",
        f"- input format: `{spec_input_format(spec)}`"
        + (f", prompt template `{spec['prompt_template']!r}`" if spec_input_format(spec) == "template" else "")
        + f", max_length {spec['max_length']}",
        f"- run hash: `{state['hash'][:16]}`",
    ]
    if metrics:
        lines.append(f"- validation at this step: MRR {metrics['val_mrr']:.4f}, nDCG@10 {metrics['val_ndcg@10']:.4f}")
    lines += ["", how_to_score(spec_input_format(spec)), ""]
    return "\n".join(lines)


def how_to_score(input_format: str) -> str:
    """The model card's sentence on feeding the checkpoint the input it was trained on."""
    load = ("Load with `AutoModelForSequenceClassification.from_pretrained(path)` or "
            "`sentence_transformers.CrossEncoder(path)`; ")
    if check_input_format(input_format) == "pair":
        return (load + "it was trained on (query, passage) sentence pairs (`[CLS] query [SEP] passage [SEP]`), "
                "sentence-transformers' native format: score with `CrossEncoder(path).predict([(query, passage)])` "
                "or `tokenizer(query, passage)`.")
    return (load + "it was trained on ONE text per pair: score `format_pair(query, passage, template)` "
            "(rerankflow.formatting, with the prompt template above) as one text, "
            "`model(**tokenizer([format_pair(query, passage, template)], truncation=True))` — not as a sentence pair.")
