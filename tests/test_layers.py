"""The packages' imports point one way: down the layers of docs/architecture.md.

``cardcore`` and ``cms`` are the floor (protocol code; the runtime, the CLI
registrar and the generated ``cms.v1``); the services stand on it and on
nothing of each other; ``deploy`` is the launcher on top, which may import
any of them. A service reaches another only through its gRPC contract, so a
service can be installed, tested and replaced alone, and the floor never
changes because a service did.

The graph is read from the source with ``ast``: every ``import`` counts,
inside functions and ``TYPE_CHECKING`` blocks too, since an import that runs
late is still a dependency. Modules that the ``cms`` command or the card
agent name by string (``cms.cli.REGISTRARS``, ``--virtual``) are looked up
at run time on purpose and are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FLOOR = ("cardcore", "cms")
SERVICES = ("access_server", "hsm_proxy", "key_mgmt", "card_agent", "virtual_psd", "provider",
            "bureau", "mailer")
LAUNCHER = ("deploy",)
PACKAGES = (*FLOOR, *SERVICES, *LAUNCHER)

# Import cycles still allowed, each an unordered pair of modules, with when it goes.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in ``module`` (at ``path``) starts from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """The first-party modules ``module`` imports, each with its line."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from a.b import c`` imports the module a.b.c when there is one.
                sub = f"{target}.{alias.name}"
                yield (sub if _is_module(sub) else target), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """Each first-party module -> {module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = _module_name(path)
            edges = graph.setdefault(module, {})
            for target, line in _imports(module, path):
                if target.split(".")[0] in PACKAGES and target != module:
                    edges.setdefault(target, line)
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in sorted(graph.items()):
        here = _top(module)
        for target, line in sorted(edges.items()):
            there = _top(target)
            if there == here or here in LAUNCHER:
                continue
            if there in LAUNCHER:
                why = "only the launcher may know the launcher"
            elif here in FLOOR and there in SERVICES:
                why = f"{here} is below every service"
            elif here in SERVICES and there in SERVICES:
                why = "a service reaches another only through its gRPC contract"
            else:
                continue
            found.append(f"{module} (line {line}) imports {target}: {why}")
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep chain of imports cannot reach the recursion limit.
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_the_graph_sees_every_package_and_late_imports(graph: dict[str, dict[str, int]]) -> None:
    assert {_top(m) for m in graph} == set(PACKAGES)
    # A function-level import (the demo imports the services inside its steps).
    assert "virtual_psd.factory" in graph["deploy.demo"]
    # A relative-free ``from package import module`` names the module.
    assert "cardcore.sw" in graph["virtual_psd.card"]


def test_the_checks_catch_what_they_forbid() -> None:
    made_up = {
        "cms.runtime.x": {"hsm_proxy.y": 3},
        "cardcore.z": {"deploy.pki": 4},
        "key_mgmt.a": {"access_server.b": 5, "cms.runtime.x": 6},
        "deploy.c": {"key_mgmt.a": 7},
        "hsm_proxy.p": {"hsm_proxy.q": 1},
        "hsm_proxy.q": {"hsm_proxy.r": 1},
        "hsm_proxy.r": {"hsm_proxy.p": 1},
    }
    assert layer_violations(made_up) == [
        "cardcore.z (line 4) imports deploy.pki: only the launcher may know the launcher",
        "cms.runtime.x (line 3) imports hsm_proxy.y: cms is below every service",
        "key_mgmt.a (line 5) imports access_server.b: a service reaches another only "
        "through its gRPC contract",
    ]
    assert import_cycles(made_up) == [["hsm_proxy.p", "hsm_proxy.q", "hsm_proxy.r"]]


def test_no_import_runs_up_or_across_the_layers(graph: dict[str, dict[str, int]]) -> None:
    violations = layer_violations(graph)
    assert not violations, "\n".join(violations)


def test_no_import_cycle_between_modules(graph: dict[str, dict[str, int]]) -> None:
    cycles = [c for c in import_cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_allowed_cycles_are_still_there(graph: dict[str, dict[str, int]]) -> None:
    """An allowed cycle that is gone is taken off the list, so it cannot come back unseen."""
    cycles = {frozenset(c) for c in import_cycles(graph)}
    assert ALLOWED_CYCLES <= cycles, ALLOWED_CYCLES - cycles
