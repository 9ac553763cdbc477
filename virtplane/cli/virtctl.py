"""`virtctl`: KubeVirt's CLI verbs against a virtplane (or KubeVirt) cluster.

Same verbs, flags and kubeconfig handling as KubeVirt's virtctl (`--kubeconfig`, `KUBECONFIG`, `--context`,
`-n/--namespace`, else the current context's namespace). Flags may come before or after the verb. Errors
are one line on stderr (`Error: ...`) with a non-zero exit code: 1 for failures, 2 for bad usage, 130 when
interrupted. Set VIRTCTL_DEBUG=1 to see a traceback for an unexpected failure.

    virtctl start|stop|restart VM            virtctl pause|unpause vm|vmi NAME
    virtctl soft-reboot|reset VMI            virtctl migrate|migrate-cancel VM
    virtctl console VMI                      virtctl vnc [screenshot] VMI
    virtctl ssh|scp ...                      virtctl port-forward TARGET PORT...
    virtctl expose vm|vmi|vmirs NAME ...     virtctl guestosinfo|userlist|fslist VMI
    virtctl create vm ...                    virtctl version
    virtctl image-upload dv|pvc NAME ...     virtctl import-vm [NAME] --ova FILE|URL
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import yaml

import virtplane
from virtplane.api import hotplug
from virtplane.client import rest
from virtplane.console import client as cclient

JSON = dict[str, Any]
VM = rest.GVR("kubevirt.io", "v1", "virtualmachines")
VMI = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
VMIM = rest.GVR("kubevirt.io", "v1", "virtualmachineinstancemigrations")
VMIRS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstancereplicasets")
SERVICES = rest.GVR("", "v1", "services")
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
PLAIN = "plain.kubevirt.io"
RUN_STRATEGIES = ("Always", "Manual", "Halted", "Once", "RerunOnFailure")
FINAL_PHASES = ("Succeeded", "Failed")
MAX_MESSAGE = 16 * 1024 * 1024


class CLIError(Exception):
    """A failure reported to the user as one line; the exit code is `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# ----------------------------------------------------------------------------------------------- context


@dataclasses.dataclass(slots=True)
class Context:
    config: rest.ClientConfig
    namespace: str
    namespace_overridden: bool
    kubeconfig: str | None
    context: str | None

    def client(self) -> rest.Client:
        return rest.Client(self.config, user_agent=f"virtctl/{virtplane.__version__}")

    def stream_session(self) -> aiohttp.ClientSession:
        """A session for long-lived streams (consoles, tunnels, followed logs): no total timeout."""
        headers = {"User-Agent": f"virtctl/{virtplane.__version__}"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return aiohttp.ClientSession(
            self.config.server, headers=headers, connector=aiohttp.TCPConnector(ssl=self.config.ssl_context()),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15))

    def sub(self, plural: str, name: str, action: str, namespace: str | None = None) -> str:
        return f"{SUBRESOURCES}/namespaces/{namespace or self.namespace}/{plural}/{name}/{action}"

    def global_args(self) -> list[str]:
        """The flags a child virtctl (ssh's ProxyCommand) needs to reach the same cluster."""
        out: list[str] = []
        if self.kubeconfig:
            out += ["--kubeconfig", str(Path(self.kubeconfig).resolve())]
        if self.context:
            out += ["--context", self.context]
        return out


def load_context(args: argparse.Namespace) -> Context:
    kubeconfig = getattr(args, "kubeconfig", None)
    context = getattr(args, "context", None)
    namespace = getattr(args, "namespace", None)
    where = kubeconfig or os.environ.get("KUBECONFIG", "").split(":")[0] or str(Path.home() / ".kube" / "config")
    try:
        config = rest.ClientConfig.from_kubeconfig(kubeconfig, context)
    except FileNotFoundError as exc:
        raise CLIError(f"cannot read kubeconfig {where}: no such file (set --kubeconfig or KUBECONFIG)") from exc
    except StopIteration as exc:
        raise CLIError(f"kubeconfig {where}: context {context or '(current-context)'} not found") from exc
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise CLIError(f"invalid kubeconfig {where}: {exc}") from exc
    return Context(config=config, namespace=namespace or config.namespace or "default",
                   namespace_overridden=bool(namespace), kubeconfig=kubeconfig, context=context)


def api_message(exc: rest.APIError) -> str:
    message = exc.status.get("message") if isinstance(exc.status, dict) else None
    return str(message or exc)


async def open_websocket(session: aiohttp.ClientSession, client: rest.Client, path: str,
                         protocols: Sequence[str] = (PLAIN,)) -> aiohttp.ClientWebSocketResponse:
    try:
        return await session.ws_connect(path, protocols=protocols, heartbeat=cclient.CLIENT_HEARTBEAT,
                                        max_msg_size=MAX_MESSAGE)
    except aiohttp.WSServerHandshakeError as exc:
        # The handshake drops the server's Status body; the same GET without the upgrade returns it.
        try:
            await client.request("GET", path)
        except rest.APIError as again:
            if again.code == exc.status:
                raise CLIError(api_message(again)) from exc
        raise CLIError(f"the server refused the connection: HTTP {exc.status}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise CLIError(f"cannot reach the server {client.config.server}: {exc}") from exc


async def until_interrupted() -> None:
    """Wait for Ctrl+C or SIGTERM (the proxies run until then)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_strategy(vm: JSON) -> str:
    spec = vm.get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"


def dry_run_body(args: argparse.Namespace) -> JSON:
    return {"dryRun": ["All"]} if getattr(args, "dry_run", False) else {}


# ----------------------------------------------------------------------------------------------- lifecycle


async def cmd_start(args: argparse.Namespace, ctx: Context) -> int:
    body = {"paused": bool(args.paused), **dry_run_body(args)}
    async with ctx.client() as client:
        await client.request("PUT", ctx.sub("virtualmachines", args.name, "start"), body=body)
    print(f"VM {args.name} was scheduled to start")
    return 0


def _grace(args: argparse.Namespace) -> int | None:
    if (args.grace_period is not None) != bool(args.force):
        raise CLIError("Must both use --force=true and set --grace-period.")
    return args.grace_period


async def cmd_stop(args: argparse.Namespace, ctx: Context) -> int:
    grace = _grace(args)
    body = {**dry_run_body(args), **({"gracePeriod": grace} if grace is not None else {})}
    async with ctx.client() as client:
        await client.request("PUT", ctx.sub("virtualmachines", args.name, "stop"), body=body)
    print(f"VM {args.name} was scheduled to stop")
    return 0


async def cmd_restart(args: argparse.Namespace, ctx: Context) -> int:
    grace = _grace(args)
    body = {**dry_run_body(args), **({"gracePeriodSeconds": grace} if grace is not None else {})}
    async with ctx.client() as client:
        await client.request("PUT", ctx.sub("virtualmachines", args.name, "restart"), body=body)
    print(f"VM {args.name} was scheduled to restart")
    return 0


def normalize_kind(kind: str) -> str:
    k = kind.lower()
    if k in ("vm", "vms", "virtualmachine", "virtualmachines"):
        return "vm"
    if k in ("vmi", "vmis", "virtualmachineinstance", "virtualmachineinstances"):
        return "vmi"
    if k in ("vmirs", "vmirss", "virtualmachineinstancereplicaset", "virtualmachineinstancereplicasets"):
        return "vmirs"
    raise CLIError(f"unsupported resource type '{kind}'")


async def _vmi_action(ctx: Context, client: rest.Client, kind: str, name: str, action: str, body: JSON) -> None:
    """PUT a VMI action; for `vm NAME` the VM must exist and the action goes to its VMI."""
    if kind == "vm":
        await client.get(VM, name, ctx.namespace)
    try:
        await client.request("PUT", ctx.sub("virtualmachineinstances", name, action), body=body)
    except rest.NotFound as exc:
        if kind == "vm":
            raise CLIError(f"VM {name} is not running") from exc
        raise


async def cmd_pause(args: argparse.Namespace, ctx: Context) -> int:
    kind = normalize_kind(args.kind)
    if kind == "vmirs":
        raise CLIError("pause takes vm or vmi")
    action = args.verb  # pause | unpause
    async with ctx.client() as client:
        await _vmi_action(ctx, client, kind, args.name, action, dry_run_body(args))
    print(f"VMI {args.name} was scheduled to {action}")
    return 0


async def cmd_vmi_action(args: argparse.Namespace, ctx: Context) -> int:
    action = {"soft-reboot": "softreboot", "reset": "reset"}[args.verb]
    async with ctx.client() as client:
        await _vmi_action(ctx, client, "vmi", args.name, action, {})
    print(f"VMI {args.name} was scheduled to {args.verb}")
    return 0


def parse_selector(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in ",".join(pairs).split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"invalid --addedNodeSelector {item!r}: expected key=value")
        out[key] = value
    return out


async def cmd_migrate(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.client() as client:
        await client.get(VM, args.name, ctx.namespace)
        try:
            vmi = await client.get(VMI, args.name, ctx.namespace)
        except rest.NotFound as exc:
            raise CLIError(f"VM {args.name} is not running") from exc
        if (vmi.get("status") or {}).get("phase") != "Running":
            raise CLIError(f"VM {args.name} is not running")
        spec: JSON = {"vmiName": args.name}
        if args.added_node_selector:
            spec["addedNodeSelector"] = parse_selector(args.added_node_selector)
        migration = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                     "metadata": {"generateName": "kubevirt-migrate-vm-", "namespace": ctx.namespace},
                     "spec": spec}
        params = {"dryRun": "All"} if args.dry_run else None
        await client.request("POST", VMIM.path(ctx.namespace), body=migration, params=params)
    print(f"VM {args.name} was scheduled to migrate")
    return 0


async def cmd_migrate_cancel(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.client() as client:
        migrations = await client.list(VMIM, ctx.namespace)
        active = [m for m in migrations.get("items") or []
                  if (m.get("spec") or {}).get("vmiName") == args.name
                  and (m.get("status") or {}).get("phase") not in FINAL_PHASES]
        if not active:
            raise CLIError(f"Found no migration to cancel for {args.name}")
        name = active[0]["metadata"]["name"]
        path = VMIM.path(ctx.namespace, name)
        params = {"dryRun": "All"} if args.dry_run else None
        await client.request("DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1"}, params=params)
    print(f"VM {args.name} was scheduled to migrate-cancel")
    return 0


# ----------------------------------------------------------------------------------------------- console


async def wait_running(client: rest.Client, ctx: Context, name: str, timeout: float) -> None:  # noqa: ASYNC109
    """Until the VMI is Running. A VMI that does not exist yet is waited for only when its VM is meant to run
    (start; console); otherwise the answer is immediate."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            vmi = await client.get(VMI, name, ctx.namespace)
        except rest.NotFound as exc:
            try:
                vm = await client.get(VM, name, ctx.namespace)
            except rest.NotFound:
                raise CLIError(api_message(exc)) from exc
            pending = (vm.get("status") or {}).get("stateChangeRequests")
            if run_strategy(vm) in ("Halted", "Manual") and not pending:
                raise CLIError(f"VM {name} is not running") from exc
        else:
            phase = (vmi.get("status") or {}).get("phase")
            if phase == "Running":
                return
            if phase in FINAL_PHASES:
                raise CLIError(f"VMI is not running (phase {phase})")
        if loop.time() >= deadline:
            raise CLIError(f"timed out waiting for VMI {name} to be running")
        await asyncio.sleep(1.0)


async def cmd_console(args: argparse.Namespace, ctx: Context) -> int:
    if args.log:
        return await _console_log(args, ctx)
    timeout = args.timeout * 60.0
    path = ctx.sub("virtualmachineinstances", args.name, "console")
    loop = asyncio.get_running_loop()
    async with ctx.client() as client, ctx.stream_session() as session:
        deadline = loop.time() + timeout
        while True:
            await wait_running(client, ctx, args.name, max(0.0, deadline - loop.time()))
            try:
                ws = await open_websocket(session, client, path)
                break
            except CLIError as exc:  # it stopped again between the check and the connect: wait on
                if "not running" not in exc.message or loop.time() >= deadline:
                    raise
                await asyncio.sleep(1.0)
        with cclient.raw_terminal(0) as is_tty:
            if is_tty:
                print(f"Successfully connected to {args.name} console. The escape sequence is ^]", file=sys.stderr,
                      end="\r\n", flush=True)
            end = await cclient.terminal_session(ws)
        if end == cclient.End.ESCAPE and is_tty:
            print("", file=sys.stderr)
    return 0


async def _console_log(args: argparse.Namespace, ctx: Context) -> int:
    params: dict[str, str] = {}
    if args.tail is not None:
        params["tail"] = str(args.tail)
    if args.follow:
        params["follow"] = "true"
    path = ctx.sub("virtualmachineinstances", args.name, "consolelog")
    async with ctx.client() as client, ctx.stream_session() as session:
        try:
            async with session.get(path, params=params) as resp:
                if resp.status >= 400:
                    client._result(resp.status, await resp.read())
                async for chunk in resp.content.iter_any():
                    await cclient.write_all(1, chunk)
        except (aiohttp.ClientError, OSError) as exc:
            raise CLIError(f"cannot read the console log: {exc}") from exc
    return 0


def find_vnc_viewer(port: int) -> list[str] | None:
    if shutil.which("remote-viewer"):
        return ["remote-viewer", f"vnc://127.0.0.1:{port}"]
    if shutil.which("vncviewer"):
        return ["vncviewer", f"127.0.0.1:{port}"]
    return None


async def _require_running(client: rest.Client, ctx: Context, name: str) -> None:
    vmi = await client.get(VMI, name, ctx.namespace)
    if (vmi.get("status") or {}).get("phase") != "Running":
        raise CLIError("VMI is not running")


async def cmd_vnc(args: argparse.Namespace, ctx: Context) -> int:
    words = args.words
    if words[0] == "screenshot":
        if len(words) != 2:
            raise CLIError("usage: virtctl vnc screenshot VMI --file FILE", code=2)
        return await _vnc_screenshot(args, ctx, words[1])
    if len(words) != 1:
        raise CLIError("usage: virtctl vnc VMI [--proxy-only] [--port N]", code=2)
    name = words[0]
    path = ctx.sub("virtualmachineinstances", name, "vnc")
    async with ctx.client() as client, ctx.stream_session() as session:
        await _require_running(client, ctx, name)

        def report(exc: BaseException) -> None:
            message = exc.message if isinstance(exc, CLIError) else str(exc)
            print(f"Error: {message}", file=sys.stderr, flush=True)

        try:
            server = await cclient.serve_local("127.0.0.1", args.port, lambda: open_websocket(session, client, path),
                                               on_error=report)
        except OSError as exc:
            raise CLIError(f"cannot listen on 127.0.0.1:{args.port}: {exc}") from exc
        port = server.sockets[0].getsockname()[1]
        async with server:
            if args.proxy_only:
                print(json.dumps({"port": port}), flush=True)
                await until_interrupted()
                return 0
            viewer = find_vnc_viewer(port)
            if viewer is None:
                print(f"No VNC viewer found (remote-viewer or vncviewer). Connect one to 127.0.0.1:{port} "
                      f"(vnc://127.0.0.1:{port}); proxying until Ctrl+C.", file=sys.stderr, flush=True)
                print(json.dumps({"port": port}), flush=True)
                await until_interrupted()
                return 0
            proc = await asyncio.create_subprocess_exec(*viewer)
            waiter = asyncio.ensure_future(proc.wait())
            interrupted = asyncio.ensure_future(until_interrupted())
            await asyncio.wait([waiter, interrupted], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                proc.terminate()
                await proc.wait()
            interrupted.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await interrupted
    return 0


async def _vnc_screenshot(args: argparse.Namespace, ctx: Context, name: str) -> int:
    if not args.file:
        raise CLIError("--file is required (use - for stdout)", code=2)
    params = {"moveCursor": "true"} if args.move_cursor else None
    async with ctx.client() as client:
        session = client.session
        try:
            async with session.get(ctx.sub("virtualmachineinstances", name, "vnc/screenshot"), params=params) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    client._result(resp.status, raw)
        except (aiohttp.ClientError, OSError) as exc:
            raise CLIError(f"Can't access VMI {name}: {exc}") from exc
    if args.file == "-":
        await cclient.write_all(1, raw)
    else:
        try:
            await asyncio.to_thread(Path(args.file).write_bytes, raw)
        except OSError as exc:
            raise CLIError(f"Can't write image to a file: {exc}") from exc
    return 0


# ----------------------------------------------------------------------------------------------- tunnels


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    kind: str  # vm | vmi
    name: str
    namespace: str | None
    user: str | None = None


def parse_target(arg: str, *, allow_user: bool = False) -> Target:
    """`[user@]type/name[/namespace]` (port-forward, ssh, scp)."""
    user: str | None = None
    if allow_user and "@" in arg:
        user, _, arg = arg.partition("@")
        if not user:
            raise CLIError("expected username before '@'")
        if not arg:
            raise CLIError("expected target after '@'")
    if not arg:
        raise CLIError("target cannot be empty")
    parts = arg.split("/")
    if len(parts) == 1:
        raise CLIError("target must contain type and name separated by '/'")
    if len(parts) > 3:
        raise CLIError("target is not valid with more than two '/'")
    kind = normalize_kind(parts[0])
    if kind == "vmirs":
        raise CLIError(f"unsupported resource type '{parts[0]}'")
    name = parts[1]
    if not name:
        raise CLIError("name cannot be empty")
    namespace = parts[2] if len(parts) == 3 else None
    if namespace == "":
        raise CLIError("namespace cannot be empty")
    return Target(kind, name, namespace, user)


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardedPort:
    local: int
    remote: int
    protocol: str = "tcp"


def parse_port(arg: str) -> ForwardedPort:
    """`[protocol/]localPort[:targetPort]`."""
    protocol = "tcp"
    if "/" in arg:
        protocol, _, arg = arg.partition("/")
        protocol = protocol.lower()
    if protocol not in ("tcp", "udp"):
        raise CLIError(f"unsupported protocol {protocol!r}: tcp or udp")
    local_s, _, remote_s = arg.partition(":")
    try:
        local = int(local_s)
        remote = int(remote_s) if remote_s else local
    except ValueError as exc:
        raise CLIError(f"invalid port {arg!r}: expected localPort[:targetPort]") from exc
    if not 0 <= local <= 65535 or not 1 <= remote <= 65535:
        raise CLIError(f"invalid port {arg!r}: ports are 1-65535 (local 0 picks a free port)")
    return ForwardedPort(local, remote, protocol)


def portforward_path(ctx: Context, target: Target, port: int, protocol: str) -> str:
    plural = "virtualmachines" if target.kind == "vm" else "virtualmachineinstances"
    return ctx.sub(plural, target.name, f"portforward/{port}/{protocol}", target.namespace)


async def cmd_port_forward(args: argparse.Namespace, ctx: Context) -> int:
    target = parse_target(args.target)
    ports = [parse_port(p) for p in args.ports]
    if args.stdio and len(ports) != 1:
        raise CLIError("only one port supported when forwarding to stdout")
    if args.stdio and ports[0].protocol != "tcp":
        raise CLIError("--stdio forwards TCP only")
    async with ctx.client() as client, ctx.stream_session() as session:
        if args.stdio:
            ws = await open_websocket(session, client, portforward_path(ctx, target, ports[0].remote, "tcp"))
            await cclient.stdio_session(ws)
            return 0
        # Check the target once up front so a typo is an error now, not on the first connection.
        if target.kind == "vm":
            await client.get(VM, target.name, target.namespace or ctx.namespace)
        await client.get(VMI, target.name, target.namespace or ctx.namespace)
        servers: list[Any] = []
        try:
            for p in ports:
                path = portforward_path(ctx, target, p.remote, p.protocol)

                def opener(path: str = path) -> Awaitable[aiohttp.ClientWebSocketResponse]:
                    return open_websocket(session, client, path)

                def report(exc: BaseException) -> None:
                    message = exc.message if isinstance(exc, CLIError) else str(exc)
                    print(f"Error: {message}", file=sys.stderr, flush=True)

                try:
                    if p.protocol == "tcp":
                        server = await cclient.serve_local(args.address, p.local, opener, on_error=report)
                        bound = server.sockets[0].getsockname()[1]
                    else:
                        server, bound = await _serve_udp(args.address, p.local, opener)
                except OSError as exc:
                    raise CLIError(f"cannot listen on {args.address}:{p.local}: {exc}") from exc
                servers.append(server)
                print(f"Forwarding from {args.address}:{bound} -> {p.remote}" +
                      ("/udp" if p.protocol == "udp" else ""), flush=True)
            await until_interrupted()
        finally:
            for server in servers:
                server.close()
    return 0


class _UDPForward(asyncio.DatagramProtocol):
    """Local UDP port: one websocket per peer address; a websocket message is one datagram."""

    def __init__(self, opener: Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]]) -> None:
        self.opener = opener
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[Any, asyncio.Queue[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport for a datagram endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        queue = self.flows.get(addr)
        if queue is None:
            queue = self.flows[addr] = asyncio.Queue()
            task = asyncio.get_running_loop().create_task(self._flow(addr, queue))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        queue.put_nowait(data)

    async def _flow(self, addr: Any, queue: asyncio.Queue[bytes]) -> None:
        try:
            ws = await self.opener()
        except Exception as exc:
            print(f"Error: {getattr(exc, 'message', exc)}", file=sys.stderr, flush=True)
            self.flows.pop(addr, None)
            return

        async def up() -> None:
            while True:
                await ws.send_bytes(await queue.get())

        async def down() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY and self.transport is not None:
                    self.transport.sendto(msg.data, addr)

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            self.flows.pop(addr, None)
            await ws.close()


async def _serve_udp(host: str, port: int, opener: Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]],
                     ) -> tuple[asyncio.DatagramTransport, int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _UDPForward(opener), local_addr=(host, port))
    return transport, transport.get_extra_info("sockname")[1]


def virtctl_command() -> list[str]:
    """How to run this virtctl again (for ssh's ProxyCommand)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.basename(argv0) == "virtctl" and os.access(argv0, os.X_OK):
        return [os.path.abspath(argv0)]
    return [sys.executable, "-m", "virtplane.cli.virtctl"]


def ssh_common_args(args: argparse.Namespace, ctx: Context, target: Target) -> list[str]:
    namespace = target.namespace or ctx.namespace
    proxy = [*virtctl_command(), *ctx.global_args(), "port-forward", "--stdio=true",
             f"{target.kind}/{target.name}/{namespace}", str(args.port)]
    out = ["-o", f"ProxyCommand={shlex.join(proxy)}"]
    if args.known_hosts:
        out += ["-o", f"UserKnownHostsFile={args.known_hosts}"]
    for opt in args.local_ssh_opts or []:
        out += shlex.split(opt)
    if args.identity_file:
        out += ["-i", args.identity_file]
    return out


def ssh_host(args: argparse.Namespace, ctx: Context, target: Target) -> str:
    """`user@kind.name.namespace`: a stable host name per VM for known_hosts (the ProxyCommand connects)."""
    user = target.user or args.username
    host = f"{target.kind}.{target.name}.{target.namespace or ctx.namespace}"
    return f"{user}@{host}" if user else host


def build_ssh_argv(args: argparse.Namespace, ctx: Context) -> list[str]:
    target = parse_target(args.target, allow_user=True)
    argv = ["ssh", *ssh_common_args(args, ctx, target), ssh_host(args, ctx, target)]
    if args.command:
        argv.append(args.command)
    return argv


_REMOTE = re.compile(r"^(?:[^@/:]+@)?(?:vm|vms|vmi|vmis|virtualmachine|virtualmachines|virtualmachineinstance|"
                     r"virtualmachineinstances)/[^:]+:", re.IGNORECASE)


def build_scp_argv(args: argparse.Namespace, ctx: Context) -> list[str]:
    src, dst = args.source, args.destination
    src_remote, dst_remote = bool(_REMOTE.match(src)), bool(_REMOTE.match(dst))
    if src_remote == dst_remote:
        raise CLIError("exactly one of source and destination must be remote ([user@]vm/NAME[/NAMESPACE]:PATH)")
    remote = src if src_remote else dst
    target_s, _, remote_path = remote.partition(":")
    target = parse_target(target_s, allow_user=True)
    remote_arg = f"{ssh_host(args, ctx, target)}:{remote_path}"
    argv = ["scp", *ssh_common_args(args, ctx, target)]
    if args.recursive:
        argv.append("-r")
    if args.preserve:
        argv.append("-p")
    argv += [remote_arg, dst] if src_remote else [src, remote_arg]
    return argv


def _require_local_ssh(args: argparse.Namespace, tool: str) -> None:
    if not args.local_ssh:
        raise CLIError("the built-in SSH client is not available in virtplane's virtctl; use --local-ssh "
                       f"(the system {tool}, the default)")
    if shutil.which(tool) is None:
        raise CLIError(f"{tool} is not installed (virtctl runs the system {tool} through port-forward)")


async def cmd_ssh(args: argparse.Namespace, ctx: Context) -> int:
    _require_local_ssh(args, "ssh")
    argv = build_ssh_argv(args, ctx)
    return await asyncio.to_thread(lambda: subprocess.call(argv))


async def cmd_scp(args: argparse.Namespace, ctx: Context) -> int:
    _require_local_ssh(args, "scp")
    argv = build_scp_argv(args, ctx)
    return await asyncio.to_thread(lambda: subprocess.call(argv))


# ----------------------------------------------------------------------------------------------- queries


async def cmd_expose(args: argparse.Namespace, ctx: Context) -> int:
    kind = normalize_kind(args.kind)
    if args.protocol not in ("TCP", "UDP"):
        raise CLIError(f"unknown protocol: {args.protocol}")
    if args.type == "ExternalName":
        raise CLIError(f"type: {args.type} not supported")
    if args.type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise CLIError(f"unknown service type: {args.type}")
    async with ctx.client() as client:
        if kind == "vmi":
            vmi = await client.get(VMI, args.resource, ctx.namespace)
            selector = dict((vmi.get("metadata") or {}).get("labels") or {})
            selector.pop("kubevirt.io/nodeName", None)
        elif kind == "vm":
            vm = await client.get(VM, args.resource, ctx.namespace)
            selector = dict((((vm.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {})
        else:
            rs = await client.get(VMIRS, args.resource, ctx.namespace)
            sel = (rs.get("spec") or {}).get("selector") or {}
            if sel.get("matchExpressions"):
                raise CLIError("cannot expose VirtualMachineInstance ReplicaSet with match expressions")
            selector = dict(sel.get("matchLabels") or {})
        if not selector:
            raise CLIError(f"missing label information for {args.kind}: {args.resource}")
        port: JSON = {"protocol": args.protocol, "port": args.port}
        if args.port_name:
            port["name"] = args.port_name
        if args.target_port:
            port["targetPort"] = int(args.target_port) if args.target_port.isdigit() else args.target_port
        if args.node_port:
            port["nodePort"] = args.node_port
        spec: JSON = {"ports": [port], "selector": selector, "type": args.type}
        if args.cluster_ip:
            spec["clusterIP"] = args.cluster_ip
        if args.external_ip:
            spec["externalIPs"] = [args.external_ip]
        if args.load_balancer_ip:
            spec["loadBalancerIP"] = args.load_balancer_ip
        service = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": args.service_name, "namespace": ctx.namespace}, "spec": spec}
        try:
            await client.create(SERVICES, service, ctx.namespace)
        except rest.APIError as exc:
            raise CLIError(f"service creation failed: {api_message(exc)}") from exc
    print(f"Service {args.service_name} successfully exposed for {args.kind} {args.resource}")
    return 0


async def cmd_guest_query(args: argparse.Namespace, ctx: Context) -> int:
    action = {"guestosinfo": "guestosinfo", "userlist": "userlist", "fslist": "filesystemlist"}[args.verb]
    async with ctx.client() as client:
        result = await client.request("GET", ctx.sub("virtualmachineinstances", args.name, action))
    print(json.dumps(result, indent=2))
    return 0


async def cmd_version(args: argparse.Namespace, ctx: Context) -> int:
    print(f"Client Version: version.Info{{GitVersion:\"v{virtplane.__version__}\", Compiler:\"cpython\"}}")
    async with ctx.client() as client:
        try:
            v = await client.request("GET", f"{SUBRESOURCES}/version")
        except (rest.APIError, aiohttp.ClientError, OSError) as exc:
            raise CLIError(f"cannot reach the server: {exc}") from exc
    print(f"Server Version: version.Info{{GitVersion:\"{v.get('gitVersion')}\", Platform:\"{v.get('platform')}\"}}")
    return 0


# ----------------------------------------------------------------------------------------------- image-upload

DATAVOLUMES = rest.GVR("cdi.kubevirt.io", "v1beta1", "datavolumes")
PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
UPLOAD_TOKENS = "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/uploadtokenrequests"
UPLOAD_SYNC = "/v1beta1/upload"
ANN_UPLOAD_ENDPOINT = "upload.virtplane.io/endpoint"  # written by the DataVolume controller at UploadReady
ANN_POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
ANN_POD_READY = "cdi.kubevirt.io/storage.pod.ready"
ANN_IMMEDIATE = "cdi.kubevirt.io/storage.bind.immediate.requested"
ANN_CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
UPLOAD_CHUNK = 1 << 20
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
VOLUME_MODES = {"block": "Block", "filesystem": "Filesystem"}


def upload_datavolume(args: argparse.Namespace, namespace: str) -> JSON:
    """The DataVolume `virtctl image-upload` creates (KubeVirt's shape: the `storage` API, so the
    StorageProfile fills what the user left out)."""
    storage: JSON = {"resources": {"requests": {"storage": args.size}}}
    if args.storage_class:
        storage["storageClassName"] = args.storage_class
    if args.access_mode:
        storage["accessModes"] = [args.access_mode]
    if args.volume_mode:
        storage["volumeMode"] = VOLUME_MODES[args.volume_mode]
    meta: JSON = {"name": args.name, "namespace": namespace}
    if args.force_bind:
        meta["annotations"] = {ANN_IMMEDIATE: "true"}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": meta,
            "spec": {"source": {"upload": {}}, "contentType": "kubevirt", "storage": storage}}


def _check_upload_args(args: argparse.Namespace) -> Path:
    if args.target not in ("dv", "pvc"):
        raise CLIError(f'image-upload: the target must be "dv" or "pvc", not {args.target!r}', 2)
    if not args.image_path:
        raise CLIError("image-upload: --image-path is required", 2)
    path = Path(args.image_path)
    if not path.is_file():
        raise CLIError(f"image-upload: cannot read {path}: no such file")
    if not args.no_create and not args.size:
        raise CLIError("image-upload: --size is required to create the volume (or use --no-create)", 2)
    if args.access_mode and args.access_mode not in ACCESS_MODES:
        raise CLIError(f"image-upload: --access-mode must be one of {', '.join(ACCESS_MODES)}", 2)
    if args.volume_mode:
        args.volume_mode = args.volume_mode.lower()
        if args.volume_mode not in VOLUME_MODES:
            raise CLIError("image-upload: --volume-mode must be block or filesystem", 2)
    return path


async def _upload_volume(args: argparse.Namespace, ctx: Context, client: rest.Client) -> None:
    """Create the upload DataVolume unless it exists; an existing one is reused while it still waits for
    its data, which is what makes a failed upload resumable by running the same command again."""
    ns, name = ctx.namespace, args.name
    try:
        pvc: JSON | None = await client.get(PVCS, name, ns)
    except rest.NotFound:
        pvc = None
    try:
        dv: JSON | None = await client.get(DATAVOLUMES, name, ns)
    except rest.NotFound:
        dv = None
    if dv is not None:
        if "upload" not in ((dv.get("spec") or {}).get("source") or {}):
            raise CLIError(f"DataVolume {ns}/{name} exists and is not an upload DataVolume")
        phase = (dv.get("status") or {}).get("phase")
        if phase == "Succeeded":
            raise CLIError(f"DataVolume {ns}/{name} already holds an uploaded image (phase Succeeded)")
        print(f"Using existing DataVolume {ns}/{name}", file=sys.stderr)
        return
    if pvc is not None:
        if ANN_UPLOAD_ENDPOINT in ((pvc.get("metadata") or {}).get("annotations") or {}):
            print(f"Using existing PVC {ns}/{name}", file=sys.stderr)
            return
        raise CLIError(f"PVC {ns}/{name} not available for upload (it is not the target of an upload DataVolume)")
    if args.no_create:
        raise CLIError(f"{'DataVolume' if args.target == 'dv' else 'PVC'} {ns}/{name} not found (--no-create)")
    # virtplane's upload server is driven by the DataVolume controller, so a `pvc` target is provisioned
    # through a DataVolume of the same name: the PVC the user asked for is the one it creates.
    await client.create(DATAVOLUMES, upload_datavolume(args, ns), ns)
    kind = "DataVolume" if args.target == "dv" else "PVC (through DataVolume)"
    print(f"{kind} {ns}/{name} created", file=sys.stderr)


async def _wait_upload_ready(client: rest.Client, ns: str, name: str, timeout: float) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    last = ""
    while True:
        try:
            dv = await client.get(DATAVOLUMES, name, ns)
            status = dv.get("status") or {}
            last = str(status.get("phase") or "")
            if last == "Failed":
                ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Running"), {})
                raise CLIError(f"DataVolume {ns}/{name} failed: {ready.get('message') or ready.get('reason')}")
        except rest.NotFound:
            dv = None
        try:
            pvc = await client.get(PVCS, name, ns)
            anns = (pvc.get("metadata") or {}).get("annotations") or {}
            if anns.get(ANN_UPLOAD_ENDPOINT) and str(anns.get(ANN_POD_READY, "true")).lower() == "true":
                return
        except rest.NotFound:
            pass
        if asyncio.get_running_loop().time() > deadline:
            hint = " (a WaitForFirstConsumer class binds only for a VM: use --force-bind)" \
                if last in ("", "Pending", "PendingPopulation", "WaitForFirstConsumer") else ""
            raise CLIError(f"timed out after {timeout:.0f}s waiting for {ns}/{name} to be ready for an upload "
                           f"(phase {last or 'unknown'}){hint}")
        await asyncio.sleep(0.5)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per 10 % otherwise)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def render(self) -> str:
        frac = min(self.done / self.total, 1.0)
        width = 30
        filled = int(frac * width)
        return (f"{_human(self.done)} / {_human(self.total)} [{'=' * filled}{'>' if filled < width else ''}"
                f"{' ' * max(width - filled - 1, 0)}] {frac * 100:5.1f}%")

    def add(self, n: int) -> None:
        self.done += n
        decile = int(10 * self.done / self.total)
        if self.tty:
            self.stream.write("\r" + self.render())
        elif decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


async def _file_chunks(path: Path, progress: Progress) -> Any:
    f = await asyncio.to_thread(path.open, "rb")
    with f:
        while True:
            chunk = await asyncio.to_thread(f.read, UPLOAD_CHUNK)
            if not chunk:
                return
            progress.add(len(chunk))
            yield chunk


async def _upload_token(client: rest.Client, ns: str, name: str) -> str:
    body = {"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
            "metadata": {"name": name, "namespace": ns}, "spec": {"pvcName": name}}
    out = await client.request("POST", UPLOAD_TOKENS.format(ns=ns), body=body)
    token = ((out or {}).get("status") or {}).get("token") if isinstance(out, dict) else None
    if not token:
        raise CLIError("the API server answered the UploadTokenRequest without a token")
    return str(token)


async def _send(args: argparse.Namespace, ctx: Context, path: Path, token: str) -> None:
    size = (await asyncio.to_thread(path.stat)).st_size
    progress = Progress(size)
    await post_upload(args, ctx, token, _file_chunks(path, progress), size, progress, str(path),
                      _retry_hint(args, ctx))


async def post_upload(args: argparse.Namespace, ctx: Context, token: str, body: Any, size: int, progress: Progress,
                      what: str, retry_hint: str) -> None:
    """POST `size` bytes from the async iterator `body` to the upload proxy (`--uploadproxy-url`, `--insecure`)."""
    base = (args.uploadproxy_url or ctx.config.server).rstrip("/")
    ssl_ctx: Any = False if args.insecure else ctx.config.ssl_context()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
               "Content-Length": str(size), "User-Agent": f"virtctl/{virtplane.__version__}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as session, \
                session.post(base + UPLOAD_SYNC, data=body, headers=headers) as resp:
            text = (await resp.text()).strip()
            status = resp.status
    except (aiohttp.ClientError, OSError) as exc:
        progress.close()
        raise CLIError(f"upload of {what} interrupted after {progress.done} of {size} bytes: {exc}; "
                       f"{retry_hint}") from exc
    progress.close()
    if status == 200:
        return
    if status == 401:
        raise CLIError(f"the upload proxy refused the upload token: {text}")
    raise CLIError(f"upload failed (HTTP {status}): {text or 'no reason given'}; {retry_hint}")


def _retry_hint(args: argparse.Namespace, ctx: Context) -> str:
    return (f"{ctx.namespace}/{args.name} still waits for its image: run the same command again to retry "
            "(it reuses the volume)")


async def _wait_succeeded(client: rest.Client, ns: str, name: str, timeout: float) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    phase = ""
    while asyncio.get_running_loop().time() < deadline:
        status = (await client.get(DATAVOLUMES, name, ns)).get("status") or {}
        phase = str(status.get("phase") or "")
        if phase == "Succeeded":
            return
        if phase == "Failed":
            raise CLIError(f"DataVolume {ns}/{name} failed after the upload")
        await asyncio.sleep(0.3)
    raise CLIError(f"timed out after {timeout:.0f}s waiting for DataVolume {ns}/{name} to finish (phase {phase})")


async def cmd_image_upload(args: argparse.Namespace, ctx: Context) -> int:
    path = Path(args.image_path)
    async with ctx.client() as client:
        await _upload_volume(args, ctx, client)
        await _wait_upload_ready(client, ctx.namespace, args.name, float(args.wait_secs))
        print(f"Uploading {path} to {ctx.namespace}/{args.name}", file=sys.stderr)
        token = await _upload_token(client, ctx.namespace, args.name)
        await _send(args, ctx, path, token)
        print("Uploading data completed successfully, waiting for processing to complete, you can hit ctrl-c "
              "without interrupting the progress", file=sys.stderr)
        await _wait_succeeded(client, ctx.namespace, args.name, float(args.wait_secs))
    print(f"Processing completed successfully\nUploading {path} completed successfully")
    return 0


# ----------------------------------------------------------------------------------------------- hotplug


async def cmd_addvolume(args: argparse.Namespace, ctx: Context) -> int:
    """KubeVirt's `virtctl addvolume`: a DataVolume of that name is used as one, otherwise the PVC."""
    async with ctx.client() as client:
        try:
            await client.get(DATAVOLUMES, args.volume_name, ctx.namespace)
            source: JSON = {"dataVolume": {"name": args.volume_name, "hotpluggable": True}}
        except rest.NotFound:
            try:
                await client.get(PVCS, args.volume_name, ctx.namespace)
            except rest.NotFound as exc:
                raise CLIError(f"volume {args.volume_name} not found: no DataVolume or PVC of that name in "
                               f"{ctx.namespace}") from exc
            source = {"persistentVolumeClaim": {"claimName": args.volume_name, "hotpluggable": True}}
        disk_kind = "lun" if args.disk_type == "lun" else "disk"
        disk: JSON = {"name": args.volume_name, disk_kind: {"bus": args.bus}}
        if args.serial:
            disk["serial"] = args.serial
        if args.cache:
            disk["cache"] = args.cache
        body = {"name": args.volume_name, "disk": disk, "volumeSource": source, **dry_run_body(args)}
        plural = "virtualmachines" if args.persist else "virtualmachineinstances"
        await client.request("PUT", ctx.sub(plural, args.name, "addvolume"), body=body)
    print(f"Successfully submitted add volume request to VM {args.name} for volume {args.volume_name}")
    return 0


async def cmd_removevolume(args: argparse.Namespace, ctx: Context) -> int:
    plural = "virtualmachines" if args.persist else "virtualmachineinstances"
    async with ctx.client() as client:
        await client.request("PUT", ctx.sub(plural, args.name, "removevolume"),
                             body={"name": args.volume_name, **dry_run_body(args)})
    print(f"Successfully submitted remove volume request to VM {args.name} for volume {args.volume_name}")
    return 0


async def _edit_interfaces(ctx: Context, name: str, edit: Callable[[JSON], None]) -> str:
    """Apply `edit` to the VM's template spec when a VM of that name exists (the VM controller then plugs or
    unplugs the NIC of its running VMI, and the change survives restarts), else to the standalone VMI's spec
    (the node agent acts on it). A JSON patch guarded by resourceVersion, retried on a conflict."""
    async with ctx.client() as client:
        for _ in range(5):
            try:
                obj, gvr, path = await client.get(VM, name, ctx.namespace), VM, "/spec/template/spec"
                spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
            except rest.NotFound:
                try:
                    obj, gvr, path = await client.get(VMI, name, ctx.namespace), VMI, "/spec"
                except rest.NotFound as exc:
                    raise CLIError(f"no VirtualMachine or VirtualMachineInstance {name} in {ctx.namespace}") from exc
                spec = obj.get("spec") or {}
            spec = copy.deepcopy(spec)
            try:
                edit(spec)
            except hotplug.HotplugRequestError as exc:
                raise CLIError(exc.message) from exc
            ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]},
                   {"op": "add", "path": f"{path}/domain/devices/interfaces",
                    "value": spec["domain"]["devices"]["interfaces"]},
                   {"op": "add", "path": f"{path}/networks", "value": spec.get("networks") or []}]
            try:
                await client.patch(gvr, name, ops, ctx.namespace, patch_type="json")
                return "VM" if gvr is VM else "VMI"
            except rest.Conflict:
                continue
            except rest.APIError as exc:
                if exc.code == 422 and "test" in str(exc).lower():
                    continue  # changed meanwhile: read again
                raise
    raise CLIError(f"{name} kept changing while the interface was being edited; try again")


async def cmd_addinterface(args: argparse.Namespace, ctx: Context) -> int:
    """KubeVirt's (pre-1.1) `virtctl addinterface`: a bridge-binding NIC on a NetworkAttachmentDefinition,
    hot-plugged into the running VM by its declarative NIC hotplug."""
    iface: JSON = {"name": args.iface_name, "bridge": {}}
    if args.model:
        iface["model"] = args.model
    if args.mac_address:
        iface["macAddress"] = args.mac_address
    network = {"name": args.iface_name, "multus": {"networkName": args.network_attachment_definition_name}}
    kind = await _edit_interfaces(ctx, args.name, lambda spec: hotplug.add_interface(spec, iface, network))
    print(f"Successfully submitted add interface request to {kind} {args.name} for interface {args.iface_name}")
    return 0


async def cmd_removeinterface(args: argparse.Namespace, ctx: Context) -> int:
    """Marks the interface `state: absent`: the NIC is unplugged from the running VM."""
    kind = await _edit_interfaces(ctx, args.name, lambda spec: hotplug.remove_interface(spec, args.iface_name))
    print(f"Successfully submitted remove interface request to {kind} {args.name} for interface {args.iface_name}")
    return 0


# ----------------------------------------------------------------------------------------------- create vm

_RAND_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.String alphabet (no vowels, no lookalikes)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_VOLUME_IMPORT_PARAMS = {
    "blank": {"size", "type", "name", "bootorder"},
    "gcs": {"secretref", "url", "size", "type", "name", "bootorder"},
    "http": {"certconfigmap", "extraheaders", "secretextraheaders", "secretref", "url", "size", "type", "name",
             "bootorder"},
    "imageio": {"certconfigmap", "diskid", "secretref", "url", "size", "type", "name", "bootorder"},
    "pvc": {"name", "src", "size", "type", "bootorder"},
    "registry": {"certconfigmap", "imagestream", "pullmethod", "secretref", "url", "size", "type", "name",
                 "bootorder"},
    "s3": {"certconfigmap", "secretref", "url", "size", "type", "name", "bootorder"},
    "vddk": {"backingfile", "initimageurl", "secretref", "thumbprint", "url", "uuid", "size", "type", "name",
             "bootorder"},
    "snapshot": {"name", "src", "size", "type", "bootorder"},
    "ds": {"name", "src", "size", "type", "bootorder"},
}
_SIZE_OPTIONAL = {"pvc", "snapshot", "ds"}
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|)$")


def rand_suffix(n: int = 5) -> str:
    return "".join(random.choice(_RAND_ALPHABET) for _ in range(n))


def _flag_error(flag: str, message: str) -> CLIError:
    return CLIError(f'failed to parse "--{flag}" flag: {message}')


def parse_params(flag: str, value: str, allowed: set[str]) -> dict[str, str]:
    """KubeVirt's `key:value,key:value` flag syntax."""
    if not value:
        raise _flag_error(flag, "params may not be empty")
    out: dict[str, str] = {}
    for param in value.split(","):
        key, sep, val = param.partition(":")
        if not sep:
            raise _flag_error(flag, f"params need to have at least one colon: {param}")
        out[key] = val
    unknown = [f"{k}:{v}" for k, v in out.items() if k not in allowed]
    if unknown:
        raise _flag_error(flag, f"unknown param(s): {','.join(unknown)}")
    if "bootorder" in out:
        if not out["bootorder"].isdigit():
            raise _flag_error(flag, f'failed to parse param "bootorder": invalid syntax: {out["bootorder"]!r}')
    if "size" in out and not _QUANTITY.match(out["size"]):
        raise _flag_error(flag, 'failed to parse param "size": quantities must match the regular expression '
                                "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    return out


def split_prefixed(flag: str, value: str) -> tuple[str, str]:
    parts = value.split("/")
    if len(parts) > 2:
        raise _flag_error(flag, f"invalid count {len(parts) - 1} of slashes in prefix/name")
    prefix, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    if not name:
        raise _flag_error(flag, "name cannot be empty")
    return prefix, name


@dataclasses.dataclass(slots=True)
class _VMBuilder:
    vm: JSON
    boot_orders: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def template_spec(self) -> JSON:
        return self.vm["spec"]["template"]["spec"]

    @property
    def volumes(self) -> list[JSON]:
        return self.template_spec.get("volumes", [])

    def append_volume(self, volume: JSON) -> None:
        self.template_spec.setdefault("volumes", []).append(volume)

    def add_volume(self, flag: str, volume: JSON) -> None:
        name = volume["name"]
        if not _DNS1123_LABEL.match(name) or len(name) > 63:
            raise _flag_error(flag, f'invalid name "{name}": a lowercase RFC 1123 label must consist of lower case '
                                    "alphanumeric characters or '-', and must start and end with an alphanumeric "
                                    "character")
        if any(v["name"] == name for v in self.volumes):
            raise _flag_error(flag, f'there is already a volume with name "{name}"')
        self.append_volume(volume)

    def boot_order(self, flag: str, name: str, order: str | None) -> None:
        if order is None:
            return
        n = int(order)
        if n == 0:
            raise _flag_error(flag, "bootorder must be greater than 0")
        if n in self.boot_orders:
            raise _flag_error(flag, f"bootorder {n} was specified multiple times")
        self.boot_orders[n] = name
        self.template_spec["domain"]["devices"].setdefault("disks", []).append({"bootOrder": n, "name": name})


def _matcher(flag: str, value: str, kinds: tuple[str, str]) -> JSON:
    kind, name = split_prefixed(flag, value)
    kind = kind.lower()
    if kind and kind not in kinds:
        what = "instancetype" if "instancetype" in kinds[0] else "preference"
        raise _flag_error(flag, f'invalid {what} kind "{kind}", supported values are: {kinds[0]}, {kinds[1]}')
    return {"name": name, **({"kind": kind} if kind else {})}


def _data_volume_spec(flag: str, kind: str, p: dict[str, str]) -> JSON:
    if kind == "blank":
        return {"source": {"blank": {}}}
    if kind in ("pvc", "snapshot"):
        if not p.get("src"):
            raise _flag_error(flag, "src must be specified")
        namespace, name = split_prefixed(flag, p["src"])
        if not namespace:
            raise _flag_error(flag, f'namespace of {kind} "{name}" must be specified')
        return {"source": {kind: {"name": name, "namespace": namespace}}}
    if kind == "ds":
        if not p.get("src"):
            raise _flag_error(flag, "src must be specified")
        namespace, name = split_prefixed(flag, p["src"])
        ref: JSON = {"kind": "DataSource", "name": name}
        if namespace:
            ref["namespace"] = namespace
        return {"sourceRef": ref}
    if kind == "registry":
        if bool(p.get("url")) == bool(p.get("imagestream")):
            raise _flag_error(flag, "exactly one of url or imagestream must be defined")
        if p.get("pullmethod") and p["pullmethod"] not in ("pod", "node"):
            raise _flag_error(flag, "pullmethod must be set to pod or node")
        reg = {key: p[src] for key, src in (("url", "url"), ("imageStream", "imagestream"),
                                            ("pullMethod", "pullmethod"), ("secretRef", "secretref"),
                                            ("certConfigMap", "certconfigmap")) if p.get(src)}
        return {"source": {"registry": reg}}
    if not p.get("url"):
        raise _flag_error(flag, f"url is required with {kind} volume source")
    source: JSON = {"url": p["url"]}
    for key, src in (("secretRef", "secretref"), ("certConfigMap", "certconfigmap"), ("diskId", "diskid")):
        if p.get(src):
            source[key] = p[src]
    if kind == "http":
        for key, src in (("extraHeaders", "extraheaders"), ("secretExtraHeaders", "secretextraheaders")):
            if p.get(src):
                source[key] = p[src].split(";")
    if kind == "imageio" and not p.get("diskid"):
        raise _flag_error(flag, "url and diskid are both required with imageio volume source")
    if kind == "vddk":
        for req in ("uuid", "thumbprint", "secretref", "backingfile"):
            if not p.get(req):
                raise _flag_error(flag, f"{req} is required with vddk volume source")
        source = {"url": p["url"], "uuid": p["uuid"], "thumbprint": p["thumbprint"], "secretRef": p["secretref"],
                  "backingFile": p["backingfile"], **({"initImageURL": p["initimageurl"]} if p.get("initimageurl")
                                                      else {})}
    key = {"gcs": "gcs", "http": "http", "imageio": "imageio", "s3": "s3", "vddk": "vddk"}[kind]
    return {"source": {key: source}}


def build_vm(args: argparse.Namespace, namespace: str | None = None) -> JSON:
    """The VirtualMachine `virtctl create vm` prints (KubeVirt's defaults: RunStrategy Always, 180 s grace,
    512Mi guest memory unless an instance type is used, instancetype/preference inferred from the boot volume)."""
    name = args.vm_name or f"vm-{rand_suffix()}"
    strategy = next((s for s in RUN_STRATEGIES if s.lower() == args.run_strategy.lower()), None)
    if strategy is None:
        raise _flag_error("run-strategy", f'invalid run strategy "{args.run_strategy}", supported values are: '
                                          + ", ".join(RUN_STRATEGIES))
    if not _QUANTITY.match(args.memory):
        raise _flag_error("memory", f"quantities must match the regular expression, got {args.memory!r}")
    exclusive = [f for f, on in (("memory", args.memory_set), ("instancetype", bool(args.instancetype)),
                                 ("infer-instancetype", args.infer_instancetype_set),
                                 ("infer-instancetype-from", bool(args.infer_instancetype_from))) if on]
    if len(exclusive) > 1:
        raise CLIError(f"if any flags in the group [memory instancetype infer-instancetype infer-instancetype-from] "
                       f"are set none of the others can be; [{' '.join(exclusive)}] were all set")
    pexclusive = [f for f, on in (("preference", bool(args.preference)),
                                  ("infer-preference", args.infer_preference_set),
                                  ("infer-preference-from", bool(args.infer_preference_from))) if on]
    if len(pexclusive) > 1:
        raise CLIError(f"if any flags in the group [preference infer-preference infer-preference-from] are set "
                       f"none of the others can be; [{' '.join(pexclusive)}] were all set")
    if args.cloud_init_user_data and (args.user or args.password_file or args.ssh_key or args.ga_manage_ssh):
        raise CLIError("--cloud-init-user-data cannot be combined with --user, --password-file, --ssh-key or "
                       "--ga-manage-ssh")
    vm: JSON = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"creationTimestamp": None, "name": name},
        "spec": {"runStrategy": strategy, "template": {
            "metadata": {"creationTimestamp": None},
            "spec": {"domain": {"devices": {}, "memory": {"guest": args.memory}, "resources": {}},
                     "terminationGracePeriodSeconds": args.termination_grace_period}}},
        "status": {},
    }
    if namespace:
        vm["metadata"]["namespace"] = namespace
    b = _VMBuilder(vm)
    if args.instancetype:
        vm["spec"]["instancetype"] = _matcher(
            "instancetype", args.instancetype, ("virtualmachineinstancetype", "virtualmachineclusterinstancetype"))
        del b.template_spec["domain"]["memory"]
    if args.preference:
        vm["spec"]["preference"] = _matcher(
            "preference", args.preference, ("virtualmachinepreference", "virtualmachineclusterpreference"))
    # Volumes in KubeVirt's fixed order: containerdisk > pvc > (deprecated ds, clone-pvc, blank) > imports.
    for i, value in enumerate(args.volume_containerdisk):
        p = parse_params("volume-containerdisk", value, {"name", "src", "bootorder"})
        if not p.get("src"):
            raise _flag_error("volume-containerdisk", "src must be specified")
        vol_name = p.get("name") or f"{name}-containerdisk-{i}"
        b.add_volume("volume-containerdisk", {"name": vol_name, "containerDisk": {"image": p["src"]}})
        b.boot_order("volume-containerdisk", vol_name, p.get("bootorder"))
    for value in args.volume_pvc:
        p = parse_params("volume-pvc", value, {"name", "src", "bootorder"})
        if not p.get("src"):
            raise _flag_error("volume-pvc", "src must be specified")
        ns, claim = split_prefixed("volume-pvc", p["src"])
        if ns:
            raise _flag_error("volume-pvc", f'not allowed to specify namespace of pvc "{claim}"')
        vol_name = p.get("name") or claim
        b.add_volume("volume-pvc", {"name": vol_name, "persistentVolumeClaim": {"claimName": claim}})
        b.boot_order("volume-pvc", vol_name, p.get("bootorder"))
    imports = ([("volume-datasource", f"type:ds,{v}") for v in args.volume_datasource]
               + [("volume-clone-pvc", f"type:pvc,{v}") for v in args.volume_clone_pvc]
               + [("volume-blank", f"type:blank,{v}") for v in args.volume_blank]
               + [("volume-import", v) for v in args.volume_import])
    for flag, value in imports:
        kind = parse_params(flag, value, set().union(*_VOLUME_IMPORT_PARAMS.values())).get("type", "")
        if kind not in _VOLUME_IMPORT_PARAMS:
            if not kind:
                raise _flag_error(flag, "type must be specified")
            raise _flag_error(flag, f'invalid volume import type "{kind}", see help for supported values')
        p = parse_params(flag, value, _VOLUME_IMPORT_PARAMS[kind])
        if not p.get("size") and kind not in _SIZE_OPTIONAL:
            raise _flag_error(flag, "size must be specified")
        spec = _data_volume_spec(flag, kind, p)
        vol_name = p.get("name") or f"imported-volume-{rand_suffix()}"
        spec["storage"] = {"resources": {"requests": {"storage": p["size"]}} if p.get("size") else {}}
        b.add_volume(flag, {"name": vol_name, "dataVolume": {"name": vol_name}})
        vm["spec"].setdefault("dataVolumeTemplates", []).append(
            {"metadata": {"creationTimestamp": None, "name": vol_name}, "spec": spec})
        b.boot_order(flag, vol_name, p.get("bootorder"))
    if args.volume_sysprep:
        p = parse_params("volume-sysprep", args.volume_sysprep, {"src", "type"})
        if not p.get("src"):
            raise _flag_error("volume-sysprep", "src must be specified")
        kind = (p.get("type") or "configmap").lower()
        if kind not in ("configmap", "secret"):
            raise _flag_error("volume-sysprep", f'invalid sysprep source type "{kind}", supported values are: '
                                                "configmap, secret")
        source = {"configMap" if kind == "configmap" else "secret": {"name": p["src"]}}
        b.add_volume("volume-sysprep", {"name": "sysprepdisk", "sysprep": source})
    _cloud_init(args, b)
    _infer(args, b)
    return vm


def _cloud_init(args: argparse.Namespace, b: _VMBuilder) -> None:
    changed = any((args.user, args.password_file, args.ssh_key, args.ga_manage_ssh, args.cloud_init_set,
                   args.cloud_init_user_data, args.cloud_init_network_data))
    if not changed:
        return
    kind = args.cloud_init.lower()
    if kind == "none":
        return
    if kind not in ("nocloud", "configdrive"):
        raise _flag_error("cloud-init", f'invalid cloud-init data source type "{args.cloud_init}", supported '
                                        "values are: nocloud, configdrive, none")
    if any(v["name"] == "cloudinitdisk" for v in b.volumes):
        raise CLIError('there is already a volume with name "cloudinitdisk"')
    source: JSON = {}
    if args.cloud_init_network_data:
        source["networkDataBase64"] = args.cloud_init_network_data
    if args.cloud_init_user_data:
        try:
            base64.b64decode(args.cloud_init_user_data, validate=True)
        except ValueError as exc:
            raise _flag_error("cloud-init-user-data", "the value must be base64 encoded") from exc
        source["userDataBase64"] = args.cloud_init_user_data
    else:
        config = "#cloud-config"
        if args.user:
            config += f"\nuser: {args.user}"
        if args.password_file:
            try:
                password = Path(args.password_file).read_text().strip()
            except OSError as exc:
                raise _flag_error("password-file", str(exc)) from exc
            print("WARNING: --password-file: The password is stored in cleartext in the VM definition!",
                  file=sys.stderr)
            if password:
                config += f"\npassword: {password}\nchpasswd: {{ expire: False }}"
        if args.ssh_key:
            config += "\nssh_authorized_keys:" + "".join(f"\n  - {k}" for k in args.ssh_key)
        if args.ga_manage_ssh:
            config += "\nruncmd:\n  - [ setsebool, -P, 'virt_qemu_ga_manage_ssh', 'on' ]"
        if config == "#cloud-config" and not args.cloud_init_set and not args.cloud_init_network_data:
            return  # only the header: nothing worth a disk
        source["userData"] = config
    b.append_volume({"name": "cloudinitdisk",
                      ("cloudInitNoCloud" if kind == "nocloud" else "cloudInitConfigDrive"): source})


def _inferable(b: _VMBuilder, volume_name: str) -> str | None:
    """Why `volume_name` cannot carry instancetype/preference annotations (None when it can)."""
    vol = next((v for v in b.volumes if v["name"] == volume_name), None)
    if vol is None:
        return f'there is no volume with name "{volume_name}"'
    if "persistentVolumeClaim" in vol:
        return None
    if "dataVolume" in vol:
        for dvt in b.vm["spec"].get("dataVolumeTemplates", []):
            if dvt["metadata"]["name"] == volume_name:
                src = dvt["spec"].get("source") or {}
                if src.keys() & {"pvc", "registry", "snapshot"} or "sourceRef" in dvt["spec"]:
                    return None
                return ("this datavolume is not valid to infer an instancetype or preference from (source needs "
                        "to be PVC, Registry or Snapshot, sourceRef needs to be DataSource)")
        return None
    return "inference of instancetype or preference works only with datasources, datavolumes or pvcs"


def _infer(args: argparse.Namespace, b: _VMBuilder) -> None:
    def first_boot_volume() -> str | None:
        if b.boot_orders:
            return b.boot_orders[min(b.boot_orders)]
        return b.volumes[0]["name"] if b.volumes else None

    for what, explicit, source, skip in (
        ("instancetype", args.infer_instancetype_set or bool(args.infer_instancetype_from),
         args.infer_instancetype_from, bool(args.instancetype) or args.memory_set),
        ("preference", args.infer_preference_set or bool(args.infer_preference_from),
         args.infer_preference_from, bool(args.preference)),
    ):
        enabled = args.infer_instancetype if what == "instancetype" else args.infer_preference
        if skip or not (enabled or source):
            continue
        volume = source or first_boot_volume()
        problem = "at least one volume is needed to infer an instance type or preference" if volume is None \
            else _inferable(b, volume)
        if problem is not None:
            if explicit:
                raise CLIError(problem)
            continue  # implicit inference is best effort, as in KubeVirt
        matcher: JSON = {"inferFromVolume": volume}
        if not explicit:
            # Implicit: the server ignores a failed inference and the guest memory stays as a fallback.
            matcher["inferFromVolumeFailurePolicy"] = "Ignore"
        elif what == "instancetype":
            b.template_spec["domain"].pop("memory", None)
        b.vm["spec"][what] = matcher


class _Dumper(yaml.SafeDumper):
    """YAML like sigs.k8s.io/yaml: sorted keys, block style, multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=1 << 30)


async def cmd_create(args: argparse.Namespace, ctx: Context | None) -> int:
    vm = build_vm(args, namespace=ctx.namespace if ctx is not None and ctx.namespace_overridden else None)
    sys.stdout.write(to_yaml(vm))
    return 0


# ----------------------------------------------------------------------------------------------- parser


_TRUE = ("true", "t", "1", "yes")
_FALSE = ("false", "f", "0", "no")


def _bool_flag(p: argparse.ArgumentParser, *names: str, dest: str, default: bool = False, help: str = "") -> None:
    """A Go pflag boolean: `--flag` sets it, `--flag=true|false` too (see `normalize_bool_flags`), and unlike
    an optional-value argparse flag it never swallows the next word (`scp -r ./dir vm/x:/tmp`)."""
    action = p.add_argument(*names, dest=dest, action="store_const", const=True, default=default, help=help)
    action.vp_bool = True  # type: ignore[attr-defined]
    for name in names:
        if name.startswith("--"):
            p.add_argument(f"--no-{name[2:]}", dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)


def _bool_flag_names(parser: argparse.ArgumentParser) -> set[str]:
    names: set[str] = set()
    for action in parser._actions:
        if getattr(action, "vp_bool", False):
            names.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _bool_flag_names(sub)
    return names


def normalize_bool_flags(argv: Sequence[str], names: set[str]) -> list[str]:
    """`--flag=true` → `--flag`, `--flag=false` → `--no-flag` for boolean flags; other words unchanged."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word == "--":
            out += argv[i:]
            break
        name, sep, value = word.partition("=")
        if sep and name in names:
            if value.lower() in _TRUE:
                word = name
            elif value.lower() in _FALSE:
                word = f"--no-{name[2:]}"
        out.append(word)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"Error: {message}\n")


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--kubeconfig", help="path to the kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="the kubeconfig context to use")
    common.add_argument("-n", "--namespace", help="namespace (default: the context's namespace)")
    return common


def _ssh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--identity-file", dest="identity_file", default=None,
                   help="private key for authenticating to the guest (default: ssh's own)")
    p.add_argument("-l", "--username", default=None, help="user to log in as (overridden by user@ in the target)")
    p.add_argument("-p", "--port", type=int, default=22, help="the guest's SSH port (default 22)")
    p.add_argument("--known-hosts", dest="known_hosts", default=None, help="known_hosts file to use")
    p.add_argument("-t", "--local-ssh-opts", dest="local_ssh_opts", action="append", default=[],
                   help='extra options for the local ssh/scp, e.g. -t "-o StrictHostKeyChecking=no"')
    _bool_flag(p, "--local-ssh", dest="local_ssh", default=True,
               help="use the system ssh/scp through a port-forward ProxyCommand (the only client here)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="virtctl", description="KubeVirt's virtctl for virtplane.", parents=[common])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, help: str, handler: Callable[..., Awaitable[int]], needs_cluster: bool = True,
             ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(handler=handler, needs_cluster=needs_cluster)
        return p

    p = verb("start", "start a virtual machine", cmd_start)
    p.add_argument("name", metavar="VM")
    _bool_flag(p, "--paused", dest="paused", help="start the VM paused")
    _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")

    for name, handler in (("stop", cmd_stop), ("restart", cmd_restart)):
        p = verb(name, f"{name} a virtual machine", handler)
        p.add_argument("name", metavar="VM")
        _bool_flag(p, "--force", dest="force", help="with --grace-period: stop without waiting (0 = kill)")
        p.add_argument("--grace-period", dest="grace_period", type=int, default=None,
                       help="seconds the guest gets to shut down (needs --force)")
        _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")

    for name in ("pause", "unpause"):
        p = verb(name, f"{name} a virtual machine (vm NAME) or instance (vmi NAME)", cmd_pause)
        p.add_argument("kind", metavar="vm|vmi")
        p.add_argument("name", metavar="NAME")
        _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")

    for name, help_ in (("soft-reboot", "reboot the guest OS (guest agent or ACPI)"),
                        ("reset", "hard-reset a virtual machine instance")):
        p = verb(name, help_, cmd_vmi_action)
        p.add_argument("name", metavar="VMI")

    p = verb("migrate", "live-migrate a virtual machine (creates a VirtualMachineInstanceMigration)", cmd_migrate)
    p.add_argument("name", metavar="VM")
    p.add_argument("--addedNodeSelector", dest="added_node_selector", action="append", default=[],
                   help="key=value[,key2=value2]: extra node selector for this migration")
    _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")
    p = verb("migrate-cancel", "cancel a virtual machine's active migration", cmd_migrate_cancel)
    p.add_argument("name", metavar="VM")
    _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")

    p = verb("console", "connect to the serial console of a virtual machine instance (escape: Ctrl+])",
             cmd_console)
    p.add_argument("name", metavar="VMI")
    p.add_argument("--timeout", type=int, default=5, help="minutes to wait for the VMI to be running (default 5)")
    _bool_flag(p, "--log", dest="log", help="print the console log instead of connecting (virtplane)")
    p.add_argument("--tail", type=int, default=None, help="with --log: only the last N lines")
    _bool_flag(p, "-f", "--follow", dest="follow", help="with --log: keep printing new output")

    p = verb("vnc", "open a VNC connection (vnc VMI) or take a screenshot (vnc screenshot VMI -f FILE)", cmd_vnc)
    p.add_argument("words", nargs="+", metavar="[screenshot] VMI")
    _bool_flag(p, "--proxy-only", dest="proxy_only", help='only run the local proxy and print {"port": N}')
    p.add_argument("--port", type=int, default=0, help="local port for the proxy (default: a free one)")
    p.add_argument("-f", "--file", default=None, help="screenshot: where to store the PNG (- for stdout)")
    _bool_flag(p, "-m", "--move-cursor", dest="move_cursor", help="screenshot: move the cursor to wake the screen")

    p = verb("ssh", "open an SSH connection to a virtual machine: [user@]vm/NAME[/NAMESPACE]", cmd_ssh)
    p.add_argument("target", metavar="[user@]TYPE/NAME[/NAMESPACE]")
    _ssh_flags(p)
    p.add_argument("-c", "--command", default=None, help="command to run in the guest")

    p = verb("scp", "copy files to/from a virtual machine: [user@]vm/NAME[/NAMESPACE]:PATH", cmd_scp)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("destination", metavar="DESTINATION")
    _ssh_flags(p)
    _bool_flag(p, "-r", "--recursive", dest="recursive", help="copy directories recursively")
    _bool_flag(p, "--preserve", dest="preserve", help="preserve times and modes")

    p = verb("port-forward", "forward local ports to a VM/VMI: TYPE/NAME[/NAMESPACE] [proto/]LOCAL[:REMOTE]...",
             cmd_port_forward)
    p.add_argument("target", metavar="TYPE/NAME[/NAMESPACE]")
    p.add_argument("ports", nargs="+", metavar="[protocol/]localPort[:targetPort]")
    _bool_flag(p, "--stdio", dest="stdio", help="forward one port over stdin/stdout (ssh's ProxyCommand)")
    p.add_argument("--address", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)")

    p = verb("expose", "expose a vm, vmi or vmirs as a new Service", cmd_expose)
    p.add_argument("kind", metavar="TYPE")
    p.add_argument("resource", metavar="NAME")
    p.add_argument("--name", dest="service_name", required=True, help="name of the new Service")
    p.add_argument("--port", type=int, required=True, help="the port the Service serves on")
    p.add_argument("--target-port", dest="target_port", default="", help="name or number of the VM's port")
    p.add_argument("--type", default="ClusterIP", help="ClusterIP (default), NodePort or LoadBalancer")
    p.add_argument("--protocol", default="TCP", help="TCP (default) or UDP")
    p.add_argument("--node-port", dest="node_port", type=int, default=0, help="the node port (NodePort)")
    p.add_argument("--port-name", dest="port_name", default="", help="name of the Service port")
    p.add_argument("--cluster-ip", dest="cluster_ip", default="", help="cluster IP (None: headless)")
    p.add_argument("--external-ip", dest="external_ip", default="", help="an additional external IP")
    p.add_argument("--load-balancer-ip", dest="load_balancer_ip", default="", help="the load balancer IP")

    for name, help_ in (("guestosinfo", "the guest OS information (guest agent)"),
                        ("userlist", "the users logged in to the guest (guest agent)"),
                        ("fslist", "the guest's file systems (guest agent)")):
        p = verb(name, help_, cmd_guest_query)
        p.add_argument("name", metavar="VMI")

    verb("version", "client and server versions", cmd_version)

    create = verb("create", "print a manifest (create vm ...)", cmd_create, needs_cluster=False)
    create_sub = create.add_subparsers(dest="what", required=True, metavar="RESOURCE", parser_class=_Parser)
    p = create_sub.add_parser("vm", help="a VirtualMachine manifest, printed as YAML", parents=[common])
    p.add_argument("--name", dest="vm_name", default="", help="name of the VM (default vm-<random>)")
    p.add_argument("--run-strategy", dest="run_strategy", default="Always", help="RunStrategy (default Always)")
    p.add_argument("--termination-grace-period", dest="termination_grace_period", type=int, default=180)
    p.add_argument("--memory", default=None, help="guest memory (default 512Mi; not with an instance type)")
    p.add_argument("--instancetype", default="", help="[virtualmachineinstancetype/]NAME")
    _bool_flag(p, "--infer-instancetype", dest="infer_instancetype", default=True,
               help="infer the instance type from the boot volume (default true)")
    p.add_argument("--infer-instancetype-from", dest="infer_instancetype_from", default="")
    p.add_argument("--preference", default="", help="[virtualmachinepreference/]NAME")
    _bool_flag(p, "--infer-preference", dest="infer_preference", default=True,
               help="infer the preference from the boot volume (default true)")
    p.add_argument("--infer-preference-from", dest="infer_preference_from", default="")
    p.add_argument("--volume-containerdisk", dest="volume_containerdisk", action="append", default=[],
                   help="src:IMAGE[,name:N][,bootorder:N]")
    p.add_argument("--volume-pvc", dest="volume_pvc", action="append", default=[],
                   help="src:PVC[,name:N][,bootorder:N]")
    p.add_argument("--volume-import", dest="volume_import", action="append", default=[],
                   help="type:(blank|gcs|http|imageio|pvc|registry|s3|vddk|snapshot|ds),... (a DataVolume)")
    p.add_argument("--volume-sysprep", dest="volume_sysprep", default="", help="src:NAME[,type:configmap|secret]")
    p.add_argument("--volume-datasource", dest="volume_datasource", action="append", default=[],
                   help=argparse.SUPPRESS)
    p.add_argument("--volume-clone-pvc", dest="volume_clone_pvc", action="append", default=[],
                   help=argparse.SUPPRESS)
    p.add_argument("--volume-blank", dest="volume_blank", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--user", default="", help="cloud-init: the default user")
    p.add_argument("--password-file", dest="password_file", default="", help="cloud-init: file with the password")
    p.add_argument("--ssh-key", dest="ssh_key", action="append", default=[], help="cloud-init: authorized key")
    _bool_flag(p, "--ga-manage-ssh", dest="ga_manage_ssh", help="cloud-init: let the guest agent manage keys")
    p.add_argument("--cloud-init", dest="cloud_init", default=None, help="nocloud (default), configdrive or none")
    p.add_argument("--cloud-init-user-data", dest="cloud_init_user_data", default="",
                   help="base64-encoded cloud-init user data")
    p.add_argument("--cloud-init-network-data", dest="cloud_init_network_data", default="",
                   help="base64-encoded cloud-init network data")
    p.add_argument("--access-cred", dest="access_cred", action="append", default=[], help=argparse.SUPPRESS)

    p = verb("image-upload", "upload a VM image into a DataVolume (dv NAME) or PVC (pvc NAME)", cmd_image_upload)
    p.add_argument("target", metavar="dv|pvc")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--image-path", dest="image_path", default="", help="the local image (qcow2, raw, ...; gz/xz)")
    p.add_argument("--size", default="", help="size of the volume to create, e.g. 1Gi")
    p.add_argument("--storage-class", dest="storage_class", default="", help="StorageClass of the new volume")
    p.add_argument("--access-mode", dest="access_mode", default="",
                   help="ReadWriteOnce, ReadWriteMany, ... (default: the StorageProfile's)")
    p.add_argument("--volume-mode", dest="volume_mode", default="",
                   help="block or filesystem (default: the StorageProfile's)")
    p.add_argument("--uploadproxy-url", dest="uploadproxy_url", default="",
                   help="the upload proxy (default: the API server, which serves CDI's upload endpoints)")
    p.add_argument("--wait-secs", dest="wait_secs", type=int, default=300,
                   help="seconds to wait for the volume to be ready for the upload, and to finish (default 300)")
    _bool_flag(p, "--insecure", dest="insecure", help="do not verify the upload proxy's TLS certificate")
    _bool_flag(p, "--no-create", dest="no_create", help="the volume must exist already")
    _bool_flag(p, "--force-bind", dest="force_bind", help="bind a WaitForFirstConsumer volume right away")
    from virtplane.cli import import_vm  # here: import_vm imports this module
    import_vm.add_parser(verb)
    p = verb("addvolume", "hot-plug a DataVolume or PVC into a running VMI (--persist: into the VM too)",
             cmd_addvolume)
    p.add_argument("name", metavar="VMI")
    p.add_argument("--volume-name", dest="volume_name", required=True, help="the DataVolume or PVC to add")
    p.add_argument("--serial", default="", help="the disk's serial number, as the guest sees it")
    p.add_argument("--bus", default="scsi", help="scsi (default) or virtio")
    p.add_argument("--disk-type", dest="disk_type", default="disk", help="disk (default) or lun")
    p.add_argument("--cache", default="", help="none, writethrough or writeback")
    _bool_flag(p, "--persist", dest="persist", help="also add the volume to the VM's spec (survives restarts)")
    _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")
    p = verb("removevolume", "hot-unplug a volume from a running VMI (--persist: from the VM too)", cmd_removevolume)
    p.add_argument("name", metavar="VMI")
    p.add_argument("--volume-name", dest="volume_name", required=True, help="the volume to remove")
    _bool_flag(p, "--persist", dest="persist", help="also remove the volume from the VM's spec")
    _bool_flag(p, "--dry-run", dest="dry_run", help="validate only, change nothing")
    p = verb("addinterface", "hot-plug a NIC (bridge binding on a NetworkAttachmentDefinition) into a VM",
             cmd_addinterface)
    p.add_argument("name", metavar="VM")
    p.add_argument("--network-attachment-definition-name", dest="network_attachment_definition_name",
                   required=True, help="the NetworkAttachmentDefinition ([namespace/]name) the NIC joins")
    p.add_argument("--name", dest="iface_name", required=True, help="the interface's (and network's) name")
    p.add_argument("--model", default="", help="the NIC model (default virtio)")
    p.add_argument("--mac-address", dest="mac_address", default="", help="the NIC's MAC address")
    p = verb("removeinterface", "hot-unplug a NIC from a VM (marks it state: absent)", cmd_removeinterface)
    p.add_argument("name", metavar="VM")
    p.add_argument("--name", dest="iface_name", required=True, help="the interface to unplug")
    return parser


def _finish_create_args(args: argparse.Namespace) -> None:
    """Which flags were given (KubeVirt distinguishes a default from an explicit value)."""
    args.memory_set = args.memory is not None
    if args.memory is None:
        args.memory = "512Mi"
    args.cloud_init_set = args.cloud_init is not None
    if args.cloud_init is None:
        args.cloud_init = "nocloud"
    args.infer_instancetype_set = bool({"--infer-instancetype", "--no-infer-instancetype"} & set(args.raw_argv))
    args.infer_preference_set = bool({"--infer-preference", "--no-infer-preference"} & set(args.raw_argv))
    if args.access_cred:
        raise CLIError("--access-cred is not supported yet by virtplane's virtctl")


async def _run(args: argparse.Namespace) -> int:
    ctx: Context | None = None
    if args.needs_cluster or (args.verb == "create" and getattr(args, "namespace", None)):
        ctx = load_context(args) if args.needs_cluster else Context(
            rest.ClientConfig(server=""), args.namespace, True, None, None)
    return await args.handler(args, ctx)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line (exits 2 with usage on bad usage, like any CLI)."""
    parser = build_parser()
    raw = normalize_bool_flags(argv, _bool_flag_names(parser))
    args = parser.parse_args(raw)
    args.raw_argv = raw
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.verb == "create":
            _finish_create_args(args)
        if args.verb == "image-upload":
            _check_upload_args(args)  # bad usage is reported before any kubeconfig is read
        if args.verb == "import-vm":
            from virtplane.cli import import_vm
            import_vm.check_args(args)
        return asyncio.run(_run(args))
    except CLIError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return exc.code
    except rest.APIError as exc:
        print(f"Error: {api_message(exc)}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError) as exc:
        print(f"Error: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback (unless asked for)
        if os.environ.get("VIRTCTL_DEBUG"):
            traceback.print_exc()
        print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
