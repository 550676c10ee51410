"""GlobalPlatform Secure Channel Protocol '03' (Card Specification v2.3,
Amendment D), for both ends of the channel.

Two constraints shape this module:

* On the host side the card's static keys live in an HSM that can only be
  used as a PRF (AES-CMAC computed inside the HSM). Every function that needs
  a *static* key therefore takes a callable ``prf(data) -> 16-byte CMAC``
  instead of the key (see :func:`cmac_prf` for the software equivalent). The
  session keys that come out of the KDF are plain bytes and everything after
  the handshake (C-MAC, C-DECRYPTION, R-MAC, R-ENCRYPTION) is pure software.
* A host may wrap a whole APDU script before the card has answered anything.
  :class:`HostChannel` therefore exposes its moving parts (MAC chaining value
  and encryption counter) as a :class:`ChannelCheckpoint` taken after every
  wrapped command, so responses can be unwrapped against the right state and
  the channel resynchronised to wherever the card stopped.

The card side (:class:`CardChannel`) uses the same KDF and cryptogram
functions with software PRFs.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Final

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cardcore.apdu import ApduError, CommandApdu, parse_command, parse_response
from cardcore.ins import Ins
from cardcore.kcv import AES_KEY_LENGTHS
from cardcore.sw import SW

Prf = Callable[[bytes], bytes]
"""AES-CMAC under a static key: ``prf(message) -> 16 bytes``."""

BLOCK: Final = 16
ZERO_CHAIN: Final = bytes(BLOCK)

# Amendment D §6.2.1, Table 6-1: derivation constants.
DERIVE_CARD_CRYPTOGRAM: Final = 0x00
DERIVE_HOST_CRYPTOGRAM: Final = 0x01
DERIVE_CARD_CHALLENGE: Final = 0x02
DERIVE_S_ENC: Final = 0x04
DERIVE_S_MAC: Final = 0x06
DERIVE_S_RMAC: Final = 0x07

# Amendment D §5.1 (Table 5-1): the "i" implementation parameter, sent by the card
# in its INITIALIZE UPDATE answer. b5 says how the card makes its challenge (and that a
# sequence counter follows the cryptogram); b6 and b7 say which response protections it
# offers: 00 none, 01 R-MAC, 11 R-MAC and R-ENCRYPTION (10, R-ENCRYPTION alone, is RFU).
I_S16: Final = 0x01  # S16 mode (16-byte challenges, cryptograms and MACs)
I_PSEUDO_RANDOM_CHALLENGE: Final = 0x10
I_RMAC_SUPPORT: Final = 0x20
I_RENC_SUPPORT: Final = 0x40
I_DEFINED_BITS: Final = I_S16 | I_PSEUDO_RANDOM_CHALLENGE | I_RMAC_SUPPORT | I_RENC_SUPPORT

SCP_ID: Final = 0x03
"""The SCP identifier an SCP03 card puts in its INITIALIZE UPDATE answer (byte 11)."""
CLA_SECURE_MESSAGING: Final = 0x04


class Scp03Error(Exception):
    """An SCP03 protocol failure."""


class CryptogramError(Scp03Error):
    """The card (or host) cryptogram does not verify: wrong keys, or not that card."""


class CardChallengeError(CryptogramError):
    """A pseudo-random card challenge that its sequence counter and AID do not give.

    The card cryptogram verified (the card holds the keys), but the challenge is
    not the one the card's ENC key makes from its counter and the AID the host
    named: another AID (the host checked against the wrong security domain), or
    a counter altered on the way.
    """


class MacError(Scp03Error):
    """A C-MAC or R-MAC does not verify: altered, replayed or out-of-sync message."""


class SecurityLevel(IntFlag):
    """Security level of a session (P1 of EXTERNAL AUTHENTICATE)."""

    NONE = 0x00
    C_MAC = 0x01
    C_DECRYPTION = 0x02
    R_MAC = 0x10
    R_ENCRYPTION = 0x20


VALID_SECURITY_LEVELS: Final = frozenset({0x00, 0x01, 0x03, 0x11, 0x13, 0x33})


def check_security_level(level: int) -> SecurityLevel:
    """Accept only the combinations Amendment D allows (00/01/03/11/13/33)."""
    if level not in VALID_SECURITY_LEVELS:
        raise Scp03Error(f"invalid SCP03 security level 0x{level:02X}")
    return SecurityLevel(level)


def offered_security_levels(i: int) -> frozenset[int]:
    """The security levels a card whose "i" parameter is ``i`` accepts.

    Every SCP03 card does C-MAC and C-DECRYPTION (levels 00, 01 and 03); R-MAC
    (11, 13) only with b6 (``I_RMAC_SUPPORT``), R-ENCRYPTION (33) only with b7
    and b6 together. b7 without b6 is RFU in Amendment D: such a card is taken
    at its word for nothing beyond 03, so no level it never promised is asked of
    it. Whether the challenge is pseudo-random (b5) or S16 (b1) changes no level.
    """
    levels = {0x00, 0x01, 0x03}
    if i & I_RMAC_SUPPORT:
        levels |= {0x11, 0x13}
        if i & I_RENC_SUPPORT:
            levels.add(0x33)
    return frozenset(levels)


def check_i_parameter(i: int) -> int:
    """``i`` if it is an "i" value Amendment D defines; Scp03Error naming the problem if not.

    For cards this system makes (the virtual PSD): a real card's "i" is read as
    it is (``offered_security_levels``), whatever its RFU bits say.
    """
    if not 0 <= i <= 0xFF:
        raise Scp03Error(f"the SCP03 i parameter is one byte, got {i}")
    if i & ~I_DEFINED_BITS:
        raise Scp03Error(f"i=0x{i:02X} sets RFU bits (0x{i & ~I_DEFINED_BITS & 0xFF:02X}); "
                         f"defined: 01 S16, 10 pseudo-random challenge, 20 R-MAC, "
                         f"40 R-ENCRYPTION with R-MAC")
    if i & I_RENC_SUPPORT and not i & I_RMAC_SUPPORT:
        raise Scp03Error(f"i=0x{i:02X} offers R-ENCRYPTION without R-MAC, which Amendment D "
                         f"leaves RFU (use 60 or 70)")
    return i


def describe_i(i: int) -> str:
    """``'i=10 (pseudo-random challenge, no R-MAC, no R-ENCRYPTION)'``: for messages."""
    parts = ["pseudo-random challenge" if i & I_PSEUDO_RANDOM_CHALLENGE else "random challenge"]
    if i & I_RMAC_SUPPORT:
        parts.append("R-MAC")
        parts.append("R-ENCRYPTION" if i & I_RENC_SUPPORT else "no R-ENCRYPTION")
    else:
        parts += ["no R-MAC", "no R-ENCRYPTION"]
    if i & I_S16:
        parts.append("S16")
    return f"i={i:02X} ({', '.join(parts)})"


# --- primitives -------------------------------------------------------------


def _aes_cmac(key: bytes, *parts: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    for part in parts:
        c.update(part)
    return c.finalize()


def cmac_prf(key: bytes) -> Prf:
    """A software PRF over ``key``: what an HSM computes with CKM_AES_CMAC."""
    if len(key) not in AES_KEY_LENGTHS:
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")
    key = bytes(key)

    def prf(data: bytes) -> bytes:
        return _aes_cmac(key, data)

    return prf


def _aes_ecb_block(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return enc.update(block) + enc.finalize()


def _aes_cbc(key: bytes, iv: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(data) + ctx.finalize()


def pad80(data: bytes, block: int = BLOCK) -> bytes:
    """ISO/IEC 9797-1 method 2: append 0x80, then zeros to a block boundary."""
    padded = bytes(data) + b"\x80"
    return padded + bytes(-len(padded) % block)


def unpad80(data: bytes) -> bytes:
    """Remove ISO/IEC 9797-1 method 2 padding; raise :class:`Scp03Error` if absent."""
    stripped = bytes(data).rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80 or len(data) - len(stripped) >= BLOCK:
        raise Scp03Error("invalid padding")
    return stripped[:-1]


# --- KDF (NIST SP 800-108 counter mode, PRF = AES-CMAC) ----------------------


def kdf_input(constant: int, context: bytes, length_bits: int, counter: int) -> bytes:
    """One PRF input of the Amendment D §6.2.2 KDF.

    label (11 zero bytes + derivation constant) || separation indicator 00 ||
    L (2 bytes, bits) || i (1 byte) || context.
    """
    if not 0 <= constant <= 0xFF or not 1 <= counter <= 0xFF:
        raise ValueError("constant and counter are single bytes")
    return (bytes(11) + bytes((constant, 0x00)) + length_bits.to_bytes(2, "big")
            + bytes((counter,)) + bytes(context))


def kdf_prf_inputs(constant: int, context: bytes, length_bits: int) -> list[bytes]:
    """All PRF inputs needed for ``length_bits`` of output (one per 128 bits).

    Lets a host batch every CMAC of a handshake into one HSM round trip.
    """
    if length_bits <= 0 or length_bits % 8:
        raise ValueError("length must be a positive number of bytes")
    blocks = -(-length_bits // 128)
    return [kdf_input(constant, context, length_bits, i) for i in range(1, blocks + 1)]


def kdf_combine(outputs: Sequence[bytes], length_bits: int) -> bytes:
    """Concatenate PRF outputs and truncate to ``length_bits``."""
    out = b"".join(outputs)
    if len(out) * 8 < length_bits:
        raise ValueError("not enough PRF output")
    return out[:length_bits // 8]


def kdf(prf: Prf, constant: int, context: bytes, length_bits: int) -> bytes:
    """The SCP03 KDF with a PRF callable (static key in an HSM, or software)."""
    outputs = [prf(data) for data in kdf_prf_inputs(constant, context, length_bits)]
    for out in outputs:
        if len(out) != BLOCK:
            raise Scp03Error("the PRF must return a 16-byte AES-CMAC")
    return kdf_combine(outputs, length_bits)


# --- session keys and cryptograms -------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    """S-ENC, S-MAC, S-RMAC of one session. Never printed."""

    s_enc: bytes = field(repr=False)
    s_mac: bytes = field(repr=False)
    s_rmac: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for key in (self.s_enc, self.s_mac, self.s_rmac):
            if len(key) not in AES_KEY_LENGTHS:
                raise ValueError("session keys are AES keys")


def _challenge_length(s16: bool) -> int:
    return 16 if s16 else 8


def _check_challenges(host_challenge: bytes, card_challenge: bytes) -> bool:
    """Validate lengths; return whether the pair is S16."""
    if len(host_challenge) != len(card_challenge) or len(host_challenge) not in (8, 16):
        raise Scp03Error("host and card challenges must both be 8 (S8) or 16 (S16) bytes")
    return len(host_challenge) == 16


def derive_session_keys(prf_enc: Prf, prf_mac: Prf, host_challenge: bytes,
                        card_challenge: bytes, key_length: int) -> SessionKeys:
    """Amendment D §6.2.1: S-ENC from the static ENC key, S-MAC and S-RMAC from MAC.

    ``key_length`` is the length of the static keys (16, 24 or 32 bytes); the
    session keys have the same length.
    """
    if key_length not in AES_KEY_LENGTHS:
        raise ValueError(f"key length must be 16, 24 or 32, got {key_length}")
    _check_challenges(host_challenge, card_challenge)
    context = bytes(host_challenge) + bytes(card_challenge)
    bits = key_length * 8
    return SessionKeys(
        s_enc=kdf(prf_enc, DERIVE_S_ENC, context, bits),
        s_mac=kdf(prf_mac, DERIVE_S_MAC, context, bits),
        s_rmac=kdf(prf_mac, DERIVE_S_RMAC, context, bits),
    )


def _cryptogram(s_mac: bytes, constant: int, host_challenge: bytes,
                card_challenge: bytes) -> bytes:
    s16 = _check_challenges(host_challenge, card_challenge)
    bits = 128 if s16 else 64
    return kdf(cmac_prf(s_mac), constant, bytes(host_challenge) + bytes(card_challenge), bits)


def card_cryptogram(s_mac: bytes, host_challenge: bytes, card_challenge: bytes) -> bytes:
    """The card's proof of the keys, returned by INITIALIZE UPDATE."""
    return _cryptogram(s_mac, DERIVE_CARD_CRYPTOGRAM, host_challenge, card_challenge)


