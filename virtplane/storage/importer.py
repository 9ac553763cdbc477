"""Turn an image stream (HTTP download, upload body, local file) into a raw volume image, overlapped.

The data path, for every source:

    bytes -> checksum (when asked) -> gzip/xz decompression (by magic) -> format sniffing -> sink

Sinks:
- raw (and ISO): written straight to the target at its offsets, all-zero blocks skipped (sparse);
- qcow2: parsed while it streams (`Qcow2StreamSink`): L1/L2 tables are read as they pass and data clusters
  are written to their guest offsets in the raw target, so a qcow2 needs no scratch copy. Anything that
  passes before we know what it is (metadata, or data whose L2 table comes later in the file) is kept in a
  sparse spill file and resolved at the end; compressed clusters are inflated from there;
- everything else (vmdk, vhdx, vdi, vhd, and qcow2 features the stream parser does not handle): written to a
  scratch file, checked with `qemu-img info` (no backing files, no external extents), then converted with
  `qemu-img convert`.

The HTTP download runs in a thread with blocking `readinto` into a ring of large buffers, and the sink in
a second thread, so receiving and writing overlap (Python-level per-chunk work stays small: 4 MiB chunks).

Nothing is written to the final name: the caller gets a finished temp file, checks it, and renames it.
Failures are `TransferError`s with a CamelCase reason for the DataVolume condition and a `transient` flag
(retry with backoff) — a 404, a TLS failure, a corrupt or oversized image is permanent; a dropped
connection, a 5xx or a full disk is not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import lzma
import os
import queue
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

CHUNK = 4 << 20
ZERO_BLOCK = 64 << 10
_ZERO = bytes(ZERO_BLOCK)
QEMU_IMG = "qemu-img"
SNIFF_BYTES = 64 << 10
SUPPORTED_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
MAX_REDIRECTS = 5

# Reasons (DataVolume conditions and Events)
NOT_FOUND = "NotFound"
UNAUTHORIZED = "Unauthorized"
TLS_ERROR = "TLSError"
CONNECTION_ERROR = "ConnectionError"
HTTP_ERROR = "HTTPError"
INVALID_IMAGE = "InvalidImage"
TOO_LARGE = "ImageTooLarge"
CHECKSUM_MISMATCH = "ChecksumMismatch"
DISK_FULL = "DiskFull"
TRANSFER_FAILED = "TransferFailed"

ProgressFn = Callable[[float], None]


class TransferError(Exception):
    """A failed transfer: `reason` for conditions, `transient` when a retry may succeed."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


def _os_error(err: OSError, what: str) -> TransferError:
    if err.errno == 28:
        return TransferError(DISK_FULL, f"{what}: no space left on the storage filesystem", transient=True)
    return TransferError(TRANSFER_FAILED, f"{what}: {err}", transient=True)


# --------------------------------------------------------------------------------------------------
# checksums


def parse_checksum(spec: str | None) -> tuple[str, str] | None:
    """CDI's "algorithm:hex" (md5, sha1, sha256, sha512)."""
    if not spec:
        return None
    algo, _, digest = spec.partition(":")
    algo = algo.strip().lower()
    if algo not in ("md5", "sha1", "sha256", "sha512") or not re.fullmatch(r"[0-9a-fA-F]+", digest.strip()):
        raise TransferError(INVALID_IMAGE, f"invalid checksum {spec!r}: expected algorithm:hex with md5, sha1, "
                            "sha256 or sha512")
    return algo, digest.strip().lower()


# --------------------------------------------------------------------------------------------------
# sinks: where (decompressed) image bytes go


class Sink(Protocol):
    def write(self, data: memoryview) -> None: ...
    def close(self) -> None: ...


