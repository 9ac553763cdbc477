"""The QMP layer against a scripted in-process QMP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.hypervisor.errors import QMPCommandError, QMPConnectError, QMPDisconnectedError, QMPTimeoutError
from virtplane.hypervisor.qmp import QMP, GuestAgent

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}


class FakeQMP:
    """Speaks enough QMP: greeting, qmp_capabilities, and commands scripted per test."""

    def __init__(self, path: Path, *, greeting: bool = True) -> None:
        self.path = path
        self.greeting = greeting
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.received: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        for w in self.writers:
            self.send(w, {"event": name, "data": data or {}, "timestamp": {"seconds": 1, "microseconds": 5}})

    @staticmethod
    async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
        # QMP is a stream of JSON objects; clients need not end them with a newline.
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.greeting:
            self.send(writer, GREETING)
        async for msg in self._messages(reader):
            self.received.append(msg)
            cmd, mid = msg.get("execute"), msg.get("id")
            if cmd == "qmp_capabilities":
                self.send(writer, {"return": {}, "id": mid})
            elif cmd == "query-status":
                self.send(writer, {"return": {"status": "running", "running": True}, "id": mid})
            elif cmd == "fail":
                self.send(writer, {"error": {"class": "DeviceNotFound", "desc": "no such thing"}, "id": mid})
            elif cmd == "emit":
                self.event("STOP")
                self.event("RESUME")
                self.send(writer, {"return": {}, "id": mid})
            elif cmd == "hangup":
                writer.close()
                return
            elif cmd == "guest-ping":
                self.send(writer, {"return": {}, "id": mid})
            # anything else: never answered


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FakeQMP]:
    srv = FakeQMP(tmp_path / "qmp.sock")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def qmp(server: FakeQMP) -> AsyncIterator[QMP]:
    q = QMP(server.path)
    await q.connect(2)
    yield q
    await q.close()


async def test_execute(qmp: QMP) -> None:
    assert await qmp.execute("query-status") == {"status": "running", "running": True}


async def test_error_wraps_root_cause(qmp: QMP) -> None:
    with pytest.raises(QMPCommandError) as err:
        await qmp.execute("fail", {"id": "x"})
    assert err.value.error_class == "DeviceNotFound"
    assert err.value.command == "fail"
    assert "no such thing" in str(err.value)
    assert type(err.value.__cause__).__name__ == "ExecuteError"


async def test_timeout(qmp: QMP) -> None:
    with pytest.raises(QMPTimeoutError) as err:
        await qmp.execute("never-answered", timeout=0.2)
    assert isinstance(err.value.__cause__, TimeoutError)
    assert await qmp.execute("query-status")  # the connection is still usable


async def test_events_filtered_per_subscriber(qmp: QMP) -> None:
    async with qmp.events({"RESUME"}) as resumes, qmp.events() as everything:
        await qmp.execute("emit")
        first = await resumes.get(timeout=2)
        assert first.name == "RESUME" and first.timestamp == pytest.approx(1.000005)
        assert [(await everything.get(timeout=2)).name for _ in range(2)] == ["STOP", "RESUME"]


async def test_disconnect_ends_streams_and_fails_commands(qmp: QMP) -> None:
    stream = qmp.events()
    with pytest.raises(QMPDisconnectedError):
        await qmp.execute("hangup", timeout=2)
    await asyncio.wait_for(qmp.wait_disconnected(), 2)
    assert [e async for e in stream] == []  # the iterator ends instead of hanging
    assert not qmp.connected
    with pytest.raises(QMPDisconnectedError) as err:
        await qmp.execute("query-status")
    assert err.value.__cause__ is not None


async def test_connect_retries_until_socket_exists(tmp_path: Path) -> None:
    srv = FakeQMP(tmp_path / "late.sock")

    async def start_later() -> None:
        await asyncio.sleep(0.3)
        await srv.start()

    task = asyncio.create_task(start_later())
    q = QMP(srv.path)
    await q.connect(3)
    assert await q.execute("query-status")
    await q.close()
    await task
    await srv.stop()


async def test_connect_is_bounded(tmp_path: Path) -> None:
    q = QMP(tmp_path / "never.sock")
    with pytest.raises(QMPConnectError):
        await q.connect(0.3)
    with pytest.raises(QMPConnectError, match="exited"):
        await q.connect(5, alive=lambda: False)


async def test_guest_agent_no_greeting(tmp_path: Path) -> None:
    srv = FakeQMP(tmp_path / "qga.sock", greeting=False)
    await srv.start()
    agent = GuestAgent(srv.path, default_timeout=0.3)
    try:
        await agent.ping()
        assert srv.received[0]["execute"] == "guest-ping"  # no qmp_capabilities for qemu-ga
        with pytest.raises(Exception, match="did not answer"):
            await agent.execute("guest-info")
    finally:
        with contextlib.suppress(Exception):
            await agent.close()
        await srv.stop()