def host_cryptogram(s_mac: bytes, host_challenge: bytes, card_challenge: bytes) -> bytes:
    """The host's proof of the keys, sent in EXTERNAL AUTHENTICATE."""
    return _cryptogram(s_mac, DERIVE_HOST_CRYPTOGRAM, host_challenge, card_challenge)


def pseudo_random_card_challenge(prf_enc: Prf, sequence_counter: bytes, aid: bytes,
                                 *, s16: bool = False) -> bytes:
    """Amendment D §6.2.2.1: card challenge = KDF(static ENC, 02, counter || AID).

    A card that uses it (i parameter bit 0x10) never repeats a challenge, and a
    host can check that the challenge really came from its key set's counter.
    """
    if len(sequence_counter) != 3:
        raise Scp03Error("the SCP03 sequence counter is 3 bytes")
    return kdf(prf_enc, DERIVE_CARD_CHALLENGE, bytes(sequence_counter) + bytes(aid),
               128 if s16 else 64)


# --- key data encryption (PUT KEY) -------------------------------------------


def encrypt_key_data(dek: bytes, key: bytes) -> bytes:
    """Encrypt a key for PUT KEY: AES-CBC, zero ICV, under the static DEK.

    A 24-byte key is padded (here with zeros) to 32 bytes; the clear length
    travels in the PUT KEY key component. An HSM produces the same shape
    with C_WrapKey (CKM_AES_CBC, or CKM_AES_CBC_PAD for 24-byte keys).
    """
    if len(dek) not in AES_KEY_LENGTHS or len(key) not in AES_KEY_LENGTHS:
        raise ValueError("DEK and key must be AES keys")
    data = bytes(key) + bytes(-len(key) % BLOCK)
    return _aes_cbc(bytes(dek), ZERO_CHAIN, data)


