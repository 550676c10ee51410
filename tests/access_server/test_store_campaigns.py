"""Store: replacement campaigns (snapshot, filters, transitions, counts, overlap)."""

from __future__ import annotations

import pytest

from access_server.store import CampaignState, ItemStatus, PsdState, Store
from cms.runtime.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from tests.access_server.test_store_fixtures import ACTOR, activate, psd, register

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

BATCH = "AB"
"""Prefix of a manufacturer batch in these tests."""


def _fleet(store: Store) -> dict[str, str]:
    """Cards in various situations, by role."""
    cards = {
        "batch1": psd(1, BATCH), "batch2": psd(2, BATCH), "batch3": psd(3, BATCH),
        "other": psd(4), "newer": psd(5), "blank": psd(6), "revoked": psd(7),
    }
    for role in ("batch1", "batch2", "batch3", "other", "revoked"):
        activate(store, cards[role], mk=1)
    activate(store, cards["newer"], mk=2)
    register(store, cards["blank"])
    store.revoke(cards["revoked"], "lost", ACTOR)
    return cards


def _replace(store: Store, psd_id: str) -> None:
    """What the flow does for a card that has campaign work."""
    work = store.campaign_work_for(psd_id)
    assert work is not None
    intent = store.begin_replacement(
        psd_id, from_version=work.from_version, to_version=work.to_version,
        campaign_id=work.campaign_id, actor=ACTOR,
    )
    store.complete_replacement(psd_id, intent.intent_id, ACTOR)


def test_snapshot_takes_active_cards_at_the_from_version(store: Store) -> None:
    cards = _fleet(store)

    campaign = store.start_campaign("v1 to v2", 1, 2, actor="operator")

    assert (campaign.state, campaign.total, campaign.pending) == (CampaignState.RUNNING, 4, 4)
    assert (campaign.from_version, campaign.to_version, campaign.created_by) == (1, 2, "operator")
    for role in ("batch1", "batch2", "batch3", "other"):
        work = store.campaign_work_for(cards[role])
        assert work is not None and work.campaign_id == campaign.campaign_id
    for role in ("newer", "blank", "revoked"):
        assert store.campaign_work_for(cards[role]) is None
    # A card activated after the start is not part of the snapshot.
    activate(store, psd(8), mk=1)
    assert store.campaign_work_for(psd(8)) is None
    assert store.get_campaign(campaign.campaign_id).total == 4


def test_prefix_filter(store: Store) -> None:
    cards = _fleet(store)

    campaign = store.start_campaign("batch AB", 1, 2, psd_id_prefix=BATCH, actor=ACTOR)

    assert (campaign.total, campaign.psd_id_prefix) == (3, BATCH)
    assert store.campaign_work_for(cards["other"]) is None
    with pytest.raises(InvalidArgument, match="prefix"):
        store.start_campaign("bad", 1, 2, psd_id_prefix="ab%", actor=ACTOR)


def test_listed_ids(store: Store) -> None:
    cards = _fleet(store)
    listed = [cards["batch1"], cards["newer"], cards["blank"], cards["batch1"]]

    campaign = store.start_campaign("listed", 1, 2, psd_ids=listed, actor=ACTOR)

    assert (campaign.total, campaign.pending, campaign.skipped, campaign.listed_ids) == (
        3, 1, 2, 3,
    )
    skipped = store.get_campaign_item(campaign.campaign_id, cards["newer"])
    assert skipped.status is ItemStatus.SKIPPED
    assert "MK v2, not v1" in (skipped.last_error or "")
    unfit = store.get_campaign_item(campaign.campaign_id, cards["blank"])
    assert "blank" in (unfit.last_error or "")
    with pytest.raises(NotFound):
        store.get_campaign_item(campaign.campaign_id, cards["other"])


