"""What the store hands out: enums and frozen dataclasses, never ORM objects.

Callers (the flows and the operator servicers) get plain values that stay
valid after the transaction that read them has ended, so no caller can
trigger a lazy load or modify a row behind the store's back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

import grpc


class PsdState(StrEnum):
    """Where a card stands, as far as the server knows (docs/flows.md, flow A)."""

    BLANK = "blank"
    """Registered, transport keys only."""
    INSTALLING = "installing"
    """Initial installation journaled (cryptogram stored); the card may hold part of it."""
    ACTIVE = "active"
    """MKRK and an MK installed; the card is in service."""
    REPLACEMENT_PENDING = "replacement_pending"
    """A master key replacement is journaled and not yet confirmed."""
    REVOKED = "revoked"
    """The server refuses all further work on the card."""


class IntentKind(StrEnum):
    INSTALL = "install"
    REPLACE = "replace"


class IntentStatus(StrEnum):
    OPEN = "open"
    DONE = "done"
    ABANDONED = "abandoned"


class CampaignState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETED = "completed"


class ItemStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class PsdRecord:
    """One registered card. Versions are None while the card holds no such key."""

    psd_id: str
    state: PsdState
    mk_version: int | None
    mkrk_version: int | None
    pending_mk_version: int | None
    has_cryptogram: bool
    cryptogram_key_label: str | None
    created: datetime
    updated: datetime
    last_contact: datetime | None
    lease_holder: str | None
    lease_expires: datetime | None
    row_version: int
    attention: str | None
    """Why an operator must act before the server works on the card again (a reason
    code of ``access_server.outcomes``), or None."""
    attention_detail: str | None
    attention_since: datetime | None

    @property
    def needs_attention(self) -> bool:
        return self.attention is not None


@dataclass(frozen=True, slots=True)
class Cryptogram:
    """The RSA-OAEP encryption of a card's random R, and which key pair made it."""

    psd_id: str
    ciphertext: bytes
    key_label: str

    def __repr__(self) -> str:
        # Not secret, but there is no reason to spray ciphertext into logs.
        return (
            f"Cryptogram(psd_id={self.psd_id!r}, key_label={self.key_label!r}, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class PsdEvent:
    at: datetime
    event: str
    detail: str
    actor: str


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    """Result for one id of a registration call, in the order the ids were given."""

    psd_id: str
    added: bool
    error: str | None
    code: grpc.StatusCode


@dataclass(frozen=True, slots=True)
class Intent:
    """A journaled card-changing step: what the server is about to do to a card.

    ``from_version`` is the MK version the card held before (None for an
    installation); ``to_version`` the MK version it is moving to;
    ``mkrk_version`` the MKRK an installation puts in (None for a replacement).
    """

    intent_id: int
    psd_id: str
    kind: IntentKind
    from_version: int | None
    to_version: int
    mkrk_version: int | None
    status: IntentStatus
    campaign_id: str | None
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class Campaign:
    """A replacement campaign with its item counts (skipped = total - the rest)."""

    campaign_id: str
    name: str
    from_version: int
    to_version: int
    state: CampaignState
    psd_id_prefix: str | None
    listed_ids: int | None
    created_by: str
    total: int
    done: int
    pending: int
    failed: int
    skipped: int
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class CampaignItem:
    """One card's place in a campaign, with the campaign's versions for convenience."""

    campaign_id: str
    psd_id: str
    status: ItemStatus
    attempts: int
    last_error: str | None
    updated: datetime
    from_version: int
    to_version: int


class PsdPage(NamedTuple):
    """One page of ``list_psds``; unpacks as ``items, next_page_token, total``."""

    items: list[PsdRecord]
    next_page_token: str
    total: int


class ItemPage(NamedTuple):
    """One page of ``list_campaign_items``; unpacks as ``items, next_after, total``."""

    items: list[CampaignItem]
    next_after: str
    total: int


@dataclass(frozen=True, slots=True)
class ContactStart:
    """What one card contact needs from the registry: read alone, or as its lease is taken.

    ``leased`` says this contact holds the card's lease: False from
    ``Store.read_contact`` (which writes nothing), while another session
    holds the card (nothing else was changed then) and for a revoked card (no
    lease is taken for it). ``lease_free`` says the lease was free for the
    contact when the record was read. ``intent_begun`` is True when the
    transaction that took the lease also journaled ``intent`` (a campaign
    replacement of a card that had proven its keys).
    """

    psd: PsdRecord
    leased: bool
    intent: Intent | None
    work: CampaignItem | None
    cryptogram: Cryptogram | None
    intent_begun: bool = False
    lease_free: bool = False


class StockState(StrEnum):
    """Where a blank card of the issuer's stock stands (seed 004, B2-B4)."""

    IN_STOCK = "in_stock"
    """Imported from a provider's pack, free."""
    RESERVED = "reserved"
    """Taken for an issuance that has not finished."""
    PERSONALIZED = "personalized"
    SHIPPED = "shipped"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    """The bureau reported it failed: held aside for an operator, never back in stock."""


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A provider root the issuer trusts (``provider_id``: the root's organization)."""

    provider_id: str
    fingerprint: str
    certificate: bytes
    subject: str
    not_after: datetime
    trusted_at: datetime
    trusted_by: str


@dataclass(frozen=True, slots=True)
class PackRecord:
    """An imported pack; ``import_order`` is the FIFO order of its cards among packs."""

    import_order: int
    pack_serial: str
    file_sha256: str
    file_name: str
    provider_id: str
    root_fingerprint: str
    card_count: int
    created_at: datetime
    imported_at: datetime
    imported_by: str


@dataclass(frozen=True, slots=True)
class PackStock:
    """How many of a pack's cards are in each state (every state present, zeros too)."""

    pack_serial: str
    import_order: int
    counts: dict[StockState, int]


@dataclass(frozen=True, slots=True)
class StockCard:
    """One card of the stock with its public material, as issuance needs it."""

    serial: str
    pack_serial: str
    position: int
    state: StockState
    device_public_key: bytes
    issuer_auth_public_key: bytes
    device_certificate: bytes
    issuer_auth_certificate: bytes
    signed_device_key: bytes


# -- users and issuance (seed 004, B3-B4) ------------------------------------------------

class IssuanceState(StrEnum):
    """Where one card's issuance stands."""

    PREPARING = "preparing"
    """Taken from stock for a user; the issuer HSM has not answered yet."""
    ISSUED = "issued"
    """Its payload is in a personalization file, on its way to the bureau."""
    PERSONALIZED = "personalized"
    FAILED = "failed"


IN_FLIGHT = (IssuanceState.PREPARING, IssuanceState.ISSUED)
"""A user with a card in these states gets no other card until the bureau answers."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: int
    name: str
    address: str
    email: str | None
    derivation_element: int
    created: datetime
    created_by: str
    removed: datetime | None


@dataclass(frozen=True, slots=True)
class IssuanceRecord:
    serial: str
    user_id: int
    derivation_element: int
    issuance_id: bytes
    batch: str
    sequence: int
    state: IssuanceState
    hsm_pins: bool
    device_auth_public_key: bytes | None
    user_public_key: bytes | None
    reason: str | None
    updated: datetime


@dataclass(frozen=True, slots=True)
class CardAuthKeys:
    """A card's keys for mutual authentication (claims 13 and 14): its issuer
    authentication public key from stock (SPKI DER) and, once issued, its device
    authentication key as the issuer system HSM wrapped it."""

    serial: str
    state: IssuanceState | None
    """None: never issued (in stock, or issued elsewhere)."""
    issuer_auth_public_key: bytes
    device_auth_public_key: bytes | None
    device_auth_wrapped_key: bytes | None
    device_auth_kek_version: int | None


class PreparedCard(NamedTuple):
    """A card taken from stock for a user, before the issuer HSM made its payload."""

    card: StockCard
    user: UserRecord
    issuance_id: bytes
    sequence: int


class IssuedCard(NamedTuple):
    """What the issuer HSMs returned for one card, as the store keeps it."""

    serial: str
    device_auth_public_key: bytes
    device_auth_wrapped_key: bytes
    device_auth_kek_version: int
    user_public_key: bytes


class CardResult(NamedTuple):
    """One row of a bureau's result file."""

    serial: str
    personalized: bool
    reason: str


class CardDispatched(NamedTuple):
    """One row of a mailing house's dispatch confirmation: the card's letters went out."""

    serial: str
    dispatched_at: datetime


@dataclass(frozen=True, slots=True)
class BureauRecord:
    """A trusted partner's certificate: a bureau's, or a mailing house's."""

    fingerprint: str
    name: str
    certificate: bytes
    subject: str
    not_after: datetime
    trusted_at: datetime
    trusted_by: str


class ActivationState(StrEnum):
    """Where an online issuance's activation code stands (``store/activations.py``)."""

    WAITING = "waiting"
    """Not used yet: the right code from the bound card's PC unlocks the payload."""
    SENT = "sent"
    """The code is used up: the payload went to the card, its answer not yet recorded (a
    retry with the same code and card finishes it)."""
    PERSONALIZED = "personalized"
    FAILED = "failed"
    """The card refused the payload; the code is spent."""
    LOCKED = "locked"
    """Too many wrong codes: no code opens it again."""
    EXPIRED = "expired"
    """Past its validity, unused."""


@dataclass(frozen=True, slots=True)
class ActivationRecord:
    serial: str
    issuance_id: bytes
    code_salt: bytes
    code_hash: bytes
    payload: bytes
    expires: datetime
    failures: int
    state: ActivationState
    reason: str | None
    device_public_key: bytes
    """The stock card's device key (SPKI DER): the card in the reader must hold it."""
    expired: bool
    """Past ``expires`` by the store's clock when it was read."""


class NewActivation(NamedTuple):
    """What an online issuance stores for its card: the code's hash and the payload."""

    serial: str
    code_salt: bytes
    code_hash: bytes
    payload: bytes
    expires: datetime
