"""Instruction bytes (INS) of the ISO 7816-4 and GlobalPlatform commands this
system sends, answers or recognizes in a script.

An ``IntEnum``, so a member is the byte on the wire (``Ins.PUT_KEY == 0xD8``)
and compares with ``apdu[1]``; the host, the card and the servers all name a
command by it. It lives apart from :mod:`cardcore.gp` because SCP03 (which gp
builds on) needs EXTERNAL AUTHENTICATE, and stays free of dependencies so the
card agent can read it.
"""

from __future__ import annotations

from enum import IntEnum


class Ins(IntEnum):
    """INS of each command, by its name in ISO 7816-4 or the GlobalPlatform Card Specification."""

    SELECT = 0xA4
    GET_RESPONSE = 0xC0
    GET_DATA = 0xCA
    INITIALIZE_UPDATE = 0x50
    EXTERNAL_AUTHENTICATE = 0x82
    PUT_KEY = 0xD8
    DELETE = 0xE4
    GET_STATUS = 0xF2
    STORE_DATA = 0xE2
