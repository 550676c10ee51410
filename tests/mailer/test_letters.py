"""``cms mailer letters``: PIN and PUK letters from a signed mailing file, read back with pypdf.

The HSM made the codes (claim 8): the issuer's mailing file carries them
sealed to the mailing house's key in its token, and the cards, personalized
by the bureau from the same issuance, hold them. Each PIN letter holds the
card's PIN and not its PUK, each PUK letter the reverse, both the user's
name and address. The dispatch confirmation is signed by the mailing
house's key in its token, checked by ``openssl cms -verify`` with its
certificate. A mailing file signed by anyone but the signer given,
or with mailer data the mailing house's key does not open, is refused in
one line. The bureau's own mailing file (the bureau made the codes) is
taken with the bureau's certificate.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pypdf import PdfReader

from cms import perso_format as F
from cms.v1 import issuer_pb2_grpc
from tests.bureau.test_personalize import (
    _software_signed,
    bureau_certificate,
    personalize,
)
from tests.bureau.world import MAILER, World, card_state, cms, copy_cards, make_cards, users
from tests.support.scan import assert_absent

pytestmark = pytest.mark.integration

PACK = "M-2026-01"
CARDS = 2
PREFIX = "MAIL"
PIN_MAKER = F.PinMaker.HSM


def letters(world: World, mailing: Path, signer: Path, out: Path, check: bool = True):
    return cms("mailer", "--endpoints", world.endpoints, "--mailer", MAILER, "letters",
               mailing, "--signer", signer, "--out", out, check=check)


def text_of(path: Path) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


def test_pin_and_puk_go_in_separate_letters_to_each_user(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path) -> None:
    personalized = copy_cards(templates, tmp_path / "cards")
    personalize(world, perso, tmp_path / "cards", tmp_path / "bureau", tmp_path / "state")
    mailing = perso.with_name(PACK + F.MAILING_SUFFIX)
    out = tmp_path / "letters"
    run = letters(world, mailing, world.issuer_cert, out)
    people = dict(zip(sorted(templates), users(CARDS), strict=True))
    secrets = {}
    for serial, path in personalized.items():
        card = card_state(path)
        assert card.pin is not None and card.puk is not None
        pin, puk = card.pin.decode(), card.puk.decode()
        secrets.update({f"{serial} PIN": card.pin, f"{serial} PUK": card.puk})
        name, address = people[serial]
        pin_letter, puk_letter = (text_of(out / f"{serial}-{code}.pdf") for code in
                                  ("pin", "puk"))
        assert pin in pin_letter and puk not in pin_letter
        assert puk in puk_letter and pin not in puk_letter
        for letter in (pin_letter, puk_letter):
            assert name in letter and serial in letter
            assert all(line in letter for line in address.splitlines())
    dispatch = F.read_dispatch((out / f"{PACK}-dispatch.csv").read_bytes())
    verify = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
         out / f"{PACK}-dispatch.csv.p7s", "-content", out / f"{PACK}-dispatch.csv",
         "-CAfile", world.mailer_cert, "-out", os.devnull], capture_output=True, text=True,
        check=False)
    assert verify.returncode == 0, verify.stderr
    assert sorted(r.serial for r in dispatch.rows) == sorted(templates)
    assert dispatch.header.file_serial == F.read_mailing(mailing.read_bytes()).header.file_serial
    assert_absent((out / f"{PACK}-dispatch.csv").read_bytes() + run.stdout.encode()
                  + run.stderr.encode(), secrets, "the dispatch file and the output")


def _refused(world: World, mailing: Path, signer: Path, out: Path) -> str:
    done = letters(world, mailing, signer, out, check=False)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_a_mailing_file_signed_by_someone_else_is_refused(
        world: World, perso: Path, tmp_path: Path) -> None:
    mailing = perso.with_name(PACK + F.MAILING_SUFFIX)
    forged, other = _software_signed(tmp_path / "forged-mailing.csv", mailing.read_bytes())
    assert "signature is refused" in _refused(world, forged, world.issuer_cert, tmp_path / "a")
    assert "not by the expected signer" in _refused(world, mailing, other, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mailer_data_for_another_key_is_refused_naming_the_card(
        world: World, perso: Path, tmp_path: Path) -> None:
    table = F.read_mailing(perso.with_name(PACK + F.MAILING_SUFFIX).read_bytes())
    elsewhere = rsa.generate_private_key(65537, 2048).public_key().encrypt(
        b"1234\x0056789012", padding.OAEP(mgf=padding.MGF1(padding.hashes.SHA1()),
                                          algorithm=padding.hashes.SHA1(), label=None))
    rows = [table.rows[0]._replace(mailer_data=elsewhere), *table.rows[1:]]
    bad = tmp_path / "bad-mailing.csv"
    world.sign_into(bad, F.write_mailing(table.header, rows), issuer_pb2_grpc.IssuerHsmStub(
        world.proxy.channel("access-server")))
    message = _refused(world, bad, world.issuer_cert, tmp_path / "out")
    assert f"card {rows[0].serial}" in message and "not mailer data" in message
    assert not (tmp_path / "out" / f"{PACK}-dispatch.csv").exists()


def test_the_bureaus_mailing_file_is_taken_with_its_certificate(world: World,
                                                                tmp_path: Path) -> None:
    fresh = make_cards(tmp_path / "templates", world.issuer_point, 1, prefix="BMAIL")
    perso = world.issue(tmp_path / "issued", fresh, "BM-1")
    copy_cards(fresh, tmp_path / "cards")
    personalize(world, perso, tmp_path / "cards", tmp_path / "bureau", tmp_path / "state")
    cert = tmp_path / "bureau.pem"
    cert.write_bytes(x509.load_der_x509_certificate(bureau_certificate(world)).public_bytes(
        serialization.Encoding.PEM))
    mailing = tmp_path / "bureau" / f"BM-1{F.MAILING_SUFFIX}"
    letters(world, mailing, cert, tmp_path / "letters")
    card = card_state(next(iter((tmp_path / "cards").glob("*.json"))))
    assert card.pin is not None and card.pin.decode() in text_of(
        tmp_path / "letters" / "BMAIL-0001-pin.pdf")
    # The issuer's certificate does not stand for the bureau's.
    assert "not by the expected signer" in _refused(world, mailing, world.issuer_cert,
                                                    tmp_path / "x")
