"""Conformance of the issuance applet (docs/issuance-applet.md) on the virtual card.

Provider commands only in ``factory`` and only in a level-33 channel opened
through the ISD with the transport keys; the public issuer key written once;
GET DATA for anyone and never a private key; malformed data refused with the
documented status and nothing changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import gp, host
from cardcore import issuance as I
from cardcore import tlv as T
from cardcore.diversify import StaticKeySet
from cardcore.initialization import verify_signed_device_key
from cardcore.issuance_keys import ec_spki, rsa_spki
from cardcore.psd import ISD_AID
from cardcore.sw import SW
from tests.support.scan import card_private_values
from tests.virtual_psd.conftest import PSD_ID, TRANSPORT, put_key, send
from tests.virtual_psd.issuance_host import (
    ISSUER_POINT,
    SERIAL,
    SoftwareProvider,
    SoftwareRoot,
    issuer_point,
)
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.issuance import PROVIDER_INS, IssuanceState, device_public_key, issuance_state
from virtual_psd.state import StateError, load_state

OTHER_SET = StaticKeySet(b"\x31" * 16, b"\x32" * 16, b"\x33" * 16)
PROVIDER_COMMANDS = {
    "generate keys": I.generate_keys(),
    "put serial": I.put_data(I.Tag.SERIAL, SERIAL.encode()),
    "put issuer key": I.put_data(I.Tag.ISSUER_PUBLIC_KEY, I.encode_ec_public(ISSUER_POINT)),
    "put device certificate": I.put_data(I.Tag.DEVICE_CERTIFICATE, b"\x30\x00"),
    "put issuer auth certificate": I.put_data(I.Tag.ISSUER_AUTH_CERTIFICATE, b"\x30\x00"),
    "certify device key": I.certify_device_key(),
    "activate": I.activate(),
}


def _open(path: Path) -> VirtualCard:
    card = VirtualCard.open(path)
    card.power_on()
    return card


def _select(card: VirtualCard) -> None:
    data, sw = send(card, gp.select_command(I.ISSUANCE_AID))
    assert sw == SW.OK and gp.parse_select_response(data) == I.ISSUANCE_AID


def applet_session(card: VirtualCard, kvn: int = 0xFF, keys: StaticKeySet = TRANSPORT,
                   level: int = 0x33) -> host.SecureSession:
    """A channel to the selected applet, opened as with the ISD (challenge from the ISD's AID)."""
    _select(card)
    return host.open_session(card.transmit, kvn=kvn, keys=keys, security_level=level,
                             select=False)


def _card_data(card: VirtualCard) -> I.CardData:
    data, sw = send(card, I.get_data(I.Tag.ALL))
    assert sw == SW.OK
    return I.decode_card_data(data)


@pytest.fixture(scope="module")
def initialized_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("issuance") / "initialized.json"
    create_card(path, psd_id=PSD_ID)
    card = _open(path)
    SoftwareProvider(card.transmit).initialize(SERIAL, ISSUER_POINT)
    yield path


@pytest.fixture
def initialized(initialized_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "initialized.json"
    shutil.copy(initialized_template, path)
    return path


def test_a_provider_initializes_the_card_and_anyone_reads_what_it_holds(
        state_path: Path) -> None:
    card = _open(state_path)
    provider = SoftwareProvider(card.transmit)
    result = provider.initialize(SERIAL, ISSUER_POINT)
    assert not result.already and result.card.life_cycle is I.LifeCycle.INITIALIZED
    # A new card object reads it all back from the file, without a channel.
    card = _open(state_path)
    _select(card)
    held = _card_data(card)
    assert held == result.card
    verify_signed_device_key(held)
    assert held.issuer_public_key == ISSUER_POINT and held.serial == SERIAL
    # Every object alone, by its tag, as DF00 lists it.
    objects = dict((t.tag, t.value) for t in T.parse_tlvs(send(card, I.get_data(I.Tag.ALL))[0]))
    assert set(objects) == set(I.Tag) - {I.Tag.ALL}
    for tag, value in objects.items():
        assert send(card, I.get_data(tag)) == (T.tlv(tag, value), SW.OK)
    # The certificates are the root's, about the card's own keys.
    root_public = provider.root.key.public_key()
    device_cert = x509.load_der_x509_certificate(held.device_certificate or b"")
    iak_cert = x509.load_der_x509_certificate(held.issuer_auth_certificate or b"")
    for cert in (device_cert, iak_cert):
        root_public.verify(cert.signature, cert.tbs_certificate_bytes,
                           ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
    assert held.device_public_key is not None and held.issuer_auth_public_key is not None
    assert device_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        rsa_spki(held.device_public_key)
    assert iak_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        ec_spki(held.issuer_auth_public_key)
    # A second run leaves an initialized card as it is.
    again = SoftwareProvider(card.transmit).initialize(SERIAL, ISSUER_POINT)
    assert again.already and _card_data(card) == held


def test_get_data_of_a_factory_card_and_of_an_absent_object(card: VirtualCard) -> None:
    _select(card)
    assert send(card, I.get_data(I.Tag.ALL)) == (T.tlv(I.Tag.LIFE_CYCLE, b"\x01"), SW.OK)
    assert send(card, I.get_data(I.Tag.LIFE_CYCLE)) == (T.tlv(I.Tag.LIFE_CYCLE, b"\x01"), SW.OK)
    for tag in set(I.Tag) - {I.Tag.ALL, I.Tag.LIFE_CYCLE}:
        assert send(card, I.get_data(tag))[1] == SW.REFERENCED_DATA_NOT_FOUND
    assert send(card, I.get_data(0xDF7F))[1] == SW.REFERENCED_DATA_NOT_FOUND


@pytest.mark.parametrize("name", list(PROVIDER_COMMANDS))
def test_each_provider_command_needs_a_channel(state_path: Path, name: str) -> None:
    card = _open(state_path)
    _select(card)
    before = state_path.read_bytes()
    assert send(card, PROVIDER_COMMANDS[name])[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert state_path.read_bytes() == before


@pytest.mark.parametrize("level", [0x01, 0x03, 0x13])
def test_provider_commands_need_level_33(state_path: Path, level: int) -> None:
    card = _open(state_path)
    session = applet_session(card, level=level)
    before = state_path.read_bytes()
    for command in PROVIDER_COMMANDS.values():
        assert session.send(command)[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert state_path.read_bytes() == before


def test_provider_commands_need_the_transport_key_set(state_path: Path) -> None:
    card = _open(state_path)
    isd = host.open_session(card.transmit, kvn=0xFF, keys=TRANSPORT)
    data, sw, expected = put_key(isd, TRANSPORT.dek, OTHER_SET, 0x30)
    assert (data, sw) == (expected, SW.OK)
    session = applet_session(card, kvn=0x30, keys=OTHER_SET)
    before = state_path.read_bytes()
    for command in PROVIDER_COMMANDS.values():
        assert session.send(command)[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert state_path.read_bytes() == before
    # GET DATA goes through such a channel as through any.
    data, sw = session.send(I.get_data(I.Tag.LIFE_CYCLE))
    assert (data, sw) == (T.tlv(I.Tag.LIFE_CYCLE, b"\x01"), SW.OK)


def test_a_provider_command_sent_plain_in_a_channel_is_refused_and_ends_it(
        state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    assert send(card, I.generate_keys())[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    # The channel is gone: its next protected command is refused too.
    assert session.send(I.generate_keys())[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert issuance_state(load_state(state_path)) == IssuanceState()


def test_a_bad_mac_or_another_selection_ends_the_applets_channel(state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    wrapped = bytearray(session.channel.wrap(I.put_data(I.Tag.SERIAL, SERIAL.encode())))
    wrapped[-2] ^= 0x01  # the last byte of the C-MAC, before Le
    assert send(card, bytes(wrapped))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert session.send(I.put_data(I.Tag.SERIAL, SERIAL.encode()))[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    session = applet_session(card)
    assert session.send(I.put_data(I.Tag.SERIAL, SERIAL.encode()))[1] == SW.OK
    assert send(card, gp.select_command(ISD_AID))[1] == SW.OK
    _select(card)
    assert session.send(I.put_data(I.Tag.SERIAL, b"CMS-0002"))[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    assert issuance_state(load_state(state_path)).serial == SERIAL


def test_the_applets_channel_moves_the_isds_sequence_counter(state_path: Path) -> None:
    """One counter for every channel: the card never makes the same challenge twice."""
    card = _open(state_path)
    counter = isd_state(card.state).sequence_counter
    applet_session(card)
    host.open_session(card.transmit, kvn=0xFF, keys=TRANSPORT)
    applet_session(card)
    assert isd_state(load_state(state_path)).sequence_counter == counter + 3


@pytest.mark.parametrize("name", list(PROVIDER_COMMANDS))
def test_each_provider_command_is_refused_outside_factory(initialized: Path, name: str) -> None:
    card = _open(initialized)
    session = applet_session(card)
    before = initialized.read_bytes()
    assert session.send(PROVIDER_COMMANDS[name])[1] == SW.CONDITIONS_NOT_SATISFIED
    assert initialized.read_bytes() == before


def test_the_public_issuer_key_is_accepted_once(state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    put = PROVIDER_COMMANDS["put issuer key"]
    assert session.send(put) == (b"", SW.OK)
    before = state_path.read_bytes()
    other = issuer_point(ec.generate_private_key(ec.SECP256R1()))
    assert session.send(put)[1] == SW.CONDITIONS_NOT_SATISFIED
    assert session.send(I.put_data(I.Tag.ISSUER_PUBLIC_KEY, I.encode_ec_public(other)))[1] == \
        SW.CONDITIONS_NOT_SATISFIED
    assert state_path.read_bytes() == before
    assert issuance_state(load_state(state_path)).issuer_public_key == ISSUER_POINT


def _off_curve() -> bytes:
    point = bytearray(ISSUER_POINT)
    point[-1] ^= 0x01
    return bytes(point)


@pytest.mark.parametrize("tag, value", [
    (I.Tag.SERIAL, b""),
    (I.Tag.SERIAL, b"cms-0001"),
    (I.Tag.SERIAL, b"-CMS"),
    (I.Tag.SERIAL, b"C" * 33),
    (I.Tag.SERIAL, b"CMS\xff"),
    (I.Tag.ISSUER_PUBLIC_KEY, I.encode_ec_public(_off_curve())),
    (I.Tag.ISSUER_PUBLIC_KEY, ISSUER_POINT),                        # no 86 tag
    (I.Tag.ISSUER_PUBLIC_KEY, T.tlv(0x86, ISSUER_POINT[:33])),      # compressed length
    (I.Tag.ISSUER_PUBLIC_KEY, T.tlv(0x86, b"\x04" + bytes(64))),
], ids=["serial-empty", "serial-lower-case", "serial-leading-dash", "serial-too-long",
        "serial-not-ascii", "issuer-key-off-curve", "issuer-key-untagged",
        "issuer-key-compressed-length", "issuer-key-zero-point"])
def test_malformed_data_is_refused_and_changes_nothing(state_path: Path, tag: int,
                                                       value: bytes) -> None:
    card = _open(state_path)
    session = applet_session(card)
    before = state_path.read_bytes()
    assert session.send(I.command(I.IssuanceIns.PUT_DATA, tag >> 8, tag & 0xFF, value))[1] == \
        SW.WRONG_DATA
    assert state_path.read_bytes() == before


def test_certificates_must_carry_the_cards_own_keys(state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    root = SoftwareRoot()
    # Before GENERATE KEYS there is no key to certify.
    cert = root.certify(SERIAL, ec_spki(ISSUER_POINT), "issuer authentication")
    assert session.send(I.put_data(I.Tag.ISSUER_AUTH_CERTIFICATE, cert))[1] == \
        SW.CONDITIONS_NOT_SATISFIED
    data, sw = session.send(I.generate_keys())
    assert sw == SW.OK
    keys = I.decode_generated_keys(data)
    device_cert = root.certify(SERIAL, rsa_spki(keys.device_public_key), "device")
    iak_cert = root.certify(SERIAL, ec_spki(keys.issuer_auth_public_key), "iak")
    before = state_path.read_bytes()
    refused = [
        (I.Tag.ISSUER_AUTH_CERTIFICATE, cert),           # another key
        (I.Tag.ISSUER_AUTH_CERTIFICATE, device_cert),    # the other key of the card
        (I.Tag.DEVICE_CERTIFICATE, iak_cert),
        (I.Tag.DEVICE_CERTIFICATE, device_cert[:-1]),    # not one whole DER SEQUENCE
        (I.Tag.DEVICE_CERTIFICATE, device_cert + b"\x00"),
        (I.Tag.DEVICE_CERTIFICATE, b"\x04" + device_cert[1:]),
        (I.Tag.DEVICE_CERTIFICATE, T.tlv(0x30, keys.device_public_key.modulus
                                          + bytes(I.MAX_CERTIFICATE))),  # too long
    ]
    for tag, value in refused:
        assert session.send(I.put_data(tag, value))[1] == SW.WRONG_DATA, (tag, len(value))
    assert state_path.read_bytes() == before
    assert session.send(I.put_data(I.Tag.DEVICE_CERTIFICATE, device_cert))[1] == SW.OK
    assert session.send(I.put_data(I.Tag.ISSUER_AUTH_CERTIFICATE, iak_cert))[1] == SW.OK
    held = issuance_state(load_state(state_path))
    assert (held.device_certificate, held.issuer_auth_certificate) == (device_cert, iak_cert)


def test_order_and_parameters_of_the_provider_commands(state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    # Signature and activation need what comes before them.
    assert session.send(I.certify_device_key())[1] == SW.CONDITIONS_NOT_SATISFIED
    assert session.send(I.activate())[1] == SW.CONDITIONS_NOT_SATISFIED
    assert session.send(I.command(I.IssuanceIns.GENERATE_KEYS, 0x01))[1] == SW.INCORRECT_P1P2
    assert session.send(I.command(I.IssuanceIns.GENERATE_KEYS, data=b"\x00"))[1] == \
        SW.WRONG_LENGTH
    assert session.send(I.command(I.IssuanceIns.PUT_DATA, 0xDF, 0x01, b"\x03"))[1] == \
        SW.REFERENCED_DATA_NOT_FOUND            # the life cycle is not written by PUT DATA
    assert session.send(I.generate_keys())[1] == SW.OK
    assert session.send(I.certify_device_key())[1] == SW.CONDITIONS_NOT_SATISFIED  # no serial
    assert session.send(I.put_data(I.Tag.SERIAL, SERIAL.encode()))[1] == SW.OK
    signature, sw = session.send(I.certify_device_key())
    assert sw == SW.OK
    assert session.send(I.activate())[1] == SW.CONDITIONS_NOT_SATISFIED  # no issuer key, certs
    held = issuance_state(load_state(state_path))
    assert held.life_cycle is I.LifeCycle.FACTORY and held.signed_device_key == signature
    # Personalization and use wait for ``initialized``; an unknown instruction is 6D00.
    for ins in set(I.IssuanceIns) - PROVIDER_INS - {I.IssuanceIns.GET_DATA}:
        assert session.send(I.command(ins))[1] == SW.CONDITIONS_NOT_SATISFIED, ins.name
    assert session.send(I.command(0x10))[1] == SW.INS_NOT_SUPPORTED
    assert send(card, bytes((0x00, I.IssuanceIns.GET_DATA, 0xDF, 0x01, 0x00)))[1] == \
        SW.CLA_NOT_SUPPORTED


def test_generating_again_in_factory_drops_what_was_made_for_the_old_keys(
        state_path: Path) -> None:
    card = _open(state_path)
    session = applet_session(card)
    root = SoftwareRoot()
    keys = I.decode_generated_keys(session.send(I.generate_keys())[0])
    assert session.send(I.put_data(I.Tag.SERIAL, SERIAL.encode()))[1] == SW.OK
    assert session.send(I.put_data(I.Tag.DEVICE_CERTIFICATE, root.certify(
        SERIAL, rsa_spki(keys.device_public_key), "device")))[1] == SW.OK
    assert session.send(I.certify_device_key())[1] == SW.OK
    new = I.decode_generated_keys(session.send(I.generate_keys())[0])
    assert new.device_public_key != keys.device_public_key
    assert new.issuer_auth_public_key != keys.issuer_auth_public_key
    held = issuance_state(load_state(state_path))
    assert held.serial == SERIAL
    assert (held.device_certificate, held.signed_device_key) == (None, None)
    assert device_public_key(held) == new.device_public_key
    # A new serial drops the signature over the old one.
    assert session.send(I.certify_device_key())[1] == SW.OK
    assert session.send(I.put_data(I.Tag.SERIAL, b"CMS-0002"))[1] == SW.OK
    assert issuance_state(load_state(state_path)).signed_device_key is None


def test_no_answer_of_a_whole_run_carries_a_private_key(state_path: Path) -> None:
    card = _open(state_path)
    raw_answers: list[bytes] = []

    def transmit(apdu: bytes) -> bytes:
        response = card.transmit(apdu)
        raw_answers.append(response)
        return response

    provider = SoftwareProvider(transmit)
    provider.initialize(SERIAL, ISSUER_POINT)
    _select(card)
    for tag in I.Tag:
        raw_answers.append(card.transmit(I.get_data(tag)))
    secrets = card_private_values(issuance_state(load_state(state_path)))
    clear = [data for data, _ in provider.answers]
    assert len(clear) == 11 and any(len(a) > 1000 for a in raw_answers)
    for answer in raw_answers + clear:
        for secret in secrets:
            assert secret not in answer
            assert secret.hex().encode() not in answer.lower()


def test_the_state_file_round_trip(initialized: Path) -> None:
    state = load_state(initialized)
    section = issuance_state(state)
    assert section.life_cycle is I.LifeCycle.INITIALIZED
    assert IssuanceState.from_json(json.loads(json.dumps(section.to_json()))) == section
    obj = json.loads(initialized.read_text())["applets"][I.ISSUANCE_AID.hex().upper()]
    assert obj["life_cycle"] == "initialized" and obj["serial"] == SERIAL
    card = _open(initialized)
    _select(card)
    assert _card_data(card).serial == SERIAL


@pytest.mark.parametrize("change, message", [
    ({"life_cycle": "ready"}, "malformed issuance section"),
    ({"serial": "lower"}, "malformed issuance section"),
    ({"signed_device_key": None}, "without all of its initialization data"),
    ({"issuer_auth_private_key": None}, "one key pair without the other"),
    ({"device_certificate": 12}, "must be hex text"),
])
def test_a_malformed_section_is_refused_when_the_card_opens(
        initialized: Path, change: dict[str, object], message: str) -> None:
    obj = json.loads(initialized.read_text())
    obj["applets"][I.ISSUANCE_AID.hex().upper()].update(change)
    initialized.write_text(json.dumps(obj))
    with pytest.raises(StateError, match=message):
        VirtualCard.open(initialized)


def test_a_card_made_before_the_applet_gains_it_in_factory(state_path: Path) -> None:
    obj = json.loads(state_path.read_text())
    assert list(obj["applets"]) == [ISD_AID.hex().upper()]   # the file has no section
    card = _open(state_path)
    _select(card)
    before = state_path.read_bytes()
    assert _card_data(card).life_cycle is I.LifeCycle.FACTORY
    assert state_path.read_bytes() == before                  # a read writes nothing
    session = applet_session(card)
    assert session.send(I.put_data(I.Tag.SERIAL, SERIAL.encode()))[1] == SW.OK
    sections = json.loads(state_path.read_text())["applets"]
    assert sections[I.ISSUANCE_AID.hex().upper()]["life_cycle"] == "factory"
    assert sections[I.ISSUANCE_AID.hex().upper()]["serial"] == SERIAL


def test_cms_card_show_gives_the_life_cycle_and_serial_and_no_key(initialized: Path,
                                                                  state_path: Path) -> None:
    def show(path: Path) -> tuple[dict[str, object], str]:
        done = subprocess.run([sys.executable, "-m", "cms.cli", "card", "show", "--state",
                               str(path)], capture_output=True, text=True, check=False,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), done.stdout

    summary, text = show(initialized)
    assert summary["issuance"] == {"life_cycle": "initialized", "serial": SERIAL}
    for secret in card_private_values(issuance_state(load_state(initialized))):
        assert secret.hex() not in text.lower()
    assert show(state_path)[0]["issuance"] == {"life_cycle": "factory", "serial": None}
