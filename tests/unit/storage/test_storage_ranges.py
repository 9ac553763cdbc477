"""The importer's parallel ranged download against a real HTTP server on 127.0.0.1 that answers Range requests
(and, on purpose, changes the file midway): raw, qcow2, a format qemu-img converts, and what must stream in
order (compressed clusters, gzip, checksums)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virtplane.storage import importer

TINY = Path(__file__).resolve().parents[3] / "images" / "out" / "tiny.qcow2"


@dataclass
class RangeServer:
    """Serves one file with Range and If-Range (ETag) support, keep-alive off; logs each request's Range."""
    path: Path
    url: str = ""
    ranges: list[str | None] = field(default_factory=list)
    etag: str = '"v1"'
    change_after: int | None = None  # answer with a new ETag from this request on (the file "changed")

    def handle(self, conn: socket.socket) -> None:
        req = b""
        while b"\r\n\r\n" not in req:
            got = conn.recv(65536)
            if not got:
                return
            req += got
        text = req.decode()
        m = re.search(r"(?im)^range: bytes=(\d+)-(\d+)\r$", text)
        if_range = re.search(r"(?im)^if-range: (.*)\r$", text)
        self.ranges.append(m and f"{m[1]}-{m[2]}")
        if self.change_after is not None and len(self.ranges) > self.change_after:
            self.etag = '"v2"'
        body = self.path.read_bytes()
        total = len(body)
        if m and (if_range is None or if_range[1] == self.etag):
            first, last = int(m[1]), min(int(m[2]), total - 1)
            head = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{total}\r\n"
                    f"Content-Length: {last - first + 1}\r\n")
            body = body[first:last + 1]
        else:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n"
        conn.sendall(f"{head}ETag: {self.etag}\r\nConnection: close\r\n\r\n".encode() + body)


@pytest.fixture
def ranged(tmp_path: Path) -> Iterator[RangeServer]:
    srv = socket.create_server(("127.0.0.1", 0))
    server = RangeServer(tmp_path / "served")
    server.url = f"http://127.0.0.1:{srv.getsockname()[1]}/image"

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                server.handle(conn)
            except OSError:
                pass

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    yield server
    srv.close()


def _import(server: RangeServer, tmp_path: Path, checksum: str | None = None) -> importer.ImportResult:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return asyncio.run(importer.import_http(importer.HTTPOptions(server.url, timeout=30), work / "out.raw", work,
                                            1 << 30, checksum=checksum))


def _same(tmp_path: Path, reference: Path, fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(tmp_path / "work" / "out.raw"),
                    str(reference)], check=True)


@pytest.fixture(autouse=True)
def _images() -> None:
    if not TINY.exists():
        pytest.skip("images not built")


def _parallel(server: RangeServer) -> bool:
    """Segments from offset 0 after the probe, more than one: the image came over several connections."""
    segments = [r for r in server.ranges[1:] if r and r != f"0-{importer.SNIFF_BYTES - 1}"]
    return any(r.startswith("0-") for r in segments) and len(segments) > 1


def test_qcow2_over_several_connections(ranged: RangeServer, tmp_path: Path) -> None:
    shutil.copy(TINY, ranged.path)
    result = _import(ranged, tmp_path)
    assert (result.source_format, result.received, result.streamed) == ("qcow2", TINY.stat().st_size, True)
    assert ranged.ranges[0] == f"0-{importer.SNIFF_BYTES - 1}" and _parallel(ranged)
    _same(tmp_path, TINY)


def test_raw_over_several_connections(ranged: RangeServer, tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(TINY), str(ranged.path)], check=True)
    result = _import(ranged, tmp_path)
    assert result.source_format == "raw" and _parallel(ranged)
    _same(tmp_path, ranged.path, "raw")


def test_vmdk_downloads_in_parallel_then_converts(ranged: RangeServer, tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(TINY), str(ranged.path)], check=True)
    result = _import(ranged, tmp_path)
    assert (result.source_format, result.streamed) == ("vmdk", False) and _parallel(ranged)
    _same(tmp_path, TINY)
    assert not (tmp_path / "work" / ".scratch").exists()


@pytest.mark.parametrize("how", ["compressed-clusters", "gzip", "checksum"])
def test_what_needs_order_streams_after_the_probe(ranged: RangeServer, tmp_path: Path, how: str) -> None:
    checksum = None
    if how == "compressed-clusters":
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(TINY), str(ranged.path)], check=True)
    elif how == "gzip":
        ranged.path.write_bytes(gzip.compress(TINY.read_bytes(), compresslevel=1))
    else:
        shutil.copy(TINY, ranged.path)
        checksum = "sha256:" + hashlib.sha256(TINY.read_bytes()).hexdigest()
    result = _import(ranged, tmp_path, checksum)
    assert result.source_format == "qcow2" and result.received == ranged.path.stat().st_size
    # the probe (the image's head), the qcow2 tables for compressed clusters, then the rest in one stream
    assert ranged.ranges[-1] == f"{importer.SNIFF_BYTES}-{ranged.path.stat().st_size - 1}"
    assert not _parallel(ranged)
    _same(tmp_path, TINY)


def test_checksum_mismatch_over_ranges(ranged: RangeServer, tmp_path: Path) -> None:
    shutil.copy(TINY, ranged.path)
    with pytest.raises(importer.TransferError) as err:
        _import(ranged, tmp_path, "sha256:" + "0" * 64)
    assert err.value.reason == importer.CHECKSUM_MISMATCH


def test_file_changing_midway_fails_transiently(ranged: RangeServer, tmp_path: Path) -> None:
    shutil.copy(TINY, ranged.path)
    ranged.change_after = 3  # If-Range no longer matches: the server sends the whole (new) file with 200
    with pytest.raises(importer.TransferError) as err:
        _import(ranged, tmp_path)
    assert err.value.transient and "changed during the download" in err.value.message


def test_too_large_raw_fails_before_downloading(ranged: RangeServer, tmp_path: Path) -> None:
    ranged.path.write_bytes(b"\1" * (9 << 20))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(importer.TransferError) as err:
        asyncio.run(importer.import_http(importer.HTTPOptions(ranged.url), work / "out.raw", work, 8 << 20))
    assert err.value.reason == importer.TOO_LARGE
    assert len(ranged.ranges) == 1  # the probe only
