"""Who may do what: the proxy's allow-only policy, keyed by certificate identity.

Policy file::

    identities:
      access-server:
        - {operations: ["*"], tokens: [access], keys: ["mk/*", "card/*"]}
        - {operations: [GenerateRandom, ListTokens], tokens: [access], keys: ["*"]}

A request is allowed when one rule of the caller's identity names the
operation (an RPC name, or ``*``) and has a token glob matching the token and a
key glob matching the key label. Operations that touch no key (GenerateRandom,
ListTokens, ListKeys) need only the operation and token to match; ListKeys
then shows only the labels the key globs match. Anything not allowed is denied,
and the denial names identity, operation, token and key so an operator can see
which rule is missing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cms.runtime.config import ConfigError, load_yaml
from cms.runtime.errors import PermissionDenied

ANY = "*"


def known_operations() -> frozenset[str]:
    """RPC names a policy may grant: every method of the services the proxy serves."""
    from cms.v1 import (
        card_keys_pb2,
        hsm_pb2,
        issuer_pb2,
        key_blocks_pb2,
        partners_pb2,
        provider_pb2,
    )

    names: set[str] = set()
    for module in (hsm_pb2, card_keys_pb2, key_blocks_pb2, provider_pb2, issuer_pb2,
                   partners_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            names.update(m.name for m in service.methods)
    return frozenset(names)


@dataclass(frozen=True)
class Rule:
    operations: frozenset[str]
    tokens: tuple[str, ...]
    keys: tuple[str, ...]

    def covers_operation(self, operation: str) -> bool:
        return ANY in self.operations or operation in self.operations

    def covers_token(self, token: str) -> bool:
        return any(fnmatch.fnmatchcase(token, pattern) for pattern in self.tokens)

    def covers_key(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.keys)


def _describe(operation: str, token: str | None, key: str | None) -> str:
    parts = [f"operation {operation}"]
    if token is not None:
        parts.append(f"token {token!r}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)


class Policy:
    """Allow-only rules per identity; immutable once loaded."""

    def __init__(self, identities: Mapping[str, Iterable[Rule]], source: str = "policy"):
        self._rules = {name: tuple(rules) for name, rules in identities.items()}
        self.source = source

    @property
    def identities(self) -> frozenset[str]:
        return frozenset(self._rules)

    def knows(self, identity: str | None) -> bool:
        return identity is not None and identity in self._rules

    def grants_operation(self, identity: str, operation: str) -> bool:
        """Whether any rule of ``identity`` names ``operation`` (on some token and key)."""
        return any(rule.covers_operation(operation) for rule in self._rules.get(identity, ()))

    def allowed(self, identity: str, operation: str, token: str | None = None,
                key: str | None = None) -> bool:
        """Whether one rule allows ``operation`` on ``token``/``key``.

        ``token`` None: any token will do (ListTokens); ``key`` None: the call
        touches no key, so key globs do not apply.
        """
        for rule in self._rules.get(identity, ()):
            if not rule.covers_operation(operation):
                continue
            if token is not None and not rule.covers_token(token):
                continue
            if key is not None and not rule.covers_key(key):
                continue
            return True
        return False

    def check(self, identity: str | None, operation: str, token: str | None = None,
              key: str | None = None) -> None:
        """Raise PermissionDenied (with every fact an operator needs) unless allowed."""
        what = _describe(operation, token, key)
        if identity is None:
            raise PermissionDenied(
                f"the client certificate carries no cms identity (URI SAN spiffe://cms/<name>); "
                f"denied {what}")
        if identity not in self._rules:
            raise PermissionDenied(
                f"identity {identity!r} is not in the proxy policy; denied {what}")
        if not self.allowed(identity, operation, token, key):
            raise PermissionDenied(f"identity {identity!r} is not allowed {what}")


def parse_policy(data: Mapping, *, source: str = "policy",
                 operations: frozenset[str] | None = None) -> Policy:
    """Validate a policy mapping. Unknown operation names are errors (a typo would deny)."""
    known = operations if operations is not None else known_operations()
    ids = data.get("identities")
    if not isinstance(ids, Mapping):
        raise ConfigError(f"{source}: 'identities' must be a mapping of identity to rules")
    result: dict[str, list[Rule]] = {}
    for identity, rules in ids.items():
        where = f"{source}: identities.{identity}"
        if not isinstance(identity, str) or not identity:
            raise ConfigError(f"{source}: identity names must be non-empty strings")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise ConfigError(f"{where}: expected a list of rules")
        parsed: list[Rule] = []
        for i, raw in enumerate(rules):
            rwhere = f"{where}[{i}]"
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{rwhere}: expected a mapping with operations, tokens, keys")
            extra = set(raw) - {"operations", "tokens", "keys"}
            if extra:
                raise ConfigError(f"{rwhere}: unknown field(s) {', '.join(sorted(extra))}")
            ops = _strings(raw, "operations", rwhere)
            unknown = [o for o in ops if o != ANY and o not in known]
            if unknown:
                raise ConfigError(f"{rwhere}.operations: unknown operation(s) "
                                  f"{', '.join(unknown)}")
            parsed.append(Rule(frozenset(ops), tuple(_strings(raw, "tokens", rwhere)),
                               tuple(_strings(raw, "keys", rwhere))))
        result[identity] = parsed
    return Policy(result, source)


def _strings(raw: Mapping, key: str, where: str) -> list[str]:
    value = raw.get(key)
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}.{key}: expected a non-empty list of strings")
    return value


def load_policy(path: Path) -> Policy:
    return parse_policy(load_yaml(path), source=str(path))
