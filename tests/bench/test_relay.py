"""The delaying TCP relay used by bench/fleet_rekey.py to simulate round-trip time."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from bench.relay import DelayRelay, RelayProcess

pytestmark = pytest.mark.timeout(30)


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_relays_bytes_both_ways_in_order_and_passes_end_of_stream() -> None:
    listener, thread = _echo_server()
    payload = bytes(range(256)) * 1024
    with DelayRelay(listener.getsockname()[:2], one_way_delay=0.001) as relay:
        with socket.create_connection(relay.address) as sock:
            sock.sendall(payload)
            assert _recv_exactly(sock, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""        # the echo server saw EOF and closed
    thread.join(timeout=5)
    listener.close()


def test_each_round_trip_takes_at_least_twice_the_one_way_delay() -> None:
    listener, _ = _echo_server()
    with DelayRelay(listener.getsockname()[:2], one_way_delay=0.03) as relay:
        with socket.create_connection(relay.address) as sock:
            for _ in range(3):
                start = time.monotonic()
                sock.sendall(b"ping")
                assert _recv_exactly(sock, 4) == b"ping"
                assert time.monotonic() - start >= 0.06
    listener.close()


def test_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        DelayRelay(("127.0.0.1", 1), one_way_delay=-1)


def test_unreachable_target_closes_the_client_connection() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    dead = spare.getsockname()[:2]
    spare.close()
    with DelayRelay(dead, one_way_delay=0) as relay:
        with socket.create_connection(relay.address) as sock:
            sock.settimeout(5)
            assert sock.recv(1) == b""


def test_the_relay_process_delays_like_the_relay_and_stops_with_its_context() -> None:
    listener, thread = _echo_server()
    with RelayProcess(listener.getsockname()[:2], rtt_seconds=0.06) as relay:
        pid = relay.pid
        with socket.create_connection(relay.address) as sock:
            start = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - start >= 0.06
    thread.join(timeout=5)
    listener.close()
    assert relay.pid is None and not os.path.exists(f"/proc/{pid}")   # stopped and reaped


def test_the_relay_process_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        RelayProcess(("127.0.0.1", 1), rtt_seconds=-1)
