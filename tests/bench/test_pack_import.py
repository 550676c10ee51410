"""bench/pack_import.py's building blocks on a few cards, so the benchmark cannot rot.

Nothing here is timed: the figures are the benchmark's, not the tests'.
"""

from __future__ import annotations

from itertools import combinations
from math import gcd
from pathlib import Path

import pytest

from access_server import packs, weak_keys
from bench import pack_import as bench
from cardcore.issuance_keys import rsa_from_spki
from tests.support.stock import make_root

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_cards_are_generated_once_then_read_from_the_cache(cache: Path) -> None:
    cards, from_cache = bench.cached_cards(cache, 4, processes=2)
    assert from_cache == 0
    assert [c.serial for c in cards] == [bench.card_serial(i) for i in range(4)]
    again, from_cache = bench.cached_cards(cache, 6, processes=1)
    assert from_cache == 4
    assert again[:4] == cards
    assert len({c.device_public_key for c in again}) == 6


def test_damaged_lines_of_the_cache_are_dropped_and_regenerated(cache: Path) -> None:
    kept = bench.read_cache(cache)
    last = (cache / bench.CACHE_FILE).read_text().splitlines()[-1].split(",")
    with open(cache / bench.CACHE_FILE, "a") as f:
        f.write("BENCH-0000000999,not base64!,\n")
        # Another card's serial on these keys: its signed device key does not verify.
        f.write(",".join([bench.card_serial(len(kept)), *last[1:]]) + "\n")
    assert bench.read_cache(cache) == kept
    cards, from_cache = bench.cached_cards(cache, len(kept) + 1, processes=1)
    assert from_cache == len(kept)
    assert bench.read_cache(cache) == dict(enumerate(cards))
    assert len((cache / bench.CACHE_FILE).read_text().splitlines()) == len(cards)


def test_the_cache_holds_no_private_key(cache: Path) -> None:
    bench.cached_cards(cache, 2, processes=1)
    text = (cache / bench.CACHE_FILE).read_text()
    assert "PRIVATE" not in text
    assert all(len(line.split(",")) == 4 for line in text.splitlines())


def test_raw_verification_accepts_the_bench_packs_and_checks_the_stock(
        cache: Path, tmp_path: Path) -> None:
    cards, _ = bench.cached_cards(cache, 6, processes=1)
    root = make_root(bench.PROVIDER_ID)
    roots = [packs.check_root(root.der, bench.packs_now())]
    first = bench.write_pack_files(tmp_path, root, "BENCH-PACK-1", cards[:3])
    verified = bench.raw_verify(first, roots, [])
    assert [c.serial for c in verified.cards] == [c.serial for c in cards[:3]]
    stock = [(c.serial, bytes(rsa_from_spki(c.device_public_key).modulus)) for c in cards[:3]]
    second = bench.write_pack_files(tmp_path, root, "BENCH-PACK-2", cards[3:6])
    assert len(bench.raw_verify(second, roots, stock).cards) == 3
    # The same cards again share both primes with the stock: the raw run checks it.
    with pytest.raises(packs.PackRefused, match="shares a prime factor"):
        bench.raw_verify(first, roots, stock)


def test_both_imports_go_through_the_access_server(cache: Path, tmp_path: Path) -> None:
    cards, _ = bench.cached_cards(cache, 6, processes=1)
    result = bench.run_imports(tmp_path, cards, 3)
    for name, stock_before in (("empty_stock", 0), ("second_pack", 3)):
        run = result[name]
        assert run["cards"] == 3 and run["stock_before"] == stock_before
        assert run["ratio"] > 0 and run["cpu_s"]["access_server"] >= 0
    assert '"in_stock": 3' in result["stock_after"]
    assert result["stock_after"].count('"pack": "BENCH-PACK-') == 2


def test_coprime_moduli_share_no_factor_and_have_rsa_2048_sizes() -> None:
    moduli = bench.coprime_moduli(6)
    assert {m.bit_length() for m in moduli} == {2048}
    assert all(gcd(a, b) == 1 for a, b in combinations(moduli, 2))
    assert {m.bit_length() for m in bench.random_moduli(5, seed=1)} == {2048}


def test_the_gcd_curve_runs_with_gmpy2_and_python_ints() -> None:
    curve = bench.gcd_curve([10, 20], pack=3)
    assert [p["stock"] for p in curve["gmpy2"]] == [10, 20]
    assert [(g["from"], g["to"]) for g in curve["growth"]] == [(10, 20)]
    assert all(p["against_stock_seconds"] <= p["seconds"] for p in curve["gmpy2"])
    if weak_keys.HAVE_GMPY2:
        assert curve["python_ints"]["stock"] == 10
        assert weak_keys._mpz is not int        # restored after the Python-ints run


def test_a_shared_factor_in_the_curve_is_not_timed_as_if_clean() -> None:
    new = bench.coprime_moduli(3)
    with pytest.raises(RuntimeError, match="shares a factor"):
        bench.time_against_stock(new, [new[0] * 3])
