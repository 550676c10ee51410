"""Issuance end to end: users, cards from stock, a real proxy's IssuerHsm, the bureau's files.

A real proxy on SoftHSM2 (seed, KEK and issuer key made in their tokens) and
a real access server over mutual TLS, driven by the ``cms`` commands. The
stock is built as tests/support/stock.py builds it (a software provider
root), with real RSA device keys whose private halves the test keeps: it
opens every payload as the card would, so it checks what the issuer
wrote, not just that a file exists. ``openssl cms`` (a tool we did not
write) verifies the issuer's signatures and opens the envelope to the
bureau. The bureau's result files are signed with cryptography's PKCS#7
builder by a bureau key the test holds.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from asn1crypto import cms as acms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from access_server.cli import upload_chunks
from cardcore import personalization as perso
from cardcore.issuance_keys import rsa_from_spki
from cms import perso_format as F
from cms.runtime.client import load_endpoints
from cms.v1 import stock_pb2 as spb
from cms.v1 import stock_pb2_grpc
from tests.support import stock as S
from tests.support.hsm_proxy import ProxyProcess
from tests.support.issuer import issuer_proxy, issuer_public_key
from tests.support.launcher import cms
from tests.support.scan import assert_absent

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.support.postgres",)

TIMEOUT = 60
PROVIDER = "acme-cards"
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),  # noqa: S303
                         label=None)
PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with issuer_proxy(tmp_path_factory.mktemp("issuance-proxy")) as running:
        yield running


@pytest.fixture(scope="module")
def issuer_public(proxy: ProxyProcess) -> ec.EllipticCurvePublicKey:
    return issuer_public_key(proxy)


@pytest.fixture(scope="module")
def root() -> S.Root:
    return S.make_root(PROVIDER)


class Issuer(NamedTuple):
    directory: Path
    endpoints: Path
    database: Path
    root: S.Root
    cards: dict[str, rsa.RSAPrivateKey]
    """What each card holds that the test needs: its private device key, by serial."""

    def cms(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return cms(command, "--endpoints", str(self.endpoints), *rest, check=check)

    def stock(self) -> dict[str, int]:
        counts = stock_pb2_grpc.StockStub(load_endpoints(self.endpoints).channel(
            "access_server", "admin")).GetStock(spb.GetStockRequest(), timeout=30)
        fields = ("in_stock", "reserved", "personalized", "shipped", "failed", "quarantined")
        return {f: sum(getattr(p, f) for p in counts.packs) for f in fields}

    def add_pack(self, pack_serial: str, count: int) -> list[str]:
        keys = [rsa.generate_private_key(65537, 2048) for _ in range(count)]
        serials = [f"{pack_serial}-{i:03d}" for i in range(1, count + 1)]
        rows = [S.card_row(self.root, serial, key.public_key())
                for serial, key in zip(serials, keys, strict=True)]
        pack = S.make_pack(self.root, pack_serial, rows)
        stock_pb2_grpc.StockStub(load_endpoints(self.endpoints).channel(
            "access_server", "admin")).ImportPack(
                upload_chunks(pack.data, pack.signature, f"{pack_serial}.csv"), timeout=120)
        self.cards.update(zip(serials, keys, strict=True))
        return serials

    def add_user(self, name: str, address: str = "12 Example Street\\n1227 Carouge") -> int:
        out = self.cms("users", "add", "--name", name, "--address", address).stdout
        return int(out.split()[1])

    def users_file(self, user_ids: list[int], name: str = "users.csv") -> Path:
        path = self.directory / name
        path.write_text("user_id\n" + "".join(f"{u}\n" for u in user_ids))
        return path

    def dump(self) -> bytes:
        with sqlite3.connect(self.database) as connection:
            return "\n".join(connection.iterdump()).encode()


@pytest.fixture
def issuer(proxy: ProxyProcess, root: S.Root, tmp_path: Path) -> Iterator[Issuer]:
    database = tmp_path / "access.db"
    with S.access_server(tmp_path, f"sqlite:///{database}", pki=proxy.env.pki,
                         proxy_address=proxy.address) as endpoints:
        stub = stock_pb2_grpc.StockStub(load_endpoints(endpoints).channel("access_server",
                                                                          "admin"))
        stub.TrustProvider(spb.TrustProviderRequest(root_certificate=root.der), timeout=30)
        yield Issuer(tmp_path, endpoints, database, root, {})


class Opened(NamedTuple):
    payload: perso.Payload
    bundle: perso.SecretBundle


def open_payload(issuer: Issuer, row: F.PersoRow,
                 issuer_public: ec.EllipticCurvePublicKey) -> Opened:
    """What the card does: the issuer's signature first, then decryption."""
    payload = perso.decode_payload(row.payload)
    issuer_public.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    device = issuer.cards[row.serial]
    bundle = perso.decode_bundle(device.decrypt(payload.ciphertext, OAEP_SHA1))
    return Opened(payload, bundle)


