"""What the console routes need to know about one running VMI, supplied by the node agent's `locate`.

The console package never looks up Kubernetes objects or `Machine`s itself: the node agent answers
`locate(namespace, name)` with a `LocatedVMI` (or None when the VMI does not run on this node) and the routes
work from the paths and callables in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

# Runs one QMP command on the VMI's QEMU and returns its "return" value (raises on error). QEMU's monitor
# socket takes a single client and the node agent's `Machine` holds that connection for its whole life, so
# the routes borrow it through this callable instead of opening their own (a second client would sit in
# the listen backlog unserved). The hypervisor's `Machine.monitor_command` is exactly this.
QMPExecutor = Callable[[str, Mapping[str, Any] | None], Awaitable[Any]]

# Opens a TCP connection to a guest port: the networking work plugs the pod-network path in here.
GuestDialer = Callable[[int], Awaitable[tuple[Any, Any]]]

# File names inside a runtime directory (see virtplane.hypervisor.runtime.RuntimeDir, which this package may
# not import: the layering keeps console beside hypervisor, not above it).
SERIAL_SOCKET = "serial.sock"
VNC_SOCKET = "vnc.sock"
QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"


@dataclasses.dataclass(frozen=True, slots=True)
class LocatedVMI:
    """A VMI running on this node, as the console routes see it.

    - `serial_socket`: QEMU's serial chardev (a unix socket server taking one client); None when the VMI has
      no serial console (autoattachSerialConsole: false).
    - `vnc_socket`: QEMU's VNC server on a unix socket; None without a graphics device.
    - `console_log`: every byte of serial output (QEMU's chardev `logfile=`), for replay seeding and the
      consolelog endpoint.
    - `qmp`: see `QMPExecutor`; needed by the screenshot and by user-network port forwarding. When None and
      `qmp_socket` is set, a short connection of our own is tried (works only when nobody else holds it).
    - `screenshot_dir`: a directory QEMU can write to (the runtime dir); QMP `screendump` writes a file.
    - Port forwarding, first match wins: `dial_guest` (a custom dialer), `guest_ip` (connect directly, e.g. a
      pod IP), `user_netdev` (QEMU user-mode network: a `hostfwd` rule per connection, see guestport.py).
    """

    namespace: str
    name: str
    uid: str = ""
    serial_socket: Path | None = None
    vnc_socket: Path | None = None
    console_log: Path | None = None
    qmp: QMPExecutor | None = None
    qmp_socket: Path | None = None
    screenshot_dir: Path | None = None
    guest_ip: str | None = None
    user_netdev: str | None = None
    dial_guest: GuestDialer | None = None

    @classmethod
    def from_runtime_dir(
        cls,
        namespace: str,
        name: str,
        runtime_dir: Path,
        *,
        uid: str = "",
        qmp: QMPExecutor | None = None,
        serial: bool = True,
        vnc: bool = True,
        guest_ip: str | None = None,
        user_netdev: str | None = None,
        dial_guest: GuestDialer | None = None,
    ) -> LocatedVMI:
        """The usual case: everything lives in the VMI's runtime directory under the hypervisor's names."""
        path = Path(runtime_dir)
        return cls(
            namespace=namespace, name=name, uid=uid,
            serial_socket=path / SERIAL_SOCKET if serial else None,
            vnc_socket=path / VNC_SOCKET if vnc else None,
            console_log=path / CONSOLE_LOG, qmp=qmp, qmp_socket=path / QMP_SOCKET, screenshot_dir=path,
            guest_ip=guest_ip, user_netdev=user_netdev, dial_guest=dial_guest,
        )  # fmt: skip


class ConsoleError(Exception):
    """A failure with the HTTP status the client should see (the routes turn it into a Status body)."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or {400: "BadRequest", 404: "NotFound", 409: "Conflict", 500: "InternalError",
                                 503: "ServiceUnavailable"}.get(code, "Unknown")  # fmt: skip
