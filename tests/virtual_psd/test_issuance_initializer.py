"""The host side of provider initialization (cardcore/initialization.py) refuses
what does not check: a card holding another issuer key, an answer that is not
what was put, a signature that does not verify, a card that says no."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import issuance as I
from cardcore.initialization import (
    Answers,
    InitializationError,
    Script,
    drive,
    initialize,
    verify_signed_device_key,
)
from cardcore.sw import SW
from tests.virtual_psd.issuance_host import ISSUER_POINT, SERIAL, SoftwareProvider, issuer_point
from virtual_psd.card import VirtualCard
from virtual_psd.issuance import issuance_state
from virtual_psd.state import load_state


def _card(path: Path) -> VirtualCard:
    card = VirtualCard.open(path)
    card.power_on()
    return card


def test_a_card_holding_another_issuer_key_is_not_initialized(state_path: Path) -> None:
    card = _card(state_path)
    provider = SoftwareProvider(card.transmit)
    flow = initialize(SERIAL, ISSUER_POINT)
    probe = next(flow)
    assert isinstance(probe, Script)
    keys = flow.send(provider.run(probe))
    assert isinstance(keys, Script) and keys.step == "generate keys"
    provider.run(keys)                      # puts this issuer's key...
    flow.close()                            # ...and stops there, as a cut run would
    assert issuance_state(load_state(state_path)).issuer_public_key == ISSUER_POINT
    other = issuer_point(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InitializationError, match="another public issuer key"):
        SoftwareProvider(card.transmit).initialize(SERIAL, other)
    assert issuance_state(load_state(state_path)).life_cycle is I.LifeCycle.FACTORY


def test_an_answer_that_differs_from_what_was_put_is_refused(state_path: Path) -> None:
    card = _card(state_path)
    provider = SoftwareProvider(card.transmit)

    def run(script: Script) -> Answers:
        answers = list(provider.run(script))
        if script.step == "activate":        # the card's data as read back, one byte changed
            data, sw = answers[4]
            answers[4] = (data.replace(SERIAL.encode(), b"CMS-0009"), sw)
        return answers

    with pytest.raises(InitializationError, match="differ from what was put"):
        drive(initialize(SERIAL, ISSUER_POINT), run, provider.root.certificates)


def test_a_refusal_of_the_card_names_the_step_and_its_status(state_path: Path) -> None:
    card = _card(state_path)
    provider = SoftwareProvider(card.transmit)

    def run(script: Script) -> Answers:
        if script.opening is not None:        # a driver that opens a channel below level 33
            script = script._replace(opening=script.opening._replace(security_level=0x13))
        return provider.run(script)

    with pytest.raises(InitializationError) as refused:
        drive(initialize(SERIAL, ISSUER_POINT), run, provider.root.certificates)
    assert refused.value.step == "generate keys"
    assert refused.value.sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert issuance_state(load_state(state_path)).device_private_key is None


def test_a_signed_device_key_that_does_not_verify_is_refused(state_path: Path) -> None:
    card = _card(state_path)
    held = SoftwareProvider(card.transmit).initialize(SERIAL, ISSUER_POINT).card
    verify_signed_device_key(held)
    other_serial = held._replace(serial="CMS-0002")
    with pytest.raises(InitializationError, match="does not verify"):
        verify_signed_device_key(other_serial)
    assert held.signed_device_key is not None
    bad = bytearray(held.signed_device_key)
    bad[-1] ^= 0x01
    with pytest.raises(InitializationError, match="does not verify"):
        verify_signed_device_key(held._replace(signed_device_key=bytes(bad)))


def test_a_malformed_serial_or_issuer_key_is_refused_before_any_command() -> None:
    with pytest.raises(I.IssuanceError):
        next(initialize("bad serial", ISSUER_POINT))
    with pytest.raises(I.IssuanceError):
        next(initialize(SERIAL, ISSUER_POINT[:33]))
