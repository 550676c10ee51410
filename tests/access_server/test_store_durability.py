"""Store: durability of the cryptogram, migrations, schema and database contents.

The promise under test: once ``begin_install`` returns, the cryptogram is
committed, keyed by PSD id, where any new connection (or process) finds it;
and the database never holds anything derived from R but that cryptogram.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import LargeBinary, column, create_engine, inspect, select, table, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from access_server.migrations import VERSION_TABLE
from access_server.store import Cryptogram, ItemStatus, PsdState, Store
from access_server.store.models import Base
from cms.runtime.errors import InvalidArgument
from tests.access_server.test_store_fixtures import (
    ACTOR,
    LABEL,
    activate,
    begin_install,
    cryptogram,
    psd,
    register,
)

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

REPO = Path(__file__).resolve().parents[2]
A, B, C = psd(0xA), psd(0xB), psd(0xC)
HEAD = "0006"
TABLES = {"psd", "psd_event", "intent", "campaign", "campaign_item", "provider_root", "pack",
          "stock_card", "derivation_counter", "app_user", "issuance", "bureau", "activation",
          "mailer"}

# A child process that journals an installation and dies the instant the
# call returns: no clean-up, no connection close, no WAL checkpoint.
KILLED_CHILD = """
import os, signal, sys
from access_server.store import Store
url, psd_id, ciphertext = sys.argv[1:4]
store = Store(url)
intent = store.begin_install(
    psd_id, cryptogram=bytes.fromhex(ciphertext), cryptogram_key_label="cryptogram/1",
    mkrk_version=1, mk_version=1, actor="child",
)
print(intent.intent_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


# -- durability ------------------------------------------------------------------


def test_cryptogram_is_committed_when_begin_install_returns(database_url: str) -> None:
    with Store.from_url(database_url) as first:
        register(first, A)
        data = cryptogram()
        intent = begin_install(first, A, data=data)

        # A brand-new engine and connection, before the first store does anything else.
        with Store(database_url) as second:
            assert second.get_cryptogram(A) == Cryptogram(A, data, LABEL)
            assert second.open_intent(A) == intent
            assert second.get_psd(A).state is PsdState.INSTALLING


def test_cryptogram_survives_the_process_being_killed(database_url: str) -> None:
    with Store.from_url(database_url) as store:
        register(store, A)
    data = cryptogram()

    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, database_url, A, data.hex()],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    intent_id = int(child.stdout)
    if database_url.startswith("sqlite"):
        # The commit sits in the write-ahead log nobody checkpointed.
        wal = Path(f"{make_url(database_url).database}-wal")
        assert wal.stat().st_size > 0
    with Store(database_url) as reopened:
        assert reopened.get_cryptogram(A).ciphertext == data
        intent = reopened.open_intent(A)
        assert intent is not None and intent.intent_id == intent_id


