"""The access server's tables (SQLAlchemy 2 typed ORM).

Internal to the store: the Store converts rows to the dataclasses in
``records`` before they leave a transaction. The initial Alembic revision
creates exactly this schema; a test compares the two.

What is deliberately *not* here: any column for a key, a PIN or the random R.
The only secret-derived value is ``psd.cryptogram``, R encrypted under the
cryptogram key pair (RSA-OAEP), which is useless without the private key in
an HSM. The CHECK constraints restate the crash-safety rules so that even a
faulty caller cannot commit a card that is in service without the cryptogram
that reproduces its MKRK.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit ids; on SQLite an INTEGER PRIMARY KEY is the rowid and autoincrements."""

PSD_STATES = ("blank", "installing", "active", "replacement_pending", "revoked")
INTENT_KINDS = ("install", "replace")
INTENT_STATUSES = ("open", "done", "abandoned")
CAMPAIGN_STATES = ("running", "paused", "cancelled", "completed")
ITEM_STATUSES = ("pending", "done", "failed", "skipped")
ATTENTION_DESCRIBED = (
    "(attention IS NULL AND attention_detail IS NULL AND attention_since IS NULL)"
    " OR (attention IS NOT NULL AND attention_detail IS NOT NULL"
    " AND attention_since IS NOT NULL)"
)
"""A card needing attention always says why and since when."""


def one_of(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on both backends.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value
    is stored as naive UTC text (fixed width, so text order is time order,
    which lease expiry comparisons rely on).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PsdRow(Base):
    __tablename__ = "psd"

    psd_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    state: Mapped[str] = mapped_column(String(24))
    mk_version: Mapped[int | None] = mapped_column(Integer)
    mkrk_version: Mapped[int | None] = mapped_column(Integer)
    pending_mk_version: Mapped[int | None] = mapped_column(Integer)
    # Deferred: listing cards never drags ciphertexts along.
    cryptogram: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    cryptogram_key_label: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)
    last_contact: Mapped[datetime | None] = mapped_column(UtcDateTime)
    lease_holder: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[datetime | None] = mapped_column(UtcDateTime)
    row_version: Mapped[int] = mapped_column(Integer)
    # Set when a contact ended in a way that only an operator can resolve, once the
    # card had proven its keys in that contact: a reason code (``ATTENTION_REASONS``
    # in access_server/outcomes.py), what happened and since when. No campaign picks
    # the card until an operator clears it.
    attention: Mapped[str | None] = mapped_column(String(32))
    attention_detail: Mapped[str | None] = mapped_column(Text)
    attention_since: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __mapper_args__ = {"version_id_col": row_version}
    __table_args__ = (
        CheckConstraint(one_of("state", PSD_STATES), name="state"),
        CheckConstraint(ATTENTION_DESCRIBED, name="attention_described"),
        CheckConstraint("length(psd_id) = 20", name="psd_id_length"),
        CheckConstraint(
            "(cryptogram IS NULL AND cryptogram_key_label IS NULL)"
            " OR (cryptogram IS NOT NULL AND cryptogram_key_label IS NOT NULL)",
            name="cryptogram_labelled",
        ),
        # A card in service (or on its way) always has the cryptogram that
        # reproduces its MKRK, and the versions the flows need.
        CheckConstraint(
            "state NOT IN ('active', 'replacement_pending') OR (mk_version IS NOT NULL"
            " AND mkrk_version IS NOT NULL AND cryptogram IS NOT NULL)",
            name="in_service_reproducible",
        ),
        CheckConstraint(
            "state <> 'installing' OR (cryptogram IS NOT NULL AND pending_mk_version IS NOT NULL)",
            name="installing_journaled",
        ),
        CheckConstraint(
            "state <> 'replacement_pending' OR pending_mk_version IS NOT NULL",
            name="replacement_journaled",
        ),
        Index("ix_psd_state_mk_version", "state", "mk_version"),
        # Few cards need attention: the metrics count them by reason from this index.
        Index(
            "ix_psd_attention",
            "attention",
            sqlite_where=text("attention IS NOT NULL"),
            postgresql_where=text("attention IS NOT NULL"),
        ),
    )


