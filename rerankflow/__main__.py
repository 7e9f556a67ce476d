"""``python -m rerankflow ...``: see :mod:`rerankflow.cli`."""

from .cli import main

raise SystemExit(main())
