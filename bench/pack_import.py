"""Pack import benchmark: ``cms packs import`` through the access server beside its raw checks.

Prints one JSON object:

- ``imports``: two packs of ``--cards`` cards each, ``empty_stock`` (the first
  pack into an empty stock) and ``second_pack`` (another pack into the stock
  holding the first). For each, ``service_rows_per_second``: the wall time
  of ``cms packs import FILE`` run as a subprocess (the CLI a user waits
  for: read the file and its .p7s, stream them over mutual TLS to a real
  access server process on SQLite, which verifies, checks against the stock
  and inserts in one transaction); ``raw_rows_per_second``: the same
  verifications in this process, with no server, RPC or store:
  ``access_server.packs.verify_pack`` (the detached CMS signature, the
  file's shape, both card certificates and the signed device key of each
  row, the weak-key checks of ``access_server.weak_keys``: ROCA, exponent,
  modulus size, P-256 point) and ``packs.check_shared_primes`` (batch GCD
  over the pack and against the stock present at that import), measured
  just before and just after the service import (``raw_before_after``; the
  mean is used); ``ratio`` = service rows/s / raw rows/s; ``cpu_s``: CPU
  seconds of the access server process and of the CLI process during the
  import.
- ``gcd_curve``: ``weak_keys.check_against_stock`` of ``--gcd-pack`` new
  moduli against stocks of ``--gcd-stock`` sizes, with gmpy2 and, for the
  smallest size, with Python ints; seconds (the best of three up to 10,000
  keys), the part of them that the stock adds and its microseconds per
  stock key, and each step's growth beside n log n's. The moduli are
  synthetic 2048-bit integers: the stock's random and odd with the top bit
  set, the new ones products of distinct 64-bit primes, so that none shares
  a factor and the partner search (which only weak keys trigger) stays out
  of the timing. They are not RSA moduli: the product and remainder trees
  cost what the numbers' sizes make them cost, not what their factors are.
- ``cache``: device keys are RSA-2048, whose generation would dominate the
  run, so generated cards are kept in ``--cache`` between runs: each entry
  is a card serial, its device and issuer authentication public keys and
  its signed device key (public material only; the private keys are
  dropped as soon as the signature is made). New entries are generated in
  parallel processes. The output says how many cards came from the cache.

Packs are built as ``tests/support/stock.py`` builds them (a software root
CA, card certificates from it, a detached CMS signature from cryptography's
PKCS#7 builder); building them is not timed.

Usage: .venv/bin/python bench/pack_import.py [--cards 10000] [--gcd-stock 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import base64
import csv
import fcntl
import multiprocessing
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from math import gcd, log
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from access_server import packs, weak_keys  # noqa: E402
from cardcore.issuance import IssuanceError, device_key_statement  # noqa: E402
from cardcore.issuance_keys import rsa_from_spki  # noqa: E402
from cms.pack_format import SIGNATURE_SUFFIX, PackRow  # noqa: E402

DEFAULT_CACHE = Path.home() / ".cache" / "cms-bench" / "pack-import"
CACHE_FILE = "cards-v1.csv"
"""One line per card: serial and three base64 fields (``CachedCard``)."""
LOCK_FILE = "lock"
SERIAL_PREFIX = "BENCH-"
PROVIDER_ID = "bench-provider"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPEATS = 3
REPEAT_UP_TO = 10_000
"""GCD curve points up to this stock size are the best of ``REPEATS`` runs."""
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class CachedCard(NamedTuple):
    """What a card gives its provider at initialization, minus what the root certifies."""

    serial: str
    device_public_key: bytes
    issuer_auth_public_key: bytes
    signed_device_key: bytes


# -- generated cards -----------------------------------------------------------------

def card_serial(index: int) -> str:
    return f"{SERIAL_PREFIX}{index:010d}"


def make_card(index: int) -> CachedCard:
    """Card ``index`` as its applet makes it: keys on chip, the device key signed."""
    device = rsa.generate_private_key(65537, 2048).public_key().public_bytes(DER, SPKI)
    issuer_auth = ec.generate_private_key(ec.SECP256R1())
    serial = card_serial(index)
    signed = issuer_auth.sign(device_key_statement(serial, rsa_from_spki(device)),
                              ec.ECDSA(hashes.SHA256()))
    return CachedCard(serial, device, issuer_auth.public_key().public_bytes(DER, SPKI), signed)


def _encode(card: CachedCard) -> list[str]:
    return [card.serial, *(base64.b64encode(v).decode() for v in card[1:])]


def _index(serial: str) -> int | None:
    digits = serial.removeprefix(SERIAL_PREFIX)
    return int(digits) if serial.startswith(SERIAL_PREFIX) and digits.isdigit() else None


def _decode(fields: list[str]) -> tuple[int, CachedCard] | None:
    """A cache line and its card's index, or None for a damaged line.

    A line counts only if its signed device key verifies over its serial and
    device key with its issuer authentication key: a line cut short or
    overwritten cannot pass for a card.
    """
    if len(fields) != len(CachedCard._fields) or (index := _index(fields[0])) is None:
        return None
    try:
        card = CachedCard(fields[0], *(base64.b64decode(v, validate=True) for v in fields[1:]))
        issuer_auth = serialization.load_der_public_key(card.issuer_auth_public_key)
        if not isinstance(issuer_auth, ec.EllipticCurvePublicKey):
            return None
        issuer_auth.verify(card.signed_device_key, device_key_statement(
            card.serial, rsa_from_spki(card.device_public_key)), ec.ECDSA(hashes.SHA256()))
    except (ValueError, IssuanceError, InvalidSignature):
        return None
    return index, card


def read_cache(directory: Path) -> dict[int, CachedCard]:
    """The sound cards kept so far, by index."""
    path = directory / CACHE_FILE
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return dict(found for fields in csv.reader(f) if (found := _decode(fields)))


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One run at a time reads and extends a cache."""
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached_cards(directory: Path, count: int,
                 processes: int | None = None) -> tuple[list[CachedCard], int]:
    """Cards 0 to ``count - 1`` and how many came from the cache; the others are added to it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CACHE_FILE
    with _locked(directory):
        kept = read_cache(directory)
        missing = [i for i in range(count) if i not in kept]
        from_cache = count - len(missing)
        if missing:
            # Rewrite the sound lines (drops damaged ones), then append as keys arrive.
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(_encode(kept[i]) for i in sorted(kept))
            with open(path, "a", newline="") as f, \
                    multiprocessing.Pool(processes or os.cpu_count()) as pool:
                writer = csv.writer(f)
                for index, card in zip(missing, pool.imap(make_card, missing, chunksize=8),
                                       strict=True):
                    writer.writerow(_encode(card))
                    kept[index] = card
    return [kept[i] for i in range(count)], from_cache


# -- packs ---------------------------------------------------------------------------

def pack_rows(root: Any, cards: Sequence[CachedCard]) -> list[PackRow]:
    """The pack's rows: each card's keys with the two certificates ``root`` signs."""
    from tests.support.stock import card_certificate

    rows = []
    for card in cards:
        device = serialization.load_der_public_key(card.device_public_key)
        issuer_auth = serialization.load_der_public_key(card.issuer_auth_public_key)
        rows.append(PackRow(card.serial, card.device_public_key, card.issuer_auth_public_key,
                            card_certificate(root, card.serial, device, encipherment=True),
                            card_certificate(root, card.serial, issuer_auth,
                                             encipherment=False),
                            card.signed_device_key))
    return rows


def write_pack_files(directory: Path, root: Any, pack_serial: str,
                     cards: Sequence[CachedCard]) -> Path:
    """``<pack_serial>.csv`` and its ``.p7s`` in ``directory``, as a provider sends them."""
    from tests.support.stock import make_pack

    pack = make_pack(root, pack_serial, pack_rows(root, cards))
    path = directory / f"{pack_serial}.csv"
    path.write_bytes(pack.data)
    path.with_name(path.name + SIGNATURE_SUFFIX).write_bytes(pack.signature)
    return path


# -- raw verification ----------------------------------------------------------------

def raw_verify(path: Path, roots: Sequence[packs.Root],
               stock: Sequence[tuple[str, bytes]]) -> packs.VerifiedPack:
    """Every check the import makes, in this process, on the pack file at ``path``."""
    data = path.read_bytes()
    signature = path.with_name(path.name + SIGNATURE_SUFFIX).read_bytes()
    verified = packs.verify_pack(data, signature, roots, packs_now())
    packs.check_shared_primes(verified.cards, stock)
    return verified


def packs_now() -> Any:
    from access_server.store.transactions import utc_now

    return utc_now()


def raw_rate(path: Path, roots: Sequence[packs.Root],
             stock: Sequence[tuple[str, bytes]], rows: int) -> float:
    start = time.perf_counter()
    raw_verify(path, roots, stock)
    return rows / (time.perf_counter() - start)


# -- the service ---------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def access_server_pid() -> int:
    """This process's child running ``cms access-server serve``."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == me and b"access-server" in cmdline and b"serve" in cmdline:
            return int(entry.name)
    raise RuntimeError("no access server process among this process's children")


