"""One card contact of flow A (seed 000) as a generator of APDU scripts.

``card_session`` yields ``ApduScript`` messages and receives the agent's
``ScriptResult`` for each; it returns the ``SessionDone`` to send. It does no
stream I/O, so the card channel servicer drives it over gRPC and tests can
drive it directly. Card keys are never here: every secured command comes
wrapped from the proxy's CardKeys service, which derives the card's key sets
inside the HSM and keeps R and the session keys (see docs/threat-model.md).

Round trips: script 1 probes the card (SELECT, CPLC, key information,
INITIALIZE UPDATE); script 2 is the whole secured part (EXTERNAL
AUTHENTICATE, PUT KEYs, DELETE KEY). What the server is about to do is
journaled before script 2 is sent, and only once the card has proven, in
this contact, that it holds the keys of the channel: the proxy opens the
channel only if the card cryptogram in the card's INITIALIZE UPDATE answer
(to this contact's fresh host challenge) verifies, so an agent replaying a
card's CPLC, or an old answer, gets no registry write at all. An
installation (``Store.begin_install``) is journaled after the proxy has
prepared script 2, so the cryptogram of a new MKRK is durable before the
card can hold that MKRK; a user PC's contact only reads the registry
(``Store.read_contact``) until the MKRK channel is open, then takes the
card's lease and journals a campaign replacement in one transaction
(``Store.start_contact(seen=..., journal=True)``). A contact that fails
midway leaves the intent open; the next contact's probe shows what the card
holds, and the session finishes the intent from there.

Each channel opens at the security level chosen for the card from the "i"
its INITIALIZE UPDATE answer announces and the configured policy
(``access_server.levels``). Every ending has a reason (``access_server.outcomes``):
retry later, or needs an operator; a needs-an-operator ending that is the
card's own, found once the card has proven its keys in this contact, flags
the card in the registry (``Store.flag_attention``) so that no campaign picks
it until an operator clears it.

Steps are reported to the agent (``SessionDone.steps``) in the seed's words.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import grpc

from access_server import outcomes as why
from access_server.levels import LevelPolicy, level_name
from access_server.masters import MasterUnusable
from access_server.outcomes import Reason
from access_server.store import ContactStart, Intent, IntentKind, PsdRecord, PsdState, Store
from access_server.store.validate import MAX_DETAIL
from cardcore import gp
from cardcore.ins import Ins
from cardcore.psd import MK_KVNS, Kvn, psd_id_bytes, psd_id_from_cplc
from cardcore.scp03 import (
    SCP_ID,
    InitializeUpdateResponse,
    Scp03Error,
    SecurityLevel,
    describe_i,
    offered_security_levels,
)
from cardcore.sw import SW
from cms.keynames import (
    FACTORY_TRANSPORT_MASTER,
    HSM1_TOKEN,
    MK,
    MKRK,
    cryptogram_label,
    mk_label,
    mkrk_label,
)
from cms.runtime.errors import ServiceError
from cms.runtime.logs import fields
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import card_keys_pb2 as kpb

log = logging.getLogger("access_server.flows")

HOST_CHALLENGE_BYTES = 8
PROXY_TIMEOUT_S = 30.0
CARD_KEY_LENGTH = 16
"""Bytes of each key of the card key sets the flow asks the proxy for (AES-128)."""
CLEAR_ATTENTION = "cms psd clear-attention {psd_id} --note TEXT"

SessionGen = Generator[cpb.ApduScript, cpb.ScriptResult, cpb.SessionDone]


@dataclass
class FlowContext:
    """What one contact needs: the store, the proxy's CardKeys stub, who and which versions."""

    store: Store
    card_keys: object                 # channel_opener.ChannelOpener or a stand-in
    install_versions: Callable[[], tuple[int, int, int]]   # (mk, mkrk, cryptogram key) versions
    actor: str
    lease_holder: str
    lease_seconds: float = 120.0
    # (kind, version) -> None, or FailedPrecondition when key management did not
    # transfer that version to HSM1 (access_server.masters); None: not checked.
    require_usable: Callable[[str, int], None] | None = None
    steps: list[str] = field(default_factory=list)
    # Set once this contact holds the card's lease.
    leased: bool = False
    # Set when the store released the lease with the session's last write.
    lease_released: bool = False
    # What the registry said to this contact (card_session sets it before a flow runs).
    contact: ContactStart | None = None
    # Which security level a channel opens at (card_channel settings).
    levels: LevelPolicy = field(default_factory=LevelPolicy)
    # The security domain the card's SELECT answer names: its pseudo-random
    # challenges are made for it.
    card_aid: bytes | None = None

    def step(self, text: str) -> None:
        # The agent receives the steps, and the registry's history records each
        # card's begun and completed intents; at info level, one line per step
        # of every contact would cost the fleet more than it tells the operator.
        self.steps.append(text)
        log.debug("step", extra=fields(step=text))


