"""A minimal host driver over any ``transmit(apdu) -> response`` callable.

For tests, demos and tools that hold the static keys in software (or as PRF
callables). The server side runs the same steps through the HSM proxy; this
module only sequences the APDUs, over the processor stack of
:mod:`cardcore.processor` (the card's 61xx/6Cxx handled below the secure
channel, command chaining above it when the link takes short APDUs only).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cardcore import gp
from cardcore.apdu import SHORT_MAX_DATA, CommandApdu, parse_command
from cardcore.diversify import StaticKeySet
from cardcore.kcv import kcv_aes
from cardcore.processor import (
    ApduProcessor,
    CommandChaining,
    SecureMessaging,
    Transmit,
    apdu_link,
)
from cardcore.psd import ISD_AID
from cardcore.scp03 import (
    HostChannel,
    Prf,
    Scp03Error,
    cmac_prf,
    encrypt_key_data,
    open_host_channel,
)
from cardcore.sw import SW

BLOCK = 16  # AES block: C-DECRYPTION pads each command's data to a multiple of it


class CardStatusError(Scp03Error):
    """The card answered a handshake command with an error status word."""

    def __init__(self, what: str, sw: int) -> None:
        super().__init__(f"{what}: {SW.describe(sw)}")
        self.sw = sw


@dataclass
class SecureSession:
    """An open SCP03 session: ``send`` wraps, transmits and unwraps.

    ``transmit`` is the raw link the session was opened on and ``channel``
    its secure channel; ``extended_length`` False means the link takes short
    APDUs only, so long commands go as chains whose links are each wrapped
    (with room left in each for the padding and the C-MAC).
    """

    transmit: Transmit
    channel: HostChannel
    kvn: int
    extended_length: bool = True
    processor: ApduProcessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        secured: ApduProcessor = SecureMessaging(
            apdu_link(self.transmit, extended_length=self.extended_length), self.channel)
        if not self.extended_length:
            room = (SHORT_MAX_DATA - self.channel.mac_length) // BLOCK * BLOCK - 1
            secured = CommandChaining(secured, max_data=room)
        self.processor = secured

    def send(self, apdu: bytes | CommandApdu) -> tuple[bytes, int]:
        command = apdu if isinstance(apdu, CommandApdu) else parse_command(apdu)
        response = self.processor.send(command)
        return response.data, response.sw


def open_session(transmit: Transmit, *, kvn: int, security_level: int = 0x33,
                 keys: StaticKeySet | None = None,
                 prfs: tuple[Prf, Prf, int] | None = None,
                 aid: bytes = ISD_AID, host_challenge: bytes | None = None,
                 select: bool = True, extended_length: bool = True) -> SecureSession:
    """SELECT the ISD, INITIALIZE UPDATE, check the card, EXTERNAL AUTHENTICATE.

    Give either ``keys`` (software) or ``prfs`` = (prf_enc, prf_mac, key_length).
    ``extended_length`` False: the link takes short APDUs only (see
    :class:`SecureSession`).
    """
    if (keys is None) == (prfs is None):
        raise ValueError("give keys or prfs")
    if keys is not None:
        prf_enc, prf_mac, key_length = cmac_prf(keys.enc), cmac_prf(keys.mac), keys.key_length
    else:
        assert prfs is not None
        prf_enc, prf_mac, key_length = prfs
    link = apdu_link(transmit, extended_length=extended_length)

    def step(what: str, apdu: bytes) -> bytes:
        response = link.send(parse_command(apdu))
        if response.sw != SW.OK:
            raise CardStatusError(what, response.sw)
        return response.data

    if select:
        step("SELECT", gp.select_command(aid))
    challenge = host_challenge or secrets.token_bytes(8)
    data = step("INITIALIZE UPDATE", gp.initialize_update_command(kvn, challenge))
    channel, ext_auth = open_host_channel(prf_enc, prf_mac, challenge, data,
                                          key_length=key_length,
                                          security_level=security_level, aid=aid)
    step("EXTERNAL AUTHENTICATE", ext_auth)
    actual_kvn = gp.parse_initialize_update_response(data).kvn
    return SecureSession(transmit, channel, actual_kvn, extended_length)


def put_key_set_command(dek: bytes, new_keys: StaticKeySet, new_kvn: int,
                        replace_kvn: int = 0) -> tuple[bytes, bytes]:
    """PUT KEY for a whole set encrypted under ``dek`` (software), with the expected response."""
    comps = [gp.KeyComponent(encrypt_key_data(dek, k), len(k), kcv_aes(k))
             for k in new_keys.keys()]
    expected = gp.put_key_response(new_kvn, [c.kcv for c in comps])
    return gp.put_key_command(new_kvn, comps, replace_kvn=replace_kvn), expected
