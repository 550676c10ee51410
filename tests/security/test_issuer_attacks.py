"""Attacks on the issuer HSM (seed 004, B3): the seed, the KEK, device authentication keys.

The seed (``issuer-seed/1`` in token ``issuer``) and the KEK
(``device-auth-kek/1`` in ``issuer-system``) are reached only by IssuerHsm's
purposes. These tests try to read or use them otherwise, to make the issuer
key sign the caller's bytes, to seal a payload to a weak key, to make the
proxy use a device authentication key it did not wrap or a key a PIN holder
planted, and call every RPC as every outsider. The test also plays the cards
and the mailing house (it holds their private keys), so it can open what the
proxy sealed: the user private keys, PINs and PUKs found there, and the seed
itself (wrapped out with the token PIN, as SoftHSM leaves a PIN holder able
to), join the secrets the suite's scan looks for in every later answer and
error, and in the audit log.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import grpc
import pytest
from asn1crypto import cms as acms
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import ObjectClass

from cardcore import personalization as perso
from cms import keynames
from cms.v1 import hsm_pb2 as pb
from cms.v1 import issuer_pb2 as ipb
from cms.v1 import provider_pb2 as ppb
from hsm_proxy.key_classes import Tag
from tests.hsm_proxy.helpers import oaep_sha1
from tests.security.conftest import World, refuse_generic_uses
from tests.security.test_provider_attacks import scalar_in
from tests.support.scan import assert_absent
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

ISSUER, SYSTEM = keynames.ISSUER_TOKEN, keynames.ISSUER_SYSTEM_TOKEN
SEED, KEK = keynames.issuer_seed_label(1), keynames.device_auth_kek_label(1)
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OUTSIDERS = ("key-mgmt", "provider", "card-agent", "custodian-1", "custodian-2", "stranger")
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_OAEP_SHA1 = oaep_sha1()
_serials = itertools.count(1)


def spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(_DER, _SPKI)


@pytest.fixture(scope="module")
def device() -> rsa.RSAPrivateKey:
    """The device key of every card of this module (the test plays the cards)."""
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def mailer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def auth(world: World) -> ipb.DeviceAuthKey:
    return world.stub("access-server", "IssuerHsm").GenerateDeviceAuthKeys(
        ipb.GenerateDeviceAuthKeysRequest(count=1, kek_version=1), timeout=60).keys[0]


def item(device: rsa.RSAPrivateKey, auth: ipb.DeviceAuthKey, **fields: object
         ) -> ipb.IssueItem:
    values = {"serial": f"ATTACK-ISS-{next(_serials):04d}", "device_public_key": spki(device),
              "derivation_element": next(_serials), "device_auth_public_key": auth.public_key,
              "issuance_id": os.urandom(16), "sequence": 1, **fields}
    return ipb.IssueItem(**values)


def batch(*items: ipb.IssueItem, **fields: object) -> ipb.IssueBatchRequest:
    return ipb.IssueBatchRequest(**{"seed_version": 1, "issuer_key_version": 1,
                                    "items": list(items), **fields})


@pytest.fixture(scope="module", autouse=True)
def secrets(world: World, device: rsa.RSAPrivateKey, mailer: rsa.RSAPrivateKey,
            auth: ipb.DeviceAuthKey) -> dict[str, bytes]:
    """What the proxy sealed to the test's cards and mailer, and the seed itself: from
    here on, the suite's scan looks for each in every answer and error."""
    found = {"issuer seed": RawToken(world.env.hsm, ISSUER).wrap_out(SEED)}
    world.known.update(found)
    code, reply = world.attempt("access-server", "IssuerHsm", "IssueBatch", batch(
        item(device, auth), item(device, auth), mailer_public_key=spki(mailer),
        pin_length=12, puk_length=12))
    assert code == grpc.StatusCode.OK
    for n, issued in enumerate(reply.items):
        bundle = perso.decode_bundle(device.decrypt(
            perso.decode_payload(issued.payload).ciphertext, _OAEP_SHA1))
        pin, _, puk = mailer.decrypt(issued.mailer_data, _OAEP_SHA1).partition(b"\x00")
        assert (pin, puk) == (bundle.pin, bundle.puk)
        found.update({f"user private key {n}": bundle.user_private_key, f"PIN {n}": pin,
                      f"PUK {n}": puk})
    world.known.update(found)
    return found


