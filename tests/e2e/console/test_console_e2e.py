"""Consoles end to end: virtctl (a real subprocess) → API server → node console routes → real QEMU.

One guest for the whole module (see conftest.py); tests share it and leave its serial console at a shell
prompt.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import struct
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pexpect
import pytest

from tests.e2e.console.conftest import HOSTNAME, HTTP_PAGE, NAMESPACE, REPO, VMI_NAME, Stack
from virtplane.console.rfb import png_size

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

KERNEL = re.compile(rb"6\.\d+\.\d+-\d+-cloud-amd64")
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")


async def expect(child: pexpect.spawn, pattern: Any, timeout: float = 60) -> int:  # noqa: ASYNC109
    return await asyncio.to_thread(child.expect, pattern, timeout=timeout)


def spawn_console(stack: Stack) -> pexpect.spawn:
    argv = stack.virtctl_argv("console", VMI_NAME)
    return pexpect.spawn(argv[0], argv[1:], cwd=str(REPO), timeout=60, dimensions=(40, 160))


async def shell_prompt(child: pexpect.spawn) -> None:
    """From wherever the serial console is (login prompt or shell), to a root shell prompt."""
    await expect(child, rb"Successfully connected to cons console")
    child.send(b"\r")
    if await expect(child, [rb"login: ", PROMPT]) == 0:
        child.send(b"root\r")
        await expect(child, PROMPT)


async def test_console_login_two_viewers_and_escape(stack: Stack) -> None:
    a = spawn_console(stack)
    await shell_prompt(a)
    b = spawn_console(stack)
    await expect(b, rb"Successfully connected to cons console")
    a.send(b"uname -r; echo done-$((40+2))\r")
    for viewer in (a, b):  # both see the command's output
        await expect(viewer, KERNEL)
        await expect(viewer, rb"done-42")
    b.send(b"echo typed-by-$((100+1))\r")  # and both may type
    await expect(a, rb"typed-by-101")
    await expect(b, rb"typed-by-101")

    a.sendcontrol("]")  # Ctrl+]: a leaves cleanly, b stays connected
    await expect(a, pexpect.EOF, timeout=15)
    a.wait()
    assert a.exitstatus == 0, a.before
    b.send(b"echo still-$((6*7))\r")
    await expect(b, rb"still-42")
    b.sendcontrol("]")
    await expect(b, pexpect.EOF, timeout=15)
    b.wait()
    assert b.exitstatus == 0


async def test_new_viewer_sees_replayed_prompt(stack: Stack) -> None:
    c = spawn_console(stack)
    await expect(c, rb"Successfully connected")
    # Without typing anything: the last output (the shell prompt of the test before) is replayed.
    await expect(c, PROMPT, timeout=10)
    c.sendcontrol("]")
    await expect(c, pexpect.EOF, timeout=15)


async def test_idle_console_survives_60s(stack: Stack) -> None:
    child = spawn_console(stack)
    await shell_prompt(child)
    await asyncio.sleep(62)  # idle: KubeVirt's consoles drop after ~21 s; pings keep ours
    child.send(b"echo alive-after-idle-$((7*6))\r")
    await expect(child, rb"alive-after-idle-42", timeout=30)
    child.sendcontrol("]")
    await expect(child, pexpect.EOF, timeout=15)


async def test_console_log(stack: Stack) -> None:
    full = await stack.virtctl("console", VMI_NAME, "--log")
    assert full.returncode == 0, full.stderr
    assert "virtplane-guest: booted" in full.stdout
    tail = await stack.virtctl("console", VMI_NAME, "--log", "--tail", "3")
    assert tail.returncode == 0, tail.stderr
    assert len(tail.stdout.splitlines()) <= 3 and "virtplane-guest: booted" not in tail.stdout


class WSBytes:
    """Exact reads from a websocket carrying a byte stream (frames need not align with RFB messages)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buf = b""

    async def read(self, n: int, timeout: float = 30) -> bytes:  # noqa: ASYNC109
        while len(self.buf) < n:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            self.buf += msg.data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def write(self, data: bytes) -> None:
        await self.ws.send_bytes(data)


