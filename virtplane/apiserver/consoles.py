"""KubeVirt's console subresources (`subresources.kubevirt.io`), proxied to the node agent running the VMI.

    virtualmachineinstances/{name}/console                   websocket (plain.kubevirt.io)
    virtualmachineinstances/{name}/vnc                       websocket (plain.kubevirt.io, binary, base64)
    virtualmachineinstances/{name}/vnc/screenshot            GET image/png
    virtualmachineinstances/{name}/portforward/{port}[/{p}]  websocket
    virtualmachineinstances/{name}/consolelog                GET text/plain (virtplane extension: ?tail=N&follow=1)
    virtualmachines/{name}/portforward/{port}[/{p}]          websocket, to the VM's VMI

The API server terminates the client's websocket and opens its own to the node agent (same endpoint
discovery, certificate pinning and proxy token as the other VMI actions in kubevirt.py), then copies frames
both ways; both legs send pings so an idle console is kept alive and a dead peer noticed. Everything that
can fail (authorization, VMI lookup, not running, node unreachable, the node's own refusal) fails before
the client's upgrade is accepted, so the client gets an HTTP status and a Status body, not a closed socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from virtplane.apiserver import errors, handlers, kubevirt

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
PROTOCOLS = ("plain.kubevirt.io", "binary", "base64")
HEARTBEAT = 10.0
MAX_MESSAGE = 16 * 1024 * 1024
CONNECT_TIMEOUT = 15.0
NOT_RUNNING = "VMI is not running"


def register(server: APIServer) -> None:
    for sub in ("console", "vnc", "portforward", "consolelog"):
        server.register_subresource("kubevirt.io", "virtualmachineinstances", sub, _vmi_subresource)
    server.register_subresource("kubevirt.io", "virtualmachines", "portforward", _vm_portforward)


def _node_path(sub: str) -> tuple[str, bool]:
    """The node agent's path suffix for a subresource path, and whether it is a websocket."""
    parts = sub.split("/")
    head = parts[0]
    if head == "console" and len(parts) == 1:
        return "console", True
    if head == "vnc" and len(parts) == 1:
        return "vnc", True
    if head == "vnc" and parts[1:] == ["screenshot"]:
        return "vnc/screenshot", False
    if head == "consolelog" and len(parts) == 1:
        return "consolelog", False
    if head == "portforward" and len(parts) in (2, 3):
        port, proto = parts[1], (parts[2] if len(parts) == 3 else "tcp").lower()
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise errors.bad_request(f"invalid port {port!r}: must be 1-65535")
        if proto not in ("tcp", "udp"):
            raise errors.bad_request(f"unsupported protocol {proto!r}: must be tcp or udp")
        return f"portforward/{int(port)}/{proto}", True
    raise errors.StatusError(404, f"the server could not find the requested resource ({sub})")


def _authorize(req: handlers.SubresourceRequest) -> None:
    """The same check as a `get` of the VMI (the middleware authenticated the request already)."""
    user = req.request.get("vp_user")
    if user is None or not req.server.authorizer.allowed(user, "get", "kubevirt.io", "virtualmachineinstances",
                                                         req.namespace):
        name = getattr(user, "name", "system:anonymous")
        raise errors.forbidden(f'virtualmachineinstances.kubevirt.io "{req.name}" is forbidden: User "{name}" '
                               f'cannot get resource "virtualmachineinstances" in API group "kubevirt.io" '
                               f'in the namespace "{req.namespace}"')


