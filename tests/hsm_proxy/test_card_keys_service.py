"""The proxy's CardKeys service against an in-process virtual card: SCP03 channels whose
keys stay in the HSM (real proxy process, SoftHSM2, mutual TLS)."""

from __future__ import annotations

import base64
import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from cardcore import gp
from cardcore.diversify import diversify_key_set_software
from cardcore.psd import psd_id_bytes
from cardcore.scp03 import InitializeUpdateResponse, cmac_prf, derive_session_keys
from cms.runtime.client import load_endpoints
from cms.v1 import card_channel_pb2 as chpb
from cms.v1 import card_keys_pb2 as pb
from cms.v1 import card_keys_pb2_grpc
from tests.support.card_keys import provision
from tests.support.launcher import dev_stack
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MASTER = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")
OK = 0x9000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("card-keys")
    with dev_stack(directory) as endpoints_path:
        provision(endpoints_path, MASTER)
        yield endpoints_path


def _stub(stack: Path, identity: str = "access-server") -> card_keys_pb2_grpc.CardKeysStub:
    return card_keys_pb2_grpc.CardKeysStub(load_endpoints(stack).channel("hsm_proxy", identity))


def _send(card: VirtualCard, apdu: bytes) -> tuple[bytes, int]:
    raw = card.transmit(apdu)
    return raw[:-2], int.from_bytes(raw[-2:], "big")


def _diversified(master_label: str, psd_id: str) -> pb.KeySetSpec:
    return pb.KeySetSpec(token="access", key_length=16, diversified=pb.Diversified(
        master_label=master_label, element=psd_id_bytes(psd_id)))


def _initialize(card: VirtualCard, kvn: int) -> tuple[bytes, bytes]:
    assert _send(card, gp.select_command())[1] == OK
    challenge = os.urandom(8)
    data, sw = _send(card, gp.initialize_update_command(kvn, challenge))
    assert sw == OK
    return challenge, data


def _run(card: VirtualCard, opened) -> list[pb.ApduResponse]:
    from cms.v1 import card_channel_pb2 as cpb

    out = []
    for command in opened.commands:
        data, sw = _send(card, command.apdu)
        out.append(cpb.ApduResponse(data=data, sw=sw))
        if sw != OK:
            break
    return out


def _open_installing(stub, virtual: VirtualCard, psd_id: str, *extra: pb.ChannelCommand):
    """A transport channel whose script puts a new MKRK (70) and MK v1 (01), then ``extra``."""
    challenge, iu = _initialize(virtual, 0xFF)
    return stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
        commands=[
            pb.ChannelCommand(put_key_set=pb.PutKeySet(key_set=pb.KeySetSpec(
                token="access", key_length=16, new_random=pb.NewRandom(
                    master_label="mkrk/1", public_key_label="cryptogram/1")), new_kvn=0x70)),
            pb.ChannelCommand(put_key_set=pb.PutKeySet(
                key_set=_diversified("mk/1", psd_id), new_kvn=0x01)),
            *extra,
        ]), timeout=60)


@pytest.fixture
def card(tmp_path: Path) -> tuple[VirtualCard, str]:
    state = create_card(tmp_path / "card.json", transport_master=MASTER)
    virtual = VirtualCard.open(tmp_path / "card.json")
    virtual.power_on()
    return virtual, state.psd_id


