"""``cms bureau ...``: the personalization bureau's commands (seed 004, B4).

They act as the identity ``bureau`` with its TLS files from the deployment's
``endpoints.json``. The bureau's keys are in its HSM behind the proxy
(BureauHsm): the key that signs its files, and the key its cards' PIN and
PUK are derived under, which leave the HSM only sealed. The state directory
(``--state``, default ``bureau/`` beside ``endpoints.json``) keeps the journal
of each batch (``bureau.journal``), no key and no PIN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cms.identity import BUREAU

SERVICE = "hsm_proxy"
TIMEOUT = 60
VIRTUAL_SOURCE = "virtual_psd.agent_source"
DEFAULT_LISTEN = "127.0.0.1:0"
STATE_SUFFIX = ".json"


def register(sub: argparse._SubParsersAction) -> None:
    bureau = sub.add_parser("bureau", help="the personalization bureau: its key, and the "
                                           "personalization of cards")
    bureau.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                            "var/demo/endpoints.json)")
    bureau.add_argument("--identity", default=BUREAU, help=f"TLS identity (default {BUREAU})")
    bureau.add_argument("--state", type=Path, help="bureau state directory (default: "
                                                   "bureau/ beside endpoints.json)")
    bureau.add_argument("--bureau", required=True, metavar="NAME",
                        help="the bureau's name: its key's, and its results files'")
    bsub = bureau.add_subparsers(dest="bureau_command", metavar="ACTION", required=True)

    key = bsub.add_parser("key", help="the bureau's keys in its HSM")
    ksub = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    create = ksub.add_parser("create", help="generate the bureau's keys and certificate")
    create.add_argument("--out", type=Path, help="write the certificate here (PEM)")
    create.set_defaults(func=_key_create)
    show = ksub.add_parser("show", help="the bureau's certificate and its fingerprint")
    show.add_argument("--out", type=Path, help="write the certificate here (PEM)")
    show.set_defaults(func=_key_show)

    perso = bsub.add_parser("personalize", help="personalize the cards of a personalization "
                                                "file, and write results and shipping files")
    perso.add_argument("file", type=Path, metavar="FILE",
                       help="the personalization file (its signature FILE.p7s beside it)")
    perso.add_argument("--issuer-cert", type=Path, required=True, metavar="CERT",
                       help="the file's signer: the issuer key's certificate (PEM or DER) "
                            "or the issuer's public key (PEM)")
    perso.add_argument("--mailer-key", type=Path, metavar="PEM",
                       help="the mailing house's public key, when the bureau makes PIN and "
                            "PUK (the file says pin_puk_by bureau)")
    perso.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where results, shipping and mailing files and card faces go")
    perso.add_argument("--resume", action="store_true",
                       help="continue a batch begun before (its journal in the state "
                            "directory)")
    cards = perso.add_mutually_exclusive_group(required=True)
    cards.add_argument("--card-dir", type=Path, metavar="DIR",
                       help="virtual card state files, each presented once per run")
    cards.add_argument("--agents", action="store_true",
                       help="cards in PC/SC readers through card agents: serve a card channel "
                            "for the run (cms card-agent --server HOST:PORT --server-identity "
                            "bureau)")
    perso.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                       help=f"with --agents: where agents connect (default {DEFAULT_LISTEN}: "
                            "a free port, printed)")
    perso.add_argument("--agent-wait", type=float, default=600.0, metavar="SECONDS",
                       help="with --agents: end with the cards so far when none came for "
                            "this long (default 600; SIGTERM ends it too)")
    perso.add_argument("--card-fault", action="append", default=[], metavar="NAME=PLAN",
                       help=argparse.SUPPRESS)
    perso.set_defaults(func=_personalize)


def _fail(message: str) -> Any:
    from cms.runtime.cli_error import CliError

    return CliError(message)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"{what} {path}: {exc.strerror or exc}") from None


class _Hsm:
    """The bureau's operations in its HSM, for one bureau name."""

    def __init__(self, args: argparse.Namespace) -> None:
        from cms.runtime.client import load_endpoints
        from cms.v1 import partners_pb2_grpc

        self.endpoints = load_endpoints(args.endpoints)
        self.name = _name(args.bureau)
        self.stub = partners_pb2_grpc.BureauHsmStub(
            self.endpoints.channel(SERVICE, args.identity))

    def key_request(self) -> Any:
        from cms.v1 import partners_pb2 as pb

        return pb.BureauKeyRequest(bureau=self.name)