def _is_zero(block: memoryview) -> bool:
    # Sample a few words first: most data blocks fail here without the full copy-and-compare.
    n = len(block)
    for i in (0, n // 2, n - 8):
        if i >= 0 and block[i:i + 8] != b"\0\0\0\0\0\0\0\0"[: min(8, n - i)]:
            return False
    return bytes(block) == _ZERO[:n]


def _write_sparse(fd: int, data: memoryview, offset: int) -> None:
    """pwrite skipping all-zero 64 KiB blocks (the target is a fresh sparse file); runs coalesced."""
    n = len(data)
    start = -1
    i = 0
    while i < n:
        end = min(i + ZERO_BLOCK, n)
        if _is_zero(data[i:end]):
            if start >= 0:
                _pwrite_all(fd, data[start:i], offset + start)
                start = -1
        elif start < 0:
            start = i
        i = end
    if start >= 0:
        _pwrite_all(fd, data[start:n], offset + start)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _create(path: Path, flags: int = os.O_WRONLY) -> int:
    """A new, empty file at `path` (any old one unlinked first). Never truncated: ext4 flushes a file that was
    truncated to zero when it is closed (auto_da_alloc), which would cost the whole image's writeback there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)


class _Coalescer:
    """Joins writes to consecutive offsets into one pwritev (qcow2 data clusters usually are in order)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = -1
        self.end = -1
        self.parts: list[memoryview] = []

    def add(self, data: memoryview, offset: int) -> None:
        if _is_zero(data):
            return
        if offset != self.end or len(self.parts) >= 512:
            self.flush()
            self.start = offset
            self.end = offset
        self.parts.append(data)
        self.end += len(data)

    def flush(self) -> None:
        if not self.parts:
            return
        offset, parts = self.start, self.parts
        self.parts = []
        written = os.pwritev(self.fd, parts, offset)
        total = sum(len(p) for p in parts)
        if written < total:  # short write: finish the rest the slow way
            rest = memoryview(b"".join(parts))[written:]
            _pwrite_all(self.fd, rest, offset + written)
        self.start = self.end = -1


class RawSink:
    """Raw image bytes at consecutive offsets of the target; `limit` guards the volume's usable size."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.offset = 0

    def write(self, data: memoryview) -> None:
        if self.offset + len(data) > self.limit:
            raise TransferError(TOO_LARGE, f"the image is larger than the volume's usable size of {self.limit} "
                                "bytes; a larger volume is required")
        _write_sparse(self.fd, data, self.offset)
        self.offset += len(data)

    def close(self) -> None:
        pass

    @property
    def virtual_size(self) -> int:
        return self.offset


class FileSink:
    """Everything, verbatim, to a scratch file (formats that need qemu-img)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _create(path)
        self.offset = 0

    def write(self, data: memoryview) -> None:
        _write_sparse(self.fd, data, self.offset)
        self.offset += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, self.offset)
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(slots=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    compression: int  # 0 zlib, 1 zstd

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_qcow2_header(buf: bytes) -> tuple[Qcow2Header | None, str]:
    """(header, "") when the stream parser can take it, (None, why) when qemu-img must do the work; raises
    TransferError for images nobody should import (backing files, encryption, external data)."""
    if len(buf) < 72 or buf[:4] != b"QFI\xfb":
        return None, "short header"
    (version, backing_off, _backing_len, cluster_bits, size, crypt, l1_size, l1_off) = struct.unpack(
        ">IQIIQIIQ", buf[4:48])
    if version not in (2, 3):
        return None, f"qcow2 version {version}"
    if backing_off:
        raise TransferError(INVALID_IMAGE, "the qcow2 image has a backing file; only self-contained images can "
                            "be imported")
    if crypt:
        raise TransferError(INVALID_IMAGE, "encrypted qcow2 images cannot be imported")
    if not 9 <= cluster_bits <= 21:
        raise TransferError(INVALID_IMAGE, f"invalid qcow2 cluster size 2^{cluster_bits}")
    compression = 0
    if version == 3:
        if len(buf) < 104:
            return None, "short v3 header"
        incompatible = struct.unpack(">Q", buf[72:80])[0]
        header_length = struct.unpack(">I", buf[100:104])[0]
        if incompatible & 0b100:
            raise TransferError(INVALID_IMAGE, "qcow2 images with an external data file cannot be imported")
        if incompatible & 0b10:
            return None, "marked corrupt"
        if incompatible & 0b10000:
            return None, "extended L2 entries"
        if incompatible & ~0b11111:
            return None, "unknown incompatible features"
        if incompatible & 0b1000 and header_length > 104 and len(buf) > 104:
            compression = buf[104]
        if compression not in (0, 1):
            return None, f"compression type {compression}"
    if l1_size * 8 > 32 << 20 or l1_off % (1 << cluster_bits):
        raise TransferError(INVALID_IMAGE, "the qcow2 L1 table is invalid")
    return Qcow2Header(version, cluster_bits, size, l1_size, l1_off, compression), ""


_L1_MASK = 0x00FFFFFFFFFFFE00
_L2_COMPRESSED = 1 << 62


def l2_tables(h: Qcow2Header, l1: bytes | bytearray) -> list[tuple[int, int]]:
    """(L1 index, host offset) of the L2 tables an L1 table points to."""
    out = []
    for idx, (entry,) in enumerate(struct.iter_unpack(">Q", l1)):
        off = entry & _L1_MASK
        if not off:
            continue
        if off % h.cluster_size:
            raise TransferError(INVALID_IMAGE, f"qcow2 L2 table offset {off:#x} is not cluster aligned")
        out.append((idx, off))
    return out


def l2_clusters(h: Qcow2Header, table: bytes, l1_index: int) -> Iterable[tuple[int, int, int]]:
    """(guest offset, host offset, compressed length or 0) of an L2 table's clusters that hold data;
    unallocated and zero clusters are left out (the target is sparse)."""
    cs = h.cluster_size
    base = l1_index * (cs // 8) * cs
    csize_shift = 62 - (h.cluster_bits - 8)
    csize_mask = (1 << (h.cluster_bits - 8)) - 1
    coffset_mask = (1 << csize_shift) - 1
    for j, (entry,) in enumerate(struct.iter_unpack(">Q", table)):
        if not entry:
            continue
        guest = base + j * cs
        if guest >= h.size:
            break
        if entry & _L2_COMPRESSED:
            coff = entry & coffset_mask
            nsect = ((entry >> csize_shift) & csize_mask) + 1
            yield guest, coff, nsect * 512 - (coff & 511)
            continue
        if h.version == 3 and entry & 1:
            continue  # reads as zeros
        host = entry & _L1_MASK
        if not host:
            continue
        if host % cs:
            raise TransferError(INVALID_IMAGE, f"qcow2 data cluster offset {host:#x} is not cluster aligned")
        yield guest, host, 0


class Qcow2StreamSink:
    """Converts a qcow2 stream to raw on the fly (see the module docstring)."""

    def __init__(self, header: Qcow2Header, target_fd: int, spill_path: Path, limit: int) -> None:
        if header.size > limit:
            raise TransferError(TOO_LARGE, f"virtual image size {header.size} is larger than the volume's usable "
                                f"size of {limit} bytes; a larger volume is required")
        self.h = header
        self.cs = header.cluster_size
        self.fd = target_fd
        self.spill_path = spill_path
        self.spill = _create(spill_path, os.O_RDWR)
        self.pos = 0  # host offset of the next byte fed
        self.partial = bytearray()
        self.l1 = bytearray(header.l1_size * 8)
        self.l1_seen = 0
        self.l1_done = header.l1_size == 0
        self.l1_end = header.l1_offset + header.l1_size * 8
        self.l2_pending: dict[int, int] = {}  # host offset -> L1 index
        self.data: dict[int, list[int]] = {}  # host cluster -> guest offsets
        self.compressed: list[tuple[int, int, int]] = []  # (host offset, length, guest offset)
        self.virtual_size = header.size
        self.out = _Coalescer(target_fd)
        os.ftruncate(self.fd, header.size)  # the target is new and empty (see _create)

    # ---- feeding

    def write(self, data: memoryview) -> None:
        if self.partial:
            need = self.cs - len(self.partial)
            self.partial += data[:need]
            data = data[need:]
            if len(self.partial) < self.cs:
                return
            self._cluster(memoryview(bytes(self.partial)))
            self.out.flush()
            self.partial.clear()
        n = len(data) - len(data) % self.cs
        try:
            for i in range(0, n, self.cs):
                self._cluster(data[i:i + self.cs])
        finally:
            self.out.flush()  # before the caller reuses the buffer
        if n < len(data):
            self.partial += data[n:]

    def _cluster(self, c: memoryview) -> None:
        h = self.pos
        self.pos += len(c)
        guests = self.data.pop(h, None)
        if guests is not None:
            for g in guests:
                self.out.add(c, g)
            return
        idx = self.l2_pending.pop(h, None)
        if idx is not None:
            self._parse_l2(bytes(c), idx)
            return
        if not self.l1_done and h < self.l1_end and h + len(c) > self.h.l1_offset:
            lo = max(h, self.h.l1_offset)
            hi = min(h + len(c), self.l1_end)
            self.l1[lo - self.h.l1_offset:hi - self.h.l1_offset] = c[lo - h:hi - h]
            self.l1_seen += hi - lo
            if self.l1_seen >= len(self.l1):
                self._parse_l1()
            return
        _write_sparse(self.spill, c, h)  # not known yet: keep it for the end

    def _read_spill(self, offset: int, length: int) -> bytes:
        data = os.pread(self.spill, length, offset)
        return data + bytes(length - len(data))

    def _parse_l1(self) -> None:
        self.l1_done = True
        for idx, off in l2_tables(self.h, self.l1):
            if off < self.pos:
                self._parse_l2(self._read_spill(off, self.cs), idx)
            else:
                self.l2_pending[off] = idx

    def _parse_l2(self, table: bytes, l1_index: int) -> None:
        for guest, host, compressed in l2_clusters(self.h, table, l1_index):
            if compressed:
                self.compressed.append((host, compressed, guest))
            elif host < self.pos:
                _write_sparse(self.fd, memoryview(self._read_spill(host, self.cs)), guest)
            else:
                self.data.setdefault(host, []).append(guest)

    def close(self) -> None:
        try:
            if self.partial:
                tail = bytes(self.partial) + bytes(self.cs - len(self.partial))
                end = self.pos + len(self.partial)
                self._cluster(memoryview(tail))
                self.out.flush()
                self.pos = end
                self.partial.clear()
            if not self.l1_done:
                raise TransferError(INVALID_IMAGE, "the qcow2 image ends before its L1 table")
            if self.l2_pending or self.data:
                raise TransferError(INVALID_IMAGE, "the qcow2 image is truncated: tables point past its end")
            self._inflate_compressed()
            os.ftruncate(self.fd, self.virtual_size)
        finally:
            os.close(self.spill)
            self.spill_path.unlink(missing_ok=True)

    def _inflate_compressed(self) -> None:
        decompress: Callable[[bytes], bytes]
        if self.h.compression == 1:
            try:
                import zstandard  # type: ignore[import-not-found,unused-ignore]
            except ImportError as err:
                raise TransferError(INVALID_IMAGE, "zstd-compressed qcow2 clusters need the zstandard module") \
                    from err
            dctx = zstandard.ZstdDecompressor()

            def decompress(b: bytes) -> bytes:
                return bytes(dctx.decompressobj().decompress(b))
        else:
            def decompress(b: bytes) -> bytes:
                return zlib.decompressobj(-12).decompress(b, self.cs)
        for host, length, guest in self.compressed:
            if host >= self.pos:
                raise TransferError(INVALID_IMAGE, "a compressed qcow2 cluster lies past the end of the image")
            raw = self._read_spill(host, min(length, self.pos - host))
            try:
                out = decompress(raw)[: self.cs]
            except (zlib.error, Exception) as err:  # zstd raises its own error type
                raise TransferError(INVALID_IMAGE, f"corrupt compressed qcow2 cluster at {host:#x}: {err}") from err
            if len(out) < min(self.cs, self.virtual_size - guest):
                raise TransferError(INVALID_IMAGE, f"corrupt compressed qcow2 cluster at {host:#x}")
            _write_sparse(self.fd, memoryview(out), guest)


# --------------------------------------------------------------------------------------------------
# the pipeline


_GZIP = b"\x1f\x8b"
_XZ = b"\xfd7zXZ\x00"
_OTHER_MAGIC = (b"KDMV", b"# Disk DescriptorFile", b"vhdxfile", b"conectix", b"COWD")


def image_kind(head: bytes) -> tuple[str, Qcow2Header | None]:
    """From an image's first (decompressed) bytes: ("qcow2", header) for what the qcow2 parser takes, ("raw",
    None), or ("scratch", None) for what qemu-img converts (other formats, qcow2 features we do not parse)."""
    if head.startswith(b"QFI\xfb"):
        header, why = parse_qcow2_header(head)
        if header is not None:
            return "qcow2", header
        log.info("qcow2 image needs qemu-img (%s)", why)
        return "scratch", None
    if head.startswith(_OTHER_MAGIC) or head[64:68] == b"\x7f\x10\xda\xbe":  # VDI signature
        return "scratch", None
    return "raw", None


@dataclasses.dataclass(slots=True)
class PipelineResult:
    kind: str  # "raw" | "qcow2" | "scratch"
    virtual_size: int  # raw and qcow2 (0 for scratch: qemu-img tells)
    scratch: Path | None
    received: int  # bytes on the wire


class Pipeline:
    """Fed sequentially from one thread; picks decompression and sink from the first bytes."""

    def __init__(self, target: Path, work_dir: Path, limit: int, *, checksum: str | None = None) -> None:
        self.target = target
        self.work_dir = work_dir
        self.limit = limit
        self.received = 0
        cs = parse_checksum(checksum)
        self._hasher = hashlib.new(cs[0]) if cs else None
        self._expected = cs[1] if cs else ""
        self._decomp: Any = None
        self._decided_compression = False
        self._head = bytearray()
        self._sink: Sink | None = None
        self._kind = ""
        self._fd = -1
        self._scratch: Path | None = None
        self._decomp_out = 0

    def feed(self, data: memoryview) -> None:
        self.received += len(data)
        if self._hasher is not None:
            self._hasher.update(data)
        if not self._decided_compression:
            self._head += data
            if len(self._head) < 8:
                return
            head = bytes(self._head)
            self._head.clear()
            self._decided_compression = True
            if head.startswith(_GZIP):
                self._decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif head.startswith(_XZ):
                self._decomp = lzma.LZMADecompressor()
            data = memoryview(head)
        if self._decomp is None:
            self._image(data)
            return
        try:
            if isinstance(self._decomp, lzma.LZMADecompressor):
                out = self._decomp.decompress(data, max_length=-1)
            else:
                out = self._decomp.decompress(data)
        except (zlib.error, lzma.LZMAError, EOFError) as err:
            raise TransferError(INVALID_IMAGE, f"the compressed image is corrupt: {err}") from err
        if out:
            self._image(memoryview(out))

    def _image(self, data: memoryview) -> None:
        if self._sink is None:
            self._head += data
            if len(self._head) < SNIFF_BYTES:
                return
            data = memoryview(bytes(self._head))
            self._head.clear()
            self._choose(bytes(data[:SNIFF_BYTES]))
        assert self._sink is not None
        try:
            self._sink.write(data)
        except OSError as err:
            raise _os_error(err, "writing the image") from err

    def _choose(self, head: bytes) -> None:
        try:
            self._fd = _create(self.target)
        except OSError as err:
            raise _os_error(err, f"creating {self.target}") from err
        kind, header = image_kind(head)
        if header is not None:
            self._kind = "qcow2"
            self._sink = Qcow2StreamSink(header, self._fd, self.work_dir / ".qcow2-spill", self.limit)
            return
        if kind == "raw":
            self._kind = "raw"
            self._sink = RawSink(self._fd, self.limit)
            return
        self._kind = "scratch"
        self._scratch = self.work_dir / ".scratch"
        self._sink = FileSink(self._scratch)

    def finish(self) -> PipelineResult:
        if self._decomp is not None:
            if not isinstance(self._decomp, lzma.LZMADecompressor):
                tail = self._decomp.flush()
                if tail:
                    self._image(memoryview(tail))
            if not self._decomp.eof:
                raise TransferError(INVALID_IMAGE, "the compressed image is truncated")
        if not self._decided_compression and self._head:
            self._decided_compression = True
            head = bytes(self._head)
            self._head.clear()
            self._image(memoryview(head))
        if self._sink is None:
            if not self._head:
                raise TransferError(INVALID_IMAGE, "the image is empty")
            data = memoryview(bytes(self._head))
            self._head.clear()
            self._choose(bytes(data[:SNIFF_BYTES]))
            assert self._sink is not None
            self._sink.write(data)
        if self._hasher is not None and self._hasher.hexdigest() != self._expected:
            raise TransferError(CHECKSUM_MISMATCH, f"checksum mismatch: expected {self._expected}, got "
                                f"{self._hasher.hexdigest()}")
        try:
            self._sink.close()
            virtual = getattr(self._sink, "virtual_size", 0)
            if self._kind == "raw":
                os.ftruncate(self._fd, virtual)
        except OSError as err:
            raise _os_error(err, "finishing the image") from err
        finally:
            self._close_fd()
        return PipelineResult(self._kind, virtual, self._scratch, self.received)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if isinstance(self._sink, FileSink | Qcow2StreamSink):
                self._sink.close()
        self._close_fd()
        if self._scratch is not None:
            self._scratch.unlink(missing_ok=True)


def run_pipeline(chunks: Iterable[memoryview], pipeline: Pipeline) -> PipelineResult:
    try:
        for chunk in chunks:
            pipeline.feed(chunk)
        return pipeline.finish()
    except BaseException:
        pipeline.abort()
        raise


# --------------------------------------------------------------------------------------------------
# HTTP


@dataclasses.dataclass(slots=True)
class HTTPOptions:
    url: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    ca_pem: str | None = None  # certConfigMap contents (added to the system roots)
    insecure: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0


def parse_header_lines(lines: Iterable[str]) -> dict[str, str]:
    """extraHeaders ("Name: value")."""
    out: dict[str, str] = {}
    for line in lines:
        name, sep, value = str(line).partition(":")
        if not sep or not name.strip() or any(c in name for c in " \r\n") or "\n" in value or "\r" in value:
            raise TransferError(INVALID_IMAGE, f"invalid extra header {line!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def _ssl_context(opts: HTTPOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if opts.ca_pem:
        try:
            ctx.load_verify_locations(cadata=opts.ca_pem)
        except ssl.SSLError as err:
            raise TransferError(TLS_ERROR, f"the certConfigMap holds no usable CA certificate: {err}") from err
    if opts.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HTTPStream:
    """A GET whose body is read in a thread with `readinto` (blocking sockets: the fastest path Python has)."""

    def __init__(self, opts: HTTPOptions, headers: Mapping[str, str] | None = None) -> None:
        self.opts = opts
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.length: int | None = None
        self.url = opts.url  # after redirects
        self.headers: dict[str, str] = dict(headers) if headers is not None else {}  # as sent to `url`
        self.total: int | None = None  # a ranged answer's full size (Content-Range)
        self.validator: str | None = None  # ETag (or Last-Modified) for If-Range

    def open(self, byte_range: tuple[int, int] | None = None, if_range: str | None = None) -> None:
        """GET the URL, following redirects; with `byte_range` (first, last) a Range request, answered 206
        (`total` set) by servers that support ranges, 200 with the whole body by the others."""
        url = self.url
        headers = self.headers
        if not headers:
            headers = {"User-Agent": "virtplane-importer", "Accept-Encoding": "identity", **self.opts.headers}
            if self.opts.username is not None:
                token = base64.b64encode(f"{self.opts.username}:{self.opts.password or ''}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
        extra = {}
        if byte_range is not None:
            extra["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            if if_range:
                extra["If-Range"] = if_range
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TransferError(INVALID_IMAGE, f"unsupported URL {url!r}: only http and https")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                if parts.scheme == "https":
                    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                        parts.hostname, parts.port, timeout=self.opts.timeout, context=_ssl_context(self.opts))
                else:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.opts.timeout)
                conn.request("GET", path, headers={**headers, **extra})
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as err:
                raise TransferError(TLS_ERROR, f"TLS verification of {parts.hostname} failed: "
                                    f"{err.verify_message or err}; add its CA with certConfigMap") from err
            except ssl.SSLError as err:
                raise TransferError(TLS_ERROR, f"TLS handshake with {parts.hostname} failed: {err}") from err
            except (OSError, http.client.HTTPException) as err:
                raise TransferError(CONNECTION_ERROR, f"cannot reach {parts.scheme}://{parts.netloc}: {err}",
                                    transient=True) from err
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location") or ""
                conn.close()
                new = urljoin(url, location)
                if urlsplit(new).netloc != parts.netloc:
                    headers.pop("Authorization", None)  # never leak credentials to another host
                url = new
                continue
            if resp.status == 416 and byte_range is not None:  # e.g. an empty file: ask again without a range
                conn.close()
                byte_range, extra = None, {}
                continue
            if resp.status != 200 and not (resp.status == 206 and byte_range is not None):
                body = resp.read(300).decode(errors="replace").strip()
                conn.close()
                msg = f"GET {self.opts.url}: HTTP {resp.status} {resp.reason}" + (f": {body}" if body else "")
                if resp.status in (404, 410):
                    raise TransferError(NOT_FOUND, msg)
                if resp.status in (401, 403):
                    raise TransferError(UNAUTHORIZED, msg + " (check secretRef)")
                raise TransferError(HTTP_ERROR, msg, transient=resp.status >= 500 or resp.status == 429)
            self.conn, self.resp = conn, resp
            self.url, self.headers = url, headers
            length = resp.getheader("Content-Length")
            self.length = int(length) if length and length.isdigit() else None
            self.validator = resp.getheader("ETag") or resp.getheader("Last-Modified")
            if resp.status == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", (resp.getheader("Content-Range") or "").strip())
                assert byte_range is not None
                if (m is None or resp.chunked or int(m[1]) != byte_range[0]
                        or self.length != int(m[2]) - int(m[1]) + 1):
                    conn.close()
                    raise TransferError(HTTP_ERROR, f"GET {self.opts.url}: the server answered the range request "
                                        f"{extra['Range']} with Content-Range {resp.getheader('Content-Range')!r}",
                                        transient=True)
                self.total = int(m[3])
            return
        raise TransferError(HTTP_ERROR, f"GET {self.opts.url}: too many redirects")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def filler(self) -> Callable[[memoryview], int]:
        """A function filling a buffer from the body, returning the byte count (short only at the end).

        A plain-HTTP body of known length is read from the socket itself with MSG_WAITALL: one recv per
        buffer instead of one per few hundred KiB that arrived, so the reader thread hardly needs the GIL
        (TLS and chunked bodies go through http.client)."""
        resp, conn = self.resp, self.conn
        assert resp is not None and conn is not None
        sock = conn.sock
        if isinstance(sock, ssl.SSLSocket) or sock is None or resp.chunked or self.length is None:
            def through_http_client(mv: memoryview) -> int:
                n = 0
                while n < len(mv):
                    k = resp.readinto(mv[n:])
                    if not k:
                        break
                    n += k
                return n
            return through_http_client
        left = self.length
        buffered = resp.read1(min(left, SNIFF_BYTES))  # what http.client read ahead with the headers
        left -= len(buffered)
        timeout = self.opts.timeout
        # blocking, so MSG_WAITALL waits in the kernel; SO_RCVTIMEO keeps the timeout
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(timeout), int((timeout % 1) * 1e6)))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)

        def direct(mv: memoryview) -> int:
            nonlocal buffered, left
            n = 0
            if buffered:
                n = min(len(buffered), len(mv))
                mv[:n] = buffered[:n]
                buffered = buffered[n:]
            while n < len(mv) and left > 0:
                want = min(len(mv) - n, left)
                try:
                    k = sock.recv_into(mv[n:n + want], want, socket.MSG_WAITALL)
                except BlockingIOError as err:  # SO_RCVTIMEO expired
                    raise TimeoutError(f"no data for {timeout:.0f}s") from err
                if not k:
                    break
                n += k
                left -= k
            return n
        return direct

    def chunks(self, progress: ProgressFn | None, cancel: threading.Event) -> Iterable[memoryview]:
        """Body chunks, read ahead by a thread so receiving overlaps the consumer's writes."""
        free: queue.Queue[bytearray] = queue.Queue()
        full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
        for _ in range(3):
            free.put(bytearray(CHUNK))

        fill = self.filler()

        def reader() -> None:
            total = 0
            last = 0.0
            try:
                while not cancel.is_set():
                    buf = free.get()
                    n = fill(memoryview(buf))
                    if n == 0:
                        break
                    total += n
                    full.put((buf, n))
                    now = time.monotonic()
                    if progress and self.length and now - last > 0.5:
                        last = now
                        progress(total / self.length)
                    if n < CHUNK:
                        break
                if self.length is not None and total < self.length and not cancel.is_set():
                    raise TransferError(CONNECTION_ERROR, f"the connection closed after {total} of {self.length} "
                                        "bytes", transient=True)
                full.put(None)
            except (OSError, http.client.HTTPException) as err:
                full.put(TransferError(CONNECTION_ERROR, f"reading {self.opts.url}: {err}", transient=True))
            except BaseException as err:  # handed to the consumer, which raises it
                full.put(err)

        t = threading.Thread(target=reader, name="http-reader", daemon=True)
        t.start()
        try:
            while True:
                item = full.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                buf, n = item
                yield memoryview(buf)[:n]
                free.put(buf)
        finally:
            cancel.set()
            free.put(bytearray(0))  # unblock a reader waiting for a buffer
            t.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# parallel ranged download (servers that answer Range requests)

