"""KubeVirt's subresources (`subresources.kubevirt.io`), as virt-api serves them.

VM `start`/`stop`/`restart` change desired state only (spec.runStrategy or status.stateChangeRequests);
the VM controller acts on it. VMI actions that need the running QEMU (pause, reset, guest-agent
queries) are proxied to the node agent that runs the VMI, as kube-apiserver proxies exec/logs to a
kubelet: the API server never touches VM state itself.
"""

from __future__ import annotations

import base64
import secrets
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from virtplane.apiserver import errors, handlers, objects

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
PROXY_SECRET = ("kube-system", "virtplane-node-proxy")
AGENT_FINGERPRINT_ANNOTATION = "virtplane.io/agent-cert-sha256"
VMI_PROXIED = {
    "pause": "PUT", "unpause": "PUT", "softreboot": "PUT", "reset": "PUT", "freeze": "PUT", "unfreeze": "PUT",
    "guestosinfo": "GET", "userlist": "GET", "filesystemlist": "GET", "backup": "PUT",
}
FINAL_PHASES = ("Succeeded", "Failed")


def register(server: APIServer) -> None:
    for action in ("start", "stop", "restart"):
        server.register_subresource("kubevirt.io", "virtualmachines", action, _vm_action)
    for action in VMI_PROXIED:
        server.register_subresource("kubevirt.io", "virtualmachineinstances", action, _vmi_proxy)


async def ensure_proxy_secret(server: APIServer) -> None:
    """The token node agents accept from API servers; shared by every API server through the store."""
    res = server.registry.lookup("", "v1", "secrets")
    assert res is not None
    ns, name = PROXY_SECRET
    if await server.objects.try_get(res, ns, name) is not None:
        return
    token = secrets.token_urlsafe(32)
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": ns},
            "data": {"token": base64.b64encode(token.encode()).decode()}}
    try:
        await server.objects.create(res, ns, body, objects.WriteOptions(field_manager="virtplane-apiserver",
                                                                          privileged=True))
    except errors.StatusError as exc:
        if exc.code != 409:  # another API server won the race: its token is the one
            raise


async def read_options(req: handlers.SubresourceRequest) -> JSON:
    if not req.request.can_read_body:
        return {}
    raw = await req.request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.bad_request(f"invalid request body: {exc}") from exc
    if not isinstance(body, dict):
        raise errors.bad_request("the request body must be a JSON object")
    return body


def _conflict(message: str) -> errors.StatusError:
    return errors.StatusError(409, message, reason="Conflict")


def _run_strategy(vm: JSON) -> str:
    spec = vm.get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"


