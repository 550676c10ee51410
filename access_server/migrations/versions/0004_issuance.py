"""Users, derivation elements and issuance (seed 004, B3-B4); trusted bureaus; quarantine.

``app_user`` holds the user registry (``user`` is reserved on PostgreSQL);
each user's derivation element comes from the one row of
``derivation_counter``, read and bumped in the transaction that adds the
user, so an element is never handed out twice, not even after its user is
removed (MAX()+1 over the users would hand a removed user's element again).
``issuance`` is one row per card taken from stock: the user, the derivation
element, the issuance id and sequence the payload is bound to, the device
authentication key (public half, and the private half only as the issuer
system HSM wrapped it) and the user's public key. ``bureau`` holds the
bureau certificates whose result files the issuer accepts.

``stock_card.state`` gains ``quarantined`` (a card the bureau reported
failed: held aside, never back in stock). SQLite cannot alter a CHECK, so
there the table is copied (batch mode); nothing references ``stock_card``
before this revision, so the copy needs no foreign key switched off.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)
OLD_STATES = "state IN ('in_stock', 'reserved', 'personalized', 'shipped', 'failed')"
NEW_STATES = ("state IN ('in_stock', 'reserved', 'personalized', 'shipped', 'failed', "
              "'quarantined')")
ISSUANCE_STATES = "state IN ('preparing', 'issued', 'personalized', 'failed')"
FIRST_ELEMENT = 1
"""Derivation elements start at 1: proto3 cannot tell 0 from unset."""


def _stock_states(check: str) -> None:
    with op.batch_alter_table("stock_card") as batch:
        batch.drop_constraint(op.f("ck_stock_card_state"), type_="check")
        batch.create_check_constraint(op.f("ck_stock_card_state"), check)


def upgrade() -> None:
    _stock_states(NEW_STATES)
    counter = op.create_table(
        "derivation_counter",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("next_element", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_derivation_counter"),
        sa.CheckConstraint("next_element > 0 AND next_element <= 2147483648",
                           name=op.f("ck_derivation_counter_in_range")),
    )
    op.bulk_insert(counter, [{"name": "user", "next_element": FIRST_ELEMENT}])
    op.create_table(
        "app_user",
        sa.Column("user_id", ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("email", sa.String(254), nullable=True),
        sa.Column("derivation_element", sa.BigInteger(), nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("removed", TIME, nullable=True),
        sa.PrimaryKeyConstraint("user_id", name="pk_app_user"),
        sa.UniqueConstraint("derivation_element", name="uq_app_user_derivation_element"),
        # A removed user's id is never given to another (SQLite reuses the highest rowid).
        sqlite_autoincrement=True,
    )
    op.create_table(
        "issuance",
        sa.Column("serial", sa.String(32), nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("derivation_element", sa.BigInteger(), nullable=False),
        sa.Column("issuance_id", sa.String(32), nullable=False),
        sa.Column("batch", sa.String(64), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("hsm_pins", sa.Boolean(), nullable=False),
        sa.Column("device_auth_public_key", sa.LargeBinary(), nullable=True),
        sa.Column("device_auth_wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("device_auth_kek_version", sa.Integer(), nullable=True),
        sa.Column("user_public_key", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("serial", name="pk_issuance"),
        sa.ForeignKeyConstraint(["serial"], ["stock_card.serial"],
                                name="fk_issuance_serial_stock_card"),
        sa.ForeignKeyConstraint(["user_id"], ["app_user.user_id"],
                                name="fk_issuance_user_id_app_user"),
        sa.CheckConstraint(ISSUANCE_STATES, name=op.f("ck_issuance_state")),
        sa.CheckConstraint("sequence > 0", name=op.f("ck_issuance_sequence_positive")),
        sa.CheckConstraint(
            "state = 'preparing' OR (device_auth_public_key IS NOT NULL AND "
            "device_auth_wrapped_key IS NOT NULL AND user_public_key IS NOT NULL)",
            name=op.f("ck_issuance_issued_complete")),
    )
    op.create_index("ix_issuance_user_id_state", "issuance", ["user_id", "state"])
    op.create_index("ix_issuance_issuance_id", "issuance", ["issuance_id"])
    op.create_table(
        "bureau",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("not_after", TIME, nullable=False),
        sa.Column("trusted_at", TIME, nullable=False),
        sa.Column("trusted_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_bureau"),
    )


def downgrade() -> None:
    op.drop_table("bureau")
    op.drop_index("ix_issuance_issuance_id", table_name="issuance")
    op.drop_index("ix_issuance_user_id_state", table_name="issuance")
    op.drop_table("issuance")
    op.drop_table("app_user")
    op.drop_table("derivation_counter")
    op.execute(sa.text("UPDATE stock_card SET state = 'failed' WHERE state = 'quarantined'"))
    _stock_states(OLD_STATES)