def test_transport_channel_installs_key_sets_whose_kcvs_the_card_confirms(
        stack: Path, card) -> None:
    virtual, psd_id = card
    stub = _stub(stack)
    opened = _open_installing(stub, virtual, psd_id,
                              pb.ChannelCommand(apdu=gp.delete_key_command(0xFF)))
    assert len(opened.commands) == 4
    assert [c.position for c in opened.cryptograms] == [1]
    cryptogram = opened.cryptograms[0].cryptogram
    assert len(cryptogram) == 256
    responses = _run(virtual, opened)
    assert [r.sw for r in responses] == [OK] * 4
    plain = stub.UnwrapResponses(pb.UnwrapResponsesRequest(
        channel=opened.channel, responses=responses, close=True), timeout=30).responses
    for index in (1, 2):                                # the card's KCVs are the HSM's
        assert plain[index].data == opened.commands[index].expected_put_key_response
    assert set(isd_state(virtual.state).key_sets) == {0x70, 0x01}

    # The MKRK set re-derived from the cryptogram opens a channel at 0x70 ...
    challenge, iu = _initialize(virtual, 0x70)
    reopened = stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=pb.KeySetSpec(token="access", key_length=16, from_cryptogram=pb.FromCryptogram(
            master_label="mkrk/1", private_key_label="cryptogram/1", cryptogram=cryptogram)),
        kvn=0x70, host_challenge=challenge, initialize_update_response=iu,
        security_level=0x33), timeout=60)
    assert _run(virtual, reopened)[0].sw == OK
    stub.UnwrapResponses(pb.UnwrapResponsesRequest(channel=reopened.channel, close=True),
                         timeout=30)
    # ... and the MK set at 0x01.
    challenge, iu = _initialize(virtual, 0x01)
    mk = stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=_diversified("mk/1", psd_id), kvn=0x01, host_challenge=challenge,
        initialize_update_response=iu, security_level=0x33), timeout=60)
    assert _run(virtual, mk)[0].sw == OK


def test_nothing_secret_crosses_the_proxy_boundary(stack: Path, card) -> None:
    """Transport keys and session keys (computed here from the known master) appear in no
    response, log or audit record."""
    virtual, psd_id = card
    stub = _stub(stack)
    challenge, iu = _initialize(virtual, 0xFF)
    opened = stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
        commands=[pb.ChannelCommand(apdu=gp.get_data_command(0x00E0))]), timeout=60)
    responses = _run(virtual, opened)
    plain = stub.UnwrapResponses(pb.UnwrapResponsesRequest(
        channel=opened.channel, responses=responses, close=True), timeout=30)
    assert plain.responses[1].sw == OK and gp.parse_key_information(plain.responses[1].data)

    static = diversify_key_set_software(MASTER, psd_id_bytes(psd_id), 16)
    card_challenge = InitializeUpdateResponse.parse(iu).card_challenge
    session = derive_session_keys(cmac_prf(static.enc), cmac_prf(static.mac), challenge,
                                  card_challenge, 16)
    secrets = [*static.keys(), session.s_enc, session.s_mac, session.s_rmac, MASTER]
    seen = [opened.SerializeToString(), plain.SerializeToString()]
    directory = stack.parent
    for path in [*(directory / "logs").rglob("*"), *(directory / "audit").rglob("*")]:
        if path.is_file():
            seen.append(path.read_bytes())
    assert len(seen) > 2
    for secret in secrets:
        forms = [secret, secret.hex().encode(), secret.hex().upper().encode(),
                 base64.b64encode(secret)]
        for blob in seen:
            assert not any(form in blob for form in forms)


def test_wrong_keys_and_tampered_responses_are_refused(stack: Path, card) -> None:
    virtual, psd_id = card
    stub = _stub(stack)
    challenge, iu = _initialize(virtual, 0xFF)
    with pytest.raises(grpc.RpcError) as err:                       # not this card's keys
        stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
            key_set=_diversified("mk/1", psd_id), kvn=0xFF, host_challenge=challenge,
            initialize_update_response=iu, security_level=0x33), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "card cryptogram mismatch" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:                       # another card's cryptogram
        stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
            key_set=pb.KeySetSpec(token="access", key_length=16, from_cryptogram=pb.FromCryptogram(
                master_label="mkrk/1", private_key_label="cryptogram/1",
                cryptogram=os.urandom(256))),
            kvn=0xFF, host_challenge=challenge, initialize_update_response=iu,
            security_level=0x33), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not decrypt" in err.value.details()

    challenge, iu = _initialize(virtual, 0xFF)
    opened = stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
        commands=[pb.ChannelCommand(apdu=gp.get_data_command(0x00E0))]), timeout=60)
    responses = _run(virtual, opened)
    # Another identity cannot use the channel.
    with pytest.raises(grpc.RpcError) as err:
        _stub(stack, "admin").UnwrapResponses(pb.UnwrapResponsesRequest(
            channel=opened.channel, responses=responses), timeout=30)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    # A flipped R-MAC bit: DATA_LOSS, and the channel is gone.
    tampered = bytearray(responses[1].data)
    tampered[-1] ^= 1
    responses[1].data = bytes(tampered)
    with pytest.raises(grpc.RpcError) as err:
        stub.UnwrapResponses(pb.UnwrapResponsesRequest(channel=opened.channel,
                                                       responses=responses), timeout=30)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(grpc.RpcError) as err:
        stub.UnwrapResponses(pb.UnwrapResponsesRequest(channel=opened.channel), timeout=30)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


