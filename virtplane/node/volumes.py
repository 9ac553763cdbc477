"""Turn a VMI's volumes into files QEMU can open (`ResolvedVolume`), looking up what they reference via the API.

Per volume source:
- containerDisk: pulled from its registry into the image cache (storage.oci), then a per-VMI qcow2 overlay so
  the cached image is never written;
- cloudInitNoCloud / cloudInitConfigDrive: an ISO (hypervisor.cloudinit); `secretRef` / `networkDataSecretRef`
  read from the Secret's `userdata`/`userData` and `networkdata`/`networkData` keys;
- emptyDisk: a sparse qcow2 of `capacity` that lives and dies with the VMI;
- hostDisk: the host file at `path` (type Disk: must exist; DiskOrCreate: created sparse at `capacity`);
- persistentVolumeClaim / dataVolume: PVC → bound PV → `spec.local.path` or `spec.hostPath.path` (a directory
  holds `disk.img`, KubeVirt's filesystem-volume layout); Block volumes are used as block devices;
- ephemeral: a qcow2 overlay on a PVC resolved as above, so the claim is only read;
- configMap / secret / serviceAccount / downwardAPI: small ISO disks, one file per key, labelled with
  `volumeLabel` or KubeVirt's default `cfgdata`.

PVC-backed disks are always raw, as in KubeVirt: probing the format of a disk the guest can write would let
the guest turn it into a qcow2 with a backing file of its choice on the host.

`VolumeNotReady` means "not yet" (a missing or unbound PVC, an image that cannot be pulled yet): the VMI stays
Scheduled and the agent retries. `VolumeError` means the spec cannot work on this node.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virtplane.client import rest
from virtplane.hypervisor.cloudinit import build_for_volume, make_iso
from virtplane.hypervisor.errors import HypervisorError
from virtplane.hypervisor.quantity import QuantityError, parse_bytes
from virtplane.hypervisor.runtime import KernelBootFiles, ResolvedVolume
from virtplane.storage import dockerconfig, oci, provisioner
from virtplane.storage import volumes as images

from .status import REASON_PVC_NOT_FOUND

log = logging.getLogger(__name__)

JSON = dict[str, Any]

PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
PVS = rest.GVR("", "v1", "persistentvolumes", namespaced=False)
SECRETS = rest.GVR("", "v1", "secrets")
CONFIGMAPS = rest.GVR("", "v1", "configmaps")

CONFIG_ISO_LABEL = "cfgdata"  # KubeVirt's volume id for config ISOs without a volumeLabel
FILESYSTEM_DISK_NAME = provisioner.RAW_DISK  # KubeVirt's file inside a Filesystem-mode PVC
COW_DISK_NAME = provisioner.QCOW2_DISK  # a copy-on-write clone's overlay
UNSUPPORTED_SOURCES = ("sysprep", "downwardMetrics", "memoryDump")
REASON_PVC_NOT_BOUND = "WaitingForVolumeBinding"
REASON_IMAGE_PULL = "ErrImagePull"


class VolumeNotReady(Exception):
    """A volume cannot be resolved yet; retry later. `reason` is a KubeVirt-style CamelCase reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class VolumeError(Exception):
    """A volume can never be resolved as specified (unsupported source, invalid size, broken file)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedVolumes:
    volumes: dict[str, ResolvedVolume]
    status_extra: dict[str, JSON]  # per-volume additions to status.volumeStatus


def supports_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (not on tmpfs): decides KubeVirt's cache mode."""
    probe = directory / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        probe.unlink()
    return True


# Local metadata operations (stat, mkdir) are microseconds on the node's own disk: not worth a thread each.
def _exists(path: Path) -> bool:
    return path.exists()


def _is_file(path: Path) -> bool:
    return path.is_file()


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _size(value: Any, field: str) -> int:
    try:
        return parse_bytes(value)
    except (QuantityError, ValueError, TypeError) as err:
        raise VolumeError(f"{field}: invalid size {value!r}: {err}") from err


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise VolumeError(f"{what} is not valid base64") from err


