"""The node agent's HTTPS API (docs/vm-runtime.md): VMI actions the API server proxies here, and /metrics.

    PUT /v1/namespaces/{ns}/virtualmachineinstances/{name}/{pause|unpause|softreboot|reset|freeze|unfreeze|backup}
    GET /v1/namespaces/{ns}/virtualmachineinstances/{name}/{guestosinfo|userlist|filesystemlist}
    GET /metrics, GET /healthz

Callers authenticate with `Authorization: Bearer <token>`, where the token is the one the API servers share
through the Secret `kube-system/virtplane-node-proxy` (key `token`). The certificate is self-signed; the API
server pins its SHA-256 from the Node annotation `virtplane.io/agent-cert-sha256`. Errors are Kubernetes
`Status` objects; a VMI that does not run here is 404, one that is not in a state for the action is 409.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from virtplane.client import rest
from virtplane.console import LocatedVMI, add_console_routes
from virtplane.hypervisor.devices import netdev_id
from virtplane.hypervisor.errors import GuestAgentError, HypervisorError, InvalidStateError
from virtplane.hypervisor.machine import RunState
from virtplane.storage import provisioner

from . import metrics, network
from . import status as st
from .controller import VMIController
from .vmiruntime import VMIRuntime

log = logging.getLogger(__name__)

JSON = dict[str, Any]
SECRETS = rest.GVR("", "v1", "secrets")
PROXY_SECRET = ("kube-system", "virtplane-node-proxy")
PUT_ACTIONS = ("pause", "unpause", "softreboot", "reset", "freeze", "unfreeze", "backup")
GET_ACTIONS = ("guestosinfo", "userlist", "filesystemlist")
DEFAULT_UNFREEZE_SECONDS = 300.0  # KubeVirt thaws a frozen guest after 5 minutes unless told otherwise


class StatusError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def status_body(code: int, reason: str, message: str, name: str = "") -> JSON:
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "code": code}  # fmt: skip
    if name:
        body["details"] = {"name": name, "group": "kubevirt.io", "kind": "virtualmachineinstances"}
    return body


class ProxyToken:
    """The bearer token API servers present, read from the Secret; re-read (rate limited) on a mismatch so a
    rotated token is picked up without a restart."""

    REFRESH_INTERVAL = 5.0

    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self._token: str | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched < self.REFRESH_INTERVAL and self._token is not None:
                return
            self._fetched = time.monotonic()
            try:
                secret = await self.client.get(SECRETS, PROXY_SECRET[1], PROXY_SECRET[0])
            except rest.APIError as err:
                log.warning("cannot read the proxy token secret %s/%s: %s", *PROXY_SECRET, err)
                return
            raw = (secret.get("data") or {}).get("token")
            if raw:
                self._token = base64.b64decode(raw).decode()

    async def check(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        presented = authorization[len("Bearer "):].strip()
        if self._token is None or not hmac.compare_digest(self._token, presented):
            await self._refresh()
        return self._token is not None and hmac.compare_digest(self._token, presented)


# Adds routes to the agent's app; gets the agent's bearer-token check to call first in each handler.
RouteHook = Callable[[web.Application, Callable[[web.Request], Awaitable[None]]], None]


class AgentServer:
    def __init__(self, controller: VMIController, token: ProxyToken, node_name: str,
                 route_hooks: Sequence[RouteHook] = ()) -> None:  # fmt: skip
        self.route_hooks = tuple(route_hooks)  # more endpoints (pods/log, pods/exec), same token check
        self.controller = controller
        self.token = token
        self.node_name = node_name
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._unfreeze_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._backups: dict[tuple[str, str], asyncio.Task[None]] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        # Console, VNC, port-forward and console-log websockets (virtplane.console) first: their paths would
        # otherwise match the one-segment {action} routes below.
        add_console_routes(app, self._locate, self._authorize_console)
        base = "/v1/namespaces/{namespace}/virtualmachineinstances/{name}/{action}"
        app.router.add_route("PUT", base, self._put)
        app.router.add_route("GET", base, self._get)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        for hook in self.route_hooks:
            hook(app, self._authorize)
        return app

    async def start(self, host: str, port: int, ssl_context: Any) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        for timer in self._unfreeze_timers.values():
            timer.cancel()
        for task in self._backups.values():
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing -----------------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:  # fmt: skip
        name = request.match_info.get("name", "")
        try:
            return await handler(request)
        except StatusError as err:
            return web.json_response(status_body(err.code, err.reason, err.message, name), status=err.code,
                                     dumps=lambda o: orjson.dumps(o).decode())  # fmt: skip
        except web.HTTPException:
            raise
        except Exception as err:
            log.exception("agent API %s %s failed", request.method, request.path)
            return web.json_response(status_body(500, "InternalError", f"{type(err).__name__}: {err}", name),
                                     status=500)  # fmt: skip

    async def _authorize(self, request: web.Request) -> None:
        if not await self.token.check(request.headers.get("Authorization")):
            raise StatusError(401, "Unauthorized", "Unauthorized")

    def _runtime(self, request: web.Request) -> tuple[JSON, VMIRuntime]:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        vmi = self.controller.vmis.get(ns, name)
        if vmi is None or (vmi.get("status") or {}).get("nodeName") != self.node_name:
            raise StatusError(404, "NotFound", f'virtualmachineinstances.kubevirt.io "{name}" not found on node '
                                               f"{self.node_name}")  # fmt: skip
        rt = self.controller.runtimes.get((ns, name))
        if rt is None or rt.machine is None or not rt.machine.state.alive or \
                rt.meta.uid != vmi["metadata"].get("uid"):  # fmt: skip
            raise StatusError(409, "Conflict", f"VMI {name} is not running")
        return vmi, rt

    async def _authorize_console(self, request: web.Request) -> None:
        if not await self.token.check(request.headers.get("Authorization")):
            raise web.HTTPUnauthorized(text="Unauthorized")

    async def _locate(self, namespace: str, name: str) -> LocatedVMI | None:
        """The console routes' view of a VMI running here (None: not on this node → 404)."""
        vmi = self.controller.vmis.get(namespace, name)
        if vmi is None or (vmi.get("status") or {}).get("nodeName") != self.node_name:
            return None
        rt = self.controller.runtimes.get((namespace, name))
        if rt is None or rt.machine is None or not rt.machine.state.alive:
            raise web.HTTPConflict(text=f"VMI {name} is not running")
        machine = rt.machine

        async def qmp(command: str, args: Any) -> Any:
            return await machine.monitor_command(command, args)

        devices = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
        # The interim pod network is QEMU's user-mode network: port-forward adds hostfwd rules on its netdev.
        nets = network.attachments(vmi)
        user_netdev = next((netdev_id(n) for n, a in nets.items() if a.kind == "user"), None)
        return LocatedVMI.from_runtime_dir(
            namespace, name, rt.path, uid=rt.meta.uid, qmp=qmp,
            serial=devices.get("autoattachSerialConsole") is not False,
            vnc=devices.get("autoattachGraphicsDevice") is not False, user_netdev=user_netdev,
        )  # fmt: skip

    @staticmethod
    def _no_agent(name: str) -> StatusError:
        return StatusError(409, "Conflict", f"VMI {name} does not have guest agent connected")

    # -- handlers -----------------------------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await metrics.collect(list(self.controller.runtimes.values()), self.node_name,
                                     {k: v for k, v in self.controller.vmis.cache.items()})  # fmt: skip
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def _put(self, request: web.Request) -> web.Response:
        await self._authorize(request)
        action = request.match_info["action"]
        if action not in PUT_ACTIONS:
            raise StatusError(404 if action not in GET_ACTIONS else 405, "NotFound" if action not in GET_ACTIONS
                              else "MethodNotAllowed", f"unknown action {action!r} for PUT")  # fmt: skip
        _, rt = self._runtime(request)
        machine = rt.machine
        assert machine is not None
        name = rt.meta.name
        try:
            if action == "pause":
                if machine.state == RunState.PAUSED:
                    raise StatusError(409, "Conflict", "VMI is already paused")
                await machine.pause()
                rt.meta.paused_by_user = True
                rt.save()
            elif action == "unpause":
                if machine.state != RunState.PAUSED:
                    raise StatusError(409, "Conflict", "VMI is not paused")
                await machine.resume()
                rt.meta.paused_by_user = False
                rt.save()
            elif action == "softreboot":
                if machine.state == RunState.PAUSED:
                    raise StatusError(409, "Conflict", "VMI is paused")
                await machine.reboot()
            elif action == "reset":
                await machine.reset()
            elif action == "freeze":
                await self._freeze(request, rt)
            elif action == "unfreeze":
                await self._thaw(rt)
            elif action == "backup":
                await self._backup(request, rt)
        except InvalidStateError as err:
            raise StatusError(409, "Conflict", f"VMI {name}: {err}") from err
        except GuestAgentError as err:
            raise self._no_agent(name) if not rt.agent.connected else \
                StatusError(500, "InternalError", f"guest agent: {err}") from err  # fmt: skip
        except HypervisorError as err:
            raise StatusError(500, "InternalError", f"VMI {name}: {err}") from err
        self.controller.enqueue(rt.key)
        return web.Response(status=200)

    async def _freeze(self, request: web.Request, rt: VMIRuntime) -> None:
        machine = rt.machine
        assert machine is not None
        timeout = DEFAULT_UNFREEZE_SECONDS
        raw = await request.read() if request.can_read_body else b""
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                raise StatusError(400, "BadRequest", f"invalid body: {err}") from err
            value = (body or {}).get("unfreezeTimeout")
            if value:
                timeout = _duration(str(value))
        if not rt.agent.connected:
            raise self._no_agent(rt.meta.name)
        await machine.guest_command("guest-fsfreeze-freeze", timeout=60.0)
        rt.meta.frozen = True
        rt.save()
        old = self._unfreeze_timers.pop(rt.key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._unfreeze_timers[rt.key] = loop.call_later(
            timeout, lambda: loop.create_task(self._auto_thaw(rt)))

    async def _auto_thaw(self, rt: VMIRuntime) -> None:
        try:
            await self._thaw(rt)
            log.info("thawed %s/%s after the unfreeze timeout", *rt.key)
        except HypervisorError as err:
            log.warning("automatic thaw of %s/%s failed: %s", *rt.key, err)
        self.controller.enqueue(rt.key)

    async def _thaw(self, rt: VMIRuntime) -> None:
        machine = rt.machine
        assert machine is not None
        timer = self._unfreeze_timers.pop(rt.key, None)
        if timer is not None:
            timer.cancel()
        if not rt.agent.connected:
            raise self._no_agent(rt.meta.name)
        await machine.guest_command("guest-fsfreeze-thaw", timeout=60.0)
        rt.meta.frozen = False
        rt.save()

    async def _backup(self, request: web.Request, rt: VMIRuntime) -> None:
        """KubeVirt's `backup` (BackupOptions; push mode, full): a point-in-time copy of every PVC/DataVolume
        disk, written beside the volume as `backup-<backupName>.img` (storage.provisioner.backup_path; no
        targetPath), the guest's file systems frozen while the copy jobs start when its agent is connected.
        Answers once the jobs run; status.changedBlockTracking.backupStatus says when it completed or failed."""
        body = await _json_body(request)
        name = str(body.get("backupName") or "")
        if not provisioner.BACKUP_NAME_RE.fullmatch(name):
            raise StatusError(400, "BadRequest", f"backupName {name!r} must be a DNS label")
        if (body.get("cmd") or "Start") != "Start" or (body.get("mode") or "Push") != "Push":
            raise StatusError(400, "BadRequest", "only cmd Start in mode Push (a full backup) is supported")
        if body.get("targetPath") or body.get("incremental"):
            raise StatusError(400, "BadRequest", "targetPath and incremental are not supported: each volume's "
                              "full backup is written beside it")
        current = rt.meta.backup
        if current.get("backupName") == name:
            return  # started already: the status tells how it goes
        if current and not (current.get("completed") or current.get("failed")):
            raise StatusError(409, "Conflict", f"backup {current.get('backupName')} is in progress")
        machine = rt.machine
        assert machine is not None
        vmi = self.controller.vmis.get(*rt.key) or {}
        claims = [v["name"] for v in (vmi.get("spec") or {}).get("volumes") or []
                  if v.get("persistentVolumeClaim") or v.get("dataVolume")]
        files = await machine.disk_files(claims)
        targets = {vol: provisioner.backup_path(provisioner.volume_directory(path), name)
                   for vol, path in files.items()}
        if not targets:
            raise StatusError(400, "BadRequest", f"VMI {rt.meta.name} has no PVC or DataVolume disk to back up")
        quiesce = not body.get("skipQuiesce") and rt.agent.connected and not rt.meta.frozen
        rt.meta.backup = {"backupName": name, "startTimestamp": st.now_rfc3339(),
                          "volumes": [{"volumeName": v} for v in sorted(targets)]}
        rt.save()
        self._backups[rt.key] = asyncio.get_running_loop().create_task(self._run_backup(rt, targets, quiesce))

    async def _run_backup(self, rt: VMIRuntime, targets: dict[str, Any], quiesce: bool) -> None:
        machine = rt.machine
        assert machine is not None
        frozen = False
        status = "Skipped"
        if quiesce:
            try:
                await machine.guest_command("guest-fsfreeze-freeze", timeout=60.0)
                frozen, status = True, "Succeeded"
            except HypervisorError as err:
                log.warning("backup of %s/%s: freezing the guest failed, copying unquiesced: %s", *rt.key, err)
                status = "Failed"

        async def thaw() -> None:
            nonlocal frozen
            if frozen:
                frozen = False
                try:
                    await machine.guest_command("guest-fsfreeze-thaw", timeout=60.0)
                except HypervisorError as err:
                    log.warning("backup of %s/%s: thawing the guest failed: %s", *rt.key, err)

        result: JSON = {"quiesceStatus": status}
        try:
            await machine.backup(targets, started=thaw)
            result["completed"] = True
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("backup of %s/%s failed: %s", *rt.key, err)
            result.update(failed=True, backupMsg=str(err))
        finally:
            await thaw()
            self._backups.pop(rt.key, None)
        rt.meta.backup = {**rt.meta.backup, **result, "endTimestamp": st.now_rfc3339()}
        rt.save()
        self.controller.enqueue(rt.key)

    async def _get(self, request: web.Request) -> web.Response:
        await self._authorize(request)
        action = request.match_info["action"]
        if action not in GET_ACTIONS:
            raise StatusError(404 if action not in PUT_ACTIONS else 405, "NotFound" if action not in PUT_ACTIONS
                              else "MethodNotAllowed", f"unknown action {action!r} for GET")  # fmt: skip
        _, rt = self._runtime(request)
        machine = rt.machine
        assert machine is not None
        if not rt.agent.connected or machine.state != RunState.RUNNING:
            raise self._no_agent(rt.meta.name)
        try:
            if action == "userlist":
                body = st.users_list(await machine.guest_command("guest-get-users"))
            elif action == "filesystemlist":
                body = st.filesystem_list(await machine.guest_command("guest-get-fsinfo"))
            else:
                info = await machine.guest_info()
                osinfo = await machine.guest_osinfo()
                users = await _optional(machine.guest_command("guest-get-users"))
                fsinfo = await _optional(machine.guest_command("guest-get-fsinfo"))
                timezone = await _optional(machine.guest_command("guest-get-timezone"))
                body = st.guest_agent_info(info, osinfo, hostname=rt.agent.hostname, timezone=timezone,
                                           users=users, fsinfo=fsinfo, frozen=rt.meta.frozen)  # fmt: skip
        except HypervisorError as err:
            raise StatusError(500, "InternalError", f"guest agent: {err}") from err
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


async def _json_body(request: web.Request) -> JSON:
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise StatusError(400, "BadRequest", f"invalid body: {err}") from err
    if not isinstance(body, dict):
        raise StatusError(400, "BadRequest", "the body must be a JSON object")
    return body


async def _optional(call: Awaitable[Any]) -> Any:
    """A guest-agent query whose failure (command disabled or unsupported in this guest) only omits a field."""
    try:
        return await call
    except GuestAgentError:
        return None


def _duration(value: str) -> float:
    """A Go duration as metav1.Duration serialises it ("5m0s", "30s", "1h")."""
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise StatusError(400, "BadRequest", f"invalid duration {value!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total
