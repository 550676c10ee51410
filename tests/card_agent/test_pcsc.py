"""The agent through a real PC/SC stack: private pcscd, vpcd reader, virtual card process.

Every PC/SC client here is a subprocess (the agent, the card), so this test
never ties its own process to one pcscd socket.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from card_agent.agent import ExitStatus
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.agent_process import REPO, AgentProcess, run_agent, tls_args
from tests.card_agent.channel_server import ChannelServer
from tests.card_agent.scripts import command, done_message, script_message

pcsc = pytest.importorskip("tests.support.pcsc")
virtual_factory = pytest.importorskip("virtual_psd.factory")

pytestmark = [pytest.mark.pcsc, pytest.mark.integration]

PSD_IDS = ("11111111111111111111", "22222222222222222222")
CPLC_TAG = "9f7f"


@pytest.fixture(scope="module")
def pcscd() -> Iterator[pcsc.PrivatePcscd]:
    with pcsc.started_or_skip() as daemon:
        yield daemon


class CardProcess:
    """``cms card virtual``: plugging it in inserts the card, stopping it removes it."""

    def __init__(self, state: Path, endpoint: str, log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cms.cli", "card", "virtual", "--state", str(state),
                 "--vpcd", endpoint], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def remove(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def slot0_endpoint(daemon: pcsc.PrivatePcscd) -> str:
    """Where the card process plugs into the reader the agent watches (slot 0)."""
    return f"127.0.0.1:{daemon.vpcd_port}"


def read_psd_id(hello, receive, context):
    """Reads the CPLC through the agent and reports what it found."""
    yield script_message(1, command("00a4040000"), command("80ca9f7f00"))
    result = receive().result
    cplc = result.responses[1].data.hex() if result.outcome == pb.SCRIPT_COMPLETED else ""
    yield done_message(pb.SessionDone.OK, message=f"atr {hello.atr.hex()}",
                       steps=(f"cplc {cplc}",))


def test_list_readers(pcscd: pcsc.PrivatePcscd) -> None:
    done = run_agent(["--list-readers"], env=pcscd.client_env())
    assert done.returncode == 0, done.stderr
    assert pcscd.reader_name in done.stdout.splitlines()


def test_unknown_reader_is_one_clear_line(pcscd: pcsc.PrivatePcscd, pki: Pki) -> None:
    done = run_agent([*tls_args(pki, "127.0.0.1:1"), "--reader", "No Such Reader", "--once"],
                     env=pcscd.client_env())
    assert done.returncode == ExitStatus.READER
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no reader matching 'No Such Reader'" in lines[0]
    assert pcscd.reader_name in lines[0]  # says which readers there are


def test_insertion_session_removal_and_next_card(pcscd: pcsc.PrivatePcscd, pki: Pki,
                                                 tmp_path: Path) -> None:
    states = []
    for psd_id in PSD_IDS:
        state = tmp_path / f"{psd_id}.json"
        virtual_factory.create_card(state, psd_id=psd_id)
        states.append(state)
    with ChannelServer(pki, read_psd_id) as server:
        agent = AgentProcess([*tls_args(pki, server.address), "--reader", pcscd.reader_name,
                              "--role", "user", "--log-level", "debug"],
                             env=pcscd.client_env())
        cards: list[CardProcess] = []
        try:
            started = agent.wait_for_log("agent started")
            assert started["source"] == pcscd.reader_name
            agent.wait_for_log("waiting for a card")
            for number, state in enumerate(states, start=1):
                card = CardProcess(state, slot0_endpoint(pcscd), tmp_path / f"card{number}.log")
                cards.append(card)
                agent.wait_for_log("card inserted", count=number)
                done = agent.wait_for_log("session done", count=number)
                assert done["outcome"] == "OK"
                card.remove()
                agent.wait_for_log("card removed", count=number)
                agent.wait_for_log("waiting for a card", count=number + 1)
            agent.proc.send_signal(signal.SIGTERM)
            status = agent.finish()
        finally:
            for card in cards:
                if card.proc.poll() is None:
                    card.proc.kill()
            if agent.proc.poll() is None:
                agent.proc.kill()
    assert status == ExitStatus.OK, agent.stderr
    assert "Traceback" not in agent.stderr
    # One session per card contact, each with the reader's name and the card's ATR.
    assert len(server.record.hellos) == 2
    assert {h.reader for h in server.record.hellos} == {pcscd.reader_name}
    assert all(h.atr.startswith(b"\x3b") for h in server.record.hellos)
    cplcs = [r.responses[1].data.hex() for r in server.record.results]
    assert [c[:4] for c in cplcs] == [CPLC_TAG, CPLC_TAG]
    assert cplcs[0] != cplcs[1]  # two different cards were read
    # The APDUs went through PC/SC: the session log shows each card's CPLC.
    for cplc in cplcs:
        assert cplc in agent.stderr


def test_agent_survives_a_pcscd_restart(pcscd: pcsc.PrivatePcscd, pki: Pki,
                                        tmp_path: Path) -> None:
    state = tmp_path / "card.json"
    virtual_factory.create_card(state, psd_id=PSD_IDS[0])
    with ChannelServer(pki, read_psd_id) as server:
        agent = AgentProcess([*tls_args(pki, server.address), "--backoff-max", "1"],
                             env=pcscd.client_env())
        card = None
        try:
            agent.wait_for_log("waiting for a card")
            pcscd.restart()
            failed = agent.wait_for_log("reader failed, retrying")
            assert "Traceback" not in agent.stderr and failed["error"]
            agent.wait_for_log("reader available again")
            card = CardProcess(state, slot0_endpoint(pcscd), tmp_path / "card.log")
            assert agent.wait_for_log("session done")["outcome"] == "OK"
            agent.proc.send_signal(signal.SIGTERM)
            status = agent.finish()
        finally:
            if card is not None:
                card.remove()
            if agent.proc.poll() is None:
                agent.proc.kill()
    assert status == ExitStatus.OK, agent.stderr
    assert len(server.record.results) == 1
