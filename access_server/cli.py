"""``cms access-server serve``, ``cms psd ...``, ``cms campaign ...``, and the issuer's
stock: ``cms providers ...``, ``cms packs ...`` and ``cms stock``; users, issuance and
the bureau's results are ``access_server.issuance_cli``'s.

The operator commands reach the access server through endpoints.json
(``--endpoints``, $CMS_ENDPOINTS or ./var/demo/endpoints.json) as an identity
(default ``admin``). gRPC errors are reported as one line with their status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SERVICE = "access_server"
BAR_WIDTH = 30
ATTENTION_SHOWN = 50
UPLOAD_CHUNK = 1024 * 1024
"""Bytes per ImportPack message: well under gRPC's message limit."""
STOCK_COLUMNS = ("in_stock", "reserved", "personalized", "shipped", "failed", "quarantined")


def register(sub: argparse._SubParsersAction) -> None:
    server = sub.add_parser("access-server", help="the access server (HSM1 side)")
    ssub = server.add_subparsers(dest="access_command", metavar="ACTION", required=True)
    serve = ssub.add_parser("serve", help="serve the registry, campaigns and card channel")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--ready-file", type=Path)
    serve.set_defaults(func=_serve)

    psd = sub.add_parser("psd", help="the PSD registry")
    _client_options(psd)
    psub = psd.add_subparsers(dest="psd_command", metavar="ACTION", required=True)
    reg = psub.add_parser("register", help="register blank cards by PSD id")
    reg.add_argument("psd_ids", nargs="*", metavar="PSD_ID")
    reg.add_argument("--file", type=Path, help="one PSD id per line ('-': stdin)")
    reg.set_defaults(func=_psd_register)
    show = psub.add_parser("show", help="one card's record")
    show.add_argument("psd_id")
    show.set_defaults(func=_psd_show)
    lst = psub.add_parser("list", help="cards, in PSD id order")
    lst.add_argument("--state", choices=["blank", "installing", "active",
                                         "replacement-pending", "revoked"])
    lst.add_argument("--mk-version", type=int, default=0)
    lst.add_argument("--needs-attention", action="store_true",
                     help="only cards an operator must act on")
    lst.set_defaults(func=_psd_list)
    hist = psub.add_parser("history", help="one card's events")
    hist.add_argument("psd_id")
    hist.set_defaults(func=_psd_history)
    revoke = psub.add_parser("revoke", help="refuse all further work on a card")
    revoke.add_argument("psd_id")
    revoke.add_argument("--reason", required=True)
    revoke.set_defaults(func=_psd_revoke)
    clear = psub.add_parser("clear-attention",
                            help="the cause of a card's attention is dealt with: work on it "
                                 "again")
    clear.add_argument("psd_id")
    clear.add_argument("--note", required=True, help="what was done (kept in the history)")
    clear.set_defaults(func=_psd_clear_attention)

    camp = sub.add_parser("campaign", help="master key replacement campaigns")
    _client_options(camp)
    csub = camp.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    start = csub.add_parser("start", help="replace MK version X with Y on cards as they connect")
    start.add_argument("--from-version", type=int, required=True)
    start.add_argument("--to-version", type=int, required=True)
    start.add_argument("--psd", action="append", default=[], metavar="PSD_ID",
                       help="only these cards (repeatable)")
    start.add_argument("--prefix", default="", help="only cards whose PSD id starts so")
    start.add_argument("--name", default="")
    start.set_defaults(func=_campaign_start)
    status = csub.add_parser("status", help="progress of one campaign, or all")
    status.add_argument("campaign_id", nargs="?")
    status.add_argument("--watch", action="store_true", help="follow until it ends")
    status.add_argument("--all", action="store_true",
                        help=f"list every card that needs attention (default: the first "
                             f"{ATTENTION_SHOWN})")
    status.set_defaults(func=_campaign_status)
    for action in ("pause", "resume", "cancel"):
        p = csub.add_parser(action, help=f"{action} a campaign")
        p.add_argument("campaign_id")
        p.set_defaults(func=_campaign_transition, action=action)


    _register_stock(sub)