class FlowError(Exception):
    """The contact ends for this reason, with this message (nothing half-done is hidden).

    The reason (``access_server.outcomes``) gives the outcome and says whether
    the card is flagged for an operator; a reason that is recorded is raised
    only once the card has proven its keys in this contact.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.outcome = reason.outcome
        self.message = message


@dataclass(frozen=True)
class Probe:
    psd_id: str
    kvns: frozenset[int]
    initialize_update: bytes | None   # the response data, when INITIALIZE UPDATE succeeded
    # The security domain named by the SELECT answer (None: it named none).
    aid: bytes | None = None
    # INITIALIZE UPDATE's status word; None when the card gave no answer to it.
    initialize_update_sw: int | None = None
    script_outcome: int = cpb.SCRIPT_COMPLETED

    @property
    def mk_kvns(self) -> set[int]:
        return {k for k in self.kvns if k in MK_KVNS}


def _expect_ok() -> list[cpb.ExpectedStatus]:
    return [cpb.ExpectedStatus(value=SW.OK, mask=0xFFFF)]


def probe_script(kvn: int, host_challenge: bytes) -> cpb.ApduScript:
    commands = [gp.select_command(), gp.get_data_command(gp.TAG_CPLC),
                gp.get_data_command(gp.TAG_KEY_INFORMATION),
                gp.initialize_update_command(kvn, host_challenge)]
    return cpb.ApduScript(script_id=1, commands=[
        cpb.ScriptCommand(apdu=apdu, expect=_expect_ok()) for apdu in commands])


CARD_GONE = frozenset({cpb.SCRIPT_CARD_REMOVED, cpb.SCRIPT_READER_ERROR})
"""Script outcomes that say the card (or its reader) went away: the next contact retries."""


def probe_stopped(result: cpb.ScriptResult, names: Sequence[str], refused: str) -> FlowError:
    """Why a probe of one command per name stopped short: a status word (``refused`` says
    what that makes the card), the card gone, or no answer from the agent."""
    responses = list(result.responses)
    where = next((i for i, r in enumerate(responses[:len(names)]) if r.sw != SW.OK),
                 len(responses))
    name = names[min(where, len(names) - 1)]
    if where < len(responses):
        return FlowError(why.PROBE_REFUSED,
                         f"card probe refused at {name} ({SW.describe(responses[where].sw)}): "
                         f"{result.message or refused}")
    if result.outcome in CARD_GONE:
        return FlowError(why.CARD_ABSENT, f"the card went away during the probe, at {name} "
                                          f"({result.message or 'no answer'})")
    return FlowError(why.AGENT_ERROR, f"card probe failed at {name} (no answer): "
                                      f"{result.message or 'the agent sent no answer'}")


def parse_probe(result: cpb.ScriptResult) -> Probe:
    """PSD id, key versions and INITIALIZE UPDATE response from script 1's result."""
    responses = list(result.responses)
    if len(responses) < 3 or any(r.sw != SW.OK for r in responses[:3]):
        raise probe_stopped(result, ("SELECT", "GET DATA CPLC", "GET DATA key information"),
                            "not a card this server manages")
    try:
        psd_id = psd_id_from_cplc(gp.unwrap_get_data(gp.TAG_CPLC, responses[1].data))
    except (ValueError, gp.GpError) as exc:
        raise FlowError(why.PROBE_MALFORMED,
                        f"the card's CPLC is malformed ({exc})") from None
    try:
        infos = gp.parse_key_information(responses[2].data)
    except (ValueError, gp.GpError) as exc:
        raise FlowError(why.PROBE_MALFORMED,
                        f"PSD {psd_id}: key information is malformed ({exc})") from None
    try:
        aid: bytes | None = gp.parse_select_response(responses[0].data)
    except (ValueError, gp.GpError):
        aid = None       # the proxy then checks pseudo-random challenges against the ISD
    iu_sw = responses[3].sw if len(responses) > 3 else None
    iu = responses[3].data if iu_sw == SW.OK else None
    return Probe(psd_id, frozenset(i.kvn for i in infos), iu, aid=aid,
                 initialize_update_sw=iu_sw, script_outcome=result.outcome)


def _unanswered(probe: Probe, psd_id: str, key_set: str) -> FlowError:
    """Why ``key_set`` gave no INITIALIZE UPDATE answer: the card left, or has no such
    key set (6A88), or refused (the card proved nothing: none of it is recorded)."""
    sw = probe.initialize_update_sw
    if sw is None:
        if probe.script_outcome in CARD_GONE:
            return FlowError(why.CARD_ABSENT, f"PSD {psd_id}: the card went away before "
                                              f"{key_set} answered INITIALIZE UPDATE")
        return FlowError(why.AGENT_ERROR, f"PSD {psd_id}: the agent sent no answer to "
                                          f"INITIALIZE UPDATE for {key_set}")
    if sw == SW.REFERENCED_DATA_NOT_FOUND:
        return FlowError(why.KEY_SET_MISSING,
                         f"PSD {psd_id}: {key_set} did not answer INITIALIZE UPDATE "
                         f"({SW.describe(sw)}): the card has no such key set")
    return FlowError(why.PROBE_REFUSED, f"PSD {psd_id}: {key_set} did not answer INITIALIZE "
                                        f"UPDATE ({SW.describe(sw)})")


def _initialize_update(probe: Probe, psd_id: str, kvn: int, what: str
                       ) -> InitializeUpdateResponse:
    """The card's INITIALIZE UPDATE answer, parsed; the flow's FlowError if it is not an
    SCP03 answer for key set ``kvn``."""
    data = probe.initialize_update
    assert data is not None
    if len(data) >= 13 and data[11] != SCP_ID:
        raise FlowError(why.SCP_VERSION, f"{what}: PSD {psd_id} answered INITIALIZE UPDATE "
                                         f"with SCP{data[11]:02X}; this server speaks SCP03")
    try:
        iu = InitializeUpdateResponse.parse(data)
    except Scp03Error as exc:
        raise FlowError(why.PROBE_MALFORMED, f"{what}: PSD {psd_id}'s INITIALIZE UPDATE "
                                             f"answer is malformed ({exc})") from None
    if iu.kvn != kvn:
        raise FlowError(why.SCP_VERSION, f"{what}: PSD {psd_id} answered INITIALIZE UPDATE "
                                         f"with key version {iu.kvn:02X}, not {kvn:02X}")
    return iu


