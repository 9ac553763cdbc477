"""The serial console multiplexer: one connection to QEMU's serial socket, any number of viewers.

QEMU's socket chardev serves one client at a time (a second one waits in the listen backlog), and KubeVirt
kicks the first viewer out when a second connects (kubevirt#7041). `SerialMux` instead holds the single
connection and fans the output out to every attached `Viewer`; every viewer may type (writes are
serialised, so keystrokes of two viewers never interleave inside one chunk). The last `REPLAY_BYTES` of
output are replayed to a viewer when it attaches, so it sees the prompt without pressing Enter; when the mux
opens it seeds that buffer from the tail of console.log (QEMU's `logfile=` of the same chardev), so even
the first viewer of an idle console sees the login prompt.

A viewer that does not read (a stalled websocket) is dropped once `VIEWER_BACKLOG` bytes wait for it,
rather than slowing the guest or the other viewers down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from .located import ConsoleError

log = logging.getLogger(__name__)

REPLAY_BYTES = 64 * 1024
VIEWER_BACKLOG = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
LINGER_SECONDS = 30.0

# Terminal queries a guest prints (ash asks for the cursor position, getty may ask for device attributes).
# Live, the viewer's terminal answers them, as the guest wants. Replayed later they would make the new
# viewer's terminal type a stale answer ("ESC[24;80R") into the guest's shell, so the replay drops them.
_TERMINAL_QUERIES = re.compile(rb"\x1b\[[0-9;?>=]*[nc]|\x1bZ")


def sanitize_replay(data: bytes) -> bytes:
    """What is safe to replay: terminal queries removed, and when the buffer was cut, start at a line start
    (so it does not begin in the middle of an escape sequence or a UTF-8 character)."""
    return _TERMINAL_QUERIES.sub(b"", data)


def _trim_to_line(data: bytes, full: bool) -> bytes:
    if full:
        return data
    nl = data.find(b"\n")
    return data[nl + 1:] if 0 <= nl < len(data) - 1 else data


class Viewer:
    """One attached client's view: a queue of output chunks. `read()` returns None once detached/closed."""

    def __init__(self, backlog: int) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending = 0
        self._backlog = backlog
        self.closed = False
        self.close_reason = ""

    def _offer(self, data: bytes) -> None:
        if self.closed:
            return
        if self._pending + len(data) > self._backlog:
            self._close(f"viewer fell more than {self._backlog} bytes behind")
            return
        self._pending += len(data)
        self._queue.put_nowait(data)

    def _close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._queue.put_nowait(None)

    async def read(self) -> bytes | None:
        """The next chunk of output (consecutive queued chunks are joined); None when this view has ended."""
        first = await self._queue.get()
        if first is None:
            return None
        chunks = [first]
        while not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt is None:
                self._queue.put_nowait(None)  # deliver what we have, end on the next read
                break
            chunks.append(nxt)
        data = b"".join(chunks)
        self._pending -= len(data)
        return data


