"""PERSONALIZE on the virtual card (docs/issuance-applet.md): the issuer's signature, then
the binding, and only then the device key decrypts; anything wrong leaves the card file
byte for byte as it was.

The payloads are built here as the issuer HSM builds them (cardcore.personalization),
with a software issuer key injected at initialization and a software user key; the
proxy's own payloads are its tests' business.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import issuance as I
from cardcore import personalization as P
from cardcore import pin_block
from cardcore import tlv as T
from cardcore.apdu import parse_response
from cardcore.issuance import SECP256K1_ORDER, CardData
from cardcore.sw import SW
from tests.virtual_psd.issuance_host import (
    DEVICE_AUTH_POINT,
    ISSUER_POINT,
    USER_KEY,
    bundle,
    initialized_card,
    make_payload,
    open_card,
    select_applet,
    sign_payload,
)
from tests.virtual_psd.test_issuance_applet import applet_session
from virtual_psd.faults import POWER_LOSS, TEAR, CardPowerLost, FaultPlan
from virtual_psd.issuance import IssuanceState, issuance_state
from virtual_psd.state import StateError, load_state

SERIAL_B = "CMS-0002"
ISSUANCE_ID = b"\x5A" * 16
OTHER_ISSUER = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two initialized cards of the same issuer, A (SERIAL) and B (SERIAL_B)."""
    base = tmp_path_factory.mktemp("personalize")
    yield {"A": initialized_card(base / "a.json"),
           "B": initialized_card(base / "b.json", SERIAL_B, "4790504012340000BBBB")}


