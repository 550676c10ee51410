"""``cms card-agent`` as a real process with the virtual card, against a test server over mTLS."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest

from card_agent.agent import ExitStatus
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.agent_process import (
    AgentProcess,
    agent_env,
    json_lines,
    run_agent,
    tls_args,
)
from tests.card_agent.channel_server import ChannelServer, free_port
from tests.card_agent.scripts import command, done_message, script_message

virtual_factory = pytest.importorskip("virtual_psd.factory")

PSD_ID = "0102030405060708090A"
SELECT_ISD = "00a4040000"
GET_CPLC = "80ca9f7f00"
# INITIALIZE UPDATE: its host challenge and the card's answer (challenge and
# cryptogram) are what a secure channel is built on: marked sensitive.
HOST_CHALLENGE = "a1b2c3d4e5f60718"
INITIALIZE_UPDATE = "8050000008" + HOST_CHALLENGE + "00"


@pytest.fixture
def card_state(tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    virtual_factory.create_card(path, psd_id=PSD_ID)
    return path


def install_conversation(hello, receive, context):
    yield script_message(1, command(SELECT_ISD), command(GET_CPLC))
    receive()
    yield script_message(2, command(INITIALIZE_UPDATE, sensitive=True))
    receive()
    yield done_message(pb.SessionDone.OK, message="master keys installed", psd_id=PSD_ID,
                       steps=("read PSD id from CPLC", "stored cryptogram",
                              "installed MKRK at KVN 0x70", "installed MK v1"))


def test_session_end_to_end_with_sensitive_data_kept_out_of_logs(
        pki: Pki, card_state: Path) -> None:
    with ChannelServer(pki, install_conversation) as server:
        done = run_agent([*tls_args(pki, server.address), "--virtual", str(card_state),
                          "--role", "station", "--label", "station-1", "--once",
                          "--log-level", "debug"])
    assert done.returncode == ExitStatus.OK, done.stderr
    # What the demo shows: outcome, PSD id, message and every step.
    assert f"session OK psd={PSD_ID}: master keys installed" in done.stdout
    assert "  - installed MK v1" in done.stdout
    hello = server.record.hellos[0]
    assert hello.role == pb.PERSONALIZATION_STATION and hello.agent_label == "station-1"
    assert hello.atr and hello.reader
    assert server.record.identities == ["card-agent"]
    results = server.record.results
    assert [r.outcome for r in results] == [pb.SCRIPT_COMPLETED, pb.SCRIPT_COMPLETED]
    cplc = results[0].responses[1].data.hex()
    card_answer = results[1].responses[0].data.hex()
    assert len(card_answer) >= 56  # the card really answered INITIALIZE UPDATE
    logs = done.stderr + done.stdout
    # Non-sensitive commands: header, data and status word are logged...
    assert SELECT_ISD[:8] in logs and cplc in logs and "sw=9000" in logs
    # ...sensitive ones: header and status word only.
    assert INITIALIZE_UPDATE[:8] in logs
    assert HOST_CHALLENGE not in logs
    assert card_answer not in logs
    assert card_answer[16:40] not in logs  # not even a piece of it
    assert "Traceback" not in done.stderr
    assert all(entry["service"] == "card-agent" for entry in json_lines(done.stderr))


def test_unreachable_server_then_started(pki: Pki, card_state: Path) -> None:
    port = free_port()
    agent = AgentProcess([*tls_args(pki, f"127.0.0.1:{port}"), "--virtual", str(card_state),
                          "--once", "--backoff-max", "1"])
    try:
        retry = agent.wait_for_log("retrying")
        assert retry["reason"] == "not_connected"
        with ChannelServer(pki, install_conversation, port=port) as server:
            status = agent.finish()
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
    assert status == ExitStatus.OK, agent.stderr
    assert len(server.record.hellos) == 1
    assert "Traceback" not in agent.stderr


def test_malformed_apdu_from_server_gets_bad_script_and_agent_carries_on(
        pki: Pki, card_state: Path) -> None:
    def garbage(hello, receive, context):
        yield script_message(1, command(GET_CPLC), command("80ca9f"),
                             command("80d8000010" + "00" * 4))
        receive()
        yield script_message(2, command(GET_CPLC))
        receive()
        yield done_message(pb.SessionDone.NOTHING_TO_DO)

    with ChannelServer(pki, garbage) as server:
        done = run_agent([*tls_args(pki, server.address), "--virtual", str(card_state),
                          "--once"])
    assert done.returncode == ExitStatus.OK, done.stderr
    first, second = server.record.results
    assert first.outcome == pb.SCRIPT_BAD_SCRIPT and first.stopped_at == 1
    assert len(first.responses) == 0
    assert second.outcome == pb.SCRIPT_COMPLETED
    assert "session NOTHING_TO_DO" in done.stdout


def test_server_dropping_the_stream_mid_script(pki: Pki, card_state: Path) -> None:
    holder: dict[str, ChannelServer] = {}

    def drop(hello, receive, context):
        yield script_message(1, command(SELECT_ISD))
        receive()
        # Stop the whole server while the agent runs the next script.
        threading.Thread(target=holder["server"].stop, daemon=True).start()
        yield script_message(2, command(GET_CPLC), command(GET_CPLC), command(GET_CPLC))
        receive()
        yield done_message()  # pragma: no cover

    server = ChannelServer(pki, drop)
    holder["server"] = server
    with server:
        done = run_agent([*tls_args(pki, server.address), "--virtual", str(card_state),
                          "--once"])
    assert done.returncode == ExitStatus.SESSION_BROKEN, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cms card-agent: session failed: stream broken")
    assert any(e["msg"] == "session failed: stream broken" for e in json_lines(done.stderr))


def test_sigterm_stops_a_waiting_agent_cleanly(pki: Pki, card_state: Path) -> None:
    agent = AgentProcess([*tls_args(pki, f"127.0.0.1:{free_port()}"),
                          "--virtual", str(card_state), "--backoff-max", "1"])
    try:
        agent.wait_for_log("retrying")
        agent.proc.send_signal(signal.SIGTERM)
        status = agent.finish()
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
    assert status == ExitStatus.OK
    assert agent.wait_for_log("agent stopped")
    assert "Traceback" not in agent.stderr


def test_sigterm_cancels_a_session_in_progress(pki: Pki, card_state: Path) -> None:
    release = threading.Event()

    def stall(hello, receive, context):
        yield script_message(1, command(SELECT_ISD))
        receive()
        release.wait(30)
        if context.is_active():
            yield done_message()  # pragma: no cover

    with ChannelServer(pki, stall) as server:
        agent = AgentProcess([*tls_args(pki, server.address), "--virtual", str(card_state),
                              "--once"])
        try:
            agent.wait_for_log("script finished")
            agent.proc.send_signal(signal.SIGTERM)
            status = agent.finish()
        finally:
            release.set()
            if agent.proc.poll() is None:
                agent.proc.kill()
    assert status == ExitStatus.STOPPED
    assert agent.wait_for_log("session cancelled")
    assert "Traceback" not in agent.stderr


@pytest.mark.parametrize(("case", "expected_status", "needle"), [
    ("missing-ca", ExitStatus.ERROR, "cannot read CA certificate"),
    ("no-server", ExitStatus.ERROR, "give --server"),
    ("cert-without-key", ExitStatus.ERROR, "needs both --cert and --key"),
    ("missing-state", ExitStatus.ERROR, "no virtual card state"),
    ("bad-fault", ExitStatus.ERROR, "--virtual-fault"),
    ("missing-endpoints", ExitStatus.ERROR, "no endpoints file"),
    ("no-reader", ExitStatus.READER, "smart card service"),
])
def test_bad_input_is_one_line_without_traceback(pki: Pki, card_state: Path, tmp_path: Path,
                                                 case: str, expected_status: int,
                                                 needle: str) -> None:
    ident = pki.identity("card-agent")
    address = f"127.0.0.1:{free_port()}"
    virtual = ["--virtual", str(card_state)]
    args = {
        "missing-ca": ["--server", address, "--ca", str(tmp_path / "nope.pem"), *virtual],
        "no-server": [*virtual],
        "cert-without-key": ["--server", address, "--ca", str(pki.ca),
                             "--cert", str(ident.cert), *virtual],
        "missing-state": [*tls_args(pki, address), "--virtual", str(tmp_path / "none.json")],
        "bad-fault": [*tls_args(pki, address), *virtual, "--virtual-fault", "melt@x"],
        "missing-endpoints": ["--endpoints", str(tmp_path / "endpoints.json"), *virtual],
        "no-reader": [*tls_args(pki, address)],
    }[case]
    # A PC/SC client pointed at a socket nobody serves: "no reader" on any machine.
    env = agent_env(PCSCLITE_CSOCK_NAME=str(tmp_path / "no-pcscd.sock"))
    done = run_agent([*args, "--once"], env=env)
    assert done.returncode == expected_status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cms card-agent: ") and needle in lines[0]


# Runs the agent in a process where the package named by argv[1] cannot be imported,
# as on a user PC that installed the agent alone.
WITHOUT_PACKAGE = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from cms.cli import main
sys.exit(main(["card-agent", *sys.argv[2:]]))
"""


