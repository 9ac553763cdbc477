"""`virtctl import-vm`: an OVA (VMware / VirtualBox export) becomes a VirtualMachine with DataVolumes.

    virtctl import-vm [NAME] --ova PATH|URL [--storage-class SC] [--access-mode M] [--volume-mode M]
                      [--disk-bus virtio|sata|scsi] [--network-map 'OVF NETWORK=pod|NS/NAD']... [--start]
                      [--dry-run] [--insecure] [--uploadproxy-url URL] [--wait-secs N]

The OVA is read once, in order, from a local file or an http(s) URL (streamed: nothing is stored on the
client): its first member, the OVF descriptor, gives the VM's CPUs, memory, firmware, disks (bus from their
controller, size from their capacity) and NICs (model, MAC; the first network goes to the pod network,
others need `--network-map`). The VirtualMachine is created with one `dataVolumeTemplates` entry per disk
(an `upload` source, bound immediately), then each disk file of the tar is streamed to its DataVolume
through the upload proxy, as `virtctl image-upload` does, and checked against the OVA's manifest (`.mf`)
when it has one. The cluster converts the VMDKs (streamOptimized or not) to raw volumes. A failed import
deletes the VirtualMachine it created (and with it its DataVolumes), so the same command can be run again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

from virtplane.cli import virtctl
from virtplane.client import rest
from virtplane.storage import importer, ova

CHUNK = 1 << 20
MAX_OVF_BYTES = 16 << 20


def add_parser(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("import-vm", "import a VM from an OVA (OVF + VMDK disks) as a VirtualMachine with DataVolumes",
             cmd_import_vm)
    p.add_argument("name", metavar="NAME", nargs="?", default="",
                   help="name of the new VirtualMachine (default: the OVF's VM name)")
    p.add_argument("--ova", default="", help="the OVA: a local file or an http(s) URL")
    p.add_argument("--storage-class", dest="storage_class", default="", help="StorageClass of the disks")
    p.add_argument("--access-mode", dest="access_mode", default="",
                   help="ReadWriteOnce, ReadWriteMany, ... (default: the StorageProfile's)")
    p.add_argument("--volume-mode", dest="volume_mode", default="",
                   help="block or filesystem (default: the StorageProfile's)")
    p.add_argument("--disk-bus", dest="disk_bus", default="",
                   help="virtio, sata or scsi for every disk (default: from each disk's controller in the OVF)")
    p.add_argument("--network-map", dest="network_map", action="append", default=[],
                   help="'OVF NETWORK=pod' or 'OVF NETWORK=NAMESPACE/NAD' (default: the first network to pod)")
    virtctl._bool_flag(p, "--start", dest="start", help="start the VM once its disks are imported")
    virtctl._bool_flag(p, "--dry-run", dest="dry_run", help="print the VirtualMachine as YAML, create nothing")
    virtctl._bool_flag(p, "--insecure", dest="insecure",
                       help="do not verify TLS certificates (the OVA's URL and the upload proxy)")
    p.add_argument("--uploadproxy-url", dest="uploadproxy_url", default="",
                   help="the upload proxy (default: the API server, which serves CDI's upload endpoints)")
    p.add_argument("--wait-secs", dest="wait_secs", type=int, default=300,
                   help="seconds to wait for each disk to be ready for its upload, and to finish (default 300)")


def check_args(args: argparse.Namespace) -> None:
    """Bad usage, reported before any kubeconfig is read or anything downloaded."""
    if not args.ova:
        raise virtctl.CLIError("import-vm: --ova is required (a local .ova file or an http(s) URL)", 2)
    if not _is_url(args.ova) and not Path(args.ova).is_file():
        raise virtctl.CLIError(f"import-vm: cannot read {args.ova}: no such file")
    if args.access_mode and args.access_mode not in virtctl.ACCESS_MODES:
        raise virtctl.CLIError(f"import-vm: --access-mode must be one of {', '.join(virtctl.ACCESS_MODES)}", 2)
    if args.volume_mode and args.volume_mode.lower() not in virtctl.VOLUME_MODES:
        raise virtctl.CLIError("import-vm: --volume-mode must be block or filesystem", 2)
    if args.disk_bus and args.disk_bus not in ova.DISK_BUSES:
        raise virtctl.CLIError(f"import-vm: --disk-bus must be one of {', '.join(ova.DISK_BUSES)}", 2)
    if args.name and ova.dns_name(args.name) != args.name:
        raise virtctl.CLIError(f"import-vm: {args.name!r} is not a valid name (lower case letters, digits, '-')", 2)
    parse_network_map(args.network_map)
    args.needs_cluster = not args.dry_run  # a dry run only prints: no kubeconfig needed


def parse_network_map(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        src, sep, dst = v.rpartition("=")
        if not sep or not src or not dst or (dst != "pod" and dst.count("/") > 1):
            raise virtctl.CLIError(f"import-vm: invalid --network-map {v!r}: expected 'OVF NETWORK=pod' or "
                                   "'OVF NETWORK=NAMESPACE/NAD'", 2)
        out[src] = dst
    return out


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class OVAReader:
    """The OVA's members in order, from a blocking file object (a local file or an HTTP response body);
    every read runs in a thread."""

    def __init__(self, source: str, insecure: bool) -> None:
        self.source = source
        self.insecure = insecure
        self._stream: importer.HTTPStream | None = None
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self.size: int | None = None

    async def open(self) -> None:
        def _open() -> None:
            fileobj: Any
            if _is_url(self.source):
                self._stream = importer.HTTPStream(importer.HTTPOptions(self.source, insecure=self.insecure))
                self._stream.open()
                fileobj = self._stream.resp
                self.size = self._stream.length
            else:
                fileobj = self._file = open(self.source, "rb")  # closed in close()
                self.size = Path(self.source).stat().st_size
            try:
                self._tar = tarfile.open(fileobj=fileobj, mode="r|")
            except tarfile.TarError as err:
                raise virtctl.CLIError(f"{self.source} is not an OVA (a tar archive): {err}") from None
        try:
            await asyncio.to_thread(_open)
        except importer.TransferError as err:
            raise virtctl.CLIError(f"cannot download {self.source}: {err.message}") from None

    async def next(self) -> tarfile.TarInfo | None:
        assert self._tar is not None
        try:
            return await asyncio.to_thread(self._tar.next)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise virtctl.CLIError(f"reading {self.source}: {err}") from None

    async def read_member(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise virtctl.CLIError(f"{member.name} in {self.source} is too large ({member.size} bytes)")
        out = bytearray()
        async for chunk in self.chunks(member):
            out += chunk
        return bytes(out)

    async def chunks(self, member: tarfile.TarInfo) -> AsyncIterator[bytes]:
        assert self._tar is not None
        f = self._tar.extractfile(member)
        if f is None:
            raise virtctl.CLIError(f"{member.name} in {self.source} is not a regular file")
        left = member.size
        while left > 0:
            try:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
            except (tarfile.TarError, OSError, EOFError) as err:
                raise virtctl.CLIError(f"reading {member.name} from {self.source}: {err}") from None
            if not chunk:
                raise virtctl.CLIError(f"{self.source} ends in the middle of {member.name}")
            left -= len(chunk)
            yield chunk

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._stream is not None:
            self._stream.close()
        if self._file is not None:
            self._file.close()


async def read_descriptor(reader: OVAReader) -> tuple[ova.OVFMachine, dict[str, tuple[str, str]],
                                                       tarfile.TarInfo | None]:
    """The OVF (the first member), the manifest if it comes next, and the first member after them."""
    first = await reader.next()
    if first is None or not first.name.lower().endswith(".ovf"):
        found = first.name if first is not None else "an empty archive"
        raise virtctl.CLIError(f"{reader.source} is not an OVA: its first file must be the .ovf descriptor, "
                               f"found {found}")
    try:
        machine = ova.parse_ovf(await reader.read_member(first, MAX_OVF_BYTES))
    except ova.OVFError as err:
        raise virtctl.CLIError(f"{first.name}: {err}") from None
    digests: dict[str, tuple[str, str]] = {}
    member = await reader.next()
    while member is not None and member.name.lower().endswith((".mf", ".cert")):
        if member.name.lower().endswith(".mf"):
            digests = ova.parse_manifest(await reader.read_member(member, MAX_OVF_BYTES))
        member = await reader.next()
    return machine, digests, member


def _options(args: argparse.Namespace, machine: ova.OVFMachine, namespace: str) -> ova.ImportOptions:
    return ova.ImportOptions(
        name=args.name or ova.dns_name(machine.name), namespace=namespace, storage_class=args.storage_class,
        access_mode=args.access_mode, volume_mode=virtctl.VOLUME_MODES.get(args.volume_mode.lower(), ""),
        disk_bus=args.disk_bus, network_map=parse_network_map(args.network_map),
        run_strategy="Always" if args.start else "Halted", source=args.ova)


def _summary(machine: ova.OVFMachine, vm: dict[str, Any]) -> str:
    disks = ", ".join(f"{d.file.href} ({virtctl._human(d.capacity)}, {d.controller} -> {d.bus})"
                      for d in machine.disks)
    nics = ", ".join(f"{n.name} on {n.network!r} ({n.model})" for n in machine.nics) or "none"
    return (f"{machine.cpus} vCPU(s), {virtctl._human(machine.memory)} memory, {machine.firmware.upper()} firmware; "
            f"disks: {disks}; NICs: {nics}")


async def cmd_import_vm(args: argparse.Namespace, ctx: virtctl.Context | None) -> int:
    namespace = ctx.namespace if ctx is not None else (getattr(args, "namespace", None) or "default")
    reader = OVAReader(args.ova, args.insecure)
    await reader.open()
    try:
        machine, digests, member = await read_descriptor(reader)
        try:
            vm, uploads = ova.virtual_machine(machine, _options(args, machine, namespace))
        except ova.OVFError as err:
            raise virtctl.CLIError(f"import-vm: {err}") from None
        if args.dry_run or ctx is None:
            sys.stdout.write(virtctl.to_yaml(vm))
            return 0
        name = vm["metadata"]["name"]
        async with ctx.client() as client:
            try:
                await client.create(virtctl.VM, vm, namespace)
            except rest.Conflict:
                raise virtctl.CLIError(f"VirtualMachine {namespace}/{name} already exists") from None
            print(f"VirtualMachine {namespace}/{name} created: {_summary(machine, vm)}", file=sys.stderr)
            try:
                await _import_disks(args, ctx, client, reader, member, uploads, digests, namespace)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    await _undo(client, namespace, name)
                    if isinstance(exc, virtctl.CLIError):
                        raise virtctl.CLIError(f"{exc.message}; the partially imported VirtualMachine "
                                               f"{namespace}/{name} and its DataVolumes were deleted") from None
                raise
    finally:
        reader.close()
    how = "it starts now" if args.start else f"start it with: virtctl start {name}"
    print(f"VirtualMachine {namespace}/{name} imported from {args.ova}; {how}")
    return 0


async def _undo(client: rest.Client, namespace: str, name: str) -> None:
    try:
        await client.delete(virtctl.VM, name, namespace, propagation="Foreground")
    except rest.APIError:
        pass


async def _import_disks(args: argparse.Namespace, ctx: virtctl.Context, client: rest.Client, reader: OVAReader,
                        member: tarfile.TarInfo | None, uploads: dict[str, str],
                        digests: dict[str, tuple[str, str]], namespace: str) -> None:
    wait = float(args.wait_secs)
    for dv in uploads.values():
        await virtctl._wait_upload_ready(client, namespace, dv, wait)
    done: set[str] = set()
    while member is not None:
        href = member.name.rsplit("/", 1)[-1]
        dv = uploads.get(href)
        if dv is not None and href not in done:
            if not member.isfile():
                raise virtctl.CLIError(f"{member.name} in {args.ova} is not a regular file")
            await _upload_disk(args, ctx, client, reader, member, dv, digests.get(href), namespace)
            done.add(href)
        member = await reader.next()
    missing = sorted(set(uploads) - done)
    if missing:
        raise virtctl.CLIError(f"{args.ova} does not hold {', '.join(missing)}, which the OVF descriptor names")
    for dv in uploads.values():
        await virtctl._wait_succeeded(client, namespace, dv, wait)


async def _upload_disk(args: argparse.Namespace, ctx: virtctl.Context, client: rest.Client, reader: OVAReader,
                       member: tarfile.TarInfo, dv: str, digest: tuple[str, str] | None, namespace: str) -> None:
    print(f"Uploading {member.name} to DataVolume {namespace}/{dv}", file=sys.stderr)
    hasher = hashlib.new(digest[0]) if digest else None
    progress = virtctl.Progress(member.size)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in reader.chunks(member):
            if hasher is not None:
                hasher.update(chunk)
            progress.add(len(chunk))
            yield chunk

    token = await virtctl._upload_token(client, namespace, dv)
    await virtctl.post_upload(args, ctx, token, body(), member.size, progress, member.name,
                              "run the same command again to retry")
    if digest is not None and hasher is not None and hasher.hexdigest() != digest[1]:
        raise virtctl.CLIError(f"{member.name}: {digest[0].upper()} digest mismatch with the OVA's manifest "
                               f"(expected {digest[1]}, got {hasher.hexdigest()}): the OVA is corrupt")
