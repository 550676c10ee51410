"""Flow B on the user's own PC: a card issued online personalized through the card channel.

A real proxy on SoftHSM2 (the issuer's seed, KEK and key made in their tokens), a real
access server process over mutual TLS, and ``cms card-agent --role user --activate`` on a
virtual card initialized for the proxy's issuer key (tests/access_server/
test_issuance_cards.py makes them), the code passed in the environment as a user's PC
would. The card checks the payload itself; the test then opens the mailing house's letter
data with the mailer key it holds, verifies the PIN on the card and has it sign with the
user key whose public key the issuer recorded.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from access_server import activation
from access_server import user_perso as flow
from cardcore import issuance as I
from cardcore import pin_block
from cardcore.apdu import parse_response
from cardcore.sw import SW
from cms import perso_format as F
from cms.runtime.client import load_endpoints
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import card_channel_pb2_grpc, stock_pb2_grpc
from cms.v1 import stock_pb2 as spb
from provider.initializer import pack_row
from tests.access_server.test_issuance import Issuer, proxy
from tests.access_server.test_issuance_cards import PROVIDER, initialized_cards
from tests.hsm_proxy.helpers import oaep_sha1
from tests.support import stock as S
from tests.support.hsm_proxy import ProxyProcess
from tests.support.issuer import issuer_public_key
from tests.support.launcher import cms
from tests.support.scan import assert_absent
from tests.virtual_psd.issuance_host import open_card, select_applet
from virtual_psd.factory import create_card
from virtual_psd.issuance import issuance_state
from virtual_psd.state import load_state

pytestmark = pytest.mark.integration
__all__ = ["proxy"]

REPO = Path(__file__).resolve().parents[2]
CODE_LINE = re.compile(r"activation code .*: ([A-Z2-7-]{23}), valid until")


class Online(NamedTuple):
    card: Path
    serial: str
    user_id: int
    code: str
    mailing: Path


class Bench(NamedTuple):
    issuer: Issuer
    mailer: rsa.RSAPrivateKey
    mailer_pem: Path
    point: bytes

    def online(self, serial: str, name: str, *extra: str) -> Online:
        """An initialized card in stock, issued online to a new user: the code printed."""
        directory = self.issuer.directory
        (card,) = initialized_cards(directory, self.issuer.root, self.point, [serial]).values()
        pack = S.make_pack(self.issuer.root, f"PK-{serial}",
                           [_pack_row(card, self.issuer.root)])
        (directory / f"PK-{serial}.csv").write_bytes(pack.data)
        (directory / f"PK-{serial}.csv.p7s").write_bytes(pack.signature)
        self.issuer.cms("packs", "import", str(directory / f"PK-{serial}.csv"))
        user = self.issuer.add_user(name)
        out = directory / f"out-{serial}"
        out.mkdir()
        printed = self.issuer.cms("issue", "user", str(user), "--online", "--pack",
                                  f"B-{serial}", "--hsm-pins", "--mailer-key",
                                  str(self.mailer_pem), "--out", str(out), *extra).stdout
        found = CODE_LINE.search(printed)
        assert found, printed
        return Online(card, serial, user, found.group(1), out / f"B-{serial}-mailing.csv")

    def agent(self, card: Path, code: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``cms card-agent --role user --activate --once`` on ``card``, code in the env."""
        env = {**os.environ, "CMS_ACTIVATION_CODE": code}
        return cms("card-agent", "--endpoints", str(self.issuer.endpoints), "--virtual",
                   str(card), "--role", "user", "--activate", "--once", *extra,
                   check=False, env=env)

    def activation(self, serial: str) -> tuple[str, int]:
        with sqlite3.connect(self.issuer.database) as db:
            return db.execute("SELECT state, failures FROM activation WHERE serial = ?",
                              (serial,)).fetchone()


def _pack_row(card: Path, root: S.Root) -> list[str]:
    return pack_row(select_applet(open_card(card)), root.certificate)


