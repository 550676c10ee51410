"""Alembic environment of the access server's store, shipped inside the package.

``Store.migrate()`` runs it programmatically; ``alembic.ini`` here makes the
CLI usable too (see ``env.py`` for how it finds the database).
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "access_alembic_version"
"""Own version table name, so the store can share a database with other schemas."""
