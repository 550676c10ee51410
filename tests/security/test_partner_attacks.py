"""Attacks on the bureau's and the mailing house's keys (seed 004, B4), under the default policy.

The bureau key (``bureau/<name>``, token ``bureau``) signs only the CMS
signatures BureauHsm builds over a file's digest; its codes key
(``bureau-codes/<name>``) only derives PIN and PUK that leave sealed; the
mailer key (``mailer/<name>``, token ``mailer``) decrypts only mailer data,
and answers only PIN and PUK; the mailing house's signing key
(``mailer-sign/<name>``) signs only what MailerHsm builds over a digest.
These tests try to read or use each key otherwise, to reach them as another
identity or in another token, to make the mailer key open what is not mailer
data (a key, a message, data for another mailer), and to get codes or keys
out of any answer or the audit log.
"""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import ObjectClass

from cardcore.apdu import parse_command
from cardcore.pin_block import OAEP_SHA1, decode_pin_block
from cms import keynames
from cms.v1 import hsm_pb2 as pb
from cms.v1 import partners_pb2 as rpb
from tests.security.conftest import BUREAU_NAME, MAILER_NAME, World, refuse_generic_uses
from tests.support.scan import assert_absent
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

BUREAU_TOKEN, MAILER_TOKEN = keynames.BUREAU_TOKEN, keynames.MAILER_TOKEN
BUREAU_KEY = keynames.partner_label(keynames.BUREAU, BUREAU_NAME)
CODES_KEY = keynames.partner_label(keynames.BUREAU_CODES, BUREAU_NAME)
MAILER_KEY = keynames.partner_label(keynames.MAILER, MAILER_NAME)
MAILER_SIGN_KEY = keynames.partner_label(keynames.MAILER_SIGN, MAILER_NAME)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OUTSIDERS = ("access-server", "key-mgmt", "provider", "card-agent", "custodian-1", "stranger")
ATTRIBUTES = ["CLASS", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
              "MODIFIABLE", "COPYABLE", "LOCAL", "ENCRYPT", "DECRYPT", "SIGN", "WRAP", "UNWRAP",
              "DERIVE", "VALUE", "PRIVATE_EXPONENT", "PRIME_1"]


def _private(objects: list[dict]) -> dict:
    found = [o for o in objects if o["CLASS"] in (ObjectClass.PRIVATE_KEY,
                                                  ObjectClass.SECRET_KEY)]
    assert len(found) == 1, objects
    return found[0]


def _spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _mailer_public(world: World) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(world.mailer)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def _open(world: World, data: bytes, identity: str = "mailer", **fields: object) -> str:
    return world.refused(identity, "MailerHsm", "OpenMailerData", rpb.OpenMailerDataRequest(
        **{"mailer": MAILER_NAME, "serial": "ATTACK-1", "mailer_data": data, **fields}),
        *((INVALID,) if identity == "mailer" else ()))


# -- the keys in their tokens ---------------------------------------------------------------

def test_the_partner_keys_never_leave_their_tokens_and_do_one_thing(world: World):
    bureau = _private(RawToken(world.env.hsm, BUREAU_TOKEN).read(BUREAU_KEY, ATTRIBUTES))
    codes = _private(RawToken(world.env.hsm, BUREAU_TOKEN).read(CODES_KEY, ATTRIBUTES))
    mailer = _private(RawToken(world.env.hsm, MAILER_TOKEN).read(MAILER_KEY, ATTRIBUTES))
    signer = _private(RawToken(world.env.hsm, MAILER_TOKEN).read(MAILER_SIGN_KEY, ATTRIBUTES))
    usages = ("ENCRYPT", "DECRYPT", "SIGN", "WRAP", "UNWRAP", "DERIVE")
    for key, allowed, values in ((bureau, "SIGN", ["VALUE"]), (codes, "SIGN", ["VALUE"]),
                                 (mailer, "DECRYPT", ["PRIVATE_EXPONENT", "PRIME_1"]),
                                 (signer, "SIGN", ["VALUE"])):
        assert key["SENSITIVE"] is True and key["EXTRACTABLE"] is False
        assert key["ALWAYS_SENSITIVE"] is True and key["NEVER_EXTRACTABLE"] is True
        assert key["LOCAL"] is True
        assert [key[v] for v in values] == ["error:AttributeSensitive"] * len(values), key
        assert key["MODIFIABLE"] is False and key["COPYABLE"] is False
        assert [u for u in usages if key.get(u) is True] == [allowed], key


