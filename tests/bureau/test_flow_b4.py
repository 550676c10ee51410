"""Flow B3-B4 end to end: the issuer issues, the bureau personalizes, the issuer imports.

Virtual cards initialized for the proxy's issuer key go into the access
server's stock; ``cms issue`` writes the signed personalization file; the
bureau takes it with the issuer's public key alone (``--issuer-cert`` given
the PEM of IssuerKeys.GetIssuerKey), personalizes the cards and makes their
PIN and PUK; the issuer trusts the bureau's certificate and imports the
results (``cms issue results``): the cards are personalized in the stock;
the mailing house writes the letters from the bureau's mailing file. The
bureau's and the mailing house's keys are in the same proxy, each made by
its own identity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pypdf import PdfReader

from cms import perso_format as F
from provider.initializer import pack_row
from tests.access_server.test_issuance import proxy
from tests.access_server.test_issuance_cards import initialized_cards, issuer
from tests.bureau.test_personalize import bureau_certificate
from tests.bureau.world import World, card_state, cms
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
    serials = ["FLOW-0001", "FLOW-0002"]
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
    imported = issuer.cms("issue", "results", str(out / f"{PACK}-results.csv"))
    assert "2 personalized" in imported.stdout, imported.stdout
    assert issuer.stock()["personalized"] == 2

    letters = tmp_path / "letters"
    cms("mailer", "--endpoints", world.endpoints, "--mailer", "post-1", "letters",
        out / f"{PACK}{F.MAILING_SUFFIX}", "--signer", bureau_pem, "--out", letters)
    for serial, path in cards.items():
        state = card_state(path)
        assert state.pin is not None
        text = PdfReader(letters / f"{serial}-pin.pdf").pages[0].extract_text()
        assert state.pin.decode() in text
    # Results already imported are refused a second time, naming why.
    again = issuer.cms("issue", "results", str(out / f"{PACK}-results.csv"), check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
