"""``cms mailer ...``: the mailing house's commands (seed 004, B4).

They act as the identity ``mailer`` with its TLS files from the deployment's
``endpoints.json``. The mailing house's key is in its HSM behind the proxy
(MailerHsm): the issuer HSM or the bureau's HSM seals each card's PIN and
PUK to it, and only OpenMailerData opens them, one card at a time, for its
letters.

The dispatch confirmation (``<pack>-dispatch.csv``, ``cms.perso_format``)
tells the issuer which letters went out, and when. The mailing house's
signing key beside its mailer key signs it (MailerHsm.SignMailerFile, a
detached CMS signature in ``<file>.p7s``), and the issuer imports it
(``cms issue dispatched``) once it trusts the certificate ``cms mailer key
show --cert-out`` writes (``cms mailers trust``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cms.identity import MAILER

SERVICE = "hsm_proxy"
TIMEOUT = 60
DISPATCH_SUFFIX = "-dispatch.csv"


def register(sub: argparse._SubParsersAction) -> None:
    mailer = sub.add_parser("mailer", help="the mailing house: its key, and PIN letters")
    mailer.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                            "var/demo/endpoints.json)")
    mailer.add_argument("--identity", default=MAILER, help=f"TLS identity (default {MAILER})")
    mailer.add_argument("--mailer", required=True, metavar="NAME",
                        help="the mailing house's name: its key's")
    msub = mailer.add_subparsers(dest="mailer_command", metavar="ACTION", required=True)

    key = msub.add_parser("key", help="the mailing house's key in its HSM")
    ksub = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    for action, verb in (("create", "generate the keys"), ("show", "the public key")):
        parser = ksub.add_parser(action, help=f"{verb} (RSA-2048, what PINs are sealed to; "
                                              "P-256, what signs the dispatch confirmations)")
        parser.add_argument("--out", type=Path, help="write the public key here (PEM)")
        parser.add_argument("--cert-out", type=Path, help="write the signing key's "
                                                          "certificate here (PEM)")
        parser.set_defaults(func=_key, action=action)

    letters = msub.add_parser("letters", help="the PIN and PUK letters of a mailing file")
    letters.add_argument("file", type=Path, metavar="FILE",
                         help="the mailing file (its signature FILE.p7s beside it)")
    letters.add_argument("--signer", type=Path, required=True, metavar="CERT",
                         help="who signed the file: the issuer key's certificate or public "
                              "key, or the bureau's certificate (PEM or DER)")
    letters.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="where the letters and the dispatch confirmation go")
    letters.set_defaults(func=_letters)


def _fail(message: str) -> Any:
    from cms.runtime.cli_error import CliError

    return CliError(message)


def _name(value: str) -> str:
    from cms.pack_format import NAME_PATTERN

    if not NAME_PATTERN.match(value):
        raise _fail(f"--mailer {value[:64]!r}: 1-64 of letters, digits, '.', '_', '-'")
    return value


def _stub(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints
    from cms.v1 import partners_pb2_grpc

    return partners_pb2_grpc.MailerHsmStub(
        load_endpoints(args.endpoints).channel(SERVICE, args.identity))


def _key(args: argparse.Namespace) -> int:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from cms.v1 import partners_pb2 as pb

    request = pb.MailerKeyRequest(mailer=_name(args.mailer))
    stub = _stub(args)
    key = (stub.CreateMailerKey if args.action == "create" else stub.GetMailerKey)(
        request, timeout=TIMEOUT)
    from cryptography import x509

    if args.out is not None:
        _write(args.out, serialization.load_der_public_key(key.public_key).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if args.cert_out is not None:
        _write(args.cert_out, x509.load_der_x509_certificate(key.certificate).public_bytes(
            serialization.Encoding.PEM))
    print(f"mailer {key.mailer} key {'created' if args.action == 'create' else 'is'}: "
          f"SHA-256 {hashlib.sha256(key.public_key).hexdigest()}"
          + (f", public key in {args.out}" if args.out else "")
          + f"; signing certificate SHA-256 {hashlib.sha256(key.certificate).hexdigest()}"
          + (f" in {args.cert_out}" if args.cert_out else ""))
    return 0


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"{what} {path}: {exc.strerror or exc}") from None


def _mailing(args: argparse.Namespace) -> Any:
    from cms import perso_format as F
    from cms import signed_file
    from cms.pack_format import SIGNATURE_SUFFIX, PackFormatError

    data = _read(args.file, "mailing file")
    signature = _read(args.file.with_name(args.file.name + SIGNATURE_SUFFIX), "its signature")
    try:
        signer = signed_file.load_trusted(_read(args.signer, "--signer"))
    except ValueError:
        raise _fail(f"--signer {args.signer}: not an X.509 certificate (PEM or DER) nor a "
                    "PEM public key") from None
    try:
        signed_file.verify_trusted(data, signature, signer)
    except signed_file.SignatureError as exc:
        raise _fail(f"the mailing file's signature is refused: {exc}") from None
    try:
        return F.read_mailing(data)
    except PackFormatError as exc:
        raise _fail(f"the mailing file is refused: {exc}") from None


def _letters(args: argparse.Namespace) -> int:
    import hashlib
    from datetime import UTC, datetime

    import grpc

    from cms import perso_format as F
    from cms.pack_format import SIGNATURE_SUFFIX
    from cms.printing import PrintError
    from cms.runtime.files import write_private
    from cms.v1 import partners_pb2 as pb
    from mailer.letters import Code, write_letter

    table = _mailing(args)
    name = _name(args.mailer)
    stub = _stub(args)
    sent = []
    for row in table.rows:
        try:
            codes = stub.OpenMailerData(pb.OpenMailerDataRequest(
                mailer=name, serial=row.serial, mailer_data=row.mailer_data), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            raise _fail(f"card {row.serial}: {exc.details()}; the letters of the cards "
                        f"before it are in {args.out}, and no dispatch confirmation is "
                        "written") from None
        try:
            for code, value in ((Code.PIN, codes.pin), (Code.PUK, codes.puk)):
                write_letter(row, code, value, args.out)
        except (PrintError, OSError) as exc:
            raise _fail(f"card {row.serial}: cannot write its letters in {args.out}: "
                        f"{exc}") from None
        sent.append(F.DispatchRow(row.serial, datetime.now(UTC)))
        print(f"card {row.serial}: PIN and PUK letters for {row.user_name}", flush=True)
    dispatch = args.out / f"{table.header.pack}{DISPATCH_SUFFIX}"
    data = F.write_dispatch(F.FileHeader(table.header.file_serial, len(sent),
                                         datetime.now(UTC)), sent)
    signature = stub.SignMailerFile(pb.SignMailerFileRequest(
        mailer=name, purpose=f"dispatch {table.header.file_serial.hex()}",
        sha256=hashlib.sha256(data).digest()), timeout=TIMEOUT).signature
    write_private(dispatch, data)
    write_private(dispatch.with_name(dispatch.name + SIGNATURE_SUFFIX), signature)
    print(f"{len(sent)} card(s), {2 * len(sent)} letters; dispatch confirmation in {dispatch}, "
          f"signed in {dispatch.name}{SIGNATURE_SUFFIX}")
    return 0
