"""The classic attacks on PKCS#11 APIs, tried against the proxy as its own callers would.

Each test plays a holder of one service's certificate (or a custodian's) and
strings together RPCs that the default policy of `cms dev up` lets that
identity make. The attacks are those of Clulow (CHES 2003) and of the Tookan
catalogue (Bortolozzo, Centenaro, Focardi, Steel, "Attacking and fixing
PKCS#11 security tokens", CCS 2010) that apply to an interface like this one,
and the ones found on this proxy before key classes existed (issue 12). Every
attempt must be refused; ``World.attempt`` fails any test whose responses
carry a protected key (tests/security/conftest.py).
"""

from __future__ import annotations

import os

import grpc
import pytest

from cardcore import gp
from cardcore.kcv import kcv_zero_block
from cardcore.psd import psd_id_bytes
from cms import keynames
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import hsm_pb2 as pb
from cms.v1 import key_blocks_pb2 as bpb
from tests.security.conftest import PSD_ID, TRANSPORT, World
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

HSM1, HSM2 = keynames.HSM1_TOKEN, keynames.HSM2_TOKEN
DENIED = grpc.StatusCode.PERMISSION_DENIED
SERVICE_IDENTITIES = ("access-server", "key-mgmt")
EVERY_IDENTITY = ("access-server", "key-mgmt", "admin", "custodian-1", "card-agent", "stranger")


def _ref(label: str, token: str = HSM1) -> pb.KeyRef:
    return pb.KeyRef(token=token, label=label)


def _template(label: str, *usages: int, extractable: bool = False,
              session: bool = False) -> pb.KeyTemplate:
    return pb.KeyTemplate(label=label, usages=list(usages), extractable=extractable,
                          session=session)


# -- wrap, then decrypt (Clulow) ---------------------------------------------------------

@pytest.mark.parametrize("identity", ["key-mgmt", "access-server", "admin"])
def test_no_identity_can_make_a_key_that_wraps_and_decrypts(world: World, identity: str):
    for token, label in ((HSM2, "demo/wrap-decrypt"), (HSM1, "demo/wrap-decrypt"),
                         (HSM2, "kms/wrapper")):
        world.refused(identity, "Hsm", "GenerateSecretKey", pb.GenerateSecretKeyRequest(
            token=token, algorithm=pb.AES_256,
            template=_template(label, pb.WRAP, pb.DECRYPT)))
        world.refused(identity, "Hsm", "GenerateSecretKey", pb.GenerateSecretKeyRequest(
            token=token, algorithm=pb.AES_256, template=_template(label, pb.WRAP)))