@pytest.mark.parametrize("mutate, detail", [
    (lambda r: r.ClearField("key_set"), "key_set: give a source"),
    (lambda r: setattr(r, "security_level", 0x02), "security_level"),
    (lambda r: setattr(r, "host_challenge", b"x"), "host_challenge"),
    (lambda r: setattr(r, "initialize_update_response", b"short"), "initialize_update_response"),
    (lambda r: r.key_set.diversified.__setattr__("master_label", "mk/99"), "mk/99"),
    (lambda r: r.commands.add(apdu=b"\x00"), "commands[0].apdu"),
])
def test_bad_requests_get_clear_statuses(stack: Path, mutate, detail) -> None:
    request = pb.OpenSecureChannelRequest(
        key_set=_diversified("mk/1", "0102030405060708090A"), kvn=0xFF,
        host_challenge=bytes(8), initialize_update_response=bytes(29), security_level=0x33)
    mutate(request)
    with pytest.raises(grpc.RpcError) as err:
        _stub(stack).OpenSecureChannel(request, timeout=30)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                grpc.StatusCode.FAILED_PRECONDITION)
    assert detail in err.value.details()


def test_policy_keeps_other_identities_off_card_keys(stack: Path) -> None:
    request = pb.DeriveKeySetRequest(spec=_diversified("mk/1", "0102030405060708090A"))
    with pytest.raises(grpc.RpcError) as err:
        _stub(stack, "card-agent").DeriveKeySet(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    derived = _stub(stack).DeriveKeySet(request, timeout=30)
    assert derived.handle and len(derived.kcv_enc) == 3 and not derived.cryptogram


def test_the_card_refuses_mk_replacement_in_a_channel_opened_with_the_mk(stack: Path,
                                                                        card) -> None:
    """Only the MKRK unlocks the security executive: a channel authenticated with the MK
    set (keys the HSM derives correctly) cannot install another MK."""
    virtual, psd_id = card
    stub = _stub(stack)
    opened = _open_installing(stub, virtual, psd_id)
    assert [r.sw for r in _run(virtual, opened)] == [OK] * 3

    challenge, iu = _initialize(virtual, 0x01)
    mk_channel = stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
        key_set=_diversified("mk/1", psd_id), kvn=0x01, host_challenge=challenge,
        initialize_update_response=iu, security_level=0x33,
        commands=[pb.ChannelCommand(put_key_set=pb.PutKeySet(
            key_set=_diversified("mk/2", psd_id), new_kvn=0x02))]), timeout=60)
    answers = _run(virtual, mk_channel)
    assert answers[0].sw == OK                           # the MK set authenticates ...
    assert answers[1].sw != OK                           # ... but may not put an MK
    assert set(isd_state(virtual.state).key_sets) == {0xFF, 0x70, 0x01}


def _worker_states(stack: Path) -> float:
    url = load_endpoints(stack).metrics_url("hsm_proxy")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (local test stack)
        for line in resp.read().decode().splitlines():
            if line.startswith("cms_hsm_worker_states "):
                return float(line.split()[1])
    raise AssertionError("cms_hsm_worker_states is not exported")


