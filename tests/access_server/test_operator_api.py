"""The access server's operator API (PsdRegistry, Campaigns) and `cms psd` / `cms campaign`,
against real processes started by the launcher (proxy + access server, mutual TLS, SQLite)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as pb
from cms.v1 import access_pb2_grpc
from tests.support.card_keys import provision
from tests.support.launcher import cms, dev_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CARD_A = "0A0B0C0D0E0F00000001"
CARD_B = "0A0B0C0D0E0F00000002"
CARD_C = "0A0B0C0D0E0F00000003"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("access-stack")
    with dev_stack(directory) as endpoints_path:
        # MK versions 1 and 2 in HSM1, transferred by key management.
        provision(endpoints_path, bytes(16), mk_versions=2)
        yield endpoints_path


def _stubs(endpoints_path: Path, identity: str = "admin"):
    channel = load_endpoints(endpoints_path).channel("access_server", identity)
    return (access_pb2_grpc.PsdRegistryStub(channel), access_pb2_grpc.CampaignsStub(channel))


def test_register_reports_each_id_and_keeps_the_first(stack: Path) -> None:
    registry, _ = _stubs(stack)
    reply = registry.RegisterPsds(pb.RegisterPsdsRequest(
        psd_ids=[CARD_A, CARD_A, "not-a-psd-id"]), timeout=30)
    assert reply.added == 1
    first, twice, malformed = reply.results
    assert first.added and not twice.added and not malformed.added
    assert twice.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert "malformed PSD id" in malformed.error
    again = registry.RegisterPsds(pb.RegisterPsdsRequest(psd_ids=[CARD_A]), timeout=30)
    assert again.added == 0 and "already registered" in again.results[0].error

    psd = registry.GetPsd(pb.GetPsdRequest(psd_id=CARD_A), timeout=30)
    assert psd.state == pb.PSD_BLANK and psd.mk_version == 0 and not psd.has_cryptogram
    events = registry.GetPsdHistory(pb.GetPsdRequest(psd_id=CARD_A), timeout=30).events
    assert [e.event for e in events] == ["registered"] and events[0].actor == "admin"


def test_unknown_psd_and_bad_filters_get_clear_statuses(stack: Path) -> None:
    registry, _ = _stubs(stack)
    with pytest.raises(grpc.RpcError) as err:
        registry.GetPsd(pb.GetPsdRequest(psd_id="FFFFFFFFFFFFFFFFFFFF"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "FFFFFFFFFFFFFFFFFFFF" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        registry.GetPsd(pb.GetPsdRequest(psd_id="xyz"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        registry.ListPsds(pb.ListPsdsRequest(page_token="garbage"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_only_operators_reach_the_operator_api(stack: Path) -> None:
    registry, _ = _stubs(stack, "card-agent")
    with pytest.raises(grpc.RpcError) as err:
        registry.ListPsds(pb.ListPsdsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "card-agent" in err.value.details()
    reader, _ = _stubs(stack, "key-mgmt")
    reader.ListPsds(pb.ListPsdsRequest(), timeout=30)          # may read
    with pytest.raises(grpc.RpcError) as err:
        reader.RegisterPsds(pb.RegisterPsdsRequest(psd_ids=[CARD_B]), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_campaign_to_a_version_hsm1_lacks_is_refused(stack: Path) -> None:
    _, campaigns = _stubs(stack)
    with pytest.raises(grpc.RpcError) as err:
        campaigns.StartCampaign(pb.StartCampaignRequest(from_mk_version=1, to_mk_version=9),
                                timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "MK version 9 is not one key management transferred" in err.value.details()
    assert "2" in err.value.details()                       # names what HSM1 does hold
    assert not campaigns.ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns


def _activate(endpoints_path: Path, psd_id: str) -> None:
    """Record a finished installation of MK v1 (what flow A1 leaves in the registry)."""
    from access_server.store import Store

    registry, _ = _stubs(endpoints_path)
    registry.RegisterPsds(pb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
    database = endpoints_path.parent / "data" / "access.db"
    with Store.from_url(f"sqlite:///{database}") as store:
        intent = store.begin_install(psd_id, cryptogram=bytes(256),
                                     cryptogram_key_label="cryptogram/1", mkrk_version=1,
                                     mk_version=1, actor="test")
        store.complete_install(psd_id, intent.intent_id, "test")


def test_campaign_lifecycle_and_watch(stack: Path) -> None:
    _, campaigns = _stubs(stack)
    _activate(stack, CARD_C)
    started = campaigns.StartCampaign(pb.StartCampaignRequest(
        name="rotate", from_mk_version=1, to_mk_version=2), timeout=30)
    assert started.state == pb.CAMPAIGN_RUNNING and started.to_mk_version == 2
    assert (started.total, started.pending, started.done) == (1, 1, 0)
    request = pb.GetCampaignRequest(campaign_id=started.campaign_id)
    assert campaigns.PauseCampaign(request, timeout=30).state == pb.CAMPAIGN_PAUSED
    assert campaigns.ResumeCampaign(request, timeout=30).state == pb.CAMPAIGN_RUNNING
    assert campaigns.CancelCampaign(request, timeout=30).state == pb.CAMPAIGN_CANCELLED
    watched = list(campaigns.WatchCampaign(request, timeout=30))   # ends: campaign ended
    assert watched[-1].state == pb.CAMPAIGN_CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        campaigns.ResumeCampaign(request, timeout=30)
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)
    with pytest.raises(grpc.RpcError) as err:
        list(campaigns.WatchCampaign(pb.GetCampaignRequest(campaign_id="nope"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_registers_lists_revokes_and_fails_cleanly(stack: Path, tmp_path: Path) -> None:
    ep = str(stack)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{CARD_B}\n\n")
    done = cms("psd", "--endpoints", ep, "register", "--file", str(ids))
    assert f"{CARD_B}: added" in done.stdout
    listed = cms("psd", "--endpoints", ep, "list", "--state", "blank").stdout
    assert CARD_B in listed
    revoked = cms("psd", "--endpoints", ep, "revoke", CARD_B, "--reason", "lost").stdout
    assert "revoked" in revoked
    history = cms("psd", "--endpoints", ep, "history", CARD_B).stdout
    assert "lost" in history

    for args, message in (
        (("psd", "show", "FFFFFFFFFFFFFFFFFFFF"), "NOT_FOUND"),
        (("psd", "register", CARD_B), "already registered"),
        (("campaign", "start", "--from-version", "1", "--to-version", "7"), "FAILED_PRECONDITION"),
        (("campaign", "pause", "no-such-campaign"), "NOT_FOUND"),
        (("psd", "register"), "no PSD ids given"),
    ):
        bad = cms(args[0], "--endpoints", ep, *args[1:], check=False)
        assert bad.returncode != 0, args
        assert message in bad.stdout + bad.stderr, (args, bad.stdout, bad.stderr)
        assert "Traceback" not in bad.stderr
    campaigns = _stubs(stack)[1].ListCampaigns(pb.ListCampaignsRequest(), timeout=30).campaigns
    status = cms("campaign", "--endpoints", ep, "status").stdout
    assert all(c.campaign_id in status for c in campaigns)
    assert campaigns or "no campaigns" in status


def test_server_refuses_a_bad_configuration_clearly(tmp_path: Path) -> None:
    config = tmp_path / "access.yaml"
    config.write_text("tls: {ca: /nonexistent/ca.pem, cert: c, key: k}\n"
                      "database: {url: 'mysql://x'}\n")
    done = cms("access-server", "serve", "--config", str(config), check=False)
    assert done.returncode != 0
    assert "tls.ca: no such file" in done.stderr and "Traceback" not in done.stderr


def test_attention_and_campaign_items_get_clear_statuses(stack: Path) -> None:
    registry, campaigns = _stubs(stack)
    card = "0A0B0C0D0E0F00000004"
    _activate(stack, card)
    for request, code, words in (
        (pb.ClearPsdAttentionRequest(psd_id=card, note="checked"),
         grpc.StatusCode.FAILED_PRECONDITION, "does not need attention"),
        (pb.ClearPsdAttentionRequest(psd_id=card), grpc.StatusCode.INVALID_ARGUMENT, "note"),
        (pb.ClearPsdAttentionRequest(psd_id="FFFFFFFFFFFFFFFFFFFF", note="x"),
         grpc.StatusCode.NOT_FOUND, "not registered"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            registry.ClearPsdAttention(request, timeout=30)
        assert err.value.code() == code and words in err.value.details()
    reader, _ = _stubs(stack, "key-mgmt")
    with pytest.raises(grpc.RpcError) as err:
        reader.ClearPsdAttention(pb.ClearPsdAttentionRequest(psd_id=card, note="x"), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    started = campaigns.StartCampaign(pb.StartCampaignRequest(
        from_mk_version=1, to_mk_version=2, filter=pb.CampaignFilter(psd_ids=[card])),
        timeout=30)
    listed = campaigns.ListCampaignItems(pb.ListCampaignItemsRequest(
        campaign_id=started.campaign_id), timeout=30)
    assert [(i.psd_id, i.status) for i in listed.items] == [(card, pb.ITEM_PENDING)]
    assert listed.total == 1 and not listed.next_page_token
    failed = campaigns.ListCampaignItems(pb.ListCampaignItemsRequest(
        campaign_id=started.campaign_id, status=pb.ITEM_FAILED), timeout=30)
    assert not failed.items and failed.total == 0
    for request, code in (
        (pb.ListCampaignItemsRequest(campaign_id="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.ListCampaignItemsRequest(campaign_id=started.campaign_id, status=9),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListCampaignItemsRequest(campaign_id=started.campaign_id, page_token="garbage"),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            campaigns.ListCampaignItems(request, timeout=30)
        assert err.value.code() == code
    campaigns.CancelCampaign(pb.GetCampaignRequest(campaign_id=started.campaign_id), timeout=30)
    bad = cms("psd", "--endpoints", str(stack), "clear-attention", card, check=False)
    assert bad.returncode != 0 and "--note" in bad.stderr and "Traceback" not in bad.stderr
