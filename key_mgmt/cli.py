"""``cms key-mgmt serve`` and the operators' ``cms keys ...`` commands.

Custodians enter their components with ``cms keys ceremony submit``: the
component is read from a file (``-`` for stdin) or typed without echo, never
taken from the command line (where ``ps`` and shell history would see it),
and sent over mutual TLS with the check value the custodian read, straight
to the HSM proxy under the custodian's own certificate (``--custodian``):
key management, which begins the ceremony, never sees a component.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

SERVICE = "key_mgmt"
KINDS = {"mk": "MK", "mkrk": "MKRK", "cryptogram": "CRYPTOGRAM_KEY_PAIR"}
ALGORITHMS = {"aes-128": "BLOCK_AES_128", "aes-256": "BLOCK_AES_256",
              "rsa-2048": "BLOCK_RSA_2048", "rsa-3072": "BLOCK_RSA_3072"}
COMPONENT_BYTES = {"aes-128": 16, "aes-256": 32}


def register(sub: argparse._SubParsersAction) -> None:
    server = sub.add_parser("key-mgmt", help="the key management server (HSM2 side)")
    ssub = server.add_subparsers(dest="key_mgmt_command", metavar="ACTION", required=True)
    serve = ssub.add_parser("serve", help="serve key blocks, ceremonies and transfers")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--ready-file", type=Path)
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="key blocks, transport keys and their ceremonies")
    keys.add_argument("--endpoints", help="endpoints.json (default: $CMS_ENDPOINTS or "
                                          "var/demo/endpoints.json)")
    keys.add_argument("--identity", default="admin", help="TLS identity (default admin)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = ksub.add_parser("create", help="generate the next version of a key block in HSM2")
    create.add_argument("kind", choices=sorted(KINDS))
    create.add_argument("--algorithm", choices=sorted(ALGORITHMS))
    create.set_defaults(func=_create)
    lst = ksub.add_parser("list", help="key blocks, their check values and whether HSM1 has them")
    lst.add_argument("--kind", choices=sorted(KINDS))
    lst.set_defaults(func=_list)

    cer = ksub.add_parser("ceremony", help="a key made from custodians' components")
    csub = cer.add_subparsers(dest="ceremony_command", metavar="ACTION", required=True)
    start = csub.add_parser("start", help="open a ceremony")
    start.add_argument("label", help="transport/NAME, or factory/transport-master with "
                                     "--factory-master")
    start.add_argument("--components", type=int, default=2)
    start.add_argument("--algorithm", choices=sorted(COMPONENT_BYTES))
    start.add_argument("--factory-master", action="store_true",
                       help="the card factory's transport master (DERIVE, HSM1 only)")
    start.set_defaults(func=_ceremony_start)
    submit = csub.add_parser("submit", help="enter one custodian's component (straight to "
                                            "the HSM proxy)")
    submit.add_argument("ceremony_id")
    submit.add_argument("--custodian", required=True,
                        help="the custodian's certificate identity (e.g. custodian-1)")
    submit.add_argument("--component-file", type=Path,
                        help="file with the component in hex ('-': stdin); default: prompt")
    submit.add_argument("--kcv", help="the component's check value (6 hex digits); "
                                      "default: prompt")
    submit.set_defaults(func=_ceremony_submit)
    for action, helptext in (("status", "a ceremony's progress"), ("cancel", "abandon it")):
        p = csub.add_parser(action, help=helptext)
        p.add_argument("ceremony_id")
        p.set_defaults(func=_ceremony_get, action=action)
    gen = csub.add_parser("new-component",
                          help="make a random component and its check value (for a custodian)")
    gen.add_argument("--out", type=Path, required=True, help="file written 0600, hex")
    gen.add_argument("--algorithm", choices=sorted(COMPONENT_BYTES), default="aes-128")
    gen.set_defaults(func=_new_component)

    est = ksub.add_parser("establish-transport",
                          help="a transport key wrapped to an RSA-OAEP import key made in HSM1")
    est.add_argument("label", help="transport/NAME")
    est.add_argument("--algorithm", choices=sorted(COMPONENT_BYTES))
    est.set_defaults(func=_establish)
    tr = ksub.add_parser("transports", help="transport keys and their check values")
    tr.set_defaults(func=_transports)
    xfer = ksub.add_parser("transfer", help="move key blocks to HSM1 under a transport key")
    xfer.add_argument("labels", nargs="+", metavar="LABEL", help="e.g. mk/1 mkrk/1 cryptogram/1")
    xfer.add_argument("--transport", required=True, help="transport/NAME")
    xfer.set_defaults(func=_transfer)


def _serve(args: argparse.Namespace) -> int:
    from key_mgmt.server import serve

    return serve(args.config, args.ready_file)


def _stub(args: argparse.Namespace) -> Any:
    from cms.runtime.client import load_endpoints
    from cms.v1 import key_mgmt_pb2_grpc

    return key_mgmt_pb2_grpc.KeyManagementStub(
        load_endpoints(args.endpoints).channel(SERVICE, args.identity))


def _algorithm(name: str | None) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    return pb.BlockAlgorithm.Value(ALGORITHMS[name]) if name else 0


def _kind_name(kind: int) -> str:
    return {1: "mk", 2: "mkrk", 3: "cryptogram"}.get(kind, "?")


def _alg_name(value: int) -> str:
    return {v: k for k, v in ((k, _algorithm(k)) for k in ALGORITHMS)}.get(value, "?")


def _create(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    block = _stub(args).CreateKeyBlock(pb.CreateKeyBlockRequest(
        kind=pb.KeyBlockKind.Value(KINDS[args.kind]), algorithm=_algorithm(args.algorithm)),
        timeout=120)
    print(f"{block.label}  {_alg_name(block.algorithm)}  kcv {block.kcv.hex()}  (in HSM2)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    kind = pb.KeyBlockKind.Value(KINDS[args.kind]) if args.kind else 0
    blocks = _stub(args).ListKeyBlocks(pb.ListKeyBlocksRequest(kind=kind), timeout=30).blocks
    if not blocks:
        print("no key blocks (create one with 'cms keys create mk')")
        return 0
    print(f"{'LABEL':<16} {'ALGORITHM':<10} {'KCV':<8} {'HSM1':<5} CREATED")
    for b in blocks:
        created = b.created.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{b.label:<16} {_alg_name(b.algorithm):<10} {b.kcv.hex():<8} "
              f"{'yes' if b.in_hsm1 else 'no':<5} {created}")
    return 0


def _print_ceremony(c: Any) -> None:
    from cms.v1 import key_mgmt_pb2 as pb

    state = {pb.CEREMONY_AWAITING_COMPONENTS: "awaiting components",
             pb.CEREMONY_COMPLETED: "completed",
             pb.CEREMONY_CANCELLED: "cancelled",
             pb.CEREMONY_EXPIRED: "expired",
             pb.CEREMONY_FAILED: "failed"}.get(c.state, "?")
    print(f"ceremony {c.ceremony_id}  {c.label}  {state}  "
          f"{c.components_received}/{c.components_needed} components")
    if c.custodians:
        print(f"  custodians: {', '.join(c.custodians)}")
    for k in c.kcvs:
        print(f"  kcv in {k.token}: {k.kcv.hex()}")
    if c.problem:
        print(f"  {c.problem}")


def _ceremony_start(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    c = _stub(args).StartCeremony(pb.StartCeremonyRequest(
        label=args.label, algorithm=_algorithm(args.algorithm), components=args.components,
        purpose=pb.TRANSPORT_MASTER if args.factory_master else 0), timeout=60)
    _print_ceremony(c)
    return 0


def _hex(text: str, what: str) -> bytes:
    from cms.runtime.cli_error import CliError

    cleaned = "".join(text.split())
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise CliError(f"the {what} is not hexadecimal") from None


def _read_component(args: argparse.Namespace) -> bytes:
    from cms.runtime.cli_error import CliError

    if args.component_file is None:
        if not sys.stdin.isatty():
            raise CliError("no terminal to type the component: use --component-file FILE or -")
        return _hex(getpass.getpass("component (hex, not echoed): "), "component")
    try:
        text = (sys.stdin.read() if str(args.component_file) == "-"
                else args.component_file.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {args.component_file}: {exc.strerror}") from None
    return _hex(text, "component")


def _ceremony_submit(args: argparse.Namespace) -> int:
    from cms.runtime.client import load_endpoints
    from cms.v1 import key_blocks_pb2 as bpb
    from cms.v1 import key_blocks_pb2_grpc

    component = _read_component(args)
    kcv_text = args.kcv if args.kcv is not None else input("component check value (hex): ")
    kcv = _hex(kcv_text, "check value")
    channel = load_endpoints(args.endpoints).channel("hsm_proxy", args.custodian)
    try:
        c = key_blocks_pb2_grpc.KeyBlocksStub(channel).AddComponent(bpb.AddComponentRequest(
            ceremony_id=args.ceremony_id, component=component, kcv=kcv), timeout=60)
    finally:
        channel.close()
    state = bpb.ComponentCeremonyState.Name(c.state).removeprefix("COMPONENT_CEREMONY_").lower()
    print(f"ceremony {c.ceremony_id}  {c.label}  {state}  {c.received}/{c.needed} components "
          f"(entered by {args.custodian})")
    for k in c.kcvs:
        print(f"  kcv in {k.token}: {k.kcv.hex()}")
    return 0


def _ceremony_get(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    stub = _stub(args)
    method = stub.GetCeremony if args.action == "status" else stub.CancelCeremony
    _print_ceremony(method(pb.GetCeremonyRequest(ceremony_id=args.ceremony_id), timeout=30))
    return 0


def _new_component(args: argparse.Namespace) -> int:
    from cardcore.kcv import kcv_zero_block
    from cms.runtime.cli_error import CliError

    component = os.urandom(COMPONENT_BYTES[args.algorithm])
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{args.out} exists: a component file is never overwritten") from None
    except OSError as exc:
        raise CliError(f"cannot create {args.out}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(component.hex() + "\n")
    print(f"component written to {args.out} (0600); check value {kcv_zero_block(component).hex()}")
    return 0


def _establish(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    t = _stub(args).EstablishTransportKey(pb.EstablishTransportKeyRequest(
        label=args.label, algorithm=_algorithm(args.algorithm)), timeout=120)
    print(f"{t.label}  {t.method}  kcv HSM2 {t.kcv_hsm2.hex()}  HSM1 {t.kcv_hsm1.hex()}")
    return 0


def _transports(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    keys = _stub(args).ListTransportKeys(pb.ListTransportKeysRequest(), timeout=30).keys
    if not keys:
        print("no transport keys (a ceremony or 'cms keys establish-transport' makes one)")
    for t in keys:
        print(f"{t.label}  {t.method}  kcv HSM2 {t.kcv_hsm2.hex()}  HSM1 {t.kcv_hsm1.hex()}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from cms.v1 import key_mgmt_pb2 as pb

    reply = _stub(args).TransferKeyBlocks(pb.TransferKeyBlocksRequest(
        transport_label=args.transport, labels=args.labels), timeout=300)
    for b in reply.blocks:
        note = "already in HSM1" if b.already_present else "transferred"
        print(f"{b.label}  {note}  kcv HSM2 {b.kcv_hsm2.hex()}  HSM1 {b.kcv_hsm1.hex()}")
    return 0
