"""Stage 5: start, smoke-test and stop the ranking service (built-in or NIM container)."""