@pytest.fixture
def bench(proxy: ProxyProcess, tmp_path: Path) -> Iterator[Bench]:
    root = S.make_root(PROVIDER)
    database = tmp_path / "access.db"
    with S.access_server(tmp_path, f"sqlite:///{database}", pki=proxy.env.pki,
                         proxy_address=proxy.address) as endpoints:
        stock_pb2_grpc.StockStub(load_endpoints(endpoints).channel("access_server", "admin")) \
            .TrustProvider(spb.TrustProviderRequest(root_certificate=root.der), timeout=30)
        mailer = rsa.generate_private_key(65537, 2048)
        mailer_pem = tmp_path / "mailer.pem"
        mailer_pem.write_bytes(mailer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        point = issuer_public_key(proxy).public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        yield Bench(Issuer(tmp_path, endpoints, database, root, {}), mailer, mailer_pem, point)


def _pin_and_puk(bench: Bench, online: Online) -> tuple[bytes, bytes]:
    """What the mailing house prints: PIN and PUK, opened with its private key."""
    (row,) = F.read_mailing(online.mailing.read_bytes()).rows
    pin, puk = bench.mailer.decrypt(row.mailer_data, oaep_sha1()).split(b"\x00")
    return pin, puk


def _sign_behind_pin(card: Path, pin: bytes, message: bytes) -> tuple[int, bytes]:
    """The user's PC in use: VERIFY PIN with a block sealed to the card, then SIGN."""
    opened = open_card(card)
    data = select_applet(opened)
    assert data.device_public_key is not None
    unsigned = parse_response(opened.transmit(I.sign(hashes.Hash(hashes.SHA256()).finalize())))
    assert unsigned == (b"", SW.SECURITY_STATUS_NOT_SATISFIED)   # no PIN yet: no signature
    challenge, sw = parse_response(opened.transmit(I.get_challenge()))
    assert sw == SW.OK
    verified = parse_response(opened.transmit(
        pin_block.verify_pin(data.device_public_key, challenge, pin)))[1]
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    signature, sw = parse_response(opened.transmit(I.sign(digest.finalize())))
    return verified, signature if sw == SW.OK else b""


def test_the_users_pc_personalizes_its_card_once_and_it_signs_behind_the_pin(
        bench: Bench) -> None:
    online = bench.online("ACME-U-001", "Ada Lovelace")
    assert bench.issuer.stock()["reserved"] == 1
    assert bench.activation(online.serial) == ("waiting", 0)

    done = bench.agent(online.card, online.code.lower().replace("-", " "))  # as typed

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"session OK psd={online.serial}" in done.stdout
    state = issuance_state(load_state(online.card))
    assert state.life_cycle is I.LifeCycle.PERSONALIZED and state.sequence == 1
    assert bench.activation(online.serial) == ("personalized", 0)
    assert bench.issuer.stock()["personalized"] == 1
    shown = bench.issuer.cms("users", "show", str(online.user_id)).stdout
    assert f"card {online.serial} personalized" in shown
    user_key = bytes.fromhex(re.search(r"user key ([0-9a-f]{66})", shown).group(1))

    # Single use: the same code again is refused, the card unchanged.
    before = online.card.read_bytes()
    again = bench.agent(online.card, online.code)
    assert again.returncode == 3 and "was used" in again.stdout, again.stdout
    assert online.card.read_bytes() == before

    # The card signs behind the PIN the HSM made (by letter), with the user's key.
    pin, puk = _pin_and_puk(bench, online)
    verified, signature = _sign_behind_pin(online.card, pin, b"pay 10 to Bob")
    assert verified == SW.OK
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), user_key).verify(
        signature, b"pay 10 to Bob", ec.ECDSA(hashes.SHA256()))

    # The code, PIN and PUK never in clear in the database, the server's log or the
    # agent's output; the user key never anywhere.
    secrets = {"the code": online.code.encode(),
               "the code as stored": online.code.replace("-", "").encode(),
               "the user key": state.user_private_key}
    dump = b"\n".join(f"{line}".encode() for line in sqlite3.connect(
        bench.issuer.database).iterdump())
    log = (bench.issuer.directory / "access-server.log").read_bytes()
    assert_absent(dump, secrets, "the database")
    assert_absent(log, secrets, "the access server's log")
    assert_absent((done.stdout + done.stderr).encode(), secrets, "the agent's output")
    for code in (pin, puk):
        assert f"'{code.decode()}'" not in dump.decode() and f"={code.decode()}" not in \
            log.decode()


