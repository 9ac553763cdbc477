"""Which VMI spec fields the hypervisor layer understands, as a declarative allow-list.

Anything not listed is reported as unsupported, so a new KubeVirt field is rejected until someone
implements it, instead of being silently ignored. Value-level checks (a bus name, a cache mode) live in the
device modules; this module only knows the shape.

`ELSEWHERE` marks fields that are real features but not the hypervisor's business (scheduling, pod
networking, probes, credentials): they are accepted here and `NON_HYPERVISOR_FIELDS` lists them so that
admission can ask the layers that own them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from .base import Issue


@dataclasses.dataclass(frozen=True, slots=True)
class Leaf:
    """A value the device modules check (or any value, for free-form fields)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Elsewhere:
    """Handled by another layer (scheduler, network, node agent); not inspected here."""

    owner: str


@dataclasses.dataclass(frozen=True, slots=True)
class Unsupported:
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ListOf:
    item: Schema


Schema = dict[str, Union[Leaf, Elsewhere, Unsupported, ListOf, "Schema"]]

LEAF = Leaf()
SCHEDULER = Elsewhere("scheduler")
NODE_AGENT = Elsewhere("node agent")
NETWORK = Elsewhere("network layer")
VOLUME_SOURCE = Elsewhere("node agent (volume resolution)")

FEATURE_STATE: Schema = {"enabled": LEAF}

_DISK_TARGET: Schema = {"bus": LEAF, "readonly": LEAF, "pciAddress": Unsupported("pciAddress is not supported")}
_CDROM_TARGET: Schema = {"bus": LEAF, "readonly": LEAF, "tray": LEAF}

DISK: Schema = {
    "name": LEAF,
    "disk": _DISK_TARGET,
    "cdrom": _CDROM_TARGET,
    "lun": Unsupported("LUN passthrough (scsi-block) is not supported; use a disk target"),
    "bootOrder": LEAF,
    "serial": LEAF,
    "cache": LEAF,
    "io": LEAF,
    "errorPolicy": LEAF,
    "shareable": LEAF,
    "dedicatedIOThread": LEAF,
    "blockSize": {
        "custom": {"logical": LEAF, "physical": LEAF, "discardGranularity": LEAF},
        "matchVolume": Unsupported("blockSize.matchVolume is not supported; give custom sizes"),
    },
    "tag": Unsupported("device tags (config drive device metadata) are not supported"),
    "changedBlockTracking": Unsupported("changed block tracking is not supported"),
}

INTERFACE: Schema = {
    "name": LEAF,
    "model": LEAF,
    "macAddress": LEAF,
    "bootOrder": LEAF,
    "acpiIndex": LEAF,
    "state": LEAF,
    # Bindings: the network layer creates the host side and hands us a tap (NetworkAttachment).
    "masquerade": NETWORK,
    "bridge": NETWORK,
    "passtBinding": NETWORK,
    "binding": NETWORK,
    "ports": NETWORK,
    "portRanges": NETWORK,
    "dhcpOptions": NETWORK,
    "sriov": Unsupported("SR-IOV (PCI passthrough) is not supported"),
    "slirp": Unsupported("the slirp binding was removed from KubeVirt; use masquerade"),
    "macvtap": Unsupported("the macvtap binding was removed from KubeVirt; use bridge"),
    "passt": Unsupported("the deprecated passt field is not supported; use binding: {name: passt}"),
    "pciAddress": Unsupported("pciAddress is not supported"),
    "tag": Unsupported("device tags (config drive device metadata) are not supported"),
}