def test_the_generic_wrap_and_unwrap_primitives_are_gone(world: World):
    """WrapKey and UnwrapKey are not in the contract any more: UNIMPLEMENTED for everyone."""
    for identity in ("key-mgmt", "access-server", "admin"):
        channel = world.proxy.channel(identity)
        for method in ("WrapKey", "UnwrapKey", "BeginComponentImport", "AddKeyComponent",
                       "SetAttributeValue", "CopyObject"):
            call = channel.unary_unary(f"/cms.v1.Hsm/{method}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=30)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_block_cannot_be_wrapped_out_under_anything_but_a_trusted_transport_key(world: World):
    km = "key-mgmt"
    # Back from HSM1 to HSM2 (where key management could then move it further): HSM1 holds
    # transferred blocks, and a transfer takes generated ones only; HSM1's half only unwraps.
    world.refused(km, "KeyBlocks", "TransferBlocks", bpb.TransferBlocksRequest(
        source_token=HSM1, target_token=HSM2, transport_label=TRANSPORT, labels=["mk/1"]))
    # Under an operator key instead of a transport key: not a transport key's label.
    world.refused(km, "KeyBlocks", "TransferBlocks", bpb.TransferBlocksRequest(
        source_token=HSM2, target_token=HSM1, transport_label="demo/mine", labels=["mk/1"]))
    # Of a key that is no block.
    world.refused(km, "KeyBlocks", "TransferBlocks", bpb.TransferBlocksRequest(
        source_token=HSM2, target_token=HSM1, transport_label=TRANSPORT,
        labels=[TRANSPORT]))


def test_a_transport_key_cannot_encrypt_decrypt_or_sign(world: World):
    for identity in ("key-mgmt", "admin"):
        for token in (HSM1, HSM2):
            for method, request in (
                    ("Encrypt", pb.CipherRequest(key=_ref(TRANSPORT, token),
                                                 mechanism=pb.CIPHER_AES_ECB, data=bytes(16))),
                    ("Decrypt", pb.CipherRequest(key=_ref(TRANSPORT, token),
                                                 mechanism=pb.CIPHER_AES_ECB, data=bytes(16))),
                    ("Sign", pb.SignRequest(key=_ref(TRANSPORT, token), mechanism=pb.AES_CMAC,
                                            data=b"x"))):
                world.refused(identity, "Hsm", method, request)


# -- extractable or weaker derivation ------------------------------------------------------

@pytest.mark.parametrize("extractable", [True, False])
def test_no_derivation_from_a_master_outside_cardkeys(world: World, extractable: bool):
    for identity in ("access-server", "admin"):
        for master in ("mk/1", "mkrk/1", keynames.FACTORY_TRANSPORT_MASTER):
            world.refused(identity, "Hsm", "DeriveKey", pb.DeriveKeyRequest(
                base_key=_ref(master), mechanism=pb.AES_ECB_ENCRYPT_DATA, data=os.urandom(16),
                algorithm=pb.AES_128,
                template=_template("demo/derived", pb.ENCRYPT, extractable=extractable,
                                   session=True)))


def test_a_card_key_set_handle_is_usable_only_as_a_channel_key_set(world: World):
    """DeriveKeySet gives the access server a handle to a card's keys: it opens channels
    and does nothing else (no sign, cipher or wrap of it, no PUT KEY of it)."""
    code, keyset = world.attempt("access-server", "CardKeys", "DeriveKeySet",
                                 kpb.DeriveKeySetRequest(spec=kpb.KeySetSpec(
                                     token=HSM1, key_length=16, diversified=kpb.Diversified(
                                         master_label="mk/1",
                                         element=psd_id_bytes(PSD_ID)))))
    assert code == grpc.StatusCode.OK and keyset.handle
    handle = pb.KeyRef(handle=keyset.handle)
    for method, request in (
            ("Sign", pb.SignRequest(key=handle, mechanism=pb.AES_CMAC, data=b"x")),
            ("Encrypt", pb.CipherRequest(key=handle, mechanism=pb.CIPHER_AES_ECB,
                                         data=bytes(16))),
            ("GetKeyAttributes", pb.GetKeyAttributesRequest(key=handle)),
            ("DeriveKey", pb.DeriveKeyRequest(base_key=handle,
                                              mechanism=pb.AES_ECB_ENCRYPT_DATA,
                                              data=bytes(16), algorithm=pb.AES_128,
                                              template=_template("demo/x", pb.ENCRYPT,
                                                                 session=True)))):
        world.refused("access-server", "Hsm", method, request, DENIED,
                      grpc.StatusCode.INVALID_ARGUMENT)
    # Another identity cannot even name it.
    world.refused("admin", "Hsm", "Sign", pb.SignRequest(key=handle, mechanism=pb.AES_CMAC,
                                                         data=b"x"))
    world.refused("admin", "CardKeys", "DeriveKeySet", kpb.DeriveKeySetRequest(
        spec=kpb.KeySetSpec(handle=keyset.handle)))


def test_put_key_data_is_only_made_for_a_card_that_proved_its_keys(world: World):
    """PUT KEY key data is the card's new keys under its DEK: the proxy makes it only
    inside a channel whose card cryptogram verified, so a forged INITIALIZE UPDATE
    answer gets nothing, and a key set handle is never a PUT KEY's source."""
    mk_set = kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
        master_label="mk/1", element=psd_id_bytes(PSD_ID)))
    forged = bytes(10) + b"\x00\x03\x70" + b"\x00" * 16 + bytes(3)
    world.refused("access-server", "CardKeys", "OpenSecureChannel", kpb.OpenSecureChannelRequest(
        key_set=kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
            master_label=keynames.FACTORY_TRANSPORT_MASTER, element=psd_id_bytes(PSD_ID))),
        kvn=0xFF, host_challenge=os.urandom(8), initialize_update_response=forged,
        security_level=0x33, predict_responses=True,
        commands=[kpb.ChannelCommand(put_key_set=kpb.PutKeySet(key_set=mk_set, new_kvn=1))]),
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    code, keyset = world.attempt("access-server", "CardKeys", "DeriveKeySet",
                                 kpb.DeriveKeySetRequest(spec=mk_set))
    assert code == grpc.StatusCode.OK
    world.refused("access-server", "CardKeys", "OpenSecureChannel", kpb.OpenSecureChannelRequest(
        key_set=mk_set, kvn=1, host_challenge=os.urandom(8), initialize_update_response=forged,
        security_level=0x33, predict_responses=True,
        commands=[kpb.ChannelCommand(put_key_set=kpb.PutKeySet(
            key_set=kpb.KeySetSpec(handle=keyset.handle), new_kvn=2))]),
        grpc.StatusCode.INVALID_ARGUMENT)