def test_closing_with_the_last_answers_frees_the_channel_in_the_worker(
        stack: Path, card) -> None:
    virtual, psd_id = card
    stub = _stub(stack)
    before = _worker_states(stack)
    opened = _open_installing(stub, virtual, psd_id)
    assert _worker_states(stack) == before + 1          # session keys held for the answers

    stub.UnwrapResponses(pb.UnwrapResponsesRequest(
        channel=opened.channel, responses=_run(virtual, opened), close=True), timeout=30)

    assert _worker_states(stack) == before
    with pytest.raises(grpc.RpcError) as closed:
        stub.UnwrapResponses(pb.UnwrapResponsesRequest(channel=opened.channel), timeout=30)
    assert closed.value.code() == grpc.StatusCode.NOT_FOUND


def test_foreseen_answers_are_exactly_what_the_card_sends_and_nothing_stays_behind(
        stack: Path, card, tmp_path: Path) -> None:
    virtual, psd_id = card
    stub = _stub(stack)
    before = _worker_states(stack)
    request = _installing_request(virtual, psd_id, 0x33)
    opened = stub.OpenSecureChannel(request, timeout=60)

    assert opened.channel == ""                         # no handle: nothing to release
    assert _worker_states(stack) == before              # the session keys are already gone
    answers = [bytes(r.data) + r.sw.to_bytes(2, "big") for r in _run(virtual, opened)]
    assert answers == [c.expected_response for c in opened.commands]
    assert answers[0] == b"\x90\x00"                    # EXTERNAL AUTHENTICATE: bare
    assert all(len(a) > 2 for a in answers[1:])         # R-MAC (and R-ENC data) on the rest
    assert set(isd_state(virtual.state).key_sets) == {0x70, 0x01}

    # Another card's answers (other session keys) never match.
    other_state = create_card(tmp_path / "other.json", transport_master=MASTER)
    other = VirtualCard.open(tmp_path / "other.json")
    other.power_on()
    challenge, iu = _initialize(other, 0xFF)
    request.key_set.CopyFrom(_diversified("factory/transport-master", other_state.psd_id))
    request.commands[1].put_key_set.key_set.CopyFrom(_diversified("mk/1", other_state.psd_id))
    request.host_challenge, request.initialize_update_response = challenge, iu
    second = stub.OpenSecureChannel(request, timeout=60)
    assert [c.expected_response for c in second.commands[1:]] != \
        [c.expected_response for c in opened.commands[1:]]


