"""hsm_proxy.bip32 against the test vectors of BIP-0032.

Vectors 1 to 5 are those of https://github.com/bitcoin/bips/blob/master/bip-0032.mediawiki
(section "Test Vectors"). The module writes no extended keys, so each ext prv
of vectors 1-4 is decoded here (Base58Check) and its depth, parent
fingerprint, child number, chain code and key compared with the node derived
from the seed along the chain, and the ext pub's key with the compressed
public key. Vector 5 lists invalid extended keys: of its cases, the two that
are about private derivation ("private key 0 not in 1..n-1", "private key n
not in 1..n-1") are checked against ``bip32.node``; the others concern the
serialized format only (version bytes, key prefixes, depth, fingerprint and
index consistency, public key points, checksum), which the proxy never parses.
"""

# ruff: noqa: E501  (the vectors' extended keys, one per line as BIP-0032 lists them)
from __future__ import annotations

import hashlib
from typing import NamedTuple

import pytest

from hsm_proxy import bip32

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class Decoded(NamedTuple):
    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    key: bytes          # 33 bytes: 00 || k for an ext prv, the compressed point for an ext pub


def decode(text: str) -> Decoded:
    value = 0
    for char in text:
        value = value * 58 + _ALPHABET.index(char)
    raw = value.to_bytes(82, "big")
    body, checksum = raw[:78], raw[78:]
    assert hashlib.sha256(hashlib.sha256(body).digest()).digest()[:4] == checksum
    return Decoded(body[4], body[5:9], int.from_bytes(body[9:13], "big"), body[13:45],
                   body[45:78])


