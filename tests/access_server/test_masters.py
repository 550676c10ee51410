"""Only master versions key management transferred are used (access_server.masters).

Unit tests over stand-in listings for every reason a version is refused, and
an end-to-end one: a perfect forgery of a transferred MK block planted in
HSM1 with the token PIN (the proxy alone cannot tell it from a real one) is
neither installed nor accepted as a campaign's target, because key management
never recorded it.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from access_server.masters import UsableMasters
from card_agent.session import AgentInfo
from cms.runtime.client import load_endpoints
from cms.runtime.errors import FailedPrecondition, Unavailable
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_mgmt_pb2 as mpb
from deploy.local import Stack
from hsm_proxy.key_classes import Tag
from tests.support.card_keys import provision
from tests.support.contacts import contact
from tests.support.launcher import dev_stack
from tests.support.token import RawToken
from virtual_psd.factory import create_card

KCV = bytes.fromhex("a1b2c3")


class Listing:
    """A stand-in for a gRPC stub method returning a fixed reply (and counting calls)."""

    def __init__(self, reply: object) -> None:
        self.reply, self.calls = reply, 0

    def __call__(self, request: object, timeout: float) -> object:
        self.calls += 1
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


class Proxy:
    def __init__(self, *keys: hpb.KeyInfo) -> None:
        self.ListBlocks = Listing(bpb.ListBlocksResponse(keys=list(keys)))


class KeyMgmt:
    def __init__(self, *blocks: mpb.KeyBlock) -> None:
        self.ListKeyBlocks = Listing(mpb.ListKeyBlocksResponse(blocks=list(blocks)))


def _key(label: str, *, origin: int = hpb.TRANSFERRED, kcv: bytes = KCV,
         conformance: str = "") -> hpb.KeyInfo:
    return hpb.KeyInfo(label=label, origin=origin, kcv=kcv, conformance=conformance)


def _block(label: str, *, transferred: bool = True, kcv: bytes = KCV) -> mpb.KeyBlock:
    return mpb.KeyBlock(label=label, kcv=kcv, transferred=transferred)


@pytest.mark.parametrize(("key", "block", "reason"), [
    (None, _block("mk/3"), "not in HSM1"),
    (_key("mk/3"), None, "no record"),
    (_key("mk/3"), _block("mk/3", transferred=False), "not recorded mk/3 as transferred"),
    (_key("mk/3", origin=hpb.GENERATED), _block("mk/3"), "not landed by a transfer"),
    (_key("mk/3", origin=hpb.KEY_ORIGIN_UNKNOWN), _block("mk/3"), "KEY_ORIGIN_UNKNOWN"),
    (_key("mk/3", conformance="CKA_EXTRACTABLE is True"), _block("mk/3"),
     "does not match its class"),
    (_key("mk/3", kcv=bytes(3)), _block("mk/3"), "check value 000000"),
])
def test_a_version_is_refused_with_its_reason(key, block, reason) -> None:
    masters = UsableMasters(Proxy(*([key] if key else [])), KeyMgmt(*([block] if block else [])))
    assert masters.versions("mk") == set()
    with pytest.raises(FailedPrecondition) as refused:
        masters.require("mk", 3)
    assert "MK v3 is not usable" in refused.value.message and reason in refused.value.message


def test_only_the_agreed_versions_count_and_answers_are_cached() -> None:
    proxy = Proxy(_key("mk/1"), _key("mk/2"), _key("mk/3", origin=hpb.GENERATED),
                  _key("mkrk/1"))
    key_mgmt = KeyMgmt(_block("mk/1"), _block("mk/2"), _block("mk/3"), _block("mkrk/1"))
    clock = [0.0]
    masters = UsableMasters(proxy, key_mgmt, ttl=10, clock=lambda: clock[0])
    assert masters.versions("mk") == {1, 2} and masters.newest("mk") == 2
    assert masters.versions("mkrk") == {1}
    masters.require("mk", 2)
    assert proxy.ListBlocks.calls == 1
    # A version the cache does not know as usable is looked up afresh (at most once a second).
    clock[0] = 2.0
    with pytest.raises(FailedPrecondition):
        masters.require("mk", 3)
    assert proxy.ListBlocks.calls == 2
    # An operator's question is never answered from the cache.
    masters.versions("mk", fresh=True)
    assert proxy.ListBlocks.calls == 3


def test_without_key_management_nothing_is_usable() -> None:
    masters = UsableMasters(Proxy(_key("mk/1")), None)
    with pytest.raises(Unavailable) as err:
        masters.versions("mk")
    assert "key_mgmt.address" in err.value.message
    broken = KeyMgmt()
    broken.ListKeyBlocks = Listing(grpc.RpcError())
    with pytest.raises(Unavailable):
        UsableMasters(Proxy(), broken).versions("mk")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_planted_master_is_neither_installed_nor_targeted(tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    master = os.urandom(16)
    with dev_stack(directory) as endpoints_path:
        provision(endpoints_path, master)                     # mk/1, mk/2, mkrk/1, ...
        # A perfect forgery with the token PIN: a transferred-looking mk/9 in HSM1.
        RawToken(Stack(directory).hsm, "access").create_aes(
            "mk/9", os.urandom(16), ["DERIVE"], tag=Tag(hpb.MK_BLOCK, hpb.TRANSFERRED).encode(),
            fixed=True)
        channel = load_endpoints(endpoints_path).channel("access_server", "admin")
        campaigns = access_pb2_grpc.CampaignsStub(channel)
        registry = access_pb2_grpc.PsdRegistryStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            campaigns.StartCampaign(apb.StartCampaignRequest(from_mk_version=2,
                                                             to_mk_version=9), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "usable MK versions: 1, 2" in refused.value.details()
        card = tmp_path / "card.json"
        psd_id = create_card(card, transport_master=master).psd_id
        registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
        report = contact(endpoints_path, card, AgentInfo(role=cpb.PERSONALIZATION_STATION,
                                                         label="station"))
        assert report.done.outcome == cpb.SessionDone.OK, report.done.message
        shown = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
        assert shown.mk_version == 2                          # not the planted 9
        channel.close()