def test_no_generic_operation_reaches_the_partner_keys(world: World):
    for identity in ("admin", "bureau", "mailer", *OUTSIDERS):
        for token, label in ((BUREAU_TOKEN, BUREAU_KEY), (BUREAU_TOKEN, CODES_KEY),
                             (MAILER_TOKEN, MAILER_KEY), (MAILER_TOKEN, MAILER_SIGN_KEY)):
            refuse_generic_uses(world, identity, token, label)
        # Nor can anyone make a key of these classes through the Hsm service.
        for token, label in ((BUREAU_TOKEN, "bureau/planted"),
                             (BUREAU_TOKEN, "bureau-codes/planted"),
                             (MAILER_TOKEN, "mailer/planted"),
                             (MAILER_TOKEN, "mailer-sign/planted")):
            world.refused(identity, "Hsm", "GenerateSecretKey", pb.GenerateSecretKeyRequest(
                token=token, algorithm=pb.AES_256, template=pb.KeyTemplate(
                    label=label, usages=[pb.SIGN])))


def test_each_partner_reaches_only_its_own_token_and_rpcs(world: World):
    for identity in ("admin", "mailer", *OUTSIDERS):
        world.refused(identity, "BureauHsm", "SignBureauFile", rpb.SignBureauFileRequest(
            bureau=BUREAU_NAME, purpose="attack", sha256=bytes(32)))
        world.refused(identity, "BureauHsm", "CreateBureauKey",
                      rpb.BureauKeyRequest(bureau="attacker"))
    for identity in ("admin", "bureau", *OUTSIDERS):
        _open(world, bytes(256), identity)
        world.refused(identity, "MailerHsm", "CreateMailerKey",
                      rpb.MailerKeyRequest(mailer="attacker"))
        world.refused(identity, "MailerHsm", "SignMailerFile", rpb.SignMailerFileRequest(
            mailer=MAILER_NAME, purpose="attack", sha256=bytes(32)))
    # Their rules hold in their own tokens only.
    for token in (keynames.ISSUER_TOKEN, keynames.PROVIDER_TOKEN, MAILER_TOKEN):
        world.refused("bureau", "BureauHsm", "CreateBureauKey",
                      rpb.BureauKeyRequest(token=token, bureau="elsewhere"))
    for token in (keynames.ISSUER_TOKEN, BUREAU_TOKEN):
        world.refused("mailer", "MailerHsm", "CreateMailerKey",
                      rpb.MailerKeyRequest(token=token, mailer="elsewhere"))
        world.refused("mailer", "MailerHsm", "SignMailerFile", rpb.SignMailerFileRequest(
            token=token, mailer=MAILER_NAME, purpose="attack", sha256=bytes(32)))
    # The bureau's key is no mailing house's signing key, by its label or its class.
    world.refused("mailer", "MailerHsm", "SignMailerFile", rpb.SignMailerFileRequest(
        token=BUREAU_TOKEN, mailer=BUREAU_NAME, purpose="attack", sha256=bytes(32)))


# -- what the mailer key opens --------------------------------------------------------------

def test_the_mailer_key_opens_nothing_but_mailer_data(world: World):
    public = _mailer_public(world)
    secret = os.urandom(32)
    world.known["a key sealed to the mailer"] = secret
    for plaintext in (secret, b"1234", b"1234\x00", b"\x001234", b"12a4\x0056789012",
                      b"123\x0056789012", b"1234\x001234567890123", b"1234\x005678\x009012"):
        message = _open(world, public.encrypt(plaintext, OAEP_SHA1))
        assert "not mailer data" in message
    # Data for another mailer, random bytes, PKCS#1 v1.5 to this key, the wrong length.
    other = rsa.generate_private_key(65537, 2048).public_key()
    assert "not mailer data" in _open(world, other.encrypt(b"1234\x0056789012", OAEP_SHA1))
    assert "not mailer data" in _open(world, os.urandom(256))
    assert "not mailer data" in _open(world, public.encrypt(b"1234\x0056789012",
                                                            padding.PKCS1v15()))
    assert "256 bytes" in _open(world, os.urandom(128))
    # The key still answers right after every refusal: bad input costs no reconnect.
    opened = world.stub("mailer", "MailerHsm").OpenMailerData(rpb.OpenMailerDataRequest(
        mailer=MAILER_NAME, serial="ATTACK-1", mailer_data=public.encrypt(
            b"2468\x0013579135", OAEP_SHA1)), timeout=60)
    assert (opened.pin, opened.puk) == (b"2468", b"13579135")


