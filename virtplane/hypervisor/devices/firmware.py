"""Firmware: SeaBIOS (default), OVMF (efi, optionally secure boot), direct kernel boot, SMBIOS identity.

OVMF is loaded as two pflash devices: the read-only code and a per-VM writable copy of the variable store
(seeded from the template at first start, kept in the runtime dir; a node agent implementing
`efi.persistent` saves/restores that file). Secure boot uses the `.secboot` code build, which requires SMM,
plus the variable template with Microsoft's keys enrolled (what KubeVirt ships for secureBoot: true).
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from pathlib import Path

from ..errors import MissingResourceError
from .base import BuildContext, Issue, as_json, enabled, opt_escape

JSON = dict

OVMF_DIR = Path("/usr/share/OVMF")


@dataclasses.dataclass(frozen=True, slots=True)
class OvmfFiles:
    code: Path
    vars_template: Path


def ovmf_files(secure: bool, ovmf_dir: Path = OVMF_DIR) -> OvmfFiles:
    """The 4 MiB builds (Debian 12's default; their variable store has room for enrolled keys)."""
    if secure:
        return OvmfFiles(ovmf_dir / "OVMF_CODE_4M.secboot.fd", ovmf_dir / "OVMF_VARS_4M.ms.fd")
    return OvmfFiles(ovmf_dir / "OVMF_CODE_4M.fd", ovmf_dir / "OVMF_VARS_4M.fd")


def check(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    domain = spec.get("domain") or {}
    fpath = f"{path}.domain.firmware"
    firmware = domain.get("firmware") or {}
    bootloader = firmware.get("bootloader") or {}
    if "bios" in bootloader and "efi" in bootloader:
        issues.append(Issue(f"{fpath}.bootloader", "bios and efi are mutually exclusive", "invalid"))
    efi = bootloader.get("efi")
    if efi is not None:
        secure = efi.get("secureBoot") is not False
        smm = (domain.get("features") or {}).get("smm")
        if secure and smm is not None and not enabled(smm):
            issues.append(Issue(f"{path}.domain.features.smm.enabled", "EFI secure boot requires SMM", "invalid"))
    kb = firmware.get("kernelBoot")
    if kb is not None:
        container = kb.get("container")
        if container is None:
            if kb.get("kernelArgs"):
                issues.append(
                    Issue(f"{fpath}.kernelBoot.kernelArgs", "kernelArgs need a kernelBoot container", "invalid")
                )
        elif not container.get("kernelPath") and not container.get("initrdPath"):
            issues.append(Issue(f"{fpath}.kernelBoot.container", "kernelPath or initrdPath is required", "invalid"))
        elif not container.get("kernelPath"):
            issues.append(Issue(f"{fpath}.kernelBoot.container.initrdPath", "an initrd without a kernel cannot boot"))
    uid = firmware.get("uuid")
    if uid:
        try:
            uuidlib.UUID(str(uid))
        except ValueError:
            issues.append(Issue(f"{fpath}.uuid", f"not a UUID: {uid!r}", "invalid"))
    return issues


def build(ctx: BuildContext) -> None:
    domain = ctx.domain
    firmware = domain.get("firmware") or {}
    efi = (firmware.get("bootloader") or {}).get("efi")
    if efi is not None:
        files = ovmf_files(secure=efi.get("secureBoot") is not False)
        vars_path = ctx.runtime.efi_vars
        ctx.seed_files.append((str(files.vars_template), str(vars_path)))
        ctx.head += [
            "-blockdev", as_json({"driver": "file", "filename": str(files.code), "node-name": "fw-code-file",
                                "read-only": True}),
            "-blockdev", as_json({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True}),
            "-blockdev", as_json({"driver": "file", "filename": str(vars_path), "node-name": "fw-vars-file"}),
            "-blockdev", as_json({"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"}),
        ]  # fmt: skip
        # Appended to the -machine option built by the machine module.
        _extend_machine(ctx, "pflash0=fw-code,pflash1=fw-vars")
        if efi.get("secureBoot") is not False:
            # Only SMM code may write the variable store, so the OS cannot tamper with secure boot keys.
            ctx.head += ["-global", "driver=cfi.pflash01,property=secure,value=on"]

    kb = firmware.get("kernelBoot")
    if kb is not None and kb.get("container") is not None:
        files = ctx.kernel_boot
        if files is None or files.kernel is None:
            raise MissingResourceError("spec.domain.firmware.kernelBoot: kernel files were not resolved")
        ctx.head += ["-kernel", str(files.kernel)]
        if files.initrd is not None:
            ctx.head += ["-initrd", str(files.initrd)]
        if kb.get("kernelArgs"):
            ctx.head += ["-append", kb["kernelArgs"]]

    # SMBIOS: what KubeVirt's guests see (cloud-init's ds-identify and some tools look at it).
    uid = firmware.get("uuid") or _vm_uuid(ctx.metadata)
    type1 = ["type=1", "manufacturer=KubeVirt", "product=None", "family=KubeVirt"]
    if firmware.get("serial"):
        type1.append(f"serial={opt_escape(str(firmware['serial']))}")
    if uid:
        type1.append(f"uuid={uid}")
        ctx.head += ["-uuid", str(uid)]
    ctx.head += ["-smbios", ",".join(type1)]
    chassis = domain.get("chassis") or {}
    if chassis:
        type3 = ["type=3"] + [f"{k}={opt_escape(str(chassis[k]))}" for k in
                              ("manufacturer", "version", "serial", "asset", "sku") if chassis.get(k)]
        ctx.head += ["-smbios", ",".join(type3)]


def _vm_uuid(metadata: JSON) -> str:
    """KubeVirt's defaulting fills firmware.uuid; without it use the object's uid (a UUID in Kubernetes) or
    a name-based UUID, so the guest sees the same system UUID on every start."""
    uid = str(metadata.get("uid") or "")
    try:
        return str(uuidlib.UUID(uid))
    except ValueError:
        seed = uid or f"{metadata.get('namespace') or 'default'}/{metadata.get('name') or 'vm'}"
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"virtplane:{seed}"))


def _extend_machine(ctx: BuildContext, extra: str) -> None:
    for i in range(len(ctx.head) - 1):
        if ctx.head[i] == "-machine":
            ctx.head[i + 1] += "," + extra
            return
    raise AssertionError("machine module must run before firmware")
