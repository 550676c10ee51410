"""``cms bureau personalize`` end to end, over in-process virtual cards and a real proxy.

The issuance is the HSM's (IssueBatch, SignIssuerFile); the bureau's keys are
in its token. A batch personalizes every card of its file once, sets the PIN
and PUK its HSM derived, writes results, shipping and mailing files that
``openssl cms -verify`` takes with the bureau's certificate and the access
server takes from a trusted bureau, and a face per card that pypdf reads
back. Run again, it personalizes nothing twice; an unknown card is left
alone; a file signed by anyone but the issuer, or malformed, is refused in
one line. No PIN or PUK appears in any file, journal or output.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pypdf import PdfReader

from access_server.issuance_service import check_bureau, verified_results
from bureau.journal import JOURNAL_NAME
from cardcore import issuance as I
from cms import perso_format as F
from cms.v1 import partners_pb2 as ppb
from cms.v1 import partners_pb2_grpc
from tests.bureau.world import (
    BUREAU,
    MAILER,
    TIMEOUT,
    World,
    card_state,
    cms,
    copy_cards,
    make_cards,
    users,
)
from tests.support.scan import assert_absent

pytestmark = pytest.mark.integration

PACK = "B-2026-01"
CARDS = 3


def personalize(world: World, perso: Path, card_dir: Path, out: Path, state: Path,
                *extra: str, check: bool = True):
    return cms("bureau", "--endpoints", world.endpoints, "--bureau", BUREAU, "--state", state,
               "personalize", perso, "--issuer-cert", world.issuer_cert, "--mailer-key",
               world.mailer_pem, "--out", out, "--card-dir", card_dir, *extra, check=check)


def personalized(stdout: str) -> int:
    """How many cards a run reports personalized now."""
    return sum(line.startswith("card ") and line.endswith(" personalized")
               for line in stdout.splitlines())


def bureau_certificate(world: World) -> bytes:
    return partners_pb2_grpc.BureauHsmStub(world.proxy.channel("bureau")).GetBureauCertificate(
        ppb.BureauKeyRequest(bureau=BUREAU), timeout=TIMEOUT).certificate


def opened(world: World, data: bytes, serial: str) -> tuple[bytes, bytes]:
    codes = partners_pb2_grpc.MailerHsmStub(world.proxy.channel("mailer")).OpenMailerData(
        ppb.OpenMailerDataRequest(mailer=MAILER, serial=serial, mailer_data=data),
        timeout=TIMEOUT)
    return codes.pin, codes.puk


def openssl_verifies(path: Path, certificate: bytes, tmp: Path) -> bool:
    import os
    import subprocess

    pem = tmp / "bureau-cert.pem"
    pem.write_bytes(x509.load_der_x509_certificate(certificate).public_bytes(
        serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                           f"{path}.p7s", "-CAfile", pem, "-content", path, "-out", os.devnull],
                          capture_output=True, check=False)
    return done.returncode == 0


def everything_left(*places: Path) -> bytes:
    return b"".join(p.read_bytes() for place in places for p in sorted(place.rglob("*"))
                    if p.is_file())


def test_a_batch_personalizes_each_card_once_and_writes_signed_files(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path) -> None:
    cards = copy_cards(templates, tmp_path / "cards")
    out, state = tmp_path / "out", tmp_path / "state"
    run = personalize(world, perso, tmp_path / "cards", out, state)
    assert personalized(run.stdout) == CARDS, run.stdout
    table = F.read_perso(perso.read_bytes())
    codes = {}
    for serial, path in cards.items():
        card = card_state(path)
        assert card.life_cycle == I.LifeCycle.PERSONALIZED
        assert (card.issuance_id, card.sequence) == (table.header.file_serial, 1)
        assert card.pin is not None and card.puk is not None
        codes[serial] = (card.pin, card.puk)
    certificate = bureau_certificate(world)
    # Results: openssl verifies them with the bureau's certificate, and the issuer takes them
    # from the bureau it trusts.
    results = out / f"{PACK}-results.csv"
    assert openssl_verifies(results, certificate, tmp_path)
    record = check_bureau(certificate, datetime.now(UTC), "admin")
    taken = verified_results(results.read_bytes(), Path(f"{results}.p7s").read_bytes(),
                             [record], datetime.now(UTC))
    assert {(r.serial, r.status) for r in taken.rows} == {
        (s, F.Status.PERSONALIZED) for s in cards}
    assert taken.header.file_serial == table.header.file_serial
    shipping = out / f"{PACK}-shipping.csv"
    assert openssl_verifies(shipping, certificate, tmp_path)
    people = dict(zip(sorted(cards), users(CARDS), strict=True))
    assert {(r.serial, r.user_name, r.postal_address)
            for r in F.read_shipping(shipping.read_bytes()).rows} == {
        (s, *people[s]) for s in cards}
    # The mailing file holds each card's own PIN and PUK, for the mailing house alone.
    mailing = out / f"{PACK}{F.MAILING_SUFFIX}"
    assert openssl_verifies(mailing, certificate, tmp_path)
    for row in F.read_mailing(mailing.read_bytes()).rows:
        assert opened(world, row.mailer_data, row.serial) == codes[row.serial]
        assert (row.user_name, row.postal_address) == people[row.serial]
    for serial, (name, _) in people.items():
        face = "\n".join(page.extract_text() for page in
                         PdfReader(out / "faces" / f"{serial}.pdf").pages)
        assert name in face and serial in face
    secrets = {f"{s} {kind}": value for s, pair in codes.items()
               for kind, value in zip(("PIN", "PUK"), pair, strict=True)}
    assert_absent(everything_left(out, state) + run.stdout.encode() + run.stderr.encode(),
                  secrets, "the bureau's files, journal and output")


def test_a_batch_run_again_personalizes_nothing_twice(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path) -> None:
    cards = copy_cards(templates, tmp_path / "cards")
    out, state = tmp_path / "out", tmp_path / "state"
    personalize(world, perso, tmp_path / "cards", out, state)
    before = {serial: path.read_bytes() for serial, path in cards.items()}
    results = (out / f"{PACK}-results.csv").read_bytes()
    again = personalize(world, perso, tmp_path / "cards", out, state, check=False)
    assert again.returncode == 1 and "begun before" in again.stderr
    resumed = personalize(world, perso, tmp_path / "cards", out, state, "--resume")
    assert resumed.stdout.count("already personalized in this batch") == CARDS
    assert {serial: path.read_bytes() for serial, path in cards.items()} == before
    assert F.read_results((out / f"{PACK}-results.csv").read_bytes()).rows == \
        F.read_results(results).rows


def test_a_card_not_in_the_file_is_reported_and_left_alone(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path) -> None:
    card_dir = tmp_path / "cards"
    copy_cards(templates, card_dir)
    stranger = make_cards(tmp_path / "other", world.issuer_point, 1, prefix="ZZZ")
    path = copy_cards(stranger, card_dir)["ZZZ-0001"]
    before = path.read_bytes()
    run = personalize(world, perso, card_dir, tmp_path / "out", tmp_path / "state")
    assert "card ZZZ-0001 not in the file: serial ZZZ-0001 is not in the personalization " \
           "file; the card is left alone" in run.stdout
    assert path.read_bytes() == before
    assert personalized(run.stdout) == CARDS


def _software_signed(path: Path, data: bytes) -> tuple[Path, Path]:
    """``data`` at ``path`` signed by a key of nobody's: with its certificate."""
    from cryptography.hazmat.primitives.serialization import pkcs7
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer key 1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(data)
    Path(f"{path}.p7s").write_bytes(
        pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(cert, key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                           pkcs7.PKCS7Options.NoCapabilities,
                                           pkcs7.PKCS7Options.Binary]))
    other = path.with_name("other-issuer.pem")
    other.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, other


