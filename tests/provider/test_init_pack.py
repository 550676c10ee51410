"""``cms provider`` end to end: a real proxy on SoftHSM2 (ProviderCa, CardKeys), mutual TLS,
the card factory's transport master from its ceremony, in-process virtual cards; the pack
checked by openssl, which we did not write."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cms.pack_format import read_pack
from cms.runtime.client import load_endpoints
from cms.v1 import card_keys_pb2_grpc, provider_pb2_grpc
from provider.cards import new_card, virtual_cards
from provider.initializer import CardInitialization
from provider.pack import Certifier, initialize_cards
from tests.provider.stack import PROVIDER_ID, TRANSPORT_MASTER, Provider, provider_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    with provider_stack(tmp_path_factory.mktemp("provider")) as p:
        yield p


def _openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, check=False)


def _verify_signature(pack: Path, signature: Path, root: Path) -> subprocess.CompletedProcess:
    # openssl's default purpose (S/MIME signing): the root's key usage has to allow it.
    return _openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", str(signature),
                    "-content", str(pack), "-CAfile", str(root), "-out", "/dev/null")


def test_a_pack_of_three_cards_checks_with_openssl(provider: Provider, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = provider.init_pack(out)
    packs = sorted(out.glob("*.csv"))
    assert len(packs) == 1, done.stdout
    pack = packs[0]
    parsed = read_pack(pack.read_bytes())
    assert parsed.header.card_count == 3 and len(parsed.rows) == 3
    assert parsed.header.provider_id == PROVIDER_ID
    assert pack.name == f"{parsed.header.pack_serial}.csv"
    assert len({r.serial for r in parsed.rows}) == 3
    assert done.stdout.count("initialized") == 3
    for row in parsed.rows:
        for name, der in (("device", row.device_certificate),
                          ("iak", row.issuer_auth_certificate)):
            pem = tmp_path / f"{row.serial}-{name}.pem"
            pem.write_bytes(x509.load_der_x509_certificate(der).public_bytes(
                serialization.Encoding.PEM))
            checked = _openssl("verify", "-CAfile", str(provider.root), str(pem))
            assert checked.returncode == 0, checked.stderr.decode()

    signature = pack.with_name(pack.name + ".p7s")
    ok = _verify_signature(pack, signature, provider.root)
    assert ok.returncode == 0, ok.stderr.decode()
    tampered = tmp_path / "tampered.csv"
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    assert _verify_signature(tampered, signature, provider.root).returncode != 0


def test_a_sealed_pack_opens_for_the_issuer_only(provider: Provider, tmp_path: Path) -> None:
    out = tmp_path / "sealed"
    done = provider.init_pack(out, "--encrypt-to", str(provider.issuer.certificate),
                              cards=1)
    assert "no plaintext copy kept" in done.stdout
    assert not list(out.glob("*.csv")) and not list(out.glob("*.p7s"))
    (sealed_pack,) = out.glob("*.csv.p7m")
    (sealed_signature,) = out.glob("*.csv.p7s.p7m")
    opened = {}
    for name, path in (("pack", sealed_pack), ("signature", sealed_signature)):
        result = _openssl("cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(path),
                          "-recip", str(provider.issuer.certificate), "-inkey",
                          str(provider.issuer.private_key))
        assert result.returncode == 0, result.stderr.decode()
        opened[name] = tmp_path / name
        opened[name].write_bytes(result.stdout)
    assert read_pack(opened["pack"].read_bytes()).header.card_count == 1
    ok = _verify_signature(opened["pack"], opened["signature"], provider.root)
    assert ok.returncode == 0, ok.stderr.decode()


def test_an_unknown_provider_root_is_one_line(provider: Provider, tmp_path: Path) -> None:
    done = provider.init_pack(tmp_path / "out", "--provider-id", "nobody", check=False)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "no provider root 'nobody'" in done.stderr
    assert not list((tmp_path / "out").glob("*.csv*"))


def test_initialized_cards_are_skipped_and_no_empty_pack_is_written(provider: Provider,
                                                                    tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    provider.init_pack(tmp_path / "first", "--card-dir", str(cards), cards=1)
    again = provider.init_pack(tmp_path / "second", "--card-dir", str(cards), cards=1,
                               check=False, master=False)
    assert again.returncode != 0
    assert "skipped" in again.stdout and "already initialized" in again.stdout
    assert "no card was initialized" in again.stderr
    assert not list((tmp_path / "second").glob("*.csv*"))


def _secrets(provider: Provider) -> list[bytes]:
    stack = provider.endpoints.parent
    pins = [p.read_bytes().strip() for p in stack.rglob("*pin") if p.is_file()]
    assert pins, "the stack's PIN files were not found"
    return [*pins, TRANSPORT_MASTER, TRANSPORT_MASTER.hex().encode(),
            TRANSPORT_MASTER.hex().upper().encode(), b"PRIVATE KEY"]


def test_no_private_key_or_pin_in_the_output(provider: Provider, tmp_path: Path) -> None:
    out = tmp_path / "out"
    provider.init_pack(out, cards=1)
    state = provider.endpoints.parent / "provider"
    files = [p for p in (*out.rglob("*"), *state.rglob("*")) if p.is_file()]
    assert any(p.suffix == ".csv" for p in files)
    for secret in _secrets(provider):
        for path in files:
            if path.suffix == ".json" and path.parent.name == "cards":
                continue           # the virtual cards' own state holds their keys, as a card does
            assert secret not in path.read_bytes(), (path, secret[:4])


# APDUs of a card: 1-4 identify (SELECT ISD, CPLC, SELECT, DF00), 5-7 the applet's probe,
# 8 EXTERNAL AUTHENTICATE, 9 GENERATE KEYS, 10 PUT serial, 11 PUT issuer key, 12-13 the
# certificates, 14 CERTIFY DEVICE KEY, 15 ACTIVATE.
@pytest.mark.parametrize("fault", ["power-loss@10", "tear@9", "power-loss@15"])
def test_a_card_that_loses_power_is_left_out_and_initializes_later(
        provider: Provider, tmp_path: Path, fault: str) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    # Two cards that the run finds in the directory; the second loses power midway.
    names = sorted(new_card(cards, TRANSPORT_MASTER).name for _ in range(2))
    endpoints = load_endpoints(provider.endpoints)
    channel = endpoints.channel("hsm_proxy", "provider")
    ca = provider_pb2_grpc.ProviderCaStub(channel)
    card_keys = card_keys_pb2_grpc.CardKeysStub(channel)
    root = x509.load_pem_x509_certificate(provider.root.read_bytes())
    issuer_point = serialization.load_pem_public_key(provider.issuer_key.read_bytes()) \
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    serials = iter(f"TEST-{n}" for n in range(100))

    def run(faults: dict[str, str] | None):
        return list(initialize_cards(
            virtual_cards(cards, None, faults), 2,
            lambda: CardInitialization(card_keys, issuer_point, lambda: next(serials)),
            Certifier(ca, PROVIDER_ID), root))

    try:
        first = run({names[1]: fault})
        outcomes = {o.name: o for o in first}
        assert outcomes[names[0]].row is not None, first
        assert outcomes[names[1]].row is None and "went away" in outcomes[names[1]].reason
        again = {o.name: o for o in run(None)}
        assert again[names[0]].skipped, again
        assert again[names[1]].row is not None, again
    finally:
        channel.close()