# -- the seed and the KEK in their tokens ---------------------------------------------------

def test_the_seed_and_the_kek_cannot_be_read_or_changed(world: World):
    attributes = ["CLASS", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
                  "MODIFIABLE", "COPYABLE", "LOCAL", "ENCRYPT", "DECRYPT", "SIGN", "WRAP",
                  "UNWRAP", "DERIVE", "VALUE", "TOKEN"]
    [seed] = RawToken(world.env.hsm, ISSUER).read(SEED, attributes)
    assert seed["CLASS"] == ObjectClass.SECRET_KEY and seed["TOKEN"] is True
    assert seed["SENSITIVE"] is True and seed["ALWAYS_SENSITIVE"] is True
    assert seed["LOCAL"] is True and seed["VALUE"] == "error:AttributeSensitive"
    assert not any(seed[u] for u in ("ENCRYPT", "DECRYPT", "SIGN", "WRAP", "UNWRAP", "DERIVE"))
    [kek] = RawToken(world.env.hsm, SYSTEM).read(KEK, attributes)
    assert kek["SENSITIVE"] is True and kek["EXTRACTABLE"] is False
    assert kek["ALWAYS_SENSITIVE"] is True and kek["NEVER_EXTRACTABLE"] is True
    assert (kek["WRAP"], kek["UNWRAP"]) == (True, True)
    assert not any(kek[u] for u in ("ENCRYPT", "DECRYPT", "SIGN", "DERIVE"))
    assert kek["VALUE"] == "error:AttributeSensitive"
    for obj in (seed, kek):
        assert obj["MODIFIABLE"] is False and obj["COPYABLE"] is False


def test_no_generic_operation_reaches_the_seed_or_the_kek(world: World):
    for identity in ("admin", "access-server", *OUTSIDERS):
        for token, label in ((ISSUER, SEED), (SYSTEM, KEK)):
            refuse_generic_uses(world, identity, token, label)
        # Nor can anyone make a key of these classes through the Hsm service.
        for token, label in ((ISSUER, "issuer-seed/9"), (SYSTEM, "device-auth-kek/9")):
            world.refused(identity, "Hsm", "GenerateSecretKey", pb.GenerateSecretKeyRequest(
                token=token, algorithm=pb.AES_256, template=pb.KeyTemplate(
                    label=label, usages=[pb.ENCRYPT])))


def test_outsiders_are_refused_every_issuer_hsm_rpc(world: World, device, auth):
    requests = {
        "CreateSeed": ipb.CreateSeedRequest(version=200),
        "CreateDeviceAuthKek": ipb.CreateDeviceAuthKekRequest(version=200),
        "GenerateDeviceAuthKeys": ipb.GenerateDeviceAuthKeysRequest(count=1, kek_version=1),
        "SignWithDeviceAuthKey": ipb.SignWithDeviceAuthKeyRequest(
            key=auth, challenge=os.urandom(16), serial="OUT-1"),
        "IssueBatch": batch(item(device, auth)),
        "SignIssuerFile": ipb.SignIssuerFileRequest(issuer_key_version=1, purpose="out",
                                                    sha256=bytes(32)),
    }
    for identity in OUTSIDERS:
        for method, request in requests.items():
            world.refused(identity, "IssuerHsm", method, request)
    # admin makes the seed and the KEK and uses neither; the access server the reverse.
    for method in ("GenerateDeviceAuthKeys", "SignWithDeviceAuthKey", "IssueBatch",
                   "SignIssuerFile"):
        world.refused("admin", "IssuerHsm", method, requests[method])
    for method in ("CreateSeed", "CreateDeviceAuthKek"):
        world.refused("access-server", "IssuerHsm", method, requests[method])
    # The access server's rules hold on the issuer's two tokens only.
    world.refused("access-server", "IssuerHsm", "IssueBatch",
                  batch(item(device, auth), token=keynames.HSM1_TOKEN))
    world.refused("access-server", "IssuerHsm", "GenerateDeviceAuthKeys",
                  ipb.GenerateDeviceAuthKeysRequest(token=ISSUER, count=1, kek_version=1))


