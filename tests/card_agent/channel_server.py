"""A small CardChannel server for the agent's tests: real gRPC, real mutual TLS.

Each test gives the server a *conversation*: a generator function that gets
the agent's hello and a ``receive()`` for its next message, and yields the
ServerMessages to send. What the agent sent is recorded for assertions.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from cms.runtime.tls import TlsFiles, peer_identity, server_credentials
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc as pb_grpc
from deploy.pki import Pki

Receive = Callable[[], pb.AgentMessage]
Conversation = Callable[[pb.AgentHello, Receive, grpc.ServicerContext],
                        Iterator[pb.ServerMessage]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Record:
    hellos: list[pb.AgentHello] = field(default_factory=list)
    identities: list[str | None] = field(default_factory=list)
    results: list[pb.ScriptResult] = field(default_factory=list)
    sessions_ended: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Servicer(pb_grpc.CardChannelServicer):
    def __init__(self, conversation: Conversation, record: Record):
        self.conversation = conversation
        self.record = record

    def Connect(self, request_iterator, context):
        first = next(request_iterator)
        with self.record.lock:
            self.record.hellos.append(first.hello)
            self.record.identities.append(peer_identity(context))

        def receive() -> pb.AgentMessage:
            message = next(request_iterator)
            if message.WhichOneof("msg") == "result":
                with self.record.lock:
                    self.record.results.append(message.result)
            return message

        try:
            yield from self.conversation(first.hello, receive, context)
        finally:
            with self.record.lock:
                self.record.sessions_ended += 1


class ChannelServer:
    """A CardChannel server on 127.0.0.1 with the access server's certificate."""

    def __init__(self, pki: Pki, conversation: Conversation, port: int | None = None,
                 *, require_client_auth: bool = True):
        self.pki = pki
        self.port = port or free_port()
        self.record = Record()
        ident = pki.identity("access-server")
        creds = server_credentials(TlsFiles(pki.ca, ident.cert, ident.key),
                                   require_client_auth=require_client_auth)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CardChannelServicer_to_server(_Servicer(conversation, self.record),
                                                  self.server)
        bound = self.server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        assert bound == self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ChannelServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None).wait()

    def __enter__(self) -> ChannelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
