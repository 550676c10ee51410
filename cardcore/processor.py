"""APDU processors: small layers between a host and a card, each wrapping the next.

A host never talks to a card in one step. A command may need extended length
or a command chain to fit the link, a T=0 reader hands a long answer out in
pieces (``61xx``, GET RESPONSE) or asks for the right Le (``6Cxx``), and a
secure channel protects every command and checks every answer. Each of these
is one processor here, so the host driver (:mod:`cardcore.host`), the card
agent's readers, the tests and the benches stack the same pieces instead of
each redoing its own part:

* :class:`ApduFormatter`: the bottom of every stack, over a raw
  ``transmit(bytes) -> bytes`` link; encodes commands in short or extended
  form and splits the answer.
* :class:`ResponseChaining`: completes ``61xx`` with GET RESPONSE and re-sends
  on ``6Cxx`` with the Le the card asked for.
* :class:`CommandChaining`: splits a command too long for a short APDU into
  an ISO 7816-4 chain.
* :class:`SecureMessaging`: wraps each command and unwraps each answer with a
  secure channel (an SCP03 :class:`~cardcore.scp03.HostChannel`).

The usual order, top to bottom, is
``CommandChaining -> SecureMessaging -> ResponseChaining -> ApduFormatter``:
GlobalPlatform protects each command of a chain on its own, the R-MAC covers
the whole answer (so the pieces are joined below the channel), and GET
RESPONSE goes to the card without secure messaging. :func:`apdu_link` builds
the two bottom layers, which every stack has; command chaining is needed
only over a link that takes short APDUs alone.

No cryptography is imported here: the secure channel comes in as an object,
so the card agent (which relays commands already wrapped by the server) uses
this module without the server's dependencies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Final, Protocol

from cardcore.apdu import (
    SHORT_MAX_DATA,
    SHORT_MAX_NE,
    ApduError,
    CommandApdu,
    ResponseApdu,
    chain_command,
    parse_command,
)
from cardcore.ins import Ins
from cardcore.sw import SW

Transmit = Callable[[bytes], bytes]

SW1_BYTES_REMAINING: Final = SW.BYTES_REMAINING >> 8
SW1_WRONG_LE: Final = 0x6C
# A card that keeps answering 61xx must not keep the host looping forever.
MAX_GET_RESPONSE_ROUNDS: Final = 256


class ResponseChainingError(ApduError):
    """The card kept handing out its answer in pieces past any sensible length."""


class ApduProcessor(ABC):
    """One layer of the stack: ``send`` a command, get the card's (processed) answer.

    Every processor is also a transmit object (:meth:`transmit`), so a stack
    goes wherever a ``transmit(bytes) -> bytes`` function is expected.
    """

    @abstractmethod
    def send(self, command: CommandApdu) -> ResponseApdu:
        """Send ``command`` through this layer and the ones below it."""

    def transmit(self, apdu: bytes) -> bytes:
        """Bytes in, bytes out; a malformed command raises :class:`ApduError` unsent."""
        return self.send(parse_command(apdu)).encode()


class ApduFormatter(ApduProcessor):
    """Encodes commands for a raw link and parses its answers.

    ``extended_length`` says whether the link (reader and card) takes
    extended APDUs. When it does, each command goes in the form it carries
    (the SCP03 C-MAC covers Lc as sent, so the form is not ours to change);
    when it does not, a command in extended form is refused before it
    reaches the card: put :class:`CommandChaining` above to split long data.
    """

    def __init__(self, link: Transmit, *, extended_length: bool = True) -> None:
        self.link = link
        self.extended_length = extended_length

    def send(self, command: CommandApdu) -> ResponseApdu:
        if command.extended and not self.extended_length:
            raise ApduError(f"{command!r} needs extended length, which this link does not take")
        return ResponseApdu.parse(self.link(command.encode()))


class ResponseChaining(ApduProcessor):
    """Hides ISO 7816-4 response procedure status words from the layers above.

    ``6Cxx``: the card wants Le = xx; the command is sent again with it.
    ``61xx``: xx more bytes wait; GET RESPONSE (on the command's logical
    channel, without secure messaging bits) fetches them until the card
    says something else, and the pieces come back as one answer.
    """

    def __init__(self, next_processor: ApduProcessor, *,
                 max_rounds: int = MAX_GET_RESPONSE_ROUNDS) -> None:
        self.next = next_processor
        self.max_rounds = max_rounds

    def send(self, command: CommandApdu) -> ResponseApdu:
        response = self.next.send(command)
        if response.sw1 == SW1_WRONG_LE:
            response = self.next.send(command.replace(ne=response.sw2 or SHORT_MAX_NE))
        if response.sw1 != SW1_BYTES_REMAINING:
            return response
        collected = bytearray(response.data)
        for _ in range(self.max_rounds):
            response = self.next.send(get_response_command(command.cla, response.sw2))
            collected += response.data
            if response.sw1 != SW1_BYTES_REMAINING:
                return ResponseApdu(bytes(collected), response.sw)
        raise ResponseChainingError(
            f"card still answering 61xx after {self.max_rounds} GET RESPONSEs")


class CommandChaining(ApduProcessor):
    """Sends a command whose data does not fit one short APDU as a command chain.

    Every link but the last carries the chaining bit and no Le; a link the
    card does not accept with ``9000`` ends the chain, and its answer is the
    command's. Commands that fit go down unchanged.
    """

    def __init__(self, next_processor: ApduProcessor, *,
                 max_data: int = SHORT_MAX_DATA) -> None:
        self.next = next_processor
        self.max_data = max_data

    def send(self, command: CommandApdu) -> ResponseApdu:
        if len(command.data) <= self.max_data:
            return self.next.send(command)
        *links, last = chain_command(command, self.max_data)
        for link in links:
            response = self.next.send(link)
            if response.sw != SW.OK:
                return response
        return self.next.send(last)


class Channel(Protocol):
    """A host end of a secure channel, as :class:`SecureMessaging` uses it."""

    def wrap_command(self, command: CommandApdu) -> CommandApdu: ...

    def unwrap(self, response: bytes) -> tuple[bytes, int]: ...


class SecureMessaging(ApduProcessor):
    """Protects every command with ``channel`` and checks and opens every answer.

    The channel raises when an answer does not verify (an SCP03 R-MAC); that
    error goes up to the caller unchanged, since what follows is its call.
    """

    def __init__(self, next_processor: ApduProcessor, channel: Channel) -> None:
        self.next = next_processor
        self.channel = channel

    def send(self, command: CommandApdu) -> ResponseApdu:
        response = self.next.send(self.channel.wrap_command(command))
        data, sw = self.channel.unwrap(response.encode())
        return ResponseApdu(data, sw)


def logical_channel(cla: int) -> int:
    """The logical channel coded in an inter-industry or GlobalPlatform CLA."""
    if cla & 0x40:
        return 4 + (cla & 0x0F)
    return cla & 0x03


def get_response_command(cla: int, sw2: int) -> CommandApdu:
    """GET RESPONSE for ``sw2`` bytes (0: 256) on the logical channel of ``cla``."""
    channel = logical_channel(cla)
    get_cla = channel if channel < 4 else 0x40 | (channel - 4)
    return CommandApdu(get_cla, Ins.GET_RESPONSE, 0x00, 0x00, ne=sw2 or SHORT_MAX_NE)


def apdu_link(link: Transmit, *, extended_length: bool = True) -> ApduProcessor:
    """The two layers every stack has over a raw link: formatting, then response chaining."""
    return ResponseChaining(ApduFormatter(link, extended_length=extended_length))
