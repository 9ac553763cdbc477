"""Reaching a TCP/UDP port inside the guest, for the portforward subresource.

Until the networking work gives VMIs pod IPs, guests sit on QEMU's user-mode network (slirp), which the host
cannot route to. For each forwarded connection we therefore ask slirp for a host forward on a free loopback
port — HMP `hostfwd_add <netdev> tcp:127.0.0.1:P-:<guest port>` (QEMU 7.2 has no QMP command for it) — connect
to 127.0.0.1:P, and remove the rule again right away: slirp keeps an accepted connection after its listening
rule is gone, so no rule outlives the instant it is needed and nothing else can connect through it. UDP has
no connection to keep, so a UDP forward's rule lives as long as its websocket.

When the VMI has a reachable address (`LocatedVMI.guest_ip`, the pod IP later) or the node agent supplies its
own dialer (`LocatedVMI.dial_guest`), those are used instead and no QEMU rule is involved.

A guest port nobody listens on shows up as a connection slirp accepts and closes at once (EOF right away).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from .located import ConsoleError, LocatedVMI
from .monitor import hmp_command

CONNECT_TIMEOUT = 10.0
PORT_ATTEMPTS = 3


def _free_loopback_port(kind: int) -> int:
    # Racy by nature (another process may take it before slirp binds); hostfwd_add then fails and we retry.
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _add_hostfwd(vmi: LocatedVMI, proto: str, guest_port: int) -> int:
    assert vmi.user_netdev is not None
    last = ""
    for _ in range(PORT_ATTEMPTS):
        host_port = _free_loopback_port(socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        out = await hmp_command(vmi, f"hostfwd_add {vmi.user_netdev} {proto}:127.0.0.1:{host_port}-:{guest_port}")
        if not out.strip():
            return host_port
        last = out.strip()
    raise ConsoleError(503, f"cannot forward to guest port {guest_port}/{proto}: {last}")


async def _remove_hostfwd(vmi: LocatedVMI, proto: str, host_port: int) -> None:
    with contextlib.suppress(ConsoleError):  # the VM may be gone already: then so is the rule
        await hmp_command(vmi, f"hostfwd_remove {vmi.user_netdev} {proto}:127.0.0.1:{host_port}")


async def open_tcp(vmi: LocatedVMI, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `port` in the guest (ConsoleError 503 when it cannot be set up)."""
    try:
        if vmi.dial_guest is not None:
            reader, writer = await vmi.dial_guest(port)
            return reader, writer
        if vmi.guest_ip:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await asyncio.open_connection(vmi.guest_ip, port)
    except (OSError, TimeoutError) as exc:
        raise ConsoleError(503, f"cannot connect to guest port {port}: {exc}") from exc
    if not vmi.user_netdev:
        raise ConsoleError(503, "the VMI has no network this node can forward ports to")
    host_port = await _add_hostfwd(vmi, "tcp", port)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await asyncio.open_connection("127.0.0.1", host_port)
    except (OSError, TimeoutError) as exc:
        raise ConsoleError(503, f"cannot connect to guest port {port} through 127.0.0.1:{host_port}: {exc}") from exc
    finally:
        await _remove_hostfwd(vmi, "tcp", host_port)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like: keep going
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


class UDPFlow:
    """One UDP "connection" to a guest port: `send()` a datagram, `receive()` the guest's answers."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Datagrams) -> None:
        self._transport = transport
        self._protocol = protocol

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def receive(self) -> bytes | None:
        return await self._protocol.queue.get()

    def close(self) -> None:
        self._transport.close()


@contextlib.asynccontextmanager
async def udp_flow(vmi: LocatedVMI, port: int) -> AsyncIterator[UDPFlow]:
    """A UDP flow to `port` in the guest; its host forward (if any) is removed when the context ends."""
    loop = asyncio.get_running_loop()
    host_port: int | None = None
    if vmi.guest_ip:
        target = (vmi.guest_ip, port)
    elif vmi.user_netdev:
        host_port = await _add_hostfwd(vmi, "udp", port)
        target = ("127.0.0.1", host_port)
    else:
        raise ConsoleError(503, "the VMI has no network this node can forward ports to")
    try:
        transport, protocol = await loop.create_datagram_endpoint(_Datagrams, remote_addr=target)
    except OSError as exc:
        if host_port is not None:
            await _remove_hostfwd(vmi, "udp", host_port)
        raise ConsoleError(503, f"cannot open a UDP flow to guest port {port}: {exc}") from exc
    flow = UDPFlow(transport, protocol)
    try:
        yield flow
    finally:
        flow.close()
        if host_port is not None:
            await _remove_hostfwd(vmi, "udp", host_port)