def decrypt_key_data(dek: bytes, encrypted: bytes, key_length: int) -> bytes:
    """Inverse of :func:`encrypt_key_data`; any padding after the key is ignored."""
    if len(encrypted) % BLOCK or not encrypted or key_length > len(encrypted):
        raise Scp03Error("encrypted key length does not fit the key")
    return _aes_cbc(bytes(dek), ZERO_CHAIN, bytes(encrypted), decrypt=True)[:key_length]


# --- secure messaging --------------------------------------------------------


def _mac(key: bytes, chain: bytes, message: bytes) -> bytes:
    """Full 16-byte CMAC over chaining value || message (the next chaining value)."""
    return _aes_cmac(key, chain, message)


def _icv(s_enc: bytes, counter: int, *, response: bool) -> bytes:
    """Amendment D §6.2.6/§6.2.7: ICV = AES(S-ENC, counter block).

    Commands use the counter as a 16-byte big-endian block; responses set the
    first byte to 0x80 so the two directions never share an ICV.
    """
    block = bytearray(counter.to_bytes(BLOCK, "big"))
    if response:
        block[0] = 0x80
    return _aes_ecb_block(s_enc, bytes(block))


def _mac_input(command: CommandApdu, payload: bytes, mac_length: int) -> bytes:
    """Header (with the secure messaging bit) || Lc as sent || data, for C-MAC."""
    cla = command.cla | CLA_SECURE_MESSAGING
    lc = len(payload) + mac_length
    form = command.replace(cla=cla, data=payload, ne=command.ne,
                           extended=command.extended or lc > 255)
    return form.header + form.encode_lc(lc) + payload


