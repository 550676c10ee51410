"""A minimal host driver over any ``transmit(apdu) -> response`` callable.

For tests, demos and tools that hold the static keys in software (or as PRF
callables). The server side runs the same steps through the HSM proxy; this
module only sequences the APDUs.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cardcore import gp
from cardcore import sw as SW
from cardcore.apdu import parse_response
from cardcore.diversify import StaticKeySet
from cardcore.kcv import kcv_aes
from cardcore.psd import ISD_AID
from cardcore.scp03 import (
    HostChannel,
    Prf,
    Scp03Error,
    cmac_prf,
    encrypt_key_data,
    open_host_channel,
)

Transmit = Callable[[bytes], bytes]


class CardStatusError(Scp03Error):
    """The card answered a handshake command with an error status word."""

    def __init__(self, what: str, sw: int) -> None:
        super().__init__(f"{what}: {SW.describe(sw)}")
        self.sw = sw


@dataclass
class SecureSession:
    """An open SCP03 session: ``send`` wraps, transmits and unwraps."""

    transmit: Transmit
    channel: HostChannel
    kvn: int

    def send(self, apdu: bytes) -> tuple[bytes, int]:
        return self.channel.unwrap(self.transmit(self.channel.wrap(apdu)))


def open_session(transmit: Transmit, *, kvn: int, security_level: int = 0x33,
                 keys: StaticKeySet | None = None,
                 prfs: tuple[Prf, Prf, int] | None = None,
                 aid: bytes = ISD_AID, host_challenge: bytes | None = None,
                 select: bool = True) -> SecureSession:
    """SELECT the ISD, INITIALIZE UPDATE, check the card, EXTERNAL AUTHENTICATE.

    Give either ``keys`` (software) or ``prfs`` = (prf_enc, prf_mac, key_length).
    """
    if (keys is None) == (prfs is None):
        raise ValueError("give keys or prfs")
    if keys is not None:
        prf_enc, prf_mac, key_length = cmac_prf(keys.enc), cmac_prf(keys.mac), keys.key_length
    else:
        assert prfs is not None
        prf_enc, prf_mac, key_length = prfs
    if select:
        _, sw = parse_response(transmit(gp.select_command(aid)))
        if sw != SW.OK:
            raise CardStatusError("SELECT", sw)
    challenge = host_challenge or secrets.token_bytes(8)
    data, sw = parse_response(transmit(gp.initialize_update_command(kvn, challenge)))
    if sw != SW.OK:
        raise CardStatusError("INITIALIZE UPDATE", sw)
    channel, ext_auth = open_host_channel(prf_enc, prf_mac, challenge, data,
                                          key_length=key_length,
                                          security_level=security_level, aid=aid)
    _, sw = parse_response(transmit(ext_auth))
    if sw != SW.OK:
        raise CardStatusError("EXTERNAL AUTHENTICATE", sw)
    actual_kvn = gp.parse_initialize_update_response(data).kvn
    return SecureSession(transmit, channel, actual_kvn)


def put_key_set_command(dek: bytes, new_keys: StaticKeySet, new_kvn: int,
                        replace_kvn: int = 0) -> tuple[bytes, bytes]:
    """PUT KEY for a whole set encrypted under ``dek`` (software), with the expected response."""
    comps = [gp.KeyComponent(encrypt_key_data(dek, k), len(k), kcv_aes(k))
             for k in new_keys.keys()]
    expected = gp.put_key_response(new_kvn, [c.kcv for c in comps])
    return gp.put_key_command(new_kvn, comps, replace_kvn=replace_kvn), expected
