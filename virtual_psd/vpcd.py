"""The virtual card as a vsmartcard ``vpcd`` client.

vpcd (the reader driver loaded by pcscd) listens on a TCP port; the card
connects to it. Each message is a 2-byte big-endian length and a payload. A
one-byte payload is a control message (0 power off, 1 power on, 2 reset,
4 "send your ATR"); anything else is a command APDU to answer.

A dropped connection is a removed card: on an injected power loss the card
closes its socket, reloads its state from the file and connects again (the
card is re-inserted). When the reader goes away (pcscd restarts) the card
keeps trying to connect.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Final

from virtual_psd.card import CardNotPowered, VirtualCard
from virtual_psd.faults import CardPowerLost

log = logging.getLogger("virtual_psd.vpcd")

DEFAULT_PORT: Final = 0x8C7B
CTRL_OFF: Final = 0
CTRL_ON: Final = 1
CTRL_RESET: Final = 2
CTRL_ATR: Final = 4
IO_TIMEOUT: Final = 10.0


class ReaderGone(ConnectionError):
    """The vpcd end closed the connection."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``PORT``) into a pair; the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError as exc:
        raise ValueError(f"bad vpcd endpoint {text!r}: port is not a number") from exc
    if not 0 < number < 65536:
        raise ValueError(f"bad vpcd endpoint {text!r}: port out of range")
    return host.strip("[]") or "127.0.0.1", number


def _quickack(sock: socket.socket) -> None:
    # vpcd writes the length and the APDU in two send() calls: without
    # immediate ACKs, Nagle on its side holds the second write for a delayed
    # ACK (~40 ms per APDU). The kernel clears the flag again, so set it
    # around every receive.
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _quickack(sock)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ReaderGone("vpcd closed the connection")
        buf += chunk
    _quickack(sock)
    return bytes(buf)


def send_message(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > 0xFFFF:
        raise ValueError("vpcd message too long")
    sock.sendall(len(payload).to_bytes(2, "big") + payload)


class VpcdCard:
    """Serve a :class:`VirtualCard` to a vpcd reader until :meth:`stop`."""

    def __init__(self, card: VirtualCard, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 *, retry_delay: float = 0.2, reinsert_delay: float = 0.5) -> None:
        self.card = card
        self.host = host
        self.port = port
        self.retry_delay = retry_delay
        self.reinsert_delay = reinsert_delay
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.insertions = 0
        self.thread: threading.Thread | None = None

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        announced = False
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                if not announced:
                    log.info("waiting for the vpcd reader at %s:%d", self.host, self.port)
                    announced = True
                self._stop.wait(self.retry_delay)
                continue
            announced = False
            self.insertions += 1
            log.info("card %s inserted into vpcd reader %s:%d", self.card.state.psd_id,
                     self.host, self.port)
            self.connected.set()
            delay = self.retry_delay
            try:
                self._serve(sock)
            except CardPowerLost as exc:
                log.warning("%s: card removed, state reloaded from file", exc)
                self.card.reload()
                delay = self.reinsert_delay
            except (OSError, ConnectionError) as exc:
                log.info("vpcd connection lost (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                try:
                    sock.close()
                except OSError:
                    pass
                self.card.power_off()
            self._stop.wait(delay)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=1.0)
        except OSError:
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.25)
            if not ready:
                continue
            length = int.from_bytes(_recv_exact(sock, 2), "big")
            payload = _recv_exact(sock, length) if length else b""
            if len(payload) == 1:
                self._control(sock, payload[0])
                continue
            if not payload:
                continue
            try:
                response = self.card.transmit(payload)
            except CardNotPowered:
                # vpcd powers the card before using it; be lenient if it did not.
                self.card.power_on()
                response = self.card.transmit(payload)
            send_message(sock, response)

    def _control(self, sock: socket.socket, code: int) -> None:
        if code == CTRL_OFF:
            self.card.power_off()
        elif code == CTRL_ON:
            self.card.power_on()
        elif code == CTRL_RESET:
            self.card.reset()
        elif code == CTRL_ATR:
            send_message(sock, self.card.atr)
        else:
            log.debug("ignoring unknown vpcd control %d", code)


def run(card: VirtualCard, host: str, port: int) -> VpcdCard:
    """Start serving in a daemon thread (tests); returns the server."""
    server = VpcdCard(card, host, port)
    server.thread = threading.Thread(target=server.serve_forever, name="vpcd-card", daemon=True)
    server.thread.start()
    return server


def wait_connected(server: VpcdCard, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.connected.wait(0.05):
            return True
    return False
