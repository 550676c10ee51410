"""The personalized card in use (docs/issuance-applet.md): PIN and PUK only in blocks
sealed to the device key over the card's one-time challenge, their retry counters
written before each comparison, SIGN behind a PIN verified in this session, and the
card and the issuer authenticating to each other (claims 13 and 14).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore import gp
from cardcore import issuance as I
from cardcore import pin_block as B
from cardcore.apdu import parse_response
from cardcore.issuance import IssuanceIns, LifeCycle
from cardcore.personalization import card_auth_statement, issuer_auth_statement
from cardcore.psd import ISD_AID
from cardcore.sw import SW
from tests.support.scan import assert_absent, card_private_values
from tests.virtual_psd import issuance_host as soft
from tests.virtual_psd.conftest import TRANSPORT
from tests.virtual_psd.issuance_host import DEVICE_AUTH, USER_KEY
from tests.virtual_psd.test_issuance_applet import applet_session
from virtual_psd import issuance as applet
from virtual_psd.card import VirtualCard
from virtual_psd.issuance import UseSession, issuance_state
from virtual_psd.state import load_state

PIN, PUK = b"123456", b"12345678"
USER_PUBLIC = ec.derive_private_key(int.from_bytes(USER_KEY, "big"),
                                    ec.SECP256K1()).public_key()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A card personalized with the HSM's PIN and PUK, one without (the bureau's to set)."""
    base = tmp_path_factory.mktemp("use")
    out = {}
    for name, secrets in (("with pin", soft.bundle()), ("without pin", soft.bundle(None, None))):
        path = soft.initialized_card(base / f"{name}.json")
        card = soft.open_card(path)
        data = soft.select_applet(card)
        assert parse_response(card.transmit(I.personalize(soft.make_payload(data, secrets))))[1] \
            == SW.OK
        out[name] = path
    yield out


@pytest.fixture
def personalized(templates: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copy(templates["with pin"], tmp_path / "card.json"))


@pytest.fixture
def without_pin(templates: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copy(templates["without pin"], tmp_path / "card.json"))


