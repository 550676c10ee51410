"""Key labels are made and read in one place: what is made parses back, and
the forms the proxy's policy and key management check stay the documented ones."""

from __future__ import annotations

import pytest

from cms import keynames as kn


def test_block_labels_parse_back_to_what_made_them() -> None:
    assert (kn.mk_label(3), kn.mkrk_label(1), kn.cryptogram_label(2)) == (
        "mk/3", "mkrk/1", "cryptogram/2")
    for kind in kn.BLOCK_KINDS:
        assert kn.parse_block_label(kn.block_label(kind, 7)) == (kind, 7)
    assert kn.parse_block_label("mk/0") is None
    assert kn.parse_block_label("mk/01") is None
    assert kn.parse_block_label("transport/x") is None


@pytest.mark.parametrize("version", [0, -1, None, "1"])
def test_a_block_version_is_a_positive_int(version: object) -> None:
    with pytest.raises(ValueError, match="block versions start at 1"):
        kn.mk_label(version)  # type: ignore[arg-type]


def test_named_labels() -> None:
    assert kn.parse_named_label(kn.transport_label("link-1")) == (kn.TRANSPORT, "link-1")
    assert kn.parse_named_label(kn.AUDIT_KEY) == (kn.AUDIT, "hsm-proxy")
    for bad in ("transport/", "transport/-x", "transport/a/b", "transport/" + "x" * 65,
                "mk/1", kn.FACTORY_TRANSPORT_MASTER):
        assert kn.parse_named_label(bad) is None, bad


def test_label_patterns_cover_every_label_of_their_kind() -> None:
    assert [kn.label_pattern(k) for k in kn.BLOCK_KINDS] == ["mk/*", "mkrk/*", "cryptogram/*"]
    assert kn.label_pattern(kn.TRANSPORT) == "transport/*"
    with pytest.raises(ValueError):
        kn.label_pattern(kn.FACTORY)


def test_label_kind_reads_the_same_forms() -> None:
    assert kn.label_kind(kn.mkrk_label(4)) == kn.MKRK
    assert kn.label_kind(kn.transport_label("t")) == kn.TRANSPORT
    assert kn.label_kind(kn.FACTORY_TRANSPORT_MASTER) == kn.FACTORY
    assert kn.label_kind("transport/a/b") == "reserved"
    assert kn.label_kind("demo/mine") is None


def test_provider_root_and_issuer_key_labels_parse_back() -> None:
    assert kn.provider_root_label("acme-1") == "provider-root/acme-1"
    assert kn.parse_provider_root_label(kn.provider_root_label("acme-1")) == "acme-1"
    assert kn.issuer_key_label(1) == "issuer/1"
    assert [kn.parse_issuer_key_label(kn.issuer_key_label(v)) for v in (1, 255)] == [1, 255]
    for bad in ("issuer/0", "issuer/256", "issuer/01", "issuer/x"):
        assert kn.parse_issuer_key_label(bad) is None, bad
        assert kn.label_kind(bad) == "reserved", bad
    for bad in ("provider-root/", "provider-root/-x", "provider-root/a/b"):
        assert kn.parse_provider_root_label(bad) is None, bad
        assert kn.label_kind(bad) == "reserved", bad
    assert kn.label_kind("issuer/7") == kn.ISSUER
    assert kn.label_kind("provider-root/acme") == kn.PROVIDER_ROOT
    assert kn.label_pattern(kn.PROVIDER_ROOT) == "provider-root/*"


@pytest.mark.parametrize("version", [0, 256, None, "1"])
def test_an_issuer_key_version_is_one_byte(version: object) -> None:
    with pytest.raises(ValueError, match="1 to 255"):
        kn.issuer_key_label(version)  # type: ignore[arg-type]


@pytest.mark.parametrize("provider_id", ["", "-x", "a/b", "x" * 65, None])
def test_a_provider_id_is_a_name(provider_id: object) -> None:
    with pytest.raises(ValueError, match="provider id"):
        kn.provider_root_label(provider_id)  # type: ignore[arg-type]


def test_the_partners_labels_parse_back_and_reserve_their_prefixes() -> None:
    for kind in (kn.BUREAU, kn.BUREAU_CODES, kn.MAILER, kn.MAILER_SIGN):
        label = kn.partner_label(kind, "house-1")
        assert label == f"{kind}/house-1"
        assert kn.parse_partner_label(label) == (kind, "house-1")
        assert kn.label_kind(label) == kind
        assert kn.label_pattern(kind) == f"{kind}/*"
        for bad in (f"{kind}/", f"{kind}/-x", f"{kind}/a/b"):
            assert kn.parse_partner_label(bad) is None, bad
            assert kn.label_kind(bad) == "reserved", bad
    with pytest.raises(ValueError, match="partner key"):
        kn.partner_label("issuer", "x")
    with pytest.raises(ValueError, match="bureau name"):
        kn.partner_label(kn.BUREAU, "a b")
