"""IssuerHsm on a real proxy under the default policy of ``cms dev up``.

The test holds what the cards and the mailing house hold (a software device
key per card, the mailer's RSA key), so it can open what the proxy sealed:
a payload parses with ``cardcore.personalization``, its signature verifies
with the issuer's public key, its ciphertext decrypts with the card's
private key into a bundle whose user key is the secp256k1 key of the
answered public key, and the mailer's data decrypts into the bundle's PIN
and PUK. The seed stays unknown to the test, so derivation is checked by
its properties: one element gives the same key twice, two give two keys.
A file signature verifies with ``openssl cms -verify`` against the issuer
key's certificate and fails on a changed file.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from asn1crypto import cms as acms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore import personalization as perso
from cardcore.issuance import issuer_key_id
from cardcore.issuance_keys import rsa_from_spki
from cms import keynames
from cms.v1 import issuer_pb2 as pb
from cms.v1 import issuer_pb2_grpc, provider_pb2_grpc
from cms.v1 import provider_pb2 as ppb
from deploy.local import default_policy
from tests.hsm_proxy.helpers import oaep_sha1
from tests.support.hsm_proxy import REPO, ProxyEnv, ProxyProcess, write_endpoints

pytestmark = pytest.mark.integration

TIMEOUT = 60
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_OAEP_SHA1 = oaep_sha1()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    env = ProxyEnv.create(tmp_path_factory.mktemp("issuer"), tokens=keynames.TOKENS,
                          policy=default_policy())
    with ProxyProcess(env) as running:
        admin = issuer_pb2_grpc.IssuerHsmStub(running.channel("admin"))
        admin.CreateSeed(pb.CreateSeedRequest(version=1), timeout=TIMEOUT)
        admin.CreateDeviceAuthKek(pb.CreateDeviceAuthKekRequest(version=1), timeout=TIMEOUT)
        provider_pb2_grpc.IssuerKeysStub(running.channel("admin")).CreateIssuerKey(
            ppb.CreateIssuerKeyRequest(version=1), timeout=TIMEOUT)
        yield running


def hsm(proxy: ProxyProcess, identity: str = "access-server") -> issuer_pb2_grpc.IssuerHsmStub:
    return issuer_pb2_grpc.IssuerHsmStub(proxy.channel(identity))


@pytest.fixture(scope="module")
def issuer_public(proxy: ProxyProcess) -> ec.EllipticCurvePublicKey:
    der = provider_pb2_grpc.IssuerKeysStub(proxy.channel("access-server")).GetIssuerKey(
        ppb.GetIssuerKeyRequest(version=1), timeout=TIMEOUT).public_key
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


@pytest.fixture(scope="module")
def device_auth(proxy: ProxyProcess) -> pb.DeviceAuthKey:
    return hsm(proxy).GenerateDeviceAuthKeys(pb.GenerateDeviceAuthKeysRequest(count=1),
                                             timeout=TIMEOUT).keys[0]


class Card:
    """What a card holds that the test needs: its serial and private device key."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.device = rsa.generate_private_key(65537, 2048)

    @property
    def spki(self) -> bytes:
        return self.device.public_key().public_bytes(_DER, _SPKI)


def item(card: Card, element: int, auth: pb.DeviceAuthKey, sequence: int = 1) -> pb.IssueItem:
    return pb.IssueItem(serial=card.serial, device_public_key=card.spki,
                        derivation_element=element, device_auth_public_key=auth.public_key,
                        issuance_id=os.urandom(16), sequence=sequence)


def issue(proxy: ProxyProcess, *items: pb.IssueItem, **fields: object) -> pb.IssueBatchResponse:
    return hsm(proxy).IssueBatch(pb.IssueBatchRequest(
        seed_version=1, issuer_key_version=1, items=list(items), **fields), timeout=TIMEOUT)


def opened(card: Card, issued: pb.IssuedItem) -> tuple[perso.Payload, perso.SecretBundle]:
    payload = perso.decode_payload(issued.payload)
    return payload, perso.decode_bundle(card.device.decrypt(payload.ciphertext, _OAEP_SHA1))


