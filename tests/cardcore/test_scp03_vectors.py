"""SCP03 against published exchanges.

Sources:
* osmocom pySim, tests/unittests/test_globalplatform.py (SCP03_Test_AES*):
  real eUICC SCP03 sessions (key sets 30/31/32 of a test card, ISD-R AID
  A0000005591010FFFFFFFF8900000100) at security levels 03, 11 and 33 with
  AES-128/192/256, and the KCVs of that card's AES-128 keys.
* GlobalPlatformPro, library/src/test/java/pro/javacard/gp/test/TestPlaintextKeys.java
  (testSessionKeys_SCP03): session keys from 40..4F with context 00..09,
  checked by their KCVs.
* GlobalPlatform Card Specification v2.3 Amendment D, §6.2.1-6.2.2: derivation
  constants and the layout of the KDF input.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cardcore.kcv import kcv_aes
from cardcore.scp03 import (
    DERIVE_CARD_CHALLENGE,
    DERIVE_CARD_CRYPTOGRAM,
    DERIVE_HOST_CRYPTOGRAM,
    DERIVE_S_ENC,
    DERIVE_S_MAC,
    DERIVE_S_RMAC,
    CardChannel,
    CryptogramError,
    InitializeUpdateResponse,
    MacError,
    cmac_prf,
    derive_session_keys,
    kdf,
    kdf_input,
    kdf_prf_inputs,
    open_host_channel,
    pseudo_random_card_challenge,
)

h = bytes.fromhex

# pySim test card key sets (KVN 30, 31, 32): ENC, MAC, DEK.
KEYS = {
    16: (h("000102030405060708090a0b0c0d0e0f"), h("101112131415161718191a1b1c1d1e1f"),
         h("202122232425262728292a2b2c2d2e2f")),
    24: (h("000102030405060708090a0b0c0d0e0f0001020304050607"),
         h("101112131415161718191a1b1c1d1e1f1011121314151617"),
         h("202122232425262728292a2b2c2d2e2f2021222324252627")),
    32: (h("000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f"),
         h("101112131415161718191a1b1c1d1e1f101112131415161718191a1b1c1d1e1f"),
         h("202122232425262728292a2b2c2d2e2f202122232425262728292a2b2c2d2e2f")),
}
ISD_R = h("A0000005591010FFFFFFFF8900000100")

GET_EID = h("80E2910006BF3E035C015A00")
GET_EID_PLAIN_RESPONSE = h("bf3e125a1089882119900000000000000000000005")
CASES = (h("80F22002"), h("80ca006600"), h("80F220020a4f0212345c054f9f70c5"),
         h("80f28002024f0000"))


@dataclass(frozen=True)
class Exchange:
    name: str
    key_length: int
    init_update_cmd: str
    init_update_rsp: str
    ext_auth: str
    get_eid: str
    get_eid_rsp: str
    cases: tuple[str, str, str, str]


EXCHANGES = [
    Exchange("AES128-11", 16, "8050300008b13e5f938fc108c400",
             "000000000000000000003003703eb51047495b249f66c484c1d2ef1948000002",
             "84821100107d5f5826a993ebc89eea24957fa0b3ce",
             "84e291000ebf3e035c015a558d036518a2829700",
             "bf3e125a1089882119900000000000000000000005971be68992dbbdfa",
             ("84f220020863a63f8959827fb2", "84ca006608a0c6a4a74166f7ce00",
              "84f22002124f0212345c054f9f70c52249b50272656536",
              "84f280020a4f00e91443f6dce6b8ed00")),
    Exchange("AES128-03", 16, "80503000088e1552d0513c60f300",
             "0000000000000000000030037030760cd2c47c1dd395065fe5ead8a9d7000001",
             "8482030010fd4721a14d9b07003c451d2f8ae6bb21",
             "84e2910018ca9c00f6713d79bc8baa642bdff51c3f6a4082d3bd9ad26c00",
             "bf3e125a1089882119900000000000000000000005",
             ("84f2200208c9811b11f1264cf1", "84ca006608e10ab60b3054798800",
              "84f22002184e2908bdb48b2315a55482e9e936ca122d6ecfae7d17416e",
              "84f28002180dd10a6b6193e5340b9e77d32d5a179cd710ac2773aefb2800")),
    Exchange("AES128-33", 16, "8050300008fdf38259a1e0de4400",
             "000000000000000000003003703b1aca81e821f219081cdc01c26b372d000003",
             "84823300108c36f96bcc00724a4e13ad591d7da3f0",
             "84e2910018267a85dfe4a98fca6fb0527e0dfecce4914e40401433c87f00",
             "f3ba2b1013aa6224f5e1c138d71805c569e5439b47576260b75fc021b25097cb2e68f8a0144975b9",
             ("84f2200208ac6a59024bed84cc", "84ca006608409912ad8fb7aed000",
              "84f22002185f3dafc3ac14c381536a488bf44e06d056df9d74dbd21e5a",
              "84f280021865165105be3373347d0424d4400af2ac393f569ec779389e00")),
    Exchange("AES192-11", 24, "80503100087396430b768b085b00",
             "000000000000000000003103708cfc23522ffdbf1e5df5542cac8fd866000003",
             "84821100102145ed30b146f5db252fb7e624cec244",
             "84e291000ebf3e035c015aff42cf801d14394400",
             "bf3e125a1089882119900000000000000000000005162fbd33e04940a9",
             ("84f22002084584e4f6784811ee", "84ca006608937776ebe190fa3000",
              "84f22002124f0212345c054f9f70c59a52bddf3040368c",
              "84f280020a4f009804b11411f7393d00")),
    Exchange("AES192-03", 24, "805031000869c65da8202bf19f00",
             "00000000000000000000310370b570a67be38446717729d6dd3d2ec5b1000001",
             "848203001065df4f1a356a887905466516d9e5b7c1",
             "84e2910018d2c6fb477c5d4afe4fd4d21f17eff10d3578ec1774a12a2d00",
             "bf3e125a1089882119900000000000000000000005",
             ("84f2200208964e188f0b1bb697", "84ca006608f0820035a41d3e1800",
              "84f220021806b076ed452cd1fa84f77f5c08a146aa77a9286757dea791",
              "84f2800218d06527e39222dce091fabdb8e9b898417a67a6852d3577db00")),
    Exchange("AES192-33", 24, "80503100089b3f2eef0e8c937400",
             "00000000000000000000310370f6bb305a15bae1a68f79fb08212fbed7000002",
             "84823300109100bc22d58b45b86a26365ce39ff3cf",
             "84e29100188f7f946c84f70d17994bc6e8791251bb1bb1bf02cf8de58900",
             "c05176c1b6f72aae50c32cbee63b0e95998928fd4dfb2be9f27ffde8c8476f5909b4805cc4039599",
             ("84f2200208d5d97754b6b3d2ba", "84ca006608516c82b8e30adbeb00",
              "84f2200218cc247f4761e6944277a4e0d6e32e44025b1e31537e2fc668",
              "84f2800218ba22b63d509bef5d093b43e5eaed03ed23144ab2d9cb51de00")),
    Exchange("AES256-11", 32, "805032000811666d57866c6f5400",
             "0000000000000000000032037053ea8847efa7674e41498a4d66cf0dee000003",
             "84821100102f2ad190eff2fafc4908996d1cebd310",
             "84e291000ebf3e035c015af4b680372542b59d00",
             "bf3e125a10898821199000000000000000000000058012dd7f01f1c4c1",
             ("84f2200208d618b7da68d5fe52", "84ca0066088f3e055db23ad5e500",
              "84f22002124f0212345c054f9f70c5b6e15cc42404915e",
              "84f280020a4f00aa124aa74afe7f7500")),
    Exchange("AES256-03", 32, "8050320008c6066990fc426e1d00",
             "000000000000000000003203708682cd81bbd8919f2de3f2664581f118000001",
             "848203001077c493b632edadaf865a1e64acc07ce9",
             "84e29100183ddaa60594963befaada3525b492ede23c2ab2c1ce3afe4400",
             "bf3e125a1089882119900000000000000000000005",
             ("84f2200208480ddc8e419da38d", "84ca0066083e9d6a6c0b2d732000",
              "84f22002183ebfef2da8b04af2a85f491f299b76973df76ff08a4031be",
              "84f2800218783fff80990f5585b1055010ea95094a26e4a8f1ef4b18e100")),
    Exchange("AES256-33", 32, "805032000897b2055fe58599fd00",
             "00000000000000000000320370a8439a22cedf045fa9f1903b2834f26e000002",
             "8482330010508a0fd959d2e547c6b33154a6be2057",
             "84e29100187a5ef717eaf1e135ae92fe54429d0e465decda65f5fe5aea00",
             "ea90dbfa648a67c5eb6abc57f8530b97d0cd5647c5e8732016b55203b078dd2ace7f8bc5d1c1cd99",
             ("84f2200208bcc5c17275545d93", "84ca00660804806aba9d543bb600",
              "84f2200218717222491556ec81a45f49ce48be33320024801a1c4cb0e0",
              "84f2800218561f105bccd3a1642904b251ccc1228beb80a82370a8637000")),
]


def _open(ex: Exchange):
    enc, mac, _ = KEYS[ex.key_length]
    host_challenge = h(ex.init_update_cmd)[5:-1]
    level = h(ex.ext_auth)[2]
    return open_host_channel(cmac_prf(enc), cmac_prf(mac), host_challenge, h(ex.init_update_rsp),
                             key_length=ex.key_length, security_level=level, aid=ISD_R)


@pytest.mark.parametrize("ex", EXCHANGES, ids=lambda e: e.name)
def test_host_side_reproduces_the_exchange(ex: Exchange) -> None:
    channel, ext_auth = _open(ex)
    assert ext_auth == h(ex.ext_auth)
    assert channel.wrap(GET_EID) == h(ex.get_eid)
    data, sw = channel.unwrap(h(ex.get_eid_rsp) + b"\x90\x00")
    assert (data, sw) == (GET_EID_PLAIN_RESPONSE, 0x9000)
    # MAC chaining and the encryption counter run on across commands, including
    # the ones without data (cases 1 and 2) before an encrypted one (case 3).
    for plain, wrapped in zip(CASES, ex.cases, strict=True):
        assert channel.wrap(plain) == h(wrapped)


@pytest.mark.parametrize("ex", EXCHANGES, ids=lambda e: e.name)
def test_card_side_accepts_the_host_commands(ex: Exchange) -> None:
    enc, mac, _ = KEYS[ex.key_length]
    iu = InitializeUpdateResponse.parse(h(ex.init_update_rsp))
    host_challenge = h(ex.init_update_cmd)[5:-1]
    card, cryptogram = CardChannel.begin(enc, mac, host_challenge, iu.card_challenge)
    assert cryptogram == iu.card_cryptogram
    from cardcore.apdu import parse_command

    card.external_authenticate(parse_command(h(ex.ext_auth)))
    plain = card.unwrap_command(parse_command(h(ex.get_eid)))
    assert plain.data == GET_EID[5:-1]
    # The card protects its response exactly as the real card did.
    assert card.wrap_response(GET_EID_PLAIN_RESPONSE, 0x9000) == h(ex.get_eid_rsp) + b"\x90\x00"
    for plain_cmd, wrapped in zip(CASES, ex.cases, strict=True):
        assert card.unwrap_command(parse_command(h(wrapped))).encode() == parse_command(
            plain_cmd).encode()


@pytest.mark.parametrize("ex", EXCHANGES, ids=lambda e: e.name)
def test_pseudo_random_card_challenge_comes_from_the_counter(ex: Exchange) -> None:
    enc = KEYS[ex.key_length][0]
    iu = InitializeUpdateResponse.parse(h(ex.init_update_rsp))
    assert iu.i == 0x70 and iu.sequence_counter is not None
    assert pseudo_random_card_challenge(cmac_prf(enc), iu.sequence_counter, ISD_R) == \
        iu.card_challenge
    assert pseudo_random_card_challenge(cmac_prf(enc), iu.sequence_counter,
                                        h("A000000151000000")) != iu.card_challenge


def test_wrong_keys_fail_the_card_cryptogram() -> None:
    ex = EXCHANGES[0]
    other = bytes(16)
    with pytest.raises(CryptogramError):
        open_host_channel(cmac_prf(other), cmac_prf(other), h(ex.init_update_cmd)[5:-1],
                          h(ex.init_update_rsp), key_length=16, security_level=0x11)


def test_altered_response_fails_the_r_mac() -> None:
    ex = EXCHANGES[0]  # level 11: R-MAC
    channel, _ = _open(ex)
    channel.wrap(GET_EID)
    bad = bytearray(h(ex.get_eid_rsp))
    bad[3] ^= 1
    with pytest.raises(MacError):
        channel.unwrap(bytes(bad) + b"\x90\x00")


def test_session_keys_gpp_vector() -> None:
    # GlobalPlatformPro TestPlaintextKeys.testSessionKeys_SCP03.
    key = bytes(range(0x40, 0x50))
    kdd = bytes(range(10))
    prf = cmac_prf(key)
    assert kcv_aes(kdf(prf, DERIVE_S_ENC, kdd, 128)) == h("C25559")
    assert kcv_aes(kdf(prf, DERIVE_S_MAC, kdd, 128)) == h("0E12CC")
    assert kcv_aes(kdf(prf, DERIVE_S_RMAC, kdd, 128)) == h("9ACB9C")
    assert kcv_aes(key) == h("504A77")  # the static DEK


def test_amendment_d_constants_and_kdf_layout() -> None:
    assert (DERIVE_CARD_CRYPTOGRAM, DERIVE_HOST_CRYPTOGRAM, DERIVE_CARD_CHALLENGE,
            DERIVE_S_ENC, DERIVE_S_MAC, DERIVE_S_RMAC) == (0x00, 0x01, 0x02, 0x04, 0x06, 0x07)
    data = kdf_input(0x04, b"\xAA" * 16, 256, 2)
    # 11-byte zero label prefix, constant, separation indicator, L in bits, counter, context.
    assert data == bytes(11) + b"\x04" + b"\x00" + b"\x01\x00" + b"\x02" + b"\xAA" * 16
    assert len(kdf_prf_inputs(0x04, b"", 128)) == 1
    assert len(kdf_prf_inputs(0x04, b"", 192)) == 2
    assert len(kdf_prf_inputs(0x04, b"", 256)) == 2


def test_session_keys_only_touch_static_keys_through_prfs() -> None:
    """The host flow works with opaque PRFs (an HSM): count and record the calls."""
    enc, mac, _ = KEYS[32]
    calls: list[tuple[str, bytes]] = []

    def recording(name: str, key: bytes):
        inner = cmac_prf(key)

        def prf(data: bytes) -> bytes:
            calls.append((name, data))
            return inner(data)
        return prf

    keys = derive_session_keys(recording("enc", enc), recording("mac", mac),
                               b"\x01" * 8, b"\x02" * 8, 32)
    assert len(keys.s_enc) == len(keys.s_mac) == len(keys.s_rmac) == 32
    # 256-bit keys need two PRF blocks each: S-ENC (2, enc), S-MAC + S-RMAC (4, mac).
    assert [n for n, _ in calls].count("enc") == 2
    assert [n for n, _ in calls].count("mac") == 4
    assert keys.s_enc.hex() not in repr(keys)
