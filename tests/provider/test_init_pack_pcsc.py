"""``cms provider init-pack --agents`` through real PC/SC: a private pcscd with the
vsmartcard reader, the card as a ``cms card virtual`` process, ``cms card-agent`` dialing
the provider's card channel (mutual TLS, the agent checks the server proves ``provider``),
the proxy as launched by ``cms dev up``."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cms.pack_format import read_pack
from provider.cards import new_card
from tests.provider.stack import TRANSPORT_MASTER, Provider, provider_stack

pcsc = pytest.importorskip("tests.support.pcsc")

pytestmark = [pytest.mark.pcsc, pytest.mark.integration, pytest.mark.timeout(300)]
CMS = [sys.executable, "-m", "cms.cli"]


@pytest.fixture(scope="module")
def pcscd() -> Iterator[pcsc.PrivatePcscd]:
    with pcsc.started_or_skip() as daemon:
        yield daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(pcscd, provider: Provider, address: str, *extra: str
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMS, "card-agent", "--endpoints", str(provider.endpoints), "--server", address,
         "--role", "station", "--once", "--give-up-after", "30", *extra],
        capture_output=True, text=True, timeout=120, env=pcscd.client_env(), check=False)


def test_a_card_in_a_reader_is_initialized_through_its_agent(pcscd, tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    state = new_card(cards, TRANSPORT_MASTER)
    with provider_stack(tmp_path) as provider:
        card = subprocess.Popen([*CMS, "card", "virtual", "--state", str(state), "--vpcd",
                                 pcscd.vpcd_endpoint(0)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"127.0.0.1:{_free_port()}"
        out = tmp_path / "out"
        init = subprocess.Popen(
            [*CMS, "provider", "--endpoints", str(provider.endpoints), "init-pack", "--agents",
             "--listen", address, "--cards", "1", "--out", str(out), "--issuer-key",
             str(provider.issuer_key), "--agent-wait", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert init.stdout is not None
            assert "waiting for 1 cards from card agents" in init.stdout.readline()
            # An agent that expects the access server refuses the provider's certificate.
            wrong = _agent(pcscd, provider, address)
            assert wrong.returncode == 6, wrong.stdout + wrong.stderr
            agent = _agent(pcscd, provider, address, "--server-identity", "provider")
            assert agent.returncode == 0, agent.stdout + agent.stderr
            rest, errors = init.communicate(timeout=120)
            assert init.returncode == 0, rest + errors
        finally:
            if init.poll() is None:
                init.kill()
                init.wait()
            card.send_signal(signal.SIGTERM)
            card.wait(timeout=20)
    (pack,) = out.glob("*.csv")
    rows = read_pack(pack.read_bytes()).rows
    assert len(rows) == 1 and f"card {rows[0].serial} initialized" in rest
    pem = tmp_path / "device.pem"
    pem.write_bytes(x509.load_der_x509_certificate(rows[0].device_certificate).public_bytes(
        serialization.Encoding.PEM))
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(provider.root), str(pem)],
                              capture_output=True, check=False)
    assert verified.returncode == 0, verified.stderr
