"""Collect ``bench_*.py`` here, so ``pytest -m benchmark tests/benchmarks`` finds them.

They stay out of the default run twice over: the default ``testpaths`` pattern does not
match them, and ``-m 'not benchmark'`` in pyproject deselects them anyway.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
