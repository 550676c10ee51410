"""The issuer security domain's secure channel, as an applet reaches it.

On a GlobalPlatform card an applet does not run SCP03 itself: it hands
INITIALIZE UPDATE and EXTERNAL AUTHENTICATE to its security domain
(``SecureChannel.processSecurity``) and has each protected command unwrapped
and each answer wrapped by it (``unwrap``/``wrap``). This module is that
logic, used by the ISD for its own commands and by the issuance applet
(:mod:`virtual_psd.issuance`) for its: the key sets, the sequence counter,
"i" and the AID are always the ISD's, so a host opens a channel to either in
exactly the same way. Each applet keeps its own :class:`ChannelSession`
(volatile, under its AID in :class:`~virtual_psd.applet.Session`), so
selecting another applet ends it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from cardcore import gp
from cardcore.apdu import CommandApdu
from cardcore.psd import psd_id_bytes
from cardcore.scp03 import (
    CLA_SECURE_MESSAGING,
    I_PSEUDO_RANDOM_CHALLENGE,
    I_S16,
    CardChannel,
    CryptogramError,
    InitializeUpdateResponse,
    Scp03Error,
    SecurityLevel,
    cmac_prf,
    offered_security_levels,
    pseudo_random_card_challenge,
)
from cardcore.sw import SW
from virtual_psd.applet import CommandContext, StatusError

MAX_SEQUENCE_COUNTER: Final = 0xFFFFFF
SW_HOST_CRYPTOGRAM_FAILED: Final = 0x6300
"""GlobalPlatform: authentication of the host cryptogram failed."""


class StaticKeys(Protocol):
    """One key set of the security domain (ENC, MAC, DEK)."""

    enc: bytes
    mac: bytes
    dek: bytes


class DomainKeys(Protocol):
    """What the security domain keeps for its channels (the ISD's section)."""

    key_sets: Mapping[int, StaticKeys]
    sequence_counter: int
    scp_i: int


@dataclass
class ChannelSession:
    """One applet's secure channel session: volatile, ended by any failure."""

    channel: CardChannel | None = None
    kvn: int | None = None
    dek: bytes | None = field(default=None, repr=False)

    @property
    def authenticated(self) -> bool:
        return self.channel is not None and self.channel.authenticated

    @property
    def security_level(self) -> int | None:
        return None if self.channel is None else self.channel.security_level


C = TypeVar("C", bound=ChannelSession)


class SecureChannel(Generic[C]):
    """The channel logic for the applet ``owner``, on the domain ``domain_aid``'s keys.

    ``new_session`` makes the applet's empty session (the ISD's carries more
    than the channel). Every method ends the session where the ISD always did:
    a new INITIALIZE UPDATE, a failed EXTERNAL AUTHENTICATE, a bad C-MAC, a
    command stripped of its protection.
    """

    def __init__(self, owner: bytes, domain_aid: bytes, new_session: Callable[[], C]) -> None:
        self.owner = owner
        self.domain_aid = domain_aid
        self.new_session = new_session

    def session(self, ctx: CommandContext) -> C:
        data = ctx.session.app_data.get(self.owner)
        if not isinstance(data, ChannelSession):
            data = self.new_session()
            ctx.session.app_data[self.owner] = data
        return data  # type: ignore[return-value]

    def end(self, ctx: CommandContext) -> None:
        ctx.session.app_data[self.owner] = self.new_session()

    def initialize_update(self, ctx: CommandContext, domain: DomainKeys, command: CommandApdu,
                          kvn: int | None, opened: Callable[[CardChannel, int, bytes], C]
                          ) -> tuple[bytes, int]:
        """INITIALIZE UPDATE on the domain's keys (``domain`` is this command's working copy).

        ``kvn`` is the key set the host asked for (P1, or the domain's
        default for P1 = 0); ``opened`` makes the session of the new channel.
        """
        self.end(ctx)  # any session in progress ends here
        if command.cla != gp.CLA_GP:
            return b"", SW.CLA_NOT_SUPPORTED
        if command.p2 != 0x00:
            return b"", SW.INCORRECT_P1P2
        s16 = bool(domain.scp_i & I_S16)
        if len(command.data) != (16 if s16 else 8):
            return b"", SW.WRONG_LENGTH
        if kvn is None or kvn not in domain.key_sets:
            return b"", SW.REFERENCED_DATA_NOT_FOUND
        keys = domain.key_sets[kvn]
        counter: bytes | None = None
        if domain.scp_i & I_PSEUDO_RANDOM_CHALLENGE:
            # Amendment D §6.2.2.1: the challenge comes from the key set's ENC key,
            # the sequence counter and the domain's AID, and the counter follows the
            # cryptogram in the answer. A card with random challenges sends neither.
            if domain.sequence_counter >= MAX_SEQUENCE_COUNTER:
                return b"", SW.CONDITIONS_NOT_SATISFIED
            counter = domain.sequence_counter.to_bytes(3, "big")
            domain.sequence_counter += 1  # committed with this command: never reused
            card_challenge = pseudo_random_card_challenge(cmac_prf(keys.enc), counter,
                                                          self.domain_aid, s16=s16)
        else:
            card_challenge = os.urandom(16 if s16 else 8)
        channel, cryptogram = CardChannel.begin(keys.enc, keys.mac, command.data,
                                                card_challenge)
        ctx.session.app_data[self.owner] = opened(channel, kvn, keys.dek)
        resp = InitializeUpdateResponse(psd_id_bytes(ctx.state.psd_id), kvn, 0x03,
                                        domain.scp_i, card_challenge, cryptogram, counter)
        return resp.encode(), SW.OK

    def external_authenticate(self, ctx: CommandContext, scp_i: int,
                              command: CommandApdu) -> tuple[bytes, int]:
        session = self.session(ctx)
        channel = session.channel
        if channel is None or channel.authenticated:
            self.end(ctx)
            return b"", SW.CONDITIONS_NOT_SATISFIED
        # Whatever happens next, this handshake is used up unless it succeeds.
        self.end(ctx)
        # A level this card's "i" does not offer (R-MAC, R-ENCRYPTION) is refused as
        # many cards refuse it: incorrect P1.
        if command.p2 != 0x00 or command.p1 not in offered_security_levels(scp_i):
            return b"", SW.INCORRECT_P1P2
        if len(command.data) != 2 * channel.mac_length:
            return b"", SW.WRONG_LENGTH
        try:
            channel.external_authenticate(command)
        except CryptogramError:
            return b"", SW_HOST_CRYPTOGRAM_FAILED
        except Scp03Error:
            return b"", SW.SECURITY_STATUS_NOT_SATISFIED
        ctx.session.app_data[self.owner] = session
        return b"", SW.OK

    def unwrap(self, ctx: CommandContext, command: CommandApdu,
               secured: Collection[int]) -> CommandApdu:
        """The command in clear; StatusError 6982 (and the session ended) when it may not pass.

        A protected command needs an authenticated session and a good C-MAC;
        a command of ``secured`` sent plain while a C-MAC session is open was
        stripped of its protection.
        """
        session = self.session(ctx)
        if command.cla & CLA_SECURE_MESSAGING:
            if not session.authenticated:
                self.end(ctx)
                raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "no secure channel")
            assert session.channel is not None
            try:
                return session.channel.unwrap_command(command)
            except Scp03Error as exc:
                # A bad C-MAC ends the session: later commands are refused.
                self.end(ctx)
                raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, str(exc)) from exc
        if command.ins in secured and session.authenticated:
            assert session.channel is not None
            if session.channel.security_level & SecurityLevel.C_MAC:
                self.end(ctx)
                raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "protection stripped")
        return command

    @staticmethod
    def protect(session: ChannelSession, data: bytes, sw: int) -> tuple[bytes, int]:
        """The answer to a protected command, wrapped (R-MAC, R-ENC as the level says)."""
        if session.channel is None:
            return data, sw
        raw = session.channel.wrap_response(data, sw)
        return raw[:-2], sw
