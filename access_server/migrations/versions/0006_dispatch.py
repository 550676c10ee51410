"""The mailing house's dispatch confirmations (seed 004, B4): trusted mailing houses, and
when each card's PIN letters went out.

``mailer`` holds the certificates of the mailing houses whose signed dispatch
confirmations the issuer imports (``cms mailers trust``), as ``bureau`` holds
the bureaus'. ``issuance.dispatched`` is when the letters of a personalized
card were sent; its stock card is ``shipped`` from then on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mailer",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("not_after", TIME, nullable=False),
        sa.Column("trusted_at", TIME, nullable=False),
        sa.Column("trusted_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_mailer"),
    )
    with op.batch_alter_table("issuance") as batch:
        batch.add_column(sa.Column("dispatched", TIME, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issuance") as batch:
        batch.drop_column("dispatched")
    op.drop_table("mailer")
