"""``cms card``: the virtual PSD (factory state, vpcd service, inspection)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    card = sub.add_parser("card", help="virtual PSD: create, run on a vpcd reader, inspect")
    csub = card.add_subparsers(dest="card_command", metavar="ACTION", required=True)

    init = csub.add_parser("init", help="create a factory-fresh virtual card state file")
    init.add_argument("--state", required=True, type=Path, help="state file to create")
    init.add_argument("--psd-id", help="unique id, 20 hex digits (default: random)")
    keys = init.add_mutually_exclusive_group(required=True)
    keys.add_argument("--transport-keys", choices=["default"],
                      help="'default': GlobalPlatform test keys 40..4F at KVN FF")
    keys.add_argument("--transport-master-hex",
                      help="factory transport master key (hex); the card's transport "
                           "keys are diversified from it and the PSD id")
    init.add_argument("--key-length", type=int, choices=[16, 24, 32], default=16)
    init.add_argument("--scp-i", default="70", metavar="HEX",
                      help="the SCP03 'i' the card announces and keeps to (default 70: "
                           "pseudo-random challenge, R-MAC, R-ENCRYPTION; 30: no "
                           "R-ENCRYPTION; 10: neither; add 01 for S16)")
    init.add_argument("--strict", action="store_true",
                      help="strict security executive: once the card holds the MKRK set "
                           "(KVN 70), MK sets change only in a channel opened with it; "
                           "any other channel gets 6982 (default: a transport channel "
                           "may manage MK sets too)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=_init)

    virtual = csub.add_parser("virtual", help="serve the card to a vsmartcard vpcd reader")
    virtual.add_argument("--state", required=True, type=Path)
    virtual.add_argument("--vpcd", default="127.0.0.1:35963", metavar="HOST:PORT",
                         help="where the vpcd reader listens (default 127.0.0.1:35963)")
    virtual.add_argument("--faults", default=None, metavar="PLAN",
                         help="fault plan, e.g. 'power-loss@5,tear@9,kill@3:PID' "
                              "(default: $CMS_CARD_FAULTS)")
    virtual.set_defaults(func=_virtual)

    show = csub.add_parser("show", help="print the card's id, key sets (KCVs, no keys) "
                                        "and its issuance life cycle and serial")
    show.add_argument("--state", required=True, type=Path)
    show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    import json

    from cms.runtime.cli_error import CliError
    from virtual_psd.factory import create_card

    master = None
    if args.transport_master_hex:
        try:
            master = bytes.fromhex(args.transport_master_hex)
        except ValueError as exc:
            raise CliError("--transport-master-hex is not hex") from exc
        if len(master) not in (16, 24, 32):
            raise CliError("the transport master key must be 16, 24 or 32 bytes")
    scp_i = _scp_i(args.scp_i)
    try:
        state = create_card(args.state, force=args.force, psd_id=args.psd_id,
                            transport_master=master, key_length=args.key_length,
                            scp_i=scp_i, strict=args.strict)
    except FileExistsError as exc:
        raise CliError(f"{exc} (use --force to overwrite)") from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(_summary(state), indent=2))
    return 0


def _scp_i(text: str) -> int:
    """``--scp-i``: one byte in hex (``70``, ``0x10``); CliError otherwise."""
    from cms.runtime.cli_error import CliError

    digits = text.strip().lower().removeprefix("0x")
    if not 1 <= len(digits) <= 2 or any(c not in "0123456789abcdef" for c in digits):
        raise CliError(f"--scp-i: one byte in hex (e.g. 70, 30 or 10), got {text!r}")
    return int(digits, 16)


def _summary(state: object) -> dict[str, object]:
    from cardcore.psd import key_set_role
    from virtual_psd.isd import isd_state
    from virtual_psd.issuance import issuance_state, life_cycle_of
    from virtual_psd.state import CardState

    assert isinstance(state, CardState)
    isd = isd_state(state)
    issuance = issuance_state(state)
    return {
        "psd_id": state.psd_id,
        "scp_i": f"{isd.scp_i:02X}",
        "policy": "strict" if isd.strict else "default",
        "sequence_counter": isd.sequence_counter,
        "key_sets": [
            {"kvn": f"{kvn:02X}", "role": key_set_role(kvn).value,
             "key_length": ks.key_length,
             "kcv": [k.hex().upper() for k in ks.kcvs()]}
            for kvn, ks in sorted(isd.key_sets.items())
        ],
        "issuance": {"life_cycle": life_cycle_of(issuance).name.lower(),
                     "serial": issuance.serial},
    }


def _show(args: argparse.Namespace) -> int:
    import json

    from cms.runtime.cli_error import CliError
    from virtual_psd.state import StateError, load_state

    try:
        summary = _summary(load_state(args.state))
    except StateError as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(summary, indent=2))
    return 0


def _virtual(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys

    from cms.runtime.cli_error import CliError
    from virtual_psd.card import VirtualCard
    from virtual_psd.faults import FaultPlan, FaultPlanError
    from virtual_psd.state import StateError
    from virtual_psd.vpcd import VpcdCard, parse_endpoint

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        host, port = parse_endpoint(args.vpcd)
        faults = FaultPlan.parse(args.faults if args.faults is not None
                                 else os.environ.get("CMS_CARD_FAULTS"))
        card = VirtualCard.open(args.state, faults=faults)
    except (ValueError, FaultPlanError, StateError) as exc:
        raise CliError(str(exc)) from exc
    server = VpcdCard(card, host, port)

    def _stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if faults.faults:
        logging.getLogger("virtual_psd").info("fault plan: %s", faults.describe())
    server.serve_forever()
    return 0
