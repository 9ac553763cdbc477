"""Test helpers around the tiny guest images (images/build.py) and a real OCI registry.

Everything here starts real processes: ``qemu-system-x86_64`` (always ``-accel tcg``:
KVM guests hang on the CI machines) and Debian's ``docker-registry``. Processes are
stopped by pid only. Typical use::

    paths = ensure_images()
    key, pub = make_ssh_key(tmp_path)
    seed = make_nocloud_seed(tmp_path / "seed.iso", meta_data={"instance-id": "i-1"},
                             user_data=cloud_config(ssh_authorized_keys=[pub]))
    with start_guest(tmp_path, image=paths.qcow2, cidata=seed, ssh=True) as g:
        g.wait_for(r"virtplane-guest: ip eth0 ")
        assert g.ssh(key, "hostname").stdout.strip() == "..."

The guest's serial-console protocol (lines it prints) is documented in images/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
IMAGES_OUT = REPO / "images" / "out"
BUILD_SCRIPT = REPO / "images" / "build.py"

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"
GUEST_PREFIX = "virtplane-guest: "
QGA_PORT_NAME = "org.qemu.guest_agent.0"

Firmware = Literal["bios", "uefi"]
Boot = Literal["disk", "cdrom", "kernel"]
DiskBus = Literal["virtio", "sata", "scsi"]


# ---------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImagePaths:
    out: Path
    qcow2: Path
    raw_xz: Path
    vmdk: Path
    vhdx: Path
    iso: Path
    vmlinuz: Path
    initrd: Path
    containerdisk_oci: Path
    manifest: dict[str, Any]

    @property
    def kernel_cmdline(self) -> str:
        return str(self.manifest["kernel_cmdline"])


def ensure_images(force: bool = False) -> ImagePaths:
    """Builds the images if missing or stale (a no-op check when current) and returns
    their paths."""
    cmd = [sys.executable, str(BUILD_SCRIPT)] + (["--force"] if force else [])
    subprocess.run(cmd, check=True, cwd=REPO)
    return image_paths()


def image_paths(out: Path = IMAGES_OUT) -> ImagePaths:
    manifest = json.loads((out / "manifest.json").read_text())
    return ImagePaths(
        out=out, qcow2=out / "tiny.qcow2", raw_xz=out / "tiny.raw.xz", vmdk=out / "tiny.vmdk",
        vhdx=out / "tiny.vhdx", iso=out / "tiny.iso", vmlinuz=out / "vmlinuz",
        initrd=out / "initrd.img", containerdisk_oci=out / "containerdisk-oci", manifest=manifest,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (racy by nature; good enough for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# cloud-init seeds


def make_ssh_key(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """An ed25519 key pair without passphrase; returns (private key path, public key line)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtplane-test", "-f", str(key)],
                       check=True)
    return key, (directory / f"{name}.pub").read_text().strip()


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid double-quoted YAML scalar


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML in the subset the guest's parser reads (no library needed)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines += _yaml(v, indent + 2)
            elif isinstance(v, str) and "\n" in v:
                lines.append(f"{pad}{k}: |")
                lines += [f"{pad}  {line}" for line in v.splitlines()]
            else:
                lines.append(f"{pad}{k}: {_yaml_scalar(v) if not isinstance(v, dict | list) else '[]'}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, list):
                lines.append(f"{pad}- [{', '.join(_yaml_scalar(i) for i in item)}]")
            elif isinstance(item, dict):
                sub = _yaml(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    return lines


def cloud_config(**keys: Any) -> str:
    """A ``#cloud-config`` document from keyword arguments (hostname=..., runcmd=[...])."""
    return "#cloud-config\n" + "\n".join(_yaml(keys)) + "\n"


def _as_text(doc: str | dict[str, Any] | None) -> str | None:
    if doc is None or isinstance(doc, str):
        return doc
    return "\n".join(_yaml(doc)) + "\n"


def _pack(src: Path, dest: Path, label: str, fs: Literal["iso", "vfat"]) -> Path:
    dest.unlink(missing_ok=True)
    if fs == "iso":
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(dest), "-V", label, "-J", "-R",
                        str(src)], check=True, capture_output=True)
    else:
        subprocess.run(["mkfs.vfat", "-C", "-n", label.upper(), str(dest), "4096"], check=True,
                       capture_output=True)
        subprocess.run(["mcopy", "-i", str(dest), "-s", *[str(p) for p in src.iterdir()], "::/"],
                       check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return dest


def make_nocloud_seed(dest: Path, meta_data: str | dict[str, Any], user_data: str | None = None,
                      network_config: str | dict[str, Any] | None = None,
                      fs: Literal["iso", "vfat"] = "iso") -> Path:
    """A NoCloud seed disk (label cidata) at dest; dicts are written as YAML."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "meta-data").write_text(_as_text(meta_data) or "")
        (d / "user-data").write_text(user_data or "")
        if network_config is not None:
            (d / "network-config").write_text(_as_text(network_config) or "")
        return _pack(d, dest, "cidata", fs)


def make_configdrive(dest: Path, meta_data: dict[str, Any], user_data: str | None = None,
                     network_data: dict[str, Any] | None = None,
                     fs: Literal["iso", "vfat"] = "iso") -> Path:
    """An OpenStack ConfigDrive (label config-2) at dest."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        o = d / "openstack" / "latest"
        o.mkdir(parents=True)
        (o / "meta_data.json").write_text(json.dumps(meta_data, indent=1))
        if user_data is not None:
            (o / "user_data").write_text(user_data)
        if network_data is not None:
            (o / "network_data.json").write_text(json.dumps(network_data))
        return _pack(d, dest, "config-2", fs)


# ---------------------------------------------------------------------------
# the QEMU guest


# Terminal control sequences (firmware screen clears, ash's cursor queries) are noise
# for line matching.
_ANSI = re.compile(r"\x1b(\[[0-9;?=]*[A-Za-z]|[()][0-9A-Za-z]|[=>c])")


class ConsoleLog:
    """Collects a byte stream line by line on a thread; waiters block on a condition."""

    def __init__(self, stream: Any, tee: Path | None = None) -> None:
        self._lines: list[str] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._closed = False
        self._tee = tee.open("ab") if tee else None
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096):
            if self._tee:
                self._tee.write(chunk)
                self._tee.flush()
            text = _ANSI.sub("", self._partial + chunk.decode("utf-8", "replace").replace("\r", ""))
            *done, self._partial = text.split("\n")
            with self._cond:
                self._lines.extend(done)
                self._cond.notify_all()
        with self._cond:
            if self._partial:
                self._lines.append(self._partial)
            self._closed = True
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self._lines) + ("\n" + self._partial if self._partial else "")

    def mark(self) -> int:
        """A position; wait_for(..., since=mark) only looks at lines after it."""
        with self._cond:
            return len(self._lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0, since: int = 0,
                 partial: bool = False) -> re.Match[str]:
        """The first match of pattern (re.search) in a line at or after `since`.
        partial=True also looks at the unterminated last line (prompts like "login: ")."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        pos = since
        with self._cond:
            while True:
                while pos < len(self._lines):
                    if m := rx.search(self._lines[pos]):
                        return m
                    pos += 1
                if partial and (m := rx.search(self._partial)):
                    return m
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    tail = "\n".join([*self._lines[-30:], self._partial])
                    why = "stream closed" if self._closed else f"timeout {timeout}s"
                    raise TimeoutError(f"{why} waiting for {rx.pattern!r}; last output:\n{tail}")
                self._cond.wait(left)


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    workdir: Path
    console: ConsoleLog
    qmp_socket: Path
    qga_socket: Path | None
    hvc_log: Path | None
    ssh_port: int | None
    argv: list[str]
    started: float = field(default_factory=time.monotonic)

    # -- console
    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0, since: int = 0) -> re.Match[str]:
        try:
            return self.console.wait_for(pattern, timeout, since)
        except TimeoutError as e:
            if self.proc.poll() is not None:
                err = (self.workdir / "qemu.stderr").read_text(errors="replace")[-2000:]
                raise TimeoutError(f"{e}\nQEMU exited {self.proc.returncode}: {err}") from None
            raise

    def mark(self) -> int:
        return self.console.mark()

    def send(self, text: str) -> None:
        """Types text on the serial console (ttyS0)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def console_login(self, user: str = "root", password: str | None = None, timeout: float = 60.0) -> None:
        """Logs in on the serial console and waits for a shell prompt. An Enter first
        makes getty print a fresh "login:" (boot messages may have split the old one)."""
        self.console.wait_for(r"login: ", timeout, partial=True)
        mark = self.mark()
        self.send("\n")
        self.console.wait_for(r"login: ?$", timeout, since=mark, partial=True)
        self.send(f"{user}\n")
        if password is not None:
            self.console.wait_for(r"Password: ?$", timeout, since=mark, partial=True)
            self.send(f"{password}\n")
        self.console.wait_for(r"[#$] ?$", timeout, since=mark, partial=True)

    def console_run(self, command: str, timeout: float = 30.0) -> str:
        """Runs a command in a logged-in console shell; returns its output."""
        tag = f"vp{time.monotonic_ns()}"
        mark = self.mark()
        self.send(f"echo {tag}-begin; {command}; echo {tag}-end $?\n")
        self.console.wait_for(rf"^{tag}-end \d+", timeout, since=mark)
        lines = self.console.lines[mark:]
        # The echoed command line may wrap at the terminal width, so anchor on the
        # exact marker lines the command printed, begin first.
        start = next(i for i, line in enumerate(lines) if line == f"{tag}-begin")
        end = next(i for i in range(start, len(lines)) if re.fullmatch(rf"{tag}-end \d+", lines[i]))
        return "\n".join(lines[start + 1:end])

    def hvc_lines(self) -> list[str]:
        """What the guest wrote to its virtio console (hvc0): the heartbeat ticks."""
        if not self.hvc_log or not self.hvc_log.exists():
            return []
        return self.hvc_log.read_text(errors="replace").splitlines()

    # -- ssh
    def ssh(self, key: Path, command: str, user: str = "root", timeout: float = 30.0,
            check: bool = True, retry: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs command over SSH (user-net host forward). Retries connection failures
        (exit 255) until timeout, since the guest may still be starting dropbear; pass
        retry=False for commands that must not run twice (reboot, poweroff)."""
        if self.ssh_port is None:
            raise RuntimeError("guest was started without ssh=True")
        argv = ["ssh", "-q", "-i", str(key), "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                f"{user}@127.0.0.1", command]
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=max(1.0, deadline - time.monotonic()) + 10, check=False)
            if res.returncode != 255 or not retry or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # nothing to wait on: the port is forwarded by QEMU itself
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res

    # -- QMP (qemu.qmp)
    async def aqmp(self, command: str, **arguments: Any) -> Any:
        from qemu.qmp import QMPClient

        client = QMPClient("virtplane-test")
        await client.connect(str(self.qmp_socket))
        try:
            return await client.execute(command, arguments or None)
        finally:
            await client.disconnect()

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Synchronous QMP command (not from inside a running event loop: use aqmp)."""
        return asyncio.run(self.aqmp(command, **arguments))

    # -- guest agent
    def qga(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """One qemu-guest-agent command over its chardev socket, after a guest-sync."""
        if not self.qga_socket:
            raise RuntimeError("guest was started without qga=True")
        deadline = time.monotonic() + timeout
        while True:
            try:
                return _qga_call(self.qga_socket, command, arguments, min(5.0, timeout))
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # -- lifecycle
    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kills QEMU by pid (never by name) and reaps it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _qga_call(sock_path: Path, command: str, arguments: dict[str, Any], timeout: float) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        sync_id = int(time.monotonic_ns() % 2**31)
        # A 0xFF byte resets the agent's parser after a half-read message.
        f.write(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode())
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise OSError("guest agent closed the connection")
            line = line.lstrip(b"\xff").strip()
            if line and json.loads(line).get("return") == sync_id:
                break
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        f.write(json.dumps(req).encode())
        f.flush()
        if command in ("guest-shutdown",):
            return None  # no reply on success
        reply = json.loads(f.readline())
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply.get("return")


def _drive_format(image: Path) -> str:
    return {".qcow2": "qcow2", ".vmdk": "vmdk", ".vhdx": "vhdx", ".iso": "raw", ".raw": "raw",
            ".img": "raw"}.get(image.suffix, "raw")


def qemu_argv(workdir: Path, *, image: Path | None = None, boot: Boot = "disk",
              firmware: Firmware = "bios", machine: str = "q35", memory_mib: int = 512, cpus: int = 1,
              kernel: Path | None = None, initrd: Path | None = None, cmdline: str | None = None,
              disk_bus: DiskBus = "virtio", cidata: Path | None = None, cidata_bus: DiskBus = "virtio",
              nic: str | None = "virtio-net-pci", ssh_port: int | None = None,
              virtio_console: bool = True, qga: bool = True, hotplug_ports: int = 0, scsi: bool = False,
              extra: Sequence[str] = ()) -> tuple[list[str], dict[str, Path]]:
    """The QEMU command line for a test guest, and the paths of its sockets/logs.

    The root disk is a copy-on-write overlay in workdir, so the image stays pristine
    while the guest's state partition still persists across reboots of this guest."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"qmp": workdir / "qmp.sock"}
    argv = [QEMU, "-accel", "tcg", "-M", machine, "-m", str(memory_mib), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
            "-qmp", f"unix:{paths['qmp']},server=on,wait=off"]
    if firmware == "uefi":
        vars_copy = workdir / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, vars_copy)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    q35 = machine.startswith("q35")
    ahci_bus = iter(["ide.0", "ide.1", "ide.2", "ide.3"] if q35 else ["ide.0", "ide.1"])
    need_scsi = scsi or disk_bus == "scsi" or cidata_bus == "scsi"
    if need_scsi:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]

    def attach(drive_id: str, bus: DiskBus, cdrom: bool, bootindex: int | None) -> list[str]:
        bi = f",bootindex={bootindex}" if bootindex is not None else ""
        if bus == "virtio":
            return ["-device", f"virtio-blk-pci,drive={drive_id}{bi}"]
        if bus == "scsi":
            return ["-device", f"{'scsi-cd' if cdrom else 'scsi-hd'},bus=scsi0.0,drive={drive_id}{bi}"]
        return ["-device", f"{'ide-cd' if cdrom else 'ide-hd'},bus={next(ahci_bus)},drive={drive_id}{bi}"]

    if boot == "kernel":
        argv += ["-kernel", str(kernel), "-initrd", str(initrd),
                 "-append", cmdline or "console=ttyS0,115200 quiet"]
    if image is not None:
        if boot == "cdrom":
            argv += ["-drive", f"file={image},format=raw,if=none,id=root,media=cdrom,readonly=on"]
            argv += attach("root", "sata" if disk_bus == "virtio" else disk_bus, True, 0)
        else:
            src = image
            if image.name.endswith(".xz"):
                src = workdir / image.name.removesuffix(".xz")
                with src.open("wb") as f:
                    subprocess.run(["xz", "-dc", str(image)], stdout=f, check=True)
            overlay = workdir / "root-overlay.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(src.resolve()),
                            "-F", _drive_format(src), str(overlay)], check=True)
            argv += ["-drive", f"file={overlay},format=qcow2,if=none,id=root"]
            argv += attach("root", disk_bus, False, 0 if boot == "disk" else None)
    if cidata is not None:
        iso = cidata.suffix == ".iso"
        # IDE/SCSI hard disks can't be read-only in QEMU; snapshot=on keeps the file intact.
        cdrom = iso and cidata_bus != "virtio"
        ro = "readonly=on" if cdrom or cidata_bus == "virtio" else "snapshot=on"
        argv += ["-drive", f"file={cidata},format=raw,if=none,id=cidata,{ro}" + (",media=cdrom" if cdrom else "")]
        argv += attach("cidata", cidata_bus, cdrom, None)
    if nic:
        fwd = f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""
        argv += ["-netdev", f"user,id=net0{fwd}", "-device", f"{nic},netdev=net0"]
    if virtio_console or qga:
        argv += ["-device", "virtio-serial-pci,id=vser0"]
    if virtio_console:
        paths["hvc"] = workdir / "hvc0.log"
        argv += ["-chardev", f"file,id=hvc0,path={paths['hvc']}", "-device", "virtconsole,chardev=hvc0"]
    if qga:
        paths["qga"] = workdir / "qga.sock"
        argv += ["-chardev", f"socket,id=qga0,path={paths['qga']},server=on,wait=off",
                 "-device", f"virtserialport,chardev=qga0,name={QGA_PORT_NAME}"]
    for i in range(hotplug_ports):
        if q35:
            argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}"]
    argv += list(extra)
    return argv, paths


def start_guest(workdir: Path, *, ssh: bool = False, **kwargs: Any) -> Guest:
    """Starts QEMU (TCG) for a test; see qemu_argv for the knobs. Use as a context
    manager, or call stop(). The serial console is also written to workdir/console.log."""
    ssh_port = free_port() if ssh else None
    argv, paths = qemu_argv(workdir, ssh_port=ssh_port, **kwargs)
    for p in paths.values():
        p.unlink(missing_ok=True)
    stderr = (workdir / "qemu.stderr").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            cwd=workdir, start_new_session=True)
    stderr.close()
    console = ConsoleLog(proc.stdout, tee=workdir / "console.log")
    return Guest(proc=proc, workdir=workdir, console=console, qmp_socket=paths["qmp"],
                 qga_socket=paths.get("qga"), hvc_log=paths.get("hvc"), ssh_port=ssh_port, argv=argv)


# ---------------------------------------------------------------------------
# a real OCI registry (Debian's docker-registry) and a plain-HTTP push client


@dataclass
class Registry:
    proc: subprocess.Popen[bytes]
    host: str  # "127.0.0.1:PORT", as used in image references
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(workdir: Path, timeout: float = 30.0, host: str = "127.0.0.1", *,
                   storage: Path | None = None, htpasswd: Path | None = None) -> Registry:  # fmt: skip
    """Runs ``docker-registry serve`` with filesystem storage in workdir (or `storage`, e.g. another
    registry's) on a free port of `host` (default 127.0.0.1) and waits until /v2/ answers. With `htpasswd`
    (bcrypt entries) every request needs those Basic credentials."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = storage or workdir / "storage"
    storage.mkdir(exist_ok=True)
    config = workdir / "config.yml"
    auth = f"auth:\n  htpasswd:\n    realm: virtplane\n    path: {htpasswd}\n" if htpasswd else ""
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n" + auth
    )
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    reg = Registry(proc=proc, host=f"{host}:{port}", root=workdir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {proc.returncode}: "
                               f"{(workdir / 'registry.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{reg.url}/v2/", timeout=2) as r:
                if r.status == 200:
                    return reg
        except urllib.error.HTTPError as err:
            if err.code == 401 and htpasswd:
                return reg  # up, and asking for credentials
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise TimeoutError("docker-registry did not come up")
        time.sleep(0.1)  # polling a port that has no readiness signal


def _oci_refs(layout: Path, tag: str | None) -> tuple[dict[str, Any], bytes, str]:
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    if tag is not None:
        desc = next((m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag), desc)
    digest = desc["digest"]
    raw = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    return json.loads(raw), raw, desc["mediaType"]


async def apush_oci_layout(registry: str, layout: Path, repository: str, tag: str = "latest") -> str:
    """Pushes an OCI image layout to a registry over plain HTTP (v2 API: HEAD/POST/PUT
    blobs, PUT manifest). registry is "host:port". Returns the manifest digest."""
    import aiohttp

    manifest, raw, media_type = _oci_refs(layout, None)
    base = f"http://{registry}/v2/{repository}"
    async with aiohttp.ClientSession() as http:
        for desc in [manifest["config"], *manifest["layers"]]:
            digest = desc["digest"]
            async with http.head(f"{base}/blobs/{digest}") as r:
                if r.status == 200:
                    continue
            async with http.post(f"{base}/blobs/uploads/") as r:
                if r.status != 202:
                    raise RuntimeError(f"upload start: {r.status} {await r.text()}")
                location = r.headers["Location"]
            if location.startswith("/"):
                location = f"http://{registry}{location}"
            sep = "&" if "?" in location else "?"
            data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
            async with http.put(f"{location}{sep}digest={digest}", data=data,
                                headers={"Content-Type": "application/octet-stream"}) as r:
                if r.status != 201:
                    raise RuntimeError(f"blob {digest}: {r.status} {await r.text()}")
        async with http.put(f"{base}/manifests/{tag}", data=raw, headers={"Content-Type": media_type}) as r:
            if r.status != 201:
                raise RuntimeError(f"manifest: {r.status} {await r.text()}")
            return str(r.headers.get("Docker-Content-Digest", ""))


def push_oci_layout(registry: str, layout: Path, repository: str, tag: str = "latest") -> str:
    """Synchronous apush_oci_layout (not from inside a running event loop)."""
    return asyncio.run(apush_oci_layout(registry, layout, repository, tag))


@contextlib.contextmanager
def registry_with_containerdisk(workdir: Path, repository: str = "virtplane/tiny",
                                tag: str = "latest", host: str = "127.0.0.1") -> Iterator[tuple[Registry, str]]:
    """A running registry holding the tiny containerDisk; yields (registry, image ref)."""
    paths = image_paths()
    with start_registry(workdir, host=host) as reg:
        push_oci_layout(reg.host, paths.containerdisk_oci, repository, tag)
        yield reg, f"{reg.host}/{repository}:{tag}"


def make_kernelboot_oci_layout(dest: Path, files: dict[str, Path] | None = None) -> Path:
    """An OCI image layout for KubeVirt's kernelBoot container: one gzip layer holding `files`
    (image path → host file; default the tiny guest's /boot/vmlinuz and /boot/initrd.img). Returns dest."""
    if files is None:
        paths = image_paths()
        files = {"/boot/vmlinuz": paths.vmlinuz, "/boot/initrd.img": paths.initrd}
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, src in sorted(files.items()):
            info = tar.gettarinfo(str(src), arcname=name.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 1700000000  # reproducible, like images/build.py
            with open(src, "rb") as f:
                tar.addfile(info, f)
    layer_tar = raw.getvalue()
    layer = blob(gzip.compress(layer_tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
    }).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer]}).encode()
    desc = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]}
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def push_kernelboot_image(registry: str, workdir: Path, repository: str = "virtplane/tiny-kernel",
                          tag: str = "latest") -> str:
    """Builds the kernelBoot layout under workdir, pushes it to registry ("host:port"); returns the image ref."""
    push_oci_layout(registry, make_kernelboot_oci_layout(workdir / "kernelboot-oci"), repository, tag)
    return f"{registry}/{repository}:{tag}"