class PsdEventRow(Base):
    __tablename__ = "psd_event"

    event_id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    psd_id: Mapped[str] = mapped_column(String(20), ForeignKey("psd.psd_id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    event: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))


class CampaignRow(Base):
    __tablename__ = "campaign"

    campaign_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    psd_id_prefix: Mapped[str | None] = mapped_column(String(20))
    listed_ids: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        CheckConstraint(one_of("state", CAMPAIGN_STATES), name="state"),
        CheckConstraint("from_version <> to_version", name="changes_version"),
    )


class IntentRow(Base):
    __tablename__ = "intent"

    intent_id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    psd_id: Mapped[str] = mapped_column(String(20), ForeignKey("psd.psd_id"))
    kind: Mapped[str] = mapped_column(String(16))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    mkrk_version: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    campaign_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("campaign.campaign_id")
    )
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        CheckConstraint(one_of("kind", INTENT_KINDS), name="kind"),
        CheckConstraint(one_of("status", INTENT_STATUSES), name="status"),
        Index("ix_intent_psd_id", "psd_id"),
        # The journal holds at most one open intent per card.
        Index(
            "uq_intent_open_per_psd",
            "psd_id",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
    )


class CampaignItemRow(Base):
    __tablename__ = "campaign_item"

    campaign_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("campaign.campaign_id"), primary_key=True
    )
    psd_id: Mapped[str] = mapped_column(String(20), ForeignKey("psd.psd_id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        CheckConstraint(one_of("status", ITEM_STATUSES), name="status"),
        Index("ix_campaign_item_campaign_id_status", "campaign_id", "status"),
        # A card waits in at most one campaign: items stay pending only while
        # their campaign is running or paused (cancel skips them).
        Index(
            "uq_campaign_item_pending_per_psd",
            "psd_id",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_campaign_item_psd_id", "psd_id"),
    )


# -- the issuer's stock (seed 004, B2) ---------------------------------------------------
# Public material only: certificates, public keys, the card's own signature over its
# device key. A pack carries no private key, and nothing here could hold one.

STOCK_STATES = ("in_stock", "reserved", "personalized", "shipped", "failed", "quarantined")


class ProviderRootRow(Base):
    __tablename__ = "provider_root"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(64), index=True)
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    subject: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    trusted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    trusted_by: Mapped[str] = mapped_column(String(200))


class StockPackRow(Base):
    __tablename__ = "pack"

    # Import order: the FIFO order of the stock, pack by pack.
    pack_id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    pack_serial: Mapped[str] = mapped_column(String(64), unique=True)
    file_sha256: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(255))
    provider_id: Mapped[str] = mapped_column(String(64))
    root_fingerprint: Mapped[str] = mapped_column(
        String(64), ForeignKey("provider_root.fingerprint"))
    card_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    imported_at: Mapped[datetime] = mapped_column(UtcDateTime)
    imported_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (CheckConstraint("card_count > 0", name="card_count_positive"),)


class StockCardRow(Base):
    __tablename__ = "stock_card"

    serial: Mapped[str] = mapped_column(String(32), primary_key=True)
    pack_id: Mapped[int] = mapped_column(ID_TYPE, ForeignKey("pack.pack_id"))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    device_key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # The RSA modulus again, so the batch GCD against the stock reads integers, not DER.
    device_modulus: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    device_public_key: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    issuer_auth_public_key: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    device_certificate: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    issuer_auth_certificate: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    signed_device_key: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    updated: Mapped[datetime] = mapped_column(UtcDateTime)
    reserved_by: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint(one_of("state", STOCK_STATES), name="state"),
        CheckConstraint("position > 0", name="position_positive"),
        Index("uq_stock_card_pack_id_position", "pack_id", "position", unique=True),
        # The next cards in stock: by state, then pack (import order), then position.
        Index("ix_stock_card_state_pack_id_position", "state", "pack_id", "position"),
    )