class TCPBytes:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, n: int, timeout: float = 30) -> bytes:  # noqa: ASYNC109
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


async def rfb_handshake(conn: Any, *, shared: bool) -> tuple[int, int, bytes]:
    """ProtocolVersion, security None, ClientInit, ServerInit: returns (width, height, desktop name); the
    pixel format's bytes per pixel is kept on `conn.bpp` for reading raw rectangles."""
    version = await conn.read(12)
    assert version.startswith(b"RFB 003.")
    await conn.write(b"RFB 003.008\n")
    count = (await conn.read(1))[0]
    types = await conn.read(count)
    assert 1 in types, f"security None not offered: {types!r}"
    await conn.write(b"\x01")
    assert await conn.read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
    await conn.write(b"\x01" if shared else b"\x00")
    head = await conn.read(24)
    width, height = struct.unpack(">HH", head[:4])
    conn.bpp = head[4] // 8
    name = await conn.read(struct.unpack(">I", head[20:24])[0])
    return width, height, name


async def framebuffer_update(conn: Any, width: int, height: int) -> None:
    await conn.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # non-incremental request
    kind = (await conn.read(1))[0]
    assert kind == 0, f"expected FramebufferUpdate (0), got message type {kind}"
    _pad, rects = struct.unpack(">BH", await conn.read(3))
    assert rects >= 1
    for _ in range(rects):  # no SetEncodings sent: Raw rectangles only
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await conn.read(12))
        assert encoding == 0, encoding
        await conn.read(w * h * conn.bpp)


