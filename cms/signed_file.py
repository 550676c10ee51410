"""A file's detached CMS signature (RFC 5652), checked: the one reader every party uses.

Seed 004's files travel beside ``<file>.p7s``, a detached SignedData by one
signer with signed attributes (content type id-data, the message digest,
the signing time), ecdsa-with-SHA256, and the signer's certificate inside:
the provider's packs, the issuer's personalization and mailing files, the
bureau's results and shipping files. ``read_detached`` checks that shape and
that the signature is over these bytes; ``verify_by`` then checks the
signature with the signer certificate's key. Which signer to trust is each
reader's business (a provider root, a bureau the issuer trusts, the issuer's
certificate the bureau was given).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from asn1crypto import cms as acms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

MAX_SIGNATURE_BYTES = 64 * 1024


class SignatureError(ValueError):
    """A signature that is not a detached CMS signature over the file, or does not verify."""


class Detached(NamedTuple):
    """A detached signature's parts: who signed, the signature, the bytes it covers."""

    signer: bytes                # the signer's certificate, DER, from the signature
    value: bytes                 # the ECDSA signature (DER)
    signed_bytes: bytes          # the signed attributes as signed (a SET)


def _one_attribute(attrs: acms.CMSAttributes, name: str) -> object:
    values = [a["values"] for a in attrs if a["type"].native == name]
    if len(values) != 1 or len(values[0]) != 1:
        raise SignatureError(f"the signed attributes must hold one {name}")
    return values[0][0].native


def _signer(signed: acms.SignedData, sid: acms.SignerIdentifier) -> bytes:
    if sid.name != "issuer_and_serial_number":
        raise SignatureError("the signer is not named by issuer and serial")
    wanted = sid.chosen
    for choice in signed["certificates"] or []:
        if choice.name != "certificate":
            continue
        cert = choice.chosen
        if cert.issuer == wanted["issuer"] and cert.serial_number == wanted["serial_number"].native:
            return cert.dump()
    raise SignatureError("the signer's certificate is not in the signature")


def read_detached(data: bytes, signature: bytes) -> Detached:
    """The parts of ``signature`` once its shape is checked and its digest is ``data``'s."""
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature of {len(signature)} bytes, more than "
                             f"{MAX_SIGNATURE_BYTES}")
    try:
        info = acms.ContentInfo.load(signature, strict=True)
        if info["content_type"].native != "signed_data":
            raise SignatureError("the signature is no CMS SignedData")
        signed = info["content"]
        if signed["encap_content_info"]["content_type"].native != "data":
            raise SignatureError("the signed content type is not id-data")
        if signed["encap_content_info"]["content"].native is not None:
            raise SignatureError("the signature is not detached")
        signers = signed["signer_infos"]
        if len(signers) != 1:
            raise SignatureError(f"{len(signers)} signers, expected one")
        signer_info = signers[0]
        attrs = signer_info["signed_attrs"]
        if not attrs:
            raise SignatureError("the signature has no signed attributes")
        if signer_info["digest_algorithm"]["algorithm"].native != "sha256" or \
                signer_info["signature_algorithm"]["algorithm"].native != "sha256_ecdsa":
            raise SignatureError("the signature is not ecdsa-with-SHA256")
        if _one_attribute(attrs, "content_type") != "data":
            raise SignatureError("the signed content type is not id-data")
        if _one_attribute(attrs, "message_digest") != hashlib.sha256(data).digest():
            raise SignatureError("the signature is not over this file (message digest differs)")
        signer_der = _signer(signed, signer_info["sid"])
        value = signer_info["signature"].native
        # The signature covers the attributes' DER with the SET tag, not [0] (RFC 5652 5.4).
        signed_bytes = b"\x31" + attrs.dump()[1:]
    except SignatureError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise SignatureError(f"the signature is not DER CMS ({type(exc).__name__})") from None
    return Detached(signer_der, value, signed_bytes)


def verify_by(detached: Detached, signer: x509.Certificate) -> None:
    """SignatureError unless ``detached`` verifies with ``signer``'s (EC) key."""
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("the signer's key is not an EC key")
    try:
        key.verify(detached.value, detached.signed_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("the signature does not verify") from None


def verify_signed_by(data: bytes, signature: bytes, signer_der: bytes) -> None:
    """SignatureError unless ``signature`` over ``data`` is by exactly the certificate
    ``signer_der`` (a party known by its one certificate: the issuer key's, a bureau's)."""
    detached = read_detached(data, signature)
    if detached.signer != signer_der:
        try:
            subject = x509.load_der_x509_certificate(detached.signer).subject.rfc4514_string()
        except ValueError:
            subject = "an unreadable certificate"
        raise SignatureError(f"signed by {subject!r}, not by the expected signer")
    verify_by(detached, x509.load_der_x509_certificate(signer_der))


def verify_signed_by_key(data: bytes, signature: bytes, spki_der: bytes) -> bytes:
    """The signer's certificate, once ``signature`` over ``data`` is by the key ``spki_der``
    (a party known by its public key, as the issuer key is: IssuerKeys.GetIssuerKey)."""
    from cryptography.hazmat.primitives import serialization

    detached = read_detached(data, signature)
    try:
        signer = x509.load_der_x509_certificate(detached.signer)
    except ValueError:
        raise SignatureError("the signer's certificate is not X.509") from None
    found = signer.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    if found != spki_der:
        raise SignatureError(f"signed by {signer.subject.rfc4514_string()!r}, whose key is "
                             "not the expected signer's")
    verify_by(detached, signer)
    return detached.signer


class Trusted(NamedTuple):
    """The one signer a reader takes: by its certificate (DER), or by its public key
    (SubjectPublicKeyInfo DER) in a self-signed certificate inside the signature."""

    certificate: bytes = b""
    public_key: bytes = b""


def load_trusted(data: bytes) -> Trusted:
    """A signer given as a certificate (PEM or DER) or a public key (PEM); ValueError."""
    from cryptography.hazmat.primitives import serialization

    if b"PUBLIC KEY-----" in data:
        key = serialization.load_pem_public_key(data)
        return Trusted(public_key=key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(data))
    return Trusted(certificate=cert.public_bytes(serialization.Encoding.DER))


def verify_trusted(data: bytes, signature: bytes, trusted: Trusted) -> None:
    """SignatureError unless ``signature`` over ``data`` is ``trusted``'s."""
    if trusted.certificate:
        verify_signed_by(data, signature, trusted.certificate)
    else:
        verify_signed_by_key(data, signature, trusted.public_key)
