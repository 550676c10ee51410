"""The SCP03 "i" parameter (Amendment D §5.1, Table 5-1): which security levels a card
offers, and which "i" values are defined."""

from __future__ import annotations

import pytest

from cardcore.scp03 import (
    VALID_SECURITY_LEVELS,
    Scp03Error,
    check_i_parameter,
    describe_i,
    offered_security_levels,
)

BASE = {0x00, 0x01, 0x03}


@pytest.mark.parametrize("i, levels", [
    (0x00, BASE),                                   # random challenge, no R-MAC, no R-ENC
    (0x10, BASE),                                   # pseudo-random, no R-MAC, no R-ENC
    (0x20, BASE | {0x11, 0x13}),                    # R-MAC
    (0x30, BASE | {0x11, 0x13}),
    (0x60, BASE | {0x11, 0x13, 0x33}),              # R-MAC and R-ENCRYPTION
    (0x70, BASE | {0x11, 0x13, 0x33}),
    (0x71, BASE | {0x11, 0x13, 0x33}),              # S16 changes no level
    (0x40, BASE),                                   # R-ENC without R-MAC: RFU, nothing more
    (0x50, BASE),
])
def test_offered_levels_follow_b6_and_b7(i: int, levels: set[int]) -> None:
    offered = offered_security_levels(i)
    assert offered == levels
    assert offered <= VALID_SECURITY_LEVELS


@pytest.mark.parametrize("i", [0x00, 0x01, 0x10, 0x11, 0x20, 0x30, 0x60, 0x70, 0x71])
def test_defined_i_values_are_accepted(i: int) -> None:
    assert check_i_parameter(i) == i


@pytest.mark.parametrize("i, problem", [
    (0x40, "without R-MAC"), (0x50, "without R-MAC"), (0x02, "RFU bits"),
    (0x80, "RFU bits"), (0x0C, "RFU bits"), (0x100, "one byte"), (-1, "one byte"),
])
def test_undefined_i_values_are_refused_with_the_reason(i: int, problem: str) -> None:
    with pytest.raises(Scp03Error, match=problem):
        check_i_parameter(i)


def test_describe_names_each_option() -> None:
    assert describe_i(0x10) == "i=10 (pseudo-random challenge, no R-MAC, no R-ENCRYPTION)"
    assert describe_i(0x30) == "i=30 (pseudo-random challenge, R-MAC, no R-ENCRYPTION)"
    assert describe_i(0x60) == "i=60 (random challenge, R-MAC, R-ENCRYPTION)"
    assert describe_i(0x71).endswith("R-ENCRYPTION, S16)")