def _name(value: str) -> str:
    from cms.pack_format import NAME_PATTERN

    if not NAME_PATTERN.match(value):
        raise _fail(f"--bureau {value[:64]!r}: 1-64 of letters, digits, '.', '_', '-'")
    return value


def _print_certificate(cert: Any, out: Path | None, verb: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if out is not None:
        pem = x509.load_der_x509_certificate(cert.certificate).public_bytes(
            serialization.Encoding.PEM)
        try:
            out.write_bytes(pem)
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"bureau {cert.bureau} {verb}: SHA-256 {cert.fingerprint.hex(':').upper()}"
          + (f", certificate in {out}" if out else ""))


def _key_create(args: argparse.Namespace) -> int:
    hsm = _Hsm(args)
    _print_certificate(hsm.stub.CreateBureauKey(hsm.key_request(), timeout=TIMEOUT), args.out,
                       "created")
    return 0


def _key_show(args: argparse.Namespace) -> int:
    hsm = _Hsm(args)
    _print_certificate(hsm.stub.GetBureauCertificate(hsm.key_request(), timeout=TIMEOUT),
                       args.out, "is")
    return 0


def trusted_signer(path: Path, option: str) -> Any:
    """The one signer ``option`` names (``cms.signed_file.load_trusted``)."""
    from cms.signed_file import load_trusted

    try:
        return load_trusted(_read(path, option))
    except ValueError:
        raise _fail(f"{option} {path}: not an X.509 certificate (PEM or DER) nor a PEM "
                    "public key") from None