@dataclass(frozen=True)
class ChannelCheckpoint:
    """The moving parts of a channel after a given command.

    ``mac_chain`` is the C-MAC chaining value (the full CMAC of the last
    command), ``enc_counter`` the encryption counter of the *next* command.
    Both ends hold the same checkpoint once the card has processed a command.
    The checkpoint of a freshly opened channel belongs to EXTERNAL
    AUTHENTICATE, so its response can be unwrapped like any other.
    """

    mac_chain: bytes = field(repr=False)
    enc_counter: int
    # False only for the state right after EXTERNAL AUTHENTICATE: the card
    # never applies R-MAC / R-ENCRYPTION to that command's own response.
    responses_protected: bool = True


def protect_response(keys: SessionKeys, security_level: int, mac_length: int,
                     checkpoint: ChannelCheckpoint, data: bytes, sw: int) -> bytes:
    """A response as the card sends it at ``checkpoint``: R-ENCRYPTION, then R-MAC.

    One function for both ends: the card protects its answers with it, and a
    host that knows what the card must answer (a PUT KEY's KCVs, an empty
    9000) foresees the exact bytes, so the answers can be checked later by
    comparison, without the session keys. Error status words go back bare,
    and so does the answer to EXTERNAL AUTHENTICATE itself (Amendment D).
    """
    status = sw.to_bytes(2, "big")
    if not SW.is_protected(sw) or not checkpoint.responses_protected:
        return status
    body = bytes(data)
    if security_level & SecurityLevel.R_ENCRYPTION and body:
        icv = _icv(keys.s_enc, checkpoint.enc_counter - 1, response=True)
        body = _aes_cbc(keys.s_enc, icv, pad80(body))
    if security_level & SecurityLevel.R_MAC:
        body += _mac(keys.s_rmac, checkpoint.mac_chain, body + status)[:mac_length]
    return body + status


