"""Pack issuance benchmark: ``cms issue`` through the access server and the proxy beside the
raw cost of its cryptography, and the bureau's personalization of cards.

Prints one JSON object:

- ``issuance``: a pack of ``--cards`` cards issued to as many users.
  ``service_cards_per_second``: the wall time of ``cms issue --pack B
  --users FILE --out DIR`` run as a subprocess, from its start to the
  signed files written (the CLI a user waits for: the users file read,
  streamed over mutual TLS to a real access server process on SQLite,
  which takes the cards from stock, has a real proxy process on SoftHSM2
  (tests/support/issuer.py: tokens issuer and issuer-system, two workers)
  make the device authentication keys (GenerateDeviceAuthKeys) and the
  payloads (IssueBatch), writes the personalization file, has the proxy
  sign it (SignIssuerFile) and records the issuance; the CLI writes the
  files). The stock is imported and the users added before, not timed.
  ``raw_cards_per_second``: the same cryptography per card in this one
  process, with no server, RPC, store or file, on a SoftHSM2 token of its
  own opened with python-pkcs11: a P-256 device authentication key pair
  generated in the token as session objects and its private half wrapped
  under an AES KEK (CKM_AES_KEY_WRAP_PAD), the user key derived from a
  64-byte seed (``hsm_proxy.bip32``, in software as the proxy does, SoftHSM
  having no BIP32), the secret bundle encrypted to the card's device key
  (RSA-OAEP SHA-1, cryptography, as the proxy does) and the payload signed
  by a P-256 issuer key in the token (CKM_ECDSA over SHA-256), over
  ``--raw-cards`` of the pack's device keys, measured just before and just
  after the service run (``raw_before_after``; the mean is used); ``ratio``
  = service / raw. ``cpu_s``: CPU seconds of the access server, of the
  proxy with its workers and of the CLI during ``cms issue``.
  ``spot_checks``: cards of the pack whose device private keys this run
  holds (the others come from the pack import benchmark's cache, public
  keys only); their payloads are opened as the card would (the issuer's
  signature, the binding, the decrypted bundle's user key against the
  file's user public key) and ``openssl cms -verify`` checks the file's
  signature.
- ``bureau``: ``--bureau-cards`` virtual cards (card state files, each
  initialized by the software provider of the card's tests for the proxy's
  issuer key, imported as a second pack and issued through ``cms issue``;
  none of it timed), personalized by ``cms bureau personalize FILE
  --card-dir DIR`` run as a subprocess, which opens each card file in its
  own process (the virtual card in process, no reader): cards per second
  from the command's start to its results, shipping and mailing files and
  card faces written. Each card takes PERSONALIZE (checking the issuer's
  signature and decrypting its bundle with its device key) and SET PIN
  with the PIN and PUK the bureau's HSM (BureauHsm.SealCardCodes, in the
  same proxy) sealed to it; ``cpu_s`` splits the bureau's process and the
  proxy's.

Usage: .venv/bin/python bench/pack_issuance.py [--cards 10000] [--raw-cards 1000]
       [--bureau-cards 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

from bench.fleet_rekey import _with_children  # noqa: E402
from bench.pack_import import (  # noqa: E402
    DEFAULT_CACHE,
    CachedCard,
    _children_cpu,
    _cpu_seconds,
    access_server_pid,
    cached_cards,
    cli,
    versions,
)
from cardcore import personalization as perso  # noqa: E402
from cardcore.issuance_keys import rsa_from_spki  # noqa: E402
from cms import perso_format as F  # noqa: E402
from cms.pack_format import SIGNATURE_SUFFIX, PackRow  # noqa: E402
from hsm_proxy import bip32  # noqa: E402
from hsm_proxy.provider_x509 import ecdsa_der  # noqa: E402

PROVIDER_ID = "bench-provider"
PACK_SERIAL = "BENCH-ISSUE-PACK"
BATCH = "BENCH-ISSUE"
BUREAU_PACK, BUREAU_BATCH = "BENCH-BUREAU-PACK", "BENCH-BUREAU"
BUREAU_NAME, MAILER_NAME = "bench-bureau", "bench-mailer"
SPOT_CARDS = 3
ISSUANCE_ID = bytes(range(perso.ISSUANCE_ID_LENGTH))
"""The raw run's issuance id: any 16 bytes cost the same."""
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),  # noqa: S303
                         label=None)
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
RPC_TIMEOUT = 60


