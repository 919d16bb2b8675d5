"""A network fault injector between the gateway and a real registry: resets, stalls and garbage on cue.

It is not a registry: every request it does not fault is relayed byte for byte to a real
`docker-registry`, with `Connection: close` added so that each upstream request opens a connection
of its own and can be faulted on its own. Faults are armed for requests whose request line
contains a marker (a path fragment), so that one test can fault one request while others pass.
It runs in threads of the test process, on loopback only, and stops by itself with `stop()`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Self

from .processes import free_port

HOST = "127.0.0.1"
HEAD_LIMIT = 64 * 1024


class Fault(Enum):
    RESET = "reset"  # read the head and `after_bytes` of the body, then reset the connection (RST)
    STALL = "stall"  # read the request, never answer, hold the connection until stopped
    GARBAGE = "garbage"  # answer bytes that are not HTTP, then close
    STALL_BODY = "stall-body"  # relay the answer's first `after_bytes` bytes, then hold the connection


@dataclass(frozen=True)
class Armed:
    fault: Fault
    marker: bytes
    after_bytes: int


GARBAGE = b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe not http at all \x00\r\n\r\n"


class FaultyUpstream:
    """`url` is what the gateway is given as its upstream; `target` is the real registry's HOST:PORT."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.faulted = 0  # requests a fault was applied to
        self.relayed = 0
        self.request_lines: list[bytes] = []  # every request line that reached the injector, in order
        self._armed: list[Armed] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def arm(self, fault: Fault, marker: str = "", after_bytes: int = 0) -> None:
        """Fault every request whose request line contains `marker` ("" matches all) until disarmed."""
        with self._lock:
            self._armed.append(Armed(fault, marker.encode(), after_bytes))

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close_quietly(sock)
        for thread in self._threads:
            thread.join(timeout=5)
        if self._listener is not None:
            _close_quietly(self._listener)
            self._listener = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # Internals

    def _spawn(self, target: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close_quietly(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(client)
            self._spawn(self._serve, client)

    def _fault_for(self, head: bytes) -> Armed | None:
        request_line = head.split(b"\r\n", 1)[0]
        with self._lock:
            return next((armed for armed in self._armed if armed.marker in request_line), None)

    def _serve(self, client: socket.socket) -> None:
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            self.request_lines.append(head.split(b"\r\n", 1)[0])
            armed = self._fault_for(head)
            if armed is None:
                self.relayed += 1
                self._relay(client, _with_connection_close(head), rest)
                return
            self.faulted += 1
            if armed.fault is Fault.RESET:
                _read_at_least(client, rest, armed.after_bytes)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif armed.fault is Fault.GARBAGE:
                client.sendall(GARBAGE)
            elif armed.fault is Fault.STALL:
                self._hold(client)
            else:
                self._relay(client, _with_connection_close(head), rest, stall_after=armed.after_bytes)
        except OSError:
            pass
        finally:
            self._forget(client)

    def _hold(self, sock: socket.socket) -> None:
        """Read and discard whatever comes, never answer, until the peer closes or the injector stops."""
        sock.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                continue

    def _relay(self, client: socket.socket, head: bytes, rest: bytes, stall_after: int | None = None) -> None:
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=30)
        self._track(upstream)
        try:
            upstream.sendall(head + rest)
            self._spawn(_pump, client, upstream, None)
            _pump(upstream, client, stall_after)
            if stall_after is not None:
                self._hold(client)
        finally:
            self._forget(upstream)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > HEAD_LIMIT:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _read_at_least(sock: socket.socket, already: bytes, count: int) -> None:
    received = len(already)
    while received < count:
        chunk = sock.recv(65536)
        if not chunk:
            return
        received += len(chunk)


def _with_connection_close(head: bytes) -> bytes:
    lines = [line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
    """Copy until EOF (then half-close the sink), or until `limit` bytes were copied."""
    copied = 0
    try:
        while limit is None or copied < limit:
            chunk = source.recv(65536 if limit is None else min(65536, limit - copied))
            if not chunk:
                sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(chunk)
            copied += len(chunk)
    except OSError:
        return


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# Vital signs of a process under faults, read from /proc -------------------------------------------


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds (sockets, files, pipes)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """The process's resident memory (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def sockets_to(pid: int, port: int) -> int:
    """How many of the process's descriptors are TCP connections to `port` (e.g. its pooled upstream connections)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes:
                    count += 1
    return count
