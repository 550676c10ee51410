"""Flow B on the user's own PC: a card issued online personalized in its user's reader.

The seed's other embodiment (the user system, beside FIG. 5): the issuer
assigned a stock card to the user (``cms issue user ID --online``), the issuer
HSM made its payload (sealed to the card's device key, signed by the issuer
key, PIN and PUK inside and in the mailing file, claim 8), and the user got
the initialized card by post and a one-time activation code apart from it.
Their card agent (``cms card-agent --role user --activate``) sends the code
in its hello, inside the mutual TLS stream; this generator is then the whole
contact, on the same stream and driver as flow A (``card_channel``):

1. script 1: SELECT the issuance applet, GET DATA ``DF00``: the card's
   serial, life cycle and device key, read from the card itself;
2. the activation bound to that serial (``Store.activation_for``): the card
   must hold the device key the stock recorded for the serial; the
   activation must not be locked, spent or expired; the code must match its
   salted hash (a wrong one counts, the last allowed locks it);
3. the card must be ``initialized`` (or, on a retry after a lost answer,
   ``personalized`` by this very payload);
4. the code is used up (``activation_sent``), then script 2: PERSONALIZE
   with the payload; the card checks the issuer's signature and the binding
   itself (docs/issuance-applet.md);
5. its answer (``cardcore.issuance.personalize_answer``) is recorded
   (``activation_done``): personalized in the issuer's records and the
   stock, or failed with the card's status word and quarantined.

A card that took the payload and whose answer was lost answers ``6A89`` to
the same payload: the next contact with the same code and card completes.
The access server never sees the user private key, the PIN or the PUK: they
travel only inside the payload, which only the card opens.

Every ending has a reason (``REASONS``, the table in docs/flows.md), counted
in ``cms_access_contacts_total`` beside flow A's.
"""

from __future__ import annotations

import logging

from access_server import activation
from access_server import outcomes as why
from access_server.activation import CodeHash
from access_server.flows import CARD_GONE, FlowContext, FlowError, SessionGen, probe_stopped
from access_server.outcomes import Reason
from access_server.store import ActivationRecord, ActivationState
from access_server.store.validate import MAX_DETAIL
from cardcore import gp
from cardcore import issuance as I
from cardcore.issuance_keys import rsa_spki
from cardcore.sw import SW
from cms.runtime.errors import ServiceError
from cms.runtime.logs import fields
from cms.v1 import card_channel_pb2 as cpb

log = logging.getLogger("access_server.user_perso")

READ_SCRIPT = 1
PERSONALIZE_SCRIPT = 2

REASONS: dict[str, Reason] = {}


def _reason(code: str, outcome: int) -> Reason:
    REASONS[code] = Reason(code, outcome, recorded=False)
    return REASONS[code]


_REFUSED, _FAILED = cpb.SessionDone.REFUSED, cpb.SessionDone.FAILED
CODE_WRONG = _reason("code_wrong", _REFUSED)
"""The code is not the one of the card's activation (a try spent)."""
CODE_LOCKED = _reason("code_locked", _REFUSED)
"""Too many wrong codes: the activation is locked for good."""
CODE_EXPIRED = _reason("code_expired", _REFUSED)
CODE_USED = _reason("code_used", _REFUSED)
"""The code was used: the card took its payload, or refused it."""
NOT_BOUND = _reason("not_bound", _REFUSED)
"""The card in the reader is not one issued online (another card than the code's)."""
NOT_INITIALIZED = _reason("not_initialized", _REFUSED)
"""The card is in factory, blocked, or personalized otherwise."""
PAYLOAD_REFUSED = _reason("payload_refused", _FAILED)
"""The card refused its payload with a status word (recorded; the card is quarantined)."""
for _shared in (why.DONE, why.CARD_ABSENT, why.UNAVAILABLE, why.REGISTRY_MOVED,
                why.REGISTRY_REFUSED, why.PROBE_REFUSED, why.PROBE_MALFORMED, why.AGENT_ERROR):
    REASONS[_shared.code] = _shared
