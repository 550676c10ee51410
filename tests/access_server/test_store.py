"""Store: registry, state machine, history, leases, intent journal and reconcile.

Every test runs on SQLite and on a private PostgreSQL server.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from access_server.store import (
    IntentKind,
    IntentStatus,
    PsdState,
    Store,
)
from access_server.store.store import MAX_PAGE_SIZE
from cms.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tests.access_server.test_store_fixtures import (
    ACTOR,
    LABEL,
    FakeClock,
    activate,
    begin_install,
    card_in,
    cryptogram,
    psd,
    register,
)

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

A, B, C = psd(0xA), psd(0xB), psd(0xC)


# -- registry ------------------------------------------------------------------


def test_register_reports_each_id_in_order(store: Store) -> None:
    outcomes = store.register_psds([A, "a" * 20, A, B, "ABC", 42], ACTOR)  # type: ignore[list-item]

    assert [(o.psd_id, o.added, o.code) for o in outcomes] == [
        (A, True, grpc.StatusCode.OK),
        ("a" * 20, False, grpc.StatusCode.INVALID_ARGUMENT),
        (A, False, grpc.StatusCode.ALREADY_EXISTS),
        (B, True, grpc.StatusCode.OK),
        ("ABC", False, grpc.StatusCode.INVALID_ARGUMENT),
        ("42", False, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    assert "malformed PSD id" in (outcomes[1].error or "")
    assert "already registered" in (outcomes[2].error or "")
    again = store.register_psds([B, C], ACTOR)
    assert [(o.added, o.error) for o in again] == [(False, "already registered"), (True, None)]
    record = store.get_psd(A)
    assert (record.state, record.mk_version, record.has_cryptogram) == (PsdState.BLANK, None, False)
    assert store.list_psds().total == 3


def test_register_many_in_one_call(store: Store) -> None:
    ids = [psd(n) for n in range(1, 1201)]

    outcomes = store.register_psds(ids, ACTOR)

    assert sum(o.added for o in outcomes) == 1200
    assert store.list_psds(state=PsdState.BLANK).total == 1200
    assert [e.event for e in store.history(ids[-1])] == ["registered"]


def test_get_unknown_and_malformed(store: Store) -> None:
    with pytest.raises(NotFound, match=A):
        store.get_psd(A)
    with pytest.raises(InvalidArgument, match="malformed"):
        store.get_psd("0123")
    with pytest.raises(NotFound):
        store.history(A)
    with pytest.raises(InvalidArgument, match="not a string"):
        store.register_psds(A, ACTOR)
    with pytest.raises(InvalidArgument, match="intent_id"):
        store.complete_install(A, "1", ACTOR)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="campaign state"):
        store.list_campaigns("bogus")  # type: ignore[arg-type]


def test_database_trouble_is_a_domain_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported database URL"):
        Store("mysql://somewhere/db")
    unreachable = f"postgresql+psycopg://cms@/db?host={tmp_path}&port=5432"
    with Store(unreachable) as store, pytest.raises(Unavailable) as raised:
        store.get_psd(A)
    assert "SELECT" not in raised.value.message


def test_pagination_is_stable_keyset(store: Store) -> None:
    ids = [psd(n) for n in range(10, 35)]
    register(store, *reversed(ids))

    first = store.list_psds(page_size=10)
    assert [p.psd_id for p in first.items] == ids[:10]
    assert first.total == 25 and first.next_page_token
    # A card registered before the cursor must not shift the next page.
    register(store, psd(1))
    second = store.list_psds(page_size=10, page_token=first.next_page_token)
    assert [p.psd_id for p in second.items] == ids[10:20]
    assert second.total == 26
    third = store.list_psds(page_size=10, page_token=second.next_page_token)
    assert [p.psd_id for p in third.items] == ids[20:]
    assert third.next_page_token == ""


def test_pagination_filters_and_tokens(store: Store) -> None:
    activate(store, A, mk=1)
    activate(store, B, mk=2)
    register(store, C)

    active_v1 = store.list_psds(state=PsdState.ACTIVE, mk_version=1)
    assert ([p.psd_id for p in active_v1.items], active_v1.total) == ([A], 1)
    assert store.list_psds(state=PsdState.BLANK).total == 1
    page = store.list_psds(page_size=1)
    with pytest.raises(InvalidArgument, match="different filter"):
        store.list_psds(state=PsdState.BLANK, page_size=1, page_token=page.next_page_token)
    with pytest.raises(InvalidArgument, match="malformed page token"):
        store.list_psds(page_token="not-a-token!")
    with pytest.raises(InvalidArgument):
        store.list_psds(page_size=-1)
    assert len(store.list_psds(page_size=MAX_PAGE_SIZE * 10).items) == 3


def test_history_records_each_step_with_actor(store: Store) -> None:
    register(store, A)
    intent = begin_install(store, A)
    store.complete_install(A, intent.intent_id, "flow-a1")
    store.record_event(A, "probe", "card answered", "agent-7")
    store.revoke(A, "reported stolen", "operator")

    events = store.history(A)

    assert [(e.event, e.actor) for e in events] == [
        ("registered", ACTOR),
        ("install_begun", ACTOR),
        ("install_completed", "flow-a1"),
        ("probe", "agent-7"),
        ("revoked", "operator"),
    ]
    assert "reported stolen" in events[-1].detail
    assert all(a.at < b.at for a, b in pairwise(events))


def test_touch_contact(store: Store, clock: FakeClock) -> None:
    register(store, A)
    clock.advance(60)

    stored = store.touch_contact(A)

    assert store.get_psd(A).last_contact == stored
    assert stored > store.get_psd(A).created
    with pytest.raises(NotFound):
        store.touch_contact(B)


# -- state machine ---------------------------------------------------------------


def test_installation(store: Store) -> None:
    register(store, A)
    data = cryptogram()

    intent = begin_install(store, A, mk=3, mkrk=2, data=data)

    assert (intent.kind, intent.status, intent.to_version, intent.mkrk_version) == (
        IntentKind.INSTALL, IntentStatus.OPEN, 3, 2,
    )
    installing = store.get_psd(A)
    assert installing.state is PsdState.INSTALLING
    assert (installing.pending_mk_version, installing.has_cryptogram) == (3, True)
    assert installing.cryptogram_key_label == LABEL
    assert store.get_cryptogram(A).ciphertext == data
    assert store.open_intent(A) == intent

    active = store.complete_install(A, intent.intent_id, ACTOR)

    assert (active.state, active.mk_version, active.mkrk_version) == (PsdState.ACTIVE, 3, 2)
    assert active.pending_mk_version is None
    assert active == store.get_psd(A)
    assert store.open_intent(A) is None
    assert store.get_intent(intent.intent_id).status is IntentStatus.DONE
    assert store.get_cryptogram(A).ciphertext == data


def test_install_restart_needs_transport_keys_confirmed(store: Store) -> None:
    register(store, A)
    first_data, second_data = cryptogram(), cryptogram()
    first = begin_install(store, A, data=first_data)

    with pytest.raises(FailedPrecondition, match="already has an installation journaled"):
        begin_install(store, A, data=second_data)
    assert store.get_cryptogram(A).ciphertext == first_data

    second = begin_install(store, A, mk=2, data=second_data, restart=True)

    assert store.get_cryptogram(A).ciphertext == second_data
    assert store.get_intent(first.intent_id).status is IntentStatus.ABANDONED
    assert store.open_intent(A) == second
    assert store.get_psd(A).pending_mk_version == 2
    with pytest.raises(FailedPrecondition, match="abandoned, not open"):
        store.complete_install(A, first.intent_id, ACTOR)
    assert store.complete_install(A, second.intent_id, ACTOR).mk_version == 2


def test_begin_install_refuses_what_cannot_be_a_cryptogram(store: Store) -> None:
    register(store, A)

    for bad in (b"\x01" * 32, b"", "00" * 128, cryptogram() + b"\x00"):
        with pytest.raises(InvalidArgument, match="cryptogram"):
            begin_install(store, A, data=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="mk_version"):
        begin_install(store, A, mk=0)
    with pytest.raises(NotFound):
        begin_install(store, B)
    assert store.get_psd(A).state is PsdState.BLANK
    assert [e.event for e in store.history(A)] == ["registered"]


def test_replacement(store: Store) -> None:
    activate(store, A, mk=1)

    intent = store.begin_replacement(A, from_version=1, to_version=2, actor=ACTOR)

    pending = store.get_psd(A)
    assert (pending.state, pending.mk_version, pending.pending_mk_version) == (
        PsdState.REPLACEMENT_PENDING, 1, 2,
    )
    assert (intent.kind, intent.from_version, intent.to_version) == (IntentKind.REPLACE, 1, 2)
    with pytest.raises(FailedPrecondition, match="replacement_pending, not active"):
        store.begin_replacement(A, from_version=1, to_version=3, actor=ACTOR)

    done = store.complete_replacement(A, intent.intent_id, ACTOR)

    assert (done.state, done.mk_version, done.pending_mk_version) == (PsdState.ACTIVE, 2, None)
    assert done.mkrk_version == 1
    assert store.get_intent(intent.intent_id).status is IntentStatus.DONE


def test_replacement_checks_versions(store: Store) -> None:
    activate(store, A, mk=2)

    with pytest.raises(FailedPrecondition, match="holds MK v2, not v1"):
        store.begin_replacement(A, from_version=1, to_version=3, actor=ACTOR)
    with pytest.raises(InvalidArgument, match="differ"):
        store.begin_replacement(A, from_version=2, to_version=2, actor=ACTOR)
    assert store.get_psd(A).state is PsdState.ACTIVE


def test_abandon_returns_to_what_the_card_holds(store: Store) -> None:
    register(store, A)
    data = cryptogram()
    install = begin_install(store, A, data=data)

    blank = store.abandon_intent(A, install.intent_id, "card removed before PUT KEY", ACTOR)

    assert (blank.state, blank.pending_mk_version, blank.has_cryptogram) == (
        PsdState.BLANK, None, True,
    )
    # Kept: only a new installation replaces a cryptogram.
    assert store.get_cryptogram(A).ciphertext == data
    install = begin_install(store, A)
    store.complete_install(A, install.intent_id, ACTOR)
    replace = store.begin_replacement(A, from_version=1, to_version=2, actor=ACTOR)

    active = store.abandon_intent(A, replace.intent_id, "agent vanished", ACTOR)

    assert (active.state, active.mk_version, active.pending_mk_version) == (
        PsdState.ACTIVE, 1, None,
    )
    assert store.get_intent(replace.intent_id).status is IntentStatus.ABANDONED
    assert "agent vanished" in store.history(A)[-1].detail
    with pytest.raises(FailedPrecondition, match="not open"):
        store.abandon_intent(A, replace.intent_id, "again", ACTOR)


def _complete_install(store: Store, psd_id: str, intent_id: int) -> object:
    return store.complete_install(psd_id, intent_id, ACTOR)


def _complete_replacement(store: Store, psd_id: str, intent_id: int) -> object:
    return store.complete_replacement(psd_id, intent_id, ACTOR)


Operation = Callable[[Store, str, int], object]

OPERATIONS: dict[str, tuple[Operation, set[PsdState]]] = {
    "begin_install": (lambda s, p, _i: begin_install(s, p), {PsdState.BLANK}),
    "begin_replacement": (
        lambda s, p, _i: s.begin_replacement(p, from_version=1, to_version=2, actor=ACTOR),
        {PsdState.ACTIVE},
    ),
    "complete_install": (_complete_install, {PsdState.INSTALLING}),
    "complete_replacement": (_complete_replacement, {PsdState.REPLACEMENT_PENDING}),
    "revoke": (
        lambda s, p, _i: s.revoke(p, "test", ACTOR),
        set(PsdState) - {PsdState.REVOKED},
    ),
}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_is_refused_from_other_states(store: Store, name: str) -> None:
    operation, allowed = OPERATIONS[name]
    for number, state in enumerate(PsdState, start=1):
        psd_id = psd(number)
        intent = card_in(store, psd_id, state)
        # A state's own open intent, or one of another card's for the refused cases.
        intent_id = intent.intent_id if intent is not None else 10**9
        before = store.get_psd(psd_id)
        if state in allowed:
            operation(store, psd_id, intent_id)
            assert store.get_psd(psd_id).row_version > before.row_version
            continue
        with pytest.raises((FailedPrecondition, NotFound)):
            operation(store, psd_id, intent_id)
        assert store.get_psd(psd_id) == before, state


def test_complete_needs_the_matching_open_intent(store: Store) -> None:
    card_in(store, A, PsdState.REPLACEMENT_PENDING)
    replace = store.open_intent(A)
    assert replace is not None

    with pytest.raises(FailedPrecondition, match="replace intent, not install"):
        store.complete_install(A, replace.intent_id, ACTOR)
    # The card's installation intent (the one before) is done by now.
    with pytest.raises(FailedPrecondition, match="done, not open"):
        store.complete_install(A, replace.intent_id - 1, ACTOR)
    card_in(store, B, PsdState.REPLACEMENT_PENDING)
    with pytest.raises(NotFound, match="intent"):
        store.complete_replacement(B, replace.intent_id, ACTOR)
    assert store.get_psd(A).state is PsdState.REPLACEMENT_PENDING


def test_revoke_abandons_the_open_intent(store: Store) -> None:
    card_in(store, A, PsdState.REPLACEMENT_PENDING)
    intent = store.open_intent(A)
    assert intent is not None

    revoked = store.revoke(A, "lost", ACTOR)

    assert (revoked.state, revoked.mk_version, revoked.pending_mk_version) == (
        PsdState.REVOKED, 1, None,
    )
    assert store.get_intent(intent.intent_id).status is IntentStatus.ABANDONED
    assert store.open_intent(A) is None
    with pytest.raises(FailedPrecondition, match="already revoked"):
        store.revoke(A, "again", ACTOR)
    with pytest.raises(FailedPrecondition, match="revoked"):
        store.reconcile(
            A, state=PsdState.ACTIVE, mk_version=1, mkrk_version=1,
            event="probe", detail="", actor=ACTOR,
        )


# -- leases -----------------------------------------------------------------------


def test_lease_is_exclusive(store: Store) -> None:
    register(store, A)

    assert store.acquire_lease(A, "agent-1", 30)
    assert not store.acquire_lease(A, "agent-2", 30)
    assert store.acquire_lease(A, "agent-1", 30)  # renewal
    assert not store.release_lease(A, "agent-2")
    assert store.get_psd(A).lease_holder == "agent-1"
    assert store.release_lease(A, "agent-1")
    assert store.get_psd(A).lease_holder is None
    assert store.acquire_lease(A, "agent-2", 30)


def test_stale_lease_expires(store: Store, clock: FakeClock) -> None:
    register(store, A)
    assert store.acquire_lease(A, "agent-1", 30)
    clock.advance(29)
    assert not store.acquire_lease(A, "agent-2", 30)

    clock.advance(2)

    assert store.acquire_lease(A, "agent-2", 30)
    assert not store.release_lease(A, "agent-1")
    record = store.get_psd(A)
    assert record.lease_holder == "agent-2"
    assert record.lease_expires is not None and record.lease_expires > clock()


def test_lease_arguments(store: Store) -> None:
    register(store, A)
    with pytest.raises(NotFound):
        store.acquire_lease(B, "agent-1", 30)
    with pytest.raises(NotFound):
        store.release_lease(B, "agent-1")
    for ttl in (0, -1, 10**6):
        with pytest.raises(InvalidArgument, match="ttl"):
            store.acquire_lease(A, "agent-1", ttl)
    with pytest.raises(InvalidArgument, match="holder"):
        store.acquire_lease(A, "", 30)


# -- reconcile --------------------------------------------------------------------


def _reconcile(store: Store, psd_id: str, state: PsdState, **versions: int | None) -> object:
    return store.reconcile(
        psd_id, state=state, mk_version=versions.get("mk"), mkrk_version=versions.get("mkrk"),
        pending=versions.get("pending"), event="probe", detail="found on card", actor="agent",
    )


def test_reconcile_install_found_complete(store: Store) -> None:
    register(store, A)
    intent = begin_install(store, A, mk=1, mkrk=1)

    _reconcile(store, A, PsdState.ACTIVE, mk=1, mkrk=1)

    record = store.get_psd(A)
    assert (record.state, record.mk_version, record.mkrk_version) == (PsdState.ACTIVE, 1, 1)
    assert store.get_intent(intent.intent_id).status is IntentStatus.DONE
    assert [e.event for e in store.history(A)][-2:] == ["probe", "intent_done"]


def test_reconcile_install_not_on_card(store: Store) -> None:
    register(store, A)
    data = cryptogram()
    intent = begin_install(store, A, data=data)

    _reconcile(store, A, PsdState.BLANK)

    record = store.get_psd(A)
    assert (record.state, record.pending_mk_version) == (PsdState.BLANK, None)
    assert store.get_intent(intent.intent_id).status is IntentStatus.ABANDONED
    assert store.get_cryptogram(A).ciphertext == data


def test_reconcile_install_half_done_keeps_intent_open(store: Store) -> None:
    register(store, A)
    intent = begin_install(store, A, mk=1, mkrk=1)

    _reconcile(store, A, PsdState.INSTALLING, mkrk=1)

    assert store.open_intent(A) == intent
    record = store.get_psd(A)
    assert (record.state, record.mkrk_version, record.pending_mk_version) == (
        PsdState.INSTALLING, 1, 1,
    )
    assert store.complete_install(A, intent.intent_id, ACTOR).state is PsdState.ACTIVE


def test_reconcile_replacement_outcomes(store: Store) -> None:
    for psd_id in (A, B, C):
        card_in(store, psd_id, PsdState.REPLACEMENT_PENDING)
    intents = {p: store.open_intent(p) for p in (A, B, C)}

    _reconcile(store, A, PsdState.ACTIVE, mk=2, mkrk=1)  # new MK in, old deleted
    _reconcile(store, B, PsdState.ACTIVE, mk=1, mkrk=1)  # new MK never went in
    _reconcile(store, C, PsdState.REPLACEMENT_PENDING, mk=1, mkrk=1, pending=2)  # both present

    status = {p: store.get_intent(i.intent_id).status for p, i in intents.items() if i}
    assert status == {A: IntentStatus.DONE, B: IntentStatus.ABANDONED, C: IntentStatus.OPEN}
    assert [store.get_psd(p).mk_version for p in (A, B, C)] == [2, 1, 1]
    assert store.get_psd(C).state is PsdState.REPLACEMENT_PENDING
    intent_c = intents[C]
    assert intent_c is not None
    assert store.complete_replacement(C, intent_c.intent_id, ACTOR).mk_version == 2


def test_reconcile_refuses_what_no_card_or_journal_allows(store: Store) -> None:
    activate(store, A)
    register(store, B)
    card_in(store, C, PsdState.REPLACEMENT_PENDING)

    with pytest.raises(FailedPrecondition, match="no open replace intent"):
        _reconcile(store, A, PsdState.REPLACEMENT_PENDING, mk=1, mkrk=1, pending=2)
    with pytest.raises(FailedPrecondition, match="no cryptogram"):
        _reconcile(store, B, PsdState.ACTIVE, mk=1, mkrk=1)
    with pytest.raises(FailedPrecondition, match="not the open intent's target"):
        _reconcile(store, C, PsdState.REPLACEMENT_PENDING, mk=1, mkrk=1, pending=5)
    with pytest.raises(InvalidArgument, match="blank card"):
        _reconcile(store, A, PsdState.BLANK, mk=1)
    with pytest.raises(InvalidArgument, match="use revoke"):
        _reconcile(store, A, PsdState.REVOKED, mk=1, mkrk=1)
    with pytest.raises(InvalidArgument, match="unknown PSD state"):
        store.reconcile(
            A, state="lost", mk_version=None, mkrk_version=None,  # type: ignore[arg-type]
            event="probe", detail="", actor=ACTOR,
        )
    assert store.get_psd(A).state is PsdState.ACTIVE
    assert store.get_psd(B).state is PsdState.BLANK


def test_reconcile_without_intent_follows_the_card(store: Store) -> None:
    activate(store, A, mk=1)

    record = _reconcile(store, A, PsdState.ACTIVE, mk=4, mkrk=1)

    assert store.get_psd(A) == record
    assert store.get_psd(A).mk_version == 4
    assert store.history(A)[-1].event == "probe"


def test_start_contact_takes_the_lease_and_reads_what_the_contact_needs(
        store: Store, clock: FakeClock) -> None:
    register(store, A)
    blank = store.start_contact(A, "agent-1", 30)
    assert blank.leased and blank.intent is None and blank.cryptogram is None
    assert blank.psd.lease_holder == "agent-1" and blank.psd.last_contact is not None
    # Another agent meets the lease and changes nothing.
    other = store.start_contact(A, "agent-2", 30)
    assert not other.leased and other.psd.lease_holder == "agent-1"
    intent = store.begin_install(A, cryptogram=b"c" * 256, cryptogram_key_label=LABEL,
                                 mkrk_version=1, mk_version=2, actor=ACTOR)
    again = store.start_contact(A, "agent-1", 30)
    assert again.leased and again.intent is not None
    assert again.intent.intent_id == intent.intent_id
    assert again.cryptogram is not None and again.cryptogram.ciphertext == b"c" * 256
    assert again.cryptogram.key_label == LABEL
    # Past the lease's end, another agent takes the card over.
    clock.advance(31)
    assert store.start_contact(A, "agent-2", 30).leased
    assert store.start_contact(A, "agent-1", 30).leased is False
    intent = store.open_intent(A)
    assert intent is not None
    store.complete_install(A, intent.intent_id, ACTOR, release_lease_of="agent-1")
    assert store.get_psd(A).lease_holder == "agent-2"      # not agent-1's to give back
    with pytest.raises(NotFound):
        store.start_contact(B, "agent-1", 30)