H = bip32.HARDENED
# (seed, [(path, ext pub, ext prv)]) from BIP-0032's test vectors 1 to 4.
VECTORS = {
    1: ("000102030405060708090a0b0c0d0e0f", [
        ((), "xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8",
         "xprv9s21ZrQH143K3QTDL4LXw2F7HEK3wJUD2nW2nRk4stbPy6cq3jPPqjiChkVvvNKmPGJxWUtg6LnF5kejMRNNU3TGtRBeJgk33yuGBxrMPHi"),
        ((H,), "xpub68Gmy5EdvgibQVfPdqkBBCHxA5htiqg55crXYuXoQRKfDBFA1WEjWgP6LHhwBZeNK1VTsfTFUHCdrfp1bgwQ9xv5ski8PX9rL2dZXvgGDnw",
         "xprv9uHRZZhk6KAJC1avXpDAp4MDc3sQKNxDiPvvkX8Br5ngLNv1TxvUxt4cV1rGL5hj6KCesnDYUhd7oWgT11eZG7XnxHrnYeSvkzY7d2bhkJ7"),
        ((H, 1), "xpub6ASuArnXKPbfEwhqN6e3mwBcDTgzisQN1wXN9BJcM47sSikHjJf3UFHKkNAWbWMiGj7Wf5uMash7SyYq527Hqck2AxYysAA7xmALppuCkwQ",
         "xprv9wTYmMFdV23N2TdNG573QoEsfRrWKQgWeibmLntzniatZvR9BmLnvSxqu53Kw1UmYPxLgboyZQaXwTCg8MSY3H2EU4pWcQDnRnrVA1xe8fs"),
        ((H, 1, H + 2), "xpub6D4BDPcP2GT577Vvch3R8wDkScZWzQzMMUm3PWbmWvVJrZwQY4VUNgqFJPMM3No2dFDFGTsxxpG5uJh7n7epu4trkrX7x7DogT5Uv6fcLW5",
         "xprv9z4pot5VBttmtdRTWfWQmoH1taj2axGVzFqSb8C9xaxKymcFzXBDptWmT7FwuEzG3ryjH4ktypQSAewRiNMjANTtpgP4mLTj34bhnZX7UiM"),
        ((H, 1, H + 2, 2), "xpub6FHa3pjLCk84BayeJxFW2SP4XRrFd1JYnxeLeU8EqN3vDfZmbqBqaGJAyiLjTAwm6ZLRQUMv1ZACTj37sR62cfN7fe5JnJ7dh8zL4fiyLHV",
         "xprvA2JDeKCSNNZky6uBCviVfJSKyQ1mDYahRjijr5idH2WwLsEd4Hsb2Tyh8RfQMuPh7f7RtyzTtdrbdqqsunu5Mm3wDvUAKRHSC34sJ7in334"),
        ((H, 1, H + 2, 2, 1000000000), "xpub6H1LXWLaKsWFhvm6RVpEL9P4KfRZSW7abD2ttkWP3SSQvnyA8FSVqNTEcYFgJS2UaFcxupHiYkro49S8yGasTvXEYBVPamhGW6cFJodrTHy",
         "xprvA41z7zogVVwxVSgdKUHDy1SKmdb533PjDz7J6N6mV6uS3ze1ai8FHa8kmHScGpWmj4WggLyQjgPie1rFSruoUihUZREPSL39UNdE3BBDu76"),
    ]),
    2: ("fffcf9f6f3f0edeae7e4e1dedbd8d5d2cfccc9c6c3c0bdbab7b4b1aeaba8a5a29f9c999693908d8a8784817e7b7875726f6c696663605d5a5754514e4b484542", [
        ((), "xpub661MyMwAqRbcFW31YEwpkMuc5THy2PSt5bDMsktWQcFF8syAmRUapSCGu8ED9W6oDMSgv6Zz8idoc4a6mr8BDzTJY47LJhkJ8UB7WEGuduB",
         "xprv9s21ZrQH143K31xYSDQpPDxsXRTUcvj2iNHm5NUtrGiGG5e2DtALGdso3pGz6ssrdK4PFmM8NSpSBHNqPqm55Qn3LqFtT2emdEXVYsCzC2U"),
        ((0,), "xpub69H7F5d8KSRgmmdJg2KhpAK8SR3DjMwAdkxj3ZuxV27CprR9LgpeyGmXUbC6wb7ERfvrnKZjXoUmmDznezpbZb7ap6r1D3tgFxHmwMkQTPH",
         "xprv9vHkqa6EV4sPZHYqZznhT2NPtPCjKuDKGY38FBWLvgaDx45zo9WQRUT3dKYnjwih2yJD9mkrocEZXo1ex8G81dwSM1fwqWpWkeS3v86pgKt"),
        ((0, H + 2147483647), "xpub6ASAVgeehLbnwdqV6UKMHVzgqAG8Gr6riv3Fxxpj8ksbH9ebxaEyBLZ85ySDhKiLDBrQSARLq1uNRts8RuJiHjaDMBU4Zn9h8LZNnBC5y4a",
         "xprv9wSp6B7kry3Vj9m1zSnLvN3xH8RdsPP1Mh7fAaR7aRLcQMKTR2vidYEeEg2mUCTAwCd6vnxVrcjfy2kRgVsFawNzmjuHc2YmYRmagcEPdU9"),
        ((0, H + 2147483647, 1), "xpub6DF8uhdarytz3FWdA8TvFSvvAh8dP3283MY7p2V4SeE2wyWmG5mg5EwVvmdMVCQcoNJxGoWaU9DCWh89LojfZ537wTfunKau47EL2dhHKon",
         "xprv9zFnWC6h2cLgpmSA46vutJzBcfJ8yaJGg8cX1e5StJh45BBciYTRXSd25UEPVuesF9yog62tGAQtHjXajPPdbRCHuWS6T8XA2ECKADdw4Ef"),
        ((0, H + 2147483647, 1, H + 2147483646), "xpub6ERApfZwUNrhLCkDtcHTcxd75RbzS1ed54G1LkBUHQVHQKqhMkhgbmJbZRkrgZw4koxb5JaHWkY4ALHY2grBGRjaDMzQLcgJvLJuZZvRcEL",
         "xprvA1RpRA33e1JQ7ifknakTFpgNXPmW2YvmhqLQYMmrj4xJXXWYpDPS3xz7iAxn8L39njGVyuoseXzU6rcxFLJ8HFsTjSyQbLYnMpCqE2VbFWc"),
        ((0, H + 2147483647, 1, H + 2147483646, 2), "xpub6FnCn6nSzZAw5Tw7cgR9bi15UV96gLZhjDstkXXxvCLsUXBGXPdSnLFbdpq8p9HmGsApME5hQTZ3emM2rnY5agb9rXpVGyy3bdW6EEgAtqt",
         "xprvA2nrNbFZABcdryreWet9Ea4LvTJcGsqrMzxHx98MMrotbir7yrKCEXw7nadnHM8Dq38EGfSh6dqA9QWTyefMLEcBYJUuekgW4BYPJcr9E7j"),
    ]),
    # Vector 3: retention of leading zeros (bitpay/bitcore-lib#47, iancoleman/bip39#58).
    3: ("4b381541583be4423346c643850da4b320e46a87ae3d2a4e6da11eba819cd4acba45d239319ac14f863b8d5ab5a0d0c64d2e8a1e7d1457df2e5a3c51c73235be", [
        ((), "xpub661MyMwAqRbcEZVB4dScxMAdx6d4nFc9nvyvH3v4gJL378CSRZiYmhRoP7mBy6gSPSCYk6SzXPTf3ND1cZAceL7SfJ1Z3GC8vBgp2epUt13",
         "xprv9s21ZrQH143K25QhxbucbDDuQ4naNntJRi4KUfWT7xo4EKsHt2QJDu7KXp1A3u7Bi1j8ph3EGsZ9Xvz9dGuVrtHHs7pXeTzjuxBrCmmhgC6"),
        ((H,), "xpub68NZiKmJWnxxS6aaHmn81bvJeTESw724CRDs6HbuccFQN9Ku14VQrADWgqbhhTHBaohPX4CjNLf9fq9MYo6oDaPPLPxSb7gwQN3ih19Zm4Y",
         "xprv9uPDJpEQgRQfDcW7BkF7eTya6RPxXeJCqCJGHuCJ4GiRVLzkTXBAJMu2qaMWPrS7AANYqdq6vcBcBUdJCVVFceUvJFjaPdGZ2y9WACViL4L"),
    ]),
    # Vector 4: retention of leading zeros (btcsuite/btcutil#172).
    4: ("3ddd5602285899a946114506157c7997e5444528f3003f6134712147db19b678", [
        ((), "xpub661MyMwAqRbcGczjuMoRm6dXaLDEhW1u34gKenbeYqAix21mdUKJyuyu5F1rzYGVxyL6tmgBUAEPrEz92mBXjByMRiJdba9wpnN37RLLAXa",
         "xprv9s21ZrQH143K48vGoLGRPxgo2JNkJ3J3fqkirQC2zVdk5Dgd5w14S7fRDyHH4dWNHUgkvsvNDCkvAwcSHNAQwhwgNMgZhLtQC63zxwhQmRv"),
        ((H,), "xpub69AUMk3qDBi3uW1sXgjCmVjJ2G6WQoYSnNHyzkmdCHEhSZ4tBok37xfFEqHd2AddP56Tqp4o56AePAgCjYdvpW2PU2jbUPFKsav5ut6Ch1m",
         "xprv9vB7xEWwNp9kh1wQRfCCQMnZUEG21LpbR9NPCNN1dwhiZkjjeGRnaALmPXCX7SgjFTiCTT6bXes17boXtjq3xLpcDjzEuGLQBM5ohqkao9G"),
        ((H, H + 1), "xpub6BJA1jSqiukeaesWfxe6sNK9CCGaujFFSJLomWHprUL9DePQ4JDkM5d88n49sMGJxrhpjazuXYWdMf17C9T5XnxkopaeS7jGk1GyyVziaMt",
         "xprv9xJocDuwtYCMNAo3Zw76WENQeAS6WGXQ55RCy7tDJ8oALr4FWkuVoHJeHVAcAqiZLE7Je3vZJHxspZdFHfnBEjHqU5hG1Jaj32dVoS6XLT1"),
    ]),
}
# Vector 5, the cases about private keys: (ext prv, reason as BIP-0032 states it).
INVALID_PRIVATE = [
    ("xprv9s21ZrQH143K24Mfq5zL5MhWK9hUhhGbd45hLXo2Pq2oqzMMo63oStZzF93Y5wvzdUayhgkkFoicQZcP3y52uPPxFnfoLZB21Teqt1VvEHx",
     "private key 0 not in 1..n-1"),
    ("xprv9s21ZrQH143K24Mfq5zL5MhWK9hUhhGbd45hLXo2Pq2oqzMMo63oStZzFAzHGBP2UuGCqWLTAPLcMtD5SDKr24z3aiUvKr9bJpdrcLg1y3G",
     "private key n not in 1..n-1"),
]


