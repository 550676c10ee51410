"""Flow A fault matrix of A2, the post-issuance replacement: a fault at every APDU x {card
power loss, agent killed, access server killed, proxy killed}, each case finished by the
next contacts and checked against the card and HSM1 (tests/e2e/fault_matrix.py says how).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.fault_matrix import (
    A2_APDUS,
    FAULTS,
    _database_url,
    _faulted,
    _install_in_process,
    _print_matrix,
    _recover,
    _recovered,
    _register,
    cms,
)

# The stack fixture (one per module: SQLite, then PostgreSQL) is in conftest.py.
pytest_plugins = ("tests.support.postgres",)
pytestmark = [pytest.mark.integration, pytest.mark.long_running, pytest.mark.timeout(900)]


def test_a2_fault_matrix(stack: Path, tmp_path: Path, record_property) -> None:
    cells = {}
    for k in range(1, A2_APDUS + 1):
        for kind in FAULTS:
            card, psd_id = _register(stack, tmp_path, f"a2-{k}-{kind}")
            _install_in_process(stack, card)                  # MK v2 + MKRK
            cms("campaign", "--endpoints", str(stack), "start", "--from-version", "2",
                "--to-version", "1", "--psd", psd_id)
            faulted = _faulted(stack, card, "user", kind, k)
            _recover(stack, card, "user")
            cells[(k, kind)] = faulted and _recovered(stack, card, psd_id, mk_version=1)
    backend = _database_url(stack).split(":", 1)[0].split("+", 1)[0]
    text = _print_matrix(f"A2 (post-issuance replacement), registry in {backend}", A2_APDUS,
                         cells)
    record_property("a2_fault_matrix", text)
    assert len(cells) == A2_APDUS * len(FAULTS)
    assert all(cells.values()), text
