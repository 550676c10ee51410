"""Suite-wide collection order: the longest modules first.

scripts/test runs two workers that each take whole modules (pytest-xdist,
``--dist loadfile``), handed out in collection order. A module marked
``long_running`` (the fault matrices, minutes each) that came up late would
leave one worker on it alone at the end; sent first, the two workers share
the rest around it.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long_running") is None)
