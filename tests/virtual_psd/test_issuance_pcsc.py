"""The issuance applet through a real PC/SC stack (private pcscd, vpcd, pyscard).

A whole provider initialization, then GET DATA DF00 of the initialized
card: certificates go in as extended APDUs and the card's data (some 1,700
bytes) comes back in one answer to an extended Le, over the real link; then
personalization and a signature behind the PIN.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import gp, pin_block
from cardcore import issuance as I
from cardcore import tlv as T
from cardcore.initialization import verify_signed_device_key
from cardcore.sw import SW
from tests.support.pcsc import PrivatePcscd, transmit_fn
from tests.virtual_psd.conftest import PSD_ID, send
from tests.virtual_psd.issuance_host import (
    ISSUER_POINT,
    SERIAL,
    USER_KEY,
    SoftwareProvider,
    make_payload,
)
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.issuance import issuance_state
from virtual_psd.vpcd import run

pytestmark = pytest.mark.pcsc


@pytest.fixture
def reader(private_pcscd: PrivatePcscd, tmp_path: Any) -> Iterator[tuple[VirtualCard, Any]]:
    path = tmp_path / "card.json"
    create_card(path, psd_id=PSD_ID)
    card = VirtualCard.open(path)
    private_pcscd.wait_for_card(False)  # the slot's card of an earlier module has gone
    server = run(card, "127.0.0.1", private_pcscd.vpcd_port)
    private_pcscd.wait_for_card(True)
    conn = private_pcscd.connect(slot=0)
    try:
        yield card, transmit_fn(conn)
    finally:
        with contextlib.suppress(Exception):
            conn.disconnect()
        with contextlib.suppress(Exception):
            conn.release()
        server.stop()
        private_pcscd.wait_for_card(False)


def test_initialization_and_the_long_answers_over_pcsc(reader: tuple[VirtualCard, Any]) -> None:
    card, transmit = reader
    result = SoftwareProvider(transmit).initialize(SERIAL, ISSUER_POINT)
    assert result.card.life_cycle is I.LifeCycle.INITIALIZED
    assert issuance_state(card.state).life_cycle is I.LifeCycle.INITIALIZED
    # Read back plain, as anyone may.
    assert send(transmit, gp.select_command(I.ISSUANCE_AID))[1] == SW.OK
    data, sw = send(transmit, I.get_data(I.Tag.ALL))
    assert sw == SW.OK and len(data) > 1000
    held = I.decode_card_data(data)
    assert held == result.card
    verify_signed_device_key(held)
    assert send(transmit, I.get_data(I.Tag.DEVICE_CERTIFICATE)) == \
        (T.tlv(I.Tag.DEVICE_CERTIFICATE, held.device_certificate or b""), SW.OK)


def test_personalization_and_a_signature_behind_the_pin_over_pcsc(
        reader: tuple[VirtualCard, Any]) -> None:
    """PERSONALIZE (some 400 bytes), then 256-byte PIN blocks, as extended APDUs over the
    real link; the signature verifies with the user's public key."""
    card, transmit = reader
    SoftwareProvider(transmit).initialize(SERIAL, ISSUER_POINT)
    assert send(transmit, gp.select_command(I.ISSUANCE_AID))[1] == SW.OK
    held = I.decode_card_data(send(transmit, I.get_data(I.Tag.ALL))[0])
    assert held.device_public_key is not None
    assert send(transmit, I.personalize(make_payload(held))) == (b"", SW.OK)
    challenge, sw = send(transmit, I.get_challenge())
    assert sw == SW.OK
    assert send(transmit, pin_block.verify_pin(held.device_public_key, challenge,
                                               b"123456")) == (b"", SW.OK)
    signature, sw = send(transmit, I.sign(hashlib.sha256(b"over pcsc").digest()))
    assert sw == SW.OK
    ec.derive_private_key(int.from_bytes(USER_KEY, "big"), ec.SECP256K1()).public_key() \
        .verify(signature, b"over pcsc", ec.ECDSA(hashes.SHA256()))
    assert issuance_state(card.state).life_cycle is I.LifeCycle.PERSONALIZED
