"""gRPC server scaffolding shared by every service.

``GrpcService`` binds the port with mutual TLS, registers the standard health
service and server reflection, exposes Prometheus metrics over HTTP, counts and
times every RPC, writes a *ready file* once serving (ports chosen by the kernel
when 0 is configured, so launchers never race for ports) and shuts down
gracefully on SIGTERM/SIGINT: health turns NOT_SERVING, in-flight calls get a
grace period, then the service's own cleanup runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from cms.runtime.errors import status_from_number
from cms.runtime.logs import fields
from cms.runtime.tls import TlsFiles, server_credentials

log = logging.getLogger("cms.server")

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

RPC_HANDLED = Counter(
    "cms_grpc_server_handled_total", "RPCs completed, by method and status code",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "cms_grpc_server_handling_seconds", "RPC handling time", ["service", "method"],
    buckets=RPC_BUCKETS,
)


def _split_method(full: str) -> tuple[str, str]:
    # "/cms.v1.Hsm/Sign" -> ("cms.v1.Hsm", "Sign")
    parts = full.rsplit("/", 2)
    return (parts[-2], parts[-1]) if len(parts) >= 2 else ("", full)


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        known = status_from_number(code)
        if known is not None:
            return known.name
    return "UNKNOWN" if failed else "OK"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC (unary and streaming)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if service.startswith("grpc."):
            return handler  # health and reflection: not our traffic

        def wrap_unary(fn):
            def inner(request, context):
                start = time.perf_counter()
                failed = False
                try:
                    return fn(request, context)
                except BaseException:
                    failed = True
                    raise
                finally:
                    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)
                    RPC_HANDLED.labels(service, method, _code_name(context, failed)).inc()
            return inner

        def wrap_stream(fn):
            def inner(request, context):
                start = time.perf_counter()
                failed = False
                try:
                    yield from fn(request, context)
                except BaseException:
                    failed = True
                    raise
                finally:
                    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)
                    RPC_HANDLED.labels(service, method, _code_name(context, failed)).inc()
            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler


@dataclass
class ServerSettings:
    """Network and TLS settings common to every server."""

    listen: str = "127.0.0.1:0"
    metrics_listen: str | None = "127.0.0.1:0"
    tls: TlsFiles | None = None
    require_client_auth: bool = True
    max_workers: int = 32
    max_message_bytes: int = 16 * 1024 * 1024
    grace_seconds: float = 5.0
    ready_file: Path | None = None
    extra_options: list[tuple[str, object]] = field(default_factory=list)


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class GrpcService:
    """Runs one gRPC server until SIGTERM/SIGINT (or ``stop()``)."""

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        register: Callable[[grpc.Server], Iterable[str]],
        *,
        interceptors: Iterable[grpc.ServerInterceptor] = (),
        on_stop: Callable[[], None] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ):
        self.name = name
        self.settings = settings
        self._register = register
        self._interceptors = [MetricsInterceptor(), *interceptors]
        self._on_stop = on_stop
        self._registry = registry
        self._stopping = threading.Event()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.server: grpc.Server | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._service_names: list[str] = []

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *s.extra_options,
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix=self.name),
            interceptors=self._interceptors,
            options=options,
            maximum_concurrent_rpcs=None,
        )
        names = list(self._register(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._service_names = names
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            server,
        )
        if s.tls is None:
            raise ValueError(f"{self.name}: TLS settings are required")
        creds = server_credentials(s.tls, require_client_auth=s.require_client_auth)
        port = server.add_secure_port(s.listen, creds)
        if port == 0:
            raise OSError(f"{self.name}: cannot listen on {s.listen}")
        self.grpc_port = port
        if s.metrics_listen:
            host, mport = _split_hostport(s.metrics_listen)
            httpd, _thread = start_http_server(mport, addr=host, registry=self._registry)
            self._metrics_server = httpd
            self.metrics_port = httpd.server_address[1]
        server.start()
        self.server = server
        for n in ["", *names]:
            self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
        self._write_ready_file()
        log.info("serving", extra=fields(grpc=self.grpc_address, metrics=self.metrics_url,
                                         pid=os.getpid()))

    @property
    def grpc_address(self) -> str:
        host, _ = _split_hostport(self.settings.listen)
        return f"{host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None or not self.settings.metrics_listen:
            return None
        host, _ = _split_hostport(self.settings.metrics_listen)
        return f"http://{host}:{self.metrics_port}/metrics"

    def _write_ready_file(self) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        info = {"pid": os.getpid(), "grpc": self.grpc_address, "metrics": self.metrics_url}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for n in ["", *self._service_names]:
            self.health.set(n, status)

    def stop(self) -> None:
        self._stopping.set()

    def wait(self) -> None:
        """Block until a stop signal, then shut down gracefully."""
        self._stopping.wait()
        self.shutdown()

    def shutdown(self) -> None:
        log.info("stopping", extra=fields(grace_seconds=self.settings.grace_seconds))
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(self.settings.grace_seconds).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._on_stop is not None:
            self._on_stop()
        path = self.settings.ready_file
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped")

    def run(self) -> int:
        """start(), then serve until SIGTERM/SIGINT; returns the process exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.start()
        self.wait()
        return 0
