"""The node-side console endpoints the node agent mounts; the API server proxies KubeVirt's subresources here.

    GET /v1/namespaces/{ns}/virtualmachineinstances/{name}/console           websocket: serial console
    GET .../vnc                                                               websocket: raw RFB
    GET .../vnc/screenshot[?moveCursor=true]                                  image/png
    GET .../portforward/{port}[/{tcp|udp}]                                    websocket: a guest port
    GET .../consolelog[?tail=N][&follow=true]                                 text/plain: console.log

Websockets speak KubeVirt's subprotocol `plain.kubevirt.io` (binary frames of raw bytes both ways); `binary`
is the same thing under noVNC's name, and `base64` (old websockify clients) carries the bytes base64-encoded
in text frames. Every websocket sends pings (`HEARTBEAT` seconds) so idle sessions survive proxies and NAT
and a dead peer is noticed (KubeVirt consoles drop after ~21 s idle, kubevirt#6493).

Failures before the upgrade are answered with a Kubernetes `Status` body and its HTTP code, like the API
server's own errors, so the API server can hand them through unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from . import guestport
from .located import ConsoleError, LocatedVMI
from .monitor import qmp_command
from .rfb import SharedFlagRewriter, ppm_to_png
from .serial import SerialHub

log = logging.getLogger(__name__)

Locate = Callable[[str, str], Awaitable[LocatedVMI | None]]
Authorize = Callable[[web.Request], Awaitable[None]]

PROTOCOLS = ("plain.kubevirt.io", "binary", "base64")
HEARTBEAT = 10.0
MAX_MESSAGE = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
LOG_POLL = 0.25
LOG_RELOCATE_EVERY = 5.0
BASE = "/v1/namespaces/{namespace}/virtualmachineinstances/{name}"


class ConsoleRoutes:
    """State of the mounted routes (per application, no globals): the serial hub and open websockets."""

    def __init__(self, locate: Locate, authorize: Authorize, *, serial_linger: float = 30.0) -> None:
        self.locate = locate
        self.authorize = authorize
        self.serial = SerialHub(linger=serial_linger)
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    async def shutdown(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"node agent shutting down")
        await self.serial.close()

    # -- helpers ---------------------------------------------------------------------------------------
    async def _target(self, request: web.Request) -> LocatedVMI:
        await self.authorize(request)
        ns, name = request.match_info["namespace"], request.match_info["name"]
        vmi = await self.locate(ns, name)
        if vmi is None:
            raise ConsoleError(404, f'virtualmachineinstances.kubevirt.io "{name}" not found')
        return vmi

    def _websocket(self) -> web.WebSocketResponse:
        return web.WebSocketResponse(protocols=PROTOCOLS, heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)

    async def _accept(self, request: web.Request) -> web.WebSocketResponse:
        ws = self._websocket()
        if not ws.can_prepare(request).ok:
            raise ConsoleError(400, "this endpoint needs a websocket connection (Upgrade: websocket)")
        await ws.prepare(request)
        self.sockets.add(ws)
        return ws

    # -- serial console --------------------------------------------------------------------------------
    async def console(self, request: web.Request) -> web.StreamResponse:
        vmi = await self._target(request)
        if vmi.serial_socket is None:
            raise ConsoleError(400, "the VMI has no serial console (autoattachSerialConsole is false)")
        if not self._websocket().can_prepare(request).ok:
            raise ConsoleError(400, "this endpoint needs a websocket connection (Upgrade: websocket)")
        mux = self.serial.mux(vmi.serial_socket, vmi.console_log)
        viewer = await mux.attach()  # before the upgrade: an unreachable socket is a 503, not a closed socket
        try:
            ws = await self._accept(request)
            codec = _Codec(ws.ws_protocol)

            async def output() -> None:
                while (data := await viewer.read()) is not None:
                    await codec.send(ws, data)

            async def input_() -> None:
                async for msg in ws:
                    data = codec.decode(msg)
                    if data:
                        await mux.write(data)

            await _first_done(output(), input_())
            reason = viewer.close_reason if viewer.closed and viewer.close_reason != "detached" else ""
            await ws.close(code=1000, message=reason[:120].encode())
            return ws
        finally:
            mux.detach(viewer)

    # -- VNC ------------------------------------------------------------------------------------------
    async def vnc(self, request: web.Request) -> web.StreamResponse:
        vmi = await self._target(request)
        if vmi.vnc_socket is None:
            raise ConsoleError(400, "the VMI has no VNC display (autoattachGraphicsDevice is false)")
        if not self._websocket().can_prepare(request).ok:
            raise ConsoleError(400, "this endpoint needs a websocket connection (Upgrade: websocket)")
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_unix_connection(str(vmi.vnc_socket))
        except (OSError, TimeoutError) as exc:
            raise ConsoleError(503, f"VNC socket {vmi.vnc_socket} is not reachable: {exc}") from exc
        # Each viewer gets its own connection to QEMU; share=allow-exclusive lets them coexist and the
        # rewriter makes sure no viewer asks QEMU to disconnect the others.
        rewriter = SharedFlagRewriter()
        try:
            ws = await self._accept(request)
            codec = _Codec(ws.ws_protocol)

            async def to_client() -> None:
                while data := await reader.read(READ_CHUNK):
                    await codec.send(ws, data)

            async def to_qemu() -> None:
                async for msg in ws:
                    data = codec.decode(msg)
                    if data:
                        writer.write(rewriter.feed(data))
                        await writer.drain()

            await _first_done(to_client(), to_qemu())
            await ws.close()
            return ws
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def screenshot(self, request: web.Request) -> web.StreamResponse:
        vmi = await self._target(request)
        if vmi.vnc_socket is None:
            raise ConsoleError(400, "the VMI has no display (autoattachGraphicsDevice is false)")
        if vmi.screenshot_dir is None:
            raise ConsoleError(503, "no directory to take a screenshot in")
        if _truthy(request.query.get("moveCursor")):
            # Wake a blanked screen (screensaver, DPMS) the way a user would: nudge the mouse.
            for value in (10, -10):
                await qmp_command(vmi, "input-send-event", {"events": [
                    {"type": "rel", "data": {"axis": "x", "value": value}}]})
            await asyncio.sleep(0.2)
        path = vmi.screenshot_dir / f".screendump-{secrets.token_hex(6)}"
        try:
            try:
                await qmp_command(vmi, "screendump", {"filename": f"{path}.png", "format": "png"})
                data = await asyncio.to_thread(Path(f"{path}.png").read_bytes)
            except (ConsoleError, OSError) as png_err:
                # QEMU built without libpng: its default PPM, converted here.
                try:
                    await qmp_command(vmi, "screendump", {"filename": f"{path}.ppm"})
                    data = ppm_to_png(await asyncio.to_thread(Path(f"{path}.ppm").read_bytes))
                except (ConsoleError, OSError, ValueError) as exc:
                    raise ConsoleError(500, f"screenshot failed: {png_err}; PPM fallback: {exc}") from exc
        finally:
            for suffix in (".png", ".ppm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}{suffix}")
        return web.Response(body=data, content_type="image/png")

    # -- port forwarding -------------------------------------------------------------------------------
    async def portforward(self, request: web.Request) -> web.StreamResponse:
        try:
            port = int(request.match_info["port"])
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise ConsoleError(400, f"invalid port {request.match_info['port']!r}: must be 1-65535")
        protocol = request.match_info.get("protocol", "tcp").lower()
        if protocol not in ("tcp", "udp"):
            raise ConsoleError(400, f"unsupported protocol {protocol!r}: must be tcp or udp")
        vmi = await self._target(request)
        if not self._websocket().can_prepare(request).ok:
            raise ConsoleError(400, "this endpoint needs a websocket connection (Upgrade: websocket)")
        if protocol == "udp":
            return await self._forward_udp(request, vmi, port)
        reader, writer = await guestport.open_tcp(vmi, port)
        try:
            ws = await self._accept(request)
            codec = _Codec(ws.ws_protocol)

            async def to_client() -> None:
                while data := await reader.read(READ_CHUNK):
                    await codec.send(ws, data)

            async def to_guest() -> None:
                async for msg in ws:
                    data = codec.decode(msg)
                    if data:
                        writer.write(data)
                        await writer.drain()

            await _first_done(to_client(), to_guest())
            await ws.close()
            return ws
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _forward_udp(self, request: web.Request, vmi: LocatedVMI, port: int) -> web.StreamResponse:
        async with guestport.udp_flow(vmi, port) as flow:
            ws = await self._accept(request)
            codec = _Codec(ws.ws_protocol)

            async def to_client() -> None:
                while (data := await flow.receive()) is not None:
                    await codec.send(ws, data)

            async def to_guest() -> None:
                async for msg in ws:  # one websocket message is one datagram
                    data = codec.decode(msg)
                    if data:
                        flow.send(data)

            await _first_done(to_client(), to_guest())
            await ws.close()
            return ws

    # -- console.log ----------------------------------------------------------------------------------
    async def consolelog(self, request: web.Request) -> web.StreamResponse:
        vmi = await self._target(request)
        if vmi.console_log is None:
            raise ConsoleError(400, "the VMI keeps no console log (logSerialConsole is false)")
        tail_arg = request.query.get("tail")
        try:
            tail = int(tail_arg) if tail_arg not in (None, "") else None
        except ValueError:
            tail = -1
        if tail is not None and tail < 0:
            raise ConsoleError(400, f"invalid tail {tail_arg!r}: must be a non-negative number of lines")
        follow = _truthy(request.query.get("follow"))
        path = vmi.console_log
        try:
            offset, head = await asyncio.to_thread(_read_tail, path, tail)
        except FileNotFoundError:
            offset, head = 0, b""
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(head)
        if not follow:
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        relocate_at = loop.time() + LOG_RELOCATE_EVERY
        identity = _file_identity(path)
        while True:
            await asyncio.sleep(LOG_POLL)  # no inotify in the stdlib; a 4 Hz stat of a local file is cheap
            now_identity = _file_identity(path)
            if now_identity != identity:  # a new QEMU (logappend=on keeps the file; a new VMI does not)
                identity, offset = now_identity, 0
            chunk = await asyncio.to_thread(_read_from, path, offset)
            if chunk:
                offset += len(chunk)
                await resp.write(chunk)
            if loop.time() >= relocate_at:
                relocate_at = loop.time() + LOG_RELOCATE_EVERY
                try:
                    still_here = await self.locate(vmi.namespace, vmi.name) is not None
                except web.HTTPException:  # e.g. 409: it stopped running
                    still_here = False
                if not still_here:
                    break  # the VMI is gone from this node: end the stream
        await resp.write_eof()
        return resp


class _Codec:
    """Frames for the negotiated subprotocol: raw binary frames, or base64 in text frames."""

    def __init__(self, protocol: str | None) -> None:
        self.base64 = protocol == "base64"

    async def send(self, ws: web.WebSocketResponse, data: bytes) -> None:
        if self.base64:
            await ws.send_str(base64.b64encode(data).decode())
        else:
            await ws.send_bytes(data)

    def decode(self, msg: Any) -> bytes:
        if msg.type == WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == WSMsgType.TEXT:
            if self.base64:
                try:
                    return base64.b64decode(msg.data)
                except (binascii.Error, ValueError):
                    return b""
            return str(msg.data).encode()
        return b""


async def _first_done(*coros: Awaitable[None]) -> None:
    """Run the pumps of one session until any of them ends, then stop the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, (ConnectionError, ConsoleError, OSError)):
                log.warning("console session pump failed: %r", exc)
            elif isinstance(exc, ConsoleError):
                log.info("console session ended: %s", exc.message)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20)
    except FileNotFoundError:
        return b""


