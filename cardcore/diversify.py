"""Per-card key diversification, reproducible inside a PKCS#11 HSM.

The convention (``cms-psd-kdf/1``) is built so that an HSM derives the card
key with one ``C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)`` from the master key
block: the derived key value is AES-ECB(master, data), truncated to
CKA_VALUE_LEN. The derivation *data* (not secret) is computed in software:

    d        = SHA-256(b"cms-psd-kdf/1" || len(element) (1 byte) || element)
    block(j) = d[:14] || key_index (1 byte) || j (1 byte)
    data     = block(1)                 for 16-byte keys
             = block(1) || block(2)     for 24- and 32-byte keys
               (24-byte keys keep the first 24 bytes of the 32-byte output)

Key indexes: ENC = 1, MAC = 2, DEK = 3. The element is the PSD id for MK and
transport sets and the random R for the MKRK set. Hashing the element first
gives fixed-size blocks whatever the element, and binds the convention's name
so the same master key used elsewhere yields unrelated keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cardcore.kcv import AES_KEY_LENGTHS

DOMAIN: Final = b"cms-psd-kdf/1"
KEY_INDEX_ENC: Final = 1
KEY_INDEX_MAC: Final = 2
KEY_INDEX_DEK: Final = 3
KEY_INDEXES: Final = (KEY_INDEX_ENC, KEY_INDEX_MAC, KEY_INDEX_DEK)


def derivation_data(element: bytes, key_index: int, key_length: int) -> bytes:
    """The CKM_AES_ECB_ENCRYPT_DATA input for one key of a card's key set."""
    if len(element) > 0xFF:
        raise ValueError("the derivation element is at most 255 bytes")
    if not 0 <= key_index <= 0xFF:
        raise ValueError("key index is one byte")
    if key_length not in AES_KEY_LENGTHS:
        raise ValueError(f"key length must be 16, 24 or 32, got {key_length}")
    d = hashlib.sha256(DOMAIN + bytes((len(element),)) + bytes(element)).digest()

    def block(j: int) -> bytes:
        return d[:14] + bytes((key_index, j))

    return block(1) if key_length == 16 else block(1) + block(2)


def diversify_software(master_key: bytes, element: bytes, key_index: int,
                       key_length: int) -> bytes:
    """What the HSM derives, computed in software (virtual card factory, tests)."""
    if len(master_key) not in AES_KEY_LENGTHS:
        raise ValueError("the master key is an AES key")
    data = derivation_data(element, key_index, key_length)
    enc = Cipher(algorithms.AES(bytes(master_key)), modes.ECB()).encryptor()  # noqa: S305
    return (enc.update(data) + enc.finalize())[:key_length]


@dataclass(frozen=True)
class StaticKeySet:
    """A card's static SCP03 keys (ENC, MAC, DEK). Never printed."""

    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)

    def __post_init__(self) -> None:
        lengths = {len(self.enc), len(self.mac), len(self.dek)}
        if len(lengths) != 1 or lengths.pop() not in AES_KEY_LENGTHS:
            raise ValueError("a key set holds three AES keys of one length")

    @property
    def key_length(self) -> int:
        return len(self.enc)

    def keys(self) -> tuple[bytes, bytes, bytes]:
        return self.enc, self.mac, self.dek


def diversify_key_set_software(master_key: bytes, element: bytes,
                               key_length: int) -> StaticKeySet:
    """ENC, MAC and DEK of one card, derived with key indexes 1, 2, 3."""
    enc, mac, dek = (diversify_software(master_key, element, i, key_length)
                     for i in KEY_INDEXES)
    return StaticKeySet(enc, mac, dek)