def test_each_refusal_is_named_and_changes_nothing(bench: Bench) -> None:
    online = bench.online("ACME-U-002", "Alan Turing")
    other = initialized_cards(bench.issuer.directory, bench.issuer.root, bench.point,
                              ["ACME-U-009"])["ACME-U-009"]
    factory = bench.issuer.directory / "factory.json"
    create_card(factory, psd_id="47905040123499000001")
    card_before = online.card.read_bytes()

    def refused(card: Path, code: str, reason: str) -> str:
        done = bench.agent(card, code)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert re.search(reason, done.stdout), done.stdout
        return done.stdout

    refused(other, online.code, r"ACME-U-009 was not issued online")         # not_bound
    refused(factory, online.code, r"factory, without its serial")            # not_initialized
    assert bench.activation(online.serial) == ("waiting", 0)
    wrong = activation.shown(activation.new_code())
    refused(online.card, wrong, rf"wrong activation code .*: {activation.MAX_TRIES - 1} tries")
    refused(online.card, "not a code", r"wrong activation code")
    assert bench.activation(online.serial) == ("waiting", 2)
    for _ in range(activation.MAX_TRIES - 3):
        refused(online.card, wrong, r"wrong activation code")
    refused(online.card, wrong, r"last try: the activation is locked")
    assert bench.activation(online.serial) == ("locked", activation.MAX_TRIES)
    assert bench.issuer.stock()["quarantined"] == 1      # the issuance closed: failed
    refused(online.card, online.code, r"locked after 5 wrong codes")         # code_locked
    assert online.card.read_bytes() == card_before
    assert issuance_state(load_state(online.card)).life_cycle is I.LifeCycle.INITIALIZED


def test_an_expired_code_unlocks_nothing(bench: Bench) -> None:
    online = bench.online("ACME-U-003", "Grace Hopper", "--valid-days", "1")
    with sqlite3.connect(bench.issuer.database) as db:
        db.execute("UPDATE activation SET expires = '2020-01-01 00:00:00.000000' "
                   "WHERE serial = ?", (online.serial,))
    for _ in range(2):    # found expired, recorded; then refused as expired
        done = bench.agent(online.card, online.code)
        assert done.returncode == 3 and "expired at 2020-01-01" in done.stdout, done.stdout
        assert issuance_state(load_state(online.card)).life_cycle is I.LifeCycle.INITIALIZED
        assert bench.activation(online.serial) == ("expired", 0)
    assert bench.issuer.stock()["quarantined"] == 1
    assert "card ACME-U-003 failed" in bench.issuer.cms("users", "show",
                                                         str(online.user_id)).stdout


