"""Power lost at every APDU of a provider initialization, before it or during it.

The card is always either in ``factory`` (and a fresh initialization then
succeeds) or fully ``initialized``, never between: each command commits in
one atomic write, and only ACTIVATE, which checks that everything is there,
leaves ``factory``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cardcore import issuance as I
from cardcore.initialization import verify_signed_device_key
from tests.virtual_psd.conftest import PSD_ID
from tests.virtual_psd.issuance_host import ISSUER_POINT, SERIAL, SoftwareProvider
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.faults import POWER_LOSS, TEAR, CardPowerLost, FaultPlan
from virtual_psd.issuance import (
    IssuanceState,
    device_public_key,
    is_complete,
    issuance_state,
    issuer_auth_public_key,
)
from virtual_psd.state import load_state

# SELECT, GET DATA, INITIALIZE UPDATE, EXTERNAL AUTHENTICATE, GENERATE KEYS, PUT serial,
# PUT issuer key, PUT two certificates, CERTIFY DEVICE KEY, ACTIVATE, GET DATA.
RUN_APDUS = 12
PUT_ISSUER_KEY = 7
ACTIVATE = 11


def _card(path: Path, faults: FaultPlan | None = None) -> VirtualCard:
    card = VirtualCard.open(path, faults=faults)
    card.power_on()
    return card


def _check_whole(section: IssuanceState) -> None:
    """An initialized section holds everything, and it hangs together."""
    assert is_complete(section)
    device, iak = device_public_key(section), issuer_auth_public_key(section)
    assert device is not None and iak is not None
    assert device.modulus in (section.device_certificate or b"")
    assert iak in (section.issuer_auth_certificate or b"")
    verify_signed_device_key(I.CardData(
        section.life_cycle, section.serial, device, iak, section.issuer_public_key,
        section.device_certificate, section.issuer_auth_certificate,
        section.signed_device_key))


def test_a_whole_run_is_twelve_apdus(state_path: Path) -> None:
    card = _card(state_path)
    SoftwareProvider(card.transmit).initialize(SERIAL, ISSUER_POINT)
    assert card.apdu_count == RUN_APDUS


@pytest.mark.parametrize("kind", [POWER_LOSS, TEAR])
@pytest.mark.parametrize("at", range(1, RUN_APDUS + 1))
def test_power_lost_at_any_apdu_leaves_factory_or_initialized(
        tmp_path: Path, kind: str, at: int) -> None:
    path = tmp_path / "card.json"
    create_card(path, psd_id=PSD_ID)
    card = _card(path, FaultPlan().add(kind, at))
    with pytest.raises(CardPowerLost) as lost:
        SoftwareProvider(card.transmit).initialize(SERIAL, ISSUER_POINT)
    assert lost.value.apdu_number == at and lost.value.torn is (kind == TEAR)
    stored = issuance_state(load_state(path))
    assert issuance_state(card.state) == stored
    activated = at > ACTIVATE or (kind == TEAR and at == ACTIVATE)
    if activated:
        assert stored.life_cycle is I.LifeCycle.INITIALIZED
        _check_whole(stored)
    else:
        assert stored.life_cycle is I.LifeCycle.FACTORY
    # The issuer key may be held already; the next run sees it and does not put it again.
    holds_issuer_key = at > PUT_ISSUER_KEY or (kind == TEAR and at == PUT_ISSUER_KEY)
    assert (stored.issuer_public_key == ISSUER_POINT) is holds_issuer_key
    card.power_on()
    provider = SoftwareProvider(card.transmit)
    result = provider.initialize(SERIAL, ISSUER_POINT)
    assert result.already is activated
    after = issuance_state(load_state(path))
    assert after.life_cycle is I.LifeCycle.INITIALIZED
    _check_whole(after)
    if not activated:
        assert len(provider.answers) == (10 if holds_issuer_key else 11)