def _read_tail(path: Path, lines: int | None) -> tuple[int, bytes]:
    """(end offset, the last `lines` lines — all of the file when None)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if lines is None:
            f.seek(0)
            return size, f.read(size)
        if lines == 0:
            return size, b""
        block, data, pos = 64 * 1024, b"", size
        # A trailing partial line counts as a line; look for one newline more than asked for.
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
        cut = data.splitlines(keepends=True)[-lines:]
        return size, b"".join(cut)


def _status(code: int, message: str, reason: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.Response(status=code, body=json.dumps(body).encode(), content_type="application/json")


def _wrap(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
          ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConsoleError as exc:
            return _status(exc.code, exc.message, exc.reason)
        except web.HTTPException as exc:  # from authorize/locate: keep the code, give a Status body
            if exc.status < 400:
                raise
            return _status(exc.status, exc.text or exc.reason, exc.reason.replace(" ", ""))

    return wrapped


CONSOLE_ROUTES = web.AppKey("virtplane_console_routes", ConsoleRoutes)


def add_console_routes(app: web.Application, locate: Locate, authorize: Authorize, *,
                       serial_linger: float = 30.0) -> ConsoleRoutes:
    """Mount the console endpoints on the node agent's application.

    `authorize(request)` runs first on every request and raises an `aiohttp.web.HTTPException` (401/403) to
    refuse it. `locate(namespace, name)` returns the VMI's `LocatedVMI`, None when it does not run here (404),
    or raises an HTTPException (e.g. 409 "VMI is not running"). Open websockets are closed and the serial
    connections dropped on application shutdown.
    """
    routes = ConsoleRoutes(locate, authorize, serial_linger=serial_linger)
    app[CONSOLE_ROUTES] = routes
    r = app.router
    r.add_get(BASE + "/console", _wrap(routes.console))
    r.add_get(BASE + "/vnc", _wrap(routes.vnc))
    r.add_get(BASE + "/vnc/screenshot", _wrap(routes.screenshot))
    r.add_get(BASE + "/portforward/{port}", _wrap(routes.portforward))
    r.add_get(BASE + "/portforward/{port}/{protocol}", _wrap(routes.portforward))
    r.add_get(BASE + "/consolelog", _wrap(routes.consolelog))
    app.on_shutdown.append(routes.shutdown)
    return routes