def test_virtual_card_missing_from_the_install_is_one_line(pki: Pki, card_state: Path) -> None:
    """The agent finds the virtual card by name; without it, --virtual says what to install."""
    import subprocess
    import sys

    from tests.card_agent.agent_process import REPO

    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, "virtual_psd",
         *tls_args(pki, f"127.0.0.1:{free_port()}"), "--virtual", str(card_state), "--once"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=agent_env(), check=False)
    assert done.returncode == ExitStatus.ERROR, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cms card-agent: the virtual card is not available")
    assert "install 'cms[card]'" in lines[0]


def test_unreachable_server_gives_up_with_a_clear_line(pki: Pki, card_state: Path) -> None:
    done = run_agent([*tls_args(pki, f"127.0.0.1:{free_port()}"), "--virtual",
                      str(card_state), "--once", "--give-up-after", "1", "--backoff-max", "0.5",
                      "--log-level", "error"])
    assert done.returncode == ExitStatus.UNREACHABLE
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cms card-agent: access server 127.0.0.1:") and "unreachable" in last


def test_endpoints_file_gives_address_and_identity(pki: Pki, card_state: Path,
                                                   tmp_path: Path) -> None:
    import json

    with ChannelServer(pki, install_conversation) as server:
        ident = pki.identity("card-agent")
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(json.dumps({
            "services": {"access_server": {"grpc": server.address}},
            "tls": {"ca": str(pki.ca), "identities": {
                "card-agent": {"cert": str(ident.cert), "key": str(ident.key)}}},
        }))
        done = run_agent(["--endpoints", str(tmp_path), "--virtual", str(card_state),
                          "--once"])
    assert done.returncode == ExitStatus.OK, done.stderr
    assert server.record.identities == ["card-agent"]