class HostChannel:
    """The host end of an open SCP03 session (after EXTERNAL AUTHENTICATE).

    Build it with :func:`open_host_channel`. ``wrap`` and ``unwrap`` are pure
    software over the session keys. For pre-wrapped scripts use
    :meth:`wrap_script` and :meth:`unwrap_script` / :meth:`resync`.
    """

    def __init__(self, keys: SessionKeys, security_level: int, *, mac_length: int = 8,
                 checkpoint: ChannelCheckpoint | None = None) -> None:
        if mac_length not in (8, 16):
            raise ValueError("MAC length is 8 (S8) or 16 (S16)")
        self._keys = keys
        self.security_level = check_security_level(security_level)
        self.mac_length = mac_length
        cp = checkpoint or ChannelCheckpoint(ZERO_CHAIN, 1)
        self._mac_chain = cp.mac_chain
        self._enc_counter = cp.enc_counter
        self._responses_protected = cp.responses_protected

    # state -----------------------------------------------------------------

    def checkpoint(self) -> ChannelCheckpoint:
        """The current state: what the card holds once it processed every wrapped command."""
        return ChannelCheckpoint(self._mac_chain, self._enc_counter, self._responses_protected)

    def resync(self, checkpoint: ChannelCheckpoint) -> None:
        """Move back to ``checkpoint`` (e.g. the card stopped after command k)."""
        self._mac_chain = checkpoint.mac_chain
        self._enc_counter = checkpoint.enc_counter
        self._responses_protected = checkpoint.responses_protected

    def copy(self) -> HostChannel:
        """An independent channel with the same keys and state (cheap)."""
        return HostChannel(self._keys, self.security_level, mac_length=self.mac_length,
                           checkpoint=self.checkpoint())

    def __repr__(self) -> str:
        return (f"HostChannel(level=0x{int(self.security_level):02X}, "
                f"mac_length={self.mac_length}, enc_counter={self._enc_counter})")

    # commands --------------------------------------------------------------

    def wrap(self, apdu: bytes | CommandApdu) -> bytes:
        """Protect one command APDU for the card (C-MAC, C-DECRYPTION as the level says)."""
        command = apdu if isinstance(apdu, CommandApdu) else parse_command(apdu)
        return self._wrap(command).encode()

    def wrap_command(self, command: CommandApdu) -> CommandApdu:
        return self._wrap(command)

    def _wrap(self, command: CommandApdu) -> CommandApdu:
        level = self.security_level
        if not level & SecurityLevel.C_MAC:
            return command
        payload = command.data
        counter = self._enc_counter
        if level & SecurityLevel.C_DECRYPTION and payload:
            payload = _aes_cbc(self._keys.s_enc, _icv(self._keys.s_enc, counter, response=False),
                               pad80(payload))
        full = _mac(self._keys.s_mac, self._mac_chain, _mac_input(command, payload,
                                                                  self.mac_length))
        self._mac_chain = full
        self._responses_protected = True
        # Amendment D: the counter advances for every command of the session,
        # whether or not it has data to encrypt.
        self._enc_counter = counter + 1
        lc = len(payload) + self.mac_length
        return CommandApdu(command.cla | CLA_SECURE_MESSAGING, command.ins, command.p1,
                           command.p2, payload + full[:self.mac_length], command.ne,
                           command.extended or lc > 255)

    def wrap_script(self, apdus: Sequence[bytes | CommandApdu]
                    ) -> list[tuple[bytes, ChannelCheckpoint]]:
        """Wrap several commands; each comes with the checkpoint just after it.

        Checkpoint *k* is the state the card holds after processing command
        *k*: unwrap response *k* against it, and :meth:`resync` to it when the
        card stopped there.
        """
        out = []
        for apdu in apdus:
            wrapped = self.wrap(apdu)
            out.append((wrapped, self.checkpoint()))
        return out

    # responses -------------------------------------------------------------

    def unwrap(self, response: bytes, checkpoint: ChannelCheckpoint | None = None
               ) -> tuple[bytes, int]:
        """Check and decrypt a response; returns ``(data, sw)``.

        ``checkpoint`` is the state after the command this response answers
        (default: the current state, i.e. the last wrapped command). Error
        status words come back without R-MAC and without data, as the card
        sends them (Amendment D); they are returned as they are.
        """
        data, sw = parse_response(response)
        cp = checkpoint or self.checkpoint()
        level = self.security_level
        if not SW.is_protected(sw) or not cp.responses_protected:
            return data, sw
        if level & SecurityLevel.R_MAC:
            if len(data) < self.mac_length:
                raise MacError(f"response too short for an R-MAC ({len(data)} bytes)")
            body, mac = data[:-self.mac_length], data[-self.mac_length:]
            expected = _mac(self._keys.s_rmac, cp.mac_chain,
                            body + sw.to_bytes(2, "big"))[:self.mac_length]
            if not hmac.compare_digest(expected, mac):
                raise MacError("R-MAC does not verify")
            data = body
        if level & SecurityLevel.R_ENCRYPTION and data:
            if len(data) % BLOCK:
                raise Scp03Error("encrypted response is not a whole number of blocks")
            icv = _icv(self._keys.s_enc, cp.enc_counter - 1, response=True)
            data = unpad80(_aes_cbc(self._keys.s_enc, icv, data, decrypt=True))
        return data, sw

    def expected_response(self, data: bytes, sw: int, checkpoint: ChannelCheckpoint) -> bytes:
        """The exact secured response the card must send for plain ``data`` and ``sw``
        to the command whose checkpoint is ``checkpoint`` (see :func:`protect_response`)."""
        return protect_response(self._keys, self.security_level, self.mac_length, checkpoint,
                                data, sw)

    def unwrap_script(self, responses: Sequence[bytes],
                      checkpoints: Sequence[ChannelCheckpoint]) -> list[tuple[bytes, int]]:
        """Unwrap the first ``len(responses)`` responses of a wrapped script.

        Leaves the channel resynchronised to the last command the card
        answered, which is where the card's own state is.
        """
        if len(responses) > len(checkpoints):
            raise ValueError("more responses than wrapped commands")
        out = [self.unwrap(r, cp) for r, cp in zip(responses, checkpoints, strict=False)]
        if responses:
            self.resync(checkpoints[len(responses) - 1])
        return out


