"""`kubectl port-forward pod/NAME`: the kubelet's port-forward protocol (`portforward.k8s.io`) over SPDY/3.1.

kubectl 1.31 and later tunnel SPDY through a websocket (subprotocol `SPDY/3.1+portforward.k8s.io`: binary
messages carry the SPDY byte stream, cut anywhere); only when that upgrade fails do they fall back to a plain
SPDY/3.1 HTTP upgrade, which this node agent does not serve. Over the SPDY session, each local connection is
two client streams sharing a `requestID` header: an `error` stream (the client half-closes it at once; the
server writes a message there if the port cannot be reached, then closes it) and a `data` stream (bytes both
ways, FIN on each side's end of input). As the CRI runtimes do, the connection is made to localhost:PORT inside
the pod's network namespace, so ports bound to 127.0.0.1 are reachable too.

SPDY/3.1 as needed here (moby/spdystream is kubectl's side): 8-byte frame headers; control frames SYN_STREAM,
SYN_REPLY, RST_STREAM, PING (echoed), GOAWAY, SETTINGS/WINDOW_UPDATE (ignored: spdystream does no flow control);
header blocks are one zlib stream per direction, primed with the SPDY/3 dictionary, flushed per block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from virtplane.network import netns

log = logging.getLogger(__name__)

WS_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
RST_PROTOCOL_ERROR, RST_CANCEL = 1, 5
MAX_CHUNK = 32 * 1024
CONNECT_TIMEOUT = 10.0

# The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed words, then a tail.
_WORDS = [*(
    "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges age "
    "allow authorization cache-control connection content-base content-encoding content-language content-length "
    "content-location content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status"
).split(), "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | 3, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_headers(headers: dict[str, str]) -> bytes:
    out = struct.pack(">I", len(headers))
    for name, value in headers.items():
        out += struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
    return out


def decode_headers(block: bytes) -> dict[str, str]:
    (count,) = struct.unpack_from(">I", block)
    at, out = 4, {}
    for _ in range(count):
        (n,) = struct.unpack_from(">I", block, at)
        name = block[at + 4:at + 4 + n].decode()
        at += 4 + n
        (n,) = struct.unpack_from(">I", block, at)
        out[name.lower()] = block[at + 4:at + 4 + n].decode().split("\x00")[0]
        at += 4 + n
    return out


class FrameReader:
    """Cuts a SPDY byte stream (arriving in pieces of any size) into frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bool, int, int, bytes]]:
        """(is_control, type or stream id, flags, payload) for every complete frame."""
        self.buf += data
        frames = []
        while len(self.buf) >= 8:
            first, second = struct.unpack_from(">II", self.buf)
            length = second & 0xFFFFFF
            if len(self.buf) < 8 + length:
                break
            payload = bytes(self.buf[8:8 + length])
            del self.buf[:8 + length]
            if first & 0x80000000:
                frames.append((True, first & 0xFFFF, second >> 24, payload))
            else:
                frames.append((False, first & 0x7FFFFFFF, second >> 24, payload))
        return frames


Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class _Pair:
    def __init__(self) -> None:
        self.error_id = 0
        self.data_id = 0
        self.writer: asyncio.StreamWriter | None = None
        self.inbox: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class Session:
    """The server side of one port-forward SPDY session. `send` writes bytes to the client (in order)."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]], dial: Dial) -> None:
        self._send = send
        self._dial = dial
        self._reader = FrameReader()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
        self._lock = asyncio.Lock()
        self._pairs: dict[str, _Pair] = {}
        self._by_stream: dict[int, _Pair] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def _write(self, frame: bytes) -> None:
        async with self._lock:
            await self._send(frame)

    async def _reply(self, stream_id: int) -> None:
        async with self._lock:  # header compression state follows the order frames go out in
            block = self._deflate.compress(encode_headers({})) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
            await self._send(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + block))

    async def feed(self, data: bytes) -> None:
        """Bytes from the client; handles every complete frame."""
        for control, kind, flags, payload in self._reader.feed(data):
            if control:
                await self._control(kind, flags, payload)
            else:
                await self._data(kind, flags, payload)

    async def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            headers = decode_headers(self._inflate.decompress(payload[10:]))
            await self._new_stream(stream_id, headers, flags)
        elif kind == PING:
            await self._write(control_frame(PING, 0, payload))
        elif kind == RST_STREAM:
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            pair = self._by_stream.get(stream_id)
            if pair is not None and pair.writer is not None:
                pair.writer.close()
        elif kind == GOAWAY:
            self.closed = True
        elif kind == HEADERS:
            self._inflate.decompress(payload[4:])  # keep the decompressor in step; nothing to do with them
        # SETTINGS, WINDOW_UPDATE: nothing to do (no flow control on either side)

    async def _new_stream(self, stream_id: int, headers: dict[str, str], flags: int) -> None:
        request = headers.get("requestid", "")
        kind = headers.get("streamtype", "")
        try:
            port = int(headers.get("port", ""))
        except ValueError:
            port = 0
        if kind not in ("error", "data") or not 0 < port < 65536:
            await self._write(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, RST_PROTOCOL_ERROR)))
            return
        await self._reply(stream_id)
        pair = self._pairs.setdefault(request or f"stream-{stream_id}", _Pair())
        self._by_stream[stream_id] = pair
        if kind == "error":
            pair.error_id = stream_id
            return
        pair.data_id = stream_id
        task = asyncio.ensure_future(self._forward(pair, port, request))
        pair.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        pair = self._by_stream.get(stream_id)
        if pair is None or stream_id != pair.data_id:
            return  # the error stream's FIN (clients write nothing there)
        pair.inbox.put_nowait((payload, bool(flags & FLAG_FIN)))  # the pod's connection may still be coming up

    async def _forward(self, pair: _Pair, port: int, request: str) -> None:
        try:
            reader, writer = await self._dial(port)
        except OSError as err:
            message = f"error forwarding port {port} to pod: {err}"
            log.info("port-forward %s: %s", request, message)
            if pair.error_id:
                await self._write(data_frame(pair.error_id, FLAG_FIN, message.encode()))
            await self._write(data_frame(pair.data_id, FLAG_FIN, b""))
            return
        pair.writer = writer

        async def to_pod() -> None:
            while True:
                payload, fin = await pair.inbox.get()
                if payload:
                    writer.write(payload)
                    await writer.drain()
                if fin:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return

        uploading = asyncio.ensure_future(to_pod())
        try:
            while True:
                chunk = await reader.read(MAX_CHUNK)
                if not chunk:
                    break
                await self._write(data_frame(pair.data_id, 0, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            uploading.cancel()
            with contextlib.suppress(BaseException):
                await uploading
            writer.close()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            await self._write(data_frame(pair.data_id, FLAG_FIN, b""))
            if pair.error_id:
                await self._write(data_frame(pair.error_id, FLAG_FIN, b""))

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for pair in self._pairs.values():
            if pair.writer is not None:
                pair.writer.close()


def connect_in_netns(name: str, port: int) -> socket.socket:
    """A TCP connection to localhost:PORT inside network namespace `name` (IPv4, then IPv6); blocking.

    setns(2) moves only the calling thread, and a socket keeps the namespace it was made in: so a throw-away
    thread enters the pod's namespace, connects and leaves (as netns.open_tap does for taps).
    """
    result: list[socket.socket] = []
    errors: list[str] = []

    def work() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(netns.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            os.close(home)
            errors.append(f"the pod's network namespace is gone: {err}")
            return
        try:
            netns._setns(target)
            try:
                for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(CONNECT_TIMEOUT)
                    try:
                        sock.connect((host, port))
                    except OSError as err:
                        sock.close()
                        errors.append(f"{'IPv4' if family == socket.AF_INET else 'IPv6'}: {err.strerror or err}")
                        continue
                    sock.setblocking(False)
                    result.append(sock)
                    return
            finally:
                netns._setns(home)
        except OSError as err:
            errors.append(str(err))
        finally:
            os.close(home)
            os.close(target)

    t = threading.Thread(target=work, name=f"portforward-{name}", daemon=True)
    t.start()
    t.join()
    if not result:
        raise OSError(f"failed to connect to localhost:{port} inside namespace {name}: {'; '.join(errors)}")
    return result[0]


async def serve_websocket(ws: Any, netns_name: str) -> None:
    """Run one session over an (aiohttp) websocket tunnel until the client closes it."""
    from aiohttp import WSMsgType

    async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await asyncio.to_thread(connect_in_netns, netns_name, port)
        return await asyncio.open_connection(sock=sock)

    session = Session(ws.send_bytes, dial)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await session.feed(msg.data)
            elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                break
            if session.closed:
                break
    except (ConnectionError, zlib.error, struct.error, UnicodeDecodeError) as err:
        log.info("port-forward session ended: %s", err)
    finally:
        await session.close()