def test_bad_partner_requests_are_clear_errors(world: World):
    device = _spki(rsa.generate_private_key(65537, 2048))
    base = {"bureau": BUREAU_NAME, "file_serial": bytes(16), "serial": "ATTACK-1",
            "device_public_key": device, "challenge": bytes(16),
            "mailer_public_key": world.mailer}
    cases = {
        "file_serial": (bytes(15), "file_serial: 16 bytes"),
        "serial": ("lower", "serial"),
        "device_public_key": (_spki(rsa.generate_private_key(3, 2048)), "exponent 3"),
        "challenge": (bytes(8), "challenge: 16 bytes"),
        "mailer_public_key": (b"", "mailer_public_key: required"),
        "pin_length": (3, "pin_length: 4 to 12"),
        "bureau": ("bad name!", "bureau"),
    }
    for field, (value, expected) in cases.items():
        message = world.refused("bureau", "BureauHsm", "SealCardCodes",
                                rpb.SealCardCodesRequest(**{**base, field: value}), INVALID)
        assert expected in message, (field, message)
    for purpose, digest in (("", bytes(32)), ("ok", bytes(31)), ("bad\npurpose", bytes(32))):
        world.refused("bureau", "BureauHsm", "SignBureauFile", rpb.SignBureauFileRequest(
            bureau=BUREAU_NAME, purpose=purpose, sha256=digest), INVALID)
    for purpose, digest in (("", bytes(32)), ("ok", bytes(31)), ("ok", bytes(33)),
                            ("bad\npurpose", bytes(32))):
        world.refused("mailer", "MailerHsm", "SignMailerFile", rpb.SignMailerFileRequest(
            mailer=MAILER_NAME, purpose=purpose, sha256=digest), INVALID)
    world.refused("mailer", "MailerHsm", "SignMailerFile", rpb.SignMailerFileRequest(
        mailer="nobody", purpose="ok", sha256=bytes(32)), grpc.StatusCode.NOT_FOUND)
    world.refused("mailer", "MailerHsm", "CreateMailerKey", rpb.MailerKeyRequest(
        mailer=MAILER_NAME), grpc.StatusCode.ALREADY_EXISTS)
    world.refused("bureau", "BureauHsm", "GetBureauCertificate",
                  rpb.BureauKeyRequest(bureau="nobody"), grpc.StatusCode.NOT_FOUND)
    world.refused("bureau", "BureauHsm", "CreateBureauKey", rpb.BureauKeyRequest(
        bureau=BUREAU_NAME), grpc.StatusCode.ALREADY_EXISTS)


def test_no_answer_or_audit_record_carries_a_code_the_bureau_made(world: World):
    device = rsa.generate_private_key(65537, 2048)
    challenge = os.urandom(16)
    sealed = world.stub("bureau", "BureauHsm").SealCardCodes(rpb.SealCardCodesRequest(
        bureau=BUREAU_NAME, file_serial=os.urandom(16), serial="ATTACK-2",
        device_public_key=_spki(device), challenge=challenge,
        mailer_public_key=world.mailer), timeout=60)
    block = decode_pin_block(0x56, device.decrypt(parse_command(sealed.set_pin).data,
                                                  OAEP_SHA1))
    assert block.pin and block.puk
    codes = {"the bureau's PIN": block.pin, "the bureau's PUK": block.puk}
    assert_absent(sealed.SerializeToString(), codes, "SealCardCodes' answer")
    log = world.env.audit_path.read_bytes()
    assert b"SealCardCodes" in log and b"OpenMailerData" in log
    assert_absent(log, {**codes, "a key sealed to the mailer": world.known.get(
        "a key sealed to the mailer", b"\x00" * 32)}, "the audit log")
    assert hashlib.sha256(sealed.mailer_data).digest() not in log