def _prove_keys(ctx: FlowContext, probe: Probe, key_set: kpb.KeySetSpec, kvn: int,
                host_challenge: bytes, level: int, what: str) -> None:
    """Have the card prove, in this contact, that it holds ``key_set``: the proxy opens a
    channel with no command only if the card cryptogram of this contact's host challenge
    verifies (FlowError otherwise). Nothing is sent to the card."""
    _open_channel(ctx, kpb.OpenSecureChannelRequest(
        key_set=key_set, kvn=kvn, host_challenge=host_challenge,
        initialize_update_response=probe.initialize_update, security_level=level), what)


def _security_level(ctx: FlowContext, probe: Probe, psd_id: str, key_set: kpb.KeySetSpec,
                    kvn: int, host_challenge: bytes, what: str) -> int:
    """The level this contact's channel opens at: the highest the card's "i" offers within
    the policy (``access_server.levels``).

    A card that offers less than the minimum gets no channel and nothing written
    to it: it proves its keys first (a channel with no command), so that only the
    real card can be flagged, and the contact ends with SECURITY_LEVEL, which the
    card keeps until an operator clears it (a lower minimum, or another card).
    """
    iu = _initialize_update(probe, psd_id, kvn, what)
    level = ctx.levels.choose(iu.i)
    if ctx.levels.acceptable(level):
        return level
    _prove_keys(ctx, probe, key_set, kvn, host_challenge, level, what)
    offered = max(offered_security_levels(iu.i), key=lambda lv: (bin(lv).count("1"), lv))
    raise FlowError(why.SECURITY_LEVEL,
                    f"PSD {psd_id} announces {describe_i(iu.i)}: it offers at most level "
                    f"{level_name(offered)}, and its channel must have at least "
                    f"{level_name(ctx.levels.minimum)} ({ctx.levels.describe()}); "
                    f"nothing was written to the card")


def _spec_diversified(master: str, psd_id: str) -> kpb.KeySetSpec:
    return kpb.KeySetSpec(token=HSM1_TOKEN, key_length=CARD_KEY_LENGTH,
                          diversified=kpb.Diversified(master_label=master,
                                                      element=psd_id_bytes(psd_id)))


def _put(spec: kpb.KeySetSpec, kvn: int, replace: bool) -> kpb.ChannelCommand:
    return kpb.ChannelCommand(put_key_set=kpb.PutKeySet(key_set=spec, new_kvn=kvn,
                                                        replace_kvn=kvn if replace else 0),
                              expect=_expect_ok())


def _delete(kvn: int) -> kpb.ChannelCommand:
    return kpb.ChannelCommand(apdu=gp.delete_key_command(kvn), expect=_expect_ok())


PROXY_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
# FAILED_PRECONDITION messages of CardKeys.OpenSecureChannel about the card itself.
CARD_CRYPTOGRAM_MISMATCH = "card cryptogram mismatch"
CARD_CHALLENGE_MISMATCH = "card challenge mismatch"


def _proxy_reason(code: grpc.StatusCode | None, details: str) -> Reason:
    if code in PROXY_TRANSIENT:
        return why.UNAVAILABLE
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return why.PROXY_REFUSED
    if code == grpc.StatusCode.NOT_FOUND:
        return why.HSM_KEY_MISSING
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if details.startswith(CARD_CRYPTOGRAM_MISMATCH):
            return why.CARD_CRYPTOGRAM
        if details.startswith(CARD_CHALLENGE_MISMATCH):
            return why.CARD_CHALLENGE
    return why.PROXY_ERROR


def _proxy_error(exc: grpc.RpcError, what: str) -> FlowError:
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return FlowError(_proxy_reason(code, details),
                     f"{what}: HSM proxy answered {name}: {details}")