async def _vmi_subresource(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "GET":
        raise errors.StatusError(405, f"{req.subresource.split('/')[0]} takes GET")
    suffix, websocket = _node_path(req.subresource)
    _authorize(req)
    vmi = await req.server.objects.get(req.resource, req.namespace, req.name)
    return await _proxy(req, vmi, suffix, websocket)


async def _vm_portforward(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "GET":
        raise errors.StatusError(405, "portforward takes GET")
    suffix, websocket = _node_path(req.subresource)
    _authorize(req)
    await req.server.objects.get(req.resource, req.namespace, req.name)  # 404 names the VM
    vmi_res = req.server.registry.lookup("kubevirt.io", "v1", "virtualmachineinstances")
    assert vmi_res is not None
    vmi = await req.server.objects.try_get(vmi_res, req.namespace, req.name)
    if vmi is None:
        raise errors.StatusError(409, NOT_RUNNING, reason="Conflict")
    return await _proxy(req, vmi, suffix, websocket)


async def _proxy(req: handlers.SubresourceRequest, vmi: JSON, suffix: str, websocket: bool) -> web.StreamResponse:
    status = vmi.get("status") or {}
    if status.get("phase") != "Running" or vmi["metadata"].get("deletionTimestamp"):
        raise errors.StatusError(409, NOT_RUNNING, reason="Conflict")
    request = req.request
    if websocket and not web.WebSocketResponse(protocols=PROTOCOLS).can_prepare(request).ok:
        raise errors.bad_request(f"{req.subresource.split('/')[0]} needs a websocket connection (Upgrade: websocket)")
    base, fingerprint, token = await kubevirt.node_target(req.server, vmi)
    url = f"{base}/v1/namespaces/{req.namespace}/virtualmachineinstances/{vmi['metadata']['name']}/{suffix}"
    if request.query_string:
        url += f"?{request.query_string}"
    node = status.get("nodeName")
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT))
    try:
        if websocket:
            return await _proxy_websocket(req, session, url, fingerprint, token, node)
        return await _proxy_get(req, session, url, fingerprint, token, node)
    finally:
        await session.close()


async def _proxy_get(req: handlers.SubresourceRequest, session: aiohttp.ClientSession, url: str,
                     fingerprint: bytes, token: str, node: str | None) -> web.StreamResponse:
    """Plain GETs (screenshot, console log): the node's answer streamed through, status and all."""
    try:
        async with session.get(url, ssl=aiohttp.Fingerprint(fingerprint),
                               headers={"Authorization": f"Bearer {token}"}) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            resp.content_type = upstream.content_type or "application/octet-stream"
            if upstream.charset:
                resp.charset = upstream.charset
            await resp.prepare(req.request)
            track = _track(req)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            finally:
                track()
            await resp.write_eof()
            return resp
    except (aiohttp.ClientError, OSError) as exc:
        raise errors.StatusError(503, f"cannot reach the node agent on {node}: {exc}") from exc


async def _proxy_websocket(req: handlers.SubresourceRequest, session: aiohttp.ClientSession, url: str,
                           fingerprint: bytes, token: str, node: str | None) -> web.StreamResponse:
    request = req.request
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    protocols = [p for p in offered if p in PROTOCOLS]
    try:
        upstream = await session.ws_connect(
            url, protocols=protocols or ("plain.kubevirt.io",), ssl=aiohttp.Fingerprint(fingerprint),
            headers={"Authorization": f"Bearer {token}"}, heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)
    except aiohttp.WSServerHandshakeError as exc:
        # The node refused (the VMI left it, no serial console, guest port unreachable ...); its status.
        code = exc.status if exc.status in (400, 403, 404, 409, 503) else 502
        raise errors.StatusError(code, f"the node agent on {node} refused the connection: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise errors.StatusError(503, f"cannot reach the node agent on {node}: {exc}") from exc
    try:
        chosen = [upstream.protocol] if upstream.protocol and upstream.protocol in offered else []
        ws = web.WebSocketResponse(protocols=chosen, heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        track = _track(req)
        try:
            await _splice(ws, upstream)
        finally:
            track()
        return ws
    finally:
        await upstream.close()


async def _splice(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Copy frames both ways until one side closes; the other side then gets the same close code."""

    async def forward(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        code = src.close_code if src.close_code and src.close_code not in (1005, 1006, 1015) else 1000
        await dst.close(code=code)

    tasks = [asyncio.ensure_future(forward(client, upstream)), asyncio.ensure_future(forward(upstream, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task
        await client.close()


def _track(req: handlers.SubresourceRequest) -> Any:
    """Register the running stream so server shutdown ends it (like open watches); returns the undo."""
    task = asyncio.current_task()
    if task is None:
        return lambda: None
    req.server.watch_tasks.add(task)
    return lambda: req.server.watch_tasks.discard(task)