def openssl_verify(content: Path, signature: Path) -> subprocess.CompletedProcess[str]:
    """``openssl cms -verify`` against the issuer certificate the signature carries."""
    cert_der = acms.ContentInfo.load(signature.read_bytes())["content"]["certificates"][0] \
        .chosen.dump()
    ca = signature.with_name(signature.name + ".issuer.pem")
    ca.write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(PEM))
    return subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                           str(signature), "-content", str(content), "-CAfile", str(ca),
                           "-out", os.devnull], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def user_public_key(scalar: bytes) -> bytes:
    """The compressed secp256k1 point of a user private key."""
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256K1())
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.CompressedPoint)


def test_a_batch_is_issued_sealed_to_its_cards_and_signed(
        issuer: Issuer, issuer_public: ec.EllipticCurvePublicKey) -> None:
    serials = issuer.add_pack("PK-1", 2) + issuer.add_pack("PK-2", 2)
    users = [issuer.add_user(name) for name in ("Zoë Ünal", "Ada Lovelace", "Alan Turing")]
    out = issuer.directory / "out"
    out.mkdir()

    done = issuer.cms("issue", "--pack", "B-1", "--users", str(issuer.users_file(users)),
                      "--out", str(out))

    assert "issued 3 card(s)" in done.stdout
    perso_file, signature = out / "B-1.csv", out / "B-1.csv.p7s"
    assert sorted(p.name for p in out.iterdir()) == ["B-1.csv", "B-1.csv.p7s"]
    verified = openssl_verify(perso_file, signature)
    assert verified.returncode == 0, verified.stderr
    table = F.read_perso(perso_file.read_bytes())
    assert table.header.pack == "B-1" and table.header.pin_puk_by is F.PinMaker.BUREAU
    # First in, first out: the older pack's cards first, then the next pack's.
    assert [r.serial for r in table.rows] == serials[:3]
    assert [r.user_name for r in table.rows] == ["Zoë Ünal", "Ada Lovelace", "Alan Turing"]
    assert table.rows[0].user_address == "12 Example Street\n1227 Carouge"
    secrets: dict[str, bytes] = {}
    for row in table.rows:
        opened = open_payload(issuer, row, issuer_public)
        binding = opened.payload.binding
        device = rsa_from_spki(issuer.cards[row.serial].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        assert (binding.serial, binding.issuance_id, binding.sequence) == \
            (row.serial, table.header.file_serial, 1)
        assert binding.device_key_fingerprint == perso.device_key_fingerprint(device)
        assert binding.issuer_key_id == table.header.issuer_key_id
        assert user_public_key(opened.bundle.user_private_key) == row.user_public_key
        assert opened.bundle.pin is None and opened.bundle.puk is None
        secrets[f"user key of {row.serial}"] = opened.bundle.user_private_key
    assert len(set(secrets.values())) == 3
    assert issuer.stock() == {"in_stock": 1, "reserved": 3, "personalized": 0, "shipped": 0,
                              "failed": 0, "quarantined": 0}
    shown = issuer.cms("users", "show", str(users[0])).stdout
    assert f"card {serials[0]} issued batch B-1" in shown
    assert table.rows[0].user_public_key.hex() in shown
    # No user private key anywhere the issuer wrote: files, database, command output.
    for path in out.iterdir():
        assert_absent(path.read_bytes(), secrets, str(path))
    assert_absent(issuer.dump(), secrets, "the database")
    assert_absent((done.stdout + shown).encode(), secrets, "the command output")
    assert_absent((issuer.directory / "access-server.log").read_bytes(), secrets,
                  "the access server's log")
    changed = issuer.directory / "changed.csv"
    changed.write_bytes(perso_file.read_bytes().replace(b"Alan", b"Alam"))
    assert openssl_verify(changed, signature).returncode != 0


def test_hsm_pins_go_to_the_mailer_only_and_the_file_to_the_bureau_sealed(
        issuer: Issuer, issuer_public: ec.EllipticCurvePublicKey) -> None:
    issuer.add_pack("PK-M", 2)
    users = [issuer.add_user("Grace Hopper"), issuer.add_user("Edsger Dijkstra")]
    mailer = rsa.generate_private_key(65537, 2048)
    mailer_pem = issuer.directory / "mailer.pem"
    mailer_pem.write_bytes(mailer.public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    bureau_key = rsa.generate_private_key(65537, 2048)
    bureau_cert = (x509.CertificateBuilder().subject_name(S.name(common="bureau-1"))
                   .issuer_name(S.name(common="bureau-1")).public_key(bureau_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(S.now() - dt.timedelta(days=1))
                   .not_valid_after(S.now() + dt.timedelta(days=30))
                   .sign(bureau_key, hashes.SHA256()))
    (issuer.directory / "bureau.pem").write_bytes(bureau_cert.public_bytes(PEM))
    (issuer.directory / "bureau.key").write_bytes(bureau_key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out = issuer.directory / "out"
    out.mkdir()

    issuer.cms("issue", "--pack", "B-M", "--users", str(issuer.users_file(users)), "--out",
               str(out), "--hsm-pins", "--mailer-key", str(mailer_pem), "--bureau-cert",
               str(issuer.directory / "bureau.pem"))

    assert sorted(p.name for p in out.iterdir()) == [
        "B-M-mailing.csv", "B-M-mailing.csv.p7s", "B-M.csv.p7m", "B-M.csv.p7s.p7m"]
    for name in ("B-M.csv", "B-M.csv.p7s"):
        opened = subprocess.run(
            ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in",
             str(out / f"{name}.p7m"), "-recip", str(issuer.directory / "bureau.pem"),
             "-inkey", str(issuer.directory / "bureau.key"), "-out", str(out / name)],
            capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert opened.returncode == 0, opened.stderr
    assert openssl_verify(out / "B-M.csv", out / "B-M.csv.p7s").returncode == 0
    assert openssl_verify(out / "B-M-mailing.csv", out / "B-M-mailing.csv.p7s").returncode == 0
    table = F.read_perso((out / "B-M.csv").read_bytes())
    assert table.header.pin_puk_by is F.PinMaker.HSM
    mailing = F.read_mailing((out / "B-M-mailing.csv").read_bytes())
    assert mailing.header.file_serial == table.header.file_serial
    assert [m.serial for m in mailing.rows] == [r.serial for r in table.rows]
    assert mailing.rows[0].postal_address == "12 Example Street\n1227 Carouge"
    codes: dict[str, bytes] = {}
    for row, mail in zip(table.rows, mailing.rows, strict=True):
        bundle = open_payload(issuer, row, issuer_public).bundle
        assert bundle.pin is not None and bundle.puk is not None
        assert mailer.decrypt(mail.mailer_data, OAEP_SHA1) == bundle.pin + b"\x00" + bundle.puk
        codes[f"PIN of {row.serial}"] = bundle.pin
        codes[f"PUK of {row.serial}"] = bundle.puk
        codes[f"user key of {row.serial}"] = bundle.user_private_key
    # The PIN and PUK are only inside what the card and the mailer can open.
    for path in out.iterdir():
        assert_absent(path.read_bytes(), {k: v for k, v in codes.items() if "user" in k},
                      str(path))
        text = path.read_bytes()
        for name, value in codes.items():
            if "user" not in name:
                assert f",{value.decode()}," not in text.decode("utf-8", "replace"), name
    assert_absent(issuer.dump(), {k: v for k, v in codes.items() if "user" in k},
                  "the database")
    dump = issuer.dump().decode("utf-8", "replace")
    log = (issuer.directory / "access-server.log").read_text()
    for name, value in codes.items():
        if "user" not in name:  # digits: looked for as whole values, not inside others
            assert f"'{value.decode()}'" not in dump and f"={value.decode()}" not in log, name


def test_refusals_change_nothing(issuer: Issuer) -> None:
    issuer.add_pack("PK-R", 1)
    first, second = issuer.add_user("One"), issuer.add_user("Two")
    out = issuer.directory / "out"
    out.mkdir()

    def refused(*args: str) -> str:
        done = issuer.cms("issue", *args, "--out", str(out), check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    assert f"no user {second + 100}" in refused(
        "--pack", "B", "--users", str(issuer.users_file([first, second + 100])))
    assert "2 cards asked for, 1 in stock" in refused(
        "--pack", "B", "--users", str(issuer.users_file([first, second])))
    bad = issuer.directory / "bad.csv"
    bad.write_text("user_id\n1,2\n")
    assert "line 2: 2 columns, expected 1" in refused("--pack", "B", "--users", str(bad))
    bad.write_text("id\n1\n")
    assert "line 1 must be the header user_id" in refused("--pack", "B", "--users", str(bad))
    assert "--hsm-pins and --mailer-key go together" in refused(
        "--pack", "B", "--users", str(issuer.users_file([first])), "--hsm-pins")
    assert issuer.stock()["in_stock"] == 1 and list(out.iterdir()) == []

    issuer.cms("issue", "user", str(first), "--pack", "B-ONE", "--out", str(out))
    assert issuer.stock()["reserved"] == 1
    issuer.add_pack("PK-S", 1)
    assert f"user {first} already has card PK-R-001 in flight" in refused(
        "user", str(first), "--pack", "B-TWO")
    assert "in flight" in issuer.cms("users", "remove", str(first), check=False).stderr
    assert sorted(p.name for p in out.iterdir()) == ["B-ONE.csv", "B-ONE.csv.p7s"]
    # A file already there is never written over, and the cards stay in stock.
    assert "exists: nothing is written over it" in refused("user", str(second), "--pack",
                                                           "B-ONE")
    assert issuer.stock()["in_stock"] == 1


def test_users_get_elements_never_reused(issuer: Issuer) -> None:
    a = issuer.add_user("Ada")
    b = issuer.add_user("Bob")
    removed = issuer.cms("users", "remove", str(b)).stdout
    c = issuer.add_user("Cy")
    listed = issuer.cms("users", "list").stdout

    assert "element=2" in removed
    assert f"{c} 'Cy' element=3" in listed and f"{a} 'Ada' element=1" in listed
    assert "Bob" not in listed and "2 user(s)" in listed
    gone = issuer.cms("users", "show", str(b), check=False)
    assert gone.returncode == 1 and f"no user {b}" in gone.stderr
    empty = issuer.cms("users", "add", "--name", " ", "--address", "x", check=False)
    assert empty.returncode == 1 and "name is empty" in empty.stderr
    long = issuer.cms("users", "add", "--name", "x" * 201, "--address", "x", check=False)
    assert long.returncode == 1 and "name longer than 200 characters" in long.stderr


# -- the bureau's results ------------------------------------------------------------

class Bureau(NamedTuple):
    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.serialization import pkcs7

        return (pkcs7.PKCS7SignatureBuilder().set_data(data)
                .add_signer(self.certificate, self.key, hashes.SHA256())
                .sign(serialization.Encoding.DER, [
                    pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.NoCapabilities,
                    pkcs7.PKCS7Options.Binary]))


def make_bureau(name: str) -> Bureau:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = S.name(common=name, organization=name)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(S.now() - dt.timedelta(days=1))
            .not_valid_after(S.now() + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return Bureau(name, key, cert)


def results(file_serial: bytes, bureau: str, rows: list[tuple[str, str, str]]) -> bytes:
    return F.write_results(F.FileHeader(file_serial, len(rows), S.now(), bureau=bureau),
                           [F.ResultRow(s, F.Status(st), r) for s, st, r in rows])


def test_results_personalize_or_quarantine_and_refusals_change_nothing(issuer: Issuer) -> None:
    serials = issuer.add_pack("PK-X", 4)
    users = [issuer.add_user(f"User {n}") for n in range(3)]
    out = issuer.directory / "out"
    out.mkdir()
    issuer.cms("issue", "--pack", "B-X", "--users", str(issuer.users_file(users)), "--out",
               str(out))
    file_serial = F.read_perso((out / "B-X.csv").read_bytes()).header.file_serial
    bureau, stranger = make_bureau("bureau-1"), make_bureau("bureau-2")
    cert = issuer.directory / "bureau.pem"
    cert.write_bytes(bureau.certificate.public_bytes(PEM))
    assert "trusted: bureau-1" in issuer.cms("bureaus", "trust", "--cert", str(cert)).stdout
    assert "1 bureau(s)" in issuer.cms("bureaus", "list").stdout
    before = issuer.stock()

    def refused(data: bytes, signer: Bureau = bureau) -> str:
        path = issuer.directory / "results.csv"
        path.write_bytes(data)
        (issuer.directory / "results.csv.p7s").write_bytes(signer.sign(data))
        done = issuer.cms("issue", "results", str(path), check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert issuer.stock() == before
        return done.stderr

    good = [(serials[0], "personalized", ""), (serials[1], "failed", "no answer to SELECT")]
    assert "not signed by a bureau the issuer trusts" in refused(
        results(file_serial, "bureau-2", good), stranger)
    assert "header names bureau bureau-2" in refused(results(file_serial, "bureau-2", good))
    assert f"card {serials[3]} was not issued" in refused(
        results(file_serial, "bureau-1", [*good, (serials[3], "personalized", "")]))
    assert "card PK-NONE-001 was not issued" in refused(
        results(file_serial, "bureau-1", [("PK-NONE-001", "personalized", "")]))
    assert "not in this personalization file" in refused(
        results(os.urandom(16), "bureau-1", good))
    valid = results(file_serial, "bureau-1", good)
    assert "row 1, line 4: status 'done'" in refused(valid.replace(b",personalized,", b",done,"))
    assert "4 columns, expected 3" in refused(valid.replace(b",personalized,",
                                                            b",personalized,x,"))
    assert "field larger than field limit" in refused(
        valid.replace(b"no answer to SELECT", b"x" * 5000))
    assert "reason longer than 500" in refused(valid.replace(b"no answer to SELECT", b"x" * 501))
    path = issuer.directory / "results.csv"
    path.write_bytes(valid)
    (issuer.directory / "results.csv.p7s").write_bytes(bureau.sign(valid + b"x"))
    tampered = issuer.cms("issue", "results", str(path), check=False)
    assert tampered.returncode == 1 and "message digest differs" in tampered.stderr

    (issuer.directory / "results.csv.p7s").write_bytes(bureau.sign(valid))
    done = issuer.cms("issue", "results", str(path))

    assert "1 personalized, 1 failed (quarantined)" in done.stdout
    after = issuer.stock()
    assert (after["personalized"], after["quarantined"], after["reserved"],
            after["in_stock"]) == (1, 1, 1, 1)
    table = issuer.cms("stock").stdout
    assert "quarantined" in table.splitlines()[0]
    again = issuer.cms("issue", "results", str(path), check=False)
    assert again.returncode == 1 and f"card {serials[0]} is already personalized" in \
        again.stderr
    metrics = _metrics(issuer)
    assert 'state="quarantined"} 1.0' in metrics and 'state="personalized"} 1.0' in metrics
    assert 'cms_issuance_cards{state="failed"} 1.0' in metrics
    assert 'cms_issuance_cards{state="issued"} 1.0' in metrics
    # The user whose card failed may be issued again: from stock, not the quarantined card.
    issuer.cms("issue", "user", str(users[1]), "--pack", "B-AGAIN", "--out", str(out))
    assert F.read_perso((out / "B-AGAIN.csv").read_bytes()).rows[0].serial == serials[3]


def _metrics(issuer: Issuer) -> str:
    import urllib.request

    url = load_endpoints(issuer.endpoints).metrics_url("access_server")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (local test server)
        return resp.read().decode()


def test_an_hsm_refusal_returns_the_cards_to_stock(issuer: Issuer) -> None:
    issuer.add_pack("PK-H", 2)
    users = [issuer.add_user("One"), issuer.add_user("Two")]
    out = issuer.directory / "out"
    out.mkdir()

    done = issuer.cms("issue", "--pack", "B-H", "--users", str(issuer.users_file(users)),
                      "--out", str(out), "--seed-version", "9", check=False)

    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "the issuer HSM refused" in done.stderr
    assert issuer.stock()["in_stock"] == 2 and list(out.iterdir()) == []
    # Nothing was recorded: the same users are issued at once with the right seed.
    issuer.cms("issue", "--pack", "B-H", "--users", str(issuer.users_file(users)), "--out",
               str(out))
    assert issuer.stock()["reserved"] == 2


def test_only_admin_issues_and_bad_requests_are_named(issuer: Issuer) -> None:
    import grpc

    from cms.v1 import issuance_pb2 as pb
    from cms.v1 import issuance_pb2_grpc

    channel = load_endpoints(issuer.endpoints).channel

    def calls(identity: str) -> list:
        users = issuance_pb2_grpc.UsersStub(channel("access_server", identity))
        issuance = issuance_pb2_grpc.IssuanceStub(channel("access_server", identity))
        return [lambda: users.AddUser(pb.AddUserRequest(name="x", address="y"), timeout=30),
                lambda: users.ListUsers(pb.ListUsersRequest(), timeout=30),
                lambda: list(issuance.Issue(pb.IssueRequest(batch="B", user_ids=[1]),
                                            timeout=30)),
                lambda: issuance.ImportResults(iter([pb.ResultsChunk(results=b"x")]),
                                               timeout=30),
                lambda: issuance.ImportDispatch(iter([pb.DispatchChunk(dispatch=b"x")]),
                                                timeout=30),
                lambda: issuance.TrustMailer(pb.TrustBureauRequest(certificate=b"x"),
                                             timeout=30)]

    for identity in ("card-agent", "provider", "access-server"):
        for call in calls(identity):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    admin = issuance_pb2_grpc.IssuanceStub(channel("access_server", "admin"))
    for request, message in (
            (pb.IssueRequest(batch="a b", user_ids=[1]), "batch 'a b'"),
            (pb.IssueRequest(batch="B"), "users: 1 to 10000, not 0"),
            (pb.IssueRequest(batch="B", user_ids=[1], mailer_public_key=b"junk"),
             "mailer public key"),
            (pb.IssueRequest(batch="B", user_ids=[1], pin_length=6), "PIN and PUK lengths"),
            (pb.IssueRequest(batch="B", user_ids=[1], bureau_certificate=b"junk"),
             "bureau certificate")):
        with pytest.raises(grpc.RpcError) as caught:
            list(admin.Issue(request, timeout=30))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
    expired = S.make_root("old-mailer", days=1, not_before=S.now() - dt.timedelta(days=9)
                          ).certificate.public_bytes(serialization.Encoding.DER)
    for call, message in (
            (lambda: admin.TrustMailer(pb.TrustBureauRequest(certificate=b"junk"), timeout=30),
             "mailing house certificate: not an X.509 certificate"),
            (lambda: admin.TrustMailer(pb.TrustBureauRequest(certificate=expired), timeout=30),
             "mailing house certificate: not valid now"),
            (lambda: admin.ImportDispatch(iter([pb.DispatchChunk(dispatch=b"x")]), timeout=30),
             "a dispatch confirmation comes with its detached signature")):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()


def test_without_a_proxy_issuance_is_unavailable_and_nothing_changes(
        root: S.Root, tmp_path: Path) -> None:
    with S.access_server(tmp_path) as endpoints:
        stub = stock_pb2_grpc.StockStub(load_endpoints(endpoints).channel("access_server",
                                                                          "admin"))
        stub.TrustProvider(spb.TrustProviderRequest(root_certificate=root.der), timeout=30)
        issuer = Issuer(tmp_path, endpoints, tmp_path / "access.db", root, {})
        issuer.add_pack("PK-N", 1)
        user = issuer.add_user("Nobody")

        done = issuer.cms("issue", "user", str(user), "--out", str(tmp_path), check=False)

        assert done.returncode == 1 and "no HSM proxy configured" in done.stderr
        assert issuer.stock()["in_stock"] == 1
        assert "card" not in issuer.cms("users", "show", str(user)).stdout.split("\n", 1)[1]


@pytest.mark.postgres
def test_issuance_and_results_on_postgresql(proxy: ProxyProcess, root: S.Root,
                                            issuer_public: ec.EllipticCurvePublicKey,
                                            postgres_url: str, tmp_path: Path) -> None:
    with S.access_server(tmp_path, postgres_url, pki=proxy.env.pki,
                         proxy_address=proxy.address) as endpoints:
        stock_pb2_grpc.StockStub(load_endpoints(endpoints).channel("access_server", "admin")) \
            .TrustProvider(spb.TrustProviderRequest(root_certificate=root.der), timeout=30)
        issuer = Issuer(tmp_path, endpoints, tmp_path / "unused.db", root, {})
        serials = issuer.add_pack("PK-PG", 2)
        first, second = issuer.add_user("Ada"), issuer.add_user("Bob")
        issuer.cms("users", "remove", str(second))
        third = issuer.add_user("Cy")
        assert "element=3" in issuer.cms("users", "show", str(third)).stdout
        out = tmp_path / "out"
        out.mkdir()
        issuer.cms("issue", "--pack", "B-PG", "--users", str(issuer.users_file([first, third])),
                   "--out", str(out))
        table = F.read_perso((out / "B-PG.csv").read_bytes())
        assert [r.serial for r in table.rows] == serials
        for row in table.rows:
            assert open_payload(issuer, row, issuer_public).payload.binding.sequence == 1
        bureau = make_bureau("bureau-1")
        cert = tmp_path / "bureau.pem"
        cert.write_bytes(bureau.certificate.public_bytes(PEM))
        issuer.cms("bureaus", "trust", "--cert", str(cert))
        data = results(table.header.file_serial, "bureau-1",
                       [(serials[0], "personalized", ""), (serials[1], "failed", "no ATR")])
        path = tmp_path / "results.csv"
        path.write_bytes(data)
        (tmp_path / "results.csv.p7s").write_bytes(bureau.sign(data))
        issuer.cms("issue", "results", str(path))
        after = issuer.stock()
        assert (after["personalized"], after["quarantined"]) == (1, 1)


def test_lost_files_are_made_again_with_the_next_sequence(
        issuer: Issuer, issuer_public: ec.EllipticCurvePublicKey) -> None:
    serials = issuer.add_pack("PK-A", 2)
    users = [issuer.add_user("Ada"), issuer.add_user("Bob")]
    out = issuer.directory / "out"
    out.mkdir()
    issuer.cms("issue", "--pack", "B-1", "--users", str(issuer.users_file(users)), "--out",
               str(out))
    first = F.read_perso((out / "B-1.csv").read_bytes())
    old = [open_payload(issuer, row, issuer_public) for row in first.rows]
    mailer = issuer.directory / "mailer.pem"
    mailer.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    refused = issuer.cms("issue", "again", first.header.file_serial.hex(), "--pack", "B-1b",
                         "--out", str(out), "--hsm-pins", "--mailer-key", str(mailer),
                         check=False)
    assert refused.returncode == 1 and "PIN and PUK are the bureau's" in refused.stderr
    unknown = issuer.cms("issue", "again", "00" * 16, "--pack", "B-1b", "--out", str(out),
                         check=False)
    assert unknown.returncode == 1 and "no card of issuance 0000" in unknown.stderr

    issuer.cms("issue", "again", first.header.file_serial.hex(), "--pack", "B-1b", "--out",
               str(out))

    again = F.read_perso((out / "B-1b.csv").read_bytes())
    assert openssl_verify(out / "B-1b.csv", out / "B-1b.csv.p7s").returncode == 0
    assert again.header.file_serial != first.header.file_serial
    assert [r.serial for r in again.rows] == serials
    for before, row in zip(old, again.rows, strict=True):
        opened = open_payload(issuer, row, issuer_public)
        assert opened.payload.binding.sequence == before.payload.binding.sequence + 1 == 2
        assert opened.payload.binding.issuance_id == again.header.file_serial
        # The same user key (one derivation element) and device authentication key.
        assert opened.bundle.user_private_key == before.bundle.user_private_key
        assert opened.bundle.device_auth_public_key == before.bundle.device_auth_public_key
    assert issuer.stock()["reserved"] == 2
    # The old file is superseded: its results are refused, the new file's apply.
    bureau = make_bureau("bureau-1")
    cert = issuer.directory / "bureau.pem"
    cert.write_bytes(bureau.certificate.public_bytes(PEM))
    issuer.cms("bureaus", "trust", "--cert", str(cert))
    path = issuer.directory / "results.csv"
    for serial, expect in ((first.header.file_serial, 1), (again.header.file_serial, 0)):
        data = results(serial, "bureau-1", [(s, "personalized", "") for s in serials])
        path.write_bytes(data)
        (issuer.directory / "results.csv.p7s").write_bytes(bureau.sign(data))
        done = issuer.cms("issue", "results", str(path), check=False)
        assert done.returncode == expect, done.stderr
    assert issuer.stock()["personalized"] == 2
    gone = issuer.cms("issue", "again", again.header.file_serial.hex(), "--pack", "B-1c",
                      "--out", str(out), check=False)
    assert gone.returncode == 1 and "is at the bureau" in gone.stderr