class SerialMux:
    """Holds the one connection to a serial socket and shares it between viewers.

    Opens lazily on the first `attach()`; closes `linger` seconds after the last viewer detached (the buffer
    is re-seeded from console.log on the next open), or at once when QEMU closes the socket (it exited), in
    which case every viewer's `read()` returns None.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        log_path: Path | None = None,
        replay_bytes: int = REPLAY_BYTES,
        viewer_backlog: int = VIEWER_BACKLOG,
        linger: float = LINGER_SECONDS,
        on_closed: Callable[[SerialMux], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.log_path = log_path
        self.replay_bytes = replay_bytes
        self.viewer_backlog = viewer_backlog
        self.linger = linger
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._buffer_complete = True  # False once output was cut off at the front
        self._viewers: set[Viewer] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._linger_task: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self.closed = False
        self.close_reason = ""

    # -- viewers ---------------------------------------------------------------------------------------
    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def replay(self) -> bytes:
        """What a viewer attaching now is sent first."""
        return sanitize_replay(_trim_to_line(bytes(self._buffer), self._buffer_complete))

    async def attach(self) -> Viewer:
        """A new viewer, primed with the replay buffer. Raises ConsoleError when the socket is unreachable."""
        if self.closed:
            raise ConsoleError(503, f"serial console closed: {self.close_reason}")
        await self._ensure_open()
        if self._linger_task is not None:
            self._linger_task.cancel()
            self._linger_task = None
        viewer = Viewer(self.viewer_backlog)
        replay = self.replay()
        if replay:
            viewer._offer(replay)
        self._viewers.add(viewer)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        viewer._close("detached")
        self._viewers.discard(viewer)
        if not self._viewers and not self.closed and self._linger_task is None:
            self._linger_task = asyncio.get_running_loop().create_task(self._linger_then_close())

    async def _linger_then_close(self) -> None:
        await asyncio.sleep(self.linger)
        if not self._viewers:
            self._linger_task = None  # we are the caller: do not let close() cancel us
            await self.close("no viewers")

    # -- the connection --------------------------------------------------------------------------------
    async def _ensure_open(self) -> None:
        async with self._open_lock:
            if self._writer is not None or self.closed:
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except (OSError, TimeoutError) as exc:
                raise ConsoleError(503, f"serial console socket {self.socket_path} is not reachable: {exc}") from exc
            # Seed right after connecting: whatever QEMU wrote before it accepted us is in the log only.
            self._seed_from_log()
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._pump(reader), name=f"serial-mux {self.socket_path}")

    def _seed_from_log(self) -> None:
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "rb") as f:  # a bounded read of a local file: not worth a thread
                size = f.seek(0, os.SEEK_END)
                start = max(0, size - self.replay_bytes)
                f.seek(start)
                data = f.read(self.replay_bytes)
        except OSError:
            return
        self._append(data, cut=start > 0)

    def _append(self, data: bytes, *, cut: bool = False) -> None:
        self._buffer += data
        if cut:
            self._buffer_complete = False
        excess = len(self._buffer) - self.replay_bytes
        if excess > 0:
            del self._buffer[:excess]
            self._buffer_complete = False

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        reason = "QEMU closed the serial console (the VM stopped)"
        try:
            while data := await reader.read(READ_CHUNK):
                self._append(data)
                for viewer in list(self._viewers):
                    viewer._offer(data)
                    if viewer.closed:
                        log.info("serial console %s: dropping a viewer: %s", self.socket_path, viewer.close_reason)
                        self._viewers.discard(viewer)
        except OSError as exc:
            reason = f"serial console connection failed: {exc}"
        self._reader_task = None  # ending by ourselves: close() must not cancel this task
        await self.close(reason)

    async def write(self, data: bytes) -> None:
        """Type `data` on the console (serialised with other viewers' input)."""
        if self.closed:
            raise ConsoleError(503, f"serial console closed: {self.close_reason}")
        await self._ensure_open()
        writer = self._writer
        if writer is None:
            raise ConsoleError(503, "serial console is not connected")
        async with self._write_lock:
            try:
                writer.write(data)
                await writer.drain()
            except OSError as exc:
                raise ConsoleError(503, f"writing to the serial console failed: {exc}") from exc

    async def close(self, reason: str = "closed") -> None:
        """Disconnect from QEMU and end every viewer (idempotent). Does not affect the guest."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for task in (self._linger_task, self._reader_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._linger_task = self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        for viewer in list(self._viewers):
            viewer._close(reason)
        self._viewers.clear()
        if self._on_closed is not None:
            self._on_closed(self)


class SerialHub:
    """The node's serial multiplexers, one per serial socket (a restarted VMI gets a new runtime dir or a
    new socket, hence a new mux once the old one saw QEMU go away)."""

    def __init__(self, *, linger: float = LINGER_SECONDS, replay_bytes: int = REPLAY_BYTES) -> None:
        self._muxes: dict[Path, SerialMux] = {}
        self._linger = linger
        self._replay_bytes = replay_bytes

    def mux(self, socket_path: Path, log_path: Path | None) -> SerialMux:
        key = Path(socket_path)
        mux = self._muxes.get(key)
        if mux is None or mux.closed:
            mux = SerialMux(key, log_path=log_path, linger=self._linger, replay_bytes=self._replay_bytes,
                            on_closed=self._forget)
            self._muxes[key] = mux
        return mux

    def _forget(self, mux: SerialMux) -> None:
        if self._muxes.get(mux.socket_path) is mux:
            del self._muxes[mux.socket_path]

    async def close(self) -> None:
        for mux in list(self._muxes.values()):
            await mux.close("node agent shutting down")
        self._muxes.clear()