# -- what comes back --------------------------------------------------------------------------

def test_no_answer_carries_the_seed_a_user_key_or_a_pin(world: World, secrets, device,
                                                        mailer, auth):
    """Every IssuerHsm answer after ``secrets`` is scanned by ``World.attempt`` for the
    seed, the user keys, PINs and PUKs; these answers are the ones a caller gets."""
    assert len(secrets) == 7
    answers = [
        world.attempt("access-server", "IssuerHsm", "IssueBatch", batch(
            item(device, auth), item(device, auth), mailer_public_key=spki(mailer))),
        world.attempt("access-server", "IssuerHsm", "GenerateDeviceAuthKeys",
                      ipb.GenerateDeviceAuthKeysRequest(count=3, kek_version=1)),
        world.attempt("access-server", "IssuerHsm", "SignWithDeviceAuthKey",
                      ipb.SignWithDeviceAuthKeyRequest(key=auth, challenge=os.urandom(16),
                                                       serial="SCAN-1")),
        world.attempt("access-server", "IssuerHsm", "SignIssuerFile", ipb.SignIssuerFileRequest(
            issuer_key_version=1, purpose="scan", sha256=bytes(32))),
        world.attempt("admin", "IssuerHsm", "CreateSeed", ipb.CreateSeedRequest(version=3)),
    ]
    assert all(code == grpc.StatusCode.OK for code, _ in answers)
    # The same element gives the same key as in ``secrets``: shown it, the scan finds it.
    again = world.stub("access-server", "IssuerHsm").IssueBatch(batch(item(
        device, auth, derivation_element=1_000_000)), timeout=60)
    user = perso.decode_bundle(device.decrypt(perso.decode_payload(
        again.items[0].payload).ciphertext, _OAEP_SHA1)).user_private_key
    with pytest.raises(AssertionError, match="holds user"):
        assert_absent(b"x" + user + b"y", {"user key": user}, "a planted leak")
    # The device authentication keys' private halves, by their scalars (P-256).
    publics = [ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), k.public_key)
               for k in answers[1][1].keys] + [
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), auth.public_key)]
    for _, reply in answers:
        assert not scalar_in(reply.SerializeToString(), publics)


def test_the_audit_log_holds_no_secret(world: World, secrets):
    log = world.env.audit_path.read_bytes()
    assert b"IssueBatch" in log and b"issuer-seed/1" in log
    assert_absent(log, secrets, "the audit log")


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "reason"), [
    ({"device_public_key": "rsa1024"}, "1024 bits, not 2048"),
    ({"device_public_key": "e3"}, "exponent 3, not 65537"),
    ({"device_public_key": b"garbage"}, "not a public key"),
    ({"device_public_key": "p256"}, "not an RSA public key"),
    ({"derivation_element": 2**31}, "derivation_element is 0 to 2^31-1"),
    ({"derivation_element": 2**32 - 1}, "derivation_element is 0 to 2^31-1"),
    ({"issuance_id": bytes(15)}, "issuance_id is 16 bytes"),
    ({"issuance_id": bytes(17)}, "issuance_id is 16 bytes"),
    ({"issuance_id": b""}, "issuance_id is 16 bytes"),
    ({"sequence": 0}, "sequence starts at 1"),
    ({"device_auth_public_key": bytes(65)}, "uncompressed P-256 point"),
    ({"device_auth_public_key": b"\x04" + bytes(64)}, "not a P-256 point"),
    ({"serial": "lower-case"}, "card serial"),
])
def test_a_bad_item_fails_the_call_naming_it(world: World, device, auth, fields: dict,
                                             reason: str):
    bad_keys = {"rsa1024": spki(rsa.generate_private_key(65537, 1024)),  # noqa: S505
                "e3": spki(rsa.generate_private_key(3, 2048)),
                "p256": spki(ec.generate_private_key(ec.SECP256R1()))}
    fields = {k: bad_keys.get(v, v) if isinstance(v, str) and k != "serial" else v
              for k, v in fields.items()}
    message = world.refused("access-server", "IssuerHsm", "IssueBatch",
                            batch(item(device, auth), item(device, auth, **fields)), INVALID)
    assert "items[1]" in message and reason in message, message