def external_authenticate(keys: SessionKeys, host_challenge: bytes, card_challenge: bytes,
                          security_level: int) -> tuple[bytes, HostChannel]:
    """EXTERNAL AUTHENTICATE (C-MAC over a zero chaining value) and the open channel."""
    level = check_security_level(security_level)
    s16 = _check_challenges(host_challenge, card_challenge)
    mac_length = 16 if s16 else 8
    cryptogram = host_cryptogram(keys.s_mac, host_challenge, card_challenge)
    command = CommandApdu(0x80 | CLA_SECURE_MESSAGING, Ins.EXTERNAL_AUTHENTICATE,
                          int(level), 0x00, cryptogram)
    full = _mac(keys.s_mac, ZERO_CHAIN, _mac_input(command, cryptogram, mac_length))
    apdu = command.replace(data=cryptogram + full[:mac_length]).encode()
    channel = HostChannel(keys, level, mac_length=mac_length,
                          checkpoint=ChannelCheckpoint(full, 1, responses_protected=False))
    return apdu, channel


@dataclass(frozen=True)
class InitializeUpdateResponse:
    """The data of an INITIALIZE UPDATE response (Amendment D §7.1.1.6)."""

    key_diversification_data: bytes
    kvn: int
    scp: int
    i: int
    card_challenge: bytes
    card_cryptogram: bytes
    sequence_counter: bytes | None

    @property
    def s16(self) -> bool:
        return bool(self.i & I_S16)

    @classmethod
    def parse(cls, data: bytes) -> InitializeUpdateResponse:
        data = bytes(data)
        if len(data) < 13:
            raise Scp03Error(f"INITIALIZE UPDATE response too short ({len(data)} bytes)")
        kvn, scp, i = data[10], data[11], data[12]
        if scp != SCP_ID:
            raise Scp03Error(f"card answered with SCP{scp:02X}, not SCP03")
        n = 16 if i & I_S16 else 8
        counter_len = 3 if i & I_PSEUDO_RANDOM_CHALLENGE else 0
        if len(data) not in (13 + 2 * n, 13 + 2 * n + 3) or (
                counter_len and len(data) != 13 + 2 * n + 3):
            raise Scp03Error(f"INITIALIZE UPDATE response of {len(data)} bytes does not "
                             f"match i=0x{i:02X}")
        return cls(data[:10], kvn, scp, i, data[13:13 + n], data[13 + n:13 + 2 * n],
                   data[13 + 2 * n:] or None)

    def encode(self) -> bytes:
        return (self.key_diversification_data + bytes((self.kvn, self.scp, self.i))
                + self.card_challenge + self.card_cryptogram + (self.sequence_counter or b""))