def test_masters_serve_only_the_sources_of_their_class(world: World):
    """An MKRK block is diversified only by a random R, an MK block or the factory master
    only by a PSD id, and only a cryptogram pair makes or opens cryptograms."""
    for spec in (
            kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
                master_label="mkrk/1", element=psd_id_bytes(PSD_ID))),
            kpb.KeySetSpec(token=HSM1, key_length=16, new_random=kpb.NewRandom(
                master_label="mk/1", public_key_label="cryptogram/1")),
            kpb.KeySetSpec(token=HSM1, key_length=16, new_random=kpb.NewRandom(
                master_label="mkrk/1", public_key_label="mk/1")),
            kpb.KeySetSpec(token=HSM1, key_length=16, from_cryptogram=kpb.FromCryptogram(
                master_label="mkrk/1", private_key_label=TRANSPORT, cryptogram=bytes(256)))):
        world.refused("access-server", "CardKeys", "DeriveKeySet",
                      kpb.DeriveKeySetRequest(spec=spec))


# -- planted masters --------------------------------------------------------------------

def test_no_caller_can_plant_or_destroy_a_master(world: World):
    for identity in ("access-server", "key-mgmt", "admin"):
        for token in (HSM1, HSM2):
            for label in ("mk/99", "mkrk/9", "cryptogram/9", "factory/transport-master"):
                world.refused(identity, "Hsm", "GenerateSecretKey", pb.GenerateSecretKeyRequest(
                    token=token, algorithm=pb.AES_128, template=_template(label, pb.DERIVE)))
            world.refused(identity, "Hsm", "DestroyKey", pb.DestroyKeyRequest(key=_ref("mk/1",
                                                                                       token)))
        world.refused(identity, "KeyBlocks", "GenerateBlock", bpb.GenerateBlockRequest(
            token=HSM1, role=pb.MK_BLOCK, label="mk/99", algorithm=pb.AES_128))
    # Key management generates blocks in HSM2 only, and with a block class's label only.
    world.refused("key-mgmt", "KeyBlocks", "GenerateBlock", bpb.GenerateBlockRequest(
        token=HSM2, role=pb.MK_BLOCK, label="transport/mine", algorithm=pb.AES_128))


def test_a_master_put_into_hsm1_behind_the_proxys_back_is_refused(world: World):
    """Someone with the token PIN plants mk/98 (no tag) and mk/97 (a forged tag, but
    extractable): CardKeys refuses both, with the reason, and audits the refusal."""
    raw = RawToken(world.env.hsm, HSM1)
    raw.create_aes("mk/98", os.urandom(16), ["DERIVE"])
    from hsm_proxy.key_classes import Tag

    raw.create_aes("mk/97", os.urandom(16), ["DERIVE"], extractable=True,
                   tag=Tag(pb.MK_BLOCK, pb.TRANSFERRED).encode())
    for label, reason in (("mk/98", "no tag"), ("mk/97", "does not match its class")):
        message = world.refused("access-server", "CardKeys", "DeriveKeySet",
                                kpb.DeriveKeySetRequest(spec=kpb.KeySetSpec(
                                    token=HSM1, key_length=16, diversified=kpb.Diversified(
                                        master_label=label, element=psd_id_bytes(PSD_ID)))))
        assert reason in message and label in message
    lines = world.env.audit_path.read_text().splitlines()
    assert any('"mk/98"' in line and '"denied"' in line for line in lines)