class Holder:
    """The user's PC (or the bureau) on one card: every answer recorded for the scans."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.card = soft.open_card(path)
        self.answers: list[bytes] = []
        self.data = self.select()
        assert self.data.device_public_key is not None
        self.device_key = self.data.device_public_key

    def select(self) -> I.CardData:
        data = soft.select_applet(self.card)
        self.answers.append(self.card.transmit(I.get_data(I.Tag.ALL)))
        return data

    def send(self, apdu: bytes) -> tuple[bytes, int]:
        raw = self.card.transmit(apdu)
        self.answers.append(raw)
        return parse_response(raw)

    def sw(self, apdu: bytes) -> int:
        return self.send(apdu)[1]

    def challenge(self) -> bytes:
        challenge, sw = self.send(I.get_challenge())
        assert sw == SW.OK and len(challenge) == I.CARD_CHALLENGE_LENGTH
        return challenge

    def verify(self, pin: bytes) -> int:
        return self.sw(B.verify_pin(self.device_key, self.challenge(), pin))

    def change(self, pin: bytes, new: bytes) -> int:
        return self.sw(B.change_pin(self.device_key, self.challenge(), pin, new))

    def unblock(self, puk: bytes, new: bytes) -> int:
        return self.sw(B.unblock_pin(self.device_key, self.challenge(), puk, new))

    def sign(self, message: bytes) -> tuple[bytes, int]:
        return self.send(I.sign(hashlib.sha256(message).digest()))

    def use(self) -> UseSession:
        use = self.card.session.app_data[I.ISSUANCE_AID + b"/use"]
        assert isinstance(use, UseSession)
        return use

    def state(self) -> applet.IssuanceState:
        return issuance_state(load_state(self.path))


def _signed_by_user(signature: bytes, message: bytes) -> bool:
    try:
        USER_PUBLIC.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


# PIN and PUK ---------------------------------------------------------------------------


def test_a_verified_pin_lets_the_user_key_sign_and_the_signature_verifies(
        personalized: Path) -> None:
    h = Holder(personalized)
    assert h.sign(b"transfer 1")[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert h.verify(PIN) == SW.OK and h.use().pin_verified
    signature, sw = h.sign(b"transfer 1")
    assert sw == SW.OK and _signed_by_user(signature, b"transfer 1")
    assert not _signed_by_user(signature, b"transfer 2")
    # More signatures in the same session, without the PIN again.
    signature, sw = h.sign(b"transfer 2")
    assert sw == SW.OK and _signed_by_user(signature, b"transfer 2")
    assert h.sw(I.command(IssuanceIns.SIGN, data=b"\x00" * 31)) == SW.WRONG_LENGTH
    assert h.sw(I.command(IssuanceIns.SIGN, 0x01, 0x00, b"\x00" * 32)) == SW.INCORRECT_P1P2


@pytest.mark.parametrize("end", ["select", "select ISD", "reset", "wrong PIN"])
def test_the_verified_pin_ends_with_the_session(personalized: Path, end: str) -> None:
    h = Holder(personalized)
    assert h.verify(PIN) == SW.OK
    if end == "select":
        h.select()
    elif end == "select ISD":
        assert h.sw(gp.select_command(ISD_AID)) == SW.OK
        h.select()
    elif end == "reset":
        h.card.reset()
        h.select()
    else:
        assert h.verify(b"000000") == 0x63C2
    assert h.sign(b"message")[1] == SW.SECURITY_STATUS_NOT_SATISFIED


def test_three_wrong_pins_block_the_pin_and_the_puk_unblocks_it(personalized: Path) -> None:
    h = Holder(personalized)
    # A right PIN resets the counter.
    assert h.verify(b"000000") == 0x63C2 and h.state().pin_tries == 2
    assert h.verify(PIN) == SW.OK and h.state().pin_tries == I.PIN_TRIES
    assert [h.verify(b"000000") for _ in range(3)] == [0x63C2, 0x63C1, 0x63C0]
    assert B.tries_left(0x63C0) == 0 and B.tries_left(SW.OK) is None
    before = personalized.read_bytes()
    assert h.verify(PIN) == SW.AUTHENTICATION_METHOD_BLOCKED
    assert h.change(PIN, b"2222") == SW.AUTHENTICATION_METHOD_BLOCKED
    assert h.sign(b"message")[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert personalized.read_bytes() == before
    # The PUK sets a new PIN; a wrong PUK costs one of its own tries.
    assert h.unblock(b"00000000", b"2222") == 0x63C9 and h.state().puk_tries == 9
    assert h.unblock(PUK, b"2222") == SW.OK
    state = h.state()
    assert (state.pin, state.pin_tries, state.puk_tries) == (b"2222", I.PIN_TRIES, I.PUK_TRIES)
    assert h.verify(PIN) == 0x63C2
    assert h.verify(b"2222") == SW.OK
    assert h.sign(b"after unblock")[1] == SW.OK


def test_change_pin_needs_the_current_pin(personalized: Path) -> None:
    h = Holder(personalized)
    assert h.change(b"999999", b"4321") == 0x63C2
    assert h.state().pin == PIN
    assert h.change(PIN, b"4321") == SW.OK
    assert (h.state().pin, h.state().pin_tries) == (b"4321", I.PIN_TRIES)
    assert h.verify(PIN) == 0x63C2 and h.verify(b"4321") == SW.OK


def test_ten_wrong_puks_block_the_card_for_good(personalized: Path) -> None:
    h = Holder(personalized)
    answers = [h.unblock(b"00000000", b"1111") for _ in range(I.PUK_TRIES)]
    assert answers == [0x63C0 | n for n in range(I.PUK_TRIES - 1, -1, -1)]
    assert h.state().life_cycle is LifeCycle.BLOCKED
    assert h.sw(I.get_data(I.Tag.LIFE_CYCLE)) == SW.OK
    assert h.send(I.get_data(I.Tag.LIFE_CYCLE))[0] == bytes.fromhex("DF010183")
    before = personalized.read_bytes()
    # Every command but GET DATA: 6983 for the PIN's, 6985 for the rest; the PUK too.
    challenge = b"\x00" * I.CARD_CHALLENGE_LENGTH
    pin_commands = [B.verify_pin(h.device_key, challenge, PIN),
                    B.change_pin(h.device_key, challenge, PIN, b"1111"),
                    B.unblock_pin(h.device_key, challenge, PUK, b"1111"),
                    B.set_pin(h.device_key, challenge, PIN, PUK), I.sign(bytes(32))]
    for apdu in pin_commands:
        assert h.sw(apdu) == SW.AUTHENTICATION_METHOD_BLOCKED
    for apdu in (I.get_challenge(), I.personalize(b"\x01"), I.authenticate(bytes(16)),
                 I.verify_issuer(bytes(70)), I.generate_keys(), I.activate(),
                 bytes.fromhex("8050FF0008") + bytes(8)):
        assert h.sw(apdu) == SW.CONDITIONS_NOT_SATISFIED, apdu.hex()
    h.card.reset()
    h.select()
    assert h.sw(I.get_challenge()) == SW.CONDITIONS_NOT_SATISFIED
    assert personalized.read_bytes() == before


def _power_gone(held: bytes, given: bytes) -> bool:
    raise RuntimeError("power lost while comparing")


@pytest.mark.parametrize("which", ["PIN", "PUK"])
def test_the_counter_is_written_before_the_comparison(personalized: Path, which: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The power goes at the comparison (here: it raises): the try is spent all the same,
    even for the right code, as on a card whose OwnerPIN decrements first."""
    h = Holder(personalized)
    monkeypatch.setattr(applet, "codes_match", _power_gone)
    sw = h.verify(PIN) if which == "PIN" else h.unblock(PUK, b"1111")
    assert sw == SW.NO_PRECISE_DIAGNOSIS
    state = h.state()
    if which == "PIN":
        assert (state.pin_tries, state.puk_tries) == (I.PIN_TRIES - 1, I.PUK_TRIES)
    else:
        assert (state.pin_tries, state.puk_tries, state.pin) == \
            (I.PIN_TRIES, I.PUK_TRIES - 1, PIN)


