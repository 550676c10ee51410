"""Every client checks the server's identity (cms.identity, cms.runtime.tls).

A server certificate names its identity twice, in the URI SAN that is its source of
truth and in the DNS SAN its clients' TLS checks. The PKI issues and servers accept
only certificates whose two names agree; a client refuses a server of the same CA that
proves another identity: here the key-management server stands in for the proxy and
for the access server, as a process holding the key-mgmt certificate would.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from card_agent.connection import ServerTarget
from card_agent.session import AgentInfo, SessionStatus, run_session
from cms.identity import (
    ACCESS_SERVER,
    HSM_PROXY,
    IDENTITY_NOT_PROVEN,
    KEY_MGMT,
    identity_dns_name,
    identity_uri,
)
from cms.runtime.client import load_endpoints
from cms.runtime.tls import (
    ServerIdentityError,
    TlsConfigError,
    TlsFiles,
    certificate_identity,
    certificate_server_identities,
    secure_channel,
    server_credentials,
)
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import (
    PkiError,
    init_pki,
    issue_identity,
    load_ca,
    write_identity,
)
from tests.support.contacts import contact
from tests.support.launcher import cms, dev_stack
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

TRANSPORT_MASTER = bytes(range(16))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _files(pki, identity: str) -> TlsFiles:
    ident = pki.identity(identity)
    return TlsFiles(pki.ca, ident.cert, ident.key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return init_pki(tmp_path_factory.mktemp("identity-pki"))


# -- certificates -------------------------------------------------------------------

def test_server_certificates_name_their_identity_twice_and_clients_once(pki) -> None:
    for identity in (HSM_PROXY, ACCESS_SERVER, KEY_MGMT):
        cert = _cert(pki.identity(identity).cert)
        assert certificate_identity(cert) == identity
        assert certificate_server_identities(cert) == {identity}
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert identity_dns_name(identity) in san.get_values_for_type(x509.DNSName)
        assert identity_uri(identity) in san.get_values_for_type(x509.UniformResourceIdentifier)
    for identity in ("card-agent", "admin"):
        assert certificate_server_identities(_cert(pki.identity(identity).cert)) == set()


def test_no_certificate_is_issued_with_another_identitys_dns_name(pki) -> None:
    ca_key, ca_cert = load_ca(pki.directory)
    with pytest.raises(PkiError, match="identity names"):
        issue_identity(ca_key, ca_cert, ACCESS_SERVER, server=True,
                       extra_dns=[identity_dns_name(KEY_MGMT)])
    for name in ("Admin", "access_server"):
        with pytest.raises(ValueError, match="cannot name a server"):
            identity_dns_name(name)


def _forged(pki, uri_identity: str, dns_names: list[str]) -> tuple[bytes, bytes]:
    """A server certificate of our CA with any names, as a careless CA could issue."""
    from cryptography.hazmat.primitives import serialization

    ca_key, ca_cert = load_ca(pki.directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri_identity)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity_uri(uri_identity))]
                + [x509.DNSName(d) for d in dns_names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


@pytest.mark.parametrize("dns_names, why", [
    ([], "must carry the DNS SAN key-mgmt.identity.cms.internal"),
    ([identity_dns_name(HSM_PROXY)], "identities in its DNS SANs: hsm-proxy"),
    ([identity_dns_name(KEY_MGMT), identity_dns_name(HSM_PROXY)], "hsm-proxy, key-mgmt"),
])
def test_a_server_refuses_to_serve_on_a_certificate_whose_names_disagree(
        pki, tmp_path: Path, dns_names: list[str], why: str) -> None:
    cert, key = _forged(pki, KEY_MGMT, dns_names)
    (tmp_path / "s.pem").write_bytes(cert)
    (tmp_path / "s.key").write_bytes(key)
    with pytest.raises(TlsConfigError, match="identity key-mgmt") as err:
        server_credentials(TlsFiles(pki.ca, tmp_path / "s.pem", tmp_path / "s.key"))
    assert why in str(err.value)


def test_an_older_pki_gets_server_certificates_that_name_their_identity(
        tmp_path: Path) -> None:
    """A PKI made before server certificates carried the DNS name: the next init issues
    them again from the same CA, and leaves the clients' certificates as they were."""
    first = init_pki(tmp_path / "pki", ("access-server", "admin"))
    ca_key, ca_cert = load_ca(first.directory)
    key, old = issue_identity(ca_key, ca_cert, "admin", server=False)   # no DNS names
    write_identity(first.directory, ACCESS_SERVER, key, old)
    admin_before = first.identity("admin").cert.read_bytes()
    assert certificate_server_identities(_cert(first.identity(ACCESS_SERVER).cert)) == set()
    again = init_pki(tmp_path / "pki", ("access-server", "admin"))
    cert = _cert(again.identity(ACCESS_SERVER).cert)
    assert certificate_server_identities(cert) == {ACCESS_SERVER}
    assert cert.issuer == ca_cert.subject
    assert again.identity("admin").cert.read_bytes() == admin_before


