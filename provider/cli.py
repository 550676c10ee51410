"""``cms provider ...``: the provider system's commands (seed 004, B1-B2).

They act as the identity ``provider`` with its own TLS files from the
deployment's ``endpoints.json``, like every operator command. The root key
and every signature stay in the HSM (ProviderCa); card channels are the
proxy's (CardKeys). The state directory (``--state``, default ``provider/``
beside ``endpoints.json``) keeps the provider id and the serial counters, no key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cms.identity import PROVIDER
from cms.runtime.agent_options import add_agent_arguments

SERVICE = "hsm_proxy"
KEY_TRANSPORTS = ("oaep", "pkcs1")


def register(sub: argparse._SubParsersAction) -> None:
    prov = sub.add_parser("provider", help="the provider system: root CA, card "
                                           "initialization and packs")
    prov.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                          "var/demo/endpoints.json)")
    prov.add_argument("--identity", default=PROVIDER, help=f"TLS identity (default {PROVIDER})")
    prov.add_argument("--state", type=Path, help="provider state directory (default: "
                                                 "provider/ beside endpoints.json)")
    psub = prov.add_subparsers(dest="provider_command", metavar="ACTION", required=True)

    root = psub.add_parser("root", help="the provider's root CA, its key in the HSM")
    rsub = root.add_subparsers(dest="root_command", metavar="ACTION", required=True)
    create = rsub.add_parser("create", help="generate the root key and its CA certificate")
    create.add_argument("--provider-id", required=True)
    create.add_argument("--validity-days", type=int, default=0)
    create.add_argument("--out", type=Path, help="write the certificate here (PEM)")
    create.set_defaults(func=_root_create)
    show = rsub.add_parser("show", help="the root certificate and its fingerprint")
    show.add_argument("--provider-id")
    show.add_argument("--out", type=Path, help="write the certificate here (PEM)")
    show.set_defaults(func=_root_show)

    init = psub.add_parser("init-pack", help="initialize N cards and write their pack")
    init.add_argument("--cards", type=int, required=True, metavar="N")
    init.add_argument("--out", type=Path, required=True, metavar="DIR")
    init.add_argument("--issuer-key", type=Path, required=True, metavar="PEM",
                      help="the issuer's public P-256 key (or its certificate), PEM")
    init.add_argument("--provider-id", help="default: the one 'root create' recorded")
    init.add_argument("--pack-serial", help="default: the next of the provider's counter")
    init.add_argument("--encrypt-to", type=Path, metavar="CERT",
                      help="seal both files to the issuer's RSA certificate (CMS "
                           "EnvelopedData .p7m); no plaintext copy is kept")
    init.add_argument("--key-transport", choices=KEY_TRANSPORTS, default="oaep",
                      help="how the envelope's key goes to the issuer (default oaep)")
    init.add_argument("--card-dir", type=Path, metavar="DIR",
                      help="virtual card state files (default: cards/ in the state directory)")
    init.add_argument("--transport-master-hex", metavar="HEX",
                      help="the card factory's transport master, to make missing virtual "
                           "cards (the key its ceremony put into the HSM)")
    add_agent_arguments(init, init, PROVIDER)
    init.set_defaults(func=_init_pack)


def _fail(message: str) -> Any:
    from cms.runtime.cli_error import CliError

    return CliError(message)


def _endpoints(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints

    return load_endpoints(args.endpoints)


def _state(args: argparse.Namespace, endpoints: Any) -> Any:
    from provider.state import ProviderState

    return ProviderState(args.state or endpoints.path.parent / "provider")


def _stubs(args: argparse.Namespace, endpoints: Any) -> tuple[Any, Any]:
    from cms.v1 import card_keys_pb2_grpc, provider_pb2_grpc

    channel = endpoints.channel(SERVICE, args.identity)
    return provider_pb2_grpc.ProviderCaStub(channel), card_keys_pb2_grpc.CardKeysStub(channel)


def _pem(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _print_root(root: Any, out: Path | None, verb: str) -> None:
    if out is not None:
        try:
            out.write_bytes(_pem(root.certificate))
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"provider root {root.provider_id} {verb}: SHA-256 "
          f"{root.fingerprint.hex(':').upper()}" + (f", certificate in {out}" if out else ""))


def _provider_id(args: argparse.Namespace, state: Any) -> str:
    from cms.pack_format import PackFormatError, check_name

    chosen = args.provider_id or state.provider_id()
    if not chosen:
        raise _fail("no provider id: pass --provider-id, or run 'cms provider root create'")
    try:
        return check_name("provider id", chosen)
    except PackFormatError as exc:
        raise _fail(exc.reason) from None


def _root_create(args: argparse.Namespace) -> int:
    from cms.v1 import provider_pb2 as ppb

    endpoints = _endpoints(args)
    state = _state(args, endpoints)
    provider_id = _provider_id(args, state)
    ca, _ = _stubs(args, endpoints)
    root = ca.CreateRoot(ppb.CreateRootRequest(provider_id=provider_id,
                                               validity_days=max(args.validity_days, 0)),
                         timeout=60)
    state.record_provider_id(provider_id)
    _print_root(root, args.out, "created")
    return 0


def _root(ca: Any, provider_id: str) -> Any:
    import grpc

    from cms.v1 import provider_pb2 as ppb

    try:
        return ca.GetRoot(ppb.GetRootRequest(provider_id=provider_id), timeout=60)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise _fail(f"no provider root {provider_id!r} in the HSM: create it with "
                        "'cms provider root create'") from None
        raise


def _root_show(args: argparse.Namespace) -> int:
    endpoints = _endpoints(args)
    ca, _ = _stubs(args, endpoints)
    _print_root(_root(ca, _provider_id(args, _state(args, endpoints))), args.out, "is")
    return 0


def _issuer_point(path: Path) -> bytes:
    """The uncompressed P-256 point of the issuer's key file (a public key or a certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cardcore.issuance import IssuanceError
    from cardcore.issuance_keys import ec_point_from_spki

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"--issuer-key {path}: {exc.strerror or exc}") from None
    try:
        if b"CERTIFICATE" in data:
            public = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
        return ec_point_from_spki(public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    except (ValueError, TypeError, IssuanceError) as exc:
        raise _fail(f"--issuer-key {path}: not a P-256 public key in PEM ({exc})") from None


def _recipient(path: Path | None) -> Any:
    from cms.envelope import EnvelopeError, load_recipient

    if path is None:
        return None
    try:
        return load_recipient(path.read_bytes())
    except OSError as exc:
        raise _fail(f"--encrypt-to {path}: {exc.strerror or exc}") from None
    except EnvelopeError as exc:
        raise _fail(f"--encrypt-to {path}: {exc}") from None


def _transport_master(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise _fail("--transport-master-hex: not hex") from None
    if len(value) not in (16, 24, 32):
        raise _fail("--transport-master-hex: an AES key of 16, 24 or 32 bytes")
    return value


class _Report:
    """One line per card, or a progress bar when standard output is a terminal."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if sys.stdout.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._bar.start()
            self._task = self._bar.add_task("initializing cards", total=total)

    def card(self, outcome: Any) -> None:
        if outcome.row is not None:
            line = f"card {outcome.row.serial} initialized ({outcome.name})"
        elif outcome.skipped:
            line = f"card {outcome.name} skipped: {outcome.reason}"
        else:
            line = f"card {outcome.name} failed: {outcome.reason}"
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
            if not outcome.skipped:
                self._bar.advance(self._task)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _init_pack(args: argparse.Namespace) -> int:
    from cryptography import x509

    from cms.v1 import provider_pb2 as ppb
    from provider.cards import CardSourceError, virtual_cards
    from provider.initializer import CardInitialization
    from provider.pack import (
        Certifier,
        check_out_dir,
        initialize_cards,
        pack_header,
        write_pack_files,
    )
    from provider.state import StateError

    if args.cards < 1:
        raise _fail(f"--cards {args.cards}: a pack has at least one card")
    issuer_point = _issuer_point(args.issuer_key)
    recipient = _recipient(args.encrypt_to)
    master = _transport_master(args.transport_master_hex)
    try:
        out = check_out_dir(args.out)
    except OSError as exc:
        raise _fail(f"--out {args.out}: cannot write there ({exc.strerror or exc})") from None
    endpoints = _endpoints(args)
    state = _state(args, endpoints)
    provider_id = _provider_id(args, state)
    ca, card_keys = _stubs(args, endpoints)
    root = x509.load_der_x509_certificate(_root(ca, provider_id).certificate)
    card_dir = args.card_dir or state.directory / "cards"
    try:
        pack_serial = state.claim_pack_serial(provider_id, args.pack_serial)
    except StateError as exc:
        raise _fail(str(exc)) from None

    def next_serial() -> str:
        return state.next_card_serial(provider_id)

    def make() -> CardInitialization:
        return CardInitialization(card_keys, issuer_point, next_serial)

    certifier = Certifier(ca, provider_id)
    if args.agents:
        from provider.agents import agent_cards

        def listening(address: str) -> None:
            print(f"waiting for {args.cards} cards from card agents at {address} (cms "
                  f"card-agent --server {address} --server-identity {PROVIDER})", flush=True)

        outcomes = agent_cards(args.listen, endpoints.tls(args.identity), args.cards, make,
                               certifier, root, on_listening=listening,
                               timeout=args.agent_wait)
    else:
        outcomes = initialize_cards(virtual_cards(card_dir, master), args.cards, make,
                                    certifier, root)
    report = _Report(args.cards)
    rows, failed, skipped = [], 0, 0
    try:
        for outcome in outcomes:
            report.card(outcome)
            if outcome.row is not None:
                rows.append(outcome.row)
            elif outcome.skipped:
                skipped += 1
            else:
                failed += 1
    except (CardSourceError, StateError, OSError) as exc:
        report.close()
        raise _fail(str(exc)) from None
    report.close()
    short = args.cards - len(rows) - failed
    if short > 0:
        print(f"{short} cards fewer than asked: " + (
            f"no card agent came for {args.agent_wait:g} s" if args.agents else
            f"{card_dir} has no more factory-fresh cards (pass --transport-master-hex to "
            "make new ones)"))
    if not rows:
        raise _fail(f"no card was initialized; pack {pack_serial} is not written")

    def sign(serial: str, digest: bytes) -> bytes:
        return ca.SignPack(ppb.SignPackRequest(provider_id=provider_id, pack_serial=serial,
                                               sha256=digest), timeout=60).signature

    from cms.envelope import KeyTransport

    try:
        files = write_pack_files(out, pack_header(pack_serial, provider_id, len(rows)), rows,
                                 sign, recipient, KeyTransport(args.key_transport))
    except OSError as exc:
        raise _fail(f"cannot write the pack in {out}: {exc.strerror or exc}") from None
    sealed = (f", both sealed to {args.encrypt_to} (no plaintext copy kept)"
              if files.sealed else "")
    print(f"pack {pack_serial}: {len(rows)} cards in {files.pack}, signature in "
          f"{files.signature}{sealed}; {failed} failed, {skipped} skipped")
    return 0
