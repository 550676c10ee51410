"""Flow B3-B4 end to end: the issuer issues, the bureau personalizes, the issuer imports.

Virtual cards initialized for the proxy's issuer key go into the access
server's stock; ``cms issue`` writes the signed personalization file; the
bureau takes it with the issuer's public key alone (``--issuer-cert`` given
the PEM of IssuerKeys.GetIssuerKey), personalizes the cards and makes their
PIN and PUK; the issuer trusts the bureau's certificate and imports the
results (``cms issue results``): the cards are personalized in the stock;
the mailing house writes the letters from the bureau's mailing file and
signs its dispatch confirmation; the issuer trusts the mailing house's
certificate and imports it (``cms issue dispatched``): the cards are
shipped. The bureau's and the mailing house's keys are in the same proxy,
each made by its own identity. Every refused dispatch confirmation (no
trusted signer, signed by the bureau, changed, an unknown or unissued card,
a card without its result, a malformed row, one imported twice) is one
line and leaves the stock as it was.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pypdf import PdfReader

from cms import perso_format as F
from cms.v1 import partners_pb2 as ppb
from cms.v1 import partners_pb2_grpc
from provider.initializer import pack_row
from tests.access_server.test_issuance import proxy
from tests.access_server.test_issuance_cards import initialized_cards, issuer
from tests.bureau.test_personalize import bureau_certificate
from tests.bureau.world import MAILER, World, card_state, cms
from tests.support import stock as S
from tests.support.hsm_proxy import ProxyProcess
from tests.support.issuer import issuer_public_key
from tests.virtual_psd.issuance_host import open_card, select_applet

pytestmark = pytest.mark.integration
__all__ = ["issuer", "proxy"]  # the issuance tests' proxy and access server

PACK = "B4-FLOW"


def test_issued_personalized_and_imported(proxy: ProxyProcess, issuer, tmp_path: Path) -> None:
    (tmp_path / "partners").mkdir()
    world = World(proxy, tmp_path / "partners")
    world.setup()
    issuer_pem = tmp_path / "issuer-key.pem"
    issuer_pem.write_bytes(issuer_public_key(proxy).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    serials = ["FLOW-0001", "FLOW-0002", "FLOW-0003"]  # the third stays in stock
    card_dir = tmp_path / "cards"
    card_dir.mkdir()
    cards = initialized_cards(card_dir, issuer.root, world.issuer_point, serials)
    rows = [pack_row(select_applet(open_card(path)), issuer.root.certificate)
            for path in cards.values()]
    pack = S.make_pack(issuer.root, "PK-FLOW", rows)
    (tmp_path / "PK-FLOW.csv").write_bytes(pack.data)
    (tmp_path / "PK-FLOW.csv.p7s").write_bytes(pack.signature)
    issuer.cms("packs", "import", str(tmp_path / "PK-FLOW.csv"))
    users = [issuer.add_user("Ada Lovelace"), issuer.add_user("Alan Turing")]
    issued = tmp_path / "issued"
    issued.mkdir()
    issuer.cms("issue", "--pack", PACK, "--users", str(issuer.users_file(users)),
               "--out", str(issued))

    out = tmp_path / "bureau"
    done = cms("bureau", "--endpoints", world.endpoints, "--bureau", "bureau-1", "--state",
               tmp_path / "state", "personalize", issued / f"{PACK}.csv", "--issuer-cert",
               issuer_pem, "--mailer-key", world.mailer_pem, "--out", out, "--card-dir",
               card_dir)
    assert "2 of 2 card(s) final, 2 personalized" in done.stdout, done.stdout

    bureau_pem = tmp_path / "bureau.pem"
    bureau_pem.write_bytes(x509.load_der_x509_certificate(bureau_certificate(world))
                           .public_bytes(serialization.Encoding.PEM))
    issuer.cms("bureaus", "trust", "--cert", str(bureau_pem))

    # The mailing house may write its letters before the issuer has the results: the
    # issuer takes its dispatch confirmation only for cards the results call personalized.
    letters = tmp_path / "letters"
    cms("mailer", "--endpoints", world.endpoints, "--mailer", MAILER, "letters",
        out / f"{PACK}{F.MAILING_SUFFIX}", "--signer", bureau_pem, "--out", letters)
    for serial in serials[:2]:
        state = card_state(cards[serial])
        assert state.pin is not None
        text = PdfReader(letters / f"{serial}-pin.pdf").pages[0].extract_text()
        assert state.pin.decode() in text
    dispatch = letters / f"{PACK}-dispatch.csv"
    refused = Refusals(issuer, world, tmp_path, dispatch)
    assert "not signed by a mailing house the issuer trusts (cms mailers trust" in \
        refused.cms("issue", "dispatched", str(dispatch))
    assert "trusted: post-1" in issuer.cms("mailers", "trust", "--cert",
                                           str(world.mailer_cert)).stdout
    assert "1 mailing house(s)" in issuer.cms("mailers", "list").stdout
    assert "row 1: card FLOW-0001 is issued, not personalized: import the bureau's results " \
        "first" in refused.cms("issue", "dispatched", str(dispatch))

    imported = issuer.cms("issue", "results", str(out / f"{PACK}-results.csv"))
    assert "2 personalized" in imported.stdout, imported.stdout
    assert issuer.stock()["personalized"] == 2
    # Results already imported are refused a second time, naming why.
    again = issuer.cms("issue", "results", str(out / f"{PACK}-results.csv"), check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr

    refused.before = issuer.stock()
    # The bureau's certificate, trusted for results, does not stand for a mailing house.
    assert "not signed by a mailing house the issuer trusts" in refused.signed_by_bureau()
    refused.all_of(serials)
    dispatched = issuer.cms("issue", "dispatched", str(dispatch))
    assert "the letters of 2 card(s) sent, the cards shipped" in dispatched.stdout
    stock = issuer.stock()
    assert (stock["shipped"], stock["personalized"], stock["in_stock"]) == (2, 0, 1)
    header, row = issuer.cms("stock").stdout.splitlines()[:2]
    assert row.split()[header.split().index("shipped")] == "2"
    refused.before = stock
    assert "row 1: card FLOW-0001's letters were dispatched already" in refused.cms(
        "issue", "dispatched", str(dispatch))


class Refusals:
    """Dispatch confirmations the issuer refuses, each in one line with the stock as it was."""

    def __init__(self, issuer: Any, world: World, tmp_path: Path, dispatch: Path) -> None:
        self.issuer, self.world, self.dir = issuer, world, tmp_path / "refused"
        self.dir.mkdir()
        self.table = F.read_dispatch(dispatch.read_bytes())
        self.before = issuer.stock()

    def cms(self, *args: str) -> str:
        done = self.issuer.cms(*args, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done
        assert "Traceback" not in done.stderr
        assert self.issuer.stock() == self.before
        return done.stderr

    def _import(self, data: bytes, signature: bytes) -> str:
        path = self.dir / "dispatch.csv"
        path.write_bytes(data)
        path.with_name(path.name + ".p7s").write_bytes(signature)
        return self.cms("issue", "dispatched", str(path))

    def _mailer_signature(self, data: bytes) -> bytes:
        """The mailing house's signature over ``data`` by its key in its token."""
        return partners_pb2_grpc.MailerHsmStub(self.world.proxy.channel("mailer")) \
            .SignMailerFile(ppb.SignMailerFileRequest(
                mailer=MAILER, purpose="dispatch test", sha256=hashlib.sha256(data).digest()),
                timeout=60).signature

    def mailer_signed(self, data: bytes) -> str:
        return self._import(data, self._mailer_signature(data))

    def signed_by_bureau(self) -> str:
        data = self._rows(list(self.table.rows))
        signature = partners_pb2_grpc.BureauHsmStub(self.world.proxy.channel("bureau")) \
            .SignBureauFile(ppb.SignBureauFileRequest(
                bureau="bureau-1", purpose="dispatch test", sha256=hashlib.sha256(
                    data).digest()), timeout=60).signature
        return self._import(data, signature)

    def _rows(self, rows: list[F.DispatchRow], serial: bytes | None = None) -> bytes:
        header = self.table.header._replace(card_count=len(rows))
        if serial is not None:
            header = header._replace(file_serial=serial)
        return F.write_dispatch(header, rows)

    def all_of(self, serials: list[str]) -> None:
        """An unknown card, a card in stock, another issuance, a malformed row, a change."""
        now = datetime.now(UTC)
        rows = list(self.table.rows)
        assert "row 3: card FLOW-9999 was not issued" in self.mailer_signed(
            self._rows([*rows, F.DispatchRow("FLOW-9999", now)]))
        assert f"row 3: card {serials[2]} was not issued" in self.mailer_signed(
            self._rows([*rows, F.DispatchRow(serials[2], now)]))
        assert "row 1: card FLOW-0001 is not in this personalization file" in \
            self.mailer_signed(self._rows(rows, serial=bytes(16)))
        good = self._rows(rows)
        lines = good.split(b"\n")
        first = next(i for i, line in enumerate(lines) if line.startswith(b"FLOW-0001,"))
        lines[first] = b"FLOW-0001,yesterday"
        message = self.mailer_signed(b"\n".join(lines))
        assert "dispatch refused" in message and "dispatched_at" in message, message
        assert "message digest differs" in self._import(good, self._mailer_signature(
            good + b"x"))
