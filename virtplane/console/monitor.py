"""QMP access for the console routes (screendump, input events, user-network host forwards).

The node agent's `Machine` owns the VMI's one monitor connection; `LocatedVMI.qmp` borrows it. Without
that callable we fall back to a short connection of our own to qmp.sock, which only works when nobody else
holds the monitor (QEMU serves one client per monitor socket): the connect is bounded so a busy monitor is
an error, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from qemu.qmp import QMPClient, QMPError

from .located import ConsoleError, LocatedVMI

OWN_CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 30.0


async def qmp_command(vmi: LocatedVMI, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """Run one QMP command for `vmi`; ConsoleError(503) wrapping the cause when the monitor is unusable,
    ConsoleError(500) when QEMU answers with an error."""
    if vmi.qmp is not None:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await vmi.qmp(command, arguments)
        except TimeoutError as exc:
            raise ConsoleError(503, f"QMP {command}: no answer from QEMU within {COMMAND_TIMEOUT:g}s") from exc
        except Exception as exc:  # the hypervisor layer's QMP errors; this package may not import them
            raise ConsoleError(500, f"QMP {command} failed: {exc}") from exc
    if vmi.qmp_socket is None:
        raise ConsoleError(503, "no QEMU monitor is available for this VMI")
    client = QMPClient(f"console-{vmi.namespace}-{vmi.name}")
    try:
        async with asyncio.timeout(OWN_CONNECT_TIMEOUT):
            await client.connect(str(vmi.qmp_socket))
    except (QMPError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise ConsoleError(503, f"QEMU monitor {vmi.qmp_socket} is busy or unreachable: {exc}") from exc
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            return await client.execute(command, dict(arguments) if arguments is not None else None)
    except (QMPError, OSError, TimeoutError) as exc:
        raise ConsoleError(500, f"QMP {command} failed: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def hmp_command(vmi: LocatedVMI, command_line: str) -> str:
    """A human-monitor command (hostfwd_add has no QMP equivalent in QEMU 7.2). HMP reports failures as
    text, so a non-empty answer from a command that prints nothing on success is an error."""
    out = await qmp_command(vmi, "human-monitor-command", {"command-line": command_line})
    return str(out or "")