@pytest.fixture
def cards(templates: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """This test's own copies of the template cards."""
    return {name: Path(shutil.copy(path, tmp_path)) for name, path in templates.items()}


@pytest.fixture
def card_a(cards: dict[str, Path]) -> Path:
    return cards["A"]


def _data(path: Path) -> CardData:
    return select_applet(open_card(path))


def _personalize(path: Path, payload: bytes) -> int:
    card = open_card(path)
    select_applet(card)
    return parse_response(card.transmit(I.personalize(payload)))[1]


def _refused(path: Path, payload: bytes) -> int:
    """PERSONALIZE's status word, asserting the card file did not change by a byte."""
    before = path.read_bytes()
    sw = _personalize(path, payload)
    assert path.read_bytes() == before
    return sw


def _fields(payload: bytes) -> list[T.Tlv]:
    return T.parse_tlvs(payload[1:])


def _edit(payload: bytes, tag: int, change: Callable[[bytes], bytes]) -> bytes:
    """``payload`` with the value of ``tag`` changed, not signed again."""
    return bytes((payload[0],)) + b"".join(
        T.tlv(f.tag, change(f.value) if f.tag == tag else f.value) for f in _fields(payload))


def _flip_first(value: bytes) -> bytes:
    """One bit of the first byte: a serial stays a serial, a sequence stays above 0."""
    return bytes((value[0] ^ 0x01,)) + value[1:]


def _flip_last(value: bytes) -> bytes:
    return value[:-1] + bytes((value[-1] ^ 0x01,))


def test_a_payload_personalizes_the_card_in_one_commit(card_a: Path) -> None:
    data = _data(card_a)
    before = issuance_state(load_state(card_a))
    assert _personalize(card_a, make_payload(data, issuance_id=ISSUANCE_ID, sequence=7)) == SW.OK
    after = issuance_state(load_state(card_a))
    assert after.life_cycle is I.LifeCycle.PERSONALIZED
    assert (after.user_private_key, after.device_auth_public_key) == (USER_KEY, DEVICE_AUTH_POINT)
    assert (after.pin, after.puk) == (b"123456", b"12345678")
    assert (after.pin_tries, after.puk_tries) == (I.PIN_TRIES, I.PUK_TRIES)
    assert (after.issuance_id, after.sequence) == (ISSUANCE_ID, 7)
    # What initialization made is untouched, and GET DATA shows the new life cycle only.
    assert after.device_private_key == before.device_private_key
    assert after.signed_device_key == before.signed_device_key
    assert _data(card_a) == data._replace(life_cycle=I.LifeCycle.PERSONALIZED)


def test_a_payload_passes_through_a_secure_channel_too(card_a: Path) -> None:
    card = open_card(card_a)
    data = select_applet(card)
    session = applet_session(card)
    assert session.send(I.personalize(make_payload(data))) == (b"", SW.OK)
    assert issuance_state(load_state(card_a)).life_cycle is I.LifeCycle.PERSONALIZED


def test_the_payload_applied_is_recognized_and_any_other_refused(card_a: Path) -> None:
    data = _data(card_a)
    payload = make_payload(data, issuance_id=ISSUANCE_ID, sequence=3)
    assert _personalize(card_a, payload) == SW.OK
    # A bureau resuming: this very payload again is "done by this payload".
    assert _refused(card_a, payload) == SW.ALREADY_EXISTS
    assert I.personalize_answer(SW.ALREADY_EXISTS).done
    # Any other: personalized by another payload (newer, older, same sequence, other id).
    for other in (make_payload(data, issuance_id=ISSUANCE_ID, sequence=4),
                  make_payload(data, issuance_id=ISSUANCE_ID, sequence=2),
                  make_payload(data, issuance_id=b"\x01" * 16, sequence=3)):
        sw = _refused(card_a, other)
        assert sw == SW.CONDITIONS_NOT_SATISFIED and not I.personalize_answer(sw).done


def test_a_payload_for_card_a_is_refused_by_card_b(cards: dict[str, Path]) -> None:
    card_a, card_b = cards["A"], cards["B"]
    a, b = _data(card_a), _data(card_b)
    assert a.device_public_key is not None
    for_a = make_payload(a)
    assert _refused(card_b, for_a) == SW.REFERENCED_DATA_NOT_FOUND
    # B's serial on A's device key: the fingerprint gives it away.
    mixed = make_payload(b, fingerprint=P.device_key_fingerprint(a.device_public_key))
    assert _refused(card_b, mixed) == SW.REFERENCE_DATA_NOT_USABLE
    assert _personalize(card_a, for_a) == SW.OK


def test_a_sequence_not_above_the_highest_accepted_is_refused(card_a: Path) -> None:
    """The card keeps the highest sequence it accepted; an initialized card that holds one
    (written here by hand: no command leaves a card so) takes only a higher one."""
    data = _data(card_a)
    obj = json.loads(card_a.read_text())
    obj["applets"][I.ISSUANCE_AID.hex().upper()]["sequence"] = 5
    card_a.write_text(json.dumps(obj))
    for sequence in (1, 5):
        assert _refused(card_a, make_payload(data, sequence=sequence)) == \
            SW.CONDITIONS_NOT_SATISFIED
    assert _personalize(card_a, make_payload(data, sequence=6)) == SW.OK
    assert issuance_state(load_state(card_a)).sequence == 6


def _bad_payloads(data: CardData) -> dict[str, tuple[bytes, int]]:
    """Every way a payload is wrong, each with the status word it must get."""
    good = make_payload(data)
    signed = P.decode_payload(good).signed
    other_card = data._replace(serial=SERIAL_B)
    bad_user = bundle(user_key=SECP256K1_ORDER.to_bytes(32, "big"))
    off_curve = bundle(device_auth=_flip_last(DEVICE_AUTH_POINT))
    cases: dict[str, tuple[bytes, int]] = {
        "version 02": (b"\x02" + good[1:], SW.WRONG_DATA),
        "no version": (good[1:], SW.WRONG_DATA),
        "truncated by one byte": (good[:-1], SW.WRONG_DATA),
        "truncated by half": (good[:len(good) // 2], SW.WRONG_DATA),
        "without its signature": (signed, SW.WRONG_DATA),
        "a byte after it": (good + b"\x00", SW.WRONG_DATA),
        "two fields swapped": (bytes((good[0],)) + b"".join(
            T.tlv(f.tag, f.value) for f in (_fields(good)[1], _fields(good)[0],
                                            *_fields(good)[2:])), SW.WRONG_DATA),
        "signature altered": (_edit(good, P.TAG_SIGNATURE, _flip_last),
                              SW.SECURITY_STATUS_NOT_SATISFIED),
        "signed by another issuer": (make_payload(data, issuer=OTHER_ISSUER),
                                     SW.SECURITY_STATUS_NOT_SATISFIED),
        "another issuer's signature under this issuer's key id": (
            sign_payload(signed, OTHER_ISSUER), SW.SECURITY_STATUS_NOT_SATISFIED),
        "for another serial, signed": (make_payload(other_card), SW.REFERENCED_DATA_NOT_FOUND),
        "for another device key, signed": (make_payload(data, fingerprint=b"\x00" * 32),
                                           SW.REFERENCE_DATA_NOT_USABLE),
        "ciphertext not for this device key, signed": (
            _resealed(data, bytes(range(256))), SW.WRONG_DATA),
        "secrets malformed, signed": (make_payload(data, plaintext=T.tlv(P.TAG_USER_KEY, USER_KEY)),
                                      SW.WRONG_DATA),
        "user key out of range, signed": (make_payload(data, plaintext=_bundle_bytes(bad_user)),
                                          SW.WRONG_DATA),
        "user key zero, signed": (make_payload(data, plaintext=_bundle_bytes(
            bundle(user_key=bytes(32)))), SW.WRONG_DATA),
        "device authentication key off P-256, signed": (
            make_payload(data, plaintext=_bundle_bytes(off_curve)), SW.WRONG_DATA),
        "PIN not digits, signed": (make_payload(data, plaintext=_bundle_bytes(
            bundle(pin=b"12a456"))), SW.WRONG_DATA),
    }
    # Each signed field altered after signing: the signature no longer covers it.
    for tag, name in ((P.TAG_SERIAL, "serial"), (P.TAG_DEVICE_KEY_FINGERPRINT, "fingerprint"),
                      (P.TAG_ISSUANCE_ID, "issuance id"), (P.TAG_SEQUENCE, "sequence"),
                      (P.TAG_ISSUER_KEY_ID, "issuer key id"),
                      (P.TAG_CIPHERTEXT, "ciphertext")):
        cases[f"{name} altered"] = (_edit(good, tag, _flip_first),
                                    SW.SECURITY_STATUS_NOT_SATISFIED)
    return cases


def _bundle_bytes(secrets: P.SecretBundle) -> bytes:
    """A bundle encoded without the encoder's checks (for secrets a card must refuse)."""
    parts = [T.tlv(P.TAG_USER_KEY, secrets.user_private_key),
             T.tlv(P.TAG_DEVICE_AUTH_KEY, secrets.device_auth_public_key)]
    if secrets.pin is not None and secrets.puk is not None:
        parts += [T.tlv(P.TAG_PIN, secrets.pin), T.tlv(P.TAG_PUK, secrets.puk)]
    return b"".join(parts)


def _resealed(data: CardData, ciphertext: bytes) -> bytes:
    """A payload signed by the issuer whose ciphertext is ``ciphertext`` as it stands."""
    binding = P.decode_payload(make_payload(data)).binding
    return sign_payload(P.signed_part(binding, ciphertext))


@pytest.fixture(scope="module")
def bad_payloads(templates: dict[str, Path]) -> dict[str, tuple[bytes, int]]:
    return _bad_payloads(_data(templates["A"]))


CASE_NAMES = [
    "version 02", "no version", "truncated by one byte", "truncated by half",
    "without its signature", "a byte after it", "two fields swapped", "signature altered",
    "signed by another issuer", "another issuer's signature under this issuer's key id",
    "for another serial, signed", "for another device key, signed",
    "ciphertext not for this device key, signed", "secrets malformed, signed",
    "user key out of range, signed", "user key zero, signed",
    "device authentication key off P-256, signed", "PIN not digits, signed",
    "serial altered", "fingerprint altered", "issuance id altered", "sequence altered",
    "issuer key id altered", "ciphertext altered",
]


def test_every_case_is_named(bad_payloads: dict[str, tuple[bytes, int]]) -> None:
    assert sorted(bad_payloads) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_wrong_payload_is_refused_and_changes_nothing(
        card_a: Path, bad_payloads: dict[str, tuple[bytes, int]], name: str) -> None:
    payload, sw = bad_payloads[name]
    assert _refused(card_a, payload) == sw
    assert issuance_state(load_state(card_a)).life_cycle is I.LifeCycle.INITIALIZED
    # The card is as good as before: the right payload still personalizes it.
    assert _personalize(card_a, make_payload(_data(card_a))) == SW.OK


def test_personalize_needs_an_initialized_card_and_its_form(state_path: Path,
                                                           card_a: Path) -> None:
    data = _data(card_a)
    # A factory card holds no issuer key yet: refused before anything is parsed.
    assert _refused(state_path, make_payload(data)) == SW.CONDITIONS_NOT_SATISFIED
    card = open_card(card_a)
    select_applet(card)
    before = card_a.read_bytes()
    payload = make_payload(data)
    assert parse_response(card.transmit(I.command(I.IssuanceIns.PERSONALIZE, 0x01, 0x00,
                                                  payload)))[1] == SW.INCORRECT_P1P2
    assert parse_response(card.transmit(I.command(I.IssuanceIns.PERSONALIZE)))[1] == \
        SW.WRONG_LENGTH
    assert parse_response(card.transmit(I.command(I.IssuanceIns.PERSONALIZE,
                                                  data=b"\x01" * (P.MAX_PAYLOAD + 1))))[1] == \
        SW.WRONG_DATA
    assert card_a.read_bytes() == before
    with pytest.raises(I.IssuanceError):
        I.personalize(b"")


# power lost at every APDU of a personalization -----------------------------------------

# SELECT, GET DATA DF00, PERSONALIZE, GET DATA DF01.
RUN_APDUS = 4
PERSONALIZE_APDU = 3


def _run(path: Path, payload: bytes, faults: FaultPlan | None = None) -> int:
    card = open_card(path, faults)
    select_applet(card)
    sw = parse_response(card.transmit(I.personalize(payload)))[1]
    assert parse_response(card.transmit(I.get_data(I.Tag.LIFE_CYCLE)))[1] == SW.OK
    return sw


@pytest.mark.parametrize("kind", [POWER_LOSS, TEAR])
@pytest.mark.parametrize("at", range(1, RUN_APDUS + 1))
def test_power_lost_at_any_apdu_personalizes_wholly_or_not_at_all(
        card_a: Path, kind: str, at: int) -> None:
    data = _data(card_a)
    initialized = issuance_state(load_state(card_a))
    payload = make_payload(data, issuance_id=ISSUANCE_ID)
    with pytest.raises(CardPowerLost) as lost:
        _run(card_a, payload, FaultPlan().add(kind, at))
    assert lost.value.apdu_number == at
    stored = issuance_state(load_state(card_a))
    done = at > PERSONALIZE_APDU or (kind == TEAR and at == PERSONALIZE_APDU)
    if done:
        assert stored == _personalized(initialized)
    else:
        assert stored == initialized
    # The bureau sends the same payload again: done now, or done before.
    assert _run(card_a, payload) == (SW.ALREADY_EXISTS if done else SW.OK)
    assert issuance_state(load_state(card_a)) == _personalized(initialized)


def _personalized(initialized: IssuanceState) -> IssuanceState:
    return IssuanceState(**{**initialized.__dict__, **dict(
        life_cycle=I.LifeCycle.PERSONALIZED, user_private_key=USER_KEY,
        device_auth_public_key=DEVICE_AUTH_POINT, pin=b"123456", puk=b"12345678",
        issuance_id=ISSUANCE_ID, sequence=1)})


def test_the_personalized_section_round_trips_and_a_broken_one_is_refused(
        card_a: Path) -> None:
    assert _personalize(card_a, make_payload(_data(card_a))) == SW.OK
    section = issuance_state(load_state(card_a))
    assert IssuanceState.from_json(json.loads(json.dumps(section.to_json()))) == section
    for change in ({"user_private_key": None}, {"pin": None}, {"pin_tries": 4},
                   {"puk_tries": -1}, {"sequence": "1"}):
        broken = {**section.to_json(), **change}
        with pytest.raises(StateError, match="malformed issuance section"):
            IssuanceState.from_json(broken)
    assert ISSUER_POINT == section.issuer_public_key


# SELECT, GET DATA DF00, PERSONALIZE, GET CHALLENGE, SET PIN.
BUREAU_APDUS = 5
SET_PIN_APDU = 5


def _bureau(path: Path, payload: bytes, faults: FaultPlan | None = None) -> tuple[int, int]:
    """The bureau making PIN and PUK itself (claim 5): PERSONALIZE's answer, SET PIN's."""
    card = open_card(path, faults)
    data = select_applet(card)
    assert data.device_public_key is not None
    personalized = parse_response(card.transmit(I.personalize(payload)))[1]
    challenge, sw = parse_response(card.transmit(I.get_challenge()))
    assert sw == SW.OK
    block = pin_block.set_pin(data.device_public_key, challenge, b"2468", b"97531864")
    return personalized, parse_response(card.transmit(block))[1]


@pytest.mark.parametrize("kind", [POWER_LOSS, TEAR])
@pytest.mark.parametrize("at", range(1, BUREAU_APDUS + 1))
def test_a_bureau_run_cut_at_any_apdu_resumes_to_one_personalization(
        card_a: Path, kind: str, at: int) -> None:
    payload = make_payload(_data(card_a), bundle(None, None), issuance_id=ISSUANCE_ID)
    with pytest.raises(CardPowerLost):
        _bureau(card_a, payload, FaultPlan().add(kind, at))
    personalized = at > PERSONALIZE_APDU or (kind == TEAR and at == PERSONALIZE_APDU)
    pin_set = kind == TEAR and at == SET_PIN_APDU
    # Resumed as docs/issuance-applet.md says: the same payload, the same PIN and PUK.
    assert _bureau(card_a, payload) == (
        SW.ALREADY_EXISTS if personalized else SW.OK,
        SW.CONDITIONS_NOT_SATISFIED if pin_set else SW.OK)
    state = issuance_state(load_state(card_a))
    assert (state.life_cycle, state.issuance_id) == (I.LifeCycle.PERSONALIZED, ISSUANCE_ID)
    assert (state.pin, state.puk) == (b"2468", b"97531864")
