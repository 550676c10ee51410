"""Attacks on the provider's root and the issuer keys (seed 004), under the default policy.

The root key (``provider-root/<id>`` in token ``provider``) signs only what
ProviderCa builds: card certificates (CA:FALSE, issued by the root) and CMS
signed attributes around a pack's digest. These tests try to get anything
else out of it: the key itself, a signature through the generic Hsm service,
a CA certificate or a certificate of another issuer, a signature over bytes
the caller chose, and the use of keys and certificates a token PIN holder
planted. Every response is also scanned for the private scalar of a key the
test knows (``scalar_in``), beside the suite's scan for AES keys.
"""

from __future__ import annotations

import hashlib
import itertools

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from pkcs11 import ObjectClass

from cms import keynames
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import hsm_pb2 as pb
from cms.v1 import provider_pb2 as ppb
from hsm_proxy.key_classes import Tag
from tests.security.conftest import ISSUER_KEY, PROVIDER_ID, ROOT, World, refuse_generic_uses
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

PROVIDER, ISSUER = keynames.PROVIDER_TOKEN, keynames.ISSUER_TOKEN
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OUTSIDERS = ("access-server", "key-mgmt", "card-agent", "custodian-1", "custodian-2",
             "stranger")
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_serials = itertools.count(1)


def spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(_DER, _SPKI)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {"device": spki(rsa.generate_private_key(65537, 2048)),
            "auth": spki(ec.generate_private_key(ec.SECP256R1())),
            "rsa1024": spki(rsa.generate_private_key(65537, 1024)),  # noqa: S505 (the bad key)
            "e3": spki(rsa.generate_private_key(3, 2048)),
            "p384": spki(ec.generate_private_key(ec.SECP384R1()))}


def serial() -> str:
    return f"ATTACK-{next(_serials):04d}"


def card(keys: dict[str, bytes], **fields: object) -> ppb.CardPublicKeys:
    values = {"serial": serial(), "device_public_key": keys["device"],
              "issuer_auth_public_key": keys["auth"], **fields}
    return ppb.CardPublicKeys(**values)


def issue(provider_id: str = PROVIDER_ID, *cards: ppb.CardPublicKeys,
          **fields: object) -> ppb.IssueCardCertificatesRequest:
    return ppb.IssueCardCertificatesRequest(provider_id=provider_id, cards=list(cards),
                                            **fields)


def off_curve_spki(good: bytes) -> bytes:
    """A P-256 SubjectPublicKeyInfo whose point is not on the curve (last byte changed)."""
    return good[:-1] + bytes([good[-1] ^ 0x01])


def scalar_in(blob: bytes, public_keys: list[ec.EllipticCurvePublicKey]) -> bool:
    """Whether any 32-byte window of ``blob`` is the private scalar of one of the keys."""
    points = {k.public_bytes(serialization.Encoding.X962,
                             serialization.PublicFormat.UncompressedPoint) for k in public_keys}
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    for offset in range(len(blob) - 31):
        d = int.from_bytes(blob[offset:offset + 32], "big")
        if not 0 < d < order:
            continue
        public = ec.derive_private_key(d, ec.SECP256R1()).public_key()
        if public.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint) in points:
            return True
    return False


def root_public(world: World) -> ec.EllipticCurvePublicKey:
    public = x509.load_der_x509_certificate(world.root).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


# -- the key in the token -----------------------------------------------------------------

def test_the_root_and_issuer_keys_never_leave_their_token_and_cannot_be_changed(world: World):
    attributes = ["CLASS", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
                  "MODIFIABLE", "COPYABLE", "LOCAL", "SIGN", "DECRYPT", "DERIVE", "UNWRAP",
                  "VALUE"]
    for token, label in ((PROVIDER, ROOT), (ISSUER, ISSUER_KEY)):
        objects = RawToken(world.env.hsm, token).read(label, attributes)
        private = [o for o in objects if o["CLASS"] == ObjectClass.PRIVATE_KEY]
        assert len(private) == 1, objects
        key = private[0]
        assert key["SENSITIVE"] is True and key["EXTRACTABLE"] is False
        assert key["ALWAYS_SENSITIVE"] is True and key["NEVER_EXTRACTABLE"] is True
        assert key["LOCAL"] is True and key["SIGN"] is True
        assert (key["DECRYPT"], key["DERIVE"], key["UNWRAP"]) == (False, False, False)
        assert key["VALUE"] == "error:AttributeSensitive"   # not even with the token PIN
        for obj in objects:
            assert obj["MODIFIABLE"] is False and obj["COPYABLE"] is False, (label, obj)
    certificates = [o for o in RawToken(world.env.hsm, PROVIDER).read(ROOT, ["CLASS", "VALUE"])
                    if o["CLASS"] == ObjectClass.CERTIFICATE]
    assert [bytes.fromhex(c["VALUE"]) for c in certificates] == [world.root]