def test_listed_and_prefix_both_narrow(store: Store) -> None:
    cards = _fleet(store)

    campaign = store.start_campaign(
        "both", 1, 2, psd_ids=[cards["batch2"], cards["other"]], psd_id_prefix=BATCH, actor=ACTOR,
    )

    assert (campaign.pending, campaign.skipped) == (1, 1)
    assert store.campaign_work_for(cards["batch2"]) is not None
    assert store.campaign_work_for(cards["other"]) is None


def test_start_refusals_create_nothing(store: Store) -> None:
    cards = _fleet(store)

    with pytest.raises(NotFound, match=psd(99)):
        store.start_campaign("typo", 1, 2, psd_ids=[cards["batch1"], psd(99)], actor=ACTOR)
    with pytest.raises(FailedPrecondition, match="no active card with MK v5"):
        store.start_campaign("nothing", 5, 6, actor=ACTOR)
    with pytest.raises(FailedPrecondition, match="no active card"):
        store.start_campaign("only unfit", 1, 2, psd_ids=[cards["blank"]], actor=ACTOR)
    with pytest.raises(InvalidArgument, match="differ"):
        store.start_campaign("same", 1, 1, actor=ACTOR)
    with pytest.raises(InvalidArgument, match="name"):
        store.start_campaign(" ", 1, 2, actor=ACTOR)
    assert store.list_campaigns() == []


def test_overlapping_campaign_is_refused(store: Store) -> None:
    cards = _fleet(store)
    first = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR)

    with pytest.raises(FailedPrecondition) as refused:
        store.start_campaign("everything", 1, 3, actor=ACTOR)
    assert first.campaign_id in refused.value.message
    assert "'batch'" in refused.value.message
    # Disjoint cards are fine; a paused campaign still holds its cards.
    disjoint = store.start_campaign("other", 1, 3, psd_ids=[cards["other"]], actor=ACTOR)
    store.pause_campaign(first.campaign_id)
    with pytest.raises(FailedPrecondition, match=first.campaign_id):
        store.start_campaign("again", 1, 3, psd_ids=[cards["batch1"]], actor=ACTOR)

    store.cancel_campaign(first.campaign_id)

    retry = store.start_campaign("again", 1, 3, psd_ids=[cards["batch1"]], actor=ACTOR)
    assert retry.pending == 1
    states = {c.name: c.state for c in store.list_campaigns()}
    assert states == {
        "batch": CampaignState.CANCELLED,
        "other": CampaignState.RUNNING,
        "again": CampaignState.RUNNING,
    }
    assert [c.name for c in store.list_campaigns(CampaignState.RUNNING)] == ["other", "again"]
    assert disjoint.campaign_id in {c.campaign_id for c in store.list_campaigns()}