async def _vm_action(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "PUT":
        raise errors.StatusError(405, f"{req.subresource} takes PUT")
    srv, res, ns, name, action = req.server, req.resource, req.namespace, req.name, req.subresource
    options = await read_options(req)
    dry_run = bool(options.get("dryRun")) or "dryRun" in req.request.query
    vm = await srv.objects.get(res, ns, name)
    vmi_res = srv.registry.lookup("kubevirt.io", "v1", "virtualmachineinstances")
    assert vmi_res is not None
    vmi = await srv.objects.try_get(vmi_res, ns, name)
    running = vmi is not None and (vmi.get("status") or {}).get("phase") not in FINAL_PHASES \
        and not vmi["metadata"].get("deletionTimestamp")
    strategy = _run_strategy(vm)
    legacy = "running" in (vm.get("spec") or {}) and not (vm.get("spec") or {}).get("runStrategy")
    spec_patch: JSON | None = None
    requests: list[JSON] = []

    if action == "start":
        if running:
            raise _conflict("VM is already running")
        if strategy == "Halted":
            spec_patch = {"running": True} if legacy else {"runStrategy": "Always"}
        elif strategy in ("Manual", "RerunOnFailure", "Once"):
            req_ = {"action": "Start"}
            if options.get("paused"):
                req_["data"] = {"startPaused": "true"}
            requests.append(req_)
        else:  # Always with no running VMI: the controller is restarting it already
            raise _conflict(f"VM is already running or starting (runStrategy {strategy})")
    elif action == "stop":
        if strategy == "Halted" and not running:
            raise _conflict("VM is not running")
        grace = options.get("gracePeriod")
        if grace is not None and vmi is not None and not dry_run:
            await srv.objects.guaranteed_update(
                vmi_res, ns, name, lambda o: _set_grace(o, int(grace)))
        if strategy in ("Always", "Halted"):
            spec_patch = {"running": False} if legacy else {"runStrategy": "Halted"}
        else:
            if not running:
                raise _conflict("VM is not running")
            requests.append({"action": "Stop", "uid": vmi["metadata"]["uid"]})  # type: ignore[index]
    else:  # restart
        if strategy == "Halted":
            raise _conflict("RunStategy Halted does not support manual restart requests")
        if vmi is None:
            raise _conflict("VM is not running")
        requests.extend([{"action": "Stop", "uid": vmi["metadata"]["uid"]}, {"action": "Start"}])

    if dry_run:
        return web.Response(status=202)
    if spec_patch is not None:
        await srv.objects.guaranteed_update(res, ns, name, lambda o: _patch_spec(o, spec_patch))
    if requests:
        def add_requests(o: JSON) -> JSON:
            status = o.setdefault("status", {})
            pending = status.get("stateChangeRequests") or []
            if pending:
                raise _conflict("unable to complete request: stop/start already underway")
            status["stateChangeRequests"] = requests
            return o

        await srv.objects.guaranteed_update(res, ns, name, add_requests, subresource="status")
    return web.Response(status=202)


def _patch_spec(vm: JSON, patch: JSON) -> JSON:
    spec = vm.setdefault("spec", {})
    spec.update(patch)
    return vm


def _set_grace(vmi: JSON, seconds: int) -> JSON:
    vmi.setdefault("spec", {})["terminationGracePeriodSeconds"] = seconds
    return vmi


async def _vmi_proxy(req: handlers.SubresourceRequest) -> web.StreamResponse:
    action = req.subresource.split("/")[0]
    method = VMI_PROXIED[action]
    if req.request.method != method:
        raise errors.StatusError(405, f"{action} takes {method}")
    srv, ns, name = req.server, req.namespace, req.name
    vmi = await srv.objects.get(req.resource, ns, name)
    status = vmi.get("status") or {}
    if status.get("phase") != "Running":
        raise _conflict(f"VirtualMachineInstance {name} is not running")
    url, fingerprint, token = await node_target(srv, vmi)
    body = await req.request.read() if req.request.can_read_body else b""
    path = f"/v1/namespaces/{ns}/virtualmachineinstances/{name}/{action}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session, session.request(
            method, url + path, data=body or None, ssl=aiohttp.Fingerprint(fingerprint),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as resp:
            payload = await resp.read()
            return web.Response(body=payload, status=resp.status,
                                content_type=resp.content_type or "application/json")
    except (aiohttp.ClientError, OSError) as exc:
        raise errors.StatusError(503, f"cannot reach the node agent on {status.get('nodeName')}: {exc}") from exc


async def node_target(srv: APIServer, vmi: JSON) -> tuple[str, bytes, str]:
    """(agent base URL, pinned certificate fingerprint, proxy token) for the node running `vmi`:
    what every VMI subresource proxied to a node agent needs."""
    node_name = (vmi.get("status") or {}).get("nodeName")
    node_res = srv.registry.lookup("", "v1", "nodes")
    secret_res = srv.registry.lookup("", "v1", "secrets")
    assert node_res is not None and secret_res is not None
    node = await srv.objects.try_get(node_res, None, node_name) if node_name else None
    if node is None:
        raise errors.StatusError(
            503, f"node {node_name!r} of VirtualMachineInstance {vmi['metadata']['name']} is not registered")
    url, fingerprint = _agent_endpoint(node)
    secret = await srv.objects.get(secret_res, *PROXY_SECRET)
    token = base64.b64decode(secret["data"]["token"]).decode()
    return url, fingerprint, token


def _agent_endpoint(node: JSON) -> tuple[str, bytes]:
    status = node.get("status") or {}
    port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
    addresses = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    address = addresses.get("InternalIP") or addresses.get("Hostname")
    fp_hex = (node["metadata"].get("annotations") or {}).get(AGENT_FINGERPRINT_ANNOTATION, "")
    if not port or not address or not fp_hex:
        raise errors.StatusError(503, f"node {node['metadata']['name']} does not publish its agent endpoint yet")
    try:
        fingerprint = bytes.fromhex(fp_hex.replace(":", ""))
    except ValueError as exc:
        raise errors.StatusError(503, f"node {node['metadata']['name']} has an invalid agent fingerprint") from exc
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}", fingerprint
