"""Stage 2: cross-encoder fine-tuning (listwise/BCE losses, validation, BEST/LATEST checkpoints, resume, torchrun)."""
