"""Initial schema: PSD registry, history, intent journal, campaigns.

Written out in full rather than imported from the models, so this revision
keeps creating the same schema when the models move on. A test checks that it
matches the models of its time (no autogenerate differences).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "psd",
        sa.Column("psd_id", sa.String(20), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("mk_version", sa.Integer(), nullable=True),
        sa.Column("mkrk_version", sa.Integer(), nullable=True),
        sa.Column("pending_mk_version", sa.Integer(), nullable=True),
        sa.Column("cryptogram", sa.LargeBinary(), nullable=True),
        sa.Column("cryptogram_key_label", sa.String(64), nullable=True),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.Column("last_contact", TIME, nullable=True),
        sa.Column("lease_holder", sa.String(200), nullable=True),
        sa.Column("lease_expires", TIME, nullable=True),
        sa.Column("row_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("psd_id", name="pk_psd"),
        sa.CheckConstraint(
            _one_of("state", ("blank", "installing", "active", "replacement_pending", "revoked")),
            name=op.f("ck_psd_state"),
        ),
        sa.CheckConstraint("length(psd_id) = 20", name=op.f("ck_psd_psd_id_length")),
        sa.CheckConstraint(
            "(cryptogram IS NULL AND cryptogram_key_label IS NULL)"
            " OR (cryptogram IS NOT NULL AND cryptogram_key_label IS NOT NULL)",
            name=op.f("ck_psd_cryptogram_labelled"),
        ),
        sa.CheckConstraint(
            "state NOT IN ('active', 'replacement_pending') OR (mk_version IS NOT NULL"
            " AND mkrk_version IS NOT NULL AND cryptogram IS NOT NULL)",
            name=op.f("ck_psd_in_service_reproducible"),
        ),
        sa.CheckConstraint(
            "state <> 'installing' OR (cryptogram IS NOT NULL AND pending_mk_version IS NOT NULL)",
            name=op.f("ck_psd_installing_journaled"),
        ),
        sa.CheckConstraint(
            "state <> 'replacement_pending' OR pending_mk_version IS NOT NULL",
            name=op.f("ck_psd_replacement_journaled"),
        ),
    )
    op.create_index("ix_psd_state_mk_version", "psd", ["state", "mk_version"])

    op.create_table(
        "psd_event",
        sa.Column("event_id", ID, autoincrement=True, nullable=False),
        sa.Column("psd_id", sa.String(20), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_psd_event"),
        sa.ForeignKeyConstraint(["psd_id"], ["psd.psd_id"], name="fk_psd_event_psd_id_psd"),
    )
    op.create_index("ix_psd_event_psd_id", "psd_event", ["psd_id"])

    op.create_table(
        "campaign",
        sa.Column("campaign_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=False),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("psd_id_prefix", sa.String(20), nullable=True),
        sa.Column("listed_ids", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", name="pk_campaign"),
        sa.CheckConstraint(
            _one_of("state", ("running", "paused", "cancelled", "completed")),
            name=op.f("ck_campaign_state"),
        ),
        sa.CheckConstraint("from_version <> to_version", name=op.f("ck_campaign_changes_version")),
    )

    op.create_table(
        "intent",
        sa.Column("intent_id", ID, autoincrement=True, nullable=False),
        sa.Column("psd_id", sa.String(20), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("mkrk_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("campaign_id", sa.String(32), nullable=True),
        sa.Column("created", TIME, nullable=False),
        sa.Column("updated", TIME, nullable=False),
        sa.PrimaryKeyConstraint("intent_id", name="pk_intent"),
        sa.ForeignKeyConstraint(["psd_id"], ["psd.psd_id"], name="fk_intent_psd_id_psd"),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaign.campaign_id"], name="fk_intent_campaign_id_campaign"
        ),
        sa.CheckConstraint(_one_of("kind", ("install", "replace")), name=op.f("ck_intent_kind")),
        sa.CheckConstraint(
            _one_of("status", ("open", "done", "abandoned")), name=op.f("ck_intent_status")
        ),
    )
    op.create_index("ix_intent_psd_id", "intent", ["psd_id"])
    op.create_index(
        "uq_intent_open_per_psd",
        "intent",
        ["psd_id"],
        unique=True,
        sqlite_where=sa.text("status = 'open'"),
        postgresql_where=sa.text("status = 'open'"),
    )

    op.create_table(
        "campaign_item",
        sa.Column("campaign_id", sa.String(32), nullable=False),
        sa.Column("psd_id", sa.String(20), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated", TIME, nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "psd_id", name="pk_campaign_item"),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaign.campaign_id"],
            name="fk_campaign_item_campaign_id_campaign",
        ),
        sa.ForeignKeyConstraint(["psd_id"], ["psd.psd_id"], name="fk_campaign_item_psd_id_psd"),
        sa.CheckConstraint(
            _one_of("status", ("pending", "done", "failed", "skipped")),
            name=op.f("ck_campaign_item_status"),
        ),
    )
    op.create_index(
        "ix_campaign_item_campaign_id_status", "campaign_item", ["campaign_id", "status"]
    )
    op.create_index(
        "uq_campaign_item_pending_per_psd",
        "campaign_item",
        ["psd_id"],
        unique=True,
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_campaign_item_psd_id", "campaign_item", ["psd_id"])


def downgrade() -> None:
    op.drop_table("campaign_item")
    op.drop_table("intent")
    op.drop_table("campaign")
    op.drop_table("psd_event")
    op.drop_table("psd")
