"""Store: cards that need an operator (flag_attention / clear_attention) and what campaigns
do with them, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from access_server.store import CampaignState, ItemStatus, PsdState, Store
from cms.runtime.errors import FailedPrecondition, InvalidArgument
from tests.access_server.test_store_fixtures import ACTOR, FakeClock, activate, card_in, psd

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

A, B, C = psd(0xA1), psd(0xA2), psd(0xA3)
WHY = "the card's i=10 offers at most level 03; card_channel.minimum_security_level is 13"


def test_a_flag_fails_the_pending_item_and_no_contact_finds_work_until_cleared(
        store: Store, clock: FakeClock) -> None:
    activate(store, A)
    activate(store, B)
    campaign = store.start_campaign("v1 to v2", 1, 2, actor=ACTOR)
    store.acquire_lease(A, "agent-1", 60)

    flagged = store.flag_attention(A, reason="security_level", detail=WHY, actor="agent:pc",
                                   release_lease_of="agent-1")

    assert (flagged.attention, flagged.attention_detail) == ("security_level", WHY)
    assert flagged.needs_attention and flagged.attention_since is not None
    assert flagged.lease_holder is None                 # given back in the same transaction
    assert store.get_psd(A) == flagged
    item = store.get_campaign_item(campaign.campaign_id, A)
    assert (item.status, item.last_error) == (ItemStatus.FAILED, WHY)
    counts = store.get_campaign(campaign.campaign_id)
    assert (counts.pending, counts.failed, counts.state) == (1, 1, CampaignState.RUNNING)
    assert store.campaign_work_for(A) is None and store.campaign_work_for(B) is not None
    contact = store.read_contact(A, "agent-2")
    assert contact.work is None and contact.psd.attention == "security_level"
    history = store.history(A)
    assert (history[-1].event, history[-1].actor) == ("needs_attention", "agent:pc")
    assert history[-1].detail == f"security_level: {WHY}"
    assert store.attention_counts() == {"security_level": 1}

    since = flagged.attention_since
    clock.advance(60)
    again = store.flag_attention(A, reason="card_refused", detail="6A84 at PUT KEY",
                                 actor=ACTOR)
    assert again.attention == "card_refused" and again.attention_since == since

    cleared = store.clear_attention(A, note="minimum lowered to 03", actor="admin")

    assert cleared.attention is None and cleared.attention_detail is None
    assert cleared.attention_since is None
    assert store.get_campaign_item(campaign.campaign_id, A).status is ItemStatus.PENDING
    assert store.campaign_work_for(A) is not None
    assert store.history(A)[-1].event == "attention_cleared"
    assert "minimum lowered to 03" in store.history(A)[-1].detail
    assert store.attention_counts() == {}
    with pytest.raises(FailedPrecondition, match="does not need attention"):
        store.clear_attention(A, note="twice", actor="admin")


def test_a_campaign_waits_for_its_cards_needing_attention(store: Store) -> None:
    activate(store, A)
    activate(store, B)
    campaign = store.start_campaign("two cards", 1, 2, actor=ACTOR)
    _replace(store, B)

    store.flag_attention(A, reason="card_refused", detail="6982 at PUT KEY", actor=ACTOR)

    waiting = store.get_campaign(campaign.campaign_id)
    assert (waiting.state, waiting.done, waiting.failed, waiting.pending) == (
        CampaignState.RUNNING, 1, 1, 0)
    store.clear_attention(A, note="the vendor's fix is on the card", actor="admin")
    assert store.get_campaign_item(campaign.campaign_id, A).status is ItemStatus.PENDING
    _replace(store, A)
    done = store.get_campaign(campaign.campaign_id)
    assert (done.state, done.done, done.failed) == (CampaignState.COMPLETED, 2, 0)


def test_revoking_a_card_needing_attention_lets_its_campaign_complete(store: Store) -> None:
    activate(store, A)
    campaign = store.start_campaign("one card", 1, 2, actor=ACTOR)
    store.flag_attention(A, reason="security_level", detail=WHY, actor=ACTOR)
    assert store.get_campaign(campaign.campaign_id).state is CampaignState.RUNNING

    store.revoke(A, "below the security level we accept", "admin")

    item = store.get_campaign_item(campaign.campaign_id, A)
    assert (item.status, item.last_error) == (ItemStatus.SKIPPED, "card revoked")
    assert store.get_campaign(campaign.campaign_id).state is CampaignState.COMPLETED


def _replace(store: Store, psd_id: str) -> None:
    work = store.campaign_work_for(psd_id)
    assert work is not None
    intent = store.begin_replacement(psd_id, from_version=work.from_version,
                                     to_version=work.to_version,
                                     campaign_id=work.campaign_id, actor=ACTOR)
    store.complete_replacement(psd_id, intent.intent_id, ACTOR)


def test_a_new_campaign_counts_a_card_needing_attention_as_failed_with_its_reason(
        store: Store) -> None:
    activate(store, A)
    activate(store, B)
    store.flag_attention(A, reason="security_level", detail=WHY, actor=ACTOR)

    campaign = store.start_campaign("v1 to v2", 1, 2, actor=ACTOR)

    assert (campaign.total, campaign.pending, campaign.failed) == (2, 1, 1)
    item = store.get_campaign_item(campaign.campaign_id, A)
    assert (item.status, item.last_error) == (ItemStatus.FAILED, WHY)
    failed, after, total = store.list_campaign_items(campaign.campaign_id, ItemStatus.FAILED)
    assert [i.psd_id for i in failed] == [A] and (after, total) == ("", 1)
    everything, after, total = store.list_campaign_items(campaign.campaign_id)
    assert [i.psd_id for i in everything] == [A, B] and (after, total) == ("", 2)
    first, after, total = store.list_campaign_items(campaign.campaign_id, page_size=1)
    assert [i.psd_id for i in first] == [A] and (after, total) == (A, 2)
    page, after, total = store.list_campaign_items(campaign.campaign_id, page_size=1, after=A)
    assert [i.psd_id for i in page] == [B] and (after, total) == ("", 2)
    flagged = store.list_psds(needs_attention=True)
    assert [p.psd_id for p in flagged.items] == [A] and flagged.total == 1
    only = store.start_campaign("only A", 1, 3, psd_ids=[A], actor=ACTOR)
    assert (only.state, only.failed, only.pending) == (CampaignState.RUNNING, 1, 0)
    with pytest.raises(InvalidArgument):
        store.list_campaign_items(campaign.campaign_id, after="nope")


def test_an_open_intent_survives_the_flag(store: Store) -> None:
    intent = card_in(store, A, PsdState.REPLACEMENT_PENDING)
    assert intent is not None

    store.flag_attention(A, reason="card_refused", detail="6A84 at PUT KEY", actor=ACTOR)

    assert store.open_intent(A) == intent
    assert store.get_psd(A).state is PsdState.REPLACEMENT_PENDING
    store.clear_attention(A, note="memory freed", actor="admin")
    store.complete_replacement(A, intent.intent_id, ACTOR)
    assert store.get_psd(A).mk_version == 2


def test_clearing_puts_the_card_back_in_one_campaign_only(store: Store) -> None:
    for card in (A, B, C):
        activate(store, card)
    first = store.start_campaign("first", 1, 2, psd_ids=[A, B], actor=ACTOR)
    store.flag_attention(A, reason="card_refused", detail="6A84 at PUT KEY", actor=ACTOR)
    second = store.start_campaign("second", 1, 3, psd_ids=[A, C], actor=ACTOR)
    assert (second.pending, second.failed) == (1, 1)

    store.clear_attention(A, note="fixed", actor="admin")

    # A card waits in one campaign at a time: the older one takes it back.
    assert store.get_campaign_item(first.campaign_id, A).status is ItemStatus.PENDING
    assert store.get_campaign_item(second.campaign_id, A).status is ItemStatus.FAILED
    work = store.campaign_work_for(A)
    assert work is not None and work.campaign_id == first.campaign_id


def test_revoked_cards_are_not_flagged_and_bad_arguments_are_refused(store: Store) -> None:
    card_in(store, A, PsdState.REVOKED)
    with pytest.raises(FailedPrecondition, match="revoked"):
        store.flag_attention(A, reason="card_refused", detail="x", actor=ACTOR)
    activate(store, B)
    with pytest.raises(InvalidArgument, match="reason"):
        store.flag_attention(B, reason="r" * 33, detail="x", actor=ACTOR)
    with pytest.raises(InvalidArgument, match="detail"):
        store.flag_attention(B, reason="card_refused", detail="", actor=ACTOR)
    store.flag_attention(B, reason="card_refused", detail="x", actor=ACTOR)
    with pytest.raises(InvalidArgument, match="note"):
        store.clear_attention(B, note="", actor=ACTOR)
    assert store.get_psd(B).needs_attention


def test_the_database_refuses_a_flag_without_its_reason(store: Store) -> None:
    activate(store, A)
    statements = [
        "UPDATE psd SET attention = 'card_refused' WHERE psd_id = :p",
        "UPDATE psd SET attention_detail = 'why' WHERE psd_id = :p",
    ]
    for statement in statements:
        with pytest.raises(IntegrityError), store.engine.begin() as connection:
            connection.execute(text(statement), {"p": A})
    assert store.get_psd(A).attention is None
