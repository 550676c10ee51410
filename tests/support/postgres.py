"""A private PostgreSQL server for tests, and the pytest fixtures that use it.

The server runs from the distribution's binaries (``/usr/lib/postgresql/<v>/bin``,
or ``CMS_TEST_PG_BIN``) in a temporary data directory, listening only on a
unix socket in that directory, so it clashes with nothing else on the machine
and needs no free TCP port. ``initdb`` refuses to run as root: as root, the
server runs as the ``postgres`` system user, or as a dedicated
``cms-pgtest`` user created when no such user exists. It is a test server:
``fsync`` is off (durability tests kill clients, not the machine).

Fixtures (use them from a test module with
``pytest_plugins = ("tests.support.postgres",)``):

- ``postgres_server``: session-scoped running ``PostgresServer``.
- ``postgres_url``: a fresh, empty database on it for one test (dropped after).
- ``database_url``: parametrized over ``sqlite`` (a file in ``tmp_path``) and
  ``postgresql`` (``postgres_url``, marked ``postgres``), both empty.

Without PostgreSQL binaries the PostgreSQL tests fail with a hint, unless
``CMS_TEST_SKIP_POSTGRES=1`` asks to skip them.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

BIN_ENV = "CMS_TEST_PG_BIN"
SKIP_ENV = "CMS_TEST_SKIP_POSTGRES"
DISTRIBUTION_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"
FALLBACK_USER = "cms-pgtest"
SUPERUSER = "cms"
"""Database superuser the cluster is initialized with (trust auth on the socket)."""
PORT = 5432
"""Only names the socket file; the socket directory is private, so no clash."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
SERVER_SETTINGS = {
    "listen_addresses": "",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "timezone": "UTC",
}


def find_bindir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: env override, else the newest installed."""
    override = os.environ.get(BIN_ENV)
    if override:
        return Path(override)
    candidates = []
    for path in Path("/").glob(DISTRIBUTION_GLOB.lstrip("/")):
        if (path / "initdb").exists() and (path / "postgres").exists():
            version = re.search(r"/(\d+)/bin$", str(path))
            candidates.append((int(version.group(1)) if version else 0, path))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (SYSTEM_USER, FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(FALLBACK_USER)


class PostgresServer:
    """One throwaway cluster: ``start()``, create databases, ``stop()`` removes everything."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self._user = _unprivileged_user()
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    @property
    def socket_dir(self) -> Path:
        assert self._root is not None, "server not started"
        return self._root / "socket"

    @property
    def _log_path(self) -> Path:
        assert self._root is not None
        return self._root / "server.log"

    def _as_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def start(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="cms-pg-"))
        self.socket_dir.mkdir()
        if self._user is not None:
            for path in (self._root, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        data = self._root / "data"
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, cwd=self._root, env=env, **self._as_user(),
        )
        settings = {**SERVER_SETTINGS, "unix_socket_directories": str(self.socket_dir),
                    "port": str(PORT)}
        command = [str(self.bindir / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        log = self._log_path.open("wb")
        try:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self._root, env=env,
                process_group=0, **self._as_user(),
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start-up:\n{self._log_tail()}")
            try:
                with self._admin():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL not ready after {START_TIMEOUT_S}s:\n{self._log_tail()}"
                    ) from None
                time.sleep(POLL_INTERVAL_S)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=str(self.socket_dir), port=PORT, user=SUPERUSER, dbname="postgres",
            autocommit=True, connect_timeout=5,
        )

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3 over the socket)."""
        return (
            f"postgresql+psycopg://{SUPERUSER}@/{database}"
            f"?host={self.socket_dir}&port={PORT}"
        )

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from template0); returns its name."""
        name = name or f"test_{os.getpid()}_{next(self._names)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"unsafe database name {name!r}")
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def dump(self, database: str) -> str:
        """``pg_dump`` of the database (schema and data, plain SQL), as text."""
        result = subprocess.run(
            [str(self.bindir / "pg_dump"), "--no-owner", "-h", str(self.socket_dir),
             "-p", str(PORT), "-U", SUPERUSER, database],
            check=True, capture_output=True,
        )
        return result.stdout.decode()

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then remove the cluster's directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"no PostgreSQL server binaries ({SKIP_ENV}=1)")
        pytest.fail(
            "no PostgreSQL server binaries found: run `scripts/bootstrap test`, set "
            f"{BIN_ENV}, or set {SKIP_ENV}=1 to skip the PostgreSQL tests"
        )
    with PostgresServer(bindir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each supported backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'access.db'}"
    return str(request.getfixturevalue("postgres_url"))