PARALLEL_CONNECTIONS = 3
PARALLEL_MIN_SIZE = 8 << 20  # smaller images: one connection
_SEGMENT_MIN, _SEGMENT_MAX = 16 << 20, 256 << 20


class RangedSource:
    """The file behind a probe that was answered 206: more ranges of it, each on its own connection, from the
    URL the probe was redirected to, with the probe's headers and If-Range (a file that changes midway fails
    the import instead of mixing two versions)."""

    def __init__(self, probe: HTTPStream) -> None:
        assert probe.total is not None
        self.opts = dataclasses.replace(probe.opts, url=probe.url)
        self.headers = probe.headers
        self.validator = probe.validator
        self.total = probe.total

    def open(self, first: int, end: int) -> HTTPStream:
        stream = HTTPStream(self.opts, self.headers)
        stream.open((first, end - 1), self.validator)
        if stream.total is None:
            stream.close()
            raise TransferError(HTTP_ERROR, f"GET {self.opts.url}: the file changed during the download (the "
                                "server stopped answering the range requests)", transient=True)
        return stream

    def read(self, first: int, end: int) -> bytes:
        stream = self.open(first, end)
        try:
            assert stream.resp is not None
            data = stream.resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise TransferError(CONNECTION_ERROR, f"reading {self.opts.url}: {err}", transient=True) from err
        finally:
            stream.close()
        if len(data) != end - first:
            raise TransferError(CONNECTION_ERROR, f"reading {self.opts.url}: {len(data)} of {end - first} bytes "
                                f"at {first}", transient=True)
        return data

    def segments(self) -> list[tuple[int, int]]:
        size = min(_SEGMENT_MAX, max(_SEGMENT_MIN, self.total // (PARALLEL_CONNECTIONS * 2))) // CHUNK * CHUNK
        return [(a, min(self.total, a + size)) for a in range(0, self.total, size)]

    def download(self, place: Callable[[memoryview, int], None], progress: ProgressFn | None,
                 cancel: threading.Event) -> None:
        """Every byte of the file through `place(data, offset)` (CHUNK-aligned pieces, any order, from
        PARALLEL_CONNECTIONS threads: receiving and writing use every core)."""
        todo = list(reversed(self.segments()))
        lock = threading.Lock()
        done = 0
        last = 0.0
        errors: list[BaseException] = []

        def worker() -> None:
            nonlocal done, last
            buf = memoryview(bytearray(CHUNK))
            try:
                while not cancel.is_set():
                    with lock:
                        if not todo:
                            return
                        first, end = todo.pop()
                    stream = self.open(first, end)
                    try:
                        fill = stream.filler()
                        pos = first
                        while pos < end and not cancel.is_set():
                            want = min(CHUNK, end - pos)
                            try:
                                n = fill(buf[:want])
                            except (OSError, http.client.HTTPException) as err:
                                raise TransferError(CONNECTION_ERROR, f"reading {self.opts.url}: {err}",
                                                    transient=True) from err
                            if n < want:
                                raise TransferError(CONNECTION_ERROR, f"the connection closed after {pos + n - first}"
                                                    f" of {end - first} bytes of the range at {first}",
                                                    transient=True)
                            try:
                                place(buf[:n], pos)
                            except OSError as err:
                                raise _os_error(err, "writing the image") from err
                            pos += n
                            with lock:
                                done += n
                                now = time.monotonic()
                                if progress is not None and now - last > 0.5:
                                    last = now
                                    progress(done / self.total)
                    finally:
                        stream.close()
            except BaseException as err:  # the first one is raised by download()
                with lock:
                    errors.append(err)
                cancel.set()

        threads = [threading.Thread(target=worker, name=f"http-range-{i}", daemon=True)
                   for i in range(PARALLEL_CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _qcow2_map(src: RangedSource, h: Qcow2Header) -> dict[int, list[int]] | None:
    """host offset -> guest offsets of every data cluster, from the L1 and L2 tables read ahead with range
    requests; None when the image has compressed clusters (they are inflated by the streaming parser)."""
    cs = h.cluster_size
    if h.l1_offset + h.l1_size * 8 > src.total:
        raise TransferError(INVALID_IMAGE, "the qcow2 image ends before its L1 table")
    l1 = src.read(h.l1_offset, h.l1_offset + h.l1_size * 8) if h.l1_size else b""
    tables = l2_tables(h, l1)
    if any(off + cs > src.total for _, off in tables):
        raise TransferError(INVALID_IMAGE, "the qcow2 image is truncated: tables point past its end")
    # runs of adjacent L2 tables in one request each, the requests spread over the connections
    runs: list[list[tuple[int, int]]] = []
    for idx, off in sorted(tables, key=lambda t: t[1]):
        if runs and runs[-1][-1][1] + cs == off and len(runs[-1]) < 256:
            runs[-1].append((idx, off))
        else:
            runs.append([(idx, off)])
    mapping: dict[int, list[int]] = {}
    lock = threading.Lock()
    compressed = False
    errors: list[BaseException] = []

    def fetch(mine: list[list[tuple[int, int]]]) -> None:
        nonlocal compressed
        try:
            for run in mine:
                data = src.read(run[0][1], run[-1][1] + cs)
                for k, (idx, _) in enumerate(run):
                    found = list(l2_clusters(h, data[k * cs:(k + 1) * cs], idx))
                    with lock:
                        for guest, host, clen in found:
                            if clen:
                                compressed = True
                            else:
                                mapping.setdefault(host, []).append(guest)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=fetch, args=(runs[i::PARALLEL_CONNECTIONS],), daemon=True)
               for i in range(min(PARALLEL_CONNECTIONS, len(runs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if compressed:
        return None
    if any(host + cs > src.total for host in mapping):
        raise TransferError(INVALID_IMAGE, "the qcow2 image is truncated: tables point past its end")
    return mapping


def _qcow2_placer(fd: int, mapping: Mapping[int, list[int]], cs: int) -> Callable[[memoryview, int], None]:
    def place(data: memoryview, offset: int) -> None:
        out = _Coalescer(fd)
        for i in range(0, len(data), cs):
            guests = mapping.get(offset + i)
            if guests:
                for g in guests:
                    out.add(data[i:i + cs], g)
        out.flush()
    return place


def parallel_import(src: RangedSource, head: bytes, target: Path, work_dir: Path, limit: int,
                    progress: ProgressFn | None, cancel: threading.Event) -> PipelineResult | None:
    """Raw, qcow2 without compressed clusters, and what qemu-img converts (to a scratch file) over several
    connections; None when the image must stream through the Pipeline (compressed clusters)."""
    kind, header = image_kind(head)
    place: Callable[[memoryview, int], None]
    scratch = None
    if header is not None:
        if header.size > limit:
            raise TransferError(TOO_LARGE, f"virtual image size {header.size} is larger than the volume's usable "
                                f"size of {limit} bytes; a larger volume is required")
        mapping = _qcow2_map(src, header)
        if mapping is None:
            log.info("qcow2 image with compressed clusters: streamed")
            return None
        size = header.size
        path = target
    elif kind == "raw":
        if src.total > limit:
            raise TransferError(TOO_LARGE, f"the image is larger than the volume's usable size of {limit} bytes; "
                                "a larger volume is required")
        size = src.total
        path = target
    else:
        size = src.total
        path = scratch = work_dir / ".scratch"
    try:
        fd = _create(path)
    except OSError as err:
        raise _os_error(err, f"creating {path}") from err
    try:
        os.ftruncate(fd, size)
        if header is not None:
            place = _qcow2_placer(fd, mapping, header.cluster_size)
        else:
            def place(data: memoryview, offset: int) -> None:
                _write_sparse(fd, data, offset)
        src.download(place, progress, cancel)
    except BaseException:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    if cancel.is_set():
        raise TransferError(TRANSFER_FAILED, "the import was cancelled", transient=True)
    if kind == "scratch":
        return PipelineResult("scratch", 0, scratch, src.total)
    return PipelineResult(kind, size, None, src.total)


def file_chunks(path: Path, cancel: threading.Event) -> Iterable[memoryview]:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while not cancel.is_set():
            n = f.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                return
            yield memoryview(buf)[:n]


# --------------------------------------------------------------------------------------------------
# qemu-img for what is not streamed


async def _qemu_img(*args: str, progress: ProgressFn | None = None) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        raise TransferError(TRANSFER_FAILED, f"cannot run {QEMU_IMG}: {err}", transient=True) from err
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    pat = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
    try:
        while True:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                break
            out += chunk
            if progress is not None:
                matches = pat.findall(chunk)
                if matches:
                    progress(float(matches[-1]) / 100.0)
        err = await proc.stderr.read()
        await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip()
        if "No space left" in msg:
            raise TransferError(DISK_FULL, f"qemu-img {args[0]}: {msg}", transient=True)
        raise TransferError(INVALID_IMAGE, f"qemu-img {args[0]} failed: {msg}")
    return out.decode(errors="replace")


async def inspect(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """`qemu-img info` of an untrusted image, refusing what must never be opened on the host."""
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    info = json.loads(await _qemu_img(*args))
    detected = info.get("format", "")
    if detected not in SUPPORTED_FORMATS:
        raise TransferError(INVALID_IMAGE, f"unsupported image format {detected!r}; supported: qcow2, raw, vmdk, "
                            "vdi, vhd, vhdx (optionally gz or xz compressed)")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise TransferError(INVALID_IMAGE, "the image has a backing file; only self-contained images can be "
                            "imported")
    _check_extents(info, path)
    return info


def _check_extents(info: Mapping[str, Any], path: Path) -> None:
    # A VMDK descriptor may name any host file as an extent: only the image itself is allowed.
    extents = ((info.get("format-specific") or {}).get("data") or {}).get("extents") or []
    for ext in extents:
        if os.path.realpath(str(ext.get("filename", ""))) != os.path.realpath(path):
            raise TransferError(INVALID_IMAGE, "the VMDK descriptor references other files; upload a "
                                "self-contained (monolithic) VMDK")


async def convert(source: Path, fmt: str, target: Path, *, progress: ProgressFn | None = None,
                  target_is_device: bool = False, preallocate: bool = False) -> None:
    """qemu-img convert to raw; sparse unless preallocation is asked for."""
    args = ["convert", "-p", "-t", "writeback", "-f", fmt, "-O", "raw"]
    if preallocate and not target_is_device:
        args += ["-o", "preallocation=falloc"]
    if target_is_device:
        args += ["-n"]
    await _qemu_img(*args, str(source), str(target), progress=progress)


# --------------------------------------------------------------------------------------------------
# the entry points the controllers use


@dataclasses.dataclass(slots=True)
class ImportResult:
    path: Path  # the finished (not yet committed) raw image
    virtual_size: int
    source_format: str
    received: int
    streamed: bool


async def finish_image(result: PipelineResult, target: Path, limit: int, *, progress: ProgressFn | None = None,
                       preallocate: bool = False) -> ImportResult:
    """After the stream: convert a scratch file, check the size, grow to `limit`, preallocate."""
    fmt = result.kind
    virtual = result.virtual_size
    if result.kind == "scratch":
        assert result.scratch is not None
        try:
            info = await inspect(result.scratch)
            fmt = info["format"]
            virtual = int(info.get("virtual-size", 0))
            if virtual > limit:
                raise TransferError(TOO_LARGE, f"virtual image size {virtual} is larger than the volume's usable "
                                    f"size of {limit} bytes; a larger volume is required")
            await asyncio.to_thread(target.unlink, True)
            await convert(result.scratch, fmt, target, progress=progress)
        finally:
            result.scratch.unlink(missing_ok=True)
    await asyncio.to_thread(grow, target, limit, preallocate)
    return ImportResult(target, virtual, fmt, result.received, result.kind != "scratch")


def grow(target: Path, size: int, preallocate: bool) -> None:
    try:
        if target.stat().st_size < size:
            os.truncate(target, size)
        if preallocate:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
    except OSError as err:
        raise _os_error(err, f"resizing {target}") from err


async def import_http(opts: HTTPOptions, target: Path, work_dir: Path, limit: int, *,
                      checksum: str | None = None, progress: ProgressFn | None = None,
                      preallocate: bool = False) -> ImportResult:
    """Downloads `opts.url` into the raw image `target` (a temp name in the volume), ≤ `limit` bytes."""
    cancel = threading.Event()
    stream = HTTPStream(opts)

    def download() -> PipelineResult:
        # The first request asks for the image's head as a range: a server that answers 206 gets several
        # connections (parallel_import); one that answers 200 streams the whole body through the Pipeline.
        stream.open((0, SNIFF_BYTES - 1))
        try:
            if stream.length is not None and stream.length == 0:
                raise TransferError(INVALID_IMAGE, f"GET {opts.url}: the response is empty")
            pipeline = Pipeline(target, work_dir, limit, checksum=checksum)
            if stream.total is None:
                return run_pipeline(stream.chunks(_scaled(progress, 0.0, 0.95), cancel), pipeline)
            try:
                assert stream.resp is not None
                head = stream.resp.read()
            except (OSError, http.client.HTTPException) as err:
                raise TransferError(CONNECTION_ERROR, f"reading {opts.url}: {err}", transient=True) from err
            finally:
                stream.close()
            src = RangedSource(stream)
            if (checksum is None and src.total >= PARALLEL_MIN_SIZE and len(head) == SNIFF_BYTES
                    and not head.startswith((_GZIP, _XZ))):
                result = parallel_import(src, head, target, work_dir, limit, _scaled(progress, 0.0, 0.95), cancel)
                if result is not None:
                    return result
            # checksums and decompression need the bytes in order: the head, then the rest as one stream
            return run_pipeline(_rest(src, head, _scaled(progress, 0.0, 0.95), cancel), pipeline)
        finally:
            stream.close()

    try:
        result = await asyncio.to_thread(download)
    except asyncio.CancelledError:
        cancel.set()
        raise
    except TimeoutError as err:
        raise TransferError(CONNECTION_ERROR, f"{opts.url}: timed out", transient=True) from err
    return await finish_image(result, target, limit, progress=_scaled(progress, 0.95, 1.0), preallocate=preallocate)


def _rest(src: RangedSource, head: bytes, progress: ProgressFn | None,
          cancel: threading.Event) -> Iterable[memoryview]:
    yield memoryview(head)
    if len(head) >= src.total:
        return
    rest = src.open(len(head), src.total)
    part = _scaled(progress, len(head) / src.total, 1.0)
    try:
        yield from rest.chunks(part, cancel)
    finally:
        rest.close()


async def import_file(source: Path, target: Path, work_dir: Path, limit: int, *, checksum: str | None = None,
                      progress: ProgressFn | None = None, preallocate: bool = False) -> ImportResult:
    """A local file (an uploaded body, a pulled containerDisk) through the same pipeline."""
    cancel = threading.Event()

    def chunks() -> Iterable[memoryview]:
        total = max(1, os.path.getsize(source))
        done = 0
        last = 0.0
        for c in file_chunks(source, cancel):
            done += len(c)
            now = time.monotonic()
            if progress is not None and now - last > 0.5:
                last = now
                progress(0.95 * done / total)
            yield c

    def work() -> PipelineResult:
        return run_pipeline(chunks(), Pipeline(target, work_dir, limit, checksum=checksum))

    try:
        result = await asyncio.to_thread(work)
    except asyncio.CancelledError:
        cancel.set()
        raise
    return await finish_image(result, target, limit, progress=_scaled(progress, 0.95, 1.0), preallocate=preallocate)


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    if progress is None:
        return None
    p = progress
    return lambda f: p(lo + (hi - lo) * max(0.0, min(1.0, f)))


def ca_bundle(config_map: Mapping[str, Any] | None) -> str | None:
    """The PEM certificates of a certConfigMap (every data value, concatenated)."""
    if not config_map:
        return None
    data = config_map.get("data") or {}
    pems = [str(v) for v in data.values() if "-----BEGIN CERTIFICATE-----" in str(v)]
    return "\n".join(pems) or None