DEVICES: Schema = {
    "disks": ListOf(DISK),
    "interfaces": ListOf(INTERFACE),
    "autoattachGraphicsDevice": LEAF,
    "autoattachSerialConsole": LEAF,
    "autoattachMemBalloon": LEAF,
    "autoattachInputDevice": LEAF,
    "autoattachPodInterface": NETWORK,  # defaulting adds the pod interface to `interfaces`
    "logSerialConsole": LEAF,
    "rng": {},
    "disableHotplug": LEAF,
    "blockMultiQueue": LEAF,
    "useVirtioTransitional": LEAF,
    "video": {"type": LEAF},
    "inputs": ListOf({"name": LEAF, "type": LEAF, "bus": LEAF}),
    "watchdog": {"name": LEAF, "i6300esb": {"action": LEAF}, "diag288": Unsupported("diag288 is s390x only")},
    "autoattachVSOCK": LEAF,
    "networkInterfaceMultiqueue": LEAF,
    "gpus": Unsupported("GPU passthrough is not supported"),
    "hostDevices": Unsupported("host device passthrough is not supported"),
    "filesystems": Unsupported("virtiofs filesystems are not supported"),
    "clientPassthrough": Unsupported("USB redirection is not supported"),
    "sound": Unsupported("sound devices are not supported"),
    "tpm": Unsupported("TPM emulation (swtpm) is not supported"),
    "downwardMetrics": Unsupported("downward metrics are not supported"),
    "panicDevices": Unsupported("panic devices are not supported"),
}

DOMAIN: Schema = {
    "devices": DEVICES,
    "resources": {
        "requests": LEAF,
        "limits": LEAF,
        "overcommitGuestOverhead": NODE_AGENT,
    },
    "cpu": {
        "cores": LEAF,
        "sockets": LEAF,
        "threads": LEAF,
        "model": LEAF,
        "features": ListOf({"name": LEAF, "policy": LEAF}),
        "maxSockets": LEAF,
        "dedicatedCpuPlacement": Unsupported("dedicated CPU placement (pinning) is not supported"),
        "isolateEmulatorThread": Unsupported("emulator thread isolation is not supported"),
        "numa": Unsupported("guest NUMA topology is not supported"),
        "realtime": Unsupported("realtime tuning is not supported"),
    },
    "memory": {
        "guest": LEAF,
        "hugepages": Unsupported("hugepages are not supported"),
        "maxGuest": Unsupported("memory hotplug (maxGuest) is not supported"),
        "reservedOverhead": NODE_AGENT,
    },
    "machine": {"type": LEAF},
    "firmware": {
        "bootloader": {"bios": {"useSerial": LEAF}, "efi": {"secureBoot": LEAF, "persistent": Unsupported(
            "efi.persistent (UEFI variables kept across restarts) is not supported yet: the node agent does not "
            "keep the variables file beyond the VMI")}},
        "kernelBoot": {
            "kernelArgs": LEAF,
            "container": {
                "image": VOLUME_SOURCE,
                "imagePullPolicy": VOLUME_SOURCE,
                "imagePullSecret": VOLUME_SOURCE,
                "kernelPath": LEAF,
                "initrdPath": LEAF,
            },
        },
        "serial": LEAF,
        "uuid": LEAF,
        "acpi": Unsupported("ACPI SLIC/MSDM tables are not supported"),
    },
    "features": {
        "acpi": FEATURE_STATE,
        "apic": {"enabled": LEAF, "endOfInterrupt": LEAF},
        "smm": FEATURE_STATE,
        "pvspinlock": FEATURE_STATE,
        "kvm": {"hidden": LEAF},
        "hyperv": Unsupported("Hyper-V enlightenments are not supported"),
        "hypervPassthrough": Unsupported("Hyper-V enlightenments are not supported"),
    },
    "clock": {
        "utc": {"offsetSeconds": LEAF},
        "timezone": LEAF,
        "timer": {
            "hpet": {"present": LEAF, "tickPolicy": LEAF},
            "rtc": {"present": LEAF, "tickPolicy": LEAF, "track": LEAF},
            "pit": {"present": LEAF, "tickPolicy": LEAF},
            "kvm": {"present": LEAF},
            "hyperv": Unsupported("the Hyper-V clock is not supported"),
        },
    },
    "chassis": {"manufacturer": LEAF, "version": LEAF, "serial": LEAF, "asset": LEAF, "sku": LEAF},
    "ioThreadsPolicy": LEAF,
    "ioThreads": Unsupported("ioThreads (supplementalPool) is not supported"),
    "launchSecurity": Unsupported("confidential computing (SEV/TDX) is not supported"),
    "rebootPolicy": LEAF,
}