"""Flow A's reasons this flow ends with too, meaning the same."""


def _ok() -> list[cpb.ExpectedStatus]:
    return [cpb.ExpectedStatus(value=SW.OK, mask=0xFFFF)]


def read_script() -> cpb.ApduScript:
    return cpb.ApduScript(script_id=READ_SCRIPT, commands=[
        cpb.ScriptCommand(apdu=gp.select_command(I.ISSUANCE_AID), expect=_ok()),
        cpb.ScriptCommand(apdu=I.get_data(I.Tag.ALL), expect=_ok())])


def personalize_script(payload: bytes) -> cpb.ApduScript:
    """PERSONALIZE, marked sensitive (the agent logs its header and status word only);
    ``6A89`` is expected too: the card holds this payload since an earlier contact."""
    return cpb.ApduScript(script_id=PERSONALIZE_SCRIPT, commands=[cpb.ScriptCommand(
        apdu=I.personalize(payload), sensitive=True,
        expect=[*_ok(), cpb.ExpectedStatus(value=SW.ALREADY_EXISTS, mask=0xFFFF)])])


def parse_card(result: cpb.ScriptResult) -> I.CardData:
    """The card's public data from script 1's result; FlowError when there is none."""
    responses = list(result.responses)
    if len(responses) == 2 and all(r.sw == SW.OK for r in responses):
        try:
            return I.decode_card_data(bytes(responses[1].data))
        except I.IssuanceError as exc:
            raise FlowError(why.PROBE_MALFORMED, f"the card's data is malformed ({exc})") \
                from None
    raise probe_stopped(result, ("SELECT of the issuance applet", "GET DATA DF00"),
                        "not a card with the issuance applet")


def bound_activation(ctx: FlowContext, card: I.CardData) -> ActivationRecord:
    """The activation of the card in the reader: by its serial, and its device key."""
    if card.serial is None or card.device_public_key is None:
        raise FlowError(NOT_INITIALIZED, f"the card is {card.life_cycle.name.lower()}, "
                                         "without its serial and keys: not initialized")
    found = ctx.store.activation_for(card.serial)
    if found is None:
        raise FlowError(NOT_BOUND, f"card {card.serial} was not issued online: the code is "
                                   "for another card (the one the issuer sent with it)")
    if rsa_spki(card.device_public_key) != found.device_public_key:
        raise FlowError(NOT_BOUND, f"the card in the reader says serial {card.serial} but "
                                   "holds another device key than the issuer's card of that "
                                   "serial")
    return found


def check_code(ctx: FlowContext, found: ActivationRecord, code: str) -> None:
    """The activation may be used, and the code is its own; a wrong code counts."""
    serial = found.serial
    if found.state is ActivationState.LOCKED:
        raise FlowError(CODE_LOCKED, f"the activation of card {serial} is locked after "
                                     f"{found.failures} wrong codes: ask the issuer for a new "
                                     "issuance")
    if found.state in (ActivationState.PERSONALIZED, ActivationState.FAILED):
        raise FlowError(CODE_USED, f"the activation code of card {serial} was used "
                                   f"({found.state.value}: {found.reason})")
    waiting = found.state is ActivationState.WAITING
    if waiting and found.expired:
        ctx.store.activation_expired(serial)
    if found.state is ActivationState.EXPIRED or (waiting and found.expired):
        raise FlowError(CODE_EXPIRED, f"the activation code of card {serial} expired at "
                                      f"{found.expires.isoformat(timespec='minutes')}: ask "
                                      "the issuer for a new issuance (recorded: the card is "
                                      "quarantined)")
    if activation.matches(code, CodeHash(found.code_salt, found.code_hash)):
        return
    if not waiting:   # used up already: a wrong code completes nothing, and spends nothing
        raise FlowError(CODE_WRONG, f"wrong activation code for card {serial}")
    left = ctx.store.code_failed(serial)
    if left == 0:
        raise FlowError(CODE_LOCKED, f"wrong activation code for card {serial}; that was the "
                                     f"last try: the activation is locked")
    raise FlowError(CODE_WRONG, f"wrong activation code for card {serial}: {left} "
                                f"{'try' if left == 1 else 'tries'} left")


