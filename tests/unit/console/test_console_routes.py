"""The node-side routes mounted on a plain aiohttp app, with fake QEMU sockets (no VM)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeSerial

from virtplane.console import LocatedVMI, add_console_routes

TOKEN = "node-proxy-token"
BASE = "/v1/namespaces/ns/virtualmachineinstances"


class Env:
    def __init__(self, server: TestServer, serial: FakeSerial, log: Path) -> None:
        self.server = server
        self.serial = serial
        self.log = log
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest_asyncio.fixture
async def env(fake_serial: FakeSerial, tmp_path: Path) -> AsyncIterator[Env]:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]

    async def dial(port: int) -> tuple[Any, Any]:
        assert port == 7  # the echo "service" in the guest
        return await asyncio.open_connection("127.0.0.1", echo_port)

    async def locate(namespace: str, name: str) -> LocatedVMI | None:
        if name == "stopped":
            raise web.HTTPConflict(text="VMI is not running")
        if (namespace, name) != ("ns", "vm1"):
            return None
        return LocatedVMI(namespace=namespace, name=name, serial_socket=fake_serial.path, console_log=log,
                          dial_guest=dial, guest_ip="127.0.0.1")

    async def authorize(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized(text="invalid proxy token")

    app = web.Application()
    add_console_routes(app, locate, authorize, serial_linger=0.1)
    server = TestServer(app)
    await server.start_server()
    yield Env(server, fake_serial, log)
    await server.close()
    echo.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_console_websocket_plain_and_base64(env: Env) -> None:
    async with aiohttp.ClientSession(headers=env.headers) as s:
        plain = await s.ws_connect(env.url(f"{BASE}/vm1/console"), protocols=("plain.kubevirt.io",))
        b64 = await s.ws_connect(env.url(f"{BASE}/vm1/console"), protocols=("base64",))
        assert (plain.protocol, b64.protocol) == ("plain.kubevirt.io", "base64")
        await env.serial.send(b"login: ")
        msg = await plain.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"login: "
        msg = await b64.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT and base64.b64decode(msg.data) == b"login: "
        await plain.send_bytes(b"root\r")
        await b64.send_str(base64.b64encode(b"ls\r").decode())
        await env.serial.wait_received(b"ls\r")
        assert bytes(env.serial.received) == b"root\rls\r"
        assert env.serial.connections == 1
        await env.serial.hang_up()  # QEMU went away: both sessions end with a normal close
        for ws in (plain, b64):
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000


@pytest.mark.parametrize(("path", "headers", "code", "reason"), [
    (f"{BASE}/vm1/console", {}, 401, "Unauthorized"),
    (f"{BASE}/other/console", None, 404, "NotFound"),
    (f"{BASE}/stopped/console", None, 409, "Conflict"),
    (f"{BASE}/vm1/console", None, 400, "BadRequest"),  # no upgrade
    (f"{BASE}/vm1/vnc", None, 400, "BadRequest"),  # no VNC socket for this VMI
    (f"{BASE}/vm1/portforward/70000", None, 400, "BadRequest"),
    (f"{BASE}/vm1/portforward/22/sctp", None, 400, "BadRequest"),
])
async def test_errors_are_status_bodies(env: Env, path: str, headers: dict[str, str] | None, code: int,
                                        reason: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(env.url(path), headers=env.headers if headers is None
                                                   else headers) as resp:
        body = await resp.json()
    assert resp.status == code and body["kind"] == "Status" and body["code"] == code
    assert body["reason"] == reason, body


async def test_portforward_tcp_through_dialer(env: Env) -> None:
    async with aiohttp.ClientSession(headers=env.headers) as s:
        ws = await s.ws_connect(env.url(f"{BASE}/vm1/portforward/7"), protocols=("plain.kubevirt.io",))
        await ws.send_bytes(b"ping over the tunnel")
        got = b""
        while len(got) < 20:
            got += (await ws.receive(timeout=5)).data
        assert got == b"ping over the tunnel"
        await ws.close()


async def test_portforward_udp_datagrams(env: Env) -> None:
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data.upper(), addr)  # type: ignore[attr-defined]

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        async with aiohttp.ClientSession(headers=env.headers) as s:
            ws = await s.ws_connect(env.url(f"{BASE}/vm1/portforward/{port}/udp"), protocols=("plain.kubevirt.io",))
            for word in (b"one", b"two"):
                await ws.send_bytes(word)
                assert (await ws.receive(timeout=5)).data == word.upper()  # one message, one datagram
            await ws.close()
    finally:
        transport.close()


async def test_consolelog_tail_and_follow(env: Env) -> None:
    env.log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(100)) + b"partial")
    async with aiohttp.ClientSession(headers=env.headers) as s:
        async with s.get(env.url(f"{BASE}/vm1/consolelog"), params={"tail": "3"}) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert await resp.read() == b"line 98\nline 99\npartial"
        async with s.get(env.url(f"{BASE}/vm1/consolelog"), params={"tail": "0", "follow": "true"}) as resp:
            with env.log.open("ab") as f:
                f.write(b" more\nnew line\n")
            got = b""
            async with asyncio.timeout(5):
                while b"new line\n" not in got:
                    got += await resp.content.readany()
            assert got == b" more\nnew line\n"
        async with s.get(env.url(f"{BASE}/vm1/consolelog"), params={"tail": "-1"}) as resp:
            assert resp.status == 400
