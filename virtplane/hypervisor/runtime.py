"""Inputs the node agent resolves before a VM can be built: the runtime directory, volumes, networks.

The hypervisor layer never looks up Kubernetes objects: the node agent turns containerDisk / PVC / emptyDisk /
cloudInit volumes into files (`ResolvedVolume`), pod / multus networks into a tap device or fd
(`NetworkAttachment`), kernelBoot containers into files (`KernelBootFiles`), and picks a runtime directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from .errors import HypervisorError

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeDir:
    """The per-VMI directory QEMU's sockets, logs and bookkeeping live in.

    Everything needed to re-attach to a running QEMU after the node agent restarts is in here, so the
    directory must survive agent restarts (e.g. /run/virtplane/<namespace>/<name>/<uid>).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if "," in str(self.path):
            # QEMU's option syntax (-vnc unix:PATH,...) cannot carry commas in every place we pass the path.
            raise HypervisorError(f"runtime dir {self.path} must not contain commas")
        longest = self.path / "serial.sock"
        if len(os.fsencode(str(longest.absolute()))) > _MAX_UNIX_PATH:
            raise HypervisorError(
                f"runtime dir {self.path} is too long for unix sockets ({_MAX_UNIX_PATH} byte limit)"
            )

    @property
    def qmp_sock(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def serial_sock(self) -> Path:
        return self.path / "serial.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def guest_log(self) -> Path:
        """Output of the guest's virtio console (hvc0), when the VM has one."""
        return self.path / "guest.log"

    @property
    def vnc_sock(self) -> Path:
        return self.path / "vnc.sock"

    @property
    def qga_sock(self) -> Path:
        return self.path / "qga.sock"

    @property
    def pid_file(self) -> Path:
        return self.path / "pid"

    @property
    def cmdline_file(self) -> Path:
        """JSON: argv, spec hash, accel, start time. Compared with /proc/<pid>/cmdline on adoption."""
        return self.path / "cmdline.json"

    @property
    def stderr_log(self) -> Path:
        """QEMU's stdout+stderr: the reason when it refuses to start or dies."""
        return self.path / "qemu.log"

    @property
    def efi_vars(self) -> Path:
        """This VM's copy of the OVMF variable store. A node agent that persists NVRAM
        (firmware.bootloader.efi.persistent) places the saved file here before start and saves it after."""
        return self.path / "efivars.fd"

    @property
    def exit_file(self) -> Path:
        """Written by the Machine that reaped QEMU: how it ended (so a later adopt() can report it)."""
        return self.path / "exit.json"

    def create(self) -> None:
        # 0o700: the sockets give full control over the VM and the console.
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedVolume:
    """A volume resolved to something QEMU can open."""

    path: Path
    format: Literal["qcow2", "raw"] = "raw"
    is_block_device: bool = False
    readonly: bool = False
    # Whether the backing file system supports O_DIRECT. KubeVirt's default cache mode is `none` when it
    # does and `writethrough` otherwise (tmpfs, some FUSE file systems).
    supports_direct_io: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.format not in ("qcow2", "raw"):
            raise ValueError(f"unsupported image format {self.format!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkAttachment:
    """How one VMI network reaches the host side.

    - `tap`: an existing tap device (created by the network layer, possibly in another netns that QEMU runs
      in); QEMU opens it by name.
    - `fd`: an open tap fd owned by the caller; it is passed to QEMU at start (must stay open until then).
    - `user`: QEMU's user-mode network. Only for this layer's own tests: no isolation, no masquerade rules.
      `user_options` are extra netdev properties (net, host, dhcpstart, ...): the node agent uses them to
      give the guest KubeVirt's masquerade addressing until the network layer provides real masquerade.
    - `stream`: a unix stream socket a user-mode network helper listens on (passt, for KubeVirt's passt
      binding); QEMU connects to `socket_path` as a client (`-netdev stream`).
    """

    kind: Literal["tap", "fd", "user", "stream"]
    tap_name: str | None = None
    fd: int | None = None
    vhost: bool = False
    user_options: tuple[tuple[str, str], ...] = ()
    socket_path: str | None = None

    @classmethod
    def tap(cls, name: str, *, vhost: bool = False) -> NetworkAttachment:
        return cls(kind="tap", tap_name=name, vhost=vhost)

    @classmethod
    def from_fd(cls, fd: int, *, vhost: bool = False, tap_name: str | None = None) -> NetworkAttachment:
        """`tap_name` is optional and only used to read interface statistics from /sys/class/net."""
        return cls(kind="fd", fd=fd, vhost=vhost, tap_name=tap_name)

    @classmethod
    def user(cls, **options: str) -> NetworkAttachment:
        return cls(kind="user", user_options=tuple(sorted(options.items())))

    @classmethod
    def stream(cls, socket_path: str) -> NetworkAttachment:
        return cls(kind="stream", socket_path=socket_path)

    def __post_init__(self) -> None:
        if self.kind == "tap" and not self.tap_name:
            raise ValueError("tap attachment needs tap_name")
        if self.kind == "fd" and (self.fd is None or self.fd < 0):
            raise ValueError("fd attachment needs an open fd")
        if self.kind == "stream" and not self.socket_path:
            raise ValueError("stream attachment needs socket_path")


@dataclasses.dataclass(frozen=True, slots=True)
class KernelBootFiles:
    """spec.domain.firmware.kernelBoot.container resolved to host files."""

    kernel: Path | None
    initrd: Path | None = None
