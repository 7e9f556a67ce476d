"""Sweeps: many fine-tuning variants over one shared upstream, compared in one summary (docs/sweeps.md).

* :mod:`~rerankflow.sweep.grid` — the ``sweep`` section: checked override keys and values, stable
  readable variant ids, each variant's ``finetune`` / ``reranker`` sections;
* :mod:`~rerankflow.sweep.summary` — one row per variant (validation and test metrics, paired CIs
  against the base and against the chosen variant, training time), the variant chosen on
  validation, and the summary files (JSON, Markdown, TSV, PNG).

Imports core and eval (metrics) only; the workflow side is ``rules/sweep.smk``.
"""