def _open_channel(ctx: FlowContext, request: kpb.OpenSecureChannelRequest,
                  what: str) -> kpb.OpenSecureChannelResponse:
    """Open the channel in the proxy with its answers foreseen (predict_responses).

    These scripts only ever expect 9000, so the HSM knows every successful
    answer in advance: the session keys then live for this one call, and the
    card's answers are checked here by comparison (``_check_answers``) instead
    of a second proxy call that would also have to release the channel.
    """
    request.predict_responses = True
    if ctx.card_aid is not None:
        request.aid = ctx.card_aid
    try:
        return ctx.card_keys.OpenSecureChannel(request, timeout=PROXY_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise _proxy_error(exc, what) from None


def _secured_script(opened: kpb.OpenSecureChannelResponse, script_id: int = 2,
                    then: bytes | None = None) -> cpb.ApduScript:
    """The channel's commands as the agent runs them; ``then``: one plain command after
    them (the INITIALIZE UPDATE of the next channel, saving a round trip)."""
    script = cpb.ApduScript(script_id=script_id, commands=[
        cpb.ScriptCommand(apdu=c.apdu, expect=list(c.expect), sensitive=True)
        for c in opened.commands])
    if then is not None:
        script.commands.append(cpb.ScriptCommand(apdu=then, expect=_expect_ok()))
    return script


def _channel_level(opened: kpb.OpenSecureChannelResponse) -> int:
    """The level the channel was opened at: P1 of its EXTERNAL AUTHENTICATE."""
    return opened.commands[0].apdu[2] if opened.commands and len(opened.commands[0].apdu) > 2 \
        else 0


def _check_answers(opened: kpb.OpenSecureChannelResponse, result: cpb.ScriptResult,
                   psd_id: str) -> list[cpb.ApduResponse]:
    """The card's answers against those the HSM foresaw; returns them in plain form.

    An answer equal to its foreseen bytes (constant-time comparison) is the
    success the HSM computed at the channel's level, with the plain data it
    knew (a PUT KEY's KVN and KCVs): R-MAC included at 11, 13 and 33, the plain
    data and status word below. A bare status word without data is where the
    card stopped: an error (never protected, Amendment D), or any status at all
    for EXTERNAL AUTHENTICATE (its answer is never protected) and in a channel
    without R-MAC. Anything else did not come from a card holding the
    channel's keys, or the card installed keys with other KCVs: the contact
    fails, and is not recorded on the card, since what failed its check is not
    the card's word.
    """
    r_mac = bool(_channel_level(opened) & SecurityLevel.R_MAC)
    plain = []
    for index, (wrapped, answer) in enumerate(zip(opened.commands, result.responses,
                                                  strict=False)):
        # card_channel already refused status words beyond 16 bits.
        got = bytes(answer.data) + answer.sw.to_bytes(2, "big")
        if hmac.compare_digest(got, bytes(wrapped.expected_response)):
            plain.append(cpb.ApduResponse(data=wrapped.expected_put_key_response, sw=answer.sw))
        elif answer.sw != SW.OK and not answer.data and (
                not SW.is_protected(answer.sw) or index == 0 or not r_mac):
            plain.append(cpb.ApduResponse(sw=answer.sw))
        else:
            raise FlowError(why.ANSWER_MISMATCH,
                            f"PSD {psd_id}: the answer to secured command {index} is not the "
                            f"one the HSM foresaw (its R-MAC does not verify, or a PUT KEY "
                            f"returned other key check values)")
    return plain


def _secured_name(opened: kpb.OpenSecureChannelResponse, index: int) -> str:
    """What secured command ``index`` is, from what travels in clear (header, PUT KEY info)."""
    if index == 0:
        return f"EXTERNAL AUTHENTICATE at level {level_name(_channel_level(opened))}"
    put = next((p for p in opened.put_keys if p.index == index), None)
    if put is not None:
        return f"PUT KEY (KVN {put.new_kvn:02X})"
    apdu = bytes(opened.commands[index].apdu) if index < len(opened.commands) else b""
    if len(apdu) > 1 and apdu[1] == Ins.DELETE:
        return "DELETE KEY"
    return f"secured command {index}"


def _check_complete(opened: kpb.OpenSecureChannelResponse, result: cpb.ScriptResult,
                    plain: list[cpb.ApduResponse], psd_id: str) -> None:
    """Every command answered 9000 (each PUT KEY with the KCVs the HSM expects).

    A card that refused a command with a status word refuses the same script
    at every contact: that needs an operator, and is recorded on the card (it
    proved its keys when the channel opened). A card that went away, or lost
    the session between the two scripts (6985 to EXTERNAL AUTHENTICATE: no
    INITIALIZE UPDATE in progress any more), is finished by the next contact.
    """
    if (result.outcome == cpb.SCRIPT_COMPLETED and len(plain) == len(opened.commands)
            and all(p.sw == SW.OK for p in plain)):
        return
    total = len(opened.commands)
    refused = next(((i, p.sw) for i, p in enumerate(plain) if p.sw != SW.OK), None)
    if refused is not None:
        index, sw = refused
        name = _secured_name(opened, index)
        if index == 0 and sw == SW.CONDITIONS_NOT_SATISFIED:
            raise FlowError(why.CARD_ABSENT,
                            f"PSD {psd_id}: the card lost the session before {name} "
                            f"({SW.describe(sw)}: reset between the scripts); the next "
                            f"contact starts afresh")
        raise FlowError(why.CARD_REFUSED,
                        f"PSD {psd_id}: the card refused {name} ({SW.describe(sw)}), "
                        f"secured command {index + 1} of {total}; it would refuse it again "
                        f"at every contact")
    if result.outcome in CARD_GONE:
        raise FlowError(why.CARD_ABSENT,
                        f"PSD {psd_id}: the card stopped at secured command "
                        f"{len(result.responses)} of {total} "
                        f"({result.message or 'no detail'}); the next contact finishes it")
    raise FlowError(why.AGENT_ERROR,
                    f"PSD {psd_id}: the agent ran {len(result.responses)} of {total} secured "
                    f"commands ({cpb.ScriptOutcome.Name(result.outcome)}: "
                    f"{result.message or 'no detail'})")


def _take_lease(ctx: FlowContext, psd_id: str, *, journal: bool = False) -> ContactStart:
    """Take the card's lease once the card has proven its keys in this contact.

    With ``journal``, the campaign replacement ``read_contact`` found is
    journaled in the same transaction. The registry must still be as this
    contact read it (else Aborted, and the contact ends RETRY_LATER).
    """
    start = ctx.store.start_contact(psd_id, ctx.lease_holder, ctx.lease_seconds,
                                    seen=ctx.contact, journal=journal, actor=ctx.actor)
    if not start.leased:
        raise FlowError(why.CARD_BUSY, f"PSD {psd_id} is in another session right now")
    ctx.leased = True
    ctx.contact = start
    return start


def _versions_text(kvns: frozenset[int]) -> str:
    return ", ".join(f"{k:02X}" for k in sorted(kvns)) or "none"


def _open_intent(ctx: FlowContext, psd_id: str) -> Intent | None:
    return ctx.contact.intent if ctx.contact is not None else ctx.store.open_intent(psd_id)


def _mkrk_from_cryptogram(ctx: FlowContext, psd_id: str, mkrk_version: int,
                          fresh: tuple[str, bytes] | None = None) -> kpb.KeySetSpec:
    """The card's MKRK set, re-derived in HSM1 from its stored cryptogram (claims 18-20).

    ``fresh``: (key label, cryptogram) just journaled in this contact, which
    the contact's cached read of the registry predates.
    """
    if fresh is None:
        known = ctx.contact.cryptogram if ctx.contact is not None else None
        cryptogram = known if known is not None else ctx.store.get_cryptogram(psd_id)
        fresh = (cryptogram.key_label, cryptogram.ciphertext)
    return kpb.KeySetSpec(
        token=HSM1_TOKEN, key_length=CARD_KEY_LENGTH,
        from_cryptogram=kpb.FromCryptogram(
            master_label=mkrk_label(mkrk_version),
            private_key_label=fresh[0], cryptogram=fresh[1]))


# -- A1: initial installation -------------------------------------------------------

def install(ctx: FlowContext, psd: PsdRecord, probe: Probe, host_challenge: bytes) -> SessionGen:
    """DESIGN A1 / claims 1-14, 29-34 at a personalization station."""
    psd_id = psd.psd_id
    intent = _open_intent(ctx, psd_id)
    if Kvn.TRANSPORT not in probe.kvns:
        if (intent is not None and Kvn.MKRK in probe.kvns
                and probe.mk_kvns == {intent.to_version}):
            ctx.store.reconcile(psd_id, state=PsdState.ACTIVE, mk_version=intent.to_version,
                                mkrk_version=intent.mkrk_version, event="reconciled",
                                detail="the card finished the installation last contact",
                                actor=ctx.actor)
            ctx.step(f"A1 reconciled: PSD {psd_id} holds MKRK and MK v{intent.to_version}; "
                     f"transport keys already retired")
            return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=psd_id,
                                   message="installation confirmed")
        if psd.state is PsdState.ACTIVE:
            return cpb.SessionDone(outcome=cpb.SessionDone.NOTHING_TO_DO, psd_id=psd_id,
                                   message="card already keyed")
        raise FlowError(why.KEY_SET_MISSING,
                        f"PSD {psd_id} has no transport keys and holds key versions "
                        f"{_versions_text(probe.kvns)}, which the server did not install")
    if probe.initialize_update is None:
        raise _unanswered(probe, psd_id, "the transport keys")
    level = _security_level(ctx, probe, psd_id,
                            _spec_diversified(FACTORY_TRANSPORT_MASTER, psd_id),
                            Kvn.TRANSPORT, host_challenge, "opening the transport channel")
    ctx.step(f"A1.1 PSD id {psd_id} read from the card (CPLC) and sent to HSM1")
    resuming = intent is not None and (Kvn.MKRK in probe.kvns or bool(probe.mk_kvns))
    if resuming:
        mk_version, mkrk_version = intent.to_version, intent.mkrk_version
        mkrk_spec = _mkrk_from_cryptogram(ctx, psd_id, mkrk_version)
        ctx.step("A1 resumed: the card holds part of an earlier installation; its MKRK is "
                 "re-derived from the stored cryptogram")
    else:
        mk_version, mkrk_version, cryptogram_version = ctx.install_versions()
        mkrk_spec = kpb.KeySetSpec(
            token=HSM1_TOKEN, key_length=CARD_KEY_LENGTH,
            new_random=kpb.NewRandom(master_label=mkrk_label(mkrk_version),
                                     public_key_label=cryptogram_label(cryptogram_version)))
    mk_spec = _spec_diversified(mk_label(mk_version), psd_id)
    if resuming and Kvn.MKRK in probe.kvns:
        assert intent is not None
        return (yield from _resume_through_mkrk(ctx, psd_id, intent, probe, mkrk_spec,
                                                mk_spec, level))
    # An MKRK no open intent explains (an operator abandoned its installation):
    # the transport channel replaces only the MKRK, since a card that holds one
    # may allow MK changes only under it; the MK follows through the MKRK channel.
    mkrk_first = not resuming and Kvn.MKRK in probe.kvns
    commands = [_put(mkrk_spec, Kvn.MKRK, Kvn.MKRK in probe.kvns)]
    if not mkrk_first:
        commands += [_put(mk_spec, mk_version, mk_version in probe.kvns),
                     _delete(Kvn.TRANSPORT)]
    request = kpb.OpenSecureChannelRequest(
        key_set=_spec_diversified(FACTORY_TRANSPORT_MASTER, psd_id),
        kvn=Kvn.TRANSPORT, host_challenge=host_challenge,
        initialize_update_response=probe.initialize_update, security_level=level,
        commands=commands)
    opened = _open_channel(ctx, request, "opening the transport channel")
    if not resuming:
        ctx.step("A1.2 HSM1 generated R and diversified the MKRK block with it "
                 "(R stays inside the HSM proxy)")
        ctx.step("A1.3 HSM1 encrypted R with the public key: the cryptogram")
        found = [c.cryptogram for c in opened.cryptograms if c.position == 1]
        if len(found) != 1:
            raise FlowError(why.PROXY_ERROR, "the proxy returned no cryptogram")
        intent = ctx.store.begin_install(
            psd_id, cryptogram=found[0],
            cryptogram_key_label=cryptogram_label(cryptogram_version),
            mkrk_version=mkrk_version, mk_version=mk_version, actor=ctx.actor,
            card_holds_transport_keys=psd.state is PsdState.INSTALLING)
        ctx.step(f"A1.4 cryptogram stored for PSD {psd_id} before anything is written "
                 f"to the card; R deleted")
    if not mkrk_first:      # else the MK is diversified for the MKRK channel
        ctx.step(f"A1.5 HSM1 diversified MK block v{mk_version} with the PSD id")
    ctx.step(f"A1.6 secure channel opened with the card's transport keys (SCP03, level "
             f"{level:02X})")
    result = yield _secured_script(opened)
    plain = _check_answers(opened, result, psd_id)
    _check_complete(opened, result, plain, psd_id)
    if mkrk_first:
        assert intent is not None
        ctx.step(f"A1.7 the MKRK no intent explained replaced at KVN {Kvn.MKRK:02X}; key "
                 f"check values match the HSM's")
        return (yield from _resume_through_mkrk(
            ctx, psd_id, intent, probe,
            _mkrk_from_cryptogram(ctx, psd_id, mkrk_version, fresh=(
                cryptogram_label(cryptogram_version), found[0])),
            mk_spec, level, first_script=3))
    ctx.step(f"A1.7 MKRK installed at KVN {Kvn.MKRK:02X}, MK v{mk_version} at KVN "
             f"{mk_version:02X}; key check values match the HSM's")
    ctx.step("A1.8 transport keys retired (KVN FF deleted); channel closed")
    ctx.store.complete_install(psd_id, intent.intent_id, ctx.actor,
                               release_lease_of=ctx.lease_holder)
    ctx.lease_released = True
    return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=psd_id,
                           message=f"MKRK and MK v{mk_version} installed")


