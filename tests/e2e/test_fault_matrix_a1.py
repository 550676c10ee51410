"""Flow A fault matrix of A1, the initial installation (also on strict cards): a fault
at every APDU x {card power loss, agent killed, access server killed, proxy killed}, each
case finished by the next contacts and checked against the card and HSM1
(tests/e2e/fault_matrix.py says how).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.fault_matrix import (
    A1_APDUS,
    FAULTS,
    _a1_matrix,
)

# The stack fixture (one per module: SQLite, then PostgreSQL) is in conftest.py.
pytest_plugins = ("tests.support.postgres",)
pytestmark = [pytest.mark.integration, pytest.mark.long_running, pytest.mark.timeout(900)]


def test_a1_fault_matrix(stack: Path, tmp_path: Path, record_property) -> None:
    cells, text = _a1_matrix(stack, tmp_path, strict=False)
    record_property("a1_fault_matrix", text)
    assert len(cells) == A1_APDUS * len(FAULTS)
    assert all(cells.values()), text


# SQLite only: the resume through the MKRK channel makes the same registry calls as the
# rest of A1 (the PostgreSQL round runs them), and the suite must stay well under 20 min.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a1_fault_matrix_on_a_strict_card(stack: Path, tmp_path: Path,
                                          record_property) -> None:
    """A1 where the card refuses any MK change outside an MKRK channel: a break after the
    MKRK went in must be finished through the MKRK channel."""
    cells, text = _a1_matrix(stack, tmp_path, strict=True)
    record_property("a1_strict_fault_matrix", text)
    assert len(cells) == A1_APDUS * len(FAULTS)
    assert all(cells.values()), text