def _steps() -> list[tuple[int, str, tuple[int, ...], str, str]]:
    return [(number, seed, path, xpub, xprv) for number, (seed, chain) in VECTORS.items()
            for path, xpub, xprv in chain]


@pytest.mark.parametrize(("number", "seed", "path", "xpub", "xprv"), _steps())
def test_the_chains_of_vectors_1_to_4(number: int, seed: str, path: tuple[int, ...],
                                      xpub: str, xprv: str) -> None:
    parent = None
    current = bip32.master(bytes.fromhex(seed))
    for index in path:
        parent, current = current, bip32.child(current, index)
    want = decode(xprv)
    assert want.depth == len(path)
    assert want.child_number == (path[-1] if path else 0)
    assert want.parent_fingerprint == (bip32.fingerprint(parent) if parent else bytes(4))
    assert want.chain_code == current.chain_code
    assert want.key == b"\x00" + current.key.to_bytes(32, "big")
    assert decode(xpub).key == bip32.public_key(current)
    assert decode(xpub).chain_code == current.chain_code


def test_vector_4_keeps_the_leading_zero_of_its_hardened_child() -> None:
    child = bip32.child(bip32.master(bytes.fromhex(VECTORS[4][0])), H)
    assert child.key.to_bytes(32, "big")[0] == 0
    assert decode(VECTORS[4][1][1][2]).key[1] == 0


@pytest.mark.parametrize(("xprv", "reason"), INVALID_PRIVATE)
def test_vector_5_private_keys_outside_the_group_are_refused(xprv: str, reason: str) -> None:
    bad = decode(xprv)
    with pytest.raises(bip32.Bip32Error, match=r"1\.\.n-1"):
        bip32.node(bad.key[1:], bad.chain_code)


def test_a_user_key_is_the_hardened_child_of_the_master_at_the_element() -> None:
    seed = bytes.fromhex(VECTORS[1][0])
    assert bip32.user_key(seed, 0) == bip32.child(bip32.master(seed), H)
    assert bip32.user_key(seed, 0) != bip32.user_key(seed, 1)
    assert bip32.user_key(seed, 2**31 - 1) == bip32.child(bip32.master(seed), 2**32 - 1)


@pytest.mark.parametrize("element", [-1, 2**31, 2**32])
def test_an_element_outside_the_hardened_range_is_refused(element: int) -> None:
    with pytest.raises(bip32.Bip32Error, match="derivation element"):
        bip32.user_key(bytes(64), element)


@pytest.mark.parametrize("length", [0, 15, 65])
def test_a_seed_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(bip32.Bip32Error, match="16 to 64 bytes"):
        bip32.master(bytes(length))
