"""`pods/log`, `pods/exec` and `pods/portforward`: proxied to the node agent running the pod, as kube-apiserver
proxies them to the kubelet. Same endpoint discovery, certificate pinning and proxy token as the VMI
subresources (kubevirt.node_target); exec (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and port-forward (SPDY/3.1
tunnelled in a websocket, `SPDY/3.1+portforward.k8s.io`) are websockets whose frames are copied both ways
unchanged (consoles._splice). Errors (no such pod, not scheduled, the node's refusal) come back as a Status
before any upgrade, so kubectl prints them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from virtplane.apiserver import consoles, errors, handlers, kubevirt

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOLS = ("SPDY/3.1+portforward.k8s.io",)  # kubectl >= 1.31 tunnels SPDY through a websocket


def register(server: APIServer) -> None:
    server.register_subresource("", "pods", "log", _log)
    server.register_subresource("", "pods", "exec", _exec)
    server.register_subresource("", "pods", "portforward", _portforward)


def _authorize(req: handlers.SubresourceRequest, verb: str, sub: str) -> None:
    user = req.request.get("vp_user")
    # kube-apiserver >= 1.31: a websocket exec/portforward (a GET, authorized as `get`) also needs `create`
    if user is None or not req.server.authorizer.allowed(user, verb, "", f"pods/{sub}", req.namespace):
        name = getattr(user, "name", "system:anonymous")
        raise errors.forbidden(f'pods "{req.name}" is forbidden: User "{name}" cannot {verb} resource "pods/{sub}" '
                               f'in API group "" in the namespace "{req.namespace}"')


async def _target(req: handlers.SubresourceRequest) -> tuple[JSON, str, bytes, str]:
    pod = await req.server.objects.get(req.resource, req.namespace, req.name)
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        raise errors.bad_request(f"pod {req.name} does not have a host assigned")
    # node_target reads status.nodeName of the object it is given: a pod's node is in its spec.
    url, fingerprint, token = await kubevirt.node_target(req.server, {"metadata": pod["metadata"],
                                                                      "status": {"nodeName": node}})
    return pod, f"{url}/v1/namespaces/{req.namespace}/pods/{req.name}", fingerprint, token


async def _log(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "GET":
        raise errors.StatusError(405, "log takes GET")
    _authorize(req, "get", "log")
    pod, base, fingerprint, token = await _target(req)
    url = f"{base}/log" + (f"?{req.request.query_string}" if req.request.query_string else "")
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=consoles.CONNECT_TIMEOUT))
    try:
        return await consoles._proxy_get(req, session, url, fingerprint, token, pod["spec"].get("nodeName"))
    finally:
        await session.close()


async def _exec(req: handlers.SubresourceRequest) -> web.StreamResponse:
    _authorize(req, "create", "exec")
    if not web.WebSocketResponse(protocols=EXEC_PROTOCOLS).can_prepare(req.request).ok:
        # kubectl falls back to SPDY on this answer; SPDY is not served here
        raise errors.bad_request("exec needs a websocket connection (v5.channel.k8s.io); SPDY is not supported")
    return await _websocket(req, "exec", EXEC_PROTOCOLS)


async def _portforward(req: handlers.SubresourceRequest) -> web.StreamResponse:
    _authorize(req, "create", "portforward")
    if not web.WebSocketResponse(protocols=PORTFORWARD_PROTOCOLS).can_prepare(req.request).ok:
        raise errors.bad_request(f"port-forward needs a websocket connection ({PORTFORWARD_PROTOCOLS[0]}); "
                                 "a plain SPDY upgrade is not supported")  # fmt: skip
    return await _websocket(req, "portforward", PORTFORWARD_PROTOCOLS)


async def _websocket(req: handlers.SubresourceRequest, sub: str, known: tuple[str, ...]) -> web.StreamResponse:
    """The node agent's websocket for this pod's `sub`, spliced frame by frame to the client's."""
    request = req.request
    pod, base, fingerprint, token = await _target(req)
    url = f"{base}/{sub}" + (f"?{request.query_string}" if request.query_string else "")
    node = pod["spec"].get("nodeName")
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    protocols = [p for p in offered if p in known] or list(known)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=consoles.CONNECT_TIMEOUT))
    try:
        try:
            upstream = await session.ws_connect(
                url, protocols=protocols, ssl=aiohttp.Fingerprint(fingerprint),
                headers={"Authorization": f"Bearer {token}"}, heartbeat=consoles.HEARTBEAT,
                max_msg_size=consoles.MAX_MESSAGE)  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            code = exc.status if exc.status in (400, 403, 404, 409) else 502
            raise errors.StatusError(code, f"the node agent on {node} refused {sub}: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.StatusError(503, f"cannot reach the node agent on {node}: {exc}") from exc
        try:
            ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else [],
                                       heartbeat=consoles.HEARTBEAT, max_msg_size=consoles.MAX_MESSAGE)  # fmt: skip
            await ws.prepare(request)
            track = consoles._track(req)
            try:
                await consoles._splice(ws, upstream)
            finally:
                track()
            return ws
        finally:
            await upstream.close()
    finally:
        await session.close()
