"""Flow A fault matrix: a fault at every APDU of A1 and of A2 x {card power loss, agent
killed, access server killed, proxy killed}; after each, the next contacts must finish the
flow, the registry must agree with the card, and HSM1 must still reproduce the card's keys
(MK set from the PSD id, MKRK set from the stored cryptogram). A card failing any check is
lost, and so is a case whose fault never fired: its contact did not fail, or, for a proxy
killed while the card runs the secured script (the proxy has no part in that phase any
more: the card's answers were foreseen when the channel opened), the proxy did not die.
The matrix is printed (run with -s to see it live; it is also in the test's report).
A1 and A2 are two test modules over these helpers, so that a parallel run
(scripts/test, pytest-xdist by file) puts them on different workers.
A1 runs once more, in the SQLite round, on strict cards (`create_card(strict=True)`: the
security executive refuses any MK change outside an MKRK channel), whose installations
broken after the MKRK went in are finished through the MKRK channel.

Real processes throughout: proxy and access server from `cms dev up` (SoftHSM2, mutual
TLS), the registry in SQLite and, in a second round, in PostgreSQL (a real server started
by the tests), and `cms card-agent --virtual STATE --virtual-fault SPEC --once` for each
contact, the fault plan firing just before APDU K.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from access_server.store import Store
from card_agent.session import AgentInfo
from cms.v1 import card_channel_pb2 as pb
from deploy.local import Stack, access_database_url
from tests.support.card_keys import reproduces_card_keys
from tests.support.contacts import contact
from tests.support.launcher import cms
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

MASTER = bytes.fromhex("5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A")
FAULTS = ("power-loss", "agent-killed", "access-server-killed", "proxy-killed")
A1_APDUS = 8      # SELECT, CPLC, KIT, INITIALIZE UPDATE | EXT AUTH, PUT MKRK, PUT MK, DELETE FF
A2_APDUS = 7      # SELECT, CPLC, KIT, INITIALIZE UPDATE | EXT AUTH, PUT new MK, DELETE old MK
MAX_RECOVERY_CONTACTS = 6


def _database_url(stack: Path) -> str:
    return access_database_url(Stack(stack.parent))


def _pid(stack: Path, service: str) -> int:
    return int((stack.parent / "run" / f"{service}.pid").read_text())


def _spec(stack: Path, kind: str, k: int) -> str:
    return {
        "power-loss": f"power-loss@{k}",
        "agent-killed": f"kill@{k}:self:KILL",
        "access-server-killed": f"kill@{k}:{_pid(stack, 'access_server')}:KILL",
        "proxy-killed": f"kill@{k}:{_pid(stack, 'hsm_proxy')}:KILL",
    }[kind]


def _agent(stack: Path, card: Path, role: str, fault: str | None = None) -> int:
    args = [sys.executable, "-m", "cms.cli", "card-agent", "--endpoints", str(stack),
            "--identity", "card-agent", "--role", role, "--once", "--virtual", str(card),
            "--label", "fault-matrix", "--give-up-after", "10"]
    if fault:
        args += ["--virtual-fault", fault]
    return subprocess.run(args, capture_output=True, timeout=120, check=False).returncode


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _faulted(stack: Path, card: Path, role: str, kind: str, k: int) -> bool:
    """Run the contact with the fault; True if the fault fired."""
    proxy = _pid(stack, "hsm_proxy")
    status = _agent(stack, card, role, _spec(stack, kind, k))
    return status != 0 or (kind == "proxy-killed" and not _alive(proxy))


def _recover(stack: Path, card: Path, role: str) -> None:
    cms("dev", "up", "--dir", str(stack.parent))            # restarts what the fault killed
    for _ in range(MAX_RECOVERY_CONTACTS):
        if _agent(stack, card, role) == 0:
            return
        time.sleep(0.5)


def _register(stack: Path, tmp_path: Path, name: str, *,
              strict: bool = False) -> tuple[Path, str]:
    card = tmp_path / f"{name}.json"
    psd_id = create_card(card, transport_master=MASTER, strict=strict).psd_id
    cms("psd", "--endpoints", str(stack), "register", psd_id)
    return card, psd_id


def _install_in_process(stack: Path, card: Path) -> None:
    """A1 without a fault (a contact may meet a server just restarted by the previous case)."""
    for _ in range(MAX_RECOVERY_CONTACTS):
        report = contact(stack, card, AgentInfo(role=pb.PERSONALIZATION_STATION,
                                                label="installer"))
        if report.done is not None and report.done.outcome == pb.SessionDone.OK:
            return
        time.sleep(0.5)
    raise AssertionError(f"installation failed: {report.done or report.error}")


def _recovered(stack: Path, card: Path, psd_id: str, mk_version: int) -> bool:
    """Registry and card agree on the finished flow, and HSM1 reproduces the card's keys."""
    with Store.from_url(_database_url(stack)) as store:
        record = store.get_psd(psd_id)
        cryptogram = store.get_cryptogram(psd_id) if record.has_cryptogram else None
    kvns = set(isd_state(load_state(card)).key_sets)
    if (record.state.value != "active" or record.mk_version != mk_version
            or kvns != {0x70, mk_version} or cryptogram is None):
        return False
    return reproduces_card_keys(stack, card, psd_id, mk_version=mk_version,
                                cryptogram=cryptogram.ciphertext,
                                cryptogram_label=cryptogram.key_label)


def _print_matrix(title: str, steps: int, cells: dict[tuple[int, str], bool]) -> str:
    lines = [title, "step | " + " | ".join(f"{k:>20}" for k in FAULTS)]
    for k in range(1, steps + 1):
        lines.append(f"{k:>4} | " + " | ".join(
            f"{'recovered' if cells[(k, kind)] else 'LOST':>20}" for kind in FAULTS))
    lost = sum(not ok for ok in cells.values())
    lines.append(f"faults injected: {len(cells)}, cards recovered: {len(cells) - lost}, "
                 f"cards lost: {lost}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def _a1_matrix(stack: Path, tmp_path: Path, *, strict: bool) -> tuple[dict, str]:
    cells = {}
    for k in range(1, A1_APDUS + 1):
        for kind in FAULTS:
            card, psd_id = _register(stack, tmp_path, f"a1-{k}-{kind}", strict=strict)
            # The fault must bite: the contact it hits cannot end well.
            faulted = _faulted(stack, card, "station", kind, k)
            _recover(stack, card, "station")
            cells[(k, kind)] = faulted and _recovered(stack, card, psd_id, mk_version=2)
    backend = _database_url(stack).split(":", 1)[0].split("+", 1)[0]
    card = "a strict card (MK sets only in an MKRK channel)" if strict else "a default card"
    text = _print_matrix(f"A1 (initial installation) on {card}, registry in {backend}",
                         A1_APDUS, cells)
    return cells, text
