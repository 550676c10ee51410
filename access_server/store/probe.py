"""Checks of what a card probe reports to ``Store.reconcile``.

The flows describe a card by state and versions; these checks refuse
combinations no card can be in (InvalidArgument) and transient states that
no open intent explains (FailedPrecondition).
"""

from __future__ import annotations

from access_server.store.records import Intent, IntentKind, PsdRecord, PsdState
from cms.runtime.errors import FailedPrecondition, InvalidArgument


def check_shape(
    state: PsdState, mk_version: int | None, mkrk_version: int | None, pending: int | None
) -> None:
    """What a card in ``state`` can hold; anything else is a caller bug."""
    if state is PsdState.REVOKED:
        raise InvalidArgument("reconcile cannot revoke a card; use revoke")
    if state is PsdState.BLANK and (mk_version, mkrk_version, pending) != (None, None, None):
        raise InvalidArgument("a blank card holds no MK, no MKRK and nothing pending")
    if state is PsdState.INSTALLING and mk_version is not None:
        raise InvalidArgument("an installing card has no active MK yet (give it as pending)")
    if state in (PsdState.ACTIVE, PsdState.REPLACEMENT_PENDING) and (
        mk_version is None or mkrk_version is None
    ):
        raise InvalidArgument(f"a card in state {state.value} holds an MK and an MKRK")
    if state is PsdState.ACTIVE and pending is not None:
        raise InvalidArgument("an active card has nothing pending")
    if state is PsdState.REPLACEMENT_PENDING and pending is None:
        raise InvalidArgument("replacement_pending needs the pending MK version")


def check_transient(
    row: PsdRecord,
    intent: Intent | None,
    state: PsdState,
    mk_version: int | None,
    pending: int | None,
) -> int:
    """A transient state continues the open intent; returns the pending version."""
    kind = IntentKind.INSTALL if state is PsdState.INSTALLING else IntentKind.REPLACE
    if intent is None or intent.kind != kind.value:
        raise FailedPrecondition(
            f"PSD {row.psd_id} has no open {kind.value} intent; {state.value} needs one "
            "(journal it with begin_install/begin_replacement)"
        )
    if pending is not None and pending != intent.to_version:
        raise FailedPrecondition(
            f"pending MK v{pending} is not the open intent's target v{intent.to_version}"
        )
    if kind is IntentKind.REPLACE and mk_version != intent.from_version:
        raise FailedPrecondition(
            f"MK v{mk_version} is not the open intent's starting version v{intent.from_version}"
        )
    return intent.to_version
