"""``cms pki``: the development PKI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    pki = sub.add_parser("pki", help="development PKI (CA and service certificates)")
    psub = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = psub.add_parser("init", help="create a CA and one certificate per identity")
    init.add_argument("--dir", required=True, type=Path, help="directory for the PKI files")
    init.add_argument("--identity", action="append", default=None,
                      help="identity to issue (repeatable; default: the standard set)")
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from deploy.pki import DEFAULT_IDENTITIES, init_pki

    identities = args.identity or list(DEFAULT_IDENTITIES)
    pki = init_pki(args.dir, identities)
    print(json.dumps(pki.manifest(), indent=2))
    return 0