@pytest.mark.parametrize("command, detail", [
    (pb.ChannelCommand(apdu=gp.delete_key_command(0x01),
                       expect=[chpb.ExpectedStatus(value=0x6A88, mask=0xFFFF)]),
     "expect 9000 only"),
    (pb.ChannelCommand(apdu=bytes.fromhex("80F24000024F0000")), "cannot be foreseen"),
])
def test_answers_that_cannot_be_foreseen_are_refused(stack: Path, card, command,
                                                     detail: str) -> None:
    virtual, psd_id = card
    stub = _stub(stack)
    before = _worker_states(stack)
    challenge, iu = _initialize(virtual, 0xFF)
    with pytest.raises(grpc.RpcError) as refused:
        stub.OpenSecureChannel(pb.OpenSecureChannelRequest(
            key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
            host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
            predict_responses=True, commands=[command]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in refused.value.details()
    assert _worker_states(stack) == before


def _new_card(tmp_path: Path, name: str) -> tuple[VirtualCard, str]:
    state = create_card(tmp_path / f"{name}.json", transport_master=MASTER)
    virtual = VirtualCard.open(tmp_path / f"{name}.json")
    virtual.power_on()
    return virtual, state.psd_id


def _foreseen_install(virtual: VirtualCard, psd_id: str) -> pb.OpenSecureChannelRequest:
    challenge, iu = _initialize(virtual, 0xFF)
    return pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
        predict_responses=True, commands=[pb.ChannelCommand(put_key_set=pb.PutKeySet(
            key_set=_diversified("mk/1", psd_id), new_kvn=0x01))])


def test_a_batch_opens_each_cards_channel_and_fails_items_alone(stack: Path,
                                                                tmp_path: Path) -> None:
    cards = [_new_card(tmp_path, f"card{i}") for i in range(3)]
    items = [_foreseen_install(virtual, psd_id) for virtual, psd_id in cards]
    # The third card's INITIALIZE UPDATE answer with the first card's keys: not this card.
    items[2].key_set.CopyFrom(items[0].key_set)
    unforeseen = pb.OpenSecureChannelRequest()
    unforeseen.CopyFrom(items[1])
    unforeseen.predict_responses = False
    before = _worker_states(stack)

    reply = _stub(stack).OpenSecureChannelBatch(
        pb.OpenSecureChannelBatchRequest(items=[*items, unforeseen]), timeout=60)

    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["opened", "opened", "error", "error"]
    assert reply.results[2].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "card cryptogram mismatch" in reply.results[2].error.message
    assert reply.results[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "predict_responses" in reply.results[3].error.message
    for (virtual, _), result in zip(cards[:2], reply.results[:2], strict=True):
        answers = [bytes(r.data) + r.sw.to_bytes(2, "big") for r in _run(virtual, result.opened)]
        assert answers == [c.expected_response for c in result.opened.commands]
        assert 0x01 in isd_state(virtual.state).key_sets
    assert _worker_states(stack) == before              # nothing stays behind


def test_a_batch_with_a_denied_key_is_refused_whole(stack: Path, tmp_path: Path) -> None:
    virtual, psd_id = _new_card(tmp_path, "denied")
    allowed = _foreseen_install(virtual, psd_id)
    denied = pb.OpenSecureChannelRequest()
    denied.CopyFrom(allowed)
    denied.commands[0].put_key_set.key_set.diversified.master_label = "other/1"
    with pytest.raises(grpc.RpcError) as err:
        _stub(stack).OpenSecureChannelBatch(
            pb.OpenSecureChannelBatchRequest(items=[allowed, denied]), timeout=60)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as empty:
        _stub(stack).OpenSecureChannelBatch(pb.OpenSecureChannelBatchRequest(), timeout=60)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _card_with_i(tmp_path: Path, scp_i: int) -> tuple[VirtualCard, str]:
    state = create_card(tmp_path / f"i{scp_i:02x}.json", transport_master=MASTER, scp_i=scp_i)
    virtual = VirtualCard.open(tmp_path / f"i{scp_i:02x}.json")
    virtual.power_on()
    return virtual, state.psd_id


def _installing_request(virtual: VirtualCard, psd_id: str, level: int,
                        **extra) -> pb.OpenSecureChannelRequest:
    challenge, iu = _initialize(virtual, 0xFF)
    return pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=level,
        predict_responses=True, commands=[
            pb.ChannelCommand(put_key_set=pb.PutKeySet(key_set=pb.KeySetSpec(
                token="access", key_length=16, new_random=pb.NewRandom(
                    master_label="mkrk/1", public_key_label="cryptogram/1")), new_kvn=0x70)),
            pb.ChannelCommand(put_key_set=pb.PutKeySet(
                key_set=_diversified("mk/1", psd_id), new_kvn=0x01)),
            pb.ChannelCommand(apdu=gp.delete_key_command(0xFF))], **extra)


@pytest.mark.parametrize("scp_i, level", [
    (0x10, 0x01), (0x10, 0x03), (0x30, 0x11), (0x30, 0x13), (0x60, 0x33), (0x70, 0x33),
])
def test_foreseen_answers_match_the_card_at_every_level_it_offers(
        stack: Path, tmp_path: Path, scp_i: int, level: int) -> None:
    """What the proxy foresees is what the card sends at the level of the channel: an
    R-MAC only with R-MAC (11, 13, 33), encrypted data only with R-ENCRYPTION (33),
    and plain data and status word below that; for pseudo-random (10, 30, 70) and
    random (60) card challenges alike."""
    virtual, psd_id = _card_with_i(tmp_path, scp_i)
    opened = _stub(stack).OpenSecureChannel(_installing_request(virtual, psd_id, level),
                                            timeout=60)
    assert opened.commands[0].apdu[2] == level             # EXTERNAL AUTHENTICATE's P1
    answers = [bytes(r.data) + r.sw.to_bytes(2, "big") for r in _run(virtual, opened)]
    assert answers == [c.expected_response for c in opened.commands]
    assert set(isd_state(virtual.state).key_sets) == {0x70, 0x01}
    put_mk, delete = opened.commands[2], opened.commands[3]
    plain_put = bytes(put_mk.expected_put_key_response) + b"\x90\x00"
    if level & 0x10:                                        # R-MAC: 8 bytes more
        body = 16 if level & 0x20 else len(plain_put) - 2   # R-ENC pads to a block
        assert len(put_mk.expected_response) == body + 8 + 2
        assert put_mk.expected_response != plain_put
        assert len(delete.expected_response) == (16 if level & 0x20 else 1) + 8 + 2
    else:                                                   # no R-MAC: the plain answer
        assert put_mk.expected_response == plain_put
        assert delete.expected_response == b"\x00\x90\x00"


def test_a_level_the_card_does_not_offer_is_refused_and_nothing_is_written(
        stack: Path, tmp_path: Path) -> None:
    virtual, psd_id = _card_with_i(tmp_path, 0x10)
    opened = _stub(stack).OpenSecureChannel(_installing_request(virtual, psd_id, 0x13),
                                            timeout=60)
    answers = _run(virtual, opened)
    assert [a.sw for a in answers] == [0x6A86]             # EXTERNAL AUTHENTICATE refused
    assert set(isd_state(virtual.state).key_sets) == {0xFF}


def test_a_pseudo_random_challenge_is_checked_against_the_named_security_domain(
        stack: Path, tmp_path: Path) -> None:
    stub = _stub(stack)
    virtual, psd_id = _card_with_i(tmp_path, 0x70)
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenSecureChannel(_installing_request(
            virtual, psd_id, 0x33, aid=bytes.fromhex("A0000001510000AA")), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "card challenge mismatch" in err.value.details()
    assert "A0000001510000AA" in err.value.details()
    # The ISD, named or by default, is the domain the card made its challenge for.
    for extra in ({"aid": bytes.fromhex("A000000151000000")}, {}):
        opened = stub.OpenSecureChannel(_installing_request(virtual, psd_id, 0x33, **extra),
                                        timeout=60)
        assert opened.commands[0].expected_response == b"\x90\x00"
    # A card with random challenges has no counter to check: any domain opens.
    random_card, random_id = _card_with_i(tmp_path, 0x60)
    opened = stub.OpenSecureChannel(_installing_request(
        random_card, random_id, 0x33, aid=bytes.fromhex("A0000001510000AA")), timeout=60)
    answers = [bytes(r.data) + r.sw.to_bytes(2, "big") for r in _run(random_card, opened)]
    assert answers == [c.expected_response for c in opened.commands]
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenSecureChannel(_installing_request(virtual, psd_id, 0x33, aid=b"\xA0\x00"),
                               timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "aid" in err.value.details()


def test_commands_up_to_a_certificate_put_are_wrapped_and_longer_ones_refused(
        stack: Path, card) -> None:
    """The longest command a card is sent is the issuance applet's PUT DATA of a certificate
    (extended length); one byte more is refused before anything is wrapped."""
    from cardcore.issuance import MAX_CERTIFICATE, Tag, put_data

    virtual, psd_id = card
    stub = _stub(stack)
    challenge, iu = _initialize(virtual, 0xFF)
    request = pb.OpenSecureChannelRequest(
        key_set=_diversified("factory/transport-master", psd_id), kvn=0xFF,
        host_challenge=challenge, initialize_update_response=iu, security_level=0x33,
        commands=[pb.ChannelCommand(apdu=put_data(Tag.DEVICE_CERTIFICATE,
                                                  os.urandom(MAX_CERTIFICATE)))])
    opened = stub.OpenSecureChannel(request, timeout=60)
    wrapped = opened.commands[1].apdu
    assert wrapped[4] == 0 and int.from_bytes(wrapped[5:7], "big") > MAX_CERTIFICATE
    stub.UnwrapResponses(pb.UnwrapResponsesRequest(channel=opened.channel, close=True),
                         timeout=30)
    request.commands[0].apdu = put_data(Tag.DEVICE_CERTIFICATE, os.urandom(MAX_CERTIFICATE + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenSecureChannel(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "commands[0].apdu: 4 to" in err.value.details()
