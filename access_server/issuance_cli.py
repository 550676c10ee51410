"""``cms users ...``, ``cms issue ...``, ``cms bureaus ...`` and ``cms mailers ...``: users,
issuance, results and dispatch confirmations.

A registrar of ``cms.cli`` beside ``access_server.cli``, whose client options
(``--endpoints``, ``--identity``) and helpers it uses. Bad input is one line
and exit status 1, before anything reaches the server where the client can
tell.

``cms issue --pack NAME --users FILE`` takes FILE as CSV with one column,
``user_id``, under that header: users are registered first (``cms users
add``), so a batch names only users the issuer knows, and the same file run
twice is refused by the one-card-in-flight rule, not issued twice.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any, NamedTuple

USER_COLUMN = "user_id"
MAX_USERS_FILE = 1024 * 1024
ISSUE_TIMEOUT_S = 1800
SIGNATURE_SUFFIX = ".p7s"


def register(sub: argparse._SubParsersAction) -> None:
    from access_server.cli import _client_options as client_options

    users = sub.add_parser("users", help="the users cards are issued to")
    client_options(users)
    usub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = usub.add_parser("add", help="register a user (a derivation element is assigned)")
    add.add_argument("--name", required=True)
    add.add_argument("--address", required=True,
                     help="postal address; '\\n' separates its lines")
    add.add_argument("--email", default="")
    add.set_defaults(func=_users_add)
    show = usub.add_parser("show", help="one user and their cards")
    show.add_argument("user_id", type=_user_id)
    show.set_defaults(func=_users_show)
    usub.add_parser("list", help="users, in the order they were added").set_defaults(
        func=_users_list)
    remove = usub.add_parser("remove", help="remove a user with no card in flight")
    remove.add_argument("user_id", type=_user_id)
    remove.set_defaults(func=_users_remove)

    issue = sub.add_parser("issue", help="issue cards from stock to users: the bureau's files")
    client_options(issue)
    _issue_options(issue)
    issue.add_argument("--users", type=Path, dest="users_file",
                       help=f"CSV of user ids (header {USER_COLUMN})")
    issue.set_defaults(func=_issue_batch)
    isub = issue.add_subparsers(dest="issue_command", metavar="ACTION")
    one = isub.add_parser("user", help="issue one card to one user")
    one.add_argument("user_id", type=_user_id)
    one.add_argument("--online", action="store_true",
                     help="the user personalizes the card in their own PC (cms card-agent "
                          "--role user --activate): no bureau file; prints a one-time "
                          "activation code; needs --hsm-pins --mailer-key")
    one.add_argument("--valid-days", type=int, default=0,
                     help="days the activation code stays valid (default 14)")
    _repeated_options(one, client_options)
    _repeated_options(one, _issue_options)
    one.set_defaults(func=_issue_user)
    again = isub.add_parser("again", help="new payloads for the cards of an issuance still at "
                                          "the bureau (its files lost or damaged)")
    again.add_argument("file_serial", help="the issuance's file serial (hex)")
    _repeated_options(again, client_options)
    _repeated_options(again, _issue_options)
    again.set_defaults(func=_issue_again)
    results = isub.add_parser("results", help="import a bureau's signed result file")
    results.add_argument("file", type=Path)
    results.add_argument("--signature", type=Path, help="detached CMS (default FILE.p7s)")
    _repeated_options(results, client_options)
    results.set_defaults(func=_issue_results)
    dispatched = isub.add_parser("dispatched", help="import a mailing house's signed dispatch "
                                                    "confirmation: the cards are shipped")
    dispatched.add_argument("file", type=Path)
    dispatched.add_argument("--signature", type=Path, help="detached CMS (default FILE.p7s)")
    _repeated_options(dispatched, client_options)
    dispatched.set_defaults(func=_issue_dispatched)

    for name, who in (("bureaus", "bureau"), ("mailers", "mailing house")):
        partners = sub.add_parser(name, help=f"the {who}s whose signed files the issuer "
                                             "trusts")
        client_options(partners)
        partners.set_defaults(partners=name)
        psub = partners.add_subparsers(dest=f"{name}_command", metavar="ACTION",
                                       required=True)
        trust = psub.add_parser("trust", help=f"trust a {who}'s certificate (P-256 key)")
        trust.add_argument("--cert", required=True, type=Path, help="PEM or DER")
        trust.set_defaults(func=_partners_trust)
        psub.add_parser("list", help=f"the trusted {who}s").set_defaults(func=_partners_list)


def _repeated_options(parser: argparse.ArgumentParser, add: Any) -> None:
    """``add``'s options again on a subcommand, without defaults: given before the
    subcommand (``cms issue --out D user 5``) or after it, they count; not given, the
    parent's default stands."""
    group = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    add(group)
    for action in group._actions:
        action.default = argparse.SUPPRESS
    parser._add_container_actions(group)