def _initialize_update_answer(result: cpb.ScriptResult, index: int, psd_id: str,
                              key_set: str) -> bytes:
    """The card's answer to the INITIALIZE UPDATE at ``index`` of ``result``."""
    responses = list(result.responses)
    if index < len(responses) and responses[index].sw == SW.OK:
        return bytes(responses[index].data)
    if index < len(responses):
        raise FlowError(cpb.SessionDone.FAILED,
                        f"PSD {psd_id}: the {key_set} did not answer INITIALIZE UPDATE "
                        f"({responses[index].sw:04X})")
    raise FlowError(cpb.SessionDone.RETRY_LATER,
                    f"PSD {psd_id}: the card stopped before INITIALIZE UPDATE with the "
                    f"{key_set} ({result.message or 'no detail'}); the next contact "
                    f"finishes it")


def _resume_through_mkrk(ctx: FlowContext, psd_id: str, intent: Intent, probe: Probe,
                         mkrk_spec: kpb.KeySetSpec, mk_spec: kpb.KeySetSpec,
                         level: int, first_script: int = 2) -> SessionGen:
    """Finish an installation broken after the card took its MKRK (and maybe its MK).

    ``level`` is the one chosen from the "i" of the probe's answer (a card
    property, the same for all its key sets) and already held to the minimum;
    ``first_script`` numbers this path's scripts after those already run.

    Once the card holds the MKRK set, the seed lets only that set unlock
    master key changes, and a card that enforces the rule strictly refuses
    an MK put in a transport channel (``virtual_psd/isd.py``, 6982). So the
    MK goes in through the MKRK channel, opened with the set re-derived from
    the cryptogram journaled before the MKRK reached the card; it is put
    again if the card holds it, so the KCVs the HSM foresees vouch for it.
    That channel also proves the card's MKRK before the transport keys go.
    An MKRK channel may not delete the transport set (on any card: it manages
    MK sets and itself), so a transport channel opened after it retires
    them; that channel's INITIALIZE UPDATE rides at the end of the MKRK
    script. Four round trips: the probe, INITIALIZE UPDATE with the MKRK, the
    MKRK script, the transport script. A break anywhere leaves a state this
    path (or the reconcile of a card without transport keys) finishes from:
    the intent stays open until the transport keys are gone.
    """
    mk_version = intent.to_version
    mkrk_challenge = os.urandom(HOST_CHALLENGE_BYTES)
    result = yield cpb.ApduScript(script_id=first_script, commands=[cpb.ScriptCommand(
        apdu=gp.initialize_update_command(Kvn.MKRK, mkrk_challenge), expect=_expect_ok())])
    initialize_update = _initialize_update_answer(result, 0, psd_id, "MKRK key set")
    opened = _open_channel(ctx, kpb.OpenSecureChannelRequest(
        key_set=mkrk_spec, kvn=Kvn.MKRK, host_challenge=mkrk_challenge,
        initialize_update_response=initialize_update, security_level=level,
        commands=[_put(mk_spec, mk_version, mk_version in probe.kvns)]),
        "opening the MKRK channel")
    ctx.step(f"A1.5 HSM1 diversified MK block v{mk_version} with the PSD id")
    ctx.step(f"A1.6 secure channel opened with the card's MKRK key set (SCP03, level "
             f"{level:02X}): the security executive compared it with its own and unlocked")
    transport_challenge = os.urandom(HOST_CHALLENGE_BYTES)
    then = gp.initialize_update_command(Kvn.TRANSPORT, transport_challenge)
    result = yield _secured_script(opened, script_id=first_script + 1, then=then)
    plain = _check_answers(opened, result, psd_id)
    if len(plain) != len(opened.commands) or any(p.sw != SW.OK for p in plain):
        _check_complete(opened, result, plain, psd_id)
    ctx.step(f"A1.7 MK v{mk_version} installed at KVN {mk_version:02X} through the MKRK "
             f"channel; key check values match the HSM's")
    initialize_update = _initialize_update_answer(result, len(opened.commands), psd_id,
                                                  "transport keys")
    closing = _open_channel(ctx, kpb.OpenSecureChannelRequest(
        key_set=_spec_diversified(FACTORY_TRANSPORT_MASTER, psd_id),
        kvn=Kvn.TRANSPORT, host_challenge=transport_challenge,
        initialize_update_response=initialize_update, security_level=level,
        commands=[_delete(Kvn.TRANSPORT)]), "opening the transport channel")
    result = yield _secured_script(closing, script_id=first_script + 2)
    plain = _check_answers(closing, result, psd_id)
    _check_complete(closing, result, plain, psd_id)
    ctx.step("A1.8 transport keys retired (KVN FF deleted) in a transport channel; "
             "channel closed")
    ctx.store.complete_install(psd_id, intent.intent_id, ctx.actor,
                               release_lease_of=ctx.lease_holder)
    ctx.lease_released = True
    return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=psd_id,
                           message=f"MKRK and MK v{mk_version} installed")