def test_sqlite_connections_are_set_up_for_durability(tmp_path: Path) -> None:
    with Store.from_url(f"sqlite:///{tmp_path / 'access.db'}") as store:
        with store.engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA synchronous").scalar() == 2  # FULL
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() >= 1000


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    with Store.from_url("sqlite://") as store:
        register(store, A)
        winners: list[bool] = []

        def take(holder: str) -> None:
            winners.append(store.acquire_lease(A, holder, 30))

        threads = [threading.Thread(target=take, args=(f"agent-{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(winners) == [False, False, False, True]


# -- migrations --------------------------------------------------------------------


def test_migrate_from_empty(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
        with Store(database_url) as store:
            store.migrate()
            store.migrate()  # idempotent

        assert set(inspect(engine).get_table_names()) == TABLES | {VERSION_TABLE}
        with engine.connect() as connection:
            versions = connection.scalars(
                select(column("version_num")).select_from(table(VERSION_TABLE))
            )
            assert list(versions) == [HEAD]
            # The migration creates exactly what the models describe.
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def _alembic(database_url: str, *args: str) -> None:
    ini = REPO / "access_server" / "migrations" / "alembic.ini"
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "-x",
                           f"url={database_url}", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_upgrade_from_0001_keeps_the_cards_and_downgrade_removes_the_attention(
        database_url: str) -> None:
    _alembic(database_url, "upgrade", "0001")
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO psd (psd_id, state, created, updated, row_version) "
                "VALUES (:p, 'blank', :t, :t, 1)"), {"p": A, "t": "2030-01-01 00:00:00"})
        with Store.from_url(database_url) as store:          # migrates to the head
            assert store.get_psd(A).state is PsdState.BLANK
            assert store.get_psd(A).attention is None
            store.flag_attention(A, reason="card_refused", detail="6A84", actor=ACTOR)
            with pytest.raises(IntegrityError), store.engine.begin() as connection:
                connection.execute(text("UPDATE psd SET attention_detail = NULL"))
            store.clear_attention(A, note="fixed", actor=ACTOR)
        _alembic(database_url, "downgrade", "0001")
        names = {c["name"] for c in inspect(engine).get_columns("psd")}
        assert names == COLUMNS["psd"] - {"attention", "attention_detail", "attention_since"}
        _alembic(database_url, "upgrade", "head")
        with Store(database_url) as store:
            assert store.get_psd(A).attention is None
    finally:
        engine.dispose()


def test_stores_starting_together_migrate_once(database_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Store.from_url(database_url).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    with Store(database_url) as store:
        register(store, A)


def test_alembic_cli_config(database_url: str) -> None:
    ini = REPO / "access_server" / "migrations" / "alembic.ini"
    alembic = [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={database_url}"]

    upgrade = subprocess.run([*alembic, "upgrade", "head"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
    current = subprocess.run([*alembic, "current"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)

    assert upgrade.returncode == 0, upgrade.stderr
    assert f"{HEAD} (head)" in current.stdout, current.stdout + current.stderr
    with Store(database_url) as store:
        register(store, A)
        assert store.get_psd(A).state is PsdState.BLANK


# -- schema ---------------------------------------------------------------------------

COLUMNS = {
    "psd": {
        "psd_id", "state", "mk_version", "mkrk_version", "pending_mk_version", "cryptogram",
        "cryptogram_key_label", "created", "updated", "last_contact", "lease_holder",
        "lease_expires", "row_version", "attention", "attention_detail", "attention_since",
    },
    "psd_event": {"event_id", "psd_id", "at", "event", "detail", "actor"},
    "intent": {
        "intent_id", "psd_id", "kind", "from_version", "to_version", "mkrk_version", "status",
        "campaign_id", "created", "updated",
    },
    "campaign": {
        "campaign_id", "name", "from_version", "to_version", "psd_id_prefix", "listed_ids",
        "state", "created_by", "created", "updated",
    },
    "campaign_item": {"campaign_id", "psd_id", "status", "attempts", "last_error", "updated"},
    "provider_root": {"fingerprint", "provider_id", "certificate", "subject", "not_after",
                      "trusted_at", "trusted_by"},
    "pack": {"pack_id", "pack_serial", "file_sha256", "file_name", "provider_id",
             "root_fingerprint", "card_count", "created_at", "imported_at", "imported_by"},
    "stock_card": {
        "serial", "pack_id", "position", "state", "device_key_sha256", "device_modulus",
        "device_public_key", "issuer_auth_public_key", "device_certificate",
        "issuer_auth_certificate", "signed_device_key", "updated", "reserved_by",
    },
    "derivation_counter": {"name", "next_element"},
    "app_user": {"user_id", "name", "address", "email", "derivation_element", "created",
                 "created_by", "removed"},
    "issuance": {
        "serial", "user_id", "derivation_element", "issuance_id", "batch", "sequence", "state",
        "hsm_pins", "device_auth_public_key", "device_auth_wrapped_key",
        "device_auth_kek_version", "user_public_key", "reason", "created", "updated",
        "created_by", "dispatched",
    },
    "bureau": {"fingerprint", "name", "certificate", "subject", "not_after", "trusted_at",
               "trusted_by"},
    "mailer": {"fingerprint", "name", "certificate", "subject", "not_after", "trusted_at",
               "trusted_by"},
    "activation": {"serial", "issuance_id", "code_salt", "code_hash", "payload", "expires",
                   "failures", "state", "reason", "created", "updated", "created_by"},
}
"""Every column there is. A new one fails this test until someone has asked
whether it could ever hold a key, a PIN or R."""

SECRET_SOUNDING = re.compile(r"key|pin|puk|secret|random|seed|kcv|session|^r$", re.IGNORECASE)
NOT_SECRETS = {("psd", "cryptogram_key_label"), ("stock_card", "device_key_sha256"),
               ("stock_card", "device_public_key"), ("stock_card", "issuer_auth_public_key"),
               ("stock_card", "signed_device_key"), ("issuance", "device_auth_public_key"),
               ("issuance", "user_public_key"),
               ("issuance", "hsm_pins"), ("issuance", "device_auth_wrapped_key")}
"""Names that match but hold a label, or a card's public key, its fingerprint and the
card's signature over it (tests/access_server/test_packs.py: only public material); the
device authentication key's public half, and its private half only as the issuer system
HSM wrapped it under its KEK (AES key wrap: useless outside that HSM); whether the HSM
made the card's PIN and PUK (a flag, never the codes)."""
STOCK_BINARY = {("provider_root", "certificate")} | {
    ("stock_card", name) for name in ("device_modulus", "device_public_key",
                                      "issuer_auth_public_key", "device_certificate",
                                      "issuer_auth_certificate", "signed_device_key")}
ISSUANCE_BINARY = {("bureau", "certificate"), ("mailer", "certificate")} | {
    ("issuance", name) for name in ("device_auth_public_key", "device_auth_wrapped_key",
                                    "user_public_key")}
ACTIVATION_BINARY = {("activation", name) for name in ("code_salt", "code_hash", "payload")}
"""An online issuance's code only as its salt and scrypt hash, and the payload, sealed to
its card and signed (no secret in clear)."""
"""Certificates and public keys: the only binary columns beside the cryptogram, and the
wrapped device authentication key."""


def test_schema_has_no_place_for_key_material(store: Store) -> None:
    inspector = inspect(store.engine)
    tables = set(inspector.get_table_names()) - {VERSION_TABLE}
    columns = {t: {c["name"]: c["type"] for c in inspector.get_columns(t)} for t in tables}

    assert {t: set(names) for t, names in columns.items()} == COLUMNS
    binary = {
        (table, name)
        for table, found in columns.items()
        for name, kind in found.items()
        if isinstance(kind, LargeBinary) or kind.python_type is bytes
    }
    assert binary == {("psd", "cryptogram")} | STOCK_BINARY | ISSUANCE_BINARY | \
        ACTIVATION_BINARY
    suspicious = {
        (table, name)
        for table, names in COLUMNS.items()
        for name in names
        if SECRET_SOUNDING.search(name)
    }
    assert suspicious == NOT_SECRETS


def test_database_refuses_a_card_in_service_it_cannot_reproduce(store: Store) -> None:
    activate(store, A)
    statements = [
        "UPDATE psd SET cryptogram = NULL, cryptogram_key_label = NULL WHERE psd_id = :p",
        "UPDATE psd SET cryptogram_key_label = NULL WHERE psd_id = :p",
        "UPDATE psd SET state = 'replacement_pending' WHERE psd_id = :p",
        "UPDATE psd SET state = 'lost' WHERE psd_id = :p",
    ]
    for statement in statements:
        with pytest.raises(IntegrityError), store.engine.begin() as connection:
            connection.execute(text(statement), {"p": A})
    assert store.get_cryptogram(A).key_label == LABEL


# -- what the database holds -------------------------------------------------------------


def _dump(request: pytest.FixtureRequest, url: str) -> str:
    """The database's contents as its own dump tool writes them."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        connection = sqlite3.connect(path)
        try:
            return "\n".join(connection.iterdump())
        finally:
            connection.close()
    database = make_url(url).database
    assert database is not None
    return str(request.getfixturevalue("postgres_server").dump(database))


def _tables_holding(dump: str, needle: str) -> list[tuple[str, str]]:
    """(table, line) for each dump line with ``needle`` (case-insensitive)."""
    found = []
    table = ""
    for line in dump.splitlines():
        copy = re.match(r"COPY (?:\w+\.)?\"?(\w+)\"? ", line)
        insert = re.match(r"INSERT INTO \"?(\w+)\"?", line)
        if copy or insert:
            table = (copy or insert).group(1)  # type: ignore[union-attr]
        if needle.lower() in line.lower():
            found.append((table, line))
    return found


def test_only_the_cryptogram_carries_what_came_from_r(
    request: pytest.FixtureRequest, database_url: str
) -> None:
    planted = b"PLANTED-R-" + os.urandom(22)  # a 32-byte stand-in for R
    superseded = b"OLD-R-" + os.urandom(26)
    refused = os.urandom(32)
    with Store.from_url(database_url) as store:
        # Card A goes through everything; its cryptogram carries the planted value.
        register(store, A, B, C)
        intent = begin_install(store, A, data=cryptogram(planted))
        store.acquire_lease(A, "agent-1", 30)
        store.touch_contact(A)
        store.complete_install(A, intent.intent_id, ACTOR)
        campaign = store.start_campaign("rotate", 1, 2, actor=ACTOR)
        replace = store.begin_replacement(
            A, from_version=1, to_version=2, campaign_id=campaign.campaign_id, actor=ACTOR
        )
        store.reconcile(A, state=PsdState.ACTIVE, mk_version=2, mkrk_version=1,
                        event="probe", detail="new MK answered", actor=ACTOR)
        assert store.get_intent(replace.intent_id).status.value == "done"
        store.record_event(A, "session_end", "ok", ACTOR)
        # Card B's first cryptogram is replaced by a restart on transport keys.
        begin_install(store, B, data=cryptogram(superseded))
        begin_install(store, B, data=cryptogram(), restart=True)
        # Card C is offered a raw R instead of a cryptogram.
        with pytest.raises(InvalidArgument):
            begin_install(store, C, data=refused)
        assert store.get_campaign_item(campaign.campaign_id, A).status is ItemStatus.DONE
        store.revoke(A, "end of test", ACTOR)

    dump = _dump(request, database_url)

    holders = _tables_holding(dump, planted.hex())
    assert len(holders) == 1, holders
    table, line = holders[0]
    assert table == "psd" and A in line
    assert _tables_holding(dump, superseded.hex()) == []
    assert _tables_holding(dump, refused.hex()) == []
    assert "PLANTED-R-" not in dump  # never decoded into text anywhere