def _mailer_key(path: Path | None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if path is None:
        raise _fail("the file says the bureau makes PIN and PUK: give the mailing house's "
                    "key with --mailer-key PEM (the codes are sealed to it)")
    try:
        key = serialization.load_pem_public_key(_read(path, "--mailer-key"))
    except ValueError:
        raise _fail(f"--mailer-key {path}: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _fail(f"--mailer-key {path}: not an RSA key")
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _faults(items: list[str]) -> dict[str, str]:
    plans = {}
    for item in items:
        name, sep, plan = item.partition("=")
        if not sep:
            raise _fail(f"--card-fault {item!r}: NAME=PLAN")
        plans[name] = plan
    return plans


def _virtual_cards(card_dir: Path, faults: dict[str, str]) -> Any:
    """Each card file of ``card_dir`` as (name, transmit, close); the virtual card's
    modules are found by name (no import edge to it), as the provider system finds them."""
    import importlib

    if not card_dir.is_dir():
        raise _fail(f"--card-dir {card_dir}: not a directory")
    try:
        source = importlib.import_module(VIRTUAL_SOURCE)
    except ImportError as exc:
        raise _fail(f"the virtual card is not available ({exc}); install 'cms[card]'") from None
    for path in sorted(card_dir.glob(f"*{STATE_SUFFIX}")):
        try:
            transport = source.VirtualTransport(source.open_virtual_card(
                path, faults.get(path.name)))
        except source.VirtualCardError as exc:
            print(f"card {path.name} skipped: {exc}", flush=True)
            continue
        yield path.name, transport.transmit, transport.close


def _dir_outcomes(card_dir: Path, faults: dict[str, str], run_card: Any) -> Any:
    """What came of each card file of ``card_dir``: an Outcome, or (name, why) when the
    card went away."""
    from bureau.inject import CardGone
    from cardcore.link import TransportError

    for name, transmit, close in _virtual_cards(card_dir, faults):
        def link(apdu: bytes, transmit: Any = transmit) -> bytes:
            try:
                return transmit(apdu)
            except TransportError as exc:
                raise CardGone(str(exc)) from None

        try:
            yield run_card(name, link)
        except CardGone as exc:
            yield (name, str(exc))
        finally:
            close()


class _Stopped(Exception):
    """SIGTERM: stop waiting for cards, and write what the batch has."""


def _agent_outcomes(args: argparse.Namespace, hsm: _Hsm, run_card: Any, journal: Any,
                    serials: set[str]) -> Any:
    import signal

    from bureau.agents import agent_cards

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    def listening(address: str) -> None:
        print(f"listening on {address}: waiting for {len(journal.unfinished(serials))} "
              f"card(s) from card agents", flush=True)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield from agent_cards(args.listen, hsm.endpoints.tls(args.identity), run_card,
                               finished=lambda: not journal.unfinished(serials),
                               on_listening=listening, timeout=args.agent_wait)
    except _Stopped:
        print("stopped: writing what the batch has", flush=True)
    except OSError as exc:
        raise _fail(f"--listen {args.listen}: {exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _personalize(args: argparse.Namespace) -> int:
    from bureau.faces import render_face
    from bureau.files import BatchFileError, load_batch, write_outputs
    from bureau.inject import Outcome, personalize_card
    from bureau.journal import Journal, JournalError
    from cms.pack_format import SIGNATURE_SUFFIX
    from cms.perso_format import PinMaker
    from cms.printing import PrintError
    from cms.v1 import partners_pb2 as pb

    data = _read(args.file, "personalization file")
    signature = _read(args.file.with_name(args.file.name + SIGNATURE_SUFFIX),
                      "its signature")
    issuer = trusted_signer(args.issuer_cert, "--issuer-cert")
    try:
        batch = load_batch(data, signature, issuer)
    except BatchFileError as exc:
        raise _fail(str(exc)) from None
    mailer = (_mailer_key(args.mailer_key) if batch.header.pin_puk_by is PinMaker.BUREAU
              else b"")
    faults = _faults(args.card_fault)
    hsm = _Hsm(args)
    state = args.state or hsm.endpoints.path.parent / "bureau"
    try:
        journal = Journal(state, batch.header.file_serial, batch.sha256, resume=args.resume)
    except JournalError as exc:
        raise _fail(str(exc)) from None

    class Sealer:
        def seal(self, serial: str, device_spki: bytes, challenge: bytes) -> tuple[bytes, bytes]:
            sealed = hsm.stub.SealCardCodes(pb.SealCardCodesRequest(
                bureau=hsm.name, file_serial=batch.header.file_serial, serial=serial,
                device_public_key=device_spki, challenge=challenge, mailer_public_key=mailer),
                timeout=TIMEOUT)
            return sealed.set_pin, sealed.mailer_data

    def sign(purpose: str, sha256: bytes) -> bytes:
        return hsm.stub.SignBureauFile(pb.SignBureauFileRequest(
            bureau=hsm.name, purpose=purpose, sha256=sha256), timeout=TIMEOUT).signature

    def run_card(name: str, transmit: Any) -> Any:
        return personalize_card(name, transmit, batch.view, journal, Sealer())

    gone = 0
    try:
        source = (_agent_outcomes(args, hsm, run_card, journal, set(batch.view.rows))
                  if args.agents else _dir_outcomes(args.card_dir, faults, run_card))
        for outcome in source:
            if not isinstance(outcome, Outcome):
                gone += 1
                print(f"card {outcome[0]} went away ({outcome[1]}): present it again with "
                      "--resume", flush=True)
                continue
            print(f"card {outcome.serial or outcome.name} {outcome.result.value}"
                  + (f": {outcome.reason}" if outcome.reason else ""), flush=True)
        try:
            written = write_outputs(args.out, batch, journal.cards(), hsm.name, sign,
                                    render_face)
        except (PrintError, OSError) as exc:
            raise _fail(f"cannot write the outputs in {args.out}: {exc}") from None
    finally:
        journal.close()
    open_cards = len(batch.rows) - written.results
    print(f"batch {batch.header.pack}: {written.results} of {len(batch.rows)} card(s) "
          f"final, {written.shipped} personalized" + (f"; {open_cards} still to present "
                                                      "(--resume)" if open_cards else ""))
    return 1 if gone else 0
