"""A yubikit SmartCardConnection over any ``transmit(apdu) -> response`` callable."""

from __future__ import annotations

from collections.abc import Callable

from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection


class TransmitConnection(SmartCardConnection):
    def __init__(self, transmit: Callable[[bytes], bytes]) -> None:
        self._transmit = transmit

    @property
    def transport(self) -> TRANSPORT:
        # Not a YubiKey over USB: short APDUs, as over NFC.
        return TRANSPORT.NFC

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        response = self._transmit(bytes(apdu))
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        pass