def _refused(world: World, perso: Path, tmp: Path, issuer: Path | None = None) -> str:
    card_dir = tmp / "cards"
    card_dir.mkdir(parents=True, exist_ok=True)
    done = cms("bureau", "--endpoints", world.endpoints, "--bureau", BUREAU, "--state",
               tmp / "state", "personalize", perso, "--issuer-cert", issuer or world.issuer_cert,
               "--mailer-key", world.mailer_pem, "--out", tmp / "out", "--card-dir", card_dir,
               check=False)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp / "out").exists()
    return done.stderr


def _resigned(world: World, path: Path, data: bytes) -> Path:
    """``data`` signed by the issuer HSM itself: a malformed file the issuer signed."""
    from cms.v1 import issuer_pb2_grpc

    world.sign_into(path, data, issuer_pb2_grpc.IssuerHsmStub(
        world.proxy.channel("access-server")))
    return path


def test_files_signed_by_others_or_malformed_are_refused_in_one_line(
        world: World, perso: Path, tmp_path: Path) -> None:
    data = perso.read_bytes()
    # Signed by someone else: with their certificate, or with the issuer's.
    forged, other = _software_signed(tmp_path / "forged.csv", data)
    assert "signature is refused" in _refused(world, forged, tmp_path / "a")
    assert "not by the expected signer" in _refused(world, perso, tmp_path / "b", other)
    changed = tmp_path / "changed.csv"
    changed.write_bytes(data.replace(b"User 001", b"User 00X"))
    Path(f"{changed}.p7s").write_bytes(Path(f"{perso}.p7s").read_bytes())
    assert "message digest differs" in _refused(world, changed, tmp_path / "c")
    lines = data.split(b"\r\n")
    cases = {
        "wrong column count": (b"\r\n".join([*lines[:3], lines[3] + b",extra", *lines[4:]]),
                               "columns"),
        "oversized name": (data.replace(b"User 001", b"U" * 201), "longer than 200"),
        "unknown format": (data.replace(b"cms-personalization-device-data", b"cms-other"),
                           "format"),
        "card count": (data.replace(b",3,", b",4,", 1), "cards"),
    }
    for index, (name, (bad, expected)) in enumerate(cases.items()):
        path = _resigned(world, tmp_path / f"bad-{index}.csv", bad)
        message = _refused(world, path, tmp_path / f"case-{index}")
        assert "personalization file is refused" in message and expected in message, (name,
                                                                                      message)


def test_the_journal_keeps_only_mailer_data(world: World, perso: Path,
                                            templates: dict[str, Path], tmp_path: Path) -> None:
    copy_cards(templates, tmp_path / "cards")
    personalize(world, perso, tmp_path / "cards", tmp_path / "out", tmp_path / "state")
    with sqlite3.connect(tmp_path / "state" / JOURNAL_NAME) as db:
        rows = db.execute("SELECT serial, step, length(mailer_data) FROM cards").fetchall()
    assert sorted(rows) == [(s, 5, 256) for s in sorted(templates)]
