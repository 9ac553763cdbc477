"""The importer's HTTP reader against a real server on 127.0.0.1 that misbehaves on purpose: the direct
socket path (Content-Length), the http.client path (chunked), a body cut short, a stalled body."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtplane.storage import importer

TINY = Path(__file__).resolve().parents[3] / "images" / "out" / "tiny.qcow2"
Handler = Callable[[socket.socket, bytes], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """serve(handler) -> URL; handler(conn, body) answers one request per connection."""
    stop = threading.Event()
    socks: list[socket.socket] = []

    def start(handler: Handler) -> str:
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)
        body = TINY.read_bytes()

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    handler(conn, body)
        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}/tiny.qcow2"
    yield start
    stop.set()
    for s in socks:
        s.close()


def _import(url: str, tmp_path: Path, timeout: float = 60) -> importer.ImportResult:
    return asyncio.run(importer.import_http(importer.HTTPOptions(url, timeout=timeout), tmp_path / "out.raw",
                                            tmp_path, 1 << 30))


def _same(tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "out.raw"), str(TINY)],
                   check=True)


def _headers(extra: str) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{extra}\r\n".encode()


def test_content_length_body(serve: Callable[[Handler], str], tmp_path: Path) -> None:
    # headers and the first bytes of the body in one segment: http.client reads some of the body ahead
    url = serve(lambda c, body: c.sendall(_headers(f"Content-Length: {len(body)}\r\n") + body))
    result = _import(url, tmp_path)
    assert (result.source_format, result.received) == ("qcow2", TINY.stat().st_size)
    _same(tmp_path)


def test_chunked_body(serve: Callable[[Handler], str], tmp_path: Path) -> None:
    def chunked(c: socket.socket, body: bytes) -> None:
        c.sendall(_headers("Transfer-Encoding: chunked\r\n"))
        for i in range(0, len(body), 1 << 20):
            part = body[i:i + (1 << 20)]
            c.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        c.sendall(b"0\r\n\r\n")
    _import(serve(chunked), tmp_path)
    _same(tmp_path)


def test_body_cut_short_is_transient(serve: Callable[[Handler], str], tmp_path: Path) -> None:
    url = serve(lambda c, body: c.sendall(_headers(f"Content-Length: {len(body)}\r\n") + body[: len(body) // 2]))
    with pytest.raises(importer.TransferError) as err:
        _import(url, tmp_path)
    assert err.value.transient and err.value.reason == importer.CONNECTION_ERROR
    assert f"closed after {TINY.stat().st_size // 2} of" in err.value.message


def test_stalled_body_times_out(serve: Callable[[Handler], str], tmp_path: Path) -> None:
    release = threading.Event()

    def stall(c: socket.socket, body: bytes) -> None:
        c.sendall(_headers(f"Content-Length: {len(body)}\r\n") + body[: 5 << 20])
        release.wait(30)
    url = serve(stall)
    try:
        with pytest.raises(importer.TransferError) as err:
            _import(url, tmp_path, timeout=1)
    finally:
        release.set()
    assert err.value.transient and err.value.reason == importer.CONNECTION_ERROR
    assert "timed out" in err.value.message or "no data" in err.value.message
