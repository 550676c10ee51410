"""Store: racing threads never corrupt a card, a lease or a campaign.

Threads start together at a barrier; the assertions hold whichever thread
the database lets through first (nothing here depends on timing).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from access_server.store import (
    Campaign,
    CampaignState,
    Intent,
    IntentStatus,
    PsdRecord,
    PsdState,
    Store,
)
from cms.runtime.errors import FailedPrecondition
from tests.access_server.test_store_fixtures import ACTOR, activate, card_in, psd

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

THREADS = 6
JOIN_TIMEOUT_S = 120
RACER = "racer-"
HOLD_COMMIT_S = 1.0
"""How long a racer waits for its rival before committing alone."""


def race(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls on threads released together; each result or the exception raised."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except Exception as exc:  # the outcome under test
            results[index] = exc

    threads = [
        threading.Thread(target=run, args=(i,), name=f"{RACER}{i}") for i in range(len(calls))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive(), "a racing call never returned"
    return results


def test_one_of_many_completions_wins(store: Store) -> None:
    intent = card_in(store, psd(1), PsdState.REPLACEMENT_PENDING)
    assert intent is not None
    before = store.get_psd(psd(1))

    results = race(
        [lambda: store.complete_replacement(psd(1), intent.intent_id, ACTOR)] * THREADS
    )

    winners = [r for r in results if isinstance(r, PsdRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, FailedPrecondition) for r in results if r not in winners), results
    after = store.get_psd(psd(1))
    assert (after.state, after.mk_version, after.row_version) == (
        PsdState.ACTIVE, 2, before.row_version + 1,
    )
    events = [e.event for e in store.history(psd(1))]
    assert events.count("replacement_completed") == 1


def _replacement_step(store: Store, card: str, begun: Intent | None) -> Intent | PsdRecord:
    """Begin the replacement, or complete the one ``begun``."""
    if begun is None:
        return store.begin_replacement(card, from_version=1, to_version=2, actor=ACTOR)
    return store.complete_replacement(card, begun.intent_id, ACTOR)


@pytest.mark.parametrize("step", ["begin", "complete"])
def test_replacement_racing_revoke(store: Store, step: str) -> None:
    cards = [psd(n) for n in range(1, 5)]
    for card in cards:
        activate(store, card, mk=1)
        if step == "complete":
            store.begin_replacement(card, from_version=1, to_version=2, actor=ACTOR)

    for card in cards:
        begun = store.open_intent(card)
        replaced, revoked = race([
            functools.partial(_replacement_step, store, card, begun),
            functools.partial(store.revoke, card, "lost", ACTOR),
        ])

        # Revoking is allowed from every state but revoked: it always succeeds.
        assert isinstance(revoked, PsdRecord), revoked
        record = store.get_psd(card)
        assert (record.state, record.pending_mk_version) == (PsdState.REVOKED, None)
        assert store.open_intent(card) is None
        events = [e.event for e in store.history(card)]
        if isinstance(replaced, FailedPrecondition):
            # Revoke went first; the replacement found a revoked card.
            assert record.mk_version == 1
            assert events[-1] == "revoked"
            continue
        # The replacement went first; revoke then found its result.
        if begun is None:
            assert isinstance(replaced, Intent), replaced
            begun = replaced
        else:
            assert isinstance(replaced, PsdRecord), replaced
        step_event = "replacement_begun" if step == "begin" else "replacement_completed"
        assert events.index(step_event) < events.index("revoked")
        expected = (IntentStatus.ABANDONED, 1) if step == "begin" else (IntentStatus.DONE, 2)
        assert (store.get_intent(begun.intent_id).status, record.mk_version) == expected


def test_one_lease_among_many_agents(store: Store) -> None:
    activate(store, psd(1))

    results = race(
        [lambda n=n: store.acquire_lease(psd(1), f"agent-{n}", 30) for n in range(THREADS)]
    )

    assert results.count(True) == 1 and results.count(False) == THREADS - 1
    winner = results.index(True)
    assert store.get_psd(psd(1)).lease_holder == f"agent-{winner}"


def test_concurrent_registration_adds_each_id_once(store: Store) -> None:
    ids = [psd(n) for n in range(1, 201)]

    results = race([lambda: store.register_psds(ids, ACTOR)] * 3)

    added = [o.psd_id for outcomes in results for o in outcomes if o.added]  # type: ignore[attr-defined]
    assert sorted(added) == ids
    assert store.list_psds().total == 200


def test_one_of_overlapping_campaign_starts_wins(store: Store) -> None:
    for n in range(1, 6):
        activate(store, psd(n), mk=1)

    results = race(
        [lambda n=n: store.start_campaign(f"c{n}", 1, 2 + n, actor=ACTOR) for n in range(4)]
    )

    started = [r for r in results if isinstance(r, Campaign)]
    assert len(started) == 1, results
    assert all(isinstance(r, FailedPrecondition) for r in results if r not in started), results
    assert [c.campaign_id for c in store.list_campaigns()] == [started[0].campaign_id]
    assert started[0].pending == 5


def test_last_items_finishing_together_complete_the_campaign(store: Store) -> None:
    cards = [psd(1), psd(2)]
    for card in cards:
        activate(store, card, mk=1)
    campaign_id = store.start_campaign("all", 1, 2, actor=ACTOR).campaign_id
    intents = [
        store.begin_replacement(card, from_version=1, to_version=2, campaign_id=campaign_id,
                                actor=ACTOR)
        for card in cards
    ]
    # Each racer holds its commit until the other has done its work too, if the
    # store lets it: then neither would see the other's item as done and the
    # campaign would never complete. The campaign row lock must prevent that
    # (the first racer then gives up waiting and commits).
    both_at_commit = threading.Barrier(2, timeout=HOLD_COMMIT_S)

    def hold_commit(_session: Session) -> None:
        if threading.current_thread().name.startswith(RACER):
            with contextlib.suppress(threading.BrokenBarrierError):
                both_at_commit.wait()

    event.listen(Session, "before_commit", hold_commit)
    try:
        results = race([
            lambda card=card, intent=intent: store.complete_replacement(
                card, intent.intent_id, ACTOR
            )
            for card, intent in zip(cards, intents, strict=True)
        ])
    finally:
        event.remove(Session, "before_commit", hold_commit)

    assert all(isinstance(r, PsdRecord) for r in results), results
    campaign = store.get_campaign(campaign_id)
    assert (campaign.state, campaign.done, campaign.pending) == (CampaignState.COMPLETED, 2, 0)