# -- A2: post-issuance replacement ------------------------------------------------



def replace(ctx: FlowContext, psd: PsdRecord, probe: Probe, host_challenge: bytes) -> SessionGen:
    """DESIGN A2 / claims 15-28, 35-40 through a user's PC.

    Nothing is written to the registry until the proxy has opened the MKRK
    channel, which it does only if the card's INITIALIZE UPDATE answer
    carries the card cryptogram of this contact's host challenge: the card
    has then proven it holds the MKRK set its stored cryptogram reproduces.
    """
    psd_id = psd.psd_id
    intent = _open_intent(ctx, psd_id)
    card_mks = probe.mk_kvns
    if intent is not None and intent.kind is IntentKind.INSTALL:
        return cpb.SessionDone(outcome=cpb.SessionDone.NOTHING_TO_DO, psd_id=psd_id,
                               message=f"PSD {psd_id} is being installed: a personalization "
                                       f"station finishes it")
    work = None
    if intent is None:
        work = (ctx.contact.work if ctx.contact is not None
                else ctx.store.campaign_work_for(psd_id))
        if work is None:
            return cpb.SessionDone(outcome=cpb.SessionDone.NOTHING_TO_DO, psd_id=psd_id,
                                   message=f"MK v{psd.mk_version} is current")
    if probe.initialize_update is None:
        raise _unanswered(probe, psd_id, "the MKRK key set")
    mkrk_spec = _mkrk_from_cryptogram(ctx, psd_id, psd.mkrk_version)
    level = _security_level(ctx, probe, psd_id, mkrk_spec, Kvn.MKRK, host_challenge,
                            "opening the MKRK channel")
    if work is not None:
        old, new = psd.mk_version, work.to_version
        expected = f"the registry says v{old}"
        consistent = card_mks == {old}
    else:
        assert intent is not None
        old, new = intent.from_version, intent.to_version
        expected = f"expected v{old} and/or v{new}"
        consistent = card_mks == {new} or (bool(card_mks) and card_mks <= {old, new})
    if not consistent:
        # Recorded on the card: only once the card has proven its MKRK in this contact.
        _prove_keys(ctx, probe, mkrk_spec, Kvn.MKRK, host_challenge, level,
                    "checking the card's MKRK")
        raise FlowError(why.KEY_VERSIONS,
                        f"PSD {psd_id} holds MK key versions "
                        f"{_versions_text(frozenset(card_mks))}, {expected}")
    if intent is not None and card_mks == {new}:
        # The card says it finished last contact: it proves its MKRK (a channel
        # with no command) before the registry follows it.
        _prove_keys(ctx, probe, mkrk_spec, Kvn.MKRK, host_challenge, level,
                    "checking the card's MKRK")
        _take_lease(ctx, psd_id)
        ctx.store.reconcile(psd_id, state=PsdState.ACTIVE, mk_version=new,
                            mkrk_version=psd.mkrk_version, event="reconciled",
                            detail="the card finished the replacement last contact",
                            actor=ctx.actor)
        ctx.step(f"A2 reconciled: PSD {psd_id} proved its MKRK and holds MK v{new} only")
        return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=psd_id,
                               message=f"MK v{new} confirmed")
    ctx.step(f"A2.1 PSD id {psd_id} received; its cryptogram found by PSD id")
    ctx.step("A2.2 HSM1 decrypted the cryptogram to R with the private key and "
             "diversified the MKRK block (R stays inside the HSM proxy)")
    commands = []
    if new not in card_mks:
        if ctx.require_usable is not None:
            ctx.require_usable(MK, new)
            ctx.require_usable(MKRK, psd.mkrk_version)
        commands.append(_put(_spec_diversified(mk_label(new), psd_id), new, False))
        ctx.step(f"A2.3 HSM1 diversified the new MK block v{new} with the PSD id")
    if old in card_mks:
        commands.append(_delete(old))
    request = kpb.OpenSecureChannelRequest(
        key_set=mkrk_spec, kvn=Kvn.MKRK, host_challenge=host_challenge,
        initialize_update_response=probe.initialize_update, security_level=level,
        commands=commands)
    opened = _open_channel(ctx, request, "opening the MKRK channel")
    # The card has proven its MKRK: now the lease, and the intent with it.
    start = _take_lease(ctx, psd_id, journal=intent is None)
    if intent is None:
        intent = start.intent
        assert intent is not None and start.intent_begun
        ctx.step(f"A2 intent journaled: MK v{old} -> v{new}")
    ctx.step(f"A2.4 secure channel opened with the MKRK key set (SCP03, level {level:02X}): "
             f"the security executive compared it with its own and unlocked")
    result = yield _secured_script(opened)
    plain = _check_answers(opened, result, psd_id)
    _check_complete(opened, result, plain, psd_id)
    ctx.step(f"A2.5 new MK v{new} installed (key check values match), then MK v{old} deleted")
    ctx.step("A2.6 security executive relocked: channel closed and released")
    ctx.store.complete_replacement(psd_id, intent.intent_id, ctx.actor,
                                   release_lease_of=ctx.lease_holder)
    ctx.lease_released = True
    return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=psd_id,
                           message=f"MK v{old} replaced by v{new}")


