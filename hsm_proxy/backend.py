"""One worker's connection to the PKCS#11 module: sessions, login, key cache, recovery.

Runs inside a worker process only. The module is loaded once per process and
initialized without locking flags (python-pkcs11 passes none), so the worker
calls it from one thread. Each configured token gets one long-lived R/W
session, logged in once (login is per token per process); sessions are never
opened and closed per operation, because closing a session is slow while
another holds many objects.

Failure and recovery: an error that means the backend itself failed (device
error or removal, invalid or closed session, token gone, library not
initialized, general error, lost login) marks the backend down. Every cached
object handle is flushed at that moment (after a backend restart a handle
number can name another object, and a stale cache could sign with the wrong
key) and the owner's per-worker state is dropped through ``on_reset``.
Reconnection is attempted at once and then with exponential backoff capped at
``max_backoff``; until it succeeds every call fails fast with UNAVAILABLE.

The officer worker (``officer=True``) keeps no session and no login: PKCS#11
login state is per application and per token, a user login and a security
officer login exclude each other, and logging out destroys private session
objects. So the one worker that must set CKA_TRUSTED (ceremonies, transport
keys) opens a session with the login it needs for each step and closes it
(``login_session``), and holds nothing else in the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from pkcs11 import Attribute, ObjectClass

from cms.runtime.errors import FailedPrecondition, NotFound
from cms.runtime.logs import fields
from hsm_proxy.config import TokenConfig
from hsm_proxy.errors import BackendUnavailable
from hsm_proxy.keyspec import KEY_CLASSES, KeyShape, conformance, read_attributes, shape_of

log = logging.getLogger("hsm_proxy.backend")

FIRST_BACKOFF_S = 0.1

_BACKEND_FAILURES: tuple[type[Exception], ...] = (
    pkcs11.DeviceError, pkcs11.DeviceRemoved, pkcs11.SessionHandleInvalid,
    pkcs11.SessionClosed, pkcs11.TokenNotPresent, pkcs11.TokenNotRecognised,
    pkcs11.GeneralError, pkcs11.UserNotLoggedIn, pkcs11.SlotIDInvalid,
)


def is_backend_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the backend (not the request) failed."""
    if isinstance(exc, _BACKEND_FAILURES):
        return True
    # CKR_CRYPTOKI_NOT_INITIALIZED has no class of its own in python-pkcs11.
    return type(exc) is pkcs11.PKCS11Error and "not initialized" in str(exc)


def failure_name(exc: BaseException) -> str:
    if type(exc) is pkcs11.PKCS11Error and "not initialized" in str(exc):
        return "CryptokiNotInitialized"
    return type(exc).__name__


@dataclass
class ResolvedKey:
    """The objects one label (or one handle) names, with their attributes."""

    token: str
    label: str
    objects: dict[ObjectClass, pkcs11.Object]
    attrs: dict[ObjectClass, dict[Attribute, Any]]
    shapes: dict[ObjectClass, KeyShape]
    handle: str | None = None
    _conformance: str | None = None

    @property
    def name(self) -> str:
        return f"handle {self.handle}" if self.handle else repr(self.label)

    @property
    def is_pair(self) -> bool:
        return ObjectClass.PRIVATE_KEY in self.objects and ObjectClass.PUBLIC_KEY in self.objects

    def get(self, cls: ObjectClass) -> tuple[pkcs11.Object, KeyShape] | None:
        if cls in self.objects:
            return self.objects[cls], self.shapes[cls]
        return None

    def main(self) -> ObjectClass:
        """The class that stands for the key: secret, else private, else public."""
        for cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            if cls in self.objects:
                return cls
        raise NotFound(f"key {self.name} has no key objects")

    def all_objects(self) -> list[pkcs11.Object]:
        return list(self.objects.values())

    @property
    def conformance(self) -> str:
        """Empty when this token key matches its class's template (computed once)."""
        if self._conformance is None:
            self._conformance = conformance(self.label, self.attrs)
        return self._conformance


def resolve_objects(token: str, label: str, found: list[pkcs11.Object],
                    handle: str | None = None) -> ResolvedKey:
    objects: dict[ObjectClass, pkcs11.Object] = {}
    attrs: dict[ObjectClass, dict[Attribute, Any]] = {}
    shapes: dict[ObjectClass, KeyShape] = {}
    for obj in found:
        a = read_attributes(obj)
        cls = a.get(Attribute.CLASS)
        if cls not in KEY_CLASSES:
            continue
        if cls in objects:
            raise FailedPrecondition(
                f"label {label!r} on token {token!r} names more than one "
                f"{cls.name.lower().replace('_', ' ')}; the proxy refuses ambiguous labels")
        objects[cls], attrs[cls], shapes[cls] = obj, a, shape_of(a)
    if not objects:
        raise NotFound(f"no key labelled {label!r} on token {token!r}")
    return ResolvedKey(token, label, objects, attrs, shapes, handle)


