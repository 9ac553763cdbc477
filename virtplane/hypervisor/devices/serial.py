"""The serial console (devices.autoattachSerialConsole, default on): COM1 / ttyS0.

Backed by a unix socket server chardev so the console proxy can attach and detach at will (wait=off: the
guest never blocks when nobody is connected), with `logfile=` so every byte is also appended to
console.log (devices.logSerialConsole, default on) — the guest console log KubeVirt streams, and what
tests and humans read after the fact.
"""

from __future__ import annotations

from .base import BuildContext, Issue, opt_escape

JSON = dict
CHARDEV_ID = "charserial0"


def check(spec: JSON, path: str) -> list[Issue]:
    return []


def build(ctx: BuildContext) -> None:
    devices = ctx.devices
    if devices.get("autoattachSerialConsole") is False:
        return
    opts = [f"socket,id={CHARDEV_ID}", f"path={opt_escape(str(ctx.runtime.serial_sock))}", "server=on", "wait=off"]
    if devices.get("logSerialConsole") is not False:
        opts += [f"logfile={opt_escape(str(ctx.runtime.console_log))}", "logappend=on"]
    ctx.body += ["-chardev", ",".join(opts)]
    ctx.device({"driver": "isa-serial", "id": "serial0", "chardev": CHARDEV_ID, "index": 0})
