"""The serial multiplexer against a real unix-socket server standing in for QEMU's chardev."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import FakeSerial

from virtplane.console.located import ConsoleError
from virtplane.console.serial import REPLAY_BYTES, SerialHub, SerialMux, Viewer, sanitize_replay


async def read_until(viewer: Viewer, needle: bytes, timeout: float = 5) -> bytes:  # noqa: ASYNC109
    got = b""
    async with asyncio.timeout(timeout):
        while needle not in got:
            chunk = await viewer.read()
            assert chunk is not None, f"viewer ended ({viewer.close_reason}) before {needle!r}; got {got[-200:]!r}"
            got += chunk
    return got


async def test_fan_out_and_one_connection(fake_serial: FakeSerial) -> None:
    mux = SerialMux(fake_serial.path)
    a, b = await mux.attach(), await mux.attach()
    await fake_serial.send(b"hello both\r\n")
    assert b"hello both" in await read_until(a, b"hello both")
    assert b"hello both" in await read_until(b, b"hello both")
    assert fake_serial.connections == 1  # QEMU sees a single client however many viewers
    await mux.close()


async def test_several_writers_keep_their_chunks(fake_serial: FakeSerial) -> None:
    mux = SerialMux(fake_serial.path)
    await mux.attach()
    await mux.attach()
    lines = [f"viewer-{i % 2} line {i:04d} ".encode() * 20 + b"\n" for i in range(200)]
    await asyncio.gather(*(mux.write(line) for line in lines))
    await fake_serial.wait_received(lines[-1])
    received = bytes(fake_serial.received)
    assert len(received) == sum(map(len, lines))
    for line in lines:
        assert line in received  # every write arrives whole, never interleaved with another viewer's
    await mux.close()


async def test_replay_is_bounded_and_starts_at_a_line(fake_serial: FakeSerial) -> None:
    mux = SerialMux(fake_serial.path)
    first = await mux.attach()
    payload = b"".join(f"line {i:06d} ".encode() + b"x" * 40 + b"\r\n" for i in range(3000))  # ~160 KiB
    await fake_serial.send(payload)
    await read_until(first, b"line 002999")
    late = await mux.attach()
    replay = await late.read()
    assert replay is not None
    assert len(replay) <= REPLAY_BYTES
    assert payload.endswith(replay)  # the most recent output ...
    assert replay.startswith(b"line ")  # ... cut at a line start, not mid-line
    assert len(replay) > REPLAY_BYTES - 100
    await mux.close()


async def test_replay_seeded_from_console_log_without_terminal_queries(fake_serial: FakeSerial,
                                                                       tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot noise\r\n" * 10 + b"\x1b[6nWelcome\r\ncons login: ")
    mux = SerialMux(fake_serial.path, log_path=log)
    viewer = await mux.attach()
    replay = await viewer.read()
    assert replay is not None and replay.endswith(b"cons login: ")
    assert b"\x1b[6n" not in replay  # a replayed cursor query would make the new terminal type an answer
    await fake_serial.send(b"\x1b[6n")  # live output is passed through untouched
    assert await viewer.read() == b"\x1b[6n"
    await mux.close()


def test_sanitize_replay_keeps_colours_drops_queries() -> None:
    data = b"\x1b[1;32mgreen\x1b[0m \x1b[6n \x1b[c \x1b[>c \x1bZ \x1b[5n end"
    assert sanitize_replay(data) == b"\x1b[1;32mgreen\x1b[0m      end"


async def test_qemu_going_away_ends_every_viewer(fake_serial: FakeSerial) -> None:
    hub = SerialHub()
    mux = hub.mux(fake_serial.path, None)
    a, b = await mux.attach(), await mux.attach()
    await fake_serial.hang_up()
    assert await asyncio.wait_for(_drain(a), 5) is None
    assert await asyncio.wait_for(_drain(b), 5) is None
    assert mux.closed and "QEMU closed" in mux.close_reason
    assert hub.mux(fake_serial.path, None) is not mux  # the next viewer gets a fresh connection
    with pytest.raises(ConsoleError):
        await mux.write(b"x")


async def _drain(viewer: Viewer) -> bytes | None:
    while (chunk := await viewer.read()) is not None:
        del chunk
    return None


async def test_slow_viewer_is_dropped_others_continue(fake_serial: FakeSerial) -> None:
    mux = SerialMux(fake_serial.path, viewer_backlog=4096)
    slow, fast = await mux.attach(), await mux.attach()
    for i in range(8):
        await fake_serial.send(bytes([65 + i]) * 1024)
        await read_until(fast, bytes([65 + i]))
    assert slow.closed and "behind" in slow.close_reason
    assert mux.viewers == 1
    await fake_serial.send(b"still flowing")
    await read_until(fast, b"still flowing")
    await mux.close()


async def test_lingers_then_disconnects_after_the_last_viewer(fake_serial: FakeSerial) -> None:
    mux = SerialMux(fake_serial.path, linger=0.2)
    viewer = await mux.attach()
    await asyncio.wait_for(fake_serial.connected.wait(), 5)
    mux.detach(viewer)
    again = await mux.attach()  # re-attaching within the linger keeps the connection
    mux.detach(again)
    await asyncio.wait_for(fake_serial.disconnected.wait(), 5)
    assert mux.closed and fake_serial.connections == 1


async def test_unreachable_socket_is_a_503(tmp_path: Path) -> None:
    mux = SerialMux(tmp_path / "missing.sock")
    with pytest.raises(ConsoleError) as err:
        await mux.attach()
    assert err.value.code == 503 and "missing.sock" in err.value.message