# -- clients, in process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def key_mgmt_server(pki):
    """A gRPC server (health only) serving with the key-mgmt certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(_files(pki, KEY_MGMT)))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _check(channel: grpc.Channel) -> int:
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_client_refuses_a_server_that_proves_another_identity(pki, key_mgmt_server) -> None:
    admin = _files(pki, "admin")
    assert _check(secure_channel(key_mgmt_server, admin, server_identity=KEY_MGMT)) == \
        health_pb2.HealthCheckResponse.SERVING
    for expected in (HSM_PROXY, ACCESS_SERVER):
        with pytest.raises(ServerIdentityError) as err:
            _check(secure_channel(key_mgmt_server, admin, server_identity=expected))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        message = err.value.details()
        assert message.startswith(IDENTITY_NOT_PROVEN)
        assert f"{key_mgmt_server} is not {expected}" in message
        assert identity_dns_name(expected) in message and identity_uri(expected) in message
    # The servers' own channels expect the proxy unless told otherwise.
    with pytest.raises(ServerIdentityError, match="is not hsm-proxy"):
        _check(secure_channel(key_mgmt_server, admin))
    # A call in flight (a future) is not waited for; its failure is gRPC's own.
    with secure_channel(key_mgmt_server, admin) as channel:
        future = health_pb2_grpc.HealthStub(channel).Check.future(
            health_pb2.HealthCheckRequest(), timeout=10)
        assert future.exception().code() == grpc.StatusCode.UNAVAILABLE


def test_the_card_agent_refuses_a_server_that_is_not_the_access_server(
        pki, key_mgmt_server) -> None:
    agent = pki.identity("card-agent")

    class NoCard:
        atr = bytes.fromhex("3b00")
        reader_name = "none"

        def transmit(self, apdu: bytes) -> bytes:
            raise AssertionError("nothing may reach the card")

        def close(self) -> None:
            pass

    channel = ServerTarget(key_mgmt_server, pki.ca, agent.cert, agent.key).open_channel()
    try:
        report = run_session(NoCard(), channel, AgentInfo(label="pc"), deadline_s=10)
    finally:
        channel.close()
    assert report.status is SessionStatus.REFUSED      # no retry can make it the access server
    assert IDENTITY_NOT_PROVEN in report.error and "is not access-server" in report.error


# -- real processes -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with dev_stack(tmp_path_factory.mktemp("identity-stack")) as endpoints_path:
        yield endpoints_path


def _endpoints_with(stack: Path, tmp_path: Path, service: str, address: str) -> Path:
    """A copy of endpoints.json in which ``service`` is found at ``address``."""
    doc = json.loads(stack.read_text())
    doc["services"][service]["grpc"] = address
    forged = tmp_path / "endpoints.json"
    forged.write_text(json.dumps(doc))
    return forged


def _address(stack: Path, service: str) -> str:
    return load_endpoints(stack).grpc_address(service)


@pytest.mark.integration
def test_operator_commands_refuse_a_stand_in_for_the_proxy(stack: Path, tmp_path: Path) -> None:
    assert "access" in cms("hsm", "--endpoints", str(stack), "tokens").stdout
    forged = _endpoints_with(stack, tmp_path, "hsm_proxy", _address(stack, "key_mgmt"))
    done = cms("hsm", "--endpoints", str(forged), "tokens", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cms: UNAVAILABLE: {IDENTITY_NOT_PROVEN}: the server at" in done.stderr
    assert "is not hsm-proxy" in done.stderr
    with pytest.raises(ServerIdentityError, match="is not hsm-proxy"):
        _check(load_endpoints(forged).channel("hsm_proxy", "admin"))


@pytest.mark.integration
def test_the_card_agent_refuses_a_stand_in_for_the_access_server(
        stack: Path, tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    create_card(card, transport_master=TRANSPORT_MASTER)
    key_sets = dict(isd_state(load_state(card)).key_sets)
    forged = _endpoints_with(stack, tmp_path, "access_server", _address(stack, "key_mgmt"))
    done = subprocess.run(
        [sys.executable, "-m", "cms.cli", "card-agent", "--endpoints", str(forged),
         "--role", "user", "--once", "--virtual", str(card), "--give-up-after", "5"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 6, done.stderr                 # refused, not retried
    assert IDENTITY_NOT_PROVEN in done.stderr and "is not access-server" in done.stderr
    assert "Traceback" not in done.stderr
    assert dict(isd_state(load_state(card)).key_sets) == key_sets


@pytest.mark.integration
def test_the_access_server_refuses_a_stand_in_for_the_proxy(stack: Path, tmp_path: Path) -> None:
    """An access server whose proxy address leads to the key-management server: a contact
    ends RETRY_LATER saying the server there is not the proxy, and the card is untouched."""
    config = yaml.safe_load((stack.parent / "config" / "access_server.yaml").read_text())
    config["server"] = {"listen": "127.0.0.1:0", "metrics_listen": None}
    config["database"]["url"] = f"sqlite:///{tmp_path / 'access.db'}"
    config["proxy"]["address"] = _address(stack, "key_mgmt")
    (tmp_path / "access.yaml").write_text(yaml.safe_dump(config))
    ready = tmp_path / "access.ready"
    with open(tmp_path / "access.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cms.cli", "access-server", "serve", "--config",
             str(tmp_path / "access.yaml"), "--ready-file", str(ready)],
            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "access.log").read_text()
        address = json.loads(ready.read_text())["grpc"]
        forged = _endpoints_with(stack, tmp_path, "access_server", address)
        card = tmp_path / "card.json"
        psd_id = create_card(card, transport_master=TRANSPORT_MASTER).psd_id
        cms("psd", "--endpoints", str(forged), "register", psd_id)
        key_sets = dict(isd_state(load_state(card)).key_sets)
        report = contact(forged, card, AgentInfo(role=pb.PERSONALIZATION_STATION, label="s"))
        assert report.done is not None, report.error
        assert report.done.outcome == pb.SessionDone.RETRY_LATER
        assert IDENTITY_NOT_PROVEN in report.done.message
        assert "is not hsm-proxy" in report.done.message
        assert dict(isd_state(load_state(card)).key_sets) == key_sets
    finally:
        server.terminate()
        server.wait(timeout=30)
