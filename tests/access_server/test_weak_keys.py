"""Weak device public keys: shared primes, the ROCA fingerprint, bad parameters."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from access_server import weak_keys as wk

# ROCA test keys published with the paper's detection tool: crocs-muni/roca,
# roca/tests/data (listed positive or negative in roca/tests/test_fingerprint.py)
# and fingerprint/tests/data/mod01.txt.
ROCA_PUBKEY03_PEM = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEBqcWmh9uPsqMPgt/43aFU
wpHvJ7BLJeGFuKsgxMal9gSFn+We3lSgr3wOcoiACtcZO7cxpb8eEXDXocZpMNQe
o+sh3t97ivXUKpHDT3IEW5bv1XyxgjAd3MJpZ+VQjpq4iZhtV+g33+cPmfw3xJj0
PBfDubBkz3BEQ9egM+A6ghaXqr8w+ynufTOzdnllqJBY47OXVL06HAB9KKI7DPp5
+dcRrG5MS093sGNLHs1oWRrwPH1TtipfLZEWPU70+PJoMa5GHthexfeIxRI//BLI
dCD9z+odG0pSw1IYJPs5mDSHObYqmG2OdrIom8Lri8BtE4FHhRuDoHGD0hBVn5Bj
IQIDAQAB
-----END PUBLIC KEY-----
"""
ROCA_MOD01 = int(
    "944e13208a280c37efc31c3114485e590192adbb8e11c87cad60cdef0037ce99"
    "278330d3f471a2538fa667802ed2a3c44a8b7dea826e888d0aa341fd664f7fa7",
    16,
)
# Negative samples from the same place (pubkey01.pem, mod04.txt).
CLEAN_PUBKEY01_PEM = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAuifwOO3sz3yHUO4Kg67/
ovYtMvzj6X8lf25wimtdIjoAkq/hxe44vaNkNxsCtTi+oVmw0ZGUwxpU4P5q64Ll
A6gxwF5cYj7L7G3FXjm0ICduZkp/jicOGU/I5kYjnyjjPgt9aozfVVfC3bqJ3WYN
Xw4oxb11HemqvRvQcC+4PY13JMsvkz/sXUFFSjcILQuGONNuAoTtlfJ81SsmlSpQ
lHfsefYk/SDoZQSagP0b5dAU6QikK0CjuP//Y7+ihtzZBKisWjia84H2U35U7cjb
KYw2AzLlytjUr0fB/7aeuk4eRmqMVQwCYDtvUpdQlJtM3YrbRw0wUvMEtxXgc0CG
VQIDAQAB
-----END PUBLIC KEY-----
"""
CLEAN_MOD04 = int(
    "af659676197f1db06da7ac111a0a0ec175b8b7ef07192ffcd1f6b854c327785f"
    "1a7fd3db7da45cd4a31b2b2e5ce0d823a68e28c8adf1747316becce1fe576806"
    "4039ad2062260c8d1a34e0586dce9bc13090fcc9fb8b8b2c08ed3ae8d61b2981"
    "8a669689a7d9c1dab053b557fb8d3f9c44faad3e18c55e739b00d3c9126558bc"
    "8e980cd2af377126ef5b1374136774b8bd370e3c1c149db395c8f99696b628b1"
    "05946fea20106fe24d103ac062661a9248e8c3f628e00b308d33953aabe55513"
    "2e218e74ef4b578716b4fe7cf340e8e604a319bf6e9951e1942601d34291032d"
    "b54999d09e5d036dde3544ad35256bbb97d5e3fffd38166c21eae9199548853b",
    16,
)


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _primes(key: rsa.RSAPrivateKey) -> tuple[int, int]:
    numbers = key.private_numbers()
    return numbers.p, numbers.q


@pytest.fixture(scope="module")
def primes() -> list[int]:
    """Ten distinct primes from five RSA keys (1024-bit keys: batch GCD ignores size)."""
    out: list[int] = []
    for _ in range(5):
        out.extend(_primes(rsa.generate_private_key(public_exponent=65537, key_size=1024)))  # noqa: S505
    return out


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- batch GCD -----------------------------------------------------------


def test_batch_finds_the_two_keys_sharing_a_prime(primes: list[int]) -> None:
    p, q, r, a, b, c, d = primes[:7]
    moduli = [p * q, a * b, p * r, c * d]
    res = wk.batch_gcd(moduli)
    assert [x.shared for x in res] == [True, False, True, False]
    assert res[0].divisor == p and res[2].divisor == p
    assert res[0].partners == (2,) and res[2].partners == (0,)
    assert res[1] == wk.SharedFactor(1, 1)


def test_batch_unrelated_keys_are_not_flagged(primes: list[int]) -> None:
    moduli = [primes[i] * primes[i + 1] for i in range(0, 8, 2)]
    assert not any(x.shared for x in wk.batch_gcd(moduli))
    assert wk.batch_gcd(moduli[:1]) == [wk.SharedFactor(0, 1)]
    assert wk.batch_gcd([]) == []


def test_batch_both_primes_shared_and_duplicates(primes: list[int]) -> None:
    p, q, r, a, b = primes[:5]
    res = wk.batch_gcd([p * q, q * r, r * p, a * b, a * b])
    assert [x.divisor for x in res] == [p * q, q * r, r * p, a * b, a * b]
    assert [x.partners for x in res] == [(1, 2), (0, 2), (0, 1), (4,), (3,)]


def test_batch_refuses_non_moduli() -> None:
    with pytest.raises(ValueError, match="modulus 1"):
        wk.batch_gcd([15, 1])


def test_incremental_against_the_stock(primes: list[int]) -> None:
    p, q, r, a, b, c, d, e = primes[:8]
    stock = [a * b, p * q, c * d]
    f, g = primes[8:]
    new = [f * g, p * r]
    res = wk.check_against_stock(new, stock)
    assert not res[0].shared
    assert res[1].divisor == p and res[1].stock_partners == (1,) and res[1].partners == ()

    # The stock's product, kept between packs, extended pack by pack.
    product = wk.stock_product(stock[2:], wk.stock_product(stock[:2]))
    assert product == a * b * p * q * c * d
    res = wk.check_against_stock(new, product=product)
    assert [x.divisor for x in res] == [1, p] and res[1].stock_partners == ()

    # Within the new pack as well as against the stock.
    res = wk.check_against_stock([e * r, e * f], [a * b])
    assert [x.divisor for x in res] == [e, e] and res[0].partners == (1,)
    assert wk.check_against_stock([], stock) == []


# --- ROCA ----------------------------------------------------------------


def test_roca_published_keys() -> None:
    key = serialization.load_pem_public_key(ROCA_PUBKEY03_PEM)
    assert isinstance(key, rsa.RSAPublicKey)
    assert wk.has_roca_fingerprint(key.public_numbers().n)
    assert wk.has_roca_fingerprint(ROCA_MOD01)
    clean = serialization.load_pem_public_key(CLEAN_PUBKEY01_PEM)
    assert isinstance(clean, rsa.RSAPublicKey)
    assert not wk.has_roca_fingerprint(clean.public_numbers().n)
    assert not wk.has_roca_fingerprint(CLEAN_MOD04)
    reasons = [f.reason for f in wk.check_public_key(_spki(key))]
    assert wk.Reason.ROCA_FINGERPRINT in reasons


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(20):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _roca_prime(rng: random.Random, m: int, bits: int) -> int:
    """A prime k*M + (65537^a mod M), the structure of Nemec et al. 2017."""
    while True:
        k = rng.getrandbits(bits - m.bit_length()) | (1 << (bits - m.bit_length() - 1))
        cand = k * m + pow(65537, rng.getrandbits(64), m)
        if cand.bit_length() == bits and _is_probable_prime(cand, rng):
            return cand


def test_roca_constructed_key_is_flagged_and_random_keys_are_not(
    rsa2048: rsa.RSAPrivateKey, primes: list[int]
) -> None:
    # For 2048-bit keys M is the product of the first 126 primes (Nemec et al. 2017).
    small = [p for p in range(2, 800) if all(p % d for d in range(2, int(p**0.5) + 1))][:126]
    m = 1
    for p in small:
        m *= p
    rng = random.Random(2017)
    n = _roca_prime(rng, m, 1024) * _roca_prime(rng, m, 1024)
    assert n.bit_length() in (2047, 2048)
    assert wk.has_roca_fingerprint(n)
    assert not wk.has_roca_fingerprint(rsa2048.public_key().public_numbers().n)
    for i in range(0, 8, 2):
        assert not wk.has_roca_fingerprint(primes[i] * primes[i + 1])


# --- one public key --------------------------------------------------------


def test_good_keys_pass(rsa2048: rsa.RSAPrivateKey) -> None:
    assert wk.check_public_key(_spki(rsa2048.public_key())) == []
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert wk.check_public_key(_spki(p256)) == []


def test_exponent_3_and_wrong_size_refused(rsa2048: rsa.RSAPrivateKey, primes: list[int]) -> None:
    n = rsa2048.public_key().public_numbers().n
    e3 = rsa.RSAPublicNumbers(3, n).public_key()
    found = wk.check_public_key(_spki(e3))
    assert [f.reason for f in found] == [wk.Reason.RSA_EXPONENT]
    assert "3" in found[0].message
    small = rsa.RSAPublicNumbers(65537, primes[0] * primes[1]).public_key()
    assert [f.reason for f in wk.check_public_key(_spki(small))] == [wk.Reason.RSA_MODULUS_SIZE]
    assert wk.check_public_key(_spki(small), rsa_bits=small.key_size) == []


def test_off_curve_point_refused() -> None:
    der = bytearray(_spki(ec.generate_private_key(ec.SECP256R1()).public_key()))
    der[-1] ^= 0x01  # the last byte of y: the point leaves the curve
    found = wk.check_public_key(bytes(der))
    assert [f.reason for f in found] == [wk.Reason.EC_POINT_NOT_ON_CURVE]


def test_other_curves_and_key_types_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert [f.reason for f in wk.check_public_key(_spki(p384))] == [wk.Reason.EC_CURVE_UNSUPPORTED]
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    assert [f.reason for f in wk.check_public_key(_spki(ed))] == [wk.Reason.KEY_TYPE_UNSUPPORTED]


@pytest.mark.parametrize(
    "der",
    [b"", b"garbage", b"\x30\x03abc", b"\x30\x82\xff\xff", None, "30 00"],
)
def test_malformed_der_is_a_clear_value_error(der: object) -> None:
    with pytest.raises(ValueError, match="DER"):
        wk.check_public_key(der)  # type: ignore[arg-type]


def test_truncated_rsa_spki_is_a_clear_value_error(rsa2048: rsa.RSAPrivateKey) -> None:
    der = _spki(rsa2048.public_key())
    with pytest.raises(ValueError, match="not a DER SubjectPublicKeyInfo"):
        wk.check_public_key(der[:-10])


def test_python_int_fallback_gives_the_same_answers(
    primes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    p, q, r, a, b, c, d, e = primes[:8]
    expected = wk.batch_gcd([p * q, a * b, p * r])
    stock = wk.check_against_stock([c * d, q * e], [a * b, q * r])
    monkeypatch.setattr(wk, "_mpz", int)
    monkeypatch.setattr(wk, "_gcd", math.gcd)
    assert wk.batch_gcd([p * q, a * b, p * r]) == expected
    assert wk.check_against_stock([c * d, q * e], [a * b, q * r]) == stock
    assert stock[1].divisor == q and stock[1].stock_partners == (1,)