# -- one contact ------------------------------------------------------------------

def _service_reason(exc: ServiceError) -> Reason:
    """The reason of a contact ended by the store or the masters' check."""
    if isinstance(exc, MasterUnusable):
        return why.MASTER_UNUSABLE
    return {grpc.StatusCode.NOT_FOUND: why.NOT_REGISTERED,
            grpc.StatusCode.UNAVAILABLE: why.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED: why.UNAVAILABLE,
            grpc.StatusCode.ABORTED: why.REGISTRY_MOVED,
            }.get(exc.code, why.REGISTRY_REFUSED)


def _needs_attention(psd: PsdRecord) -> FlowError:
    since = psd.attention_since.isoformat(timespec="seconds") if psd.attention_since else "?"
    return FlowError(why.NEEDS_ATTENTION,
                     f"PSD {psd.psd_id} needs attention since {since} ({psd.attention}): "
                     f"{psd.attention_detail}; once the cause is dealt with an operator "
                     f"clears it: {CLEAR_ATTENTION.format(psd_id=psd.psd_id)}")


def _record_attention(ctx: FlowContext, psd_id: str, exc: FlowError) -> str:
    """Flag the card for an operator (its own write: these endings are rare); the message
    the agent gets, which says whether it was recorded."""
    try:
        ctx.store.flag_attention(psd_id, reason=exc.reason.code,
                                 detail=exc.message[:MAX_DETAIL], actor=ctx.actor,
                                 release_lease_of=ctx.lease_holder if ctx.leased else None)
    except ServiceError as failed:
        log.warning("attention not recorded", extra=fields(psd_id=psd_id,
                                                           reason=exc.reason.code,
                                                           error=failed.message))
        return f"{exc.message} (not recorded on the card: {failed.message})"
    if ctx.leased:
        ctx.lease_released = True
    log.warning("card needs attention", extra=fields(psd_id=psd_id, reason=exc.reason.code))
    return (f"{exc.message}; recorded: the card needs attention, and no campaign takes it "
            f"until an operator clears it ({CLEAR_ATTENTION.format(psd_id=psd_id)})")