def check_life_cycle(card: I.CardData, found: ActivationRecord) -> None:
    if card.life_cycle is I.LifeCycle.INITIALIZED:
        return
    if card.life_cycle is I.LifeCycle.PERSONALIZED and found.state is ActivationState.SENT:
        return   # the payload went last time: the card answers 6A89 if it took it
    raise FlowError(NOT_INITIALIZED, f"card {found.serial} is "
                                     f"{card.life_cycle.name.lower()}, not initialized: it "
                                     "cannot take its payload")


def _answer(result: cpb.ScriptResult, serial: str) -> int:
    """PERSONALIZE's status word; FlowError (retry) when the card gave none."""
    if result.responses:
        return result.responses[0].sw
    if result.outcome in CARD_GONE:
        raise FlowError(why.CARD_ABSENT,
                        f"the card went away during PERSONALIZE "
                        f"({result.message or 'no answer'}); the same code on the same card "
                        f"finishes it (card {serial})")
    raise FlowError(why.AGENT_ERROR, f"no answer to PERSONALIZE: "
                                     f"{result.message or 'the agent sent none'}")


def personalize_online(ctx: FlowContext, code: str) -> SessionGen:
    """One contact of the user's PC that holds an activation code (see the module)."""
    result = yield read_script()
    card = parse_card(result)
    found = bound_activation(ctx, card)
    serial = found.serial
    ctx.step(f"B user PC: card {serial} read from the card ({card.life_cycle.name.lower()}), "
             f"issued online; its device key is the stock's")
    check_code(ctx, found, code)
    check_life_cycle(card, found)
    ctx.step("B user PC: activation code checked against its salted hash; used up from now")
    ctx.store.activation_sent(serial)
    result = yield personalize_script(found.payload)
    sw = _answer(result, serial)
    answer = I.personalize_answer(sw)
    ctx.store.activation_done(serial, answer.done, f"{sw:04X} {answer.reason}")
    if not answer.done:
        raise FlowError(PAYLOAD_REFUSED, f"card {serial} refused its payload "
                                         f"({SW.describe(sw)}: {answer.reason}); recorded, "
                                         f"the card is quarantined")
    ctx.step(f"B4 card {serial} validated the issuer's signature and the binding, decrypted "
             f"the user private key and the device authentication key ({sw:04X}: "
             f"{answer.reason}); recorded personalized")
    return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=serial, reason=why.DONE.code,
                           message=f"card {serial} personalized; the PIN and PUK come by "
                                   f"letter")


def user_pc_session(ctx: FlowContext, code: str) -> SessionGen:
    """``personalize_online``, every ending a SessionDone with its reason (never raises)."""
    try:
        done = yield from personalize_online(ctx, code)
    except FlowError as exc:
        done = cpb.SessionDone(outcome=exc.outcome, message=exc.message[:MAX_DETAIL],
                               reason=exc.reason.code)
    except ServiceError as exc:
        reason = why.UNAVAILABLE if exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") \
            else why.REGISTRY_MOVED if exc.code.name == "ABORTED" else why.REGISTRY_REFUSED
        done = cpb.SessionDone(outcome=reason.outcome, message=exc.message,
                               reason=reason.code)
    done.steps.extend(ctx.steps)
    log.info("user PC contact", extra=fields(serial=done.psd_id, reason=done.reason))
    reason = REASONS[done.reason]
    why.CONTACTS.labels(cpb.SessionDone.Outcome.Name(done.outcome), reason.code,
                        reason.next.value).inc()
    return done