def user_public(bundle: perso.SecretBundle) -> bytes:
    key = ec.derive_private_key(int.from_bytes(bundle.user_private_key, "big"), ec.SECP256K1())
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.CompressedPoint)


def test_the_seed_and_the_kek_are_made_once(proxy: ProxyProcess) -> None:
    admin = hsm(proxy, "admin")
    for call, request in ((admin.CreateSeed, pb.CreateSeedRequest(version=1)),
                          (admin.CreateDeviceAuthKek, pb.CreateDeviceAuthKekRequest(version=1))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    seed = admin.CreateSeed(pb.CreateSeedRequest(version=2), timeout=TIMEOUT)
    assert (seed.label, seed.version, len(seed.seed_id)) == ("issuer-seed/2", 2, 8)
    kek = admin.CreateDeviceAuthKek(pb.CreateDeviceAuthKekRequest(version=2), timeout=TIMEOUT)
    assert (kek.label, kek.version, len(kek.kcv)) == ("device-auth-kek/2", 2, 3)


def test_a_payload_opens_on_its_card_only_and_is_signed_by_the_issuer(
        proxy: ProxyProcess, issuer_public: ec.EllipticCurvePublicKey,
        device_auth: pb.DeviceAuthKey) -> None:
    card, other = Card("ISS-0001"), Card("ISS-0002")
    sent = item(card, 7, device_auth, sequence=3)
    reply = issue(proxy, sent, item(other, 8, device_auth))
    assert [i.serial for i in reply.items] == ["ISS-0001", "ISS-0002"]
    payload, bundle = opened(card, reply.items[0])
    point = issuer_public.public_bytes(serialization.Encoding.X962,
                                       serialization.PublicFormat.UncompressedPoint)
    assert payload.binding == perso.Binding(
        "ISS-0001", perso.device_key_fingerprint(rsa_from_spki(card.spki)), sent.issuance_id, 3,
        issuer_key_id(point))
    issuer_public.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    assert bundle.device_auth_public_key == device_auth.public_key
    assert (bundle.pin, bundle.puk, reply.items[0].mailer_data) == (None, None, b"")
    assert user_public(bundle) == reply.items[0].user_public_key
    assert len(reply.items[0].user_public_key) == 33
    with pytest.raises(ValueError):      # the other card's key cannot open it
        other.device.decrypt(payload.ciphertext, _OAEP_SHA1)


def test_an_element_names_one_user_key(proxy: ProxyProcess,
                                       device_auth: pb.DeviceAuthKey) -> None:
    cards = [Card(f"ELEM-{i}") for i in range(3)]
    reply = issue(proxy, item(cards[0], 41, device_auth), item(cards[1], 41, device_auth),
                  item(cards[2], 42, device_auth))
    keys = [opened(c, i)[1].user_private_key for c, i in zip(cards, reply.items, strict=True)]
    assert keys[0] == keys[1] != keys[2]
    assert reply.items[0].user_public_key == reply.items[1].user_public_key
    assert reply.items[2].user_public_key != reply.items[0].user_public_key
    # Another seed gives the same element another key.
    again = hsm(proxy).IssueBatch(pb.IssueBatchRequest(
        seed_version=2, issuer_key_version=1, items=[item(cards[0], 41, device_auth)]),
        timeout=TIMEOUT)
    assert again.items[0].user_public_key != reply.items[0].user_public_key


def test_the_hsm_makes_pin_and_puk_for_the_mailer(proxy: ProxyProcess,
                                                  device_auth: pb.DeviceAuthKey) -> None:
    mailer = rsa.generate_private_key(65537, 2048)
    cards = [Card(f"MAIL-{i}") for i in range(2)]
    reply = issue(proxy, *(item(c, 100 + i, device_auth) for i, c in enumerate(cards)),
                  mailer_public_key=mailer.public_key().public_bytes(_DER, _SPKI),
                  pin_length=4, puk_length=10)
    seen = set()
    for card, issued in zip(cards, reply.items, strict=True):
        _, bundle = opened(card, issued)
        pin, sep, puk = mailer.decrypt(issued.mailer_data, _OAEP_SHA1).partition(b"\x00")
        assert sep and (pin, puk) == (bundle.pin, bundle.puk)
        assert pin.isdigit() and len(pin) == 4 and puk.isdigit() and len(puk) == 10
        assert pin not in issued.payload and puk not in issued.payload
        seen.add((pin, puk))
    assert len(seen) == 2
    default = issue(proxy, item(Card("MAIL-D"), 5, device_auth),
                    mailer_public_key=mailer.public_key().public_bytes(_DER, _SPKI))
    pin, _, puk = mailer.decrypt(default.items[0].mailer_data, _OAEP_SHA1).partition(b"\x00")
    assert (len(pin), len(puk)) == (6, 8)


def test_a_big_batch_spreads_over_the_workers_in_order(proxy: ProxyProcess,
                                                       device_auth: pb.DeviceAuthKey) -> None:
    card = Card("MANY-0")
    items = [pb.IssueItem(serial=f"MANY-{i}", device_public_key=card.spki,
                          derivation_element=i, device_auth_public_key=device_auth.public_key,
                          issuance_id=os.urandom(16), sequence=1) for i in range(70)]
    reply = issue(proxy, *items)
    assert [i.serial for i in reply.items] == [i.serial for i in items]
    assert len({i.user_public_key for i in reply.items}) == 70
    _, bundle = opened(card, reply.items[69])
    assert user_public(bundle) == reply.items[69].user_public_key


def test_device_authentication_keys_sign_the_issuer_statement(proxy: ProxyProcess) -> None:
    keys = hsm(proxy).GenerateDeviceAuthKeys(pb.GenerateDeviceAuthKeysRequest(
        count=20, kek_version=1), timeout=TIMEOUT).keys
    assert len(keys) == 20 and len({k.public_key for k in keys}) == 20
    assert all(k.kek_version == 1 for k in keys)
    for key in (keys[0], keys[19]):
        challenge = os.urandom(32)
        signature = hsm(proxy).SignWithDeviceAuthKey(pb.SignWithDeviceAuthKeyRequest(
            key=key, challenge=challenge, serial="AUTH-1"), timeout=TIMEOUT).signature
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key.public_key)
        public.verify(signature, perso.issuer_auth_statement("AUTH-1", challenge),
                      ec.ECDSA(hashes.SHA256()))
    hsm(proxy, "admin").CreateDeviceAuthKek(pb.CreateDeviceAuthKekRequest(version=9),
                                            timeout=TIMEOUT)
    newest = hsm(proxy).GenerateDeviceAuthKeys(pb.GenerateDeviceAuthKeysRequest(
        count=1, kek_version=0), timeout=TIMEOUT).keys[0]
    assert newest.kek_version == 9
    challenge = os.urandom(16)
    signature = hsm(proxy).SignWithDeviceAuthKey(pb.SignWithDeviceAuthKeyRequest(
        key=newest, challenge=challenge, serial="AUTH-2"), timeout=TIMEOUT).signature
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), newest.public_key).verify(
        signature, perso.issuer_auth_statement("AUTH-2", challenge), ec.ECDSA(hashes.SHA256()))


