"""The PKCS#11 check value of key components (AES-ECB of a zero block, first 3 bytes)."""

from __future__ import annotations

import pytest

from cardcore.kcv import kcv_aes, kcv_zero_block


def test_zero_key_vector() -> None:
    # AES-128 of a zero block under the zero key is 66e94bd4... (FIPS-197 style known answer).
    assert kcv_zero_block(bytes(16)) == bytes.fromhex("66e94b")


def test_differs_from_the_globalplatform_method_and_rejects_bad_lengths() -> None:
    key = bytes(range(16))
    assert kcv_zero_block(key) != kcv_aes(key)
    with pytest.raises(ValueError, match="16, 24 or 32"):
        kcv_zero_block(bytes(15))