def cli(endpoints: Path, *args: str) -> str:
    """One ``cms`` command against the access server; its output, or RuntimeError."""
    # The client options belong to the command (``cms packs --endpoints E import F``).
    done = subprocess.run([sys.executable, "-m", "cms.cli", args[0], "--endpoints",
                           str(endpoints), *args[1:]],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"cms {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


class ServiceRun(NamedTuple):
    seconds: float
    server_cpu_s: float
    cli_cpu_s: float


def service_import(endpoints: Path, path: Path, server_pid: int) -> ServiceRun:
    """``cms packs import`` of ``path``, timed from the command's start to its exit."""
    server_before, cli_before = _cpu_seconds(server_pid), _children_cpu()
    start = time.perf_counter()
    out = cli(endpoints, "packs", "import", str(path))
    seconds = time.perf_counter() - start
    if not out.startswith("imported:"):
        raise RuntimeError(f"cms packs import: {out}")
    return ServiceRun(seconds, _cpu_seconds(server_pid) - server_before,
                      _children_cpu() - cli_before)


def trust(endpoints: Path, directory: Path, root: Any) -> packs.Root:
    """Trust ``root`` in the access server (``cms providers trust``) and here."""
    cert = directory / "provider-root.der"
    cert.write_bytes(root.der)
    cli(endpoints, "providers", "trust", "--root-cert", str(cert))
    return packs.check_root(root.der, packs_now())


def measure_import(endpoints: Path, server_pid: int, path: Path, roots: Sequence[packs.Root],
                   stock: Sequence[tuple[str, bytes]], rows: int) -> dict[str, Any]:
    """One pack through the service, its raw checks just before and just after."""
    raw_before = raw_rate(path, roots, stock, rows)
    run = service_import(endpoints, path, server_pid)
    raw_after = raw_rate(path, roots, stock, rows)
    raw = (raw_before + raw_after) / 2
    service = rows / run.seconds
    return {"cards": rows, "stock_before": len(stock), "seconds": round(run.seconds, 2),
            "service_rows_per_second": round(service, 1),
            "raw_rows_per_second": round(raw, 1),
            "raw_before_after": [round(raw_before, 1), round(raw_after, 1)],
            "ratio": round(service / raw, 3),
            "cpu_s": {"access_server": round(run.server_cpu_s, 2),
                      "cli": round(run.cli_cpu_s, 2)}}


def run_imports(workdir: Path, cards: Sequence[CachedCard], per_pack: int) -> dict[str, Any]:
    """The first pack into an empty stock, then a second into the stock holding it."""
    from tests.support.stock import access_server, make_root

    root = make_root(PROVIDER_ID)
    first_cards, second_cards = cards[:per_pack], cards[per_pack:2 * per_pack]
    first = write_pack_files(workdir, root, "BENCH-PACK-1", first_cards)
    second = write_pack_files(workdir, root, "BENCH-PACK-2", second_cards)
    with access_server(workdir / "server") as endpoints:
        pid = access_server_pid()
        roots = [trust(endpoints, workdir, root)]
        empty = measure_import(endpoints, pid, first, roots, [], per_pack)
        stock = [(c.serial, bytes(rsa_from_spki(c.device_public_key).modulus))
                 for c in first_cards]
        held = measure_import(endpoints, pid, second, roots, stock, per_pack)
        counts = cli(endpoints, "stock", "--json")
    return {"empty_stock": empty, "second_pack": held, "stock_after": counts}


# -- the batch GCD curve -------------------------------------------------------------

def random_moduli(count: int, seed: int, bits: int = 2048) -> list[int]:
    """Random odd ``bits``-bit integers with the top bit set: a stock's sizes, not its keys."""
    rng = random.Random(seed)
    return [rng.getrandbits(bits) | 1 << (bits - 1) | 1 for _ in range(count)]


def coprime_moduli(count: int, primes_each: int = 32, prime_bits: int = 64) -> list[int]:
    """``count`` integers of ``primes_each * prime_bits`` bits that share no factor.

    Random integers share small factors (two odd ones have a common factor
    one time in five), which would flag most of a new pack and time the
    partner search instead of the trees. Each of these is the product of
    distinct consecutive primes just below ``2**prime_bits``, so no two share
    a factor, and a random stock integer is divisible by one of those primes
    with odds of about ``count * primes_each / 2**prime_bits``.
    """
    from gmpy2 import mpz, next_prime

    p = mpz(2**prime_bits - 2 ** (prime_bits // 2))
    out = []
    for _ in range(count):
        n = mpz(1)
        for _ in range(primes_each):
            p = next_prime(p)
            n *= p
        out.append(int(n))
    if p >= 2**prime_bits:
        raise ValueError("too many moduli for primes of this size")
    return out


@contextmanager
def python_ints() -> Iterator[None]:
    """``weak_keys`` with Python ints instead of gmpy2, for the comparison."""
    saved = weak_keys._mpz, weak_keys._gcd
    weak_keys._mpz, weak_keys._gcd = int, gcd
    try:
        yield
    finally:
        weak_keys._mpz, weak_keys._gcd = saved


def time_against_stock(new: Sequence[int], stock: Sequence[int]) -> float:
    start = time.perf_counter()
    found = weak_keys.check_against_stock(new, stock)
    seconds = time.perf_counter() - start
    if any(f.shared for f in found):
        raise RuntimeError("a synthetic modulus shares a factor: the partner search was timed")
    return seconds


def best_of(repeats: int, new: Sequence[int], stock: Sequence[int]) -> float:
    """The least of ``repeats`` runs: the machine's other work only ever adds time."""
    return min(time_against_stock(new, stock) for _ in range(repeats))


def gcd_curve(sizes: Sequence[int], pack: int, python_smallest: bool = True) -> dict[str, Any]:
    """Seconds of checking ``pack`` new moduli against each stock size.

    ``pack_alone_seconds`` is the check with no stock (the new moduli's batch
    GCD among themselves): part of every point, and the part that does not
    grow with the stock; ``against_stock_seconds`` is the rest, which does.
    """
    new = coprime_moduli(pack)
    alone = best_of(REPEATS, new, [])
    seconds = {size: best_of(REPEATS if size <= REPEAT_UP_TO else 1, new,
                             random_moduli(size, seed=size)) for size in sizes}
    stock_part = {size: max(t - alone, 1e-6) for size, t in seconds.items()}
    points = [{"stock": size, "seconds": round(t, 3),
               "against_stock_seconds": round(stock_part[size], 3),
               "us_per_stock_key": round(1e6 * stock_part[size] / size, 1)}
              for size, t in seconds.items()]
    growth = [{"from": a, "to": b, "time_ratio": round(seconds[b] / seconds[a], 2),
               "against_stock_ratio": round(stock_part[b] / stock_part[a], 2),
               "n_log_n_ratio": round(b * log(b) / (a * log(a)), 2)}
              for a, b in pairwise(sizes)]
    out: dict[str, Any] = {
        "pack": pack, "moduli": "synthetic 2048-bit: the stock random odd integers with the top "
        "bit set, the new ones products of 32 distinct 64-bit primes (no factor shared, so "
        "none is flagged); the trees cost what the sizes make them cost",
        "pack_alone_seconds": round(alone, 3), "gmpy2": points, "growth": growth}
    if python_smallest and sizes and weak_keys.HAVE_GMPY2:
        smallest = min(sizes)
        with python_ints():
            slow = time_against_stock(new, random_moduli(smallest, seed=smallest))
        out["python_ints"] = {"stock": smallest, "seconds": round(slow, 3),
                              "times_gmpy2": round(slow / seconds[smallest], 1)}
    return out


# -- main ----------------------------------------------------------------------------

def versions() -> dict[str, Any]:
    import cryptography

    out = {"python": platform.python_version(), "cryptography": cryptography.__version__,
           "cores": os.cpu_count()}
    if weak_keys.HAVE_GMPY2:
        import gmpy2

        out.update(gmpy2=gmpy2.version(), gmp=gmpy2.mp_version())
    return out


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: stock sizes like 1000,10000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("stock sizes must be at least 1")
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000, help="cards per pack")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"generated cards kept between runs (default {DEFAULT_CACHE})")
    parser.add_argument("--gcd-stock", type=_sizes, default=[1000, 10_000, 100_000],
                        help="stock sizes of the batch GCD curve (default 1000,10000,100000)")
    parser.add_argument("--gcd-pack", type=int, default=1000,
                        help="new moduli of the batch GCD curve (default 1000)")
    parser.add_argument("--no-gcd-curve", action="store_true", help="skip the curve")
    args = parser.parse_args(argv)
    if args.cards < 1 or args.gcd_pack < 1:
        parser.error("--cards and --gcd-pack must be at least 1")

    cards, from_cache = cached_cards(args.cache, 2 * args.cards)
    with tempfile.TemporaryDirectory(prefix="cms-bench-packs-") as workdir:
        imports = run_imports(Path(workdir), cards, args.cards)
    report: dict[str, Any] = {
        "cards_per_pack": args.cards, **versions(),
        "cache": {"directory": str(args.cache), "cards_used": len(cards),
                  "from_cache": from_cache, "generated": len(cards) - from_cache,
                  "note": "device and issuer authentication public keys and signed device "
                          "keys kept between runs; certificates and packs built each run"},
        "empty_stock": imports["empty_stock"], "second_pack": imports["second_pack"],
        "stock_after": json.loads(imports["stock_after"]),
    }
    if not args.no_gcd_curve:
        report["gcd_curve"] = gcd_curve(args.gcd_stock, args.gcd_pack)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
