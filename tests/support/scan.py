"""Scans for secrets that must never appear: in RPC answers, files, dumps, command output.

A secret counts as found in any of the spellings a leak would take on the way:
its raw bytes, hex in either case, or base64 (the pack files' and protobuf
JSON's encoding). The attack suite scans every answer with these; the
end-to-end tests scan whatever a run left behind.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any


def spellings(value: bytes) -> tuple[bytes, ...]:
    """``value`` as it could leak: raw, hex, HEX, base64."""
    return (value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value))


def assert_absent(blob: bytes, known: Mapping[str, bytes], what: str) -> None:
    """No secret of ``known`` (name -> value) in ``blob``, in any of its spellings."""
    for name, value in known.items():
        for form in spellings(value):
            assert form not in blob, f"{what} holds {name}"


def card_private_values(state: Any) -> list[bytes]:
    """A card's issuance private keys (``virtual_psd.issuance.IssuanceState``) as they could
    leak: the PKCS#8 DER and the P-256 scalar, and every private number of the RSA key."""
    from cryptography.hazmat.primitives import serialization

    assert state.device_private_key is not None and state.issuer_auth_private_key is not None
    numbers = serialization.load_der_private_key(state.device_private_key, None) \
        .private_numbers()  # type: ignore[union-attr]
    out = [state.device_private_key, state.issuer_auth_private_key]
    for value in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp):
        out.append(value.to_bytes((value.bit_length() + 7) // 8, "big"))
    return out
