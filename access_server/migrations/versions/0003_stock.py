"""The issuer's stock (seed 004, B2): trusted provider roots, imported packs, stock cards.

New tables only; nothing existing changes. ``pack.pack_id`` is the import
order and, with ``stock_card.position``, the order cards leave the stock
(first in, first out); an index on (state, pack_id, position) serves that.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)
STATES = "state IN ('in_stock', 'reserved', 'personalized', 'shipped', 'failed')"


def upgrade() -> None:
    op.create_table(
        "provider_root",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("not_after", TIME, nullable=False),
        sa.Column("trusted_at", TIME, nullable=False),
        sa.Column("trusted_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_provider_root"),
    )
    op.create_index("ix_provider_root_provider_id", "provider_root", ["provider_id"])

    op.create_table(
        "pack",
        sa.Column("pack_id", ID, autoincrement=True, nullable=False),
        sa.Column("pack_serial", sa.String(64), nullable=False),
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("root_fingerprint", sa.String(64), nullable=False),
        sa.Column("card_count", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("imported_at", TIME, nullable=False),
        sa.Column("imported_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("pack_id", name="pk_pack"),
        sa.UniqueConstraint("pack_serial", name="uq_pack_pack_serial"),
        sa.ForeignKeyConstraint(["root_fingerprint"], ["provider_root.fingerprint"],
                                name="fk_pack_root_fingerprint_provider_root"),
        sa.CheckConstraint("card_count > 0", name=op.f("ck_pack_card_count_positive")),
    )

    op.create_table(
        "stock_card",
        sa.Column("serial", sa.String(32), nullable=False),
        sa.Column("pack_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("device_key_sha256", sa.String(64), nullable=False),
        sa.Column("device_modulus", sa.LargeBinary(), nullable=False),
        sa.Column("device_public_key", sa.LargeBinary(), nullable=False),
        sa.Column("issuer_auth_public_key", sa.LargeBinary(), nullable=False),
        sa.Column("device_certificate", sa.LargeBinary(), nullable=False),
        sa.Column("issuer_auth_certificate", sa.LargeBinary(), nullable=False),
        sa.Column("signed_device_key", sa.LargeBinary(), nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.Column("reserved_by", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("serial", name="pk_stock_card"),
        sa.UniqueConstraint("device_key_sha256", name="uq_stock_card_device_key_sha256"),
        sa.ForeignKeyConstraint(["pack_id"], ["pack.pack_id"], name="fk_stock_card_pack_id_pack"),
        sa.CheckConstraint(STATES, name=op.f("ck_stock_card_state")),
        sa.CheckConstraint("position > 0", name=op.f("ck_stock_card_position_positive")),
    )
    op.create_index("uq_stock_card_pack_id_position", "stock_card", ["pack_id", "position"],
                    unique=True)
    op.create_index("ix_stock_card_state_pack_id_position", "stock_card",
                    ["state", "pack_id", "position"])


def downgrade() -> None:
    op.drop_table("stock_card")
    op.drop_table("pack")
    op.drop_index("ix_provider_root_provider_id", table_name="provider_root")
    op.drop_table("provider_root")
