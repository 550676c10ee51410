"""The agent installs on a user PC with grpcio, protobuf and pyscard only.

Checked three ways: a process where the server dependencies cannot be imported
at all still runs ``--help`` and a full session; what importing the agent loads;
and what the package declares against what its modules import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.agent_process import REPO, agent_env
from tests.card_agent.channel_server import ChannelServer
from tests.card_agent.scripts import command, done_message, script_message

SERVER_ONLY = ("cryptography", "yaml", "pkcs11", "sqlalchemy", "prometheus_client",
               "alembic", "psycopg", "gmpy2")
# Distribution name -> top-level module, for what the agent may import.
AGENT_DISTRIBUTIONS = {"grpcio": "grpc", "protobuf": "google", "pyscard": "smartcard"}
FIRST_PARTY = {"card_agent", "cardcore", "cms"}

# Runs in a fresh interpreter: makes the server-only packages unimportable, then
# uses the agent the way a user PC would.
CHILD = textwrap.dedent("""
    import contextlib, io, json, sys
    import importlib.abc

    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from cms.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["card-agent", "--help"])
        except SystemExit as exc:
            help_status = exc.code

    from card_agent.connection import ServerTarget
    from card_agent.session import AgentInfo, run_session

    class Card:
        atr = bytes.fromhex("3b00")
        reader_name = "PC reader"
        def transmit(self, apdu):
            return b"\\x90\\x00"
        def close(self):
            pass

    address, ca, cert, key = sys.argv[2:6]
    channel = ServerTarget(address, ca, cert, key).open_channel()
    report = run_session(Card(), channel, AgentInfo(label="light"))
    channel.close()
    print(json.dumps({
        "help_status": help_status, "help": out.getvalue(),
        "ok": report.ok, "modules": sorted(sys.modules),
    }))
""")


def test_agent_runs_without_server_dependencies(pki: Pki) -> None:
    def conversation(hello, receive, context):
        yield script_message(1, command("80ca9f7f00"))
        receive()
        yield done_message(pb.SessionDone.OK)

    ident = pki.identity("card-agent")
    with ChannelServer(pki, conversation) as server:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, ",".join(SERVER_ONLY), server.address,
             str(pki.ca), str(ident.cert), str(ident.key)],
            capture_output=True, text=True, timeout=60, cwd=REPO, env=agent_env(),
            check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["help_status"] == 0
    assert "--virtual" in result["help"] and "--list-readers" in result["help"]
    assert result["ok"] is True
    loaded = {name.split(".")[0] for name in result["modules"]}
    assert not loaded & set(SERVER_ONLY)
    assert server.record.hellos[0].agent_label == "light"


def test_importing_the_agent_loads_no_server_dependency() -> None:
    code = ("import sys, json; import card_agent.cli, card_agent.agent, card_agent.session, "
            "card_agent.runner, card_agent.connection, card_agent.pcsc; "
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=agent_env(), check=True)
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert "smartcard" in loaded and "grpc" in loaded
    assert not loaded & set(SERVER_ONLY)


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            # "from cardcore import sw" imports the module cardcore.sw.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported_modules(path)}


def _cardcore_modules_of_the_agent(agent_modules: list[Path]) -> list[Path]:
    """The cardcore modules the agent imports, and the ones those import, in turn."""
    seen: set[Path] = set()
    pending = list(agent_modules)
    while pending:
        for name in _imported_modules(pending.pop()):
            if name.split(".")[0] != "cardcore":
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                base = REPO.joinpath(*parts[:depth])
                path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                if path.is_file() and path not in seen:
                    seen.add(path)
                    pending.append(path)
    return sorted(seen)


def test_declared_dependencies_cover_every_import() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name = req
            for sep in "<>=!~[; ":
                name = name.split(sep)[0]
            out.add(name.lower())
        return out

    declared = names(project["dependencies"]) | names(
        project["optional-dependencies"]["agent"])
    assert declared == set(AGENT_DISTRIBUTIONS)
    allowed = {AGENT_DISTRIBUTIONS[d] for d in declared} | FIRST_PARTY \
        | set(sys.stdlib_module_names) | {"__future__"}
    agent_modules = sorted((REPO / "card_agent").glob("*.py"))
    shared = _cardcore_modules_of_the_agent(agent_modules)
    assert REPO / "cardcore" / "processor.py" in shared
    for module in agent_modules + shared:
        extra = _imported_roots(module) - allowed
        assert not extra, f"{module.name} imports {extra}, not declared for the agent"
