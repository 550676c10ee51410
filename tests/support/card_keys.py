"""Key blocks for flow A in HSM1 (token access), put there the way an operator does.

Through key management (identity admin) and the custodians (their own
certificates, straight to the proxy): the card factory's transport master
from a two-component ceremony of a value the test knows (the test also makes
the virtual cards), a transport key from another ceremony, MK blocks, the
MKRK block and the cryptogram key pair generated in HSM2 and transferred.
The access server uses only what key management transferred.
"""

from __future__ import annotations

import os
from pathlib import Path

from cardcore.kcv import kcv_zero_block
from cms import keynames
from cms.runtime.client import Endpoints, load_endpoints
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_blocks_pb2_grpc, key_mgmt_pb2_grpc
from cms.v1 import key_mgmt_pb2 as mpb
from deploy.pki import CUSTODIANS

TOKEN = keynames.HSM1_TOKEN
IDENTITY = "access-server"
TRANSPORT = "transport/test"
TIMEOUT = 60


def split(value: bytes, parts: int = 2) -> list[bytes]:
    """``parts`` random components whose XOR is ``value``."""
    components = [os.urandom(len(value)) for _ in range(parts - 1)]
    last = bytearray(value)
    for c in components:
        for i, byte in enumerate(c):
            last[i] ^= byte
    return [*components, bytes(last)]


def enter_components(endpoints: Endpoints, ceremony_id: str, value: bytes,
                     custodians: tuple[str, ...] = CUSTODIANS[:2]) -> bpb.ComponentCeremony:
    """Each custodian enters one component of ``value``, straight to the proxy."""
    done = None
    for custodian, component in zip(custodians, split(value, len(custodians)), strict=True):
        channel = endpoints.channel("hsm_proxy", custodian)
        try:
            done = key_blocks_pb2_grpc.KeyBlocksStub(channel).AddComponent(
                bpb.AddComponentRequest(ceremony_id=ceremony_id, component=component,
                                        kcv=kcv_zero_block(component)), timeout=TIMEOUT)
        finally:
            channel.close()
    assert done is not None
    return done


def ceremony(endpoints: Endpoints, km: key_mgmt_pb2_grpc.KeyManagementStub, label: str,
             value: bytes, *, factory_master: bool = False) -> mpb.Ceremony:
    algorithm = {16: mpb.BLOCK_AES_128, 32: mpb.BLOCK_AES_256}[len(value)]
    started = km.StartCeremony(mpb.StartCeremonyRequest(
        label=label, algorithm=algorithm, components=2,
        purpose=mpb.TRANSPORT_MASTER if factory_master else 0), timeout=TIMEOUT)
    enter_components(endpoints, started.ceremony_id, value)
    return km.GetCeremony(mpb.GetCeremonyRequest(ceremony_id=started.ceremony_id),
                          timeout=TIMEOUT)


def provision(endpoints_path: Path, transport_master: bytes, *,
              mk_versions: int = 2) -> list[str]:
    """Everything flow A needs in HSM1, through key management; returns the block labels."""
    endpoints = load_endpoints(endpoints_path)
    channel = endpoints.channel("key_mgmt", "admin")
    try:
        km = key_mgmt_pb2_grpc.KeyManagementStub(channel)
        ceremony(endpoints, km, keynames.FACTORY_TRANSPORT_MASTER, transport_master,
                 factory_master=True)
        ceremony(endpoints, km, TRANSPORT, os.urandom(16))
        labels = []
        for kind in [mpb.MK] * mk_versions + [mpb.MKRK, mpb.CRYPTOGRAM_KEY_PAIR]:
            labels.append(km.CreateKeyBlock(mpb.CreateKeyBlockRequest(kind=kind),
                                            timeout=TIMEOUT).label)
        km.TransferKeyBlocks(mpb.TransferKeyBlocksRequest(transport_label=TRANSPORT,
                                                          labels=labels), timeout=TIMEOUT)
        return labels
    finally:
        channel.close()


def reproduces_card_keys(endpoints_path: Path, card_path: Path, psd_id: str, *,
                         mk_version: int, cryptogram: bytes,
                         cryptogram_label: str = "cryptogram/1", mkrk_version: int = 1) -> bool:
    """Whether HSM1 can still open the card: its MK set (diversified by PSD id) and its MKRK
    set (from the stored cryptogram) each authenticate a channel with the card."""
    from cardcore import gp
    from cardcore.psd import psd_id_bytes
    from cms.v1 import card_keys_pb2 as kpb
    from cms.v1 import card_keys_pb2_grpc
    from virtual_psd.card import VirtualCard

    specs = {
        mk_version: kpb.KeySetSpec(token=TOKEN, key_length=16, diversified=kpb.Diversified(
            master_label=f"mk/{mk_version}", element=psd_id_bytes(psd_id))),
        0x70: kpb.KeySetSpec(token=TOKEN, key_length=16, from_cryptogram=kpb.FromCryptogram(
            master_label=f"mkrk/{mkrk_version}", private_key_label=cryptogram_label,
            cryptogram=cryptogram)),
    }
    channel = load_endpoints(endpoints_path).channel("hsm_proxy", IDENTITY)
    stub = card_keys_pb2_grpc.CardKeysStub(channel)
    card = VirtualCard.open(card_path)
    card.power_on()
    try:
        for kvn, spec in specs.items():
            card.transmit(gp.select_command())
            challenge = os.urandom(8)
            raw = card.transmit(gp.initialize_update_command(kvn, challenge))
            if raw[-2:] != b"\x90\x00":
                return False
            try:
                opened = stub.OpenSecureChannel(kpb.OpenSecureChannelRequest(
                    key_set=spec, kvn=kvn, host_challenge=challenge,
                    initialize_update_response=raw[:-2], security_level=0x33), timeout=30)
            except Exception:
                return False
            if card.transmit(opened.commands[0].apdu)[-2:] != b"\x90\x00":
                return False
            stub.UnwrapResponses(kpb.UnwrapResponsesRequest(channel=opened.channel, close=True),
                                 timeout=30)
        return True
    finally:
        card.power_off()
        channel.close()