def _issue_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pack", dest="batch",
                        help="the batch's name: the files are PACK.csv, PACK.csv.p7s, ...")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the files")
    parser.add_argument("--hsm-pins", action="store_true",
                        help="the HSM makes PIN and PUK (with --mailer-key): a mailing file too")
    parser.add_argument("--mailer-key", type=Path,
                        help="the mailing house's RSA public key or certificate (PEM)")
    parser.add_argument("--pin-length", type=int, default=0)
    parser.add_argument("--puk-length", type=int, default=0)
    parser.add_argument("--bureau-cert", type=Path,
                        help="seal the personalization file to this certificate (RSA)")
    parser.add_argument("--issuer-key-version", type=int, default=1)
    parser.add_argument("--seed-version", type=int, default=1)
    parser.add_argument("--kek-version", type=int, default=0, help="0: the newest")


def _user_id(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"user id {text[:20]!r}: a positive number")
    return int(text)


def _fail(message: str) -> Exception:
    from cms.runtime.cli_error import CliError

    return CliError(message)


def _read(path: Path, limit: int | None = None) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    if limit is not None and len(data) > limit:
        raise _fail(f"{path}: larger than {limit} bytes")
    return data


def _users_stub(args: argparse.Namespace) -> Any:
    from access_server.cli import _channel
    from cms.v1 import issuance_pb2_grpc

    return issuance_pb2_grpc.UsersStub(_channel(args))


def _issuance_stub(args: argparse.Namespace) -> Any:
    from access_server.cli import _channel
    from cms.v1 import issuance_pb2_grpc

    return issuance_pb2_grpc.IssuanceStub(_channel(args))


# -- users ---------------------------------------------------------------------------

def describe_user(u: Any) -> str:
    email = f" <{u.email}>" if u.email else ""
    address = u.address.replace("\n", ", ")
    return (f"{u.user_id} {u.name!r}{email} element={u.derivation_element} "
            f"address={address!r}")


def _users_add(args: argparse.Namespace) -> int:
    from cms.v1 import issuance_pb2 as pb

    user = _users_stub(args).AddUser(pb.AddUserRequest(
        name=args.name, address=args.address.replace("\\n", "\n"), email=args.email),
        timeout=30)
    print(f"added: {describe_user(user)}")
    return 0


def _users_show(args: argparse.Namespace) -> int:
    from cms.v1 import issuance_pb2 as pb

    user = _users_stub(args).GetUser(pb.GetUserRequest(user_id=args.user_id), timeout=30)
    print(describe_user(user))
    for card in user.cards:
        print(f"  card {card.serial} {card.state} batch {card.batch}"
              + (f" user key {card.user_public_key.hex()}" if card.user_public_key else ""))
    return 0


def _users_list(args: argparse.Namespace) -> int:
    from access_server.cli import _print_all
    from cms.v1 import issuance_pb2 as pb

    users = _users_stub(args).ListUsers(pb.ListUsersRequest(), timeout=60).users
    return _print_all(users, describe_user, "user(s)")


def _users_remove(args: argparse.Namespace) -> int:
    from cms.v1 import issuance_pb2 as pb

    user = _users_stub(args).RemoveUser(pb.GetUserRequest(user_id=args.user_id), timeout=30)
    print(f"removed: {describe_user(user)}")
    return 0


# -- issuance ------------------------------------------------------------------------