def test_a_lost_answer_completes_on_the_next_contact(bench: Bench) -> None:
    """The card commits the payload and loses power before its answer (tear during
    PERSONALIZE, the third APDU): the code is used up, the card personalized; the same
    code on the same card then completes (6A89), and once only."""
    online = bench.online("ACME-U-004", "Edsger Dijkstra")
    cut = bench.agent(online.card, online.code, "--virtual-fault", "tear@3")
    assert cut.returncode != 0 and "Traceback" not in cut.stdout + cut.stderr, cut.stdout
    assert issuance_state(load_state(online.card)).life_cycle is I.LifeCycle.PERSONALIZED
    assert bench.activation(online.serial) == ("sent", 0)

    done = bench.agent(online.card, online.code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already personalized by this payload" in done.stdout
    assert bench.activation(online.serial)[0] == "personalized"
    assert bench.issuer.stock()["personalized"] == 1
    assert "was used" in bench.agent(online.card, online.code).stdout


def test_online_issuance_refuses_what_it_cannot_do(bench: Bench) -> None:
    user = bench.issuer.add_user("Barbara Liskov")
    for args, message in (
            ((), "--online needs --hsm-pins --mailer-key"),
            (("--hsm-pins", "--mailer-key", str(bench.mailer_pem), "--valid-days", "400"),
             "valid days: 1 to 365")):
        done = bench.issuer.cms("issue", "user", str(user), "--online", *args, check=False)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert bench.issuer.cms("issue", "user", str(user), "--valid-days", "3",
                            check=False).returncode == 1


def test_the_docs_table_lists_every_reason_of_the_users_pc() -> None:
    text = (REPO / "docs" / "flows.md").read_text()
    table = text[text.index("<!-- user-pc-outcome-table -->"):]
    rows = {}
    for line in table.splitlines():
        found = re.match(r"\| `(\w+)` \| (\w+) \|", line)
        if found:
            rows[found.group(1)] = found.group(2)
        elif rows and not line.startswith("|"):
            break
    assert {code: r.outcome for code, r in flow.REASONS.items()} == {
        code: getattr(flow.cpb.SessionDone, outcome) for code, outcome in rows.items()}


@pytest.mark.pcsc
@pytest.mark.timeout(300)
def test_through_a_real_pcsc_reader(bench: Bench) -> None:
    """The same contact through a private pcscd and the vsmartcard reader: the card a
    ``cms card virtual`` process, the agent ``cms card-agent --role user --activate``."""
    pcsc = pytest.importorskip("tests.support.pcsc")
    online = bench.online("ACME-U-005", "Margaret Hamilton")
    with pcsc.started_or_skip() as pcscd:
        card = subprocess.Popen(
            [sys.executable, "-m", "cms.cli", "card", "virtual", "--state", str(online.card),
             "--vpcd", pcscd.vpcd_endpoint(0)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "cms.cli", "card-agent", "--endpoints",
                 str(bench.issuer.endpoints), "--role", "user", "--activate", "--once",
                 "--give-up-after", "30"], capture_output=True, text=True, timeout=120,
                env={**pcscd.client_env(), "CMS_ACTIVATION_CODE": online.code}, check=False)
        finally:
            card.send_signal(signal.SIGTERM)
            card.wait(timeout=20)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"session OK psd={online.serial}" in done.stdout
    assert issuance_state(load_state(online.card)).life_cycle is I.LifeCycle.PERSONALIZED
    assert bench.activation(online.serial)[0] == "personalized"


def test_the_cards_refusal_spends_the_code_and_quarantines_the_card(bench: Bench) -> None:
    """A payload altered in the database (its last byte, in the issuer's signature): the
    card refuses it (6982), the code is used up and the card quarantined."""
    online = bench.online("ACME-U-006", "Frances Allen")
    with sqlite3.connect(bench.issuer.database) as db:
        (payload,) = db.execute("SELECT payload FROM activation WHERE serial = ?",
                                (online.serial,)).fetchone()
        db.execute("UPDATE activation SET payload = ? WHERE serial = ?",
                   (payload[:-1] + bytes([payload[-1] ^ 1]), online.serial))
    before = online.card.read_bytes()
    done = bench.agent(online.card, online.code)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refused its payload (6982" in done.stdout and "quarantined" in done.stdout
    assert online.card.read_bytes() == before
    assert bench.activation(online.serial)[0] == "failed"
    assert bench.issuer.stock()["quarantined"] == 1
    assert "was used" in bench.agent(online.card, online.code).stdout


def test_an_activation_code_comes_only_from_a_users_pc(bench: Bench) -> None:
    stub = card_channel_pb2_grpc.CardChannelStub(load_endpoints(bench.issuer.endpoints)
                                                 .channel("access_server", "card-agent"))
    hello = cpb.AgentMessage(hello=cpb.AgentHello(role=cpb.PERSONALIZATION_STATION,
                                                  activation_code=activation.new_code()))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Connect(iter([hello]), timeout=30))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "only from a user's PC" in refused.value.details()
    station = cms("card-agent", "--endpoints", str(bench.issuer.endpoints), "--virtual",
                  str(bench.issuer.directory / "none.json"), "--role", "station",
                  "--activate", "--once", check=False,
                  env={**os.environ, "CMS_ACTIVATION_CODE": "X"})
    assert station.returncode == 1 and "--activate is for a user's PC" in station.stderr
