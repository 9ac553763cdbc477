"""A stand-in for QEMU's serial chardev: a unix socket server that, like QEMU, serves one client at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio


class FakeSerial:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self.received = bytearray()
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._data_in = asyncio.Condition()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._busy:  # QEMU serves one client; later ones wait
            self.connections += 1
            self._writer = writer
            self.disconnected.clear()
            self.connected.set()
            while data := await reader.read(65536):
                async with self._data_in:
                    self.received += data
                    self._data_in.notify_all()
            self._writer = None
            self.connected.clear()
            self.disconnected.set()
            writer.close()

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(self.connected.wait(), 5)
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def hang_up(self) -> None:
        """QEMU exiting: close the client's connection (waits until there is one)."""
        await asyncio.wait_for(self.connected.wait(), 5)
        if self._writer is not None:
            self._writer.close()

    async def wait_received(self, needle: bytes, timeout: float = 5) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._data_in:
            await self._data_in.wait_for(lambda: needle in self.received)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


@pytest_asyncio.fixture
async def fake_serial(tmp_path: Path) -> AsyncIterator[FakeSerial]:
    srv = FakeSerial(tmp_path / "serial.sock")
    await srv.start()
    yield srv
    await srv.close()
