"""Stage 3: first stage vs rerankers, metrics with pytrec_eval, paired comparisons, report."""
