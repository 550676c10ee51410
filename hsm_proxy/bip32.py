"""BIP32 private derivation on secp256k1: what the issuer's seed gives each user.

SoftHSM has no BIP32 mechanism, so the issuer HSM operation derives in the
worker that owns the seed's token (``hsm_proxy.issuer_ops``; the threat model
says what is in clear there, and for how long). This module is the arithmetic
only, after BIP-0032 (https://github.com/bitcoin/bips/blob/master/bip-0032.mediawiki):
the master key from a seed, private child derivation (CKDpriv), the
compressed public key and the key identifier's fingerprint. No extended-key
serialization: the proxy never reads or writes an xprv or xpub.

A user's key is ``m/<derivation element>'``: one hardened index. Hardened,
so that neither a user's private key nor the master public key with its
chain code gives anyone another user's key.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore.issuance import SECP256K1_ORDER

CURVE_ORDER: Final = SECP256K1_ORDER
HARDENED: Final = 0x80000000
SEED_LENGTHS: Final = range(16, 65)
"""BIP32: a seed of 128 to 512 bits."""
_MASTER_KEY: Final = b"Bitcoin seed"


class Bip32Error(ValueError):
    """A seed, key or index BIP32 does not derive from (the caller says which input)."""


class PrivateNode(NamedTuple):
    """An extended private key: the scalar and its chain code."""

    key: int
    chain_code: bytes


def node(key: bytes, chain_code: bytes) -> PrivateNode:
    """The node of a 32-byte private key, refused when it is not in 1..n-1."""
    value = int.from_bytes(key, "big")
    if len(key) != 32 or len(chain_code) != 32 or not 0 < value < CURVE_ORDER:
        raise Bip32Error("a private key is 32 bytes in 1..n-1, with a 32-byte chain code")
    return PrivateNode(value, chain_code)


def _split(digest: bytes) -> tuple[int, bytes]:
    tweak = int.from_bytes(digest[:32], "big")
    if tweak >= CURVE_ORDER:
        raise Bip32Error("the derivation gives no valid key (I_L >= n)")
    return tweak, digest[32:]


def master(seed: bytes | bytearray) -> PrivateNode:
    """The master node: HMAC-SHA512 keyed "Bitcoin seed" over the seed."""
    if len(seed) not in SEED_LENGTHS:
        raise Bip32Error(f"a seed is 16 to 64 bytes, not {len(seed)}")
    key, chain_code = _split(hmac.digest(_MASTER_KEY, bytes(seed), "sha512"))
    if key == 0:
        raise Bip32Error("the seed gives no valid master key")
    return PrivateNode(key, chain_code)


def public_key(parent: PrivateNode) -> bytes:
    """The compressed public key (33 bytes, SEC1) of a node."""
    point = ec.derive_private_key(parent.key, ec.SECP256K1()).public_key()
    return point.public_bytes(serialization.Encoding.X962,
                              serialization.PublicFormat.CompressedPoint)


def child(parent: PrivateNode, index: int) -> PrivateNode:
    """CKDpriv: the child at ``index`` (hardened from 2^31)."""
    if not 0 <= index < 2 * HARDENED:
        raise Bip32Error(f"a child index is 0 to 2^32-1, not {index}")
    data = (b"\x00" + parent.key.to_bytes(32, "big") if index >= HARDENED
            else public_key(parent)) + index.to_bytes(4, "big")
    tweak, chain_code = _split(hmac.digest(parent.chain_code, data, "sha512"))
    key = (tweak + parent.key) % CURVE_ORDER
    if key == 0:
        raise Bip32Error("the derivation gives no valid key (k = 0)")
    return PrivateNode(key, chain_code)


def fingerprint(parent: PrivateNode) -> bytes:
    """The first 4 bytes of the key identifier, HASH160 of the public key."""
    return hashlib.new("ripemd160", hashlib.sha256(public_key(parent)).digest()).digest()[:4]


def user_key(seed: bytes | bytearray, element: int) -> PrivateNode:
    """A user's node ``m/<element>'`` (the element: 0 to 2^31-1, the hardened index)."""
    if not 0 <= element < HARDENED:
        raise Bip32Error(f"a derivation element is 0 to 2^31-1, not {element}")
    return child(master(seed), HARDENED + element)
