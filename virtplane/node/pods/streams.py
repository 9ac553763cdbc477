"""The node agent's pod streams, which the API server proxies `pods/log` and `pods/exec` to (the kubelet's
/containerLogs and /exec):

    GET /v1/namespaces/{ns}/pods/{name}/log?container=&follow=&previous=&tailLines=&timestamps=&sinceSeconds=
    GET /v1/namespaces/{ns}/pods/{name}/exec?command=...&container=&stdin=&stdout=&stderr=&tty=   (websocket)
    GET /v1/namespaces/{ns}/pods/{name}/portforward   (websocket tunnelling SPDY/3.1, see portforward.py)

Logs are the shim's CRI files (one per run of a container: `logs/<restartCount>.log`). Exec speaks the
Kubernetes remotecommand websocket protocol (`v5.channel.k8s.io`, also v4): binary frames whose first byte is
the channel — 0 stdin, 1 stdout, 2 stderr, 3 error/status (a metav1.Status as JSON when the command ends),
4 terminal resize (`{"Width":..,"Height":..}`), 255 close (v5: the client closed its stdin). The command runs
through `runc exec` in the container (with a TTY: runc proxies its own pty, which is ours, to the container's).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import os
import signal
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from . import portforward
from .controller import PodController
from .runtime import Sandbox, read_state

JSON = dict[str, Any]
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
FOLLOW_POLL = 0.25


class StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_pod_routes(app: web.Application, controller: PodController,
                   authorize: Callable[[web.Request], Awaitable[None]]) -> None:  # fmt: skip
    streams = PodStreams(controller, authorize)
    app.router.add_get("/v1/namespaces/{namespace}/pods/{name}/log", streams.log)
    app.router.add_get("/v1/namespaces/{namespace}/pods/{name}/exec", streams.exec)
    app.router.add_get("/v1/namespaces/{namespace}/pods/{name}/portforward", streams.portforward)


def _status(code: int, message: str, reason: str = "") -> JSON:
    reasons = {400: "BadRequest", 404: "NotFound", 409: "Conflict", 401: "Unauthorized"}
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason or reasons.get(code, "InternalError"), "code": code}  # fmt: skip


def _bool(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


class PodStreams:
    def __init__(self, controller: PodController, authorize: Callable[[web.Request], Awaitable[None]]) -> None:
        self.controller = controller
        self.authorize = authorize

    def _locate(self, request: web.Request) -> tuple[JSON, Sandbox, str]:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        pod = self.controller.pods.get(ns, name)
        sb = self.controller.sandbox_for(ns, name)
        if pod is None or sb is None or sb.uid != pod["metadata"].get("uid"):
            raise StreamError(404, f'pods "{name}" not found on node {self.controller.node_name}')
        spec = pod.get("spec") or {}
        names = [c["name"] for c in spec.get("containers") or []]
        all_names = names + [c["name"] for key in ("initContainers", "ephemeralContainers")
                             for c in spec.get(key) or []]  # fmt: skip
        container = request.query.get("container", "")
        if not container:
            if len(names) != 1:
                raise StreamError(400, f"a container name must be specified for pod {name}, choose one of: "
                                       f"[{' '.join(names)}]")  # fmt: skip
            container = names[0]
        if container not in all_names:
            raise StreamError(400, f"container {container} is not valid for pod {name}")
        return pod, sb, container

    # -- logs ---------------------------------------------------------------------------------------------
    async def log(self, request: web.Request) -> web.StreamResponse:
        await self.authorize(request)
        try:
            _pod, sb, container = self._locate(request)
            path = self._log_file(sb, container, previous=_bool(request, "previous"))
        except StreamError as err:
            return web.json_response(_status(err.code, err.message), status=err.code)
        tail = request.query.get("tailLines")
        since = request.query.get("sinceSeconds")
        cutoff = ""
        if since and since.isdigit():
            t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(since))
            cutoff = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        limit = int(request.query["limitBytes"]) if request.query.get("limitBytes", "").isdigit() else None
        timestamps = _bool(request, "timestamps")
        follow = _bool(request, "follow") and not _bool(request, "previous")
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/plain"
        resp.charset = "utf-8"
        await resp.prepare(request)
        sent = 0
        async for line in self._lines(sb, container, path, follow=follow,
                                      tail=int(tail) if tail and tail.lstrip("-").isdigit() else None):  # fmt: skip
            ts, _stream, tag, msg = line
            if cutoff and ts < cutoff:
                continue
            out = (f"{ts} " if timestamps else "").encode() + msg + (b"\n" if tag == b"F" else b"")
            if limit is not None:
                out = out[: max(0, limit - sent)]
            await resp.write(out)
            sent += len(out)
            if limit is not None and sent >= limit:
                break
        await resp.write_eof()
        return resp

    @staticmethod
    def _log_file(sb: Sandbox, container: str, *, previous: bool) -> Path:
        runs = sorted(int(p.stem) for p in (sb.cdir(container) / "logs").glob("*.log") if p.stem.isdigit())
        if previous:
            if len(runs) < 2:
                raise StreamError(400, f'previous terminated container "{container}" in pod "{sb.name}" not found')
            return sb.log_path(container, runs[-2])
        if not runs:
            raise StreamError(400, f'container "{container}" in pod "{sb.name}" is waiting to start')
        return sb.log_path(container, runs[-1])

    async def _lines(self, sb: Sandbox, container: str, path: Path, *, follow: bool,
                     tail: int | None) -> AsyncIterator[tuple[str, bytes, bytes, bytes]]:  # fmt: skip
        def parse(raw: bytes) -> tuple[str, bytes, bytes, bytes] | None:
            parts = raw.rstrip(b"\n").split(b" ", 3)
            if len(parts) < 3:
                return None
            return parts[0].decode(), parts[1], parts[2], parts[3] if len(parts) > 3 else b""

        with open(path, "rb") as f:  # noqa: ASYNC230 - a local log file, read in small steps
            lines = f.readlines()
            if tail is not None and tail >= 0:
                lines = lines[len(lines) - tail:] if tail else []
            pending = b""
            for raw in lines:
                if not raw.endswith(b"\n"):
                    pending = raw
                    continue
                item = parse(raw)
                if item:
                    yield item
            if not follow:
                return
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        item = parse(pending)
                        pending = b""
                        if item:
                            yield item
                    continue
                # The run this file belongs to is over (exited, or the container was restarted into a new
                # file, or the pod is gone): the stream ends, as `kubectl logs -f` does at container exit.
                current = self.controller.sandbox_for(sb.namespace, sb.name)
                live = read_state(sb, container).state in ("running", "starting")
                if current is None or current.uid != sb.uid or not live or self._newest(sb, container) != path:
                    rest = f.read()
                    for raw in (pending + rest).splitlines(keepends=True):
                        item = parse(raw)
                        if item:
                            yield item
                    return
                await asyncio.sleep(FOLLOW_POLL)

    @staticmethod
    def _newest(sb: Sandbox, container: str) -> Path | None:
        runs = sorted(int(p.stem) for p in (sb.cdir(container) / "logs").glob("*.log") if p.stem.isdigit())
        return sb.log_path(container, runs[-1]) if runs else None

    # -- exec ---------------------------------------------------------------------------------------------
    async def exec(self, request: web.Request) -> web.StreamResponse:
        await self.authorize(request)
        try:
            _pod, sb, container = self._locate(request)
            if read_state(sb, container).state != "running":
                raise StreamError(400, f"container {container} is not running")  # kubelet's wording
        except StreamError as err:
            return web.json_response(_status(err.code, err.message), status=err.code)
        command = request.query.getall("command", [])
        if not command:
            return web.json_response(_status(400, "you must specify at least 1 command"), status=400)
        tty = _bool(request, "tty")
        want_stdin = _bool(request, "stdin")
        ws = web.WebSocketResponse(protocols=EXEC_PROTOCOLS, heartbeat=10.0)
        if not ws.can_prepare(request).ok:
            return web.json_response(_status(400, "exec needs a websocket (v5.channel.k8s.io)"), status=400)
        await ws.prepare(request)
        v5 = ws.ws_protocol == "v5.channel.k8s.io"
        try:
            try:
                code: int | None = await (self._exec_tty(ws, sb, container, command, want_stdin) if tty else
                                          self._exec_pipes(ws, sb, container, command, want_stdin, v5))  # fmt: skip
                start_error = ""
            except OSError as err:
                code, start_error = None, str(err)
            if code is None:
                status: JSON = _status(500, f"the command could not be started: {start_error}", "InternalError")
            elif code == 0:
                status = {"metadata": {}, "status": "Success"}
            else:
                status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                          "message": f"command terminated with non-zero exit code: exit status {code}",
                          "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}  # fmt: skip
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(bytes([ERROR]) + json.dumps(status).encode())
        finally:
            await ws.close()
        return ws

    # -- port-forward -------------------------------------------------------------------------------------
    async def portforward(self, request: web.Request) -> web.StreamResponse:
        await self.authorize(request)
        ns, name = request.match_info["namespace"], request.match_info["name"]
        pod = self.controller.pods.get(ns, name)
        sb = self.controller.sandbox_for(ns, name)
        if pod is None or sb is None or sb.uid != pod["metadata"].get("uid"):
            return web.json_response(_status(404, f'pods "{name}" not found on node {self.controller.node_name}'),
                                     status=404)  # fmt: skip
        if (pod.get("status") or {}).get("phase") != "Running":
            return web.json_response(_status(400, f"pod {name} is not running"), status=400)
        ws = web.WebSocketResponse(protocols=(portforward.WS_PROTOCOL,), heartbeat=10.0)
        if not ws.can_prepare(request).ok:
            return web.json_response(_status(400, f"port-forward needs a websocket ({portforward.WS_PROTOCOL})"),
                                     status=400)  # fmt: skip
        await ws.prepare(request)
        try:
            await portforward.serve_websocket(ws, sb.netns)
        finally:
            await ws.close()
        return ws

    async def _exec_pipes(self, ws: web.WebSocketResponse, sb: Sandbox, container: str, command: list[str],
                          want_stdin: bool, v5: bool) -> int | None:  # fmt: skip
        argv = await self.controller.runtime.exec_argv(sb, container, command, tty=False)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None

        async def pump(stream: asyncio.StreamReader, channel: int) -> None:
            while chunk := await stream.read(32768):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(bytes([channel]) + chunk)

        async def feed() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                ch, data = msg.data[0], msg.data[1:]
                if ch == STDIN and proc.stdin is not None:
                    proc.stdin.write(data)
                    with contextlib.suppress(ConnectionError):
                        await proc.stdin.drain()
                elif ch == CLOSE and data[:1] == bytes([STDIN]) and proc.stdin is not None:
                    proc.stdin.close()
            # the client went away: nobody will read the output any more
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        feeder = asyncio.ensure_future(feed())
        try:
            await asyncio.gather(pump(proc.stdout, STDOUT), pump(proc.stderr, STDERR))
            return await proc.wait()
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _exec_tty(self, ws: web.WebSocketResponse, sb: Sandbox, container: str, command: list[str],
                        want_stdin: bool) -> int | None:  # fmt: skip
        """`runc exec --tty` (not detached) proxies between the container's pty and its own stdio, so its stdio is
        a pty of ours: we read and write the master. Resizes set our pty's size and send runc SIGWINCH, which
        makes it copy the size to the container's terminal."""
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        argv = await self.controller.runtime.exec_argv(sb, container, command, tty=True)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave,
                                                        start_new_session=True)  # fmt: skip
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        out_q: asyncio.Queue[bytes | None] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 32768)
            except BlockingIOError:
                return
            except OSError:  # EIO: every slave end is closed (runc exited)
                data = b""
            if not data:
                loop.remove_reader(master)
            out_q.put_nowait(data or None)

        loop.add_reader(master, readable)

        async def pump() -> None:
            while (data := await out_q.get()) is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(bytes([STDOUT]) + data)

        async def feed() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                ch, data = msg.data[0], msg.data[1:]
                if ch == STDIN and want_stdin:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.write(master, data)
                elif ch == RESIZE:
                    with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                        size = json.loads(data)
                        fcntl.ioctl(master, termios.TIOCSWINSZ,
                                    struct.pack("HHHH", int(size["Height"]), int(size["Width"]), 0, 0))
                        if proc.returncode is None:
                            os.kill(proc.pid, signal.SIGWINCH)
            if proc.returncode is None:  # the client left: end the command
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        pumper = asyncio.ensure_future(pump())
        feeder = asyncio.ensure_future(feed())
        try:
            code = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pumper), 2)
            return code
        finally:
            for t in (pumper, feeder):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(master)
            os.close(master)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


