"""Alembic environment for the access server's store.

Two ways in:

- ``Store.migrate()`` passes an open connection (inside a transaction that
  already holds the migration lock) as ``config.attributes["connection"]``.
- The ``alembic`` CLI with ``-c access_server/migrations/alembic.ini``; the
  URL comes from ``-x url=...``, else ``CMS_ACCESS_DATABASE_URL``, else
  ``sqlalchemy.url`` in the ini file. The engine is built by the store's own
  factory, so SQLite gets the same pragmas as at run time.

Logging is left alone: the services configure their own JSON logs.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from access_server.migrations import VERSION_TABLE
from access_server.store.engine import make_engine, write_engine
from access_server.store.models import Base

URL_ENV = "CMS_ACCESS_DATABASE_URL"


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get(URL_ENV)
        or context.config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(f"no database URL: pass -x url=... or set {URL_ENV}")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given = context.config.attributes.get("connection")
    if given is not None:
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = write_engine(make_engine(_url()))
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
