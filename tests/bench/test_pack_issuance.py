"""bench/pack_issuance.py's building blocks on a few cards, so the benchmark cannot rot.

Nothing here is timed: the figures are the benchmark's, not the tests'. The
raw run's payloads are opened as a card opens them (the issuer's signature
by the raw token's key, the bundle by a device key this test holds), and
the service run checks its own spot cards and has the bureau personalize
real virtual cards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench import pack_issuance as bench
from bench.pack_import import cached_cards
from cardcore import personalization as perso
from cardcore.issuance import EC_POINT_LENGTH
from cardcore.issuance_keys import rsa_from_spki
from hsm_proxy import bip32

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CARDS = 3


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bench.RawHsm]:
    saved = dict(os.environ)
    with bench.raw_hsm(tmp_path_factory.mktemp("raw")) as hsm:
        yield hsm
    os.environ.clear()
    os.environ.update(saved)


def test_spot_cards_sit_first_between_and_last() -> None:
    assert bench.spot_positions(10_000, 3) == [0, 5000, 9999]
    assert bench.spot_positions(3, 3) == [0, 1, 2]
    assert bench.spot_positions(1, 3) == [0]
    assert bench.spot_positions(5, 0) == []


def test_a_raw_payload_is_one_the_card_takes(raw: bench.RawHsm) -> None:
    spot = bench.spot_cards(1)[0]
    device = spot.device.public_key().public_bytes(bench.DER, bench.SPKI)
    seed = os.urandom(64)

    payload = perso.decode_payload(bench.raw_card(raw, seed, 7, spot.serial, device))

    issuer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw.issuer_point)
    issuer.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    binding = payload.binding
    assert binding.serial == spot.serial and binding.issuer_key_id == raw.key_id
    assert binding.device_key_fingerprint == perso.device_key_fingerprint(
        rsa_from_spki(device))
    bundle = perso.decode_bundle(spot.device.decrypt(payload.ciphertext, bench.OAEP_SHA1))
    assert bundle.user_private_key == bip32.user_key(seed, 7).key.to_bytes(32, "big")
    assert len(bundle.device_auth_public_key) == EC_POINT_LENGTH and bundle.pin is None
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bundle.device_auth_public_key)


def test_the_raw_rate_runs_over_the_packs_cards(raw: bench.RawHsm) -> None:
    spot = bench.spot_cards(1)[0]
    cards = [(spot.serial, spot.device.public_key().public_bytes(bench.DER, bench.SPKI))]
    assert bench.raw_rate(raw, cards, 3, bench.Step(None, "raw", 3)) > 0


def test_a_bad_payload_fails_the_spot_check() -> None:
    issuer = ec.generate_private_key(ec.SECP256R1())
    spot = bench.spot_cards(1)[0]
    row = bench.F.PersoRow(spot.serial, b"\x01" + bytes(300), "A", "B", bytes(33))
    with pytest.raises(perso.PayloadError):
        bench.check_spot(row, spot, bytes(16), issuer.public_key())


def test_issuance_and_the_bureau_go_through_the_services(raw: bench.RawHsm,
                                                         tmp_path: Path) -> None:
    cached, _ = cached_cards(tmp_path / "cache", CARDS, processes=1)
    from tests.support.stock import make_root

    root = make_root(bench.PROVIDER_ID)
    with bench.issuer_stack(tmp_path) as stack:
        bench.trust_root(stack, tmp_path, root)
        issued = bench.measure_issuance(stack, raw, tmp_path, root, cached, raw_cards=2)
        bureau = bench.measure_bureau(stack, tmp_path, root, 2)

    assert issued["cards"] == CARDS and issued["ratio"] > 0
    assert issued["spot_checks"]["rows"] == CARDS
    assert issued["spot_checks"]["cards_opened"] == [f"BENCH-SPOT-{i:03d}" for i in range(3)]
    assert set(issued["cpu_s"]) == {"access_server", "proxy_and_workers", "cli"}
    assert issued["cpu_s"]["proxy_and_workers"] > 0
    assert bureau["cards"] == 2 and bureau["cards_per_second"] > 0
    assert any(name.endswith("-results.csv") for name in bureau["outputs"]), bureau
