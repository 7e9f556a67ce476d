"""Stage 1: quality filter, document split, passage corpus and hard-negative mining."""
