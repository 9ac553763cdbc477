"""The common cluster instance types and preferences `virtplane up` creates (a subset of
kubevirt/common-instancetypes, written here from its published sizes; labels and annotations as upstream so
UIs that read them, ours included, show the same names and descriptions).

Created once and never overwritten: an administrator's edits (or deletions followed by their own versions)
survive restarts, as with any object a user owns.
"""

from __future__ import annotations

import logging
from typing import Any

from virtplane.client import rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]
CLUSTER_INSTANCETYPES = rest.GVR("instancetype.kubevirt.io", "v1beta1", "virtualmachineclusterinstancetypes")
CLUSTER_PREFERENCES = rest.GVR("instancetype.kubevirt.io", "v1beta1", "virtualmachineclusterpreferences")
VENDOR = {"instancetype.kubevirt.io/vendor": "kubevirt.io", "instancetype.kubevirt.io/common-instancetypes-version":
          "virtplane"}

# size -> (vCPUs, guest memory)
U_SIZES = {"nano": (1, "512Mi"), "micro": (1, "1Gi"), "small": (1, "2Gi"), "medium": (1, "4Gi"),
           "2xmedium": (2, "4Gi"), "large": (2, "8Gi"), "xlarge": (4, "16Gi"), "2xlarge": (8, "32Gi")}
O_SIZES = {k: v for k, v in U_SIZES.items() if k != "2xmedium"}
CX_SIZES = {"medium": (1, "2Gi"), "large": (2, "4Gi"), "xlarge": (4, "8Gi"), "2xlarge": (8, "16Gi")}

SERIES = {
    "u1": ("General Purpose", "general.purpose",
           "The U Series is quite neutral and provides resources for general purpose applications. VMs share "
           "physical CPU cores on a time-slice basis with other VMs.", U_SIZES, {}, {}),
    "o1": ("Overcommitted", "overcommitted",
           "The O Series is the U Series with memory overcommitted: the pod requests half of the guest memory.",
           O_SIZES, {}, {"overcommitPercent": 50}),
    "cx1": ("Compute Exclusive", "compute.exclusive",
            "The CX Series provides exclusive compute resources: dedicated CPUs, an isolated emulator thread, "
            "hugepages and a NUMA topology passed through. Needs nodes with the CPU manager and hugepages.",
            CX_SIZES, {"dedicatedCPUPlacement": True, "isolateEmulatorThread": True,
                       "numa": {"guestMappingPassthrough": {}}},
            {"hugepages": {"pageSize": "2Mi"}}),
}


def instancetype_objects() -> list[JSON]:
    out = []
    for series, (display, klass, description, sizes, cpu_extra, mem_extra) in SERIES.items():
        for size, (cpus, memory) in sizes.items():
            spec: JSON = {"cpu": {"guest": cpus, **cpu_extra}, "memory": {"guest": memory, **mem_extra}}
            if series == "cx1":
                spec["ioThreadsPolicy"] = "auto"
            out.append({
                "apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": "VirtualMachineClusterInstancetype",
                "metadata": {
                    "name": f"{series}.{size}",
                    "labels": {**VENDOR, "instancetype.kubevirt.io/class": klass,
                               "instancetype.kubevirt.io/cpu": str(cpus), "instancetype.kubevirt.io/memory": memory,
                               "instancetype.kubevirt.io/size": size, "instancetype.kubevirt.io/version": "1",
                               "instancetype.kubevirt.io/common-instancetypes-series": series},
                    "annotations": {"instancetype.kubevirt.io/displayName": display,
                                    "instancetype.kubevirt.io/description": description},
                },
                "spec": spec,
            })
    return out


LINUX_DEVICES = {"preferredDiskBus": "virtio", "preferredInterfaceModel": "virtio", "preferredRng": {}}


