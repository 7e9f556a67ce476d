"""``python -m rerankflow ...``: see :mod:`rerankflow.cli`."""

from rerankflow.cli import main

raise SystemExit(main())
