"""Client-side halves of the console websockets, used by virtctl: a raw terminal on a serial console, stdio and
TCP splices for port-forward and VNC.

Only aiohttp and the stdlib: the caller opens the websocket (it knows the cluster and its credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp

ESCAPE = 0x1D  # Ctrl+]
READ_CHUNK = 64 * 1024
CLIENT_HEARTBEAT = 10.0


class End(enum.Enum):
    ESCAPE = "escape"  # the user typed the escape character
    REMOTE = "remote"  # the server closed the websocket
    EOF = "eof"  # our input ended


class FdReader:
    """Reads a file descriptor without blocking the event loop: a reader callback on pollable fds (ttys,
    pipes, sockets), a thread for the rest (a regular file redirected to stdin cannot be polled)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread_task: asyncio.Task[None] | None = None
        try:
            self._loop.add_reader(fd, self._ready)
            self._polled = True
        except (PermissionError, OSError, ValueError):
            self._polled = False
            self._thread_task = self._loop.create_task(self._threaded())

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
        self._queue.put_nowait(data)

    async def _threaded(self) -> None:
        while True:
            try:
                data = await asyncio.to_thread(os.read, self.fd, READ_CHUNK)
            except OSError:
                data = b""
            self._queue.put_nowait(data)
            if not data:
                return

    async def read(self) -> bytes:
        """The next chunk; b"" at end of input."""
        return await self._queue.get()

    def close(self) -> None:
        if self._polled:
            self._loop.remove_reader(self.fd)
        elif self._thread_task is not None:
            self._thread_task.cancel()  # the thread itself finishes its read in the background


async def write_all(fd: int, data: bytes) -> None:
    """os.write everything, waiting (without blocking the loop) when the fd is non-blocking and full."""
    view = memoryview(data)
    loop = asyncio.get_running_loop()
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            continue
        view = view[n:]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Put a tty into raw mode (keys go to the guest as typed, Ctrl+C included) and restore it on exit.
    Yields whether it is a tty at all."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _pump_ws_to_fd(ws: aiohttp.ClientWebSocketResponse, fd: int) -> End:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            await write_all(fd, msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            await write_all(fd, msg.data.encode())
        elif msg.type == aiohttp.WSMsgType.ERROR:
            break
    return End.REMOTE


async def terminal_session(ws: aiohttp.ClientWebSocketResponse, *, stdin_fd: int = 0, stdout_fd: int = 1,
                           escape: int | None = ESCAPE) -> End:
    """Bridge a serial-console websocket and a terminal until the escape character, end of input or the
    server closing. The caller sets the terminal mode (see `raw_terminal`)."""
    reader = FdReader(stdin_fd)

    async def keyboard() -> End:
        while data := await reader.read():
            if escape is not None and (cut := data.find(bytes([escape]))) >= 0:
                if cut:
                    await ws.send_bytes(data[:cut])
                return End.ESCAPE
            await ws.send_bytes(data)
        return End.EOF

    try:
        return await _race(keyboard(), _pump_ws_to_fd(ws, stdout_fd))
    finally:
        reader.close()
        await ws.close()


async def stdio_session(ws: aiohttp.ClientWebSocketResponse, *, stdin_fd: int = 0, stdout_fd: int = 1) -> End:
    """Port-forward over stdin/stdout (ssh's ProxyCommand): bytes both ways. When stdin ends we keep
    delivering what the server sends until it closes (there is no half-close on a websocket)."""
    reader = FdReader(stdin_fd)

    async def upstream() -> End:
        while data := await reader.read():
            await ws.send_bytes(data)
        await asyncio.Event().wait()  # input done; the server's close ends the session
        return End.EOF

    try:
        return await _race(upstream(), _pump_ws_to_fd(ws, stdout_fd))
    finally:
        reader.close()
        await ws.close()


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ws: aiohttp.ClientWebSocketResponse) -> End:
    """A local TCP connection and a websocket, both ways, until either side closes."""

    async def upstream() -> End:
        while data := await reader.read(READ_CHUNK):
            await ws.send_bytes(data)
        await asyncio.Event().wait()  # local side done sending; wait for the server to finish answering
        return End.EOF

    async def downstream() -> End:
        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                writer.write(data)
                await writer.drain()
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        return End.REMOTE

    try:
        return await _race(upstream(), downstream())
    finally:
        await ws.close()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _race(*coros: Awaitable[End]) -> End:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        exc = first.exception()
        if isinstance(exc, (ConnectionError, aiohttp.ClientError)):
            return End.REMOTE
        if exc is not None:
            raise exc
        return first.result()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task


async def serve_local(host: str, port: int, open_ws: Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]],
                      *, on_error: Callable[[BaseException], Any] | None = None) -> asyncio.Server:
    """A local TCP listener; every connection gets its own websocket from `open_ws()`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws = await open_ws()
        except Exception as exc:  # one failed connection must not end the listener
            if on_error is not None:
                on_error(exc)
            else:
                print(f"error: {exc}", file=sys.stderr)
            writer.close()
            return
        await splice(reader, writer, ws)

    return await asyncio.start_server(handle, host, port)