def test_no_generic_operation_reaches_the_root_or_the_issuer_key(world: World):
    for identity in ("admin", "provider", *OUTSIDERS):
        for token, label in ((PROVIDER, ROOT), (ISSUER, ISSUER_KEY)):
            refuse_generic_uses(world, identity, token, label)
        for role in (pb.PROVIDER_ROOT, pb.ISSUER_KEY):
            # Nor can anyone make a key of these classes through the Hsm service.
            world.refused(identity, "Hsm", "GenerateKeyPair", pb.GenerateKeyPairRequest(
                token=PROVIDER, algorithm=pb.EC_P256, template=pb.KeyTemplate(
                    label=ROOT if role == pb.PROVIDER_ROOT else "issuer/9",
                    usages=[pb.SIGN])))


def test_outsiders_are_refused_every_provider_and_issuer_rpc(world: World, keys):
    for identity in OUTSIDERS:
        world.refused(identity, "ProviderCa", "CreateRoot",
                      ppb.CreateRootRequest(provider_id="outsider"))
        world.refused(identity, "ProviderCa", "GetRoot",
                      ppb.GetRootRequest(provider_id=PROVIDER_ID))
        world.refused(identity, "ProviderCa", "IssueCardCertificates",
                      issue(PROVIDER_ID, card(keys)))
        world.refused(identity, "ProviderCa", "SignPack", ppb.SignPackRequest(
            provider_id=PROVIDER_ID, pack_serial="P-1", sha256=bytes(32)))
        world.refused(identity, "IssuerKeys", "CreateIssuerKey",
                      ppb.CreateIssuerKeyRequest(version=250))
        if identity != "access-server":
            world.refused(identity, "IssuerKeys", "GetIssuerKey",
                          ppb.GetIssuerKeyRequest(version=1))
    # admin reads the root but signs nothing with it; the provider makes no issuer key.
    world.refused("admin", "ProviderCa", "CreateRoot", ppb.CreateRootRequest(provider_id="op"))
    world.refused("admin", "ProviderCa", "SignPack", ppb.SignPackRequest(
        provider_id=PROVIDER_ID, pack_serial="P-1", sha256=bytes(32)))
    world.refused("admin", "ProviderCa", "IssueCardCertificates",
                  issue(PROVIDER_ID, card(keys)))
    world.refused("provider", "IssuerKeys", "CreateIssuerKey",
                  ppb.CreateIssuerKeyRequest(version=251))
    world.refused("provider", "IssuerKeys", "GetIssuerKey", ppb.GetIssuerKeyRequest())


def test_the_provider_reaches_no_other_token_key_or_master(world: World):
    # Its root rules hold on token provider only, for provider-root labels only.
    for token in (keynames.HSM1_TOKEN, keynames.HSM2_TOKEN, ISSUER):
        world.refused("provider", "ProviderCa", "CreateRoot",
                      ppb.CreateRootRequest(token=token, provider_id="elsewhere"))
    # Card channels: the factory transport master only, never an MK or the MKRK.
    for master in ("mk/1", "mkrk/1"):
        world.refused("provider", "CardKeys", "DeriveKeySet", kpb.DeriveKeySetRequest(
            spec=kpb.KeySetSpec(token=keynames.HSM1_TOKEN, key_length=16,
                                diversified=kpb.Diversified(master_label=master,
                                                            element=bytes(10)))))
    world.refused("provider", "Hsm", "ListKeys", pb.ListKeysRequest(token=PROVIDER))
    world.refused("provider", "Hsm", "GenerateRandom",
                  pb.GenerateRandomRequest(token=PROVIDER, length=16))


# -- what the root signs --------------------------------------------------------------------