def test_an_issuer_file_signature_verifies_with_openssl(proxy: ProxyProcess,
                                                        issuer_public: ec.EllipticCurvePublicKey,
                                                        tmp_path: Path) -> None:
    content = b"serial,payload\nISS-0001,0102\n"
    path = tmp_path / "perso.csv"
    path.write_bytes(content)
    first = hsm(proxy).SignIssuerFile(pb.SignIssuerFileRequest(
        issuer_key_version=1, purpose="perso P-0001", sha256=hashlib.sha256(content).digest()),
        timeout=TIMEOUT).signature
    second = hsm(proxy).SignIssuerFile(pb.SignIssuerFileRequest(
        issuer_key_version=1, purpose="dispatch", sha256=hashlib.sha256(content).digest()),
        timeout=TIMEOUT).signature
    certificates = [acms.ContentInfo.load(s)["content"]["certificates"][0].chosen.dump()
                    for s in (first, second)]
    assert certificates[0] == certificates[1]   # made once, kept beside the key
    cert = x509.load_der_x509_certificate(certificates[0])
    assert cert.public_key().public_bytes(_DER, _SPKI) == issuer_public.public_bytes(_DER, _SPKI)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    (tmp_path / "sig.der").write_bytes(first)
    (tmp_path / "issuer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def verify(content_path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
             str(tmp_path / "sig.der"), "-content", str(content_path), "-CAfile",
             str(tmp_path / "issuer.pem"), "-out", os.devnull],
            capture_output=True, text=True, timeout=TIMEOUT, check=False)

    result = verify(path)
    assert result.returncode == 0, result.stderr
    changed = tmp_path / "changed.csv"
    changed.write_bytes(content.replace(b"0102", b"0103"))
    assert verify(changed).returncode != 0


