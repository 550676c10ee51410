"""Activation codes of online issuance (seed 004, the user's own PC).

``activation`` is one row per card issued online: the payload the issuer HSM
made for it (sealed to the card and signed, no secret in clear), the code's
salt and scrypt hash (never the code), its expiry, the wrong codes counted
against it, and where it stands (``waiting``, ``sent`` once the payload went
to the card and the code is used up, ``personalized``, ``failed``,
``locked``, ``expired``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime(timezone=True)
STATES = "state IN ('waiting', 'sent', 'personalized', 'failed', 'locked', 'expired')"


def upgrade() -> None:
    op.create_table(
        "activation",
        sa.Column("serial", sa.String(32), nullable=False),
        sa.Column("issuance_id", sa.String(32), nullable=False),
        sa.Column("code_salt", sa.LargeBinary(), nullable=False),
        sa.Column("code_hash", sa.LargeBinary(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("expires", TIME, nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("serial", name="pk_activation"),
        sa.ForeignKeyConstraint(["serial"], ["issuance.serial"],
                                name="fk_activation_serial_issuance"),
        sa.CheckConstraint(STATES, name=op.f("ck_activation_state")),
        sa.CheckConstraint("failures >= 0", name=op.f("ck_activation_failures_not_negative")),
    )


def downgrade() -> None:
    op.drop_table("activation")
