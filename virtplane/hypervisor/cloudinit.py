"""cloud-init data disks, as KubeVirt builds them: NoCloud (`cidata`) and ConfigDrive (`config-2`) ISOs.

The node agent resolves `secretRef` / `networkDataSecretRef` (it talks to the API); this module takes the
resolved strings, writes the files cloud-init expects and packs them with xorriso. The result is a
`ResolvedVolume` ready for `build_command`.

NoCloud:      user-data, meta-data (instance-id, local-hostname, public-keys), network-config
ConfigDrive:  openstack/latest/{user_data, meta_data.json (uuid, hostname, public_keys), network_data.json}

Meta data is written as JSON, which is also valid YAML (KubeVirt does the same).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CloudInitError, InvalidSpecError
from .runtime import ResolvedVolume

NOCLOUD_LABEL = "cidata"
CONFIGDRIVE_LABEL = "config-2"
_ISO_TOOLS = ("xorriso", "genisoimage", "mkisofs")


@dataclasses.dataclass(frozen=True, slots=True)
class CloudInitData:
    user_data: bytes | None = None
    network_data: bytes | None = None

    @classmethod
    def from_source(
        cls,
        source: Mapping[str, Any],
        *,
        user_data_secret: str | bytes | None = None,
        network_data_secret: str | bytes | None = None,
        field: str = "cloudInitNoCloud",
    ) -> CloudInitData:
        """From a cloudInitNoCloud / cloudInitConfigDrive volume source. Secret contents (`secretRef`,
        `networkDataSecretRef`) must be resolved by the caller and passed in."""
        user = _pick(source, "userData", "userDataBase64", "secretRef", user_data_secret, field)
        network = _pick(source, "networkData", "networkDataBase64", "networkDataSecretRef", network_data_secret, field)
        if user is None and network is None:
            raise InvalidSpecError(field, "needs user data or network data")
        return cls(user_data=user, network_data=network)


def _pick(
    source: Mapping[str, Any], plain: str, b64: str, ref: str, secret: str | bytes | None, field: str
) -> bytes | None:
    given = [k for k in (plain, b64, ref) if source.get(k)]
    if len(given) > 1:
        raise InvalidSpecError(f"{field}.{given[1]}", f"only one of {plain}, {b64}, {ref} may be set")
    if source.get(plain):
        return str(source[plain]).encode()
    if source.get(b64):
        try:
            return base64.b64decode(str(source[b64]), validate=True)
        except binascii.Error as err:
            raise InvalidSpecError(f"{field}.{b64}", f"invalid base64: {err}") from err
    if source.get(ref):
        if secret is None:
            raise InvalidSpecError(f"{field}.{ref}", "secret contents were not resolved by the caller")
        return secret.encode() if isinstance(secret, str) else secret
    return None


def nocloud_meta_data(instance_id: str, hostname: str | None, public_keys: Sequence[str] = ()) -> bytes:
    meta: dict[str, Any] = {"instance-id": instance_id}
    if hostname:
        meta["local-hostname"] = hostname
    if public_keys:
        meta["public-keys"] = {str(i): key for i, key in enumerate(public_keys)}
    return json.dumps(meta, indent=1).encode() + b"\n"


def configdrive_meta_data(instance_id: str, hostname: str | None, public_keys: Sequence[str] = ()) -> bytes:
    meta: dict[str, Any] = {"uuid": instance_id, "hostname": hostname or ""}
    if public_keys:
        meta["public_keys"] = {str(i): key for i, key in enumerate(public_keys)}
    return json.dumps(meta, indent=1).encode() + b"\n"


def _iso_tool() -> str:
    for tool in _ISO_TOOLS:
        path = shutil.which(tool)
        if path:
            return path
    raise CloudInitError(f"no ISO 9660 tool found (need one of {', '.join(_ISO_TOOLS)})")


async def make_iso(dest: Path, label: str, files: Mapping[str, bytes]) -> Path:
    """Pack `files` (relative path → content) into an ISO 9660 image with Rock Ridge and Joliet names."""
    tool = _iso_tool()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cidata-", dir=dest.parent) as staging:
        root = Path(staging) / "root"
        root.mkdir()  # also when there are no files: an empty ISO is valid (an optional, absent ConfigMap)
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        tmp_out = Path(staging) / "out.iso"
        args = ["-output", str(tmp_out), "-volid", label, "-joliet", "-rock", "-quiet", str(root)]
        argv = [tool, "-as", "mkisofs", *args] if os.path.basename(tool) == "xorriso" else [tool, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise CloudInitError(
                f"{os.path.basename(tool)} failed (exit {proc.returncode}): {(err or out).decode(errors='replace')}"
            )
        os.chmod(tmp_out, 0o600)  # user data often holds passwords and keys
        os.replace(tmp_out, dest)
    return dest


async def build_nocloud(
    dest: Path,
    data: CloudInitData,
    *,
    instance_id: str,
    hostname: str | None = None,
    public_keys: Sequence[str] = (),
) -> ResolvedVolume:
    files = {"meta-data": nocloud_meta_data(instance_id, hostname, public_keys)}
    # cloud-init's NoCloud wants a user-data file even when there is only network config.
    files["user-data"] = data.user_data if data.user_data is not None else b""
    if data.network_data is not None:
        files["network-config"] = data.network_data
    path = await make_iso(dest, NOCLOUD_LABEL, files)
    # A per-VMI copy: attached writable as KubeVirt does, so it works on every bus (QEMU's ide-hd behind
    # `bus: sata` refuses read-only drives); an ISO 9660 filesystem is read-only to the guest anyway.
    return ResolvedVolume(path=path, format="raw", readonly=False)


async def build_configdrive(
    dest: Path,
    data: CloudInitData,
    *,
    instance_id: str,
    hostname: str | None = None,
    public_keys: Sequence[str] = (),
) -> ResolvedVolume:
    base = "openstack/latest"
    files = {f"{base}/meta_data.json": configdrive_meta_data(instance_id, hostname, public_keys)}
    if data.user_data is not None:
        files[f"{base}/user_data"] = data.user_data
    if data.network_data is not None:
        files[f"{base}/network_data.json"] = data.network_data
    path = await make_iso(dest, CONFIGDRIVE_LABEL, files)
    return ResolvedVolume(path=path, format="raw", readonly=False)  # a per-VMI copy, as build_nocloud


async def build_for_volume(
    vmi: Mapping[str, Any],
    volume_name: str,
    dest: Path,
    *,
    user_data_secret: str | bytes | None = None,
    network_data_secret: str | bytes | None = None,
    public_keys: Sequence[str] = (),
) -> ResolvedVolume:
    """The cloud-init disk for one cloudInitNoCloud / cloudInitConfigDrive volume of a VMI, with KubeVirt's
    identities: NoCloud instance-id `<name>.<namespace>`, ConfigDrive uuid = the VMI's uid; hostname =
    spec.hostname or the VMI name."""
    meta = vmi.get("metadata") or {}
    spec = vmi.get("spec") or {}
    for i, volume in enumerate(spec.get("volumes") or []):
        if volume.get("name") != volume_name:
            continue
        hostname = spec.get("hostname") or meta.get("name")
        for kind in ("cloudInitNoCloud", "cloudInitConfigDrive"):
            if kind not in volume:
                continue
            data = CloudInitData.from_source(
                volume[kind] or {}, user_data_secret=user_data_secret, network_data_secret=network_data_secret,
                field=f"spec.volumes[{i}].{kind}",
            )  # fmt: skip
            if kind == "cloudInitNoCloud":
                iid = f"{meta.get('name')}.{meta.get('namespace') or 'default'}"
                return await build_nocloud(dest, data, instance_id=iid, hostname=hostname, public_keys=public_keys)
            uid = str(meta.get("uid") or f"{meta.get('namespace') or 'default'}-{meta.get('name')}")
            return await build_configdrive(dest, data, instance_id=uid, hostname=hostname, public_keys=public_keys)
        raise InvalidSpecError(f"spec.volumes[{i}]", f"volume {volume_name!r} is not a cloud-init volume")
    raise InvalidSpecError("spec.volumes", f"no volume named {volume_name!r}")
