"""``cms dev``: the local launcher (see deploy/local.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("dev", help="run the whole system locally (SoftHSM2, SQLite, dev PKI)")
    dsub = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    up = dsub.add_parser(
        "up", help="create what is missing, start the services, write endpoints.json")
    up.add_argument("--dir", required=True, type=Path, help="state directory of the stack")
    up.add_argument("--only", action="append", help="start only this service (repeatable)")
    up.add_argument("--access-database", metavar="URL",
                    help="the access server's registry, e.g. postgresql+psycopg://user@host/db "
                         "(remembered in DIR; default: SQLite in DIR/data)")
    up.set_defaults(func=_up)
    down = dsub.add_parser("down", help="stop the services started by 'up'")
    down.add_argument("--dir", required=True, type=Path)
    down.set_defaults(func=_down)
    status = dsub.add_parser("status", help="which services of the stack are running")
    status.add_argument("--dir", required=True, type=Path)
    status.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    from cms.runtime.cli_error import CliError
    from deploy.local import up

    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot use {args.dir} as the stack directory: {exc.strerror}") from None
    path = up(args.dir, only=args.only, access_database=args.access_database)
    print(path.read_text())
    return 0


def _down(args: argparse.Namespace) -> int:
    from deploy.local import down

    stopped = down(args.dir)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    from deploy.local import Stack, running_services

    running = running_services(Stack(args.dir))
    print(json.dumps(running, indent=2))
    return 0 if running else 3
