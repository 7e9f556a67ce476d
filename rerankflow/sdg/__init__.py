"""Stage 0: corpus loading, chunking and synthetic (query, passage) generation, offline or with an LLM."""
