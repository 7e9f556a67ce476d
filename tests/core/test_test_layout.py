"""The test tree must be collectable as a whole.

Test folders have no ``__init__.py`` (pytest's default "prepend" import mode), so two test
files with the same basename in different folders make collection of the whole suite fail with
"import file mismatch" even though each runs alone. This caught nothing at runtime once, and
broke CI: keep basenames unique.
"""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    duplicated = sorted(name for name, count in names.items() if count > 1)
    assert not duplicated, (
        f"test files share a basename (pytest cannot collect both without __init__.py): "
        f"{duplicated}"
    )
