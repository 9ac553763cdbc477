"""Network namespaces and taps inside them, driven from the node agent (which stays in the host netns).

Namespaces are iproute2's named ones (`ip netns add` bind-mounts them at /var/run/netns/NAME), so CNI plugins
and operators find them where they expect. Commands run inside a namespace through `nsenter --net=...`,
which execs the command (no intermediate process), so a daemon's pid is the one we started.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class NetnsError(Exception):
    pass


def path(name: str) -> Path:
    return NETNS_DIR / name


async def run(argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await proc.communicate(stdin)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv[:4])}: {err.decode(errors='replace').strip() or f'exit {proc.returncode}'}")
    return out.decode(errors="replace")


def in_netns(name: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net={path(name)}", *argv]


async def run_in(name: str, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True) -> str:
    return await run(in_netns(name, argv), stdin=stdin, check=check)


async def add(name: str) -> None:
    await run(["ip", "netns", "add", name])


async def delete(name: str) -> None:
    """Remove the namespace (idempotent). Devices inside it die with it once nothing holds it open."""
    if path(name).exists():
        await run(["ip", "netns", "delete", name], check=False)


def exists(name: str) -> bool:
    return path(name).exists()


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_tap_here(tap: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_tap(name: str, tap: str) -> int:
    """Open the (persistent) tap `tap` of namespace `name` and return the fd; blocking.

    TUNSETIFF looks the device up in the caller's netns, and setns(2) moves only the calling thread: so a
    throw-away thread enters the namespace, opens the tap and leaves; the fd stays bound to the device
    wherever it is later used (QEMU, in the host netns, gets it at start).
    """
    result: list[int] = []
    error: list[BaseException] = []

    def work() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                result.append(_open_tap_here(tap))
            finally:
                _setns(home)  # this thread dies next, but never leave it in a foreign netns anyway
        except BaseException as err:  # handed to the caller
            error.append(err)
        finally:
            os.close(home)
            os.close(target)

    t = threading.Thread(target=work, name=f"tap-{name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise NetnsError(f"cannot open tap {tap} in netns {name}: {error[0]}")
    return result[0]