def test_no_input_makes_a_ca_certificate_or_one_of_another_issuer(world: World, keys):
    root = x509.load_der_x509_certificate(world.root)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    requests = [
        issue(PROVIDER_ID, card(keys)),
        issue(PROVIDER_ID, card(keys, serial="CA")),
        issue(PROVIDER_ID, card(keys, serial="ROOT-" + PROVIDER_ID.upper()[:20])),
        # The root's own public key as a card key: still an end-entity certificate.
        issue(PROVIDER_ID, card(keys, issuer_auth_public_key=root.public_key().public_bytes(
            _DER, _SPKI))),
        issue(PROVIDER_ID, card(keys), validity_days=1),
    ]
    for request in requests:
        code, reply = world.attempt("provider", "ProviderCa", "IssueCardCertificates", request)
        assert code == grpc.StatusCode.OK, code
        for got in reply.certificates:
            for der, usage in ((got.device_certificate, "key_encipherment"),
                               (got.issuer_auth_certificate, "digital_signature")):
                cert = x509.load_der_x509_certificate(der)
                constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
                assert constraints.critical and constraints.value.ca is False
                usage_ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
                assert usage_ext.critical and getattr(usage_ext.value, usage) is True
                assert usage_ext.value.key_cert_sign is False
                assert usage_ext.value.crl_sign is False
                assert cert.issuer == root.subject
                aki = cert.extensions.get_extension_for_oid(
                    ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
                assert aki.key_identifier == root_ski.digest
                cert.verify_directly_issued_by(root)
                assert cert.not_valid_after_utc <= root.not_valid_after_utc
    # Another provider id names another root: none exists, so nothing is issued.
    world.refused("provider", "ProviderCa", "IssueCardCertificates",
                  issue("someone-else", card(keys)), grpc.StatusCode.NOT_FOUND)
    # Nor a validity past the root's.
    world.refused("provider", "ProviderCa", "IssueCardCertificates",
                  issue(PROVIDER_ID, card(keys), validity_days=9000), INVALID)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("device_public_key", "rsa1024", "1024 bits, not 2048"),
    ("device_public_key", "e3", "exponent 3, not 65537"),
    ("device_public_key", "auth", "not an RSA public key"),
    ("device_public_key", b"\x30\x03\x02\x01\x01", "not a public key"),
    ("issuer_auth_public_key", "off-curve", "not a public key"),
    ("issuer_auth_public_key", "p384", "not a P-256 public key"),
    ("issuer_auth_public_key", "device", "not a P-256 public key"),
    ("issuer_auth_public_key", b"garbage", "not a public key"),
    ("issuer_auth_public_key", b"", "not a public key"),
])
def test_a_bad_card_key_fails_the_call_naming_the_card(world: World, keys, field: str,
                                                       value: str | bytes, reason: str):
    bad = (off_curve_spki(keys["auth"]) if value == "off-curve"
           else keys[value] if isinstance(value, str) else value)
    victim = card(keys, **{field: bad})
    message = world.refused("provider", "ProviderCa", "IssueCardCertificates",
                            issue(PROVIDER_ID, card(keys), victim), INVALID)
    assert f"cards[1] (serial {victim.serial}): {field}" in message and reason in message


@pytest.mark.parametrize("bad", ["", "lower-case", "A" * 33, "-LEAD", "CARD/1", "CARD,1",
                                 "CARD\n1", "CN=X, O=Y", "CARD 1"])
def test_a_bad_serial_fails_the_call(world: World, keys, bad: str):
    message = world.refused("provider", "ProviderCa", "IssueCardCertificates",
                            issue(PROVIDER_ID, card(keys, serial=bad)), INVALID)
    assert "cards[0]" in message and "card serial" in message