def test_server_requiring_a_client_certificate_refuses_an_agent_without_one(
        pki: Pki, card_state: Path) -> None:
    with ChannelServer(pki, install_conversation) as server:
        done = run_agent(["--server", server.address, "--ca", str(pki.ca), "--virtual",
                          str(card_state), "--once", "--give-up-after", "1",
                          "--backoff-max", "0.5"])
    assert done.returncode == ExitStatus.UNREACHABLE
    assert server.record.hellos == []


def test_server_authenticated_only_deployment_without_client_certificate(
        pki: Pki, card_state: Path) -> None:
    with ChannelServer(pki, install_conversation, require_client_auth=False) as server:
        done = run_agent(["--server", server.address, "--ca", str(pki.ca), "--virtual",
                          str(card_state), "--once"])
    assert done.returncode == ExitStatus.OK, done.stderr
    assert server.record.identities == [None]


def test_wrong_ca_never_reaches_the_server(pki: Pki, card_state: Path, tmp_path: Path) -> None:
    from deploy.pki import init_pki

    other = init_pki(tmp_path / "other-pki", ("card-agent",))
    with ChannelServer(pki, install_conversation) as server:
        ident = pki.identity("card-agent")
        done = run_agent(["--server", server.address, "--ca", str(other.ca),
                          "--cert", str(ident.cert), "--key", str(ident.key),
                          "--virtual", str(card_state), "--once", "--give-up-after", "1",
                          "--backoff-max", "0.5"])
    assert done.returncode == ExitStatus.UNREACHABLE
    assert server.record.hellos == []


def test_power_loss_mid_script_reports_card_removed(pki: Pki, card_state: Path) -> None:
    def conversation(hello, receive, context):
        yield script_message(1, command(SELECT_ISD), command(GET_CPLC), command(GET_CPLC))
        result = receive().result
        yield done_message(pb.SessionDone.FAILED if result.outcome != pb.SCRIPT_COMPLETED
                           else pb.SessionDone.OK, message="card pulled")

    with ChannelServer(pki, conversation) as server:
        done = run_agent([*tls_args(pki, server.address), "--virtual", str(card_state),
                          "--virtual-fault", "power-loss@2", "--once"])
    assert done.returncode == ExitStatus.SESSION_FAILED
    result = server.record.results[0]
    assert result.outcome == pb.SCRIPT_CARD_REMOVED and result.stopped_at == 1
    assert "session FAILED: card pulled" in done.stdout


def test_refused_stream_is_its_own_exit_status(pki: Pki, card_state: Path) -> None:
    def refuse(hello, receive, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "identity card-agent may not connect")
        yield  # pragma: no cover

    with ChannelServer(pki, refuse) as server:
        done = run_agent([*tls_args(pki, server.address), "--virtual", str(card_state),
                          "--once"])
    assert done.returncode == ExitStatus.REFUSED
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cms card-agent: access server refused the session")
    assert "PERMISSION_DENIED" in last and "Traceback" not in done.stderr


def test_the_agent_process_ends_even_when_its_teardown_would_hang() -> None:
    """A thread that never ends stands in for a teardown that hangs: the process still
    exits, with the agent's status, soon after ``bound_exit``."""
    import subprocess
    import sys

    code = ("import threading, card_agent.cli as cli\n"
            "threading.Thread(target=threading.Event().wait).start()  # never ends\n"
            "print('outcome printed', flush=True)\n"
            "cli.bound_exit(4, grace_s=0.5)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 4
    assert done.stdout == "outcome printed\n"


def test_a_normal_exit_is_not_delayed_by_the_exit_bound() -> None:
    import subprocess
    import sys

    code = ("import card_agent.cli as cli\n"
            "cli.bound_exit(3, grace_s=600)\n"
            "raise SystemExit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0       # the interpreter's own exit, long before the bound
