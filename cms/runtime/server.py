"""gRPC server scaffolding shared by every service.

Two runners with the same behaviour: ``GrpcService`` (a threaded server, one
pool thread per RPC in flight: the proxy, key management) and
``AsyncGrpcService`` (a ``grpc.aio`` server: coroutine handlers run on the
event loop and cost no thread while they wait, plain servicers run in a
thread pool; the access server, whose card channel streams mostly wait on
agents). Each binds the port with mutual TLS, applies the keepalive and idle
limits of ``Keepalive``, registers the standard health service and server
reflection, exposes Prometheus metrics over HTTP, counts and times every
RPC, writes a *ready file* once serving (ports chosen by the kernel when 0 is
configured, so launchers never race for ports) and shuts down gracefully on
SIGTERM/SIGINT: health turns NOT_SERVING, in-flight calls get a grace period,
then the service's own cleanup runs.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from cms.runtime.config import ConfigError, Section
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


def _observe(service: str, method: str, start: float, code: str) -> None:
    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)
    RPC_HANDLED.labels(service, method, code).inc()


def _rebuild(handler: grpc.RpcMethodHandler, wrap_single: Callable, wrap_stream: Callable
             ) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped (single or streamed responses)."""
    for kind, make, wrap in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_single),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_single),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream)):
        behaviour = getattr(handler, kind)
        if behaviour:
            return make(wrap(behaviour), handler.request_deserializer,
                        handler.response_serializer)
    return handler


class _Wrapped:
    """Each method's counting handler, made once: the interceptors run on every RPC."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler,
            wrap: Callable[[str, str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]
            ) -> grpc.RpcMethodHandler:
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        service, name = _split_method(method)
        wrapped = handler if service.startswith("grpc.") else wrap(service, name, handler)
        self._handlers[method] = (handler, wrapped)   # health and reflection: not our traffic
        return wrapped


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC (unary and streaming) of a threaded server."""

    def __init__(self) -> None:
        self._wrapped = _Wrapped()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler, _wrap_sync)


def _wrap_sync(service: str, method: str, handler: grpc.RpcMethodHandler
               ) -> grpc.RpcMethodHandler:
    return _rebuild(handler, *_sync_wrappers(service, method, adapt=False))


class _Observed:
    """Times one RPC and counts it with its status code when it ends, however it ends."""

    __slots__ = ("context", "method", "service", "start")

    def __init__(self, service: str, method: str, context: Any) -> None:
        self.service, self.method, self.context = service, method, context
        self.start = time.perf_counter()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _tb: object) -> bool:
        code = ("CANCELLED" if isinstance(error, asyncio.CancelledError)   # caller went away
                else _code_name(self.context, error is not None))
        _observe(self.service, self.method, self.start, code)
        return False


def _sync_wrappers(service: str, method: str, *, adapt: bool) -> tuple[Callable, Callable]:
    """Counting wrappers for plain (thread) handlers; ``adapt``: on the aio server."""

    def wrap_single(fn):
        def inner(request, context):
            if adapt:
                context = SyncContext(context)
            with _Observed(service, method, context):
                return fn(request, context)
        return inner

    def wrap_stream(fn):
        def inner(request, context):
            if adapt:
                context = SyncContext(context)
            with _Observed(service, method, context):
                yield from fn(request, context)
        return inner

    return wrap_single, wrap_stream


def _async_wrappers(service: str, method: str) -> tuple[Callable, Callable]:
    """Counting wrappers for coroutine and async generator handlers."""

    def wrap_single(fn):
        async def inner(request, context):
            with _Observed(service, method, context):
                return await fn(request, context)
        return inner

    def wrap_stream(fn):
        if not inspect.isasyncgenfunction(fn):      # reader/writer API: a coroutine
            return wrap_single(fn)

        async def inner(request, context):
            with _Observed(service, method, context):
                async for response in fn(request, context):
                    yield response
        return inner

    return wrap_single, wrap_stream


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):
    """``MetricsInterceptor`` for the aio server, where handlers are coroutines or plain
    functions (those run in the migration thread pool, with a ``SyncContext``)."""

    def __init__(self) -> None:
        self._wrapped = _Wrapped()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler, _wrap_async)


def _wrap_async(service: str, method: str, handler: grpc.RpcMethodHandler
                ) -> grpc.RpcMethodHandler:
    behaviour = (handler.unary_unary or handler.stream_unary or handler.unary_stream
                 or handler.stream_stream)
    is_async = inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)
    wrappers = (_async_wrappers(service, method) if is_async
                else _sync_wrappers(service, method, adapt=True))
    return _rebuild(handler, *wrappers)