def test_batches_are_bounded_and_serials_unique(world: World, keys):
    world.refused("provider", "ProviderCa", "IssueCardCertificates", issue(PROVIDER_ID),
                  INVALID)
    twice = card(keys)
    message = world.refused("provider", "ProviderCa", "IssueCardCertificates",
                            issue(PROVIDER_ID, twice, card(keys), twice), INVALID)
    assert "cards[2]" in message and "appears twice" in message
    limit = world.env.config()["limits"]["max_batch_items"]
    many = [ppb.CardPublicKeys(serial=f"MANY-{i}", device_public_key=keys["device"],
                               issuer_auth_public_key=keys["auth"]) for i in range(limit + 1)]
    message = world.refused("provider", "ProviderCa", "IssueCardCertificates",
                            issue(PROVIDER_ID, *many), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(limit) in message


def test_a_pack_signature_is_never_a_signature_over_the_callers_bytes(world: World):
    """The caller gives a digest; the root signs the proxy's signed attributes around it.
    A digest of bytes the caller chose (here a forged TBSCertificate) gets a signature
    that verifies over the attributes only, never over those bytes."""
    forged_tbs = bytes.fromhex("3081") + b"a certificate the caller would like signed"
    code, reply = world.attempt("provider", "ProviderCa", "SignPack", ppb.SignPackRequest(
        provider_id=PROVIDER_ID, pack_serial="P-2", sha256=hashlib.sha256(forged_tbs).digest()))
    assert code == grpc.StatusCode.OK
    from asn1crypto import cms

    signed = cms.ContentInfo.load(reply.signature)["content"]
    signer = signed["signer_infos"][0]
    attributes = signer["signed_attrs"]
    assert [a["type"].native for a in attributes] and {
        a["type"].native for a in attributes} == {"content_type", "message_digest",
                                                  "signing_time"}
    signature = signer["signature"].native
    public = root_public(world)
    with pytest.raises(InvalidSignature):
        public.verify(signature, forged_tbs, ec.ECDSA(hashes.SHA256()))
    # RFC 5652 5.4: the signature covers the attributes' DER with the SET tag, not [0].
    public.verify(signature, b"\x31" + attributes.dump()[1:], ec.ECDSA(hashes.SHA256()))
    assert signed["encap_content_info"]["content"].native is None   # detached


@pytest.mark.parametrize(("fields", "what"), [
    ({"sha256": b"\x00" * 31}, "sha256"),
    ({"sha256": b"\x00" * 64}, "sha256"),
    ({"sha256": b""}, "sha256"),
    ({"pack_serial": ""}, "pack_serial"),
    ({"pack_serial": "P/1"}, "pack_serial"),
    ({"pack_serial": "x" * 65}, "pack_serial"),
])
def test_sign_pack_takes_a_sha256_and_a_pack_serial(world: World, fields, what: str):
    request = {"provider_id": PROVIDER_ID, "pack_serial": "P-3", "sha256": bytes(32), **fields}
    message = world.refused("provider", "ProviderCa", "SignPack",
                            ppb.SignPackRequest(**request), INVALID)
    assert what in message


def test_bad_names_and_versions_are_clear_errors(world: World):
    for provider_id in ("", "a/b", "-x", "x" * 65):
        message = world.refused("provider", "ProviderCa", "CreateRoot",
                                ppb.CreateRootRequest(provider_id=provider_id), INVALID)
        assert "provider_id" in message
    world.refused("provider", "ProviderCa", "CreateRoot", ppb.CreateRootRequest(
        provider_id="too-long-lived", validity_days=9126), INVALID)
    for version in (0, 256, 1000):
        message = world.refused("admin", "IssuerKeys", "CreateIssuerKey",
                                ppb.CreateIssuerKeyRequest(version=version), INVALID)
        assert "version" in message
    world.refused("admin", "IssuerKeys", "GetIssuerKey", ppb.GetIssuerKeyRequest(version=256),
                  INVALID)


# -- planted keys and certificates ------------------------------------------------------------

@pytest.mark.parametrize(("name", "plant", "reason"), [
    ("untagged", {}, "no tag"),
    ("extractable", {"tag": True, "extractable": True, "fixed": True},
     "does not match its class"),
    ("modifiable", {"tag": True}, "does not match its class"),
    ("p384", {"tag": True, "fixed": True, "curve": "secp384r1"}, "not a P-256 key"),
    ("imported", {"tag": pb.IMPORTED, "fixed": True}, "no provider-root is made by imported"),
])
def test_a_root_planted_with_the_token_pin_is_refused(world: World, keys, name: str,
                                                      plant: dict, reason: str):
    label = keynames.provider_root_label(f"planted-{name}")
    origin = plant.pop("tag", None)
    tag = None if origin is None else Tag(pb.PROVIDER_ROOT, pb.GENERATED if origin is True
                                          else origin).encode()
    RawToken(world.env.hsm, PROVIDER).generate_ec(label, tag=tag, **plant)
    provider_id = label.split("/", 1)[1]
    for method, request in (
            ("GetRoot", ppb.GetRootRequest(provider_id=provider_id)),
            ("IssueCardCertificates", issue(provider_id, card(keys))),
            ("SignPack", ppb.SignPackRequest(provider_id=provider_id, pack_serial="P-4",
                                             sha256=bytes(32)))):
        message = world.refused("provider", "ProviderCa", method, request)
        assert reason in message and label in message, message
    world.refused("provider", "ProviderCa", "CreateRoot",
                  ppb.CreateRootRequest(provider_id=provider_id),
                  grpc.StatusCode.ALREADY_EXISTS)


def test_a_certificate_planted_beside_a_root_stops_it(world: World, keys):
    """A second certificate under a root's label (a PIN holder's, here one of the root's
    own card certificates) makes the root ambiguous: nothing is issued or signed."""
    provider_id = "planted-certificate"
    code, _ = world.attempt("provider", "ProviderCa", "CreateRoot",
                            ppb.CreateRootRequest(provider_id=provider_id))
    assert code == grpc.StatusCode.OK
    code, reply = world.attempt("provider", "ProviderCa", "IssueCardCertificates",
                                issue(provider_id, card(keys)))
    assert code == grpc.StatusCode.OK
    label = keynames.provider_root_label(provider_id)
    RawToken(world.env.hsm, PROVIDER).create_certificate(
        label, reply.certificates[0].issuer_auth_certificate)
    for method, request in (
            ("GetRoot", ppb.GetRootRequest(provider_id=provider_id)),
            ("IssueCardCertificates", issue(provider_id, card(keys))),
            ("SignPack", ppb.SignPackRequest(provider_id=provider_id, pack_serial="P-5",
                                             sha256=bytes(32)))):
        message = world.refused("provider", "ProviderCa", method, request,
                                grpc.StatusCode.FAILED_PRECONDITION)
        assert "more than one certificate" in message


def test_a_planted_root_certificate_of_another_key_is_refused(world: World, keys):
    """A PIN holder's root key made exactly as the proxy makes one (which SoftHSM cannot
    tell apart, docs/threat-model.md), beside the certificate of another root: refused,
    the certificate must carry the root's key and the root's own signature."""
    label = keynames.provider_root_label("foreign-certificate")
    raw = RawToken(world.env.hsm, PROVIDER)
    raw.generate_ec(label, tag=Tag(pb.PROVIDER_ROOT, pb.GENERATED).encode(), fixed=True)
    raw.create_certificate(label, world.root)
    message = world.refused("provider", "ProviderCa", "GetRoot",
                            ppb.GetRootRequest(provider_id="foreign-certificate"))
    assert "not the root's own self-signed certificate" in message


def test_an_issuer_key_planted_with_the_token_pin_is_refused(world: World):
    raw = RawToken(world.env.hsm, ISSUER)
    raw.generate_ec("issuer/200")
    raw.generate_ec("issuer/201", tag=Tag(pb.ISSUER_KEY, pb.GENERATED).encode(),
                    extractable=True, fixed=True)
    for version, reason in ((200, "no tag"), (201, "does not match its class")):
        message = world.refused("admin", "IssuerKeys", "GetIssuerKey",
                                ppb.GetIssuerKeyRequest(version=version))
        assert reason in message
    # The newest is now a planted one: refused too, not passed over for an older key.
    world.refused("access-server", "IssuerKeys", "GetIssuerKey", ppb.GetIssuerKeyRequest())


# -- the scan ----------------------------------------------------------------------------------

def test_no_response_carries_a_private_key(world: World, keys):
    """Every response of the new RPCs, scanned for the private scalar of a key whose
    public half the test knows: the scan finds one it is shown, and none in the answers."""
    probe = ec.generate_private_key(ec.SECP256R1())
    leaked = b"prefix" + probe.private_numbers().private_value.to_bytes(32, "big") + b"suffix"
    assert scalar_in(leaked, [probe.public_key()])
    public = serialization.load_der_public_key(world.stub("admin", "IssuerKeys").GetIssuerKey(
        ppb.GetIssuerKeyRequest(version=1), timeout=60).public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    watched = [root_public(world), public]
    answers = [
        world.attempt("provider", "ProviderCa", "GetRoot",
                      ppb.GetRootRequest(provider_id=PROVIDER_ID)),
        world.attempt("provider", "ProviderCa", "IssueCardCertificates",
                      issue(PROVIDER_ID, card(keys))),
        world.attempt("provider", "ProviderCa", "SignPack", ppb.SignPackRequest(
            provider_id=PROVIDER_ID, pack_serial="P-6", sha256=bytes(32))),
        world.attempt("access-server", "IssuerKeys", "GetIssuerKey",
                      ppb.GetIssuerKeyRequest(version=1)),
    ]
    for code, reply in answers:
        assert code == grpc.StatusCode.OK
        assert not scalar_in(reply.SerializeToString(), watched)