# A volume's source is resolved to a file by the node agent: we only need to know that the kind can be a
# disk. Sources that are not disks at all are unsupported here.
VOLUME: Schema = {
    "name": LEAF,
    "containerDisk": VOLUME_SOURCE,
    "persistentVolumeClaim": VOLUME_SOURCE,
    "dataVolume": VOLUME_SOURCE,
    "ephemeral": VOLUME_SOURCE,
    "emptyDisk": VOLUME_SOURCE,
    "hostDisk": VOLUME_SOURCE,
    "cloudInitNoCloud": VOLUME_SOURCE,
    "cloudInitConfigDrive": VOLUME_SOURCE,
    "configMap": VOLUME_SOURCE,
    "secret": VOLUME_SOURCE,
    "serviceAccount": VOLUME_SOURCE,
    "downwardAPI": VOLUME_SOURCE,
    "sysprep": VOLUME_SOURCE,
    "memoryDump": Unsupported("memory dump volumes are not supported"),
    "downwardMetrics": Unsupported("downward metrics volumes are not supported"),
    "containerPath": Unsupported("containerPath (virtiofs) volumes are not supported"),
}

VMI_SPEC: Schema = {
    "domain": DOMAIN,
    "volumes": ListOf(VOLUME),
    "networks": ListOf({"name": LEAF, "pod": NETWORK, "multus": NETWORK,
                        "resourceClaim": Unsupported("DRA network resource claims are not supported")}),
    "hostname": LEAF,
    "subdomain": LEAF,
    "startStrategy": LEAF,
    "architecture": LEAF,
    "terminationGracePeriodSeconds": NODE_AGENT,
    "evictionStrategy": Elsewhere("migration controller"),
    "livenessProbe": NODE_AGENT,
    "readinessProbe": NODE_AGENT,
    "accessCredentials": NODE_AGENT,
    "nodeSelector": SCHEDULER,
    "affinity": SCHEDULER,
    "tolerations": SCHEDULER,
    "topologySpreadConstraints": SCHEDULER,
    "schedulerName": SCHEDULER,
    "priorityClassName": SCHEDULER,
    "dnsConfig": NETWORK,
    "dnsPolicy": NETWORK,
    "serviceAccountName": NODE_AGENT,
    "resourceClaims": Unsupported("dynamic resource allocation is not supported"),
    "utilityVolumes": Unsupported("utility volumes are not supported"),
}  # fmt: skip


def _collect_elsewhere(schema: Schema, path: str, out: dict[str, str]) -> None:
    for key, node in schema.items():
        sub = f"{path}.{key}"
        if isinstance(node, Elsewhere):
            out[sub] = node.owner
        elif isinstance(node, ListOf):
            _collect_elsewhere(node.item, f"{sub}[]", out)
        elif isinstance(node, dict):
            _collect_elsewhere(node, sub, out)


def non_hypervisor_fields() -> dict[str, str]:
    """Field paths (relative to the VMI spec, `[]` for list items) accepted here but owned by another layer."""
    out: dict[str, str] = {}
    _collect_elsewhere(VMI_SPEC, "spec", out)
    return out


NON_HYPERVISOR_FIELDS = non_hypervisor_fields()


def walk(value: Any, schema: Schema, path: str) -> list[Issue]:
    """Report fields of `value` that `schema` does not allow (recursively)."""
    issues: list[Issue] = []
    if value is None:
        return issues
    if not isinstance(value, dict):
        issues.append(Issue(path, "must be an object", "invalid"))
        return issues
    for key, sub in value.items():
        node = schema.get(key)
        sub_path = f"{path}.{key}"
        if node is None:
            issues.append(Issue(sub_path, "field is not supported by virtplane"))
        elif isinstance(node, Unsupported):
            issues.append(Issue(sub_path, node.message))
        elif isinstance(node, (Leaf, Elsewhere)):
            continue
        elif isinstance(node, ListOf):
            if sub is None:
                continue
            if not isinstance(sub, list):
                issues.append(Issue(sub_path, "must be a list", "invalid"))
                continue
            for i, item in enumerate(sub):
                issues += walk(item, node.item, f"{sub_path}[{i}]")
        else:
            issues += walk(sub, node, sub_path)
    return issues
