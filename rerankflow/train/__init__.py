"""Stage 2: cross-encoder fine-tuning (and the import of the packaged base model)."""
