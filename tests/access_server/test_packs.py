"""The pack checks of access_server.packs on their own (no server): the signer and the card
certificates in the cases the import tests do not reach, an EC point off the curve, and a
signature that is not what a provider's root makes."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import cms as acms
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from access_server import packs
from tests.support import stock as S

PROVIDER = "acme-cards"


@pytest.fixture(scope="module")
def root() -> S.Root:
    return S.make_root(PROVIDER)


@pytest.fixture(scope="module")
def trusted(root: S.Root) -> list[packs.Root]:
    return [packs.check_root(root.der, S.now())]


@pytest.fixture(scope="module")
def keys() -> S.DeviceKeys:
    return S.DeviceKeys()


def verify(pack: S.Pack, trusted: list[packs.Root]) -> packs.VerifiedPack:
    return packs.verify_pack(pack.data, pack.signature, trusted, S.now())


def refusal(pack: S.Pack, trusted: list[packs.Root]) -> packs.PackRefused:
    with pytest.raises(packs.PackRefused) as err:
        verify(pack, trusted)
    return err.value


def test_a_good_pack_gives_its_cards_in_order(root: S.Root, trusted: list[packs.Root],
                                              keys: S.DeviceKeys) -> None:
    rows = [S.card_row(root, f"C-{i}", k) for i, k in enumerate(keys.take(2), start=1)]
    verified = verify(S.make_pack(root, "PK-1", rows), trusted)
    assert [(c.serial, c.position) for c in verified.cards] == [("C-1", 1), ("C-2", 2)]
    assert verified.root.provider_id == PROVIDER
    assert verified.cards[0].device_public_key == rows[0].device_public_key
    assert int.from_bytes(verified.cards[0].modulus, "big").bit_length() == 2048


def test_a_signer_the_root_certified_is_accepted(root: S.Root, trusted: list[packs.Root],
                                                 keys: S.DeviceKeys) -> None:
    signer = S.make_root(PROVIDER, issuer=root)
    data = S.pack_bytes("PK-2", PROVIDER, [S.card_row(root, "D-1", keys.take(1)[0])])
    assert verify(S.Pack(data, S.sign(signer, data)), trusted).root == trusted[0]


def _card(root: S.Root, keys: S.DeviceKeys, serial: str, **certificate: object):
    """A row whose device certificate is made with ``certificate`` options."""
    row = S.card_row(root, serial, keys.take(1)[0])
    device = packs._load_certificate(row.device_certificate).public_key()
    return row._replace(device_certificate=S.card_certificate(root, serial, device,
                                                              **certificate))


@pytest.mark.parametrize("options, reason", [
    ({"encipherment": False}, "keyUsage lacks key_encipherment"),
    ({"encipherment": True, "ca": True}, "is a CA certificate"),
    ({"encipherment": True, "days": 10, "not_before": S.now() - dt.timedelta(days=30)},
     "expired on"),
], ids=["usage", "ca", "expired"])
def test_a_card_certificate_out_of_profile_is_refused(root: S.Root, trusted: list[packs.Root],
                                                      keys: S.DeviceKeys, options: dict,
                                                      reason: str) -> None:
    row = _card(root, keys, "E-1", **options)
    err = refusal(S.make_pack(root, "PK-3", [row]), trusted)
    assert err.refusal is packs.Refusal.BAD_CERTIFICATE and err.row == 1
    assert reason in str(err)


def test_a_certificate_for_another_card_or_key_is_refused(root: S.Root,
                                                          trusted: list[packs.Root],
                                                          keys: S.DeviceKeys) -> None:
    first, second = (S.card_row(root, s, k) for s, k in zip(("F-1", "F-2"), keys.take(2),
                                                             strict=True))
    err = refusal(S.make_pack(root, "PK-4", [first, second._replace(
        device_certificate=first.device_certificate)]), trusted)
    assert "row 2: device certificate: subject" in str(err) and "is not card F-2" in str(err)
    other = S.card_row(root, "F-3", keys.take(1)[0])
    err = refusal(S.make_pack(root, "PK-5", [other._replace(
        device_public_key=S.card_row(root, "F-3", keys.take(1)[0]).device_public_key)]),
        trusted)
    assert "certifies another key than the row's" in str(err)


def test_an_issuer_authentication_point_off_the_curve_is_a_weak_key(
        root: S.Root, trusted: list[packs.Root], keys: S.DeviceKeys) -> None:
    row = S.card_row(root, "G-1", keys.take(1)[0])
    spki = bytearray(row.issuer_auth_public_key)
    spki[-1] ^= 1                                   # the point's Y: no longer on P-256
    err = refusal(S.make_pack(root, "PK-6", [row._replace(issuer_auth_public_key=bytes(spki))]),
                  trusted)
    assert err.refusal is packs.Refusal.WEAK_KEY
    assert "row 1: issuer authentication public key is weak: EC public point is not on P-256" \
        in str(err)


def _resigned_attributes(root: S.Root, signature: bytes, edit) -> bytes:
    """The signature with its signed attributes changed by ``edit`` and signed again."""
    info = acms.ContentInfo.load(signature)
    signer = info["content"]["signer_infos"][0]
    attrs = acms.CMSAttributes([a for a in edit(list(signer["signed_attrs"]))])
    signer["signed_attrs"] = attrs
    signer["signature"] = root.key.sign(attrs.dump(), ec.ECDSA(hashes.SHA256()))
    return info.dump(force=True)


def test_a_signature_without_its_content_type_or_over_data_content_is_refused(
        root: S.Root, trusted: list[packs.Root], keys: S.DeviceKeys) -> None:
    pack = S.make_pack(root, "PK-7", [S.card_row(root, "H-1", keys.take(1)[0])])
    without = _resigned_attributes(root, pack.signature,
                                   lambda attrs: [a for a in attrs
                                                  if a["type"].native != "content_type"])
    err = refusal(S.Pack(pack.data, without), trusted)
    assert err.refusal is packs.Refusal.BAD_SIGNATURE and "one content_type" in str(err)
    same = _resigned_attributes(root, pack.signature, lambda attrs: attrs)
    assert verify(S.Pack(pack.data, same), trusted).header.pack_serial == "PK-7"
    err = refusal(S.Pack(pack.data, b"\x30\x00"), trusted)
    assert err.refusal is packs.Refusal.BAD_SIGNATURE and "not DER CMS" in str(err)


def test_roots_are_checked_at_the_given_time(root: S.Root) -> None:
    later = S.now() + dt.timedelta(days=4000)
    with pytest.raises(packs.RootRefused, match="expired on"):
        packs.check_root(root.der, later)
    nameless = S.make_root("x")
    assert packs.check_root(nameless.der, S.now()).provider_id == "x"
