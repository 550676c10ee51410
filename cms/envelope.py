"""CMS EnvelopedData (RFC 5652 section 6) to one RSA recipient: how a file travels sealed.

On the floor because both ends of seed 004 seal files: the provider its packs
to the issuer, the issuer its personalization files to the bureau.

The content is encrypted with AES-256-CBC under a fresh random key and IV;
that key goes to the recipient's certificate by RSAES-OAEP with the default
(SHA-1) parameters of RFC 3560, or by rsaEncryption (PKCS #1 v1.5) for
recipients that have no OAEP. The structures are asn1crypto's, the
arithmetic ``cryptography``'s, so ``openssl cms -decrypt`` opens the result.
"""

from __future__ import annotations

import os
from enum import Enum

from asn1crypto import algos, cms
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CONTENT_KEY_BYTES = 32
IV_BYTES = 16
EMPTY_SEQUENCE = b"\x30\x00"
"""RSAES-OAEP-params with every field at its default (SHA-1, MGF1-SHA-1, no label)."""


class KeyTransport(Enum):
    """How the content key is encrypted to the recipient."""

    OAEP = "oaep"
    PKCS1 = "pkcs1"


class EnvelopeError(ValueError):
    """A recipient certificate that cannot receive an envelope."""


def load_recipient(data: bytes) -> x509.Certificate:
    """A recipient certificate, PEM or DER; EnvelopeError unless its key is RSA."""
    try:
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data))
    except ValueError as exc:
        raise EnvelopeError(f"not an X.509 certificate ({exc})") from None
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise EnvelopeError("the recipient's certificate must carry an RSA key")
    return cert


def _encrypt_key(cert: x509.Certificate, key: bytes, transport: KeyTransport) -> bytes:
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    if transport is KeyTransport.OAEP:
        pad: rsa_padding.AsymmetricPadding = rsa_padding.OAEP(
            mgf=rsa_padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    else:
        pad = rsa_padding.PKCS1v15()
    return public.encrypt(key, pad)


def _key_algorithm(transport: KeyTransport) -> cms.KeyEncryptionAlgorithm:
    if transport is KeyTransport.OAEP:
        # All fields at their defaults: SHA-1, MGF1 with SHA-1, empty label.
        return cms.KeyEncryptionAlgorithm({
            "algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams.load(EMPTY_SEQUENCE)})
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"})


def envelop(content: bytes, recipient: x509.Certificate,
            transport: KeyTransport = KeyTransport.OAEP) -> bytes:
    """ContentInfo(EnvelopedData) DER of ``content`` for ``recipient``."""
    key = os.urandom(CONTENT_KEY_BYTES)
    iv = os.urandom(IV_BYTES)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(content) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    cert = ax509.Certificate.load(recipient.public_bytes(serialization.Encoding.DER))
    recipient_info = cms.RecipientInfo(name="ktri", value=cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier(name="issuer_and_serial_number",
                                       value=cms.IssuerAndSerialNumber({
                                           "issuer": cert.issuer,
                                           "serial_number": cert.serial_number})),
        "key_encryption_algorithm": _key_algorithm(transport),
        "encrypted_key": _encrypt_key(recipient, key, transport),
    }))
    enveloped = cms.EnvelopedData({
        "version": "v0",
        "recipient_infos": [recipient_info],
        "encrypted_content_info": cms.EncryptedContentInfo({
            "content_type": "data",
            "content_encryption_algorithm": cms.EncryptionAlgorithm({
                "algorithm": "aes256_cbc", "parameters": iv}),
            "encrypted_content": encrypted,
        }),
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()