def open_host_channel(prf_enc: Prf, prf_mac: Prf, host_challenge: bytes,
                      init_update_response: bytes | InitializeUpdateResponse, *,
                      key_length: int, security_level: int, kvn: int | None = None,
                      aid: bytes | None = None) -> tuple[HostChannel, bytes]:
    """Host side of the handshake, with the static keys only reachable as PRFs.

    Derives the session keys, checks the card cryptogram (and, when ``aid`` is
    given and the card uses pseudo-random challenges, that the challenge comes
    from its sequence counter), and returns the open channel with the
    EXTERNAL AUTHENTICATE APDU to send. Raises :class:`CryptogramError` when
    the card does not hold the same keys.
    """
    resp = (init_update_response if isinstance(init_update_response, InitializeUpdateResponse)
            else InitializeUpdateResponse.parse(init_update_response))
    if kvn is not None and kvn != 0 and resp.kvn != kvn:
        raise Scp03Error(f"card answered with key version 0x{resp.kvn:02X}, "
                         f"expected 0x{kvn:02X}")
    if len(host_challenge) != len(resp.card_challenge):
        raise Scp03Error("host challenge length does not match the card's mode")
    keys = derive_session_keys(prf_enc, prf_mac, host_challenge, resp.card_challenge,
                               key_length)
    expected = card_cryptogram(keys.s_mac, host_challenge, resp.card_challenge)
    if not hmac.compare_digest(expected, resp.card_cryptogram):
        raise CryptogramError("card cryptogram does not verify (wrong key set or not this card)")
    if aid is not None and resp.i & I_PSEUDO_RANDOM_CHALLENGE:
        if resp.sequence_counter is None:
            raise Scp03Error("pseudo-random challenge without sequence counter")
        challenge = pseudo_random_card_challenge(prf_enc, resp.sequence_counter, aid,
                                                 s16=resp.s16)
        if not hmac.compare_digest(challenge, resp.card_challenge):
            raise CardChallengeError(f"card challenge does not come from its sequence counter "
                                     f"and AID {bytes(aid).hex().upper()}")
    apdu, channel = external_authenticate(keys, host_challenge, resp.card_challenge,
                                          security_level)
    return channel, apdu


# --- card side ---------------------------------------------------------------


