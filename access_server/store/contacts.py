"""Card contacts and the intent journal: what a contact reads, journals and completes.

Every contact of flow A runs here: ``read_contact`` and ``start_contact``
(the lease and, for a campaign, the replacement's journal entry in one
transaction), ``begin_install`` / ``begin_replacement``, ``complete_install``
/ ``complete_replacement``, and ``reconcile`` after a broken contact. The
per-contact transactions run the Core statements of ``cards`` on a
connection without a unit of work; ``reconcile`` and ``abandon_intent``,
which may touch campaign items, run in a session and call the same helpers
on its connection.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from access_server.store import cards, probe, rows
from access_server.store import validate as v
from access_server.store.leases import lease_free, lease_ttl
from access_server.store.records import (
    CampaignItem,
    ContactStart,
    Intent,
    IntentKind,
    IntentStatus,
    PsdRecord,
    PsdState,
)
from access_server.store.registry import psd_state
from access_server.store.transactions import Transactions
from cms.runtime.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound

EV_INTENT_DONE = "intent_done"

TRANSIENT_STATES = (PsdState.INSTALLING, PsdState.REPLACEMENT_PENDING)
"""States that exist only while an intent is open."""



class Contacts(Transactions):
    """The store's operations of a card contact and of its intent journal."""

    def read_contact(self, psd_id: str, holder: str) -> ContactStart:
        """What a contact needs, read in one transaction that writes nothing.

        The same as ``get_psd``, ``open_intent``, ``campaign_work_for`` and
        ``get_cryptogram``, plus whether ``holder`` could take the lease now
        (``lease_free``; nothing is taken). A user PC's contact reads here,
        has the card prove it holds its keys (the proxy checks the card
        cryptogram of its INITIALIZE UPDATE answer as it opens the channel),
        and only then calls ``start_contact(seen=...)``: an agent that
        replays a card's CPLC changes nothing in the registry.
        """
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        with self._read_connection() as conn:
            now = self._now()
            card, cryptogram = cards.card_and_cryptogram(conn, psd_id, lock=False)
            return ContactStart(
                psd=card, leased=False, intent=cards.open_intent(conn, psd_id),
                work=cards.pending_work(conn, card, lock=False), cryptogram=cryptogram,
                lease_free=lease_free(card, holder, now))

    def start_contact(self, psd_id: str, holder: str, ttl_seconds: float, *,
                      seen: ContactStart | None = None, journal: bool = False,
                      actor: str | None = None) -> ContactStart:
        """Take the card's session lease and read what the contact needs, in one transaction.

        Without ``seen``: the same as ``get_psd``, ``acquire_lease``,
        ``touch_contact``, ``open_intent``, ``campaign_work_for`` and
        ``get_cryptogram`` one after the other, but with the card's row locked
        throughout: what is read is what the lease holder works from, and a
        contact costs one round trip to the database instead of six.

        With ``seen`` (what ``read_contact`` returned to this contact before
        the card proved its keys): the lease is taken only if the card's row
        is still the one read (else Aborted: the contact starts again), and
        the rest comes from ``seen``. With ``journal`` as well, the campaign
        replacement ``seen.work`` names is journaled in this same transaction
        (what ``begin_replacement`` does), if the card is still pending in
        that running campaign (else Aborted): it is durable before the
        secured script is sent, and ``ContactStart.intent_begun`` says so.
        """
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        ttl = lease_ttl(ttl_seconds)
        if journal:
            if seen is None or seen.work is None or seen.intent is not None:
                raise InvalidArgument("journal needs what read_contact saw: campaign work "
                                      "and no open intent")
            if actor is None:
                raise InvalidArgument("actor is required with journal")
            actor = v.actor(actor)
        if seen is not None and seen.psd.psd_id != psd_id:
            raise InvalidArgument(f"seen describes PSD {seen.psd.psd_id}, not {psd_id}")
        with self._write_connection() as conn:
            now = self._now()
            if seen is None:
                card, cryptogram = cards.card_and_cryptogram(conn, psd_id, lock=True)
                intent = cards.open_intent(conn, psd_id)
                work = cards.pending_work(conn, card)
            else:
                card = cards.lock_card(conn, psd_id)
                if card.row_version != seen.psd.row_version:
                    raise Aborted(f"PSD {psd_id} changed while this contact checked the card; "
                                  "the next contact starts afresh")
                intent, work, cryptogram = seen.intent, seen.work, seen.cryptogram
            if not lease_free(card, holder, now):
                return ContactStart(psd=card, leased=False, intent=intent,
                                    work=work, cryptogram=cryptogram)   # nothing was written
            values: dict[str, Any] = {"lease_holder": holder, "lease_expires": now + ttl,
                                      "last_contact": now}
            begun = False
            if journal:
                assert seen is not None and seen.work is not None and actor is not None
                work = cards.pending_work(conn, card)
                if work is None or (work.campaign_id, work.from_version, work.to_version) != (
                        seen.work.campaign_id, seen.work.from_version, seen.work.to_version):
                    raise Aborted(f"the campaign work of PSD {psd_id} changed while this "
                                  "contact checked the card; the next contact starts afresh")
                journaled = cards.journal_replacement(
                    conn, card, from_version=work.from_version, to_version=work.to_version,
                    campaign_id=work.campaign_id, actor=actor, now=now, campaign_checked=True)
                values.update(journaled.card_values)
                intent, begun = journaled.intent, True
            return ContactStart(psd=cards.update_card(conn, card, values), leased=True,
                                intent=intent, work=work, cryptogram=cryptogram,
                                intent_begun=begun, lease_free=True)

    def campaign_work_for(self, psd_id: str) -> CampaignItem | None:
        """The card's pending item in a running campaign, if the card can act on it now."""
        psd_id = v.psd_id(psd_id)
        with self._read_connection() as conn:
            return cards.pending_work(conn, cards.read_card(conn, psd_id), lock=False)

    # -- flow A1: initial installation ----------------------------------------

    def begin_install(
        self,
        psd_id: str,
        *,
        cryptogram: bytes,
        cryptogram_key_label: str,
        mkrk_version: int,
        mk_version: int,
        actor: str,
        card_holds_transport_keys: bool = False,
    ) -> Intent:
        """Journal an installation and store the cryptogram; durable on return.

        Allowed from blank. Allowed again from installing only when the caller
        has probed the card and found it still on its transport keys
        (``card_holds_transport_keys=True``): then no key from the earlier
        attempt is on the card, the earlier intent is abandoned and the new
        cryptogram replaces the old one, in this one transaction. Without that
        assurance the old cryptogram may be all that reproduces an MKRK
        already on the card, so it is kept and the call is refused.
        """
        psd_id = v.psd_id(psd_id)
        ciphertext = v.cryptogram(cryptogram)
        label = v.text("cryptogram_key_label", cryptogram_key_label, v.MAX_LABEL)
        mkrk_version = v.key_version("mkrk_version", mkrk_version)
        mk_version = v.key_version("mk_version", mk_version)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            now = self._now()
            card = cards.lock_card(conn, psd_id)
            journaled = cards.journal_install(
                conn, card, cryptogram=ciphertext, label=label, mkrk_version=mkrk_version,
                mk_version=mk_version, restart=card_holds_transport_keys, actor=actor, now=now)
            cards.update_card(conn, card, journaled.card_values)
            return journaled.intent

    def complete_install(self, psd_id: str, intent_id: int, actor: str, *,
                         release_lease_of: str | None = None) -> PsdRecord:
        """The card now holds the MKRK and MK of the intent: it becomes active."""
        return self._complete(psd_id, intent_id, IntentKind.INSTALL, actor, release_lease_of)

    # -- flow A2: master key replacement --------------------------------------

    def begin_replacement(
        self,
        psd_id: str,
        *,
        from_version: int,
        to_version: int,
        campaign_id: str | None = None,
        actor: str,
    ) -> Intent:
        """Journal the replacement of MK ``from_version`` by ``to_version``.

        With ``campaign_id``, the card's item in that (running) campaign is
        the reason, and counts an attempt.
        """
        psd_id = v.psd_id(psd_id)
        from_version = v.key_version("from_version", from_version)
        to_version = v.key_version("to_version", to_version)
        if from_version == to_version:
            raise InvalidArgument("to_version must differ from from_version")
        if campaign_id is not None:
            campaign_id = v.text("campaign_id", campaign_id, 64)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            now = self._now()
            card = cards.lock_card(conn, psd_id)
            journaled = cards.journal_replacement(
                conn, card, from_version=from_version, to_version=to_version,
                campaign_id=campaign_id, actor=actor, now=now)
            cards.update_card(conn, card, journaled.card_values)
            return journaled.intent

    def complete_replacement(self, psd_id: str, intent_id: int, actor: str, *,
                             release_lease_of: str | None = None) -> PsdRecord:
        """The card holds the new MK and the old one is deleted: active at the new version."""
        return self._complete(psd_id, intent_id, IntentKind.REPLACE, actor, release_lease_of)

    def _complete(self, psd_id: str, intent_id: int, kind: IntentKind, actor: str,
                  release_lease_of: str | None) -> PsdRecord:
        psd_id = v.psd_id(psd_id)
        intent_id = v.intent_id(intent_id)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            now = self._now()
            record, waiting = cards.complete_intent(
                conn, psd_id, intent_id, kind, actor=actor,
                release_lease_of=release_lease_of, now=now)
            if waiting:
                # Rare: the card waits in another campaign its new version
                # settles. The ORM joins this transaction for it (its own
                # rollback would roll this one back; its commit would not
                # commit it).
                with Session(bind=conn, expire_on_commit=False,
                             join_transaction_mode="rollback_only") as session:
                    rows.settle_items(session, record, now)
                    session.flush()
            return record

    # -- the journal ----------------------------------------------------------

    def abandon_intent(self, psd_id: str, intent_id: int, reason: str, actor: str) -> PsdRecord:
        """Give up an open intent whose step the card did not take.

        The row goes back to what the card is then known to hold: blank for
        an installation (the cryptogram is kept; only a new installation
        replaces it), active at the old MK for a replacement.
        """
        psd_id = v.psd_id(psd_id)
        intent_id = v.intent_id(intent_id)
        reason = v.text("reason", reason, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._change_card(psd_id) as (session, conn, card, now):
            cards.refuse_revoked(card, "abandon intent")
            intent = cards.checked_open_intent(conn, psd_id, intent_id, None)
            values: dict[str, Any] = {"state": PsdState.ACTIVE.value,
                                      "pending_mk_version": None, "updated": now}
            if intent.kind is IntentKind.INSTALL:
                values.update(state=PsdState.BLANK.value, mk_version=None, mkrk_version=None)
            record = cards.update_card(conn, card, values)
            cards.close_intent(conn, intent_id, IntentStatus.ABANDONED, now)
            rows.abandon_campaign_attempt(session, intent, reason, now)
            cards.add_event(conn, psd_id, now, cards.EV_INTENT_ABANDONED,
                            f"{cards.describe(intent)}: {reason}", actor)
            return record

    def open_intent(self, psd_id: str) -> Intent | None:
        psd_id = v.psd_id(psd_id)
        with self._read_connection() as conn:
            cards.read_card(conn, psd_id)
            return cards.open_intent(conn, psd_id)

    def get_intent(self, intent_id: int) -> Intent:
        intent_id = v.intent_id(intent_id)
        with self._read_connection() as conn:
            intent = cards.get_intent(conn, intent_id)
        if intent is None:
            raise NotFound(f"intent {intent_id} not found")
        return intent

    # -- reconciliation -------------------------------------------------------

    def reconcile(
        self,
        psd_id: str,
        *,
        state: PsdState,
        mk_version: int | None,
        mkrk_version: int | None,
        pending: int | None = None,
        event: str,
        detail: str,
        actor: str,
    ) -> PsdRecord:
        """Make the row agree with what a probe found on the card, in one transaction.

        ``state`` is what the card is in: blank (transport keys only), active
        (an MKRK and exactly one MK), or a transient state while an open
        intent is still being carried out (installing: MKRK in, MK not yet;
        replacement_pending: old and new MK both present, ``pending`` the new
        one). Reaching blank or active closes the open intent: done if the
        card holds what it aimed at, abandoned otherwise. A transient state
        keeps the intent open so the flow can finish it.
        """
        psd_id = v.psd_id(psd_id)
        target = psd_state(state)
        mk_version = v.optional_key_version("mk_version", mk_version)
        mkrk_version = v.optional_key_version("mkrk_version", mkrk_version)
        pending = v.optional_key_version("pending", pending)
        probe.check_shape(target, mk_version, mkrk_version, pending)
        event = v.text("event", event, v.MAX_EVENT)
        detail = v.text("detail", detail, v.MAX_DETAIL, required=False)
        actor = v.actor(actor)
        with self._change_card(psd_id) as (session, conn, card, now):
            cards.refuse_revoked(card, "reconcile")
            intent = cards.open_intent(conn, psd_id)
            if target in TRANSIENT_STATES:
                pending = probe.check_transient(card, intent, target, mk_version, pending)
            elif target is PsdState.ACTIVE and card.cryptogram_key_label is None:
                raise FailedPrecondition(
                    f"PSD {psd_id} has no cryptogram: the server cannot reproduce its MKRK"
                )
            record = cards.update_card(conn, card, {
                "state": target.value, "mk_version": mk_version, "mkrk_version": mkrk_version,
                "pending_mk_version": pending, "updated": now})
            cards.add_event(conn, psd_id, now, event, detail, actor)
            if intent is not None and target not in TRANSIENT_STATES:
                _close_reconciled(session, intent, record, detail, actor, now)
            session.flush()
            rows.settle_items(session, record, now)
            return record


def _close_reconciled(session: Session, intent: Intent, card: PsdRecord, detail: str,
                      actor: str, now: datetime) -> None:
    """Close the open intent as the reconciled card shows it: done if reached, else abandoned."""
    conn = session.connection()
    reached = card.state is PsdState.ACTIVE and card.mk_version == intent.to_version
    if intent.kind is IntentKind.INSTALL:
        reached = reached and card.mkrk_version == intent.mkrk_version
    if reached:
        cards.close_intent(conn, intent.intent_id, IntentStatus.DONE, now)
        cards.add_event(conn, card.psd_id, now, EV_INTENT_DONE,
                        f"{cards.describe(intent)}: confirmed on the card", actor)
        if intent.campaign_id is not None:
            # A completed campaign replacement counts as done, even if cancelled meanwhile.
            session.flush()
            cards.finish_campaign_item(conn, intent.campaign_id, intent.psd_id, now)
        return
    cards.close_intent(conn, intent.intent_id, IntentStatus.ABANDONED, now)
    cards.add_event(conn, card.psd_id, now, cards.EV_INTENT_ABANDONED,
                    f"{cards.describe(intent)}: not on the card", actor)
    rows.abandon_campaign_attempt(session, intent, detail or "not on the card", now)