@pytest.mark.parametrize(("identity", "method", "request_", "code", "words"), [
    ("admin", "CreateSeed", pb.CreateSeedRequest(), "INVALID_ARGUMENT", "version: 1 to 255"),
    ("admin", "CreateDeviceAuthKek", pb.CreateDeviceAuthKekRequest(version=256),
     "INVALID_ARGUMENT", "version: 1 to 255"),
    ("access-server", "GenerateDeviceAuthKeys", pb.GenerateDeviceAuthKeysRequest(),
     "INVALID_ARGUMENT", "count: 1 to 4096"),
    ("access-server", "GenerateDeviceAuthKeys",
     pb.GenerateDeviceAuthKeysRequest(count=1, kek_version=77), "NOT_FOUND",
     "device-auth-kek/77"),
    ("access-server", "SignWithDeviceAuthKey", pb.SignWithDeviceAuthKeyRequest(),
     "INVALID_ARGUMENT", "key.kek_version"),
    ("access-server", "IssueBatch", pb.IssueBatchRequest(), "INVALID_ARGUMENT",
     "seed_version: 1 to 255"),
    ("access-server", "IssueBatch", pb.IssueBatchRequest(seed_version=1, issuer_key_version=1),
     "INVALID_ARGUMENT", "the batch is empty"),
    ("access-server", "SignIssuerFile", pb.SignIssuerFileRequest(), "INVALID_ARGUMENT",
     "issuer_key_version: 1 to 255"),
    ("access-server", "SignIssuerFile", pb.SignIssuerFileRequest(
        issuer_key_version=77, purpose="x", sha256=bytes(32)), "NOT_FOUND", "issuer/77"),
    ("access-server", "SignIssuerFile", pb.SignIssuerFileRequest(
        issuer_key_version=1, purpose="a\nb", sha256=bytes(32)), "INVALID_ARGUMENT",
     "purpose"),
    ("access-server", "SignIssuerFile", pb.SignIssuerFileRequest(
        issuer_key_version=1, purpose="x", sha256=bytes(31)), "INVALID_ARGUMENT", "sha256"),
])
def test_empty_and_unknown_requests_are_clear_errors(proxy: ProxyProcess, identity: str,
                                                     method: str, request_: object, code: str,
                                                     words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(hsm(proxy, identity), method)(request_, timeout=TIMEOUT)
    assert err.value.code().name == code and words in (err.value.details() or ""), \
        err.value.details()


def test_seed_and_kek_commands(proxy: ProxyProcess, tmp_path: Path) -> None:
    endpoints = write_endpoints(tmp_path / "endpoints.json", proxy)

    def cli(*args: str, identity: str = "admin") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cms.cli", "issuer", args[0], "--endpoints", str(endpoints),
             "--identity", identity, *args[1:]], capture_output=True, text=True, cwd=REPO,
            timeout=120, check=False)

    seed = cli("seed", "create", "--version", "20")
    assert seed.returncode == 0, seed.stderr
    assert re.fullmatch(r"issuer-seed/20 version=20 seed_id=[0-9a-f]{16}\n", seed.stdout)
    kek = cli("kek", "create", "--version", "20")
    assert kek.returncode == 0, kek.stderr
    assert re.fullmatch(r"device-auth-kek/20 version=20 kcv=[0-9a-f]{6}\n", kek.stdout)
    for args, words in ((("seed", "create", "--version", "20"), "ALREADY_EXISTS"),
                        (("kek", "create", "--version", "0"), "--version: 1 to 255"),
                        (("seed", "create"), "PERMISSION_DENIED")):
        failed = cli(*args, identity="access-server" if len(args) == 2 else "admin")
        assert failed.returncode == 1 and words in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and not failed.stdout