# -- users and issuance (seed 004, B3-B4) ------------------------------------------------
# The device authentication key's private half is stored only as the issuer system HSM
# wrapped it under its KEK; no user private key, seed or PIN has a column.

ISSUANCE_STATES = ("preparing", "issued", "personalized", "failed")


class DerivationCounterRow(Base):
    """The next derivation element: one row, bumped in the transaction that adds a user."""

    __tablename__ = "derivation_counter"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_element: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("next_element > 0 AND next_element <= 2147483648", name="in_range"),
    )


class UserRow(Base):
    __tablename__ = "app_user"

    user_id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(String(254))
    derivation_element: Mapped[int] = mapped_column(BigInteger, unique=True)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    # Set when a user with issued cards is removed (their records keep the row).
    removed: Mapped[datetime | None] = mapped_column(UtcDateTime)

    # A removed user's id is never given to another (SQLite would reuse the highest rowid).
    __table_args__ = {"sqlite_autoincrement": True}


class IssuanceRow(Base):
    __tablename__ = "issuance"

    serial: Mapped[str] = mapped_column(String(32), ForeignKey("stock_card.serial"),
                                        primary_key=True)
    user_id: Mapped[int] = mapped_column(ID_TYPE, ForeignKey("app_user.user_id"))
    derivation_element: Mapped[int] = mapped_column(BigInteger)
    issuance_id: Mapped[str] = mapped_column(String(32), index=True)
    batch: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    hsm_pins: Mapped[bool] = mapped_column(Boolean)
    device_auth_public_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    device_auth_wrapped_key: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    device_auth_kek_version: Mapped[int | None] = mapped_column(Integer)
    user_public_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    # When the mailing house sent the card's PIN letters (its dispatch confirmation).
    dispatched: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        CheckConstraint(one_of("state", ISSUANCE_STATES), name="state"),
        CheckConstraint("sequence > 0", name="sequence_positive"),
        CheckConstraint(
            "state = 'preparing' OR (device_auth_public_key IS NOT NULL AND "
            "device_auth_wrapped_key IS NOT NULL AND user_public_key IS NOT NULL)",
            name="issued_complete"),
        # Is a card of this user in flight? (preparing or issued)
        Index("ix_issuance_user_id_state", "user_id", "state"),
    )


class PartnerColumns:
    """A partner's certificate the issuer trusts, by its SHA-256 fingerprint."""

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    subject: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    trusted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    trusted_by: Mapped[str] = mapped_column(String(200))


class BureauRow(PartnerColumns, Base):
    """A personalization bureau's certificate: result files it signs are accepted."""

    __tablename__ = "bureau"


class MailerRow(PartnerColumns, Base):
    """A mailing house's certificate: dispatch confirmations it signs are accepted."""

    __tablename__ = "mailer"


ACTIVATION_STATES = ("waiting", "sent", "personalized", "failed", "locked", "expired")


class ActivationRow(Base):
    """An online issuance's activation: the payload waiting for the user's own PC, behind
    a one-time code kept only as a salted scrypt hash (``access_server.activation``)."""

    __tablename__ = "activation"

    serial: Mapped[str] = mapped_column(String(32), ForeignKey("issuance.serial"),
                                        primary_key=True)
    issuance_id: Mapped[str] = mapped_column(String(32))
    code_salt: Mapped[bytes] = mapped_column(LargeBinary)
    code_hash: Mapped[bytes] = mapped_column(LargeBinary)
    payload: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    expires: Mapped[datetime] = mapped_column(UtcDateTime)
    failures: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    updated: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint(one_of("state", ACTIVATION_STATES), name="state"),
        CheckConstraint("failures >= 0", name="failures_not_negative"),
    )