class SyncContext:
    """A plain handler's context on the aio server, completed to what the threaded
    server's context offers: ``code()``, ``details()`` and ``is_active()``.

    The aio server hands plain handlers a context without them, and servicers
    written for the threaded server (``errors.guard``, watch loops) use them;
    with this they run unchanged on either server.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._active = True
        context.add_callback(self._ended)

    def _ended(self) -> None:
        self._active = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def is_active(self) -> bool:
        return self._active

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._details = details
        self._context.set_details(details)

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        self._context.abort(code, details)


@dataclass(frozen=True)
class Keepalive:
    """How the server treats quiet connections and clients' pings (gRPC channel arguments).

    The server pings a connection that has been quiet for ``time_s`` and drops
    it when no answer comes within ``timeout_s``, so a peer that vanished
    without closing its connection (a PC switched off) does not hold it
    forever; a connection without calls for ``max_connection_idle_s`` is
    closed (clients reconnect on their next call); a client that pings more
    often than every ``min_ping_interval_s`` while sending nothing is cut off
    (``too_many_pings``).
    """

    time_s: float = 60.0
    timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    max_connection_idle_s: float = 300.0

    def options(self) -> list[tuple[str, int]]:
        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            ("grpc.keepalive_time_ms", ms(self.time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.timeout_s)),
            # Keep pinging quiet connections (a long watch, an idle agent's
            # connection) and accept clients' pings between calls.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
        ]


KEEPALIVE_KEYS = {"keepalive_time_seconds": "time_s",
                  "keepalive_timeout_seconds": "timeout_s",
                  "min_ping_interval_seconds": "min_ping_interval_s",
                  "max_connection_idle_seconds": "max_connection_idle_s"}


def keepalive_from_section(section: Section) -> Keepalive:
    """A ``server:`` section's ``keepalive_time_seconds``, ``keepalive_timeout_seconds``,
    ``min_ping_interval_seconds`` and ``max_connection_idle_seconds``, each positive."""
    defaults = Keepalive()
    values: dict[str, float] = {}
    for key, attribute in KEEPALIVE_KEYS.items():
        value = section.float(key, getattr(defaults, attribute))
        if not value > 0:
            raise ConfigError(f"{section.where}.{key}: must be positive, got {value:g}")
        values[attribute] = value
    keepalive = Keepalive(**values)
    if keepalive.timeout_s >= keepalive.time_s:
        raise ConfigError(f"{section.where}.keepalive_timeout_seconds: must be less than "
                          f"keepalive_time_seconds ({keepalive.time_s:g})")
    return keepalive


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
    keepalive: Keepalive = field(default_factory=Keepalive)
    extra_options: list[tuple[str, object]] = field(default_factory=list)


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class _Service:
    """What both runners share: options, port, metrics endpoint, reflection, ready file."""

    def __init__(self, name: str, settings: ServerSettings,
                 register: Callable[[Any], Iterable[str]], registry: CollectorRegistry) -> None:
        self.name = name
        self.settings = settings
        self._register = register
        self._registry = registry
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._service_names: list[str] = []

    def _options(self) -> list[tuple[str, object]]:
        s = self.settings
        return [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *s.keepalive.options(),
            *s.extra_options,
        ]

    def _register_all(self, server: Any, health_servicer: Any) -> None:
        names = list(self._register(server))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._service_names = names
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            server,
        )

    def _bind(self, server: Any) -> None:
        s = self.settings
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

    def _serving_names(self) -> list[str]:
        return ["", *self._service_names]

    def _announce(self) -> None:
        path = self.settings.ready_file
        if path is not None:
            info = {"pid": os.getpid(), "grpc": self.grpc_address, "metrics": self.metrics_url}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        log.info("serving", extra=fields(grpc=self.grpc_address, metrics=self.metrics_url,
                                         pid=os.getpid()))

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    def _remove_ready_file(self) -> None:
        path = self.settings.ready_file
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class GrpcService(_Service):
    """Runs one threaded gRPC server until SIGTERM/SIGINT (or ``stop()``)."""

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
        super().__init__(name, settings, register, registry)
        self._interceptors = [MetricsInterceptor(), *interceptors]
        self._on_stop = on_stop
        self._stopping = threading.Event()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.server: grpc.Server | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.max_workers,
                                       thread_name_prefix=self.name),
            interceptors=self._interceptors,
            options=self._options(),
            maximum_concurrent_rpcs=None,
        )
        self._register_all(server, self.health)
        self._bind(server)
        server.start()
        self.server = server
        self.set_serving(True)
        self._announce()

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for n in self._serving_names():
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
        self._stop_metrics()
        if self._on_stop is not None:
            self._on_stop()
        self._remove_ready_file()
        log.info("stopped")

    def run(self) -> int:
        """start(), then serve until SIGTERM/SIGINT; returns the process exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.start()
        self.wait()
        return 0


class AsyncGrpcService(_Service):
    """Runs one ``grpc.aio`` server until SIGTERM/SIGINT (or ``stop()``).

    Coroutine handlers run on the event loop: a stream waiting for its peer
    holds no thread, so however many wait, health checks (the aio health
    servicer, on the loop too) and other RPCs are answered. Plain handlers
    (servicers written for the threaded server) run in ``settings.max_workers``
    threads, the aio server's migration pool, with a ``SyncContext``.
    ``on_stop`` may be a coroutine function; it runs once the server has stopped.
    """

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        register: Callable[[grpc.aio.Server], Iterable[str]],
        *,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        on_stop: Callable[[], Awaitable[None] | None] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ):
        super().__init__(name, settings, register, registry)
        self._interceptors = [AsyncMetricsInterceptor(), *interceptors]
        self._on_stop = on_stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=self.settings.max_workers,
                                                thread_name_prefix=self.name)
        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=self._interceptors,
            options=self._options(),
            maximum_concurrent_rpcs=None,
        )
        self._register_all(server, self.health)
        self._bind(server)
        await server.start()
        self.server = server
        await self.set_serving(True)
        self._announce()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for n in self._serving_names():
            await self.health.set(n, status)

    def stop(self) -> None:
        """Ask the server to stop; callable from any thread or a signal handler."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def wait(self) -> None:
        """Until a stop signal, then shut down gracefully."""
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("stopping", extra=fields(grace_seconds=self.settings.grace_seconds))
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.grace_seconds)
        self._stop_metrics()
        if self._on_stop is not None:
            outcome = self._on_stop()
            if inspect.isawaitable(outcome):
                await outcome
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._remove_ready_file()
        log.info("stopped")

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        await self.start()
        await self.wait()
        return 0

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT in an event loop of its own; the process exit status."""
        return asyncio.run(self.serve())
