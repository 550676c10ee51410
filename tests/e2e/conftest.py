"""The fault matrix's stack (tests/e2e/fault_matrix.py): one per test module, SQLite,
then PostgreSQL, so the A1 and A2 modules each bring up their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.fault_matrix import MASTER
from tests.support.card_keys import provision
from tests.support.launcher import dev_stack


@pytest.fixture(scope="module", params=["sqlite",
                                        pytest.param("postgresql", marks=pytest.mark.postgres)])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(f"faults-{request.param}")
    up_args: tuple[str, ...] = ()
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        up_args = ("--access-database", server.url(server.create_database()))
    with dev_stack(directory, *up_args) as endpoints_path:
        provision(endpoints_path, MASTER)
        yield endpoints_path
