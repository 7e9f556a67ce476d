"""Imported first by every rule script: makes the repo's ``rerankflow`` package importable.

With a plain ``pip install -e .`` this does nothing; under ``--sdm conda`` (envs/*.yaml, which install
the dependencies but not the package) it puts the repo root on ``sys.path``.
"""
import sys
from pathlib import Path

_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)