def test_transitions(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("c", 1, 2, actor=ACTOR).campaign_id

    with pytest.raises(FailedPrecondition, match=r"cannot resume .* running"):
        store.resume_campaign(campaign_id)
    assert store.pause_campaign(campaign_id).state is CampaignState.PAUSED
    assert store.campaign_work_for(cards["batch1"]) is None
    with pytest.raises(FailedPrecondition, match=r"cannot pause .* paused"):
        store.pause_campaign(campaign_id)
    assert store.resume_campaign(campaign_id).state is CampaignState.RUNNING
    assert store.campaign_work_for(cards["batch1"]) is not None

    cancelled = store.cancel_campaign(campaign_id)

    assert (cancelled.state, cancelled.pending, cancelled.skipped) == (
        CampaignState.CANCELLED, 0, 4,
    )
    assert store.campaign_work_for(cards["batch1"]) is None
    for action in (store.resume_campaign, store.pause_campaign, store.cancel_campaign):
        with pytest.raises(FailedPrecondition, match="cancelled"):
            action(campaign_id)
    with pytest.raises(NotFound):
        store.pause_campaign("no-such-campaign")


def test_replacement_under_a_campaign_counts_and_completes(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id
    first = cards["batch1"]
    work = store.campaign_work_for(first)
    assert work is not None and (work.status, work.attempts) == (ItemStatus.PENDING, 0)
    attempt = store.begin_replacement(
        first, from_version=1, to_version=2, campaign_id=campaign_id, actor=ACTOR
    )
    assert attempt.campaign_id == campaign_id
    store.abandon_intent(first, attempt.intent_id, "card pulled", ACTOR)
    retry = store.campaign_work_for(first)
    assert retry is not None
    assert (retry.status, retry.attempts, retry.last_error) == (
        ItemStatus.PENDING, 1, "card pulled",
    )

    _replace(store, first)
    _replace(store, cards["batch2"])

    midway = store.get_campaign(campaign_id)
    assert (midway.done, midway.pending, midway.state) == (2, 1, CampaignState.RUNNING)
    assert store.get_campaign_item(campaign_id, first).attempts == 2
    assert store.campaign_work_for(first) is None
    store.mark_item(campaign_id, cards["batch3"], ItemStatus.FAILED, "card locked")
    # A failed item needs an operator: the campaign waits for it as for a pending one.
    waiting = store.get_campaign(campaign_id)
    assert (waiting.state, waiting.total, waiting.done, waiting.failed, waiting.pending) == (
        CampaignState.RUNNING, 3, 2, 1, 0,
    )
    store.mark_item(campaign_id, cards["batch3"], ItemStatus.SKIPPED, "card locked for good")
    final = store.get_campaign(campaign_id)
    assert (final.state, final.done, final.failed, final.skipped) == (
        CampaignState.COMPLETED, 2, 0, 1,
    )
    with pytest.raises(FailedPrecondition, match="completed"):
        store.mark_item(campaign_id, cards["batch3"], ItemStatus.PENDING)


def test_campaign_replacement_must_match_the_campaign(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id

    with pytest.raises(FailedPrecondition, match="not v1 by v3"):
        store.begin_replacement(
            cards["batch1"], from_version=1, to_version=3, campaign_id=campaign_id, actor=ACTOR
        )
    with pytest.raises(NotFound, match="not part of campaign"):
        store.begin_replacement(
            cards["other"], from_version=1, to_version=2, campaign_id=campaign_id, actor=ACTOR
        )
    store.pause_campaign(campaign_id)
    with pytest.raises(FailedPrecondition, match="paused, not running"):
        store.begin_replacement(
            cards["batch1"], from_version=1, to_version=2, campaign_id=campaign_id, actor=ACTOR
        )
    assert store.get_psd(cards["batch1"]).state is PsdState.ACTIVE


def test_items_settle_when_cards_change_outside_the_campaign(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id
    # Replaced by hand to the campaign's target: done.
    manual = store.begin_replacement(cards["batch1"], from_version=1, to_version=2, actor=ACTOR)
    store.complete_replacement(cards["batch1"], manual.intent_id, ACTOR)
    # Found at another version on contact: no longer a candidate.
    store.reconcile(
        cards["batch2"], state=PsdState.ACTIVE, mk_version=3, mkrk_version=1,
        event="probe", detail="", actor=ACTOR,
    )
    before_revoke = store.get_campaign(campaign_id)

    store.revoke(cards["batch3"], "stolen", ACTOR)

    items = {role: store.get_campaign_item(campaign_id, cards[role]) for role in
             ("batch1", "batch2", "batch3")}
    assert {role: item.status for role, item in items.items()} == {
        "batch1": ItemStatus.DONE, "batch2": ItemStatus.SKIPPED, "batch3": ItemStatus.SKIPPED,
    }
    assert "no longer v1" in (items["batch2"].last_error or "")
    assert before_revoke.state is CampaignState.RUNNING
    assert store.get_campaign(campaign_id).state is CampaignState.COMPLETED


def test_completion_after_cancel_still_counts(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id
    intent = store.begin_replacement(
        cards["batch1"], from_version=1, to_version=2, campaign_id=campaign_id, actor=ACTOR
    )
    store.cancel_campaign(campaign_id)

    store.complete_replacement(cards["batch1"], intent.intent_id, ACTOR)

    campaign = store.get_campaign(campaign_id)
    assert (campaign.state, campaign.done, campaign.skipped) == (CampaignState.CANCELLED, 1, 2)


def test_reconcile_closes_campaign_items(store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("batch", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id
    for role in ("batch1", "batch2"):
        store.begin_replacement(
            cards[role], from_version=1, to_version=2, campaign_id=campaign_id, actor=ACTOR
        )

    for role, found in (("batch1", 2), ("batch2", 1)):
        store.reconcile(
            cards[role], state=PsdState.ACTIVE, mk_version=found, mkrk_version=1,
            event="probe", detail=f"card holds v{found}", actor=ACTOR,
        )

    done = store.get_campaign_item(campaign_id, cards["batch1"])
    retry = store.get_campaign_item(campaign_id, cards["batch2"])
    assert done.status is ItemStatus.DONE
    assert (retry.status, retry.attempts, retry.last_error) == (
        ItemStatus.PENDING, 1, "card holds v1",
    )
    assert store.campaign_work_for(cards["batch2"]) == retry


def test_mark_item_reopen_respects_the_overlap_rule(store: Store) -> None:
    cards = _fleet(store)
    first = store.start_campaign("first", 1, 2, psd_id_prefix=BATCH, actor=ACTOR).campaign_id
    store.mark_item(first, cards["batch1"], ItemStatus.FAILED, "timeout")
    # No longer pending anywhere, so another campaign may take the card.
    second = store.start_campaign("second", 1, 3, psd_ids=[cards["batch1"]], actor=ACTOR)

    with pytest.raises(FailedPrecondition, match=second.campaign_id):
        store.mark_item(first, cards["batch1"], ItemStatus.PENDING)
    store.mark_item(second.campaign_id, cards["batch1"], ItemStatus.SKIPPED, "operator")
    assert store.get_campaign(second.campaign_id).state is CampaignState.COMPLETED
    reopened = store.mark_item(first, cards["batch1"], ItemStatus.PENDING)

    assert (reopened.status, reopened.last_error) == (ItemStatus.PENDING, None)
    assert store.campaign_work_for(cards["batch1"]) == reopened
    with pytest.raises(FailedPrecondition, match="completed"):
        store.mark_item(second.campaign_id, cards["batch1"], ItemStatus.PENDING)
    with pytest.raises(InvalidArgument, match="unknown item status"):
        store.mark_item(first, cards["batch1"], "lost")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.mark_item(first, cards["other"], ItemStatus.DONE)


def test_counts_in_listing(store: Store) -> None:
    for n in range(1, 6):
        activate(store, psd(n), mk=1)
    campaign_id = store.start_campaign("all", 1, 2, actor=ACTOR).campaign_id
    _replace(store, psd(1))
    store.mark_item(campaign_id, psd(2), ItemStatus.FAILED, "unreachable")
    store.mark_item(campaign_id, psd(3), ItemStatus.SKIPPED)

    (listed,) = store.list_campaigns()

    assert listed == store.get_campaign(campaign_id)
    assert (listed.total, listed.done, listed.failed, listed.skipped, listed.pending) == (
        5, 1, 1, 1, 2,
    )


def test_a_contact_journals_the_campaign_replacement_only_as_it_takes_the_lease(
        store: Store) -> None:
    cards = _fleet(store)
    campaign_id = store.start_campaign("v1 to v2", 1, 2, psd_id_prefix=BATCH,
                                       actor=ACTOR).campaign_id
    card = cards["batch1"]
    record, history = store.get_psd(card), store.history(card)

    seen = store.read_contact(card, "agent-1")

    # Read before the card proves its keys: nothing is written, not even the contact time.
    assert seen.lease_free and not seen.leased and seen.intent is None
    assert seen.work is not None and seen.work.campaign_id == campaign_id
    assert seen.psd == record == store.get_psd(card) and store.history(card) == history
    assert store.get_campaign_item(campaign_id, card).attempts == 0

    start = store.start_contact(card, "agent-1", 30, seen=seen, journal=True, actor=ACTOR)

    assert start.leased and start.intent_begun and start.cryptogram == seen.cryptogram
    intent = start.intent
    assert intent is not None and intent == store.open_intent(card)
    assert (intent.from_version, intent.to_version, intent.campaign_id) == (1, 2, campaign_id)
    assert start.psd == store.get_psd(card)
    assert (start.psd.state, start.psd.pending_mk_version) == (PsdState.REPLACEMENT_PENDING, 2)
    assert start.psd.lease_holder == "agent-1" and start.psd.last_contact is not None
    assert store.get_campaign_item(campaign_id, card).attempts == 1
    assert store.history(card)[-1].event == "replacement_begun"
    # The next contact finds the intent open and journals nothing more.
    again = store.start_contact(card, "agent-1", 30, seen=store.read_contact(card, "agent-1"))
    assert not again.intent_begun and again.intent == intent
    assert store.get_campaign_item(campaign_id, card).attempts == 1
    done = store.complete_replacement(card, intent.intent_id, ACTOR,
                                      release_lease_of="agent-1")
    assert done == store.get_psd(card)
    assert (done.state, done.mk_version, done.lease_holder) == (PsdState.ACTIVE, 2, None)
    assert store.get_campaign_item(campaign_id, card).status is ItemStatus.DONE


@pytest.mark.parametrize("situation", ["leased_elsewhere", "revoked", "paused", "cancelled"])
def test_a_contact_whose_registry_moved_meanwhile_journals_nothing(
        store: Store, situation: str) -> None:
    """Between the read and the lease the contact waited for the proxy: whatever changed
    meanwhile aborts it (the next contact starts afresh), and nothing is written."""
    cards = _fleet(store)
    campaign_id = store.start_campaign("v1 to v2", 1, 2, psd_id_prefix=BATCH,
                                       actor=ACTOR).campaign_id
    card = cards["batch2"]
    seen = store.read_contact(card, "agent-1")
    if situation == "leased_elsewhere":
        store.start_contact(card, "agent-2", 30)
    elif situation == "revoked":
        store.revoke(card, "lost", ACTOR)
    elif situation == "paused":
        store.pause_campaign(campaign_id)
    else:
        store.cancel_campaign(campaign_id)
    record, history = store.get_psd(card), store.history(card)

    with pytest.raises(Aborted, match="changed while this contact checked the card"):
        store.start_contact(card, "agent-1", 30, seen=seen, journal=True, actor=ACTOR)

    assert store.open_intent(card) is None
    assert store.get_psd(card) == record and store.history(card) == history
    assert store.get_campaign_item(campaign_id, card).attempts == 0


def test_read_contact_tells_whether_the_lease_is_free(store: Store) -> None:
    cards = _fleet(store)
    store.start_contact(cards["batch1"], "agent-2", 30)
    assert not store.read_contact(cards["batch1"], "agent-1").lease_free
    assert store.read_contact(cards["batch1"], "agent-2").lease_free
    revoked = store.read_contact(cards["revoked"], "agent-1")
    assert revoked.psd.state is PsdState.REVOKED and not revoked.lease_free
    with pytest.raises(NotFound):
        store.read_contact(psd(99), "agent-1")


@pytest.mark.parametrize("what", ["no_seen", "no_work", "open_intent", "no_actor"])
def test_journal_needs_what_read_contact_saw_and_an_actor(store: Store, what: str) -> None:
    cards = _fleet(store)
    store.start_campaign("v1 to v2", 1, 2, psd_id_prefix=BATCH, actor=ACTOR)
    card = cards["batch1"] if what != "no_work" else cards["other"]
    if what == "open_intent":
        store.begin_replacement(card, from_version=1, to_version=3, actor=ACTOR)
    seen = None if what == "no_seen" else store.read_contact(card, "agent-1")
    with pytest.raises(InvalidArgument, match="actor" if what == "no_actor" else "journal"):
        store.start_contact(card, "agent-1", 30, seen=seen, journal=True,
                            actor=None if what == "no_actor" else ACTOR)
