"""Operator API of the access server: the PSD registry and campaigns.

Thin servicers over ``access_server.store.Store``: they check who is calling,
translate messages to store calls and records back to messages. Every rule
about cards and campaigns lives in the store; errors it raises are
``ServiceError`` subclasses that ``guard`` turns into a status with the
store's message.

Who may call: ``admin`` changes and reads; ``key-mgmt`` reads (it needs to
know which MK versions cards use before retiring one). Any other identity,
the card agent included, is refused: agents reach cards only through the
card channel.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from access_server.store import (
    Campaign,
    CampaignItem,
    CampaignState,
    ItemStatus,
    PsdRecord,
    PsdState,
    Store,
)
from cms.runtime.errors import (
    FailedPrecondition,
    ServiceError,
    enum_filter,
    guard,
)
from cms.runtime.tls import caller
from cms.v1 import access_pb2 as pb
from cms.v1 import access_pb2_grpc

WRITERS = frozenset({"admin"})
READERS = WRITERS | {"key-mgmt"}
WATCH_POLL_SECONDS = 0.5

PSD_STATE_TO_PB = {
    PsdState.BLANK: pb.PSD_BLANK,
    PsdState.INSTALLING: pb.PSD_INSTALLING,
    PsdState.ACTIVE: pb.PSD_ACTIVE,
    PsdState.REPLACEMENT_PENDING: pb.PSD_REPLACEMENT_PENDING,
    PsdState.REVOKED: pb.PSD_REVOKED,
}
PSD_STATE_FROM_PB = {v: k for k, v in PSD_STATE_TO_PB.items()}
CAMPAIGN_STATE_TO_PB = {
    CampaignState.RUNNING: pb.CAMPAIGN_RUNNING,
    CampaignState.PAUSED: pb.CAMPAIGN_PAUSED,
    CampaignState.CANCELLED: pb.CAMPAIGN_CANCELLED,
    CampaignState.COMPLETED: pb.CAMPAIGN_COMPLETED,
}
CAMPAIGN_ENDED = frozenset({CampaignState.CANCELLED, CampaignState.COMPLETED})
ITEM_STATUS_TO_PB = {
    ItemStatus.PENDING: pb.ITEM_PENDING,
    ItemStatus.DONE: pb.ITEM_DONE,
    ItemStatus.FAILED: pb.ITEM_FAILED,
    ItemStatus.SKIPPED: pb.ITEM_SKIPPED,
}
ITEM_STATUS_FROM_PB = {v: k for k, v in ITEM_STATUS_TO_PB.items()}


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def psd_message(record: PsdRecord) -> pb.Psd:
    return pb.Psd(
        psd_id=record.psd_id, state=PSD_STATE_TO_PB[record.state],
        mk_version=record.mk_version or 0, mkrk_version=record.mkrk_version or 0,
        pending_mk_version=record.pending_mk_version or 0,
        has_cryptogram=record.has_cryptogram, created=_timestamp(record.created),
        updated=_timestamp(record.updated), last_contact=_timestamp(record.last_contact),
        attention=record.attention or "", attention_detail=record.attention_detail or "",
        attention_since=_timestamp(record.attention_since))


def item_message(item: CampaignItem) -> pb.CampaignItem:
    return pb.CampaignItem(psd_id=item.psd_id, status=ITEM_STATUS_TO_PB[item.status],
                           attempts=item.attempts, last_error=item.last_error or "",
                           updated=_timestamp(item.updated))


def campaign_message(campaign: Campaign) -> pb.Campaign:
    return pb.Campaign(
        campaign_id=campaign.campaign_id, name=campaign.name,
        from_mk_version=campaign.from_version, to_mk_version=campaign.to_version,
        state=CAMPAIGN_STATE_TO_PB[campaign.state], total=campaign.total, done=campaign.done,
        pending=campaign.pending, failed=campaign.failed,
        created=_timestamp(campaign.created), updated=_timestamp(campaign.updated))


class PsdRegistryServicer(access_pb2_grpc.PsdRegistryServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @guard
    def RegisterPsds(self, request, context):
        actor = caller(context, WRITERS, "register PSDs")
        outcomes = self.store.register_psds(list(request.psd_ids), actor)
        results = [pb.RegisterResult(psd_id=o.psd_id, added=o.added, error=o.error or "",
                                     code=o.code.value[0]) for o in outcomes]
        return pb.RegisterPsdsResponse(results=results, added=sum(o.added for o in outcomes))

    @guard
    def GetPsd(self, request, context):
        caller(context, READERS, "read the registry")
        return psd_message(self.store.get_psd(request.psd_id))

    @guard
    def ListPsds(self, request, context):
        caller(context, READERS, "read the registry")
        state = enum_filter(request.state, PSD_STATE_FROM_PB, "unknown PSD state")
        page = self.store.list_psds(state=state, mk_version=request.mk_version or None,
                                    page_size=request.page_size, page_token=request.page_token,
                                    needs_attention=request.needs_attention)
        return pb.ListPsdsResponse(psds=[psd_message(r) for r in page.items],
                                   next_page_token=page.next_page_token, total=page.total)

    @guard
    def GetPsdHistory(self, request, context):
        caller(context, READERS, "read the registry")
        events = self.store.history(request.psd_id)
        return pb.PsdHistory(psd_id=request.psd_id, events=[
            pb.PsdEvent(at=_timestamp(e.at), event=e.event, detail=e.detail, actor=e.actor)
            for e in events])

    @guard
    def RevokePsd(self, request, context):
        actor = caller(context, WRITERS, "revoke PSDs")
        return psd_message(self.store.revoke(request.psd_id, request.reason, actor))

    @guard
    def ClearPsdAttention(self, request, context):
        actor = caller(context, WRITERS, "clear a card's attention")
        return psd_message(self.store.clear_attention(request.psd_id, note=request.note,
                                                      actor=actor))


class CampaignsServicer(access_pb2_grpc.CampaignsServicer):
    """Campaigns; ``known_mk_versions`` says which MK versions key management transferred
    to HSM1 (access_server.masters; None: unchecked)."""

    def __init__(self, store: Store, known_mk_versions=None) -> None:
        self.store = store
        self.known_mk_versions = known_mk_versions

    @guard
    def StartCampaign(self, request, context):
        actor = caller(context, WRITERS, "start campaigns")
        if self.known_mk_versions is not None:
            known = self.known_mk_versions()
            if request.to_mk_version not in known:
                listed = ", ".join(str(v) for v in sorted(known)) or "none"
                raise FailedPrecondition(
                    f"MK version {request.to_mk_version} is not one key management transferred "
                    f"to HSM1 (usable MK versions: {listed}); create and transfer it with key "
                    f"management first")
        campaign = self.store.start_campaign(
            request.name or f"MK {request.from_mk_version} -> {request.to_mk_version}",
            request.from_mk_version, request.to_mk_version,
            psd_ids=list(request.filter.psd_ids) or None,
            psd_id_prefix=request.filter.psd_id_prefix or None, actor=actor)
        return campaign_message(campaign)

    @guard
    def GetCampaign(self, request, context):
        caller(context, READERS, "read campaigns")
        return campaign_message(self.store.get_campaign(request.campaign_id))

    @guard
    def ListCampaigns(self, request, context):
        caller(context, READERS, "read campaigns")
        return pb.ListCampaignsResponse(
            campaigns=[campaign_message(c) for c in self.store.list_campaigns()])

    @guard
    def PauseCampaign(self, request, context):
        caller(context, WRITERS, "pause campaigns")
        return campaign_message(self.store.pause_campaign(request.campaign_id))

    @guard
    def ResumeCampaign(self, request, context):
        caller(context, WRITERS, "resume campaigns")
        return campaign_message(self.store.resume_campaign(request.campaign_id))

    @guard
    def CancelCampaign(self, request, context):
        caller(context, WRITERS, "cancel campaigns")
        return campaign_message(self.store.cancel_campaign(request.campaign_id))

    @guard
    def ListCampaignItems(self, request, context):
        caller(context, READERS, "read campaigns")
        status = enum_filter(request.status, ITEM_STATUS_FROM_PB,
                             "unknown campaign item status")
        page = self.store.list_campaign_items(
            request.campaign_id, status, page_size=request.page_size,
            after=request.page_token)
        return pb.ListCampaignItemsResponse(
            items=[item_message(i) for i in page.items], total=page.total,
            next_page_token=page.next_after)

    def WatchCampaign(self, request, context) -> Iterator[pb.Campaign]:
        """Each change of the campaign's counts or state, until it ends or the caller leaves."""
        try:
            caller(context, READERS, "read campaigns")
            last = None
            while context.is_active():
                campaign = self.store.get_campaign(request.campaign_id)
                message = campaign_message(campaign)
                key = (message.state, message.done, message.pending, message.failed)
                if key != last:
                    last = key
                    yield message
                if campaign.state in CAMPAIGN_ENDED:
                    return
                time.sleep(WATCH_POLL_SECONDS)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