async def test_vnc_websocket_rfb_and_screenshot(stack: Stack, tmp_path: Path) -> None:
    url = f"{stack.api_url}/apis/subresources.kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstances/" \
          f"{VMI_NAME}/vnc"
    headers = {"Authorization": f"Bearer {stack.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        ws1 = await session.ws_connect(url, protocols=("binary",), heartbeat=10)
        assert ws1.protocol == "binary"
        one = WSBytes(ws1)
        width, height, name = await rfb_handshake(one, shared=False)  # asks for exclusive access ...
        assert name.startswith(b"QEMU")
        await framebuffer_update(one, width, height)
        ws2 = await session.ws_connect(url, protocols=("plain.kubevirt.io",), heartbeat=10)
        two = WSBytes(ws2)
        assert (await rfb_handshake(two, shared=False))[:2] == (width, height)
        await framebuffer_update(two, width, height)
        await framebuffer_update(one, width, height)  # ... yet the first viewer was not disconnected
        await ws1.close()
        await ws2.close()

    shot = tmp_path / "screen.png"
    res = await stack.virtctl("vnc", "screenshot", VMI_NAME, "--file", str(shot))
    assert res.returncode == 0, res.stderr
    assert png_size(shot.read_bytes()) == (width, height)


async def test_virtctl_vnc_proxy_only(stack: Stack) -> None:
    argv = stack.virtctl_argv("vnc", VMI_NAME, "--proxy-only")
    proc = await asyncio.to_thread(subprocess.Popen, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=REPO, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        port = json.loads(line)["port"]
        conns = []
        for _ in range(2):  # two viewers through one proxy
            conn = TCPBytes(*await asyncio.open_connection("127.0.0.1", port))
            width, height, _ = await rfb_handshake(conn, shared=False)
            await framebuffer_update(conn, width, height)
            conns.append(conn)
        await framebuffer_update(conns[0], width, height)
        for conn in conns:
            conn.writer.close()
    finally:
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(proc.wait, 15)
    assert rc == 0


def _http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as resp:
        return resp.read().decode()


async def test_port_forward_reaches_guest_http(stack: Stack) -> None:
    for target in (f"vmi/{VMI_NAME}", f"vm/{VMI_NAME}"):
        argv = stack.virtctl_argv("port-forward", target, "0:8080")
        proc = await asyncio.to_thread(subprocess.Popen, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       cwd=REPO, text=True)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
            assert m, line
            port = int(m.group(1))
            bodies = await asyncio.gather(*(asyncio.to_thread(_http_get, port) for _ in range(3)))
            assert all(body.strip() == HTTP_PAGE for body in bodies)
        finally:
            proc.send_signal(signal.SIGINT)
            rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0


SSH_OPTS = ["-t", "-o StrictHostKeyChecking=no", "-t", "-o UserKnownHostsFile=/dev/null", "-t", "-o LogLevel=ERROR"]


async def test_ssh_through_port_forward(stack: Stack) -> None:
    res = await stack.virtctl("ssh", f"root@vmi/{VMI_NAME}", "-i", str(stack.ssh_key), *SSH_OPTS, "-c", "hostname",
                              timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == HOSTNAME
    # scp is covered by argv unit tests only: the tiny guest ships dropbear without scp or sftp-server.


async def test_clear_errors(stack: Stack, tmp_path: Path) -> None:
    await stack.put_object("kubevirt.io", "virtualmachineinstances", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "stopped", "namespace": NAMESPACE},
        "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}},
        "status": {"phase": "Succeeded", "nodeName": "node-cons"},
    })
    cases = [
        (("console", "nosuch"), 'Error: virtualmachineinstances.kubevirt.io "nosuch" not found'),
        (("vnc", "screenshot", "nosuch", "-f", str(tmp_path / "x.png")),
         'Error: virtualmachineinstances.kubevirt.io "nosuch" not found'),
        (("start", "nosuch"), 'Error: virtualmachines.kubevirt.io "nosuch" not found'),
        (("vnc", "screenshot", "stopped", "-f", str(tmp_path / "x.png")), "Error: VMI is not running"),
        (("console", "stopped"), "Error: VMI is not running (phase Succeeded)"),
        (("port-forward", "--stdio=true", "vmi/stopped", "22"), "Error: VMI is not running"),
        (("addvolume", VMI_NAME, "--volume-name=x"),
         f"Error: volume x not found: no DataVolume or PVC of that name in {NAMESPACE}"),
    ]
    for args, message in cases:
        res = await stack.virtctl(*args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stderr.strip() == message, (args, res.stderr)
        assert "Traceback" not in res.stderr


async def test_websocket_refused_without_token(stack: Stack) -> None:
    url = f"{stack.api_url}/apis/subresources.kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstances/" \
          f"{VMI_NAME}/console"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(url, protocols=("plain.kubevirt.io",))
        assert err.value.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {stack.token}"}) as resp:
            assert resp.status == 400  # a plain GET: the upgrade is required
            assert "websocket" in (await resp.json())["message"]


async def test_migrate_creates_and_migrate_cancel_deletes_a_migration(stack: Stack) -> None:
    url = f"{stack.api_url}/apis/kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstancemigrations"

    async def migrations() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {stack.token}"}) as s, s.get(url) as r:
            return list((await r.json())["items"])

    res = await stack.virtctl("migrate", VMI_NAME, "--dry-run")
    assert res.returncode == 0 and await migrations() == [], res.stderr
    res = await stack.virtctl("migrate", VMI_NAME, "--addedNodeSelector", "zone=a,disk=ssd")
    assert (res.returncode, res.stdout) == (0, f"VM {VMI_NAME} was scheduled to migrate\n"), res.stderr
    (mig,) = await migrations()
    assert mig["metadata"]["name"].startswith("kubevirt-migrate-vm-")
    assert mig["spec"] == {"vmiName": VMI_NAME, "addedNodeSelector": {"zone": "a", "disk": "ssd"}}
    res = await stack.virtctl("migrate-cancel", VMI_NAME)
    assert (res.returncode, res.stdout) == (0, f"VM {VMI_NAME} was scheduled to migrate-cancel\n"), res.stderr
    # Deleted; the migration controller (later) aborts it and drops its finalizer, as in KubeVirt.
    (cancelled,) = await migrations()
    assert cancelled["metadata"]["deletionTimestamp"]
    assert cancelled["metadata"]["finalizers"] == ["kubevirt.io/migrationJobFinalize"]
