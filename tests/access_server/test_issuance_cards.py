"""The issuer's payloads on the cards: virtual cards initialized for the proxy's issuer key,
imported into the stock, issued through the access server and the proxy's IssuerHsm, then
personalized by the issuance applet itself from the personalization file (the bureau's
part, done by hand here). The card checks the issuer's signature and the binding, so this
shows the file's payloads are what the card accepts, each for its own card only, and that
the user key it stores is the one whose public key the issuer recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore import issuance as I
from cardcore.apdu import parse_response
from cardcore.initialization import CertificateRequest, Certificates
from cardcore.issuance_keys import ec_spki, rsa_spki
from cardcore.sw import SW
from cms import perso_format as F
from cms.runtime.client import load_endpoints
from cms.v1 import stock_pb2 as spb
from cms.v1 import stock_pb2_grpc
from provider.initializer import pack_row
from tests.access_server.test_issuance import Issuer, proxy, user_public_key
from tests.support import stock as S
from tests.support.hsm_proxy import ProxyProcess
from tests.support.issuer import issuer_public_key
from tests.virtual_psd.issuance_host import SoftwareProvider, open_card, select_applet
from virtual_psd.factory import create_card
from virtual_psd.issuance import issuance_state
from virtual_psd.state import load_state

pytestmark = pytest.mark.integration
__all__ = ["proxy"]  # the issuance tests' proxy, with the issuer's keys

PROVIDER = "acme-cards"


class RootCertifier:
    """The provider root of tests/support/stock.py certifying what a card generated, as the
    provider's HSM does (ProviderCa.IssueCardCertificates)."""

    def __init__(self, root: S.Root) -> None:
        self.root = root

    def certificates(self, request: CertificateRequest) -> Certificates:
        device = serialization.load_der_public_key(rsa_spki(request.device_public_key))
        auth = serialization.load_der_public_key(ec_spki(request.issuer_auth_public_key))
        assert isinstance(device, rsa.RSAPublicKey)
        assert isinstance(auth, ec.EllipticCurvePublicKey)
        return Certificates(
            S.card_certificate(self.root, request.serial, device, encipherment=True),
            S.card_certificate(self.root, request.serial, auth, encipherment=False))


def initialized_cards(directory: Path, root: S.Root, issuer_point: bytes,
                      serials: list[str]) -> dict[str, Path]:
    cards = {}
    for n, serial in enumerate(serials):
        path = directory / f"{serial}.json"
        create_card(path, psd_id=f"47905040123400{n:06d}")
        provider = SoftwareProvider(open_card(path).transmit)
        provider.root = RootCertifier(root)  # type: ignore[assignment]
        provider.initialize(serial, issuer_point)
        cards[serial] = path
    return cards


def personalize(path: Path, payload: bytes) -> int:
    card = open_card(path)
    select_applet(card)
    return parse_response(card.transmit(I.personalize(payload)))[1]


@pytest.fixture
def issuer(proxy: ProxyProcess, tmp_path: Path) -> Iterator[Issuer]:
    root = S.make_root(PROVIDER)
    with S.access_server(tmp_path, f"sqlite:///{tmp_path / 'access.db'}", pki=proxy.env.pki,
                         proxy_address=proxy.address) as endpoints:
        stock_pb2_grpc.StockStub(load_endpoints(endpoints).channel("access_server", "admin")) \
            .TrustProvider(spb.TrustProviderRequest(root_certificate=root.der), timeout=30)
        yield Issuer(tmp_path, endpoints, tmp_path / "access.db", root, {})


def issued_cards(proxy: ProxyProcess, issuer: Issuer, serials: list[str], name: str,
                 users: int = 2) -> tuple[dict[str, Path], F.Table]:
    """Virtual cards for ``serials`` in a pack ``PK-name`` of the stock, the first
    ``users`` of them issued in batch ``B-name`` (the personalization file, read)."""
    point = issuer_public_key(proxy).public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)
    cards = initialized_cards(issuer.directory, issuer.root, point, serials)
    rows = [pack_row(select_applet(open_card(path)), issuer.root.certificate)
            for path in cards.values()]
    pack = S.make_pack(issuer.root, f"PK-{name}", rows)
    (issuer.directory / f"PK-{name}.csv").write_bytes(pack.data)
    (issuer.directory / f"PK-{name}.csv.p7s").write_bytes(pack.signature)
    issuer.cms("packs", "import", str(issuer.directory / f"PK-{name}.csv"))
    user_ids = [issuer.add_user(f"User {n}") for n in range(users)]
    out = issuer.directory / "out"
    out.mkdir()
    issuer.cms("issue", "--pack", f"B-{name}", "--users", str(issuer.users_file(user_ids)),
               "--out", str(out))
    return cards, F.read_perso((out / f"B-{name}.csv").read_bytes())


def test_the_cards_accept_their_own_payloads_only(proxy: ProxyProcess, issuer: Issuer) -> None:
    serials = ["ACME-C-001", "ACME-C-002"]
    cards, table = issued_cards(proxy, issuer, serials, "CARDS")
    assert [r.serial for r in table.rows] == serials
    first, second = table.rows

    # Card A refuses B's payload and is unchanged; each takes its own, once.
    before = cards[first.serial].read_bytes()
    assert personalize(cards[first.serial], second.payload) != SW.OK
    assert cards[first.serial].read_bytes() == before
    for row in table.rows:
        assert personalize(cards[row.serial], row.payload) == SW.OK
        state = issuance_state(load_state(cards[row.serial]))
        assert state.life_cycle is I.LifeCycle.PERSONALIZED
        assert state.issuance_id == table.header.file_serial and state.sequence == 1
        assert user_public_key(state.user_private_key) == row.user_public_key
    assert personalize(cards[first.serial], first.payload) != SW.OK
