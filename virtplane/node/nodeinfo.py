"""The Node object this agent registers and keeps true, built from facts read off the host.

`HostFacts.collect()` does the reading (procfs, os-release, the QEMU binary's version); `build_node_status`
and `node_labels` are pure so tests can check every field from a hand-made `HostFacts`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import re
from pathlib import Path
from typing import Any

from virtplane.hypervisor.accel import AccelProbe

from .status import now_rfc3339

JSON = dict[str, Any]

KUBELET_VERSION = "v1.32.0-virtplane"
MAX_PODS = 110
# kubelet's default hard eviction threshold: allocatable memory = capacity - 100Mi.
EVICTION_RESERVE_BYTES = 100 << 20
KVM_RESOURCE = "devices.kubevirt.io/kvm"
KVM_DEVICE_COUNT = "1k"  # KubeVirt's device plugin advertises 1000 shares of /dev/kvm
ACCEL_ANNOTATION = "virtplane.io/accel"
ACCEL_REASON_ANNOTATION = "virtplane.io/accel-reason"
AGENT_FINGERPRINT_ANNOTATION = "virtplane.io/agent-cert-sha256"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
# Named CPU models QEMU's TCG emulates fully; under KVM the host's model is used (host-model).
TCG_CPU_MODELS = ("qemu64",)
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


@dataclasses.dataclass(frozen=True, slots=True)
class HostFacts:
    cpus: int
    memory_bytes: int
    ephemeral_storage_bytes: int
    kernel_version: str
    os_image: str
    architecture: str
    machine_id: str
    boot_id: str
    qemu_version: str

    @classmethod
    async def collect(cls, data_dir: Path, qemu_binary: str = "qemu-system-x86_64") -> HostFacts:
        return await asyncio.to_thread(cls._collect_sync, data_dir, await qemu_version(qemu_binary))

    @classmethod
    def _collect_sync(cls, data_dir: Path, qemu: str) -> HostFacts:
        st = os.statvfs(data_dir)
        return cls(
            cpus=len(os.sched_getaffinity(0)) or os.cpu_count() or 1,
            memory_bytes=_meminfo_total(),
            ephemeral_storage_bytes=st.f_blocks * st.f_frsize,
            kernel_version=platform.release(),
            os_image=_os_image(),
            architecture=_GO_ARCH.get(platform.machine(), platform.machine()),
            machine_id=_read("/etc/machine-id"),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            qemu_version=qemu,
        )


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _meminfo_total() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return "Linux"


async def qemu_version(binary: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
    except OSError:
        return "unknown"
    m = re.search(r"version (\S+)", out.decode(errors="replace"))
    return m.group(1) if m else "unknown"


def _ki(n: int) -> str:
    return f"{n // 1024}Ki"


def node_labels(name: str, facts: HostFacts, probe: AccelProbe) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": facts.architecture,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": facts.architecture,
        SCHEDULABLE_LABEL: "true",
    }
    if probe.kvm_usable:
        labels["cpu-model.node.kubevirt.io/host-model"] = "true"
    else:
        for model in TCG_CPU_MODELS:
            labels[f"cpu-model.node.kubevirt.io/{model}"] = "true"
    return labels


def node_annotations(probe: AccelProbe, fingerprint: str) -> dict[str, str]:
    return {
        ACCEL_ANNOTATION: probe.accel,
        ACCEL_REASON_ANNOTATION: probe.reason,
        AGENT_FINGERPRINT_ANNOTATION: fingerprint,
    }


def resources(facts: HostFacts, probe: AccelProbe) -> tuple[JSON, JSON]:
    capacity = {
        "cpu": str(facts.cpus),
        "memory": _ki(facts.memory_bytes),
        "pods": str(MAX_PODS),
        "ephemeral-storage": _ki(facts.ephemeral_storage_bytes),
    }
    allocatable = {**capacity, "memory": _ki(max(0, facts.memory_bytes - EVICTION_RESERVE_BYTES))}
    if probe.kvm_usable:
        # Only a KVM that ran a guest counts: /dev/kvm existing proves nothing (see hypervisor.accel).
        capacity[KVM_RESOURCE] = allocatable[KVM_RESOURCE] = KVM_DEVICE_COUNT
    return capacity, allocatable


def build_node_status(
    facts: HostFacts,
    probe: AccelProbe,
    *,
    address: str,
    hostname: str,
    port: int,
    old: JSON | None = None,
    now: str | None = None,
) -> JSON:
    """The Node's status: capacity, conditions (transition times kept from `old`), nodeInfo, endpoints."""
    now = now or now_rfc3339()
    capacity, allocatable = resources(facts, probe)
    old_conditions = {c.get("type"): c for c in (old or {}).get("conditions") or []}

    def cond(ctype: str, status: str, reason: str, message: str) -> JSON:
        prev = old_conditions.get(ctype) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        return {"type": ctype, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": since or now}  # fmt: skip

    accel_note = "KVM" if probe.kvm_usable else f"software emulation (TCG): {probe.reason}"
    return {
        "capacity": capacity,
        "allocatable": allocatable,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "node agent has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", f"virtplane node agent is posting ready status; VMs run with "
                                                  f"{accel_note}"),
        ],
        "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": hostname}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": facts.machine_id,
            "systemUUID": facts.machine_id,
            "bootID": facts.boot_id,
            "kernelVersion": facts.kernel_version,
            "osImage": facts.os_image,
            "containerRuntimeVersion": f"qemu://{facts.qemu_version}",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": facts.architecture,
        },
    }