def _register_stock(sub: argparse._SubParsersAction) -> None:
    providers = sub.add_parser("providers", help="provider roots the issuer trusts")
    _client_options(providers)
    prsub = providers.add_subparsers(dest="providers_command", metavar="ACTION", required=True)
    trust = prsub.add_parser("trust", help="trust a provider's root CA certificate")
    trust.add_argument("--root-cert", required=True, type=Path, help="PEM or DER")
    trust.set_defaults(func=_providers_trust)
    prsub.add_parser("list", help="the trusted provider roots").set_defaults(
        func=_providers_list)

    pks = sub.add_parser("packs", help="packs of device initialization data")
    _client_options(pks)
    pksub = pks.add_subparsers(dest="packs_command", metavar="ACTION", required=True)
    imp = pksub.add_parser("import", help="verify a pack and add its cards to the stock")
    imp.add_argument("file", type=Path)
    imp.add_argument("--signature", type=Path,
                     help="the detached CMS signature (default FILE.p7s)")
    imp.set_defaults(func=_packs_import)
    pksub.add_parser("list", help="imported packs, in import order").set_defaults(
        func=_packs_list)

    stock = sub.add_parser("stock", help="the issuer's stock: cards per pack and state")
    _client_options(stock)
    stock.add_argument("--json", action="store_true", help="print JSON")
    stock.set_defaults(func=_stock)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                            "var/demo/endpoints.json)")
    parser.add_argument("--identity", default="admin", help="TLS identity (default admin)")


def _serve(args: argparse.Namespace) -> int:
    from access_server.server import serve

    return serve(args.config, args.ready_file)


