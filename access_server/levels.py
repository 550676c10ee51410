"""Which SCP03 security level a card's channel opens at: the card's "i" and the policy.

A card says in its INITIALIZE UPDATE answer which response protections it
offers (``cardcore.scp03.offered_security_levels``: C-MAC and C-DECRYPTION
always; R-MAC and R-ENCRYPTION by its "i"). A card asked for a level it does
not offer refuses EXTERNAL AUTHENTICATE, and would refuse it at every
contact, so the level is chosen per card from what it announces:

- ``security_level`` (``card_channel.security_level``): ``highest`` (the
  default), the highest level the card offers; or a level, the highest the
  card offers within it (``13``: never R-ENCRYPTION, say, to spare the
  card's time);
- ``minimum`` (``card_channel.minimum_security_level``, default 03: C-MAC
  and C-DECRYPTION): what every channel must have at least. A card whose "i"
  offers less gets no channel (``access_server.outcomes.SECURITY_LEVEL``).

Levels are sets of protections, not numbers: 03 (C-MAC, C-DECRYPTION) and 11
(C-MAC, R-MAC) are not above each other, and "at least 03" means "with C-MAC
and C-DECRYPTION". The "i" byte is not covered by the card cryptogram, so an
agent can make a card look weaker than it is; the minimum is what holds
whatever the card (or the agent) announces.
"""

from __future__ import annotations

from dataclasses import dataclass

from cardcore.scp03 import VALID_SECURITY_LEVELS, offered_security_levels

HIGHEST = "highest"
DEFAULT_MINIMUM = 0x03
LOWEST_MINIMUM = 0x01
"""A channel without C-MAC (level 00) would take any command an agent adds to it."""

NAMES = {0x00: "no secure messaging", 0x01: "C-MAC", 0x03: "C-MAC, C-DECRYPTION",
         0x11: "C-MAC, R-MAC", 0x13: "C-MAC, C-DECRYPTION, R-MAC",
         0x33: "C-MAC, C-DECRYPTION, R-MAC, R-ENCRYPTION"}


def level_name(level: int) -> str:
    """``'13 (C-MAC, C-DECRYPTION, R-MAC)'``."""
    return f"{level:02X} ({NAMES.get(level, 'not a level')})"


def covers(level: int, minimum: int) -> bool:
    """Whether ``level`` has every protection of ``minimum``."""
    return level & minimum == minimum


@dataclass(frozen=True)
class LevelPolicy:
    """The configured minimum and choice; ``cap`` None means the highest the card offers."""

    minimum: int = DEFAULT_MINIMUM
    cap: int | None = None

    def __post_init__(self) -> None:
        for level in (self.minimum, self.cap):
            if level is not None and level not in VALID_SECURITY_LEVELS:
                raise ValueError(f"0x{level:02X} is not an SCP03 security level")
        if not covers(self.minimum, LOWEST_MINIMUM):
            raise ValueError("the minimum must include C-MAC (at least 01)")
        if self.cap is not None and not covers(self.cap, self.minimum):
            raise ValueError(f"security level {level_name(self.cap)} lacks a protection "
                             f"of the minimum {level_name(self.minimum)}")

    def choose(self, i: int) -> int:
        """The level for a card announcing ``i``: the highest it offers within the cap.

        It may fall short of the minimum; ``acceptable`` says so.
        """
        allowed = [level for level in offered_security_levels(i)
                   if self.cap is None or covers(self.cap, level)]
        return max(allowed, key=lambda level: (bin(level).count("1"), level))

    def acceptable(self, level: int) -> bool:
        return covers(level, self.minimum)

    def describe(self) -> str:
        """The settings, as an operator writes them."""
        choice = HIGHEST if self.cap is None else f"{self.cap:02X}"
        return (f"card_channel.minimum_security_level={self.minimum:02X}, "
                f"card_channel.security_level={choice}")


def parse_level(value: object, where: str) -> int:
    """A level from the configuration: hex text (``'13'``, ``'0x33'``) or an int (YAML
    reads ``0x13`` as 19). ValueError naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: a security level in hex, e.g. '03' or '33'")
    if isinstance(value, int):
        level = value
    elif isinstance(value, str):
        digits = value.strip().lower().removeprefix("0x")
        if not digits or len(digits) > 2 or any(c not in "0123456789abcdef" for c in digits):
            raise ValueError(f"{where}: {value!r} is not a security level in hex "
                             f"(one of 01, 03, 11, 13, 33)")
        level = int(digits, 16)
    else:
        raise ValueError(f"{where}: a security level in hex, e.g. '03' or '33'")
    if level not in VALID_SECURITY_LEVELS:
        hint = (" (YAML read a decimal number: write the level in quotes, e.g. '13')"
                if isinstance(value, int) else "")
        raise ValueError(f"{where}: {value!r} is not an SCP03 security level: one of 01, 03, "
                         f"11, 13, 33{hint}")
    return level
