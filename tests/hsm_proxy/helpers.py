"""Small helpers shared by the proxy tests: references, errors, software crypto."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import cmac, hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cms.v1 import hsm_pb2 as pb

TIMEOUT = 30


def unique(prefix: str) -> str:
    """A label no other test uses (tests share one proxy and its tokens)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def label_ref(label: str, token: str = "access") -> pb.KeyRef:  # noqa: S107 (token label)
    return pb.KeyRef(token=token, label=label)


def handle_ref(handle: str) -> pb.KeyRef:
    return pb.KeyRef(handle=handle)


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call ``fn`` expecting a gRPC error; return it."""
    kwargs.setdefault("timeout", TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def template(label: str, *usages: int, extractable: bool = False,
             session: bool = False) -> pb.KeyTemplate:
    return pb.KeyTemplate(label=label, usages=list(usages), extractable=extractable,
                          session=session)


# -- software references ------------------------------------------------------------

def kcv(key: bytes) -> bytes:
    """KCV_ZERO_BLOCK: AES-ECB(key, 16 x 00)[:3]."""
    return aes_ecb(key, bytes(16))[:3]


def aes_ecb(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return enc.update(data) + enc.finalize()


def aes_cbc(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def aes_cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def public_key(hsm: Any, ref: pb.KeyRef) -> Any:
    der = hsm.GetPublicKey(pb.GetPublicKeyRequest(key=ref), timeout=TIMEOUT).public_key_der
    return serialization.load_der_public_key(der)


def verify_ecdsa(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes,
                 prehashed: bool) -> None:
    """Raise InvalidSignature unless ``signature`` (r||s) signs ``data``."""
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    half = len(signature) // 2
    der = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                               int.from_bytes(signature[half:], "big"))
    algorithm = ec.ECDSA(Prehashed(hashes.SHA256())) if prehashed else ec.ECDSA(hashes.SHA256())
    public.verify(der, data, algorithm)


def verify_rsa(public: rsa.RSAPublicKey, signature: bytes, data: bytes, pss: bool) -> None:
    pad = (padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32) if pss
           else padding.PKCS1v15())
    public.verify(signature, data, pad, hashes.SHA256())


def oaep_sha1() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303


def ceremony(proxy: Any, label: str, value: bytes, *, role: int = pb.TRANSPORT_KEY,
             source: str = "kms", target: str = "access", starter: str = "access-server",
             custodians: tuple[str, ...] = ("custodian-1", "custodian-2")) -> Any:
    """A KeyBlocks ceremony whose components (one per custodian, each under its own
    identity) XOR to ``value``; returns the completed ComponentCeremony."""
    from cms.v1 import key_blocks_pb2 as bpb
    from cms.v1 import key_blocks_pb2_grpc

    algorithm = {16: pb.AES_128, 24: pb.AES_192, 32: pb.AES_256}[len(value)]
    begun = key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel(starter)).BeginCeremony(
        bpb.BeginCeremonyRequest(role=role, label=label, algorithm=algorithm,
                                 components=len(custodians),
                                 source_token=source if role == pb.TRANSPORT_KEY else "",
                                 target_token=target), timeout=TIMEOUT)
    parts = [secrets.token_bytes(len(value)) for _ in custodians[1:]]
    last = bytearray(value)
    for part in parts:
        for i, byte in enumerate(part):
            last[i] ^= byte
    done = None
    for custodian, part in zip(custodians, [*parts, bytes(last)], strict=True):
        done = key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel(custodian)).AddComponent(
            bpb.AddComponentRequest(ceremony_id=begun.ceremony_id, component=part,
                                    kcv=kcv(part)), timeout=TIMEOUT)
    return done