# -- the cryptogram key -------------------------------------------------------------------

def test_no_identity_can_open_a_cryptogram(world: World):
    for identity in EVERY_IDENTITY:
        world.refused(identity, "Hsm", "Decrypt", pb.CipherRequest(
            key=_ref("cryptogram/1"), mechanism=pb.CIPHER_RSA_OAEP_SHA1, data=world.sealed_r),
            DENIED)
    # CardKeys uses it, but only to derive an MKRK set; R stays in the worker.
    code, keyset = world.attempt("access-server", "CardKeys", "DeriveKeySet",
                                 kpb.DeriveKeySetRequest(spec=kpb.KeySetSpec(
                                     token=HSM1, key_length=16,
                                     from_cryptogram=kpb.FromCryptogram(
                                         master_label="mkrk/1", private_key_label="cryptogram/1",
                                         cryptogram=world.sealed_r))))
    assert code == grpc.StatusCode.OK and len(keyset.kcv_enc) == 3


# -- keys the caller knows or chose ---------------------------------------------------------

def test_no_public_key_a_caller_chose_can_wrap(world: World):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(
    ).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for identity in ("key-mgmt", "admin"):
        for token in (HSM1, HSM2):
            world.refused(identity, "Hsm", "ImportPublicKey", pb.ImportPublicKeyRequest(
                token=token, public_key_der=der, label="demo/attacker-rsa", usages=[pb.WRAP]))


def test_a_ceremony_needs_distinct_custodians_and_never_its_starter(world: World):
    """One identity entering every component would know the transport key."""
    km = world.stub("key-mgmt", "KeyBlocks")
    begun = km.BeginCeremony(bpb.BeginCeremonyRequest(
        role=pb.TRANSPORT_KEY, label="transport/solo", algorithm=pb.AES_128, components=2,
        source_token=HSM2, target_token=HSM1), timeout=60)
    first, second = os.urandom(16), os.urandom(16)

    def add(identity: str, part: bytes) -> bpb.AddComponentRequest:
        return bpb.AddComponentRequest(ceremony_id=begun.ceremony_id, component=part,
                                       kcv=kcv_zero_block(part))

    world.refused("key-mgmt", "KeyBlocks", "AddComponent", add("key-mgmt", first))
    for identity in ("access-server", "admin", "card-agent", "stranger"):
        world.refused(identity, "KeyBlocks", "AddComponent", add(identity, first))
    code, _ = world.attempt("custodian-1", "KeyBlocks", "AddComponent", add("custodian-1", first))
    assert code == grpc.StatusCode.OK
    message = world.refused("custodian-1", "KeyBlocks", "AddComponent",
                            add("custodian-1", second))
    assert "different custodian" in message
    # It still waits for a second custodian: nothing was made.
    status = km.GetCeremony(bpb.GetComponentCeremonyRequest(ceremony_id=begun.ceremony_id),
                            timeout=60)
    assert status.state == bpb.COMPONENT_CEREMONY_AWAITING and status.received == 1
    listed = world.stub("admin", "KeyBlocks").ListBlocks(bpb.ListBlocksRequest(
        token=HSM2, label_pattern="transport/solo"), timeout=60).keys
    assert not listed
    km.CancelCeremony(bpb.GetComponentCeremonyRequest(ceremony_id=begun.ceremony_id), timeout=60)


def test_no_rpc_changes_attributes_and_no_key_can_be_changed(world: World):
    """No RPC sets or copies attributes (flipping CKA_SENSITIVE or CKA_EXTRACTABLE), and
    every key the proxy made is neither modifiable nor copyable in the token itself."""
    from cms.v1 import card_keys_pb2, hsm_pb2, key_blocks_pb2, provider_pb2

    names = {m.name for module in (hsm_pb2, card_keys_pb2, key_blocks_pb2, provider_pb2)
             for service in module.DESCRIPTOR.services_by_name.values()
             for m in service.methods}
    assert not [n for n in names if n.startswith(("Set", "Copy", "Modify", "Update"))]
    for token, label in ((HSM2, "mk/1"), (HSM1, "mk/1"), (HSM2, TRANSPORT), (HSM1, TRANSPORT),
                         (HSM1, keynames.FACTORY_TRANSPORT_MASTER), (HSM1, "cryptogram/1")):
        for obj in RawToken(world.env.hsm, token).read(label, ["MODIFIABLE", "COPYABLE",
                                                               "SENSITIVE", "CLASS"]):
            assert obj["MODIFIABLE"] is False and obj["COPYABLE"] is False, (token, label, obj)