def progress(enabled: bool) -> Any:
    """A rich progress bar on stderr when it is a terminal; none in a pipe or a test."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


class Step:
    """One task of the progress bar, or nothing without one."""

    def __init__(self, bar: Any, description: str, total: int | None) -> None:
        self.bar = bar
        self.task = bar.add_task(description, total=total) if bar is not None else None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.remove_task(self.task)


# -- the pack: cached public cards and a few whose private keys this run holds ------

class SpotCard(NamedTuple):
    serial: str
    device: rsa.RSAPrivateKey


def spot_cards(count: int) -> list[SpotCard]:
    return [SpotCard(f"BENCH-SPOT-{i:03d}", rsa.generate_private_key(65537, 2048))
            for i in range(count)]


def spot_positions(cards: int, spots: int) -> list[int]:
    """Where the spot cards sit in the pack: first, spread between, last."""
    if spots <= 1 or cards <= 1:
        return [0][:spots]
    return sorted({round(i * (cards - 1) / (spots - 1)) for i in range(spots)})


def pack_rows(root: Any, cached: Sequence[CachedCard], spots: Sequence[SpotCard]) -> list[PackRow]:
    """``len(cached)`` rows, the spot cards in place of cached ones at ``spot_positions``."""
    from bench.pack_import import pack_rows as cached_rows
    from tests.support.stock import card_row

    rows = cached_rows(root, cached)
    for position, spot in zip(spot_positions(len(rows), len(spots)), spots, strict=False):
        rows[position] = card_row(root, spot.serial, spot.device.public_key())
    return rows


def write_pack(directory: Path, root: Any, serial: str, rows: Sequence[PackRow]) -> Path:
    from tests.support.stock import make_pack

    pack = make_pack(root, serial, rows)
    path = directory / f"{serial}.csv"
    path.write_bytes(pack.data)
    path.with_name(path.name + SIGNATURE_SUFFIX).write_bytes(pack.signature)
    return path


# -- the services -------------------------------------------------------------------

class Stack(NamedTuple):
    endpoints: Path
    server_pid: int
    proxy_pid: int
    issuer_public: ec.EllipticCurvePublicKey
    proxy: Any


@contextmanager
def issuer_stack(workdir: Path) -> Iterator[Stack]:
    """A proxy with the issuer's seed, KEK and key, and an access server that issues
    through it, each a process of its own, as the issuance tests start them."""
    from tests.support.issuer import issuer_proxy, issuer_public_key
    from tests.support.stock import access_server

    with issuer_proxy(workdir / "proxy") as proxy, \
            access_server(_mkdir(workdir / "server"), pki=proxy.env.pki,
                          proxy_address=proxy.address) as endpoints:
        yield Stack(endpoints, access_server_pid(), proxy.process.pid,
                    issuer_public_key(proxy), proxy)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_of(pids: Sequence[int]) -> float:
    return sum(_cpu_seconds(p) for p in pids)


def trust_root(stack: Stack, workdir: Path, root: Any) -> None:
    """The provider root trusted (``cms providers trust``)."""
    cert = workdir / "provider-root.der"
    cert.write_bytes(root.der)
    cli(stack.endpoints, "providers", "trust", "--root-cert", str(cert))


def import_pack(stack: Stack, pack: Path) -> None:
    out = cli(stack.endpoints, "packs", "import", str(pack))
    if not out.startswith("imported:"):
        raise RuntimeError(f"cms packs import: {out}")


def add_users(stack: Stack, count: int, step: Step) -> list[int]:
    """``count`` users through the Users service (``cms users add`` without a process
    each)."""
    from cms.runtime.client import load_endpoints
    from cms.v1 import issuance_pb2 as ipb
    from cms.v1 import issuance_pb2_grpc

    channel = load_endpoints(stack.endpoints).channel("access_server", "admin")
    users = issuance_pb2_grpc.UsersStub(channel)
    ids = []
    for i in range(count):
        ids.append(users.AddUser(ipb.AddUserRequest(
            name=f"Bench User {i}", address=f"{i} Bench Street\n1000 Lausanne"),
            timeout=RPC_TIMEOUT).user_id)
        step.advance()
    channel.close()
    return ids


def users_file(directory: Path, user_ids: Sequence[int], name: str = "users.csv") -> Path:
    path = directory / name
    path.write_text("user_id\n" + "".join(f"{u}\n" for u in user_ids))
    return path


class ServiceRun(NamedTuple):
    seconds: float
    cpu_s: dict[str, float]
    out: Path


def service_issue(stack: Stack, batch: str, users: Path, out: Path) -> ServiceRun:
    """``cms issue --pack`` as a user runs it, timed from its start to its exit."""
    out.mkdir(parents=True, exist_ok=True)
    proxy = _with_children(stack.proxy_pid)
    before = (_cpu_seconds(stack.server_pid), _cpu_of(proxy), _children_cpu())
    start = time.perf_counter()
    done = cli(stack.endpoints, "issue", "--pack", batch, "--users", str(users),
               "--out", str(out))
    seconds = time.perf_counter() - start
    if not done.startswith("issued "):
        raise RuntimeError(f"cms issue: {done}")
    after = (_cpu_seconds(stack.server_pid), _cpu_of(proxy), _children_cpu())
    names = ("access_server", "proxy_and_workers", "cli")
    return ServiceRun(seconds, {n: round(a - b, 2) for n, a, b in zip(names, after, before,
                                                                     strict=True)}, out)


# -- checks of what the service wrote ------------------------------------------------

def user_public_key(scalar: bytes) -> bytes:
    """The compressed secp256k1 point of a user private key."""
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256K1())
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.CompressedPoint)


def check_spot(row: F.PersoRow, spot: SpotCard, issuance_id: bytes,
               issuer_public: ec.EllipticCurvePublicKey) -> None:
    """What the card checks: the issuer's signature, the binding to this card, then the
    bundle it decrypts, whose user key must be the one the file's public key names."""
    payload = perso.decode_payload(row.payload)
    issuer_public.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    binding = payload.binding
    device = rsa_from_spki(spot.device.public_key().public_bytes(DER, SPKI))
    if (binding.serial, binding.issuance_id, binding.sequence,
            binding.device_key_fingerprint) != (spot.serial, issuance_id, 1,
                                                perso.device_key_fingerprint(device)):
        raise RuntimeError(f"the payload of {spot.serial} is bound to another card")
    bundle = perso.decode_bundle(spot.device.decrypt(payload.ciphertext, OAEP_SHA1))
    if user_public_key(bundle.user_private_key) != row.user_public_key:
        raise RuntimeError(f"the user key sealed to {spot.serial} is not the file's")