class VolumeResolver:
    def __init__(self, client: rest.Client, image_cache: oci.ImageCache, *, ca_data: bytes | None = None) -> None:
        self.client = client
        self.images = image_cache
        self.ca_data = ca_data

    async def resolve(self, vmi: Mapping[str, Any], disk_dir: Path) -> ResolvedVolumes:
        """Every volume that has a disk, resolved into `disk_dir` (the VMI's runtime dir)."""
        spec = vmi.get("spec") or {}
        disk_names = {d.get("name") for d in ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []}
        _mkdir(disk_dir)
        direct = supports_direct_io(disk_dir)
        out: dict[str, ResolvedVolume] = {}
        extra: dict[str, JSON] = {}
        for i, vol in enumerate(spec.get("volumes") or []):
            name = vol.get("name")
            if name not in disk_names:
                continue  # filesystems / utility volumes: nothing for QEMU's block layer
            field = f"spec.volumes[{i}]"
            resolved, info = await self._resolve_one(vmi, vol, field, disk_dir, direct)
            out[name] = resolved
            if info:
                extra[name] = info
        return ResolvedVolumes(out, extra)

    async def resolve_volume(self, vmi: Mapping[str, Any], vol: Mapping[str, Any], disk_dir: Path,
                             field: str = "spec.volumes[]") -> tuple[ResolvedVolume, JSON]:  # fmt: skip
        """One volume (a hotplugged one): the file QEMU opens and its status.volumeStatus additions."""
        _mkdir(disk_dir)
        return await self._resolve_one(vmi, vol, field, disk_dir, supports_direct_io(disk_dir))

    async def resolve_kernel_boot(self, vmi: Mapping[str, Any]) -> KernelBootFiles | None:
        """`spec.domain.firmware.kernelBoot.container`: its kernel and initrd as host files, or None.

        Pulled with the containerDisk puller and cached by manifest digest; QEMU only reads them, so every VMI
        booting the image shares the cached copies. An image without the paths can never boot: VolumeError.
        """
        firmware = ((vmi.get("spec") or {}).get("domain") or {}).get("firmware") or {}
        container = (firmware.get("kernelBoot") or {}).get("container")
        if not container:
            return None
        field = "spec.domain.firmware.kernelBoot.container"
        image = str(container.get("image") or "")
        kernel, initrd = container.get("kernelPath"), container.get("initrdPath")
        paths = [str(p) for p in (kernel, initrd) if p]
        try:
            files = await oci.pull_files(self.images, image, paths)
        except oci.MissingFileError as err:
            raise VolumeError(f"{field}: {err}") from err
        except oci.OCIError as err:
            raise VolumeNotReady(REASON_IMAGE_PULL, f"failed to pull image {image!r}: {err}") from err
        return KernelBootFiles(kernel=files[str(kernel)] if kernel else None,
                               initrd=files[str(initrd)] if initrd else None)  # fmt: skip

    async def _resolve_one(
        self, vmi: Mapping[str, Any], vol: Mapping[str, Any], field: str, disk_dir: Path, direct: bool
    ) -> tuple[ResolvedVolume, JSON]:
        name = vol["name"]
        ns = (vmi.get("metadata") or {}).get("namespace") or "default"
        overlay = disk_dir / f"{name}.qcow2"
        if "containerDisk" in vol:
            image = str((vol["containerDisk"] or {}).get("image") or "")
            credentials = await self._pull_credentials(ns, vol["containerDisk"] or {}, image, field)
            try:
                pulled = await self.images.pull(image, credentials)
            except oci.OCIError as err:
                raise VolumeNotReady(REASON_IMAGE_PULL, f"failed to pull image {image!r}: {err}") from err
            await images.create_overlay(pulled.path, overlay, pulled.format)  # type: ignore[arg-type]
            return (ResolvedVolume(overlay, "qcow2", supports_direct_io=direct),
                    {"containerDiskVolume": {"checksum": 0}, "size": overlay.stat().st_size})  # fmt: skip
        for kind in ("cloudInitNoCloud", "cloudInitConfigDrive"):
            if kind in vol:
                return await self._cloud_init(vmi, vol, kind, ns, disk_dir / f"{name}.iso", field), {}
        if "emptyDisk" in vol:
            size = _size((vol["emptyDisk"] or {}).get("capacity"), f"{field}.emptyDisk.capacity")
            if not overlay.exists():
                await images.create_blank(overlay, size)
            return ResolvedVolume(overlay, "qcow2", supports_direct_io=direct), {"size": size}
        if "hostDisk" in vol:
            return await self._host_disk(vol["hostDisk"] or {}, field), {}
        if "persistentVolumeClaim" in vol or "dataVolume" in vol:
            if "persistentVolumeClaim" in vol:
                claim = str((vol["persistentVolumeClaim"] or {}).get("claimName") or "")
                readonly = bool((vol["persistentVolumeClaim"] or {}).get("readOnly"))
            else:
                claim, readonly = str((vol["dataVolume"] or {}).get("name") or ""), False
            resolved, info = await self._pvc(ns, claim, readonly, field)
            return resolved, {"persistentVolumeClaimInfo": info}
        if "ephemeral" in vol:
            claim_src = (vol["ephemeral"] or {}).get("persistentVolumeClaim") or {}
            base, info = await self._pvc(ns, str(claim_src.get("claimName") or ""), True, field)
            if base.is_block_device:
                raise VolumeError(f"{field}.ephemeral: overlays on block volumes are not supported")
            await images.create_overlay(base.path, overlay, base.format)
            return ResolvedVolume(overlay, "qcow2", supports_direct_io=direct), {"persistentVolumeClaimInfo": info}
        if "configMap" in vol:
            return await self._config_map(ns, vol["configMap"] or {}, disk_dir / f"{name}.iso", field), {}
        if "secret" in vol:
            return await self._secret(ns, vol["secret"] or {}, disk_dir / f"{name}.iso", field), {}
        if "serviceAccount" in vol:
            return await self._service_account(ns, vol["serviceAccount"] or {}, disk_dir / f"{name}.iso"), {}
        if "downwardAPI" in vol:
            return await self._downward_api(vmi, vol["downwardAPI"] or {}, disk_dir / f"{name}.iso", field), {}
        kinds = [k for k in vol if k != "name"]
        if any(k in UNSUPPORTED_SOURCES for k in kinds):
            raise VolumeError(f"{field}: volume source {kinds[0]} is not supported by this node agent")
        raise VolumeError(f"{field}: unknown volume source {kinds or '(none)'}")

    # -- sources that read the API ----------------------------------------------------------------------
    async def _get(self, gvr: rest.GVR, name: str, ns: str | None) -> JSON | None:
        try:
            return await self.client.get(gvr, name, ns)
        except rest.NotFound:
            return None

    async def _pull_credentials(self, ns: str, src: Mapping[str, Any], image: str, field: str) -> list[oci.Credentials]:
        """A containerDisk's `imagePullSecret` (a docker-registry Secret of the VMI's namespace): its entries
        for the image's registry, as KubeVirt hands the Secret to the launcher pod's imagePullSecrets."""
        name = str(src.get("imagePullSecret") or "")
        if not name:
            return []
        secret = await self._get(SECRETS, name, ns)
        if secret is None:
            raise VolumeNotReady("SecretNotFound",
                                 f"{field}.containerDisk.imagePullSecret: secret {ns}/{name} not found")
        try:
            return dockerconfig.credentials_for(image, [secret])
        except (dockerconfig.DockerConfigError, oci.OCIError) as err:
            raise VolumeError(f"{field}.containerDisk.imagePullSecret: {err}") from err

    async def _secret_key(self, ns: str, name: str, keys: tuple[str, ...], field: str) -> bytes | None:
        secret = await self._get(SECRETS, name, ns)
        if secret is None:
            raise VolumeNotReady("SecretNotFound", f"{field}: secret {ns}/{name} not found")
        data = secret.get("data") or {}
        for key in keys:
            if key in data:
                return _b64(data[key], f"secret {ns}/{name} key {key}")
            if key in (secret.get("stringData") or {}):
                return str(secret["stringData"][key]).encode()
        return None

    async def _cloud_init(
        self, vmi: Mapping[str, Any], vol: Mapping[str, Any], kind: str, ns: str, dest: Path, field: str
    ) -> ResolvedVolume:
        src = vol[kind] or {}
        user = network = None
        if (src.get("secretRef") or {}).get("name"):
            user = await self._secret_key(ns, src["secretRef"]["name"], ("userdata", "userData"), field)
            if user is None:
                raise VolumeError(f"{field}.{kind}.secretRef: secret has no userdata/userData key")
        if (src.get("networkDataSecretRef") or {}).get("name"):
            network = await self._secret_key(ns, src["networkDataSecretRef"]["name"], ("networkdata", "networkData"),
                                              field)  # fmt: skip
            if network is None:
                raise VolumeError(f"{field}.{kind}.networkDataSecretRef: secret has no networkdata/networkData key")
        try:
            return await build_for_volume(vmi, vol["name"], dest, user_data_secret=user, network_data_secret=network)
        except HypervisorError as err:
            raise VolumeError(f"{field}.{kind}: {err}") from err

    async def _pvc(self, ns: str, claim: str, readonly: bool, field: str) -> tuple[ResolvedVolume, JSON]:
        if not claim:
            raise VolumeError(f"{field}: no claim name")
        pvc = await self._get(PVCS, claim, ns)
        if pvc is None:
            raise VolumeNotReady(REASON_PVC_NOT_FOUND, f"PVC {ns}/{claim} does not exist, waiting for it to appear")
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not pv_name:
            raise VolumeNotReady(REASON_PVC_NOT_BOUND, f"PVC {ns}/{claim} is not bound yet")
        pv = await self._get(PVS, pv_name, None)
        if pv is None:
            raise VolumeNotReady(REASON_PVC_NOT_BOUND, f"PV {pv_name} of PVC {ns}/{claim} does not exist")
        pv_spec = pv.get("spec") or {}
        host_path = (pv_spec.get("local") or {}).get("path") or (pv_spec.get("hostPath") or {}).get("path")
        if not host_path:
            raise VolumeError(f"{field}: PV {pv_name} has neither spec.local.path nor spec.hostPath.path")
        path = Path(host_path)
        block = (pvc.get("spec") or {}).get("volumeMode") == "Block"
        try:
            st = os.stat(path)
        except FileNotFoundError as err:
            raise VolumeNotReady(REASON_PVC_NOT_BOUND, f"PV {pv_name}: {path} does not exist on this node") from err
        fmt = "raw"
        if stat.S_ISDIR(st.st_mode):
            # KubeVirt's layout is a raw disk.img; virtplane's copy-on-write clones are a qcow2 overlay named
            # disk.qcow2 (the name fixes the format: probing it would let a guest write a qcow2 header into a
            # raw disk and gain access to host files through a backing file).
            if (path / COW_DISK_NAME).exists():
                path, fmt = path / COW_DISK_NAME, "qcow2"
            else:
                path = path / FILESYSTEM_DISK_NAME
            if not path.exists():
                raise VolumeNotReady(REASON_PVC_NOT_BOUND, f"PV {pv_name}: no {FILESYSTEM_DISK_NAME} in {host_path}")
        elif stat.S_ISBLK(st.st_mode):
            block = True
        ro = readonly or (pvc.get("spec") or {}).get("accessModes") == ["ReadOnlyMany"]
        info = {
            "claimName": claim,
            "accessModes": (pvc.get("spec") or {}).get("accessModes") or [],
            "volumeMode": "Block" if block else "Filesystem",
            "capacity": (pvc.get("status") or {}).get("capacity") or {},
            "requests": ((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {},
        }
        return ResolvedVolume(path, fmt, is_block_device=block, readonly=ro,
                              supports_direct_io=block or supports_direct_io(path.parent)), info  # fmt: skip

    async def _host_disk(self, src: Mapping[str, Any], field: str) -> ResolvedVolume:
        path = Path(str(src.get("path") or ""))
        if not path.is_absolute():
            raise VolumeError(f"{field}.hostDisk.path must be an absolute path")
        kind = src.get("type") or "Disk"
        if kind == "DiskOrCreate" and not _exists(path):
            size = _size(src.get("capacity"), f"{field}.hostDisk.capacity")
            await images.create_blank_raw(path, size)
        elif kind not in ("Disk", "DiskOrCreate"):
            raise VolumeError(f"{field}.hostDisk.type: unknown type {kind!r}")
        if not _is_file(path):
            raise VolumeNotReady("HostDiskNotFound", f"{field}.hostDisk: {path} does not exist or is not a file")
        return ResolvedVolume(path, "raw", supports_direct_io=supports_direct_io(path.parent))

    async def _iso(self, dest: Path, label: str, files: Mapping[str, bytes]) -> ResolvedVolume:
        try:
            await make_iso(dest, label or CONFIG_ISO_LABEL, files)
        except HypervisorError as err:
            raise VolumeError(f"cannot build {dest.name}: {err}") from err
        return ResolvedVolume(dest, "raw", readonly=False)  # a per-VMI copy, writable on every bus like cloud-init

    @staticmethod
    def _project(data: Mapping[str, bytes], items: list[Mapping[str, Any]] | None) -> dict[str, bytes]:
        """Kubernetes `items` projection: only the listed keys, at their `path`."""
        if not items:
            return dict(data)
        return {str(it.get("path") or it["key"]): data[it["key"]] for it in items if it.get("key") in data}

    async def _config_map(self, ns: str, src: Mapping[str, Any], dest: Path, field: str) -> ResolvedVolume:
        name = str(src.get("name") or "")
        cm = await self._get(CONFIGMAPS, name, ns)
        if cm is None and not src.get("optional"):
            raise VolumeNotReady("ConfigMapNotFound", f"{field}: configmap {ns}/{name} not found")
        data: dict[str, bytes] = {k: str(v).encode() for k, v in ((cm or {}).get("data") or {}).items()}
        for k, v in ((cm or {}).get("binaryData") or {}).items():
            data[k] = _b64(v, f"configmap {ns}/{name} key {k}")
        return await self._iso(dest, str(src.get("volumeLabel") or ""), self._project(data, src.get("items")))

    async def _secret(self, ns: str, src: Mapping[str, Any], dest: Path, field: str) -> ResolvedVolume:
        name = str(src.get("secretName") or "")
        secret = await self._get(SECRETS, name, ns)
        if secret is None and not src.get("optional"):
            raise VolumeNotReady("SecretNotFound", f"{field}: secret {ns}/{name} not found")
        data = {k: _b64(v, f"secret {ns}/{name} key {k}") for k, v in ((secret or {}).get("data") or {}).items()}
        return await self._iso(dest, str(src.get("volumeLabel") or ""), self._project(data, src.get("items")))

    async def _service_account(self, ns: str, src: Mapping[str, Any], dest: Path) -> ResolvedVolume:
        """namespace, ca.crt and — when a legacy token Secret exists for the account — token.

        There is no TokenRequest API yet, so a bound token cannot be minted here."""
        account = str(src.get("serviceAccountName") or "default")
        files: dict[str, bytes] = {"namespace": ns.encode()}
        if self.ca_data:
            files["ca.crt"] = self.ca_data
        try:
            secrets = await self.client.list(SECRETS, ns, fieldSelector="type=kubernetes.io/service-account-token")
        except rest.APIError:
            secrets = {"items": []}
        for s in secrets.get("items") or []:
            annotations = (s.get("metadata") or {}).get("annotations") or {}
            if annotations.get("kubernetes.io/service-account.name") == account and (s.get("data") or {}).get("token"):
                files["token"] = _b64(s["data"]["token"], "service account token")
                break
        return await self._iso(dest, "", files)

    async def _downward_api(
        self, vmi: Mapping[str, Any], src: Mapping[str, Any], dest: Path, field: str
    ) -> ResolvedVolume:
        meta = vmi.get("metadata") or {}
        files: dict[str, bytes] = {}
        for i, item in enumerate(src.get("fields") or []):
            path = str(item.get("path") or "")
            ref = (item.get("fieldRef") or {}).get("fieldPath") or ""
            if ref in ("metadata.name", "metadata.namespace", "metadata.uid"):
                value = str(meta.get(ref.split(".", 1)[1]) or "")
            elif ref in ("metadata.labels", "metadata.annotations"):
                pairs = meta.get(ref.split(".", 1)[1]) or {}
                value = "\n".join(f'{k}="{v}"' for k, v in sorted(pairs.items()))
            else:
                raise VolumeError(f"{field}.downwardAPI.fields[{i}]: unsupported fieldPath {ref!r}")
            files[path] = value.encode()
        return await self._iso(dest, str(src.get("volumeLabel") or ""), files)
