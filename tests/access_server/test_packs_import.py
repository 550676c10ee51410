"""Pack import through the real access server over mutual TLS (SQLite): provider roots, a
good import, the same pack again, and each refusal with its row and reason while the stock
stays as it was; `cms providers`, `cms packs` and `cms stock`; the metrics; and the database
holds nothing but public material."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from access_server import packs
from access_server.cli import upload_chunks
from access_server.store import StockState, Store
from cms.pack_format import MAX_FIELD, PackRow
from cms.runtime.client import load_endpoints
from cms.v1 import stock_pb2 as pb
from cms.v1 import stock_pb2_grpc
from tests.support import stock as S
from tests.support.launcher import cms

pytest_plugins = ("tests.support.postgres",)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROVIDER = "acme-cards"


class Server(NamedTuple):
    endpoints: Path
    database: Path
    root: S.Root
    keys: S.DeviceKeys
    stocked: list[PackRow]
    """The rows of pack PK-BASE, imported first."""


def stub(endpoints: Path, identity: str = "admin") -> stock_pb2_grpc.StockStub:
    channel = load_endpoints(endpoints).channel("access_server", identity)
    return stock_pb2_grpc.StockStub(channel)


def upload(endpoints: Path, pack: S.Pack, name: str = "pack.csv") -> pb.Pack:
    return stub(endpoints).ImportPack(upload_chunks(pack.data, pack.signature, name, size=4096),
                                      timeout=120)


def rows(server: Server, prefix: str, count: int) -> list[PackRow]:
    return [S.card_row(server.root, f"{prefix}-{i:03d}", key)
            for i, key in enumerate(server.keys.take(count), start=1)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("stock-server")
    with S.access_server(directory) as endpoints:
        root = S.make_root(PROVIDER)
        stub(endpoints).TrustProvider(pb.TrustProviderRequest(root_certificate=root.der),
                                      timeout=30)
        state = Server(endpoints, directory / "access.db", root, S.DeviceKeys(), [])
        base = rows(state, "BASE", 2)
        upload(endpoints, S.make_pack(root, "PK-BASE", base))
        yield state._replace(stocked=base)


def stock_state(endpoints: Path) -> tuple:
    s = stub(endpoints)
    return (s.GetStock(pb.GetStockRequest(), timeout=30),
            [p.pack_serial for p in s.ListPacks(pb.ListPacksRequest(), timeout=30).packs])


def refused(server: Server, pack: S.Pack) -> grpc.RpcError:
    before = stock_state(server.endpoints)
    with pytest.raises(grpc.RpcError) as err:
        upload(server.endpoints, pack)
    assert stock_state(server.endpoints) == before       # nothing half-imported
    return err.value


# -- provider roots -------------------------------------------------------------------

def test_trusting_a_root_is_idempotent(server: Server) -> None:
    s = stub(server.endpoints)
    again = s.TrustProvider(pb.TrustProviderRequest(root_certificate=server.root.der),
                            timeout=30)
    assert again.provider_id == PROVIDER and again.root_certificate == server.root.der
    listed = s.ListProviders(pb.ListProvidersRequest(), timeout=30).providers
    assert [p.fingerprint for p in listed] == [again.fingerprint]


@pytest.mark.parametrize("make, reason", [
    (lambda: S.make_root("leaf", ca=False).der, "not a CA certificate"),
    (lambda: S.make_root("sub", issuer=S.make_root("other")).der, "not self-signed"),
    (lambda: S.make_root("old", days=10,
                         not_before=S.now() - dt.timedelta(days=30)).der, "expired on"),
    (lambda: b"\x30\x03\x02\x01\x00", "not an X.509 certificate"),
], ids=["not-a-ca", "not-self-signed", "expired", "malformed"])
def test_a_root_that_cannot_be_trusted_is_refused(server: Server, make: Callable[[], bytes],
                                                  reason: str) -> None:
    s = stub(server.endpoints)
    with pytest.raises(grpc.RpcError) as err:
        s.TrustProvider(pb.TrustProviderRequest(root_certificate=make()), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()
    assert len(s.ListProviders(pb.ListProvidersRequest(), timeout=30).providers) == 1


def test_only_admin_reaches_the_stock(server: Server) -> None:
    for identity in ("card-agent", "key-mgmt"):
        with pytest.raises(grpc.RpcError) as err:
            stub(server.endpoints, identity).GetStock(pb.GetStockRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert identity in err.value.details()


# -- a good import --------------------------------------------------------------------

def _metric(endpoints: Path, name: str, **labels: str) -> float | None:
    url = load_endpoints(endpoints).metrics_url("access_server")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (local test server)
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_good_pack_joins_the_stock_once(server: Server) -> None:
    pack = S.make_pack(server.root, "PK-GOOD", rows(server, "GOOD", 3))
    record = upload(server.endpoints, pack, "good.csv")
    assert (record.pack_serial, record.provider_id, record.card_count) == \
        ("PK-GOOD", PROVIDER, 3)
    assert record.imported_by == "admin"
    counts = {p.pack_serial: p for p in stub(server.endpoints).GetStock(
        pb.GetStockRequest(), timeout=30).packs}
    assert (counts["PK-GOOD"].in_stock, counts["PK-GOOD"].reserved) == (3, 0)
    assert counts["PK-GOOD"].import_order > counts["PK-BASE"].import_order
    assert _metric(server.endpoints, "cms_stock_cards", pack="PK-GOOD", state="in_stock") == 3
    assert _metric(server.endpoints, "cms_packs_imported") >= 2

    err = refused(server, pack)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "pack PK-GOOD already imported" in err.details()


# -- refusals -------------------------------------------------------------------------

def _shared_prime_keys() -> tuple[rsa.RSAPublicKey, rsa.RSAPublicKey, rsa.RSAPublicKey]:
    """Key A = p*q, and B = p*r sharing its prime p, and C = s*t (unrelated)."""
    a = rsa.generate_private_key(65537, 2048).private_numbers()
    b = rsa.generate_private_key(65537, 2048).private_numbers()

    def key(p: int, q: int) -> rsa.RSAPublicKey:
        d = pow(65537, -1, (p - 1) * (q - 1))
        numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                        rsa.rsa_crt_iqmp(p, q),
                                        rsa.RSAPublicNumbers(65537, p * q))
        return numbers.private_key().public_key()

    return key(a.p, a.q), key(a.p, b.q), key(b.p, b.q)


def _with(server: Server, serial: str, key: rsa.RSAPublicKey) -> PackRow:
    return S.card_row(server.root, serial, key)


def _signed(server: Server, pack_serial: str, data_rows: list[PackRow]) -> S.Pack:
    return S.make_pack(server.root, pack_serial, data_rows)


def _resigned(server: Server, data: bytes) -> S.Pack:
    return S.Pack(data, S.sign(server.root, data))


def _edit_line(data: bytes, line: int, edit: Callable[[bytes], bytes]) -> bytes:
    lines = data.split(b"\r\n")
    lines[line - 1] = edit(lines[line - 1])
    return b"\r\n".join(lines)


def bad_signature(server: Server) -> S.Pack:
    pack = _signed(server, "PK-SIG", rows(server, "SIG", 2))
    return S.Pack(pack.data.replace(b"PK-SIG", b"PK-SIH"), pack.signature)


def unknown_root(server: Server) -> S.Pack:
    stranger = S.make_root(PROVIDER)
    good = rows(server, "UNK", 1)
    return S.make_pack(stranger, "PK-UNK", good)


def other_provider(server: Server) -> S.Pack:
    data = S.pack_bytes("PK-OTHER", "other-cards", rows(server, "OTH", 1))
    return _resigned(server, data)


def duplicate_pack_serial(server: Server) -> S.Pack:
    return _signed(server, "PK-BASE", rows(server, "DUP", 1))


def serial_in_stock(server: Server) -> S.Pack:
    fresh = rows(server, "NEW", 1)
    return _signed(server, "PK-SER", [*fresh, _with(server, server.stocked[1].serial,
                                                    server.keys.take(1)[0])])


def serial_twice(server: Server) -> S.Pack:
    first = rows(server, "TWICE", 1)[0]
    return _signed(server, "PK-TWICE", [first, _with(server, first.serial,
                                                     server.keys.take(1)[0])])


def _public(der: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def device_key_in_stock(server: Server) -> S.Pack:
    stocked = _public(server.stocked[0].device_public_key)
    return _signed(server, "PK-KEY", [*rows(server, "KEY", 1), _with(server, "KEY-9", stocked)])


def device_key_twice(server: Server) -> S.Pack:
    key = server.keys.take(1)[0]
    return _signed(server, "PK-KEY2", [_with(server, "KEY2-1", key),
                                       _with(server, "KEY2-2", key)])


def malformed_row(server: Server) -> S.Pack:
    good, bad = rows(server, "MAL", 2)
    return _signed(server, "PK-MAL", [good, bad._replace(serial="not a serial")])


def wrong_column_count(server: Server) -> S.Pack:
    data = S.pack_bytes("PK-COL", PROVIDER, rows(server, "COL", 2))
    return _resigned(server, _edit_line(data, 5, lambda line: line + b",extra"))


def oversized_field(server: Server) -> S.Pack:
    data = S.pack_bytes("PK-BIG", PROVIDER, rows(server, "BIG", 2))
    big = b"A" * (MAX_FIELD + 4)
    return _resigned(server, _edit_line(
        data, 5, lambda line: b",".join([*line.split(b",")[:5], big])))


def count_disagrees(server: Server) -> S.Pack:
    return _resigned(server, S.pack_bytes("PK-CNT", PROVIDER, rows(server, "CNT", 2), count=3))


def shared_prime_in_pack(server: Server) -> S.Pack:
    a, b, _ = _shared_prime_keys()
    return _signed(server, "PK-GCD", [*rows(server, "GCD", 1), _with(server, "GCD-A", a),
                                      _with(server, "GCD-B", b)])


def roca_key(server: Server) -> S.Pack:
    key = rsa.RSAPublicNumbers(65537, S.roca_modulus()).public_key()
    return _signed(server, "PK-ROCA", [*rows(server, "ROCA", 1), _with(server, "ROCA-X", key)])


def exponent_three(server: Server) -> S.Pack:
    n = _public(server.keys.take(1)[0].public_bytes(S.DER, S.SPKI)).public_numbers().n
    key = rsa.RSAPublicNumbers(3, n).public_key()
    return _signed(server, "PK-E3", [_with(server, "E3-1", key)])


def certificate_by_another_ca(server: Server) -> S.Pack:
    stranger = S.make_root(PROVIDER)
    good = rows(server, "CA", 1)
    forged = S.card_row(server.root, "CA-2", server.keys.take(1)[0], certificate_root=stranger)
    return _signed(server, "PK-CA", [*good, forged])


def swapped_signed_device_key(server: Server) -> S.Pack:
    first, second = rows(server, "SWAP", 2)
    return _signed(server, "PK-SWAP", [first, second._replace(
        signed_device_key=first.signed_device_key)])


REFUSALS = [
    (bad_signature, grpc.StatusCode.INVALID_ARGUMENT, "message digest differs"),
    (unknown_root, grpc.StatusCode.FAILED_PRECONDITION, "no trusted provider root"),
    (other_provider, grpc.StatusCode.FAILED_PRECONDITION,
     "header: provider id other-cards is not the signing root's"),
    (duplicate_pack_serial, grpc.StatusCode.FAILED_PRECONDITION,
     "header: pack serial PK-BASE was already imported with other contents"),
    (serial_in_stock, grpc.StatusCode.FAILED_PRECONDITION,
     "row 2: card serial is already in stock"),
    (serial_twice, grpc.StatusCode.INVALID_ARGUMENT, "row 2: card serial TWICE-001 is also row 1"),
    (device_key_in_stock, grpc.StatusCode.FAILED_PRECONDITION,
     "row 2: device key is already in stock"),
    (device_key_twice, grpc.StatusCode.INVALID_ARGUMENT, "row 2: device key is also row 1's"),
    (malformed_row, grpc.StatusCode.INVALID_ARGUMENT, "row 2, line 5: serial 'not a serial'"),
    (wrong_column_count, grpc.StatusCode.INVALID_ARGUMENT, "row 2, line 5: 7 columns"),
    (oversized_field, grpc.StatusCode.INVALID_ARGUMENT,
     "row 2, line 5: not CSV: field larger than field limit"),
    (count_disagrees, grpc.StatusCode.INVALID_ARGUMENT, "header says 3 cards, the file has 2"),
    (shared_prime_in_pack, grpc.StatusCode.INVALID_ARGUMENT,
     "row 2: device key shares a prime factor with row 3"),
    (roca_key, grpc.StatusCode.INVALID_ARGUMENT, "row 2: device public key is weak: modulus "
     "has the ROCA fingerprint"),
    (exponent_three, grpc.StatusCode.INVALID_ARGUMENT,
     "row 1: device public key is weak: public exponent is 3"),
    (certificate_by_another_ca, grpc.StatusCode.INVALID_ARGUMENT,
     "row 2: device certificate: its signature does not verify"),
    (swapped_signed_device_key, grpc.StatusCode.INVALID_ARGUMENT,
     "row 2: the signed device key does not verify"),
]


@pytest.mark.parametrize("build, code, reason", REFUSALS, ids=[r[0].__name__ for r in REFUSALS])
def test_a_bad_pack_is_refused_whole_with_its_row_and_reason(
        server: Server, build: Callable[[Server], S.Pack], code: grpc.StatusCode,
        reason: str) -> None:
    err = refused(server, build(server))
    assert err.code() == code, err.details()
    assert reason in err.details()
    assert err.details().startswith("pack pack.csv refused: ")


def test_an_upload_beyond_its_limits_or_without_a_part_is_refused(server: Server) -> None:
    pack = _signed(server, "PK-LIM", rows(server, "LIM", 1))
    for upload_pack, reason in (
            (S.Pack(pack.data, b"\x30" * (packs.MAX_SIGNATURE_BYTES + 1)),
             "signature larger than"),
            (S.Pack(pack.data, b""), "no signature in the upload"),
            (S.Pack(b"", pack.signature), "no pack file in the upload")):
        err = refused(server, upload_pack)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.details()


def test_a_key_sharing_a_prime_with_the_stock_is_refused(server: Server) -> None:
    a, b, c = _shared_prime_keys()
    upload(server.endpoints, _signed(server, "PK-P1", [_with(server, "P1-1", a),
                                                       _with(server, "P1-2", c)]))
    err = refused(server, _signed(server, "PK-P2", [*rows(server, "P2", 1),
                                                    _with(server, "P2-2", b)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 2: device key shares a prime factor with card P1-1 in stock" in err.details()


def test_the_database_holds_only_public_material(server: Server) -> None:
    connection = sqlite3.connect(server.database)
    try:
        serials = {r[0] for r in connection.execute("select serial from stock_card")}
        stored = connection.execute(
            "select device_public_key, issuer_auth_public_key, device_certificate, "
            "issuer_auth_certificate, signed_device_key from stock_card where serial = ?",
            (server.stocked[0].serial,)).fetchone()
        dump = b"".join(bytes(v) for table in ("provider_root", "pack", "stock_card")
                        for row in connection.execute(f"select * from {table}")  # noqa: S608
                        for v in row if isinstance(v, bytes))
    finally:
        connection.close()
    assert {r.serial for r in server.stocked} <= serials
    assert tuple(stored) == tuple(server.stocked[0][1:])      # exactly what the pack carried
    # No PKCS#8 or PKCS#1 private key structure anywhere: the pack carries none.
    for marker in (b"PRIVATE KEY", bytes.fromhex("020100300d06092a864886f70d010101"),
                   bytes.fromhex("020100301306072a8648ce3d0201")):
        assert marker not in dump
    root_key = server.root.key.private_numbers().private_value.to_bytes(32, "big")
    assert root_key not in dump


# -- the commands ---------------------------------------------------------------------

def test_the_commands(server: Server, tmp_path: Path) -> None:
    env = ("--endpoints", str(server.endpoints))
    pem = tmp_path / "root.pem"
    pem.write_bytes(server.root.certificate.public_bytes(serialization.Encoding.PEM))
    assert "trusted: acme-cards" in cms("providers", *env, "trust", "--root-cert",
                                        str(pem)).stdout
    assert "1 provider root(s)" in cms("providers", *env, "list").stdout

    pack = _signed(server, "PK-CLI", rows(server, "CLI", 2))
    path = tmp_path / "pk-cli.csv"
    path.write_bytes(pack.data)
    path.with_name("pk-cli.csv.p7s").write_bytes(pack.signature)
    assert "imported: PK-CLI" in cms("packs", *env, "import", str(path)).stdout
    again = cms("packs", *env, "import", str(path), check=False)
    assert again.returncode != 0 and again.stderr.count("\n") == 1
    assert "ALREADY_EXISTS: pack PK-CLI already imported" in again.stderr

    bad = tmp_path / "bad.csv"
    bad.write_bytes(pack.data.replace(b"PK-CLI", b"PK-CLJ"))
    done = cms("packs", *env, "import", str(bad), "--signature",
               str(path.with_name("pk-cli.csv.p7s")), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "pack bad.csv refused: the signature is not over this file" in done.stderr
    missing = cms("packs", *env, "import", str(tmp_path / "none.csv"), check=False)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    sealed = tmp_path / "pk-cli.csv.p7m"
    sealed.write_bytes(b"\x30\x80")
    done = cms("packs", *env, "import", str(sealed), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "is sealed (CMS EnvelopedData)" in done.stderr and "pk-cli.csv it holds" in done.stderr

    assert "PK-CLI #" in cms("packs", *env, "list").stdout
    table = cms("stock", *env).stdout.splitlines()
    assert table[0].split() == ["pack", "in_stock", "reserved", "personalized", "shipped",
                                "failed", "quarantined"]
    assert ["PK-CLI", "2", "0", "0", "0", "0", "0"] in [line.split() for line in table]
    listed = json.loads(cms("stock", *env, "--json").stdout)["packs"]
    assert {"pack": "PK-CLI", "in_stock": 2}.items() <= \
        next(p for p in listed if p["pack"] == "PK-CLI").items()


def test_openssl_verifies_the_test_packs(server: Server, tmp_path: Path) -> None:
    """The packs these tests build are real detached CMS signatures: openssl agrees."""
    import subprocess

    pack = _signed(server, "PK-OSSL", rows(server, "OSSL", 1))
    (tmp_path / "p.csv").write_bytes(pack.data)
    (tmp_path / "p.csv.p7s").write_bytes(pack.signature)
    (tmp_path / "root.pem").write_bytes(
        server.root.certificate.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                           "p.csv.p7s", "-content", "p.csv", "-CAfile", "root.pem",
                           "-out", "/dev/null"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.postgres
def test_import_and_first_in_first_out_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    root, keys = S.make_root(PROVIDER), S.DeviceKeys()
    with S.access_server(tmp_path, postgres_url) as endpoints:
        stub(endpoints).TrustProvider(pb.TrustProviderRequest(root_certificate=root.der),
                                      timeout=30)
        for pack_serial in ("PK-Z", "PK-A"):
            upload(endpoints, S.make_pack(root, pack_serial, [
                S.card_row(root, f"{pack_serial}-{i}", key)
                for i, key in enumerate(keys.take(2), start=1)]))
        counts = stub(endpoints).GetStock(pb.GetStockRequest(), timeout=30).packs
        assert [(p.pack_serial, p.in_stock) for p in counts] == [("PK-Z", 2), ("PK-A", 2)]
    with Store.from_url(postgres_url) as store:
        taken = store.reserve_cards(3, "issuance")
        assert [c.serial for c in taken] == ["PK-Z-1", "PK-Z-2", "PK-A-1"]
        assert {p.pack_serial: p.counts[StockState.IN_STOCK]
                for p in store.stock_counts()} == {"PK-Z": 0, "PK-A": 1}
