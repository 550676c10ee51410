"""Key check values.

For AES keys GlobalPlatform (Card Specification v2.3 §B.6 / Amendment D)
defines the KCV as the first three bytes of AES-ECB(key, 16 bytes of 0x01).
An HSM computes the same value with one C_Encrypt, so the server can show
and compare KCVs without the key ever leaving it. Key components in a
ceremony use the PKCS#11 method instead (CKA_CHECK_VALUE: AES-ECB of a zero
block), the value custodians read on their component sheets.
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KCV_INPUT: Final = b"\x01" * 16
ZERO_BLOCK: Final = bytes(16)
KCV_LENGTH: Final = 3
AES_KEY_LENGTHS: Final = (16, 24, 32)
"""AES-128, -192 and -256 key lengths in bytes, for every AES key cardcore takes
(check values, SCP03 static keys, diversification)."""


def _first_block(key: bytes, block: bytes, length: int) -> bytes:
    if len(key) not in AES_KEY_LENGTHS:
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")
    if not 1 <= length <= 16:
        raise ValueError("KCV length must be 1..16")
    enc = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()  # noqa: S305
    return (enc.update(block) + enc.finalize())[:length]


def kcv_aes(key: bytes, length: int = KCV_LENGTH) -> bytes:
    """The GlobalPlatform AES KCV of ``key`` (3 bytes by default)."""
    return _first_block(key, KCV_INPUT, length)


def kcv_zero_block(key: bytes, length: int = KCV_LENGTH) -> bytes:
    """The PKCS#11 (CKA_CHECK_VALUE) KCV of an AES key or key component."""
    return _first_block(key, ZERO_BLOCK, length)


def kcv_matches(key: bytes, kcv: bytes) -> bool:
    """Whether ``kcv`` is the key's KCV (constant-time comparison)."""
    if not kcv:
        return False
    return hmac.compare_digest(kcv_aes(key, len(kcv)), bytes(kcv))