def card_session(ctx: FlowContext, role: int) -> SessionGen:
    """Probe the card, then A1 (station) or A2 (user PC); always returns SessionDone.

    Its ``reason`` says why the contact ended (``access_server.outcomes``); one
    that is the card's own and needs an operator is recorded on the card here.
    """
    host_challenge = os.urandom(HOST_CHALLENGE_BYTES)
    station = role == cpb.PERSONALIZATION_STATION
    psd_id = ""
    try:
        result = yield probe_script(Kvn.TRANSPORT if station else Kvn.MKRK, host_challenge)
        probe = parse_probe(result)
        psd_id = probe.psd_id
        ctx.card_aid = probe.aid
        # A station takes the lease at once (A1 journals only once the proxy
        # has opened the transport channel); a user PC's contact only reads
        # until the card has proven its MKRK (replace).
        start = (ctx.store.start_contact(psd_id, ctx.lease_holder, ctx.lease_seconds)
                 if station else ctx.store.read_contact(psd_id, ctx.lease_holder))
        psd = start.psd
        if psd.state is PsdState.REVOKED:
            raise FlowError(why.REVOKED, f"PSD {psd_id} is revoked")
        ctx.leased = start.leased
        ctx.contact = start
        if psd.needs_attention:
            raise _needs_attention(psd)
        if not start.lease_free:
            raise FlowError(why.CARD_BUSY, f"PSD {psd_id} is in another session right now")
        flow = install if station else replace
        done = yield from flow(ctx, psd, probe, host_challenge)
    except FlowError as exc:
        message = exc.message
        if exc.reason.recorded and psd_id:
            message = _record_attention(ctx, psd_id, exc)
        done = cpb.SessionDone(outcome=exc.outcome, message=message, psd_id=psd_id,
                               reason=exc.reason.code)
    except ServiceError as exc:
        reason = _service_reason(exc)
        done = cpb.SessionDone(outcome=reason.outcome, message=exc.message, psd_id=psd_id,
                               reason=reason.code)
    finally:
        if ctx.leased and not ctx.lease_released:
            try:
                ctx.store.release_lease(psd_id, ctx.lease_holder)
            except ServiceError:
                log.warning("lease release failed", extra=fields(psd_id=psd_id))
    if not done.reason:
        done.reason = (why.DONE if done.outcome == cpb.SessionDone.OK
                       else why.NOTHING_TO_DO).code
    done.steps.extend(ctx.steps)
    why.count(done)
    return done
