"""Key blocks for flow A in HSM1 (token access), put there through a running proxy.

What key management's transfer leaves in HSM1, made directly for tests that
exercise the access server: the card factory's transport master (imported by
a two-component ceremony from a value the test knows, since the test also
makes the virtual cards), MK blocks, the MKRK block and the cryptogram key
pair (generated in the HSM).
"""

from __future__ import annotations

import os
from pathlib import Path

from cardcore.kcv import kcv_zero_block
from cms.runtime.client import load_endpoints
from cms.v1 import hsm_pb2 as pb
from cms.v1 import hsm_pb2_grpc

TOKEN = "access"
IDENTITY = "access-server"


def import_transport_master(hsm: hsm_pb2_grpc.HsmStub, master: bytes,
                            label: str = "factory/transport-master") -> None:
    first = os.urandom(len(master))
    second = bytes(a ^ b for a, b in zip(first, master, strict=True))
    algorithm = {16: pb.AES_128, 24: pb.AES_192, 32: pb.AES_256}[len(master)]
    started = hsm.BeginComponentImport(pb.BeginComponentImportRequest(
        tokens=[TOKEN], algorithm=algorithm, components=2,
        template=pb.KeyTemplate(label=label, usages=[pb.DERIVE])), timeout=30)
    for component in (first, second):
        hsm.AddKeyComponent(pb.AddKeyComponentRequest(
            handle=started.handle, component=component, kcv=kcv_zero_block(component)), timeout=30)


def generate_blocks(hsm: hsm_pb2_grpc.HsmStub, *, mk_versions: tuple[int, ...] = (1, 2),
                    mkrk_version: int = 1, cryptogram_version: int = 1) -> None:
    for label in [f"mk/{v}" for v in mk_versions] + [f"mkrk/{mkrk_version}"]:
        hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
            token=TOKEN, algorithm=pb.AES_128,
            template=pb.KeyTemplate(label=label, usages=[pb.DERIVE])), timeout=30)
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token=TOKEN, algorithm=pb.RSA_2048,
        template=pb.KeyTemplate(label=f"cryptogram/{cryptogram_version}",
                                usages=[pb.DECRYPT])), timeout=60)


def provision(endpoints_path: Path, transport_master: bytes) -> None:
    """Everything flow A needs in HSM1, as identity access-server."""
    channel = load_endpoints(endpoints_path).channel("hsm_proxy", IDENTITY)
    try:
        hsm = hsm_pb2_grpc.HsmStub(channel)
        import_transport_master(hsm, transport_master)
        generate_blocks(hsm)
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