def test_batches_are_bounded_and_serials_unique(world: World, device, auth):
    world.refused("access-server", "IssuerHsm", "IssueBatch", batch(), INVALID)
    twice = item(device, auth)
    message = world.refused("access-server", "IssuerHsm", "IssueBatch",
                            batch(twice, item(device, auth), twice), INVALID)
    assert "items[2]" in message and "appears twice" in message
    limit = world.env.config()["limits"]["max_batch_items"]
    many = [item(device, auth) for _ in range(limit + 1)]
    message = world.refused("access-server", "IssuerHsm", "IssueBatch", batch(*many),
                            grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(limit) in message
    for count in (0, 4097):
        world.refused("access-server", "IssuerHsm", "GenerateDeviceAuthKeys",
                      ipb.GenerateDeviceAuthKeysRequest(count=count, kek_version=1), INVALID)


@pytest.mark.parametrize(("fields", "what"), [
    ({"seed_version": 0}, "seed_version"),
    ({"seed_version": 256}, "seed_version"),
    ({"issuer_key_version": 0}, "issuer_key_version"),
    ({"pin_length": 6}, "apply only with mailer_public_key"),
    ({"mailer_public_key": b"garbage"}, "mailer_public_key"),
    ({"mailer_public_key": "small", "pin_length": 6}, "mailer_public_key"),
    ({"mailer_public_key": "mailer", "pin_length": 3}, "pin_length"),
    ({"mailer_public_key": "mailer", "puk_length": 13}, "puk_length"),
])
def test_bad_versions_and_codes_are_clear_errors(world: World, device, mailer, auth,
                                                 fields: dict, what: str):
    named = {"mailer": spki(mailer), "small": spki(rsa.generate_private_key(65537, 1024))}  # noqa: S505
    fields = {k: named.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    message = world.refused("access-server", "IssuerHsm", "IssueBatch",
                            batch(item(device, auth), **fields), INVALID)
    assert what in message


def test_an_unknown_seed_is_not_found(world: World, device, auth):
    world.refused("access-server", "IssuerHsm", "IssueBatch",
                  batch(item(device, auth), seed_version=77), grpc.StatusCode.NOT_FOUND)


# -- device authentication keys -----------------------------------------------------------------

def test_only_keys_the_kek_wrapped_sign(world: World, auth):
    admin = world.stub("admin", "IssuerHsm")
    admin.CreateDeviceAuthKek(ipb.CreateDeviceAuthKekRequest(version=2), timeout=60)
    foreign = world.stub("access-server", "IssuerHsm").GenerateDeviceAuthKeys(
        ipb.GenerateDeviceAuthKeysRequest(count=2, kek_version=2), timeout=60).keys
    forged = [
        ipb.DeviceAuthKey(public_key=auth.public_key, wrapped_private_key=os.urandom(40),
                          kek_version=1),
        # A blob another KEK wrapped, presented as the first KEK's.
        ipb.DeviceAuthKey(public_key=foreign[0].public_key,
                          wrapped_private_key=foreign[0].wrapped_private_key, kek_version=1),
        # A genuine blob with another key's public half.
        ipb.DeviceAuthKey(public_key=foreign[1].public_key,
                          wrapped_private_key=foreign[0].wrapped_private_key, kek_version=2),
        ipb.DeviceAuthKey(public_key=auth.public_key,
                          wrapped_private_key=auth.wrapped_private_key[:-8], kek_version=1),
    ]
    reasons = ["not a device authentication key wrapped under 'device-auth-kek/1'"] * 2 + [
        "not the public half"] + ["not a device authentication key wrapped"]
    for key, reason in zip(forged, reasons, strict=True):
        message = world.refused("access-server", "IssuerHsm", "SignWithDeviceAuthKey",
                                ipb.SignWithDeviceAuthKeyRequest(
                                    key=key, challenge=os.urandom(16), serial="FORGED-1"),
                                INVALID)
        assert reason in message, message
    # The genuine pair under its own KEK signs.
    code, _ = world.attempt("access-server", "IssuerHsm", "SignWithDeviceAuthKey",
                            ipb.SignWithDeviceAuthKeyRequest(key=foreign[0],
                                                             challenge=os.urandom(16),
                                                             serial="FORGED-1"))
    assert code == grpc.StatusCode.OK


@pytest.mark.parametrize(("fields", "what"), [
    ({"challenge": bytes(15)}, "16 to 64 bytes"),
    ({"challenge": bytes(65)}, "16 to 64 bytes"),
    ({"serial": ""}, "card serial"),
    ({"kek_version": 0}, "kek_version"),
    ({"public_key": b"\x04" + bytes(64)}, "key.public_key"),
    ({"wrapped_private_key": b""}, "key.wrapped_private_key"),
    ({"wrapped_private_key": bytes(513)}, "key.wrapped_private_key"),
])
def test_sign_with_device_auth_key_takes_a_challenge_and_a_key(world: World, auth,
                                                               fields: dict, what: str):
    key = ipb.DeviceAuthKey()
    key.CopyFrom(auth)
    request = {"challenge": os.urandom(16), "serial": "CHAL-1"}
    for name, value in fields.items():
        if name in ("kek_version", "public_key", "wrapped_private_key"):
            setattr(key, name, value)
        else:
            request[name] = value
    message = world.refused("access-server", "IssuerHsm", "SignWithDeviceAuthKey",
                            ipb.SignWithDeviceAuthKeyRequest(key=key, **request), INVALID)
    assert what in message


# -- what the keys sign --------------------------------------------------------------------------

def _issuer_public(world: World) -> ec.EllipticCurvePublicKey:
    public = serialization.load_der_public_key(world.stub("admin", "IssuerKeys").GetIssuerKey(
        ppb.GetIssuerKeyRequest(version=1), timeout=60).public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def test_no_rpc_makes_the_issuer_key_sign_the_callers_bytes(world: World, device, auth):
    issuer = _issuer_public(world)
    chosen = bytes.fromhex("3081") + b"a certificate the caller would like signed"

    def refuses(signature: bytes, data: bytes) -> None:
        with pytest.raises(InvalidSignature):
            issuer.verify(signature, data, ec.ECDSA(hashes.SHA256()))

    # A payload: what is signed starts with the version byte and the proxy's TLVs, the
    # caller's fields only as checked values inside.
    code, reply = world.attempt("access-server", "IssuerHsm", "IssueBatch",
                                batch(item(device, auth, issuance_id=chosen[:16])))
    assert code == grpc.StatusCode.OK
    payload = perso.decode_payload(reply.items[0].payload)
    assert payload.signed[:2] == bytes((perso.VERSION, perso.TAG_SERIAL))
    issuer.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    refuses(payload.signature, payload.binding.issuance_id)
    # A file signature covers the proxy's signed attributes, never the given digest alone.
    code, reply = world.attempt("access-server", "IssuerHsm", "SignIssuerFile",
                                ipb.SignIssuerFileRequest(issuer_key_version=1, purpose="forge",
                                                          sha256=hashlib.sha256(chosen).digest()))
    assert code == grpc.StatusCode.OK
    signer = acms.ContentInfo.load(reply.signature)["content"]["signer_infos"][0]
    refuses(signer["signature"].native, chosen)
    issuer.verify(signer["signature"].native, b"\x31" + signer["signed_attrs"].dump()[1:],
                  ec.ECDSA(hashes.SHA256()))
    # A device authentication key signs the proxy's statement, with its own key.
    challenge = chosen[:32]
    code, reply = world.attempt("access-server", "IssuerHsm", "SignWithDeviceAuthKey",
                                ipb.SignWithDeviceAuthKeyRequest(key=auth, challenge=challenge,
                                                                 serial="FORGE-1"))
    assert code == grpc.StatusCode.OK
    refuses(reply.signature, perso.issuer_auth_statement("FORGE-1", challenge))
    own = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), auth.public_key)
    with pytest.raises(InvalidSignature):
        own.verify(reply.signature, challenge, ec.ECDSA(hashes.SHA256()))
    own.verify(reply.signature, perso.issuer_auth_statement("FORGE-1", challenge),
               ec.ECDSA(hashes.SHA256()))


# -- planted objects ------------------------------------------------------------------------------

def test_a_seed_planted_with_the_token_pin_is_refused(world: World, device, auth):
    raw = RawToken(world.env.hsm, ISSUER)
    raw.create_aes("issuer-seed/40", os.urandom(32), [])
    raw.create_aes("issuer-seed/41", os.urandom(32), [], extractable=True, fixed=True,
                   tag=Tag(pb.ISSUER_SEED, pb.GENERATED).encode())
    for version, reason in ((40, "no tag"), (41, "does not match its class")):
        message = world.refused("access-server", "IssuerHsm", "IssueBatch",
                                batch(item(device, auth), seed_version=version))
        assert reason in message and f"issuer-seed/{version}" in message, message
    world.refused("admin", "IssuerHsm", "CreateSeed", ipb.CreateSeedRequest(version=40),
                  grpc.StatusCode.ALREADY_EXISTS)


def test_a_kek_planted_with_the_token_pin_is_refused(world: World):
    raw = RawToken(world.env.hsm, SYSTEM)
    known = os.urandom(32)
    raw.create_aes("device-auth-kek/40", known, ["WRAP", "UNWRAP"])
    raw.create_aes("device-auth-kek/41", known, ["WRAP", "UNWRAP"], fixed=True,
                   tag=Tag(pb.DEVICE_AUTH_KEK, pb.GENERATED).encode())
    for version, reason in ((40, "no tag"), (41, "does not match its class")):
        message = world.refused("access-server", "IssuerHsm", "GenerateDeviceAuthKeys",
                                ipb.GenerateDeviceAuthKeysRequest(count=1, kek_version=version))
        assert reason in message, message
    # The newest a planted one: refused, not passed over for an older KEK.
    raw.create_aes("device-auth-kek/254", known, ["WRAP", "UNWRAP"])
    world.refused("access-server", "IssuerHsm", "GenerateDeviceAuthKeys",
                  ipb.GenerateDeviceAuthKeysRequest(count=1, kek_version=0))


def test_a_certificate_planted_beside_an_issuer_key_stops_its_file_signatures(world: World):
    world.stub("admin", "IssuerKeys").CreateIssuerKey(ppb.CreateIssuerKeyRequest(version=60),
                                                      timeout=60)
    RawToken(world.env.hsm, ISSUER).create_certificate(keynames.issuer_key_label(60),
                                                       world.root)
    message = world.refused("access-server", "IssuerHsm", "SignIssuerFile",
                            ipb.SignIssuerFileRequest(issuer_key_version=60, purpose="planted",
                                                      sha256=bytes(32)))
    assert "not the issuer key's own self-signed certificate" in message


def test_an_issuer_key_planted_with_the_token_pin_signs_no_payload_or_file(world: World,
                                                                          device, auth):
    raw = RawToken(world.env.hsm, ISSUER)
    raw.generate_ec("issuer/210")
    raw.generate_ec("issuer/211", tag=Tag(pb.ISSUER_KEY, pb.GENERATED).encode(),
                    extractable=True, fixed=True)
    for version, reason in ((210, "no tag"), (211, "does not match its class")):
        for method, request in (
                ("IssueBatch", batch(item(device, auth), issuer_key_version=version)),
                ("SignIssuerFile", ipb.SignIssuerFileRequest(
                    issuer_key_version=version, purpose="planted", sha256=bytes(32)))):
            message = world.refused("access-server", "IssuerHsm", method, request)
            assert reason in message and f"issuer/{version}" in message, message
