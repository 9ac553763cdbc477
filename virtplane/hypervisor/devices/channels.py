"""virtio-serial channels: the QEMU guest agent and a virtio console log.

- `org.qemu.guest_agent.0` on a unix socket server (qga.sock): KubeVirt always adds it; the agent inside the
  guest answers guest-ping, guest-info, guest-get-osinfo, ... (see `virtplane.hypervisor.qmp.GuestAgent`).
- `hvc0`, a virtio console whose output is appended to guest.log in the runtime dir (not a KubeVirt device;
  `BuildOptions.virtio_console_log`): a second, quiet channel guests can log to without cluttering the
  interactive serial console (virtplane's guest image writes its heartbeat there).
"""

from __future__ import annotations

from .base import VIRTIO_SERIAL_ID, BuildContext, Issue, opt_escape, virtio_driver

JSON = dict
QGA_CHARDEV = "charqga0"
CONSOLE_CHARDEV = "charhvc0"
QGA_PORT_NAME = "org.qemu.guest_agent.0"


def check(spec: JSON, path: str) -> list[Issue]:
    return []


def build(ctx: BuildContext) -> None:
    ctx.device({"driver": virtio_driver(ctx, "virtio-serial-pci"), "id": VIRTIO_SERIAL_ID, "bus": ctx.pci.allocate()})
    if ctx.virtio_console_log:
        # Port 0 is the console port by convention: the guest's first virtconsole becomes hvc0.
        ctx.body += ["-chardev", f"file,id={CONSOLE_CHARDEV},path={opt_escape(str(ctx.runtime.guest_log))},append=on"]
        ctx.device({"driver": "virtconsole", "id": "console0", "chardev": CONSOLE_CHARDEV,
                    "bus": f"{VIRTIO_SERIAL_ID}.0", "nr": 0})
    ctx.body += ["-chardev",
                 f"socket,id={QGA_CHARDEV},path={opt_escape(str(ctx.runtime.qga_sock))},server=on,wait=off"]
    ctx.device({"driver": "virtserialport", "id": "channel-qga", "chardev": QGA_CHARDEV,
                "bus": f"{VIRTIO_SERIAL_ID}.0", "nr": 1, "name": QGA_PORT_NAME})