def _channel(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints

    return load_endpoints(args.endpoints).channel(SERVICE, args.identity)


def _registry(args: argparse.Namespace) -> Any:
    from cms.v1 import access_pb2_grpc

    return access_pb2_grpc.PsdRegistryStub(_channel(args))


def _campaigns(args: argparse.Namespace) -> Any:
    from cms.v1 import access_pb2_grpc

    return access_pb2_grpc.CampaignsStub(_channel(args))


# -- registry -------------------------------------------------------------------

def _read_ids(args: argparse.Namespace) -> list[str]:
    from cms.runtime.cli_error import CliError

    ids = list(args.psd_ids)
    if args.file is not None:
        try:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise CliError("no PSD ids given (arguments or --file)")
    return ids


def _psd_register(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    reply = _registry(args).RegisterPsds(pb.RegisterPsdsRequest(psd_ids=_read_ids(args)),
                                         timeout=60)
    for r in reply.results:
        print(f"{r.psd_id}: {'added' if r.added else 'not added: ' + r.error}")
    print(f"{reply.added} of {len(reply.results)} added")
    return 0 if reply.added == len(reply.results) else 1


def _state_name(value: int) -> str:
    from cms.v1 import access_pb2 as pb

    return pb.PsdState.Name(value).removeprefix("PSD_").lower().replace("_", "-")


def _describe_psd(psd: Any) -> str:
    parts = [psd.psd_id, _state_name(psd.state), f"mk={psd.mk_version or '-'}",
             f"mkrk={psd.mkrk_version or '-'}"]
    if psd.pending_mk_version:
        parts.append(f"pending_mk={psd.pending_mk_version}")
    parts.append(f"cryptogram={'yes' if psd.has_cryptogram else 'no'}")
    if psd.HasField("last_contact"):
        parts.append(f"last_contact={psd.last_contact.ToJsonString()}")
    if psd.attention:
        parts.append(f"needs_attention={psd.attention}")
    return " ".join(parts)


def _psd_show(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    psd = _registry(args).GetPsd(pb.GetPsdRequest(psd_id=args.psd_id), timeout=30)
    print(_describe_psd(psd))
    if psd.attention:
        print(f"  needs attention since {psd.attention_since.ToJsonString()}: "
              f"{psd.attention_detail}")
        print(f"  once the cause is dealt with: cms psd clear-attention {psd.psd_id} "
              f"--note TEXT")
    return 0


def _psd_list(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    state = 0
    if args.state:
        state = pb.PsdState.Value("PSD_" + args.state.upper().replace("-", "_"))
    stub, token, shown = _registry(args), "", 0
    while True:
        page = stub.ListPsds(pb.ListPsdsRequest(state=state, mk_version=args.mk_version,
                                                needs_attention=args.needs_attention,
                                                page_size=500, page_token=token), timeout=60)
        for psd in page.psds:
            print(_describe_psd(psd))
        shown += len(page.psds)
        token = page.next_page_token
        if not token:
            break
    print(f"{shown} card(s)")
    return 0


def _psd_history(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    reply = _registry(args).GetPsdHistory(pb.GetPsdRequest(psd_id=args.psd_id), timeout=30)
    for e in reply.events:
        detail = f" {e.detail}" if e.detail else ""
        print(f"{e.at.ToJsonString()} {e.event} by {e.actor}{detail}")
    return 0


def _psd_revoke(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    psd = _registry(args).RevokePsd(pb.RevokePsdRequest(psd_id=args.psd_id, reason=args.reason),
                                    timeout=30)
    print(_describe_psd(psd))
    return 0


def _psd_clear_attention(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    psd = _registry(args).ClearPsdAttention(
        pb.ClearPsdAttentionRequest(psd_id=args.psd_id, note=args.note), timeout=30)
    print(_describe_psd(psd))
    return 0


# -- campaigns ------------------------------------------------------------------

def _campaign_start(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    request = pb.StartCampaignRequest(
        name=args.name, from_mk_version=args.from_version, to_mk_version=args.to_version,
        filter=pb.CampaignFilter(psd_ids=args.psd, psd_id_prefix=args.prefix))
    campaign = _campaigns(args).StartCampaign(request, timeout=60)
    print(describe_campaign(campaign))
    return 0


def describe_campaign(c: Any) -> str:
    from cms.v1 import access_pb2 as pb

    state = pb.CampaignState.Name(c.state).removeprefix("CAMPAIGN_").lower()
    return (f"{c.campaign_id} {c.name!r} MK {c.from_mk_version} -> {c.to_mk_version} {state}: "
            f"{c.done}/{c.total} done, {c.pending} pending, {c.failed} failed (needs "
            f"attention)")


def progress_bar(c: Any, width: int = BAR_WIDTH) -> str:
    """``[#####.....]  12/40`` for a campaign (done out of total)."""
    filled = width * c.done // c.total if c.total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {c.done}/{c.total}"


def _print_attention(stub: Any, campaign: Any, every: bool) -> None:
    """The campaign's cards that need an operator, each with why (its failed items)."""
    from cms.v1 import access_pb2 as pb

    if not campaign.failed:
        return
    shown, token = 0, ""
    while True:
        page = stub.ListCampaignItems(pb.ListCampaignItemsRequest(
            campaign_id=campaign.campaign_id, status=pb.ITEM_FAILED,
            page_size=500 if every else ATTENTION_SHOWN, page_token=token), timeout=60)
        for item in page.items:
            print(f"  {item.psd_id} needs attention: {item.last_error or 'no detail'}")
        shown += len(page.items)
        token = page.next_page_token
        if not token or not every:
            break
    if shown < page.total:
        print(f"  ... and {page.total - shown} more (--all lists them)")
    print("  once the cause is dealt with: cms psd clear-attention PSD_ID --note TEXT")


def _campaign_status(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    stub = _campaigns(args)
    if not args.campaign_id:
        if args.watch:
            from cms.runtime.cli_error import CliError

            raise CliError("--watch needs a campaign id")
        campaigns = stub.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns
        for c in campaigns:
            print(describe_campaign(c))
        if not campaigns:
            print("no campaigns")
        return 0
    request = pb.GetCampaignRequest(campaign_id=args.campaign_id)
    if not args.watch:
        c = stub.GetCampaign(request, timeout=30)
        print(describe_campaign(c))
        if sys.stdout.isatty():
            print(progress_bar(c))
        _print_attention(stub, c, args.all)
        return 0
    tty = sys.stdout.isatty()
    last = None
    for c in stub.WatchCampaign(request):
        last = c
        if tty:
            print(f"\r{progress_bar(c)} {c.failed} failed (needs attention)", end="",
                  flush=True)
        else:
            print(describe_campaign(c), flush=True)
    if tty:
        print()
    if last is not None and tty:
        print(describe_campaign(last))
    if last is not None:
        _print_attention(stub, last, args.all)
    return 0


def _campaign_transition(args: argparse.Namespace) -> int:
    from cms.v1 import access_pb2 as pb

    stub = _campaigns(args)
    method = {"pause": stub.PauseCampaign, "resume": stub.ResumeCampaign,
              "cancel": stub.CancelCampaign}[args.action]
    print(describe_campaign(method(pb.GetCampaignRequest(campaign_id=args.campaign_id),
                                   timeout=30)))
    return 0


# -- the issuer's stock ---------------------------------------------------------

def _stock_stub(args: argparse.Namespace) -> Any:
    from cms.v1 import stock_pb2_grpc

    return stock_pb2_grpc.StockStub(_channel(args))


def _read_file(path: Path) -> bytes:
    from cms.runtime.cli_error import CliError

    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def certificate_der(data: bytes) -> bytes:
    """A certificate file's DER, from PEM or DER."""
    if not data.lstrip().startswith(b"-----BEGIN"):
        return data
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from cms.runtime.cli_error import CliError

    try:
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    except ValueError:
        raise CliError("not a PEM certificate") from None


def _describe_provider(p: Any) -> str:
    return (f"{p.provider_id} {p.fingerprint} {p.subject!r} until "
            f"{p.not_after.ToJsonString()}")


def _print_all(items: Any, describe: Any, noun: str) -> int:
    """One line per item, then how many."""
    for item in items:
        print(describe(item))
    print(f"{len(items)} {noun}")
    return 0


def _providers_trust(args: argparse.Namespace) -> int:
    from cms.v1 import stock_pb2 as pb

    der = certificate_der(_read_file(args.root_cert))
    provider = _stock_stub(args).TrustProvider(pb.TrustProviderRequest(root_certificate=der),
                                               timeout=30)
    print(f"trusted: {_describe_provider(provider)}")
    return 0


def _providers_list(args: argparse.Namespace) -> int:
    from cms.v1 import stock_pb2 as pb

    providers = _stock_stub(args).ListProviders(pb.ListProvidersRequest(), timeout=30).providers
    return _print_all(providers, _describe_provider, "provider root(s)")


def upload_chunks(pack: bytes, signature: bytes, name: str, size: int = UPLOAD_CHUNK):
    """The ImportPack stream: the signature and the file's name first, then the file."""
    from cms.v1 import stock_pb2 as pb

    yield pb.ImportPackChunk(signature=signature, file_name=name)
    for start in range(0, len(pack), size):
        yield pb.ImportPackChunk(pack=pack[start:start + size])


def _describe_pack(p: Any) -> str:
    return (f"{p.pack_serial} #{p.import_order} {p.provider_id}: {p.card_count} cards, "
            f"imported {p.imported_at.ToJsonString()} by {p.imported_by}, sha256 "
            f"{p.file_sha256}")


def _packs_import(args: argparse.Namespace) -> int:
    from cms.pack_format import ENVELOPE_SUFFIX, SIGNATURE_SUFFIX
    from cms.runtime.cli_error import CliError

    if args.file.name.endswith(ENVELOPE_SUFFIX):
        # The issuer opens a sealed pack with its own decryption key, which this
        # command does not hold (docs/operations.md: openssl cms -decrypt).
        raise CliError(f"{args.file} is sealed (CMS EnvelopedData): open it and its "
                       f"signature with 'openssl cms -decrypt' first, then import the "
                       f"{args.file.name.removesuffix(ENVELOPE_SUFFIX)} it holds")
    signature_path = args.signature or args.file.with_name(args.file.name + SIGNATURE_SUFFIX)
    pack, signature = _read_file(args.file), _read_file(signature_path)
    reply = _stock_stub(args).ImportPack(upload_chunks(pack, signature, args.file.name),
                                         timeout=600)
    print(f"imported: {_describe_pack(reply)}")
    return 0


def _packs_list(args: argparse.Namespace) -> int:
    from cms.v1 import stock_pb2 as pb

    packs = _stock_stub(args).ListPacks(pb.ListPacksRequest(), timeout=30).packs
    return _print_all(packs, _describe_pack, "pack(s)")


def stock_table(packs: list[dict[str, Any]]) -> str:
    """Counts per pack and state as a text table, with a total line."""
    header = ("pack", *STOCK_COLUMNS)
    totals = {c: sum(p[c] for p in packs) for c in STOCK_COLUMNS}
    rows = [header, *((p["pack"], *(str(p[c]) for c in STOCK_COLUMNS)) for p in packs),
            ("total", *(str(totals[c]) for c in STOCK_COLUMNS))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def _stock(args: argparse.Namespace) -> int:
    from cms.v1 import stock_pb2 as pb

    counts = _stock_stub(args).GetStock(pb.GetStockRequest(), timeout=30)
    packs = [{"pack": p.pack_serial, "import_order": p.import_order,
              **{c: getattr(p, c) for c in STOCK_COLUMNS}} for p in counts.packs]
    if args.json:
        print(json.dumps({"packs": packs}, indent=2))
    else:
        print(stock_table(packs))
    return 0
