"""The command-line options of a tool that serves card agents (``cms.runtime.agent_cards``).

Apart from the server so that registering a command imports nothing heavy:
``cms --help`` loads every command's options.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_LISTEN = "127.0.0.1:0"
DEFAULT_AGENT_WAIT = 600.0


def add_agent_arguments(parser: argparse.ArgumentParser, agents_in: Any, server_identity: str,
                        *, ends: str = "") -> None:
    """``--agents`` (into ``agents_in``: the parser, or a group of it), ``--listen`` and
    ``--agent-wait``; ``ends`` adds to what ends the wait."""
    agents_in.add_argument("--agents", action="store_true",
                           help="cards in PC/SC readers through card agents: serve a card "
                                "channel for the run (cms card-agent --server HOST:PORT "
                                f"--server-identity {server_identity})")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"with --agents: where agents connect (default {DEFAULT_LISTEN}: "
                             "a free port, printed)")
    parser.add_argument("--agent-wait", type=float, default=DEFAULT_AGENT_WAIT,
                        metavar="SECONDS",
                        help="with --agents: end with the cards so far when none came for "
                             f"this long (default {DEFAULT_AGENT_WAIT:.0f}{ends})")