def _linux(name: str, display: str, icon: str, memory: str, docs: str) -> JSON:
    return _preference(name, display, icon, "linux", docs, {
        "cpu": {"preferredCPUTopology": "preferSockets"},
        "devices": dict(LINUX_DEVICES),
        "requirements": {"cpu": {"guest": 1}, "memory": {"guest": memory}},
    })


def _preference(name: str, display: str, icon: str, os_type: str, docs: str, spec: JSON) -> JSON:
    return {
        "apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": "VirtualMachineClusterPreference",
        "metadata": {
            "name": name,
            "labels": {**VENDOR, "instancetype.kubevirt.io/os-type": os_type,
                       "instancetype.kubevirt.io/arch": "amd64"},
            "annotations": {"openshift.io/display-name": display, "iconClass": icon, "tags": f"kubevirt,{os_type}",
                            "openshift.io/documentation-url": docs,
                            "openshift.io/provider-display-name": "KubeVirt"},
        },
        "spec": spec,
    }


def preference_objects() -> list[JSON]:
    return [
        _linux("fedora", "Fedora Linux", "icon-fedora", "2Gi", "https://docs.fedoraproject.org/"),
        _linux("ubuntu", "Ubuntu", "icon-ubuntu", "2Gi", "https://ubuntu.com/server/docs"),
        _linux("debian", "Debian", "icon-debian", "1Gi", "https://www.debian.org/doc/"),
        _linux("centos.stream9", "CentOS Stream 9", "icon-centos", "1.5Gi", "https://docs.centos.org/"),
        _linux("rhel.9", "Red Hat Enterprise Linux 9", "icon-rhel", "1.5Gi",
               "https://access.redhat.com/documentation/en-us/red_hat_enterprise_linux/9"),
        _linux("alpine", "Alpine Linux", "icon-linux", "512Mi", "https://wiki.alpinelinux.org/"),
        _preference("cirros", "CirrOS", "icon-cirros", "linux", "https://github.com/cirros-dev/cirros", {
            "devices": dict(LINUX_DEVICES),
            "requirements": {"cpu": {"guest": 1}, "memory": {"guest": "256Mi"}},
        }),
        _preference("windows.11", "Microsoft Windows 11", "icon-windows", "windows",
                    "https://learn.microsoft.com/en-us/windows/", {
                        "clock": {"preferredClockOffset": {"utc": {}},
                                  "preferredTimer": {"hpet": {"present": False}, "hyperv": {},
                                                     "pit": {"tickPolicy": "delay"}, "rtc": {"tickPolicy": "catchup"}}},
                        "cpu": {"preferredCPUTopology": "preferSockets"},
                        "devices": {"preferredDiskBus": "sata", "preferredInterfaceModel": "e1000e",
                                    "preferredInputBus": "usb", "preferredInputType": "tablet",
                                    "preferredTPM": {"persistent": True}, "preferredCdromBus": "sata"},
                        "features": {"preferredAcpi": {}, "preferredApic": {}, "preferredSmm": {},
                                     "preferredHyperv": {"relaxed": {}, "vapic": {}, "spinlocks": {"spinlocks": 8191},
                                                         "vpindex": {}, "runtime": {}, "synic": {},
                                                         "synictimer": {"direct": {}}, "frequencies": {},
                                                         "reenlightenment": {}, "tlbflush": {}, "ipi": {}}},
                        "firmware": {"preferredEfi": {"secureBoot": True, "persistent": True}},
                        "requirements": {"cpu": {"guest": 2}, "memory": {"guest": "4Gi"}},
                    }),
    ]


async def ensure_common(client: rest.Client) -> int:
    """Create the missing common instance types and preferences; returns how many were created."""
    created = 0
    for gvr, objs in ((CLUSTER_INSTANCETYPES, instancetype_objects()), (CLUSTER_PREFERENCES, preference_objects())):
        for obj in objs:
            try:
                await client.create(gvr, obj)
                created += 1
            except rest.Conflict:
                pass  # already there (an earlier start, or the administrator's own): keep it
    if created:
        log.info("created %d common instance types and preferences", created)
    return created
