"""The ``cms`` command: one entry point, subcommands registered by each package.

A package contributes commands through a ``register(subparsers)`` function in
its ``cli`` module; those modules import heavy dependencies only inside their
handlers, so ``cms --help`` and the card agent stay light. Every handler returns
an exit status; known errors print one clear line and exit non-zero, never a
traceback (set CMS_DEBUG=1 to see one).

``cms`` is the floor every service stands on, so it imports none of them: the
modules it composes are named here, by string, and imported only when the
command runs. This is the one place that knows the packages above it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from cms.runtime.cli_error import CliError

# Modules providing register(subparsers), in the order of ``cms --help``; a
# missing optional part is skipped.
REGISTRARS = (
    "deploy.pki_cli",
    "hsm_proxy.cli",
    "key_mgmt.cli",
    "access_server.cli",
    "access_server.issuance_cli",
    "provider.cli",
    "bureau.cli",
    "mailer.cli",
    "card_agent.cli",
    "virtual_psd.cli",
    "deploy.cli",
    "deploy.demo",
)
# Errors of the runtime and of the launcher that mean bad input or configuration:
# reported as one line like CliError (module, class).
REPORTED_ERRORS = (
    ("cms.runtime.config", "ConfigError"),
    ("cms.runtime.tls", "TlsConfigError"),
    ("cms.runtime.errors", "ServiceError"),
    ("deploy.pki", "PkiError"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cms", description="HSM-backed card management system")
    parser.add_argument("--version", action="version", version="cms 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in REGISTRARS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only the module itself being absent is tolerated (e.g. an agent-only
            # install); a missing dependency inside a present module is a bug.
            if exc.name == name or (exc.name and name.startswith(exc.name + ".")):
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for mod, attr in REPORTED_ERRORS:
        try:
            errors.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    debug = os.environ.get("CMS_DEBUG") == "1"
    try:
        status = func(args)
        return int(status or 0)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"cms: {exc}", file=sys.stderr)
        return exc.status
    except Exception as exc:
        if debug:
            raise
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            print(f"cms: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        if isinstance(exc, _known_errors()):
            print(f"cms: {exc}", file=sys.stderr)
            return 1
        print(f"cms: internal error ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