def read_user_ids(data: bytes, name: str) -> list[int]:
    """The user ids of a ``--users`` file: header ``user_id``, one id per line."""
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), strict=True))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _fail(f"{name}: not CSV text ({exc})") from None
    if not rows or rows[0] != [USER_COLUMN]:
        raise _fail(f"{name}: line 1 must be the header {USER_COLUMN}")
    ids: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 1:
            raise _fail(f"{name}: line {line}: {len(row)} columns, expected 1 ({USER_COLUMN})")
        try:
            ids.append(_user_id(row[0].strip()))
        except argparse.ArgumentTypeError as exc:
            raise _fail(f"{name}: line {line}: {exc}") from None
    if not ids:
        raise _fail(f"{name}: no user ids")
    return ids


def _public_key_der(data: bytes, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise _fail(f"{name}: not a PEM public key or certificate") from None
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def issue_request(args: argparse.Namespace, user_ids: list[int], batch: str) -> Any:
    from access_server.cli import certificate_der
    from cms.v1 import issuance_pb2 as pb

    if args.hsm_pins != (args.mailer_key is not None):
        raise _fail("--hsm-pins and --mailer-key go together: the HSM makes PIN and PUK "
                    "only for a mailing house's key")
    request = pb.IssueRequest(batch=batch, user_ids=user_ids, seed_version=args.seed_version,
                              issuer_key_version=args.issuer_key_version,
                              kek_version=args.kek_version, pin_length=args.pin_length,
                              puk_length=args.puk_length)
    if args.mailer_key is not None:
        request.mailer_public_key = _public_key_der(_read(args.mailer_key), str(args.mailer_key))
    if args.bureau_cert is not None:
        request.bureau_certificate = certificate_der(_read(args.bureau_cert))
    return request


def _out_dir(path: Path, request: Any) -> Path:
    """``--out``, checked before any card leaves the stock: a directory, none of the files
    there yet (once issued, the payloads exist only in what the server answers)."""
    from cms.perso_format import file_names

    if not path.is_dir():
        raise _fail(f"--out {path}: no such directory")
    names = file_names(request.batch, sealed=bool(request.bureau_certificate),
                       mailing=bool(request.mailer_public_key))
    for name in names[2:] if request.online else names:  # online: the mailing file only
        if (path / name).exists():
            raise _fail(f"{path / name} exists: nothing is written over it")
    return path


def write_files(out: Path, chunks: Any) -> tuple[Any, list[Path]]:
    """Write the streamed files into ``out`` (never over an existing file)."""
    summary, written, handles = None, [], {}
    complete = False
    try:
        for chunk in chunks:
            if chunk.HasField("summary"):
                summary = chunk.summary
                for name in summary.file_names:
                    if "/" in name or name.startswith("."):
                        raise _fail(f"the server named a file {name!r}")
                    path = out / name
                    try:
                        handles[name] = path.open("xb")
                    except FileExistsError:
                        raise _fail(f"{path} exists: nothing is written over it") from None
                    written.append(path)
                continue
            if chunk.file_name not in handles:
                raise _fail(f"the server sent an unannounced file {chunk.file_name!r}")
            handles[chunk.file_name].write(chunk.data)
        complete = True
    finally:
        for handle in handles.values():
            handle.close()
        if not complete:  # half a file is no file: the bureau must not get it
            for path in written:
                path.unlink(missing_ok=True)
    if summary is None:
        raise _fail("the server answered no summary")
    return summary, written


def _issue(args: argparse.Namespace, user_ids: list[int], batch: str,
           reissue: str | None = None) -> int:
    from cms.v1 import issuance_pb2 as pb

    request = issue_request(args, user_ids, batch)
    if getattr(args, "online", False):
        if not args.hsm_pins:
            raise _fail("--online needs --hsm-pins --mailer-key: the HSM makes PIN and PUK, "
                        "and they reach the user by letter, apart from the code")
        if args.bureau_cert is not None:
            raise _fail("--online has no bureau: leave out --bureau-cert")
        request.online, request.valid_days = True, args.valid_days
    elif getattr(args, "valid_days", 0):
        raise _fail("--valid-days goes with --online")
    out = _out_dir(args.out, request)
    stub = _issuance_stub(args)
    stream = (stub.Issue(request, timeout=ISSUE_TIMEOUT_S) if reissue is None else
              stub.Reissue(pb.ReissueRequest(file_serial=reissue, options=request),
                           timeout=ISSUE_TIMEOUT_S))
    summary, written = write_files(out, stream)
    print(f"issued {len(summary.serials)} card(s), file serial {summary.file_serial}:")
    for path in written:
        print(f"  {path}")
    if summary.activation_code:
        print(f"card {summary.serials[0]}: send it initialized to the user; activation code "
              f"(shown once, give it to the user apart from the card): "
              f"{summary.activation_code}, valid until "
              f"{summary.activation_expires.ToDatetime():%Y-%m-%d %H:%M} UTC")
    return 0


def _issue_batch(args: argparse.Namespace) -> int:
    if args.batch is None or args.users_file is None:
        raise _fail("cms issue needs --pack NAME --users FILE (or: cms issue user ID, "
                    "cms issue results FILE)")
    ids = read_user_ids(_read(args.users_file, MAX_USERS_FILE), str(args.users_file))
    return _issue(args, ids, args.batch)


def _issue_user(args: argparse.Namespace) -> int:
    import datetime as dt

    batch = args.batch or f"U{args.user_id}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    return _issue(args, [args.user_id], batch)


def _issue_again(args: argparse.Namespace) -> int:
    if args.batch is None:
        raise _fail("cms issue again needs --pack NAME: the new files' name")
    return _issue(args, [], args.batch, reissue=args.file_serial)


def _signed_chunks(args: argparse.Namespace, chunk: Any, field: str) -> list[Any]:
    """FILE and its detached signature as the upload's chunks: the signature first."""
    signature_path = args.signature or args.file.with_name(args.file.name + SIGNATURE_SUFFIX)
    data, signature = _read(args.file), _read(signature_path)
    return [chunk(signature=signature, file_name=args.file.name),
            *(chunk(**{field: data[i:i + 1024 * 1024]})
              for i in range(0, len(data), 1024 * 1024))]


def _import_signed(args: argparse.Namespace, rpc: str, chunk: str, field: str) -> Any:
    """The Issuance RPC ``rpc`` given FILE and its signature in ``chunk`` messages."""
    from cms.v1 import issuance_pb2 as pb

    return getattr(_issuance_stub(args), rpc)(
        iter(_signed_chunks(args, getattr(pb, chunk), field)), timeout=600)


def _issue_results(args: argparse.Namespace) -> int:
    summary = _import_signed(args, "ImportResults", "ResultsChunk", "results")
    print(f"results of {summary.file_serial} from {summary.bureau}: "
          f"{summary.personalized} personalized, {summary.failed} failed (quarantined)")
    return 0


def _issue_dispatched(args: argparse.Namespace) -> int:
    summary = _import_signed(args, "ImportDispatch", "DispatchChunk", "dispatch")
    print(f"dispatch of {summary.file_serial} from {summary.mailer}: the letters of "
          f"{summary.shipped} card(s) sent, the cards shipped")
    return 0


# -- bureaus and mailing houses -------------------------------------------------------

class PartnerCommands(NamedTuple):
    """The Issuance RPCs and words of ``cms bureaus`` or ``cms mailers`` (both take and
    answer the bureau's messages)."""
    trust: str
    list: str
    counted: str


PARTNERS = {
    "bureaus": PartnerCommands("TrustBureau", "ListBureaus", "bureau(s)"),
    "mailers": PartnerCommands("TrustMailer", "ListMailers", "mailing house(s)"),
}


def _describe_bureau(b: Any) -> str:
    return f"{b.name} {b.fingerprint} {b.subject!r} until {b.not_after.ToJsonString()}"


def _partners_trust(args: argparse.Namespace) -> int:
    from access_server.cli import certificate_der
    from cms.v1 import issuance_pb2 as pb

    rpc = PARTNERS[args.partners]
    partner = getattr(_issuance_stub(args), rpc.trust)(pb.TrustBureauRequest(
        certificate=certificate_der(_read(args.cert))), timeout=30)
    print(f"trusted: {_describe_bureau(partner)}")
    return 0


def _partners_list(args: argparse.Namespace) -> int:
    from access_server.cli import _print_all
    from cms.v1 import issuance_pb2 as pb

    rpc = PARTNERS[args.partners]
    answer = getattr(_issuance_stub(args), rpc.list)(pb.ListBureausRequest(), timeout=30)
    return _print_all(answer.bureaus, _describe_bureau, rpc.counted)