def issuer_certificate(content: Path, issuer_public: ec.EllipticCurvePublicKey) -> Path:
    """The certificate the issuer's signature of ``content`` carries, checked to hold the
    issuer key, written beside it (PEM): what the bureau and openssl are given."""
    from asn1crypto import cms as acms
    from cryptography import x509

    signature = content.with_name(content.name + SIGNATURE_SUFFIX)
    cert = x509.load_der_x509_certificate(acms.ContentInfo.load(
        signature.read_bytes())["content"]["certificates"][0].chosen.dump())
    if cert.public_key() != issuer_public:
        raise RuntimeError("the file's signer is not the issuer key")
    path = content.with_name("issuer.pem")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_verify(content: Path, issuer_public: ec.EllipticCurvePublicKey) -> None:
    """``openssl cms -verify`` of the issuer's detached signature, its own certificate
    (holding the issuer key) trusted."""
    signature = content.with_name(content.name + SIGNATURE_SUFFIX)
    ca = issuer_certificate(content, issuer_public)
    done = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER",
                           "-in", str(signature), "-content", str(content), "-CAfile", str(ca),
                           "-out", os.devnull], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl cms -verify: {done.stderr.strip()}")


def check_issued(out: Path, spots: Sequence[SpotCard], cards: int,
                 issuer_public: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    path = out / f"{BATCH}{F.PERSO_SUFFIX}"
    openssl_verify(path, issuer_public)
    table = F.read_perso(path.read_bytes())
    if len(table.rows) != cards:
        raise RuntimeError(f"{len(table.rows)} rows in the personalization file for {cards}")
    by_serial = {r.serial: r for r in table.rows}
    for spot in spots:
        check_spot(by_serial[spot.serial], spot, table.header.file_serial, issuer_public)
    return {"rows": len(table.rows), "cards_opened": [s.serial for s in spots],
            "openssl_cms_verify": "ok"}


# -- the raw cryptography ------------------------------------------------------------

class RawHsm(NamedTuple):
    session: Any
    kek: Any
    signer: Any
    issuer_point: bytes
    key_id: bytes


@contextmanager
def raw_hsm(workdir: Path) -> Iterator[RawHsm]:
    """A SoftHSM2 token of this process's own with an AES-256 KEK and a P-256 issuer key,
    persistent, sensitive and not extractable, as the proxy makes them."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    from cardcore import issuance
    from deploy.softhsm import SoftHsm, find_module

    hsm = SoftHsm(workdir / "raw-hsm").ensure()
    hsm.init_token("bench")
    # SoftHSM2 reads its configuration when this process first loads it (here), and
    # python-pkcs11 keeps the library loaded: a second token directory would not be seen.
    os.environ.update(hsm.env())
    token = pkcs11.lib(find_module()).get_token(token_label="bench")
    with token.open(user_pin=hsm.pin_file("bench").read_text().strip(), rw=True) as session:
        kek = session.generate_key(KeyType.AES, 256, store=True, label="kek", template={
            Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False})
        public, signer = session.generate_keypair(
            KeyType.EC, None, store=True, label="issuer",
            public_template={Attribute.EC_PARAMS: _p256_params()},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: True})
        point = bytes(public[Attribute.EC_POINT])[2:]  # DER OCTET STRING around the point
        yield RawHsm(session, kek, signer, point, issuance.issuer_key_id(point))


def _p256_params() -> bytes:
    from cms.v1 import hsm_pb2
    from hsm_proxy.keyspec import EC_PARAMS

    return EC_PARAMS[hsm_pb2.EC_P256]


def raw_card(hsm: RawHsm, seed: bytes, element: int, serial: str, device_spki: bytes) -> bytes:
    """One card's payload made as the proxy makes it, in this process: its device
    authentication key made and wrapped, its user key derived, sealed and signed."""
    from pkcs11 import Attribute, KeyType, Mechanism

    public, private = hsm.session.generate_keypair(
        KeyType.EC, None, public_template={Attribute.TOKEN: False,
                                           Attribute.EC_PARAMS: _p256_params()},
        private_template={Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: True})
    hsm.kek.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    auth_point = bytes(public[Attribute.EC_POINT])[2:]
    private.destroy()
    public.destroy()
    user = bip32.user_key(seed, element)
    bip32.public_key(user)
    device = rsa_from_spki(device_spki)
    ciphertext = rsa.RSAPublicNumbers(int.from_bytes(device.exponent, "big"),
                                      int.from_bytes(device.modulus, "big")).public_key() \
        .encrypt(perso.encode_bundle(perso.SecretBundle(user.key.to_bytes(32, "big"),
                                                        auth_point, None, None)), OAEP_SHA1)
    signed = perso.signed_part(perso.Binding(serial, perso.device_key_fingerprint(device),
                                             ISSUANCE_ID, 1, hsm.key_id), ciphertext)
    signature = bytes(hsm.signer.sign(hashlib.sha256(signed).digest(),
                                      mechanism=Mechanism.ECDSA))
    return perso.encode_payload(signed, ecdsa_der(signature))


def raw_rate(hsm: RawHsm, cards: Sequence[tuple[str, bytes]], count: int, step: Step) -> float:
    """Cards per second of ``raw_card`` over ``count`` cards (the pack's, cycled)."""
    seed = os.urandom(64)
    start = time.perf_counter()
    for i in range(count):
        serial, device = cards[i % len(cards)]
        raw_card(hsm, seed, i + 1, serial, device)
        step.advance()
    return count / (time.perf_counter() - start)


# -- the issuance, measured ----------------------------------------------------------

def measure_issuance(stack: Stack, hsm: RawHsm, workdir: Path, root: Any,
                     cached: Sequence[CachedCard], raw_cards: int,
                     bar: Any = None) -> dict[str, Any]:
    """The pack's issuance through the services, the raw cryptography before and after."""
    spots = spot_cards(min(SPOT_CARDS, len(cached)))
    rows = pack_rows(root, cached, spots)
    import_pack(stack, write_pack(workdir, root, PACK_SERIAL, rows))
    devices = [(r.serial, r.device_public_key) for r in rows]
    step = Step(bar, "users", len(rows))
    users = users_file(workdir, add_users(stack, len(rows), step))
    step.done()
    step = Step(bar, "raw, before", raw_cards)
    raw_before = raw_rate(hsm, devices, raw_cards, step)
    step.done()
    step = Step(bar, "cms issue", None)
    run = service_issue(stack, BATCH, users, workdir / "out")
    step.done()
    step = Step(bar, "raw, after", raw_cards)
    raw_after = raw_rate(hsm, devices, raw_cards, step)
    step.done()
    checks = check_issued(run.out, spots, len(rows), stack.issuer_public)
    raw = (raw_before + raw_after) / 2
    service = len(rows) / run.seconds
    return {"cards": len(rows), "seconds": round(run.seconds, 2),
            "service_cards_per_second": round(service, 1),
            "raw_cards_per_second": round(raw, 1),
            "raw_before_after": [round(raw_before, 1), round(raw_after, 1)],
            "raw_cards": raw_cards, "ratio": round(service / raw, 3),
            "cpu_s": run.cpu_s, "spot_checks": checks}


# -- the bureau ----------------------------------------------------------------------

def virtual_cards(directory: Path, issuer_point: bytes, count: int,
                  step: Step) -> list[CachedCard]:
    """``count`` card files initialized for ``issuer_point`` by the software provider of
    the card's tests, and what each gives its provider (certified for the pack by the
    bench's root, as ``pack_rows`` does for cached cards)."""
    from cardcore.issuance_keys import ec_spki, rsa_spki
    from tests.virtual_psd.issuance_host import SoftwareProvider, open_card, select_applet
    from virtual_psd.factory import create_card

    directory.mkdir(parents=True, exist_ok=True)
    cards = []
    for i in range(count):
        serial = f"BENCH-CARD-{i:05d}"
        path = directory / f"{serial}.json"
        create_card(path, psd_id=f"47905040123400{i:06d}")
        SoftwareProvider(open_card(path).transmit).initialize(serial, issuer_point)
        data = select_applet(open_card(path))
        assert data.device_public_key and data.issuer_auth_public_key \
            and data.signed_device_key
        cards.append(CachedCard(serial, rsa_spki(data.device_public_key),
                                ec_spki(data.issuer_auth_public_key), data.signed_device_key))
        step.advance()
    return cards


def bureau_keys(endpoints: Path, workdir: Path) -> Path:
    """The bureau's keys and the mailing house's key made in the proxy by each; the
    mailing house's public key (PEM)."""
    cli(endpoints, "bureau", "--bureau", BUREAU_NAME, "key", "create")
    mailer = workdir / "mailer.pem"
    cli(endpoints, "mailer", "--mailer", MAILER_NAME, "key", "create", "--out", str(mailer))
    return mailer


def measure_bureau(stack: Stack, workdir: Path, root: Any, count: int,
                   bar: Any = None) -> dict[str, Any]:
    """``count`` virtual cards issued, then personalized by ``cms bureau personalize``."""
    from tests.support.hsm_proxy import write_endpoints

    point = stack.issuer_public.public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
    step = Step(bar, "virtual cards", count)
    cards = virtual_cards(workdir / "cards", point, count, step)
    step.done()
    import_pack(stack, write_pack(workdir, root, BUREAU_PACK, pack_rows(root, cards, [])))
    step = Step(bar, "users", count)
    users = users_file(workdir, add_users(stack, count, step), "bureau-users.csv")
    step.done()
    issued = service_issue(stack, BUREAU_BATCH, users, workdir / "bureau-in").out
    perso_file = issued / f"{BUREAU_BATCH}{F.PERSO_SUFFIX}"
    endpoints = write_endpoints(workdir / "bureau-endpoints.json", stack.proxy)
    mailer = bureau_keys(endpoints, workdir)
    out = workdir / "bureau-out"
    proxy = _with_children(stack.proxy_pid)
    before = (_cpu_of(proxy), _children_cpu())
    step = Step(bar, "cms bureau personalize", None)
    start = time.perf_counter()
    done = cli(endpoints, "bureau", "--bureau", BUREAU_NAME, "--state",
               str(workdir / "bureau-state"), "personalize", str(perso_file), "--issuer-cert",
               str(issuer_certificate(perso_file, stack.issuer_public)), "--mailer-key",
               str(mailer), "--out", str(out), "--card-dir", str(workdir / "cards"))
    seconds = time.perf_counter() - start
    step.done()
    after = (_cpu_of(proxy), _children_cpu())
    personalized = sum(line.startswith("card ") and line.endswith(" personalized")
                       for line in done.splitlines())
    if personalized != count:
        raise RuntimeError(f"cms bureau personalize: {personalized} of {count} cards "
                           f"personalized: {done[-500:]}")
    return {"cards": count, "seconds": round(seconds, 2),
            "cards_per_second": round(count / seconds, 1),
            "cpu_s": {"bureau": round(after[1] - before[1], 2),
                      "proxy_and_workers": round(after[0] - before[0], 2)},
            "outputs": sorted(p.name for p in out.iterdir() if p.is_file())}


def run(workdir: Path, cached: Sequence[CachedCard], raw_cards: int, bureau_cards: int,
        bar: Any = None) -> dict[str, Any]:
    """Both measurements on one proxy and one access server."""
    from tests.support.stock import make_root

    root = make_root(PROVIDER_ID)
    with issuer_stack(workdir) as stack, raw_hsm(workdir) as hsm:
        trust_root(stack, workdir, root)
        out = {"issuance": measure_issuance(stack, hsm, workdir, root, cached, raw_cards,
                                            bar)}
        if bureau_cards:
            out["bureau"] = measure_bureau(stack, workdir, root, bureau_cards, bar)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000, help="cards of the pack")
    parser.add_argument("--raw-cards", type=int, default=1000,
                        help="cards of each raw measurement (default 1000)")
    parser.add_argument("--bureau-cards", type=int, default=100,
                        help="virtual cards the bureau personalizes (default 100; 0: none)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"the pack import benchmark's cards (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    if args.cards < 1 or args.raw_cards < 1 or args.bureau_cards < 0:
        parser.error("--cards and --raw-cards must be at least 1, --bureau-cards at least 0")

    cached, from_cache = cached_cards(args.cache, args.cards)
    with tempfile.TemporaryDirectory(prefix="cms-bench-issuance-") as workdir, \
            progress(sys.stderr.isatty()) as bar:
        measured = run(Path(workdir), cached, args.raw_cards, args.bureau_cards, bar)
    report = {"cards": args.cards, **versions(),
              "cache": {"directory": str(args.cache), "from_cache": from_cache,
                        "generated": args.cards - from_cache},
              **measured}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
