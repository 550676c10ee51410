"""Cards that need an operator: ``psd.attention`` (reason code), its detail and since when.

A contact that ends in a way the next contact cannot change (a card below the
minimum security level, a card refusing the secured script) flags the card;
campaigns pass it by until an operator clears the flag. The three columns are
set and cleared together (a CHECK says so), and a partial index serves the
count of flagged cards by reason.

On SQLite the columns are added with ALTER TABLE (the CHECK travels with the
last one, which SQLite allows on an added column), not by copying the table:
the card rows are referenced by every other table, and a copy would have to
switch foreign keys off, which cannot be done inside the migration's
transaction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime(timezone=True)
DESCRIBED = (
    "(attention IS NULL AND attention_detail IS NULL AND attention_since IS NULL)"
    " OR (attention IS NOT NULL AND attention_detail IS NOT NULL"
    " AND attention_since IS NOT NULL)"
)
CHECK_NAME = "ck_psd_attention_described"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("psd", sa.Column("attention_detail", sa.Text(), nullable=True))
    op.add_column("psd", sa.Column("attention_since", TIME, nullable=True))
    if sqlite:
        op.execute(f"ALTER TABLE psd ADD COLUMN attention VARCHAR(32) "
                   f"CONSTRAINT {CHECK_NAME} CHECK ({DESCRIBED})")
    else:
        op.add_column("psd", sa.Column("attention", sa.String(32), nullable=True))
        op.create_check_constraint(CHECK_NAME, "psd", DESCRIBED)
    op.create_index(
        "ix_psd_attention",
        "psd",
        ["attention"],
        sqlite_where=sa.text("attention IS NOT NULL"),
        postgresql_where=sa.text("attention IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_psd_attention", table_name="psd")
    if op.get_bind().dialect.name == "sqlite":
        # Dropping ``attention`` drops its own CHECK with it, which frees the other
        # two (ALTER TABLE DROP COLUMN, SQLite 3.35 and later; no table copy).
        for name in ("attention", "attention_since", "attention_detail"):
            op.execute(f"ALTER TABLE psd DROP COLUMN {name}")
        return
    op.drop_constraint(CHECK_NAME, "psd", type_="check")
    op.drop_column("psd", "attention")
    op.drop_column("psd", "attention_since")
    op.drop_column("psd", "attention_detail")
