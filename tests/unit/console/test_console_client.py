"""virtctl's client halves: the terminal bridge (escape key), stdio tunnels and the UDP port-forward, against
an in-process websocket server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from virtplane.cli import virtctl
from virtplane.console import client as cclient


async def _upper_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("plain.kubevirt.io",))
    await ws.prepare(request)
    request.app[RECEIVED].append(b"")
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            request.app[RECEIVED][-1] += msg.data
            await ws.send_bytes(msg.data.upper())
    return ws


async def _answer_once(request: web.Request) -> web.WebSocketResponse:
    """Like a guest service that answers one request and hangs up."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    msg = await ws.receive()
    await asyncio.sleep(0.3)  # the client's input has ended by now: it must still get the answer
    await ws.send_bytes(msg.data.upper())
    await ws.close()
    return ws


RECEIVED = web.AppKey("received", list)


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_get("/ws", _upper_echo)
    app.router.add_get("/once", _answer_once)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


async def test_terminal_session_stops_at_ctrl_bracket(echo: TestServer) -> None:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(echo.make_url("/ws"), protocols=("plain.kubevirt.io",))
        session = asyncio.ensure_future(cclient.terminal_session(ws, stdin_fd=stdin_r, stdout_fd=stdout_w))
        os.write(stdin_w, b"ls\r")
        await asyncio.sleep(0.2)
        os.write(stdin_w, b"pwd\x1dnever sent")
        end = await asyncio.wait_for(session, 5)
    assert end == cclient.End.ESCAPE
    assert echo.app[RECEIVED] == [b"ls\rpwd"]  # bytes before the escape go out, nothing after
    os.close(stdout_w)
    with os.fdopen(stdout_r, "rb") as out:
        assert out.read().startswith(b"LS\r")  # what arrived before the escape was written out
    for fd in (stdin_r, stdin_w):
        os.close(fd)


async def test_stdio_session_ends_when_server_closes(echo: TestServer) -> None:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(echo.make_url("/once"))
        session = asyncio.ensure_future(cclient.stdio_session(ws, stdin_fd=stdin_r, stdout_fd=stdout_w))
        os.write(stdin_w, b"ssh-2.0 hello")
        os.close(stdin_w)  # input ends; the session waits for the server's answer and close
        assert await asyncio.wait_for(session, 5) == cclient.End.REMOTE
    os.close(stdout_w)
    with os.fdopen(stdout_r, "rb") as out:
        assert out.read() == b"SSH-2.0 HELLO"
    os.close(stdin_r)


async def test_udp_port_forward_one_websocket_per_peer(echo: TestServer) -> None:
    async with aiohttp.ClientSession() as s:
        transport, port = await virtctl._serve_udp("127.0.0.1", 0, lambda: s.ws_connect(echo.make_url("/ws")))
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        class Peer(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                replies.put_nowait(data)

        peers = [await loop.create_datagram_endpoint(Peer, remote_addr=("127.0.0.1", port)) for _ in range(2)]
        for i, (peer, _) in enumerate(peers):
            peer.sendto(f"dns query {i}".encode())
        got = {await asyncio.wait_for(replies.get(), 5) for _ in peers}
        assert got == {b"DNS QUERY 0", b"DNS QUERY 1"}
        assert len(echo.app[RECEIVED]) == 2  # one tunnel per local peer
        for peer, _ in peers:
            peer.close()
        transport.close()