@dataclass
class CardChannel:
    """The card end of an SCP03 session.

    Created by INITIALIZE UPDATE (:meth:`begin`), authenticated by
    :meth:`external_authenticate`, then :meth:`unwrap_command` /
    :meth:`wrap_response` for every protected command. Any verification
    failure raises; the caller must then drop the session.
    """

    keys: SessionKeys
    host_challenge: bytes = field(repr=False)
    card_challenge: bytes = field(repr=False)
    security_level: SecurityLevel | None = None
    mac_chain: bytes = field(default=ZERO_CHAIN, repr=False)
    enc_counter: int = 1

    @property
    def mac_length(self) -> int:
        return len(self.card_challenge)

    @property
    def authenticated(self) -> bool:
        return self.security_level is not None

    @classmethod
    def begin(cls, enc_key: bytes, mac_key: bytes, host_challenge: bytes,
              card_challenge: bytes) -> tuple[CardChannel, bytes]:
        """Derive session keys with the static keys; returns the channel and card cryptogram."""
        if len(enc_key) != len(mac_key):
            raise ValueError("ENC and MAC keys of a set have the same length")
        keys = derive_session_keys(cmac_prf(enc_key), cmac_prf(mac_key), host_challenge,
                                   card_challenge, len(enc_key))
        channel = cls(keys, bytes(host_challenge), bytes(card_challenge))
        return channel, card_cryptogram(keys.s_mac, host_challenge, card_challenge)

    def external_authenticate(self, command: CommandApdu) -> SecurityLevel:
        """Verify EXTERNAL AUTHENTICATE (host cryptogram and C-MAC) and open the session."""
        if self.authenticated:
            raise Scp03Error("session already authenticated")
        level = check_security_level(command.p1)
        n = self.mac_length
        if len(command.data) != 2 * n or not command.cla & CLA_SECURE_MESSAGING:
            raise MacError("EXTERNAL AUTHENTICATE must carry a cryptogram and a C-MAC")
        cryptogram, mac = command.data[:n], command.data[n:]
        expected = host_cryptogram(self.keys.s_mac, self.host_challenge, self.card_challenge)
        if not hmac.compare_digest(expected, cryptogram):
            raise CryptogramError("host cryptogram does not verify")
        full = _mac(self.keys.s_mac, ZERO_CHAIN, _mac_input(command, cryptogram, n))
        if not hmac.compare_digest(full[:n], mac):
            raise MacError("C-MAC of EXTERNAL AUTHENTICATE does not verify")
        self.mac_chain = full
        self.enc_counter = 1
        self.security_level = level
        return level

    def unwrap_command(self, command: CommandApdu) -> CommandApdu:
        """Check the C-MAC (and decrypt) of a protected command; returns it in clear.

        On success the chaining value and the encryption counter advance; on
        failure nothing changes and :class:`MacError` is raised.
        """
        level = self.security_level
        if level is None:
            raise Scp03Error("session not authenticated")
        if not level & SecurityLevel.C_MAC:
            if command.cla & CLA_SECURE_MESSAGING:
                raise MacError("secure messaging at security level 00")
            return command
        if not command.cla & CLA_SECURE_MESSAGING:
            raise MacError("command without secure messaging in a C-MAC session")
        n = self.mac_length
        if len(command.data) < n:
            raise MacError("command too short for a C-MAC")
        payload, mac = command.data[:-n], command.data[-n:]
        full = _mac(self.keys.s_mac, self.mac_chain, _mac_input(command, payload, n))
        if not hmac.compare_digest(full[:n], mac):
            raise MacError("C-MAC does not verify")
        counter = self.enc_counter
        if level & SecurityLevel.C_DECRYPTION and payload:
            if len(payload) % BLOCK:
                raise MacError("encrypted command data is not a whole number of blocks")
            icv = _icv(self.keys.s_enc, counter, response=False)
            try:
                payload = unpad80(_aes_cbc(self.keys.s_enc, icv, payload, decrypt=True))
            except Scp03Error as exc:
                raise MacError("command data does not decrypt") from exc
        self.mac_chain = full
        self.enc_counter = counter + 1
        try:
            return CommandApdu(command.cla & ~CLA_SECURE_MESSAGING & 0xFF, command.ins,
                               command.p1, command.p2, payload, command.ne, command.extended)
        except ApduError as exc:  # pragma: no cover - lengths only shrink
            raise MacError(str(exc)) from exc

    def wrap_response(self, data: bytes, sw: int) -> bytes:
        """Protect a response (R-ENCRYPTION, R-MAC); error SWs go back bare."""
        return protect_response(self.keys, self.security_level or SecurityLevel.NONE,
                                self.mac_length, ChannelCheckpoint(self.mac_chain,
                                                                   self.enc_counter),
                                data, sw)

    def copy(self) -> CardChannel:
        return dataclasses.replace(self)
