"""Raw PKCS#11 access to a test's SoftHSM2 token, as someone holding the token PIN would have.

The proxy never offers to import a secret value or set attributes; tests
that must know a key's value (to check CMACs, ciphers and derivations
against software), or that play a PIN holder planting keys behind the
proxy's back, create objects here. Each call runs in a short child process
of its own: one PKCS#11 context per process, never shared with the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deploy.softhsm import SoftHsm, find_module

_CHILD = r"""
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
req = json.load(sys.stdin)
lib = pkcs11.lib(req["module"])
token = lib.get_token(token_label=req["token"])
with token.open(rw=True, user_pin=req["pin"]) as session:
    if req["op"] == "create":
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.TOKEN: True, Attribute.LABEL: req["label"],
                    Attribute.VALUE: bytes.fromhex(req["value"]),
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: req["extractable"],
                    Attribute.PRIVATE: True}
        if req["id"] is not None:
            template[Attribute.ID] = bytes.fromhex(req["id"])
        for name in ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE"):
            template[Attribute[name]] = name in req["usages"]
        if req["fixed"]:
            template[Attribute.COPYABLE] = False
            template[Attribute.MODIFIABLE] = False
        session.create_object(template)
        print(json.dumps({"ok": True}))
    elif req["op"] == "ecb":
        # As a PIN holder can on SoftHSM: a non-sensitive key derived by AES-ECB of the
        # data, read back: AES-ECB(key, block) of a key the proxy holds (tests only).
        from pkcs11 import Mechanism
        base = list(session.get_objects({Attribute.LABEL: req["label"],
                                         Attribute.CLASS: ObjectClass.SECRET_KEY}))[0]
        out = base.derive_key(KeyType.GENERIC_SECRET, 128, capabilities=0,
                              mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                              mechanism_param=bytes.fromhex(req["block"]),
                              template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                        Attribute.EXTRACTABLE: True, Attribute.VALUE_LEN: 16})
        print(json.dumps(bytes(out[Attribute.VALUE]).hex()))
    elif req["op"] == "generate_ec":
        from pkcs11.util.ec import encode_named_curve_parameters
        common = {Attribute.TOKEN: True, Attribute.LABEL: req["label"]}
        if req["id"] is not None:
            common[Attribute.ID] = bytes.fromhex(req["id"])
        public = {**common, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                  Attribute.WRAP: False, Attribute.DERIVE: False, Attribute.PRIVATE: False,
                  Attribute.EC_PARAMS: encode_named_curve_parameters(req["curve"])}
        private = {**common, Attribute.SIGN: True, Attribute.PRIVATE: True,
                   Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: req["extractable"],
                   Attribute.DECRYPT: False, Attribute.DERIVE: False, Attribute.UNWRAP: False}
        if req["fixed"]:
            for template in (public, private):
                template[Attribute.COPYABLE] = False
                template[Attribute.MODIFIABLE] = False
        session.generate_keypair(KeyType.EC, None, capabilities=0, public_template=public,
                                 private_template=private)
        print(json.dumps({"ok": True}))
    elif req["op"] == "create_certificate":
        from pkcs11 import CertificateType
        template = {Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509, Attribute.TOKEN: True,
                    Attribute.LABEL: req["label"], Attribute.SUBJECT: bytes.fromhex(req["subject"]),
                    Attribute.VALUE: bytes.fromhex(req["value"])}
        session.create_object(template)
        print(json.dumps({"ok": True}))
    elif req["op"] == "wrap_out":
        # As a PIN holder can on SoftHSM: an extractable secret wrapped under a session key
        # of known value, then opened in software (tests only: the issuer's seed).
        from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
        from pkcs11 import Mechanism
        target = list(session.get_objects({Attribute.LABEL: req["label"],
                                           Attribute.CLASS: ObjectClass.SECRET_KEY}))[0]
        known = bytes(range(32))
        wrapper = session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                         Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: False,
                                         Attribute.VALUE: known, Attribute.WRAP: True})
        wrapped = wrapper.wrap_key(target, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        wrapper.destroy()
        print(json.dumps(aes_key_unwrap_with_padding(known, bytes(wrapped)).hex()))
    elif req["op"] == "read":
        found = list(session.get_objects({Attribute.LABEL: req["label"]}))
        out = []
        for obj in found:
            attrs = {}
            for name in req["attributes"]:
                try:
                    value = obj[Attribute[name]]
                except pkcs11.PKCS11Error as exc:
                    value = "error:" + type(exc).__name__
                attrs[name] = value.hex() if isinstance(value, (bytes, bytearray)) else (
                    value if isinstance(value, (bool, int, str)) or value is None else str(value))
            out.append(attrs)
        print(json.dumps(out))
"""


class RawToken:
    """One token of a test's SoftHSM2, reached directly with its user PIN."""

    def __init__(self, hsm: SoftHsm, token: str) -> None:
        self.hsm = hsm
        self.token = token

    def _run(self, request: dict) -> object:
        request = {"module": find_module(), "token": self.token,
                   "pin": self.hsm.pin_file(self.token).read_text().strip(), **request}
        done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(request),
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.hsm.env()}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"raw PKCS#11 call failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout)

    def create_aes(self, label: str, value: bytes, usages: list[str], *,
                   tag: bytes | None = None, extractable: bool = False,
                   fixed: bool = False) -> None:
        """An AES key of known value; ``tag`` is written into CKA_ID (None: no CKA_ID);
        ``fixed``: neither modifiable nor copyable, as the proxy makes its keys."""
        self._run({"op": "create", "label": label, "value": value.hex(), "usages": usages,
                   "id": tag.hex() if tag is not None else None, "extractable": extractable,
                   "fixed": fixed})

    def generate_ec(self, label: str, *, tag: bytes | None = None, curve: str = "secp256r1",
                    extractable: bool = False, fixed: bool = False) -> None:
        """A signing EC pair generated in the token by a PIN holder (CKA_LOCAL true);
        ``tag`` is written into CKA_ID of both halves (None: no CKA_ID)."""
        self._run({"op": "generate_ec", "label": label, "curve": curve,
                   "id": tag.hex() if tag is not None else None, "extractable": extractable,
                   "fixed": fixed})

    def create_certificate(self, label: str, der: bytes) -> None:
        """An X.509 certificate object of the PIN holder's choice under ``label``."""
        from cryptography import x509

        subject = x509.load_der_x509_certificate(der).subject.public_bytes()
        self._run({"op": "create_certificate", "label": label, "value": der.hex(),
                   "subject": subject.hex()})

    def ecb(self, label: str, block: bytes) -> bytes:
        """AES-ECB(key, block) of the DERIVE key ``label``, computed by the token: what a
        holder of the token PIN can get from SoftHSM (docs/threat-model.md), used by tests
        to confirm a key value beyond its 3-byte check value."""
        return bytes.fromhex(self._run({"op": "ecb", "label": label,  # type: ignore[arg-type]
                                        "block": block.hex()}))

    def wrap_out(self, label: str) -> bytes:
        """The value of the extractable secret key ``label``, wrapped out with the token PIN
        (what SoftHSM leaves a PIN holder, docs/threat-model.md), to scan for it."""
        return bytes.fromhex(self._run({"op": "wrap_out",  # type: ignore[arg-type]
                                        "label": label}))

    def read(self, label: str, attributes: list[str]) -> list[dict]:
        """The named attributes (PKCS#11 names without CKA_) of every object labelled so."""
        return self._run({"op": "read", "label": label, "attributes": attributes})  # type: ignore[return-value]


def operator_tag() -> bytes:
    """The CKA_ID the proxy writes on an operator key it generated."""
    from cms.v1 import hsm_pb2 as pb
    from hsm_proxy.key_classes import Tag

    return Tag(pb.OPERATOR_KEY, pb.GENERATED).encode()