def test_session_handles_belong_to_their_creator(world: World):
    code, keyset = world.attempt("access-server", "CardKeys", "DeriveKeySet",
                                 kpb.DeriveKeySetRequest(spec=kpb.KeySetSpec(
                                     token=HSM1, key_length=16, diversified=kpb.Diversified(
                                         master_label=keynames.FACTORY_TRANSPORT_MASTER,
                                         element=psd_id_bytes(PSD_ID)))))
    assert code == grpc.StatusCode.OK
    for identity in ("key-mgmt", "admin", "custodian-1"):
        world.refused(identity, "CardKeys", "OpenSecureChannel", kpb.OpenSecureChannelRequest(
            key_set=kpb.KeySetSpec(handle=keyset.handle), kvn=0xFF, host_challenge=bytes(8),
            initialize_update_response=bytes(29), security_level=0x33))
        # Releasing another identity's handle releases nothing.
        code, reply = world.attempt(identity, "Hsm", "ReleaseHandles",
                                    pb.ReleaseHandlesRequest(handles=[keyset.handle]))
        assert code == grpc.StatusCode.OK and reply.released == 0


def test_a_real_channel_reveals_no_card_key(world: World, tmp_path):
    """The purpose itself, on a card whose keys the test knows: the answers are wrapped
    APDUs and check values, never a key (World.attempt scans them)."""
    from tests.security.conftest import FACTORY_MASTER
    from virtual_psd.card import VirtualCard
    from virtual_psd.factory import create_card

    path = tmp_path / "card.json"
    create_card(path, psd_id=PSD_ID, transport_master=FACTORY_MASTER)
    card = VirtualCard.open(path)
    card.power_on()
    try:
        card.transmit(gp.select_command())
        challenge = os.urandom(8)
        answer = card.transmit(gp.initialize_update_command(0xFF, challenge))
        assert answer[-2:] == b"\x90\x00"
        code, opened = world.attempt("access-server", "CardKeys", "OpenSecureChannel",
                                     kpb.OpenSecureChannelRequest(
            key_set=kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
                master_label=keynames.FACTORY_TRANSPORT_MASTER, element=psd_id_bytes(PSD_ID))),
            kvn=0xFF, host_challenge=challenge, initialize_update_response=answer[:-2],
            security_level=0x33, predict_responses=True,
            commands=[kpb.ChannelCommand(put_key_set=kpb.PutKeySet(
                key_set=kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
                    master_label="mk/1", element=psd_id_bytes(PSD_ID))), new_kvn=1),
                expect=[])]))
        assert code == grpc.StatusCode.OK, "the purpose itself must work"
        for wrapped in opened.commands:
            assert card.transmit(wrapped.apdu)[-2:] == b"\x90\x00"
    finally:
        card.power_off()
    assert world.attempts > 0


def test_the_scan_catches_a_leaked_key(world: World):
    """The suite's own check can fail: a value it knows, and a key it knows only by check
    value (confirmed in the token), are both caught inside a response."""
    probe = os.urandom(16)
    RawToken(world.env.hsm, HSM1).create_aes("demo/scan-probe", probe, ["DERIVE"])
    world.kcvs["demo/scan-probe"] = kcv_zero_block(probe)
    try:
        with pytest.raises(AssertionError, match="demo/scan-probe"):
            world.scan(b"\x01\x02" + probe + b"\x03", "probe")
        with pytest.raises(AssertionError, match="factory transport master"):
            world.scan(b"xx" + world.known["factory transport master"].hex().encode(), "probe")
        world.scan(os.urandom(64), "noise")
    finally:
        del world.kcvs["demo/scan-probe"]