@dataclass
class _TokenSession:
    config: TokenConfig
    token: Any
    session: Any
    mechanisms: frozenset[int] = field(default_factory=frozenset)


class Backend:
    """Sessions of one worker process, with recovery and a label cache."""

    def __init__(self, module: str, tokens: tuple[TokenConfig, ...], *,
                 max_backoff: float = 2.0, on_reset: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, officer: bool = False):
        self.officer = officer
        self.module = module
        self.tokens = {t.label: t for t in tokens}
        self.max_backoff = max_backoff
        self.on_reset = on_reset
        self.clock = clock
        self.generation = 0
        self.ok = False
        self.reason = "not connected yet"
        self.failures = 0
        self._lib: Any = None
        self._sessions: dict[str, _TokenSession] = {}
        self._cache: dict[tuple[str, str], ResolvedKey] = {}
        self._backoff = FIRST_BACKOFF_S
        self._next_attempt = 0.0

    # -- connection -----------------------------------------------------------
    def connect(self) -> None:
        """(Re)initialize the module and log in to every token; raises BackendUnavailable."""
        self._drop_sessions()
        try:
            if self._lib is None:
                self._lib = pkcs11.lib(self.module)
            else:
                try:
                    self._lib.finalize()
                except pkcs11.PKCS11Error:
                    pass  # already gone with the backend; initialize below decides
                self._lib.initialize()
            sessions: dict[str, _TokenSession] = {}
            for label, cfg in self.tokens.items():
                try:
                    token = self._lib.get_token(token_label=label)
                except pkcs11.NoSuchToken:
                    raise BackendUnavailable(f"token {label!r} is not present") from None
                mechanisms = frozenset(int(m) for m in token.slot.get_mechanisms())
                if self.officer:
                    sessions[label] = _TokenSession(cfg, token, None, mechanisms)
                    continue
                pin = cfg.read_pin()
                try:
                    session = token.open(rw=True, user_pin=pin)
                except pkcs11.UserAlreadyLoggedIn:
                    session = token.open(rw=True)
                finally:
                    del pin
                sessions[label] = _TokenSession(cfg, token, session, mechanisms)
        except BackendUnavailable as exc:
            self._down(exc.message)
            raise
        except pkcs11.PinIncorrect:
            self._down("a configured PIN is incorrect")
            raise BackendUnavailable(f"HSM login failed: {self.reason}") from None
        except pkcs11.PKCS11Error as exc:
            self._down(f"cannot connect: {failure_name(exc)}")
            raise BackendUnavailable(f"HSM backend unavailable ({self.reason})") from None
        except OSError as exc:
            self._down(f"cannot load the PKCS#11 module: {exc}")
            raise BackendUnavailable(f"HSM backend unavailable ({self.reason})") from None
        self._sessions = sessions
        self.ok = True
        self.reason = ""
        self._backoff = FIRST_BACKOFF_S
        log.info("backend connected", extra=fields(generation=self.generation,
                                                   tokens=sorted(sessions)))

    def _down(self, reason: str) -> None:
        self.ok = False
        self.reason = reason
        self._next_attempt = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)

    def _drop_sessions(self) -> None:
        """Forget sessions, cached handles and per-worker state (never reuse them).

        The generation moves on at once, so the frontend learns from the very
        reply that reports the failure that handles of the old generation are dead.
        """
        self._cache.clear()
        self._sessions.clear()
        self.generation += 1
        if self.on_reset is not None:
            self.on_reset()

    def fail(self, exc: BaseException) -> None:
        """The backend failed under a call: flush everything, schedule reconnection."""
        self.failures += 1
        name = failure_name(exc)
        log.warning("backend failure", extra=fields(error=name, generation=self.generation))
        self._drop_sessions()
        self._backoff = FIRST_BACKOFF_S
        self._down(f"backend failure: {name}")
        self._next_attempt = 0.0  # the first reconnection is immediate

    def ensure(self) -> None:
        """Connected, or reconnect if the backoff allows; else BackendUnavailable at once."""
        if self.ok:
            return
        if self.clock() < self._next_attempt:
            raise BackendUnavailable(f"HSM backend unavailable ({self.reason}); retrying")
        self.connect()

    def probe(self) -> None:
        """Exercise every session cheaply so a dead backend is noticed without traffic."""
        if not self.ok:
            self.ensure()
            return
        try:
            for ts in self._sessions.values():
                if ts.session is None:
                    with ts.token.open() as public:
                        public.generate_random(8)
                else:
                    ts.session.generate_random(8)
        except pkcs11.PKCS11Error as exc:
            if not is_backend_failure(exc):
                raise
            self.fail(exc)
            self.ensure()

    def close(self) -> None:
        self._cache.clear()
        for ts in self._sessions.values():
            if ts.session is None:
                continue
            try:
                ts.session.close()
            except pkcs11.PKCS11Error:
                pass
        self._sessions.clear()
        if self._lib is not None:
            try:
                self._lib.finalize()
            except pkcs11.PKCS11Error:
                pass
        self.ok = False

    # -- access -----------------------------------------------------------------
    @property
    def open_sessions(self) -> int:
        if not self.ok:
            return 0
        return sum(1 for ts in self._sessions.values() if ts.session is not None)

    def _token(self, token: str) -> _TokenSession:
        if token not in self.tokens:
            known = ", ".join(sorted(self.tokens))
            raise NotFound(f"unknown token {token!r} (the proxy fronts: {known})")
        self.ensure()
        return self._sessions[token]

    def session(self, token: str) -> Any:
        ts = self._token(token)
        if ts.session is None:
            raise FailedPrecondition("the officer worker keeps no session; this operation "
                                     "runs in the other workers")
        return ts.session

    @contextmanager
    def login_session(self, token: str, *, security_officer: bool = False) -> Iterator[Any]:
        """A session of the officer worker logged in for one step, closed (and so
        logged out) at the end. Private session objects die with it."""
        ts = self._token(token)
        if not self.officer:
            raise FailedPrecondition("only the officer worker opens sessions per step")
        cfg = ts.config
        if security_officer and not cfg.has_so_pin:
            raise FailedPrecondition(
                f"token {token!r} has no security officer PIN in the proxy configuration "
                f"(pkcs11.tokens[].so_pin_file): the trusted half of a transport key can be "
                f"made only in an SO session")
        pin = cfg.read_so_pin() if security_officer else cfg.read_pin()
        try:
            session = (ts.token.open(rw=True, so_pin=pin) if security_officer
                       else ts.token.open(rw=True, user_pin=pin))
        except pkcs11.PinIncorrect:
            raise FailedPrecondition(f"the {'security officer' if security_officer else 'user'}"
                                     f" PIN of token {token!r} is incorrect") from None
        finally:
            del pin
        try:
            yield session
        finally:
            try:
                session.close()
            except pkcs11.PKCS11Error:
                pass

    def supports(self, token: str, mechanism: int) -> bool:
        return mechanism in self._token(token).mechanisms

    def token_infos(self) -> list[dict[str, Any]]:
        out = []
        for label in self.tokens:
            ts = self._sessions.get(label)
            if ts is None:
                out.append({"label": label, "available": False})
                continue
            t = ts.token
            out.append({
                "label": label, "manufacturer": t.manufacturer_id, "model": t.model,
                "serial": t.serial.decode(errors="replace"),
                "logged_in": True, "available": True,
            })
        return out

    # -- keys by label -------------------------------------------------------------
    def find_objects(self, token: str, label: str) -> list[pkcs11.Object]:
        return list(self.session(token).get_objects({Attribute.LABEL: label}))

    def label_exists(self, token: str, label: str) -> bool:
        return bool(self.find_objects(token, label))

    def key(self, token: str, label: str) -> ResolvedKey:
        """The key named ``label`` on ``token``; object handles cached until invalidated."""
        cached = self._cache.get((token, label))
        if cached is not None and self.ok:
            return cached
        resolved = resolve_objects(token, label, self.find_objects(token, label))
        self._cache[(token, label)] = resolved
        return resolved

    def forget(self, token: str | None = None, label: str | None = None) -> None:
        """Drop cached handles: one label, one token, or everything."""
        if token is None:
            self._cache.clear()
        elif label is None:
            for k in [k for k in self._cache if k[0] == token]:
                del self._cache[k]
        else:
            self._cache.pop((token, label), None)

    def list_objects(self, token: str, object_class: ObjectClass | None = None
                     ) -> list[pkcs11.Object]:
        template = {Attribute.CLASS: object_class} if object_class is not None else {}
        return list(self.session(token).get_objects(template))
