"""Mutual TLS: who gets in, who does not, and that only TLS 1.3 is spoken."""

from __future__ import annotations

import socket
import ssl

import grpc
import pytest

from cms.runtime.tls import TlsFiles, secure_channel
from cms.v1 import hsm_pb2 as pb
from cms.v1 import hsm_pb2_grpc
from tests.hsm_proxy.helpers import TIMEOUT
from tests.support.pki import expired_identity, foreign_identity

pytestmark = pytest.mark.integration

HANDSHAKE_TIMEOUT = 10


def _list_tokens(address: str, files: TlsFiles) -> grpc.RpcError | pb.ListTokensResponse:
    channel = secure_channel(address, files)
    try:
        return hsm_pb2_grpc.HsmStub(channel).ListTokens(pb.ListTokensRequest(),
                                                        timeout=HANDSHAKE_TIMEOUT)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


def _assert_still_serving(proxy) -> None:
    reply = proxy.hsm("admin").ListTokens(pb.ListTokensRequest(), timeout=TIMEOUT)
    assert {t.label for t in reply.tokens} == {"access", "kms"}


def test_no_client_certificate_fails_the_handshake(proxy, proxy_env):
    result = _list_tokens(proxy.address, TlsFiles(proxy_env.pki.ca))
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    _assert_still_serving(proxy)


def test_certificate_from_another_ca_fails_the_handshake(proxy, proxy_env, tmp_path):
    rogue = foreign_identity(tmp_path / "rogue", "access-server")
    result = _list_tokens(proxy.address, TlsFiles(proxy_env.pki.ca, rogue.cert, rogue.key))
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    _assert_still_serving(proxy)


def test_expired_certificate_fails_the_handshake(proxy, proxy_env, tmp_path):
    old = expired_identity(proxy_env.pki, tmp_path / "expired", "access-server")
    result = _list_tokens(proxy.address, TlsFiles(proxy_env.pki.ca, old.cert, old.key))
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    _assert_still_serving(proxy)


def test_valid_certificate_of_an_unknown_identity_is_denied(proxy, proxy_env):
    result = _list_tokens(proxy.address, proxy_env.tls("stranger"))
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'stranger'" in result.details() and "not in the proxy policy" in result.details()
    _assert_still_serving(proxy)


def _tls_client(proxy_env, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    files = proxy_env.tls("admin")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(files.ca)
    context.load_cert_chain(files.cert, files.key)
    context.maximum_version = maximum
    context.set_alpn_protocols(["h2"])
    return context


def _connect(proxy, context: ssl.SSLContext) -> str | None:
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HANDSHAKE_TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.version()


def test_only_tls_1_3_is_negotiated(proxy, proxy_env):
    assert _connect(proxy, _tls_client(proxy_env, ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        _connect(proxy, _tls_client(proxy_env, ssl.TLSVersion.TLSv1_2))
    _assert_still_serving(proxy)