def test_a_puk_worn_to_zero_by_a_lost_power_counts_as_blocked(
        personalized: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last PUK try written down, the power gone before ``blocked`` was: blocked."""
    h = Holder(personalized)
    for _ in range(I.PUK_TRIES - 1):
        assert B.tries_left(h.unblock(b"00000000", b"1111")) is not None
    monkeypatch.setattr(applet, "codes_match", _power_gone)
    assert h.unblock(b"00000000", b"1111") == SW.NO_PRECISE_DIAGNOSIS
    monkeypatch.undo()
    state = h.state()
    assert (state.life_cycle, state.puk_tries) == (LifeCycle.PERSONALIZED, 0)
    assert h.sw(I.get_challenge()) == SW.CONDITIONS_NOT_SATISFIED
    assert h.sw(B.unblock_pin(h.device_key, bytes(16), PUK, b"1111")) == \
        SW.AUTHENTICATION_METHOD_BLOCKED
    assert h.send(I.get_data(I.Tag.LIFE_CYCLE))[0] == bytes.fromhex("DF010183")


def test_a_pin_block_is_good_for_one_challenge_only(personalized: Path) -> None:
    h = Holder(personalized)
    block = B.verify_pin(h.device_key, h.challenge(), PIN)
    assert h.sw(block) == SW.OK
    before = personalized.read_bytes()
    # Replayed: the challenge is used up; a new one is not the block's.
    assert h.sw(block) == SW.CONDITIONS_NOT_SATISFIED
    h.challenge()
    assert h.sw(block) == SW.SECURITY_STATUS_NOT_SATISFIED
    # One GET CHALLENGE, one block, whatever the block's fate.
    challenge = h.challenge()
    assert h.sw(B.verify_pin(h.device_key, b"\x00" * 16, PIN)) == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    assert h.sw(B.verify_pin(h.device_key, challenge, PIN)) == SW.CONDITIONS_NOT_SATISFIED
    # Lost on reset: the card forgets its challenge.
    challenge = h.challenge()
    h.card.reset()
    h.select()
    assert h.sw(B.verify_pin(h.device_key, challenge, PIN)) == SW.CONDITIONS_NOT_SATISFIED
    # Not sealed to this card, not a block, not 256 bytes, the wrong layout.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    numbers = other.public_numbers()
    other_key = I.RsaPublic(numbers.n.to_bytes(256, "big"), b"\x01\x00\x01")
    refused = [
        (B.verify_pin(other_key, h.challenge(), PIN), SW.WRONG_DATA),
        (I.command(IssuanceIns.VERIFY_PIN, data=bytes(range(256))), SW.WRONG_DATA),
        (I.command(IssuanceIns.VERIFY_PIN, data=bytes(255)), SW.WRONG_LENGTH),
        (I.command(IssuanceIns.VERIFY_PIN, 0x00, 0x01, bytes(256)), SW.INCORRECT_P1P2),
        (I.command(IssuanceIns.VERIFY_PIN, data=B.seal(h.device_key, B.encode_pin_block(
            IssuanceIns.CHANGE_PIN, B.PinBlock(b"\x00" * 16, pin=PIN, new_pin=PIN)))),
         SW.WRONG_DATA),
    ]
    for apdu, sw in refused:
        h.challenge()
        assert h.sw(apdu) == sw
    assert personalized.read_bytes() == before  # no try was spent by any of these
    with pytest.raises(B.PinBlockError):
        B.verify_pin(h.device_key, b"\x00" * 16, b"12ab")
    with pytest.raises(B.PinBlockError):
        B.verify_pin(h.device_key, b"\x00" * 15, PIN)


def test_the_bureau_sets_pin_and_puk_once(without_pin: Path) -> None:
    h = Holder(without_pin)
    assert h.state().pin is None
    assert h.verify(PIN) == SW.CONDITIONS_NOT_SATISFIED
    assert h.unblock(PUK, PIN) == SW.CONDITIONS_NOT_SATISFIED
    assert h.sign(b"message")[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert h.sw(B.set_pin(h.device_key, h.challenge(), b"4711", b"99999999")) == SW.OK
    assert (h.state().pin, h.state().puk) == (b"4711", b"99999999")
    before = without_pin.read_bytes()
    assert h.sw(B.set_pin(h.device_key, h.challenge(), PIN, PUK)) == SW.CONDITIONS_NOT_SATISFIED
    assert without_pin.read_bytes() == before
    assert h.verify(b"4711") == SW.OK


def test_set_pin_is_refused_on_a_card_holding_one_and_before_personalization(
        personalized: Path, tmp_path: Path) -> None:
    h = Holder(personalized)
    before = personalized.read_bytes()
    assert h.sw(B.set_pin(h.device_key, h.challenge(), b"4711", b"99999999")) == \
        SW.CONDITIONS_NOT_SATISFIED
    assert personalized.read_bytes() == before
    fresh = Holder(soft.initialized_card(tmp_path / "initialized.json"))
    assert fresh.sw(B.set_pin(fresh.device_key, fresh.challenge(), PIN, PUK)) == \
        SW.CONDITIONS_NOT_SATISFIED


# the card and the issuer authenticate to each other -----------------------------------


@pytest.mark.parametrize("personalize", [False, True])
def test_the_card_authenticates_with_the_key_of_its_certificate(
        tmp_path: Path, personalize: bool) -> None:
    path = soft.initialized_card(tmp_path / "card.json")
    h = Holder(path)
    if personalize:
        assert h.sw(I.personalize(soft.make_payload(h.data))) == SW.OK
    assert h.data.issuer_auth_certificate is not None and h.data.serial is not None
    public = x509.load_der_x509_certificate(h.data.issuer_auth_certificate).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    challenge = bytes(range(32))
    signature, sw = h.send(I.authenticate(challenge))
    assert sw == SW.OK
    public.verify(signature, card_auth_statement(h.data.serial, challenge),
                  ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Exception):
        public.verify(signature, issuer_auth_statement(h.data.serial, challenge),
                      ec.ECDSA(hashes.SHA256()))
    for length in (15, 65, 0):
        assert h.sw(I.authenticate(bytes(length))) == SW.WRONG_LENGTH


def test_authenticate_waits_for_initialization(state_path: Path) -> None:
    card = VirtualCard.open(state_path)
    card.power_on()
    assert parse_response(card.transmit(gp.select_command(I.ISSUANCE_AID)))[1] == SW.OK
    assert parse_response(card.transmit(I.authenticate(bytes(16))))[1] == \
        SW.CONDITIONS_NOT_SATISFIED


def _issuer_signs(key: ec.EllipticCurvePrivateKey, serial: str, challenge: bytes) -> bytes:
    return key.sign(issuer_auth_statement(serial, challenge), ec.ECDSA(hashes.SHA256()))


def test_the_card_verifies_the_issuer_with_the_device_authentication_key(
        personalized: Path) -> None:
    h = Holder(personalized)
    serial = h.data.serial
    assert serial is not None
    assert h.sw(I.verify_issuer(_issuer_signs(DEVICE_AUTH, serial, bytes(16)))) == \
        SW.CONDITIONS_NOT_SATISFIED  # no challenge yet
    challenge = h.challenge()
    good = _issuer_signs(DEVICE_AUTH, serial, challenge)
    assert h.sw(I.verify_issuer(good)) == SW.OK and h.use().issuer_verified
    # Replayed, with another challenge: refused, and the flag goes.
    h.challenge()
    assert h.sw(I.verify_issuer(good)) == SW.SECURITY_STATUS_NOT_SATISFIED
    assert not h.use().issuer_verified
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    challenge = h.challenge()
    assert h.sw(I.verify_issuer(_issuer_signs(wrong_key, serial, challenge))) == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    challenge = h.challenge()  # the card's own statement, signed by the right key
    assert h.sw(I.verify_issuer(DEVICE_AUTH.sign(card_auth_statement(serial, challenge),
                                                 ec.ECDSA(hashes.SHA256())))) == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    h.challenge()
    assert h.sw(I.verify_issuer(b"\x30\x00" + bytes(8))) == SW.SECURITY_STATUS_NOT_SATISFIED
    h.challenge()
    assert h.sw(I.verify_issuer(bytes(73))) == SW.WRONG_LENGTH
    assert not h.use().issuer_verified


def test_verify_issuer_needs_a_personalized_card(tmp_path: Path) -> None:
    h = Holder(soft.initialized_card(tmp_path / "card.json"))
    challenge = h.challenge()
    assert h.data.serial is not None
    assert h.sw(I.verify_issuer(_issuer_signs(DEVICE_AUTH, h.data.serial, challenge))) == \
        SW.CONDITIONS_NOT_SATISFIED


# no secret in any answer ---------------------------------------------------------------


def test_no_private_key_pin_or_puk_in_any_answer(without_pin: Path) -> None:
    h = Holder(without_pin)
    assert h.sw(B.set_pin(h.device_key, h.challenge(), b"4711", b"99999999")) == SW.OK
    assert h.verify(b"0000") == 0x63C2
    assert h.verify(b"4711") == SW.OK
    assert h.sign(b"message")[1] == SW.OK
    assert h.change(b"4711", b"8642") == SW.OK
    assert h.unblock(b"99999999", b"1357") == SW.OK
    assert h.send(I.authenticate(bytes(16)))[1] == SW.OK
    challenge = h.challenge()
    assert h.data.serial is not None
    assert h.sw(I.verify_issuer(_issuer_signs(DEVICE_AUTH, h.data.serial, challenge))) == SW.OK
    for tag in I.Tag:
        h.send(I.get_data(tag))
    # Through a secure channel too (the answers in clear and on the wire).
    session = applet_session(h.card, keys=TRANSPORT)
    clear = [session.send(I.get_data(I.Tag.ALL))[0], session.send(I.get_challenge())[0]]
    state = h.state()
    known = {f"card private value {n}": v for n, v in enumerate(card_private_values(state))}
    known |= {"user private key": USER_KEY, "PIN": b"4711", "PUK": b"99999999",
              "new PIN": b"8642", "unblocked PIN": b"1357"}
    blob = b"\n".join(h.answers + clear)
    assert len(h.answers) > 20
    assert_absent(blob, known, "an answer of the card")
