"""Per-VMI metrics in Prometheus text format, with KubeVirt's metric names and labels (name, namespace, node).

Read from the hypervisor layer's `Machine.stats()` (host process accounting + QEMU's block counters). Network
counters come from tap devices; the interim user-mode network has none, so those series appear only once the
network layer provides taps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from virtplane.hypervisor.devices import disk_device_id
from virtplane.hypervisor.errors import HypervisorError
from virtplane.hypervisor.stats import MachineStats

from .status import disk_targets
from .vmiruntime import VMIRuntime

# name → (type, help)
METRICS: dict[str, tuple[str, str]] = {
    "kubevirt_vmi_memory_resident_bytes": ("gauge", "Resident set size of the process running the domain."),
    "kubevirt_vmi_cpu_usage_seconds_total": ("counter", "Total CPU time spent in all modes (sum of user and "
                                                        "system) by the domain process."),
    "kubevirt_vmi_vcpu_seconds_total": ("counter", "Total amount of time spent in each state by each vcpu."),
    "kubevirt_vmi_network_receive_bytes_total": ("counter", "Total network traffic received in bytes."),
    "kubevirt_vmi_network_transmit_bytes_total": ("counter", "Total network traffic transmitted in bytes."),
    "kubevirt_vmi_network_receive_packets_total": ("counter", "Total network traffic received packets."),
    "kubevirt_vmi_network_transmit_packets_total": ("counter", "Total network traffic transmitted packets."),
    "kubevirt_vmi_storage_read_traffic_bytes_total": ("counter", "Total number of bytes read from storage."),
    "kubevirt_vmi_storage_write_traffic_bytes_total": ("counter", "Total number of written bytes to storage."),
    "kubevirt_vmi_storage_iops_read_total": ("counter", "Total number of I/O read operations."),
    "kubevirt_vmi_storage_iops_write_total": ("counter", "Total number of I/O write operations."),
    "kubevirt_vmi_memory_domain_bytes": ("gauge", "The amount of memory in bytes allocated to the domain "
                                                  "(the balloon's view)."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def samples(base: Mapping[str, str], stats: MachineStats, targets: Mapping[str, str]) -> list[tuple[str, str, float]]:
    """(metric, rendered labels, value) for one VM."""
    out: list[tuple[str, str, float]] = []
    b = dict(base)
    out.append(("kubevirt_vmi_memory_resident_bytes", _labels(b), stats.rss_bytes))
    out.append(("kubevirt_vmi_cpu_usage_seconds_total", _labels(b), stats.cpu_time))
    for idx, seconds in sorted(stats.vcpu_times.items()):
        out.append(("kubevirt_vmi_vcpu_seconds_total", _labels({**b, "id": str(idx), "state": "running"}), seconds))
    for iface, net in sorted(stats.net.items()):
        labels = _labels({**b, "interface": iface})
        out.append(("kubevirt_vmi_network_receive_bytes_total", labels, net.rx_bytes))
        out.append(("kubevirt_vmi_network_transmit_bytes_total", labels, net.tx_bytes))
        out.append(("kubevirt_vmi_network_receive_packets_total", labels, net.rx_packets))
        out.append(("kubevirt_vmi_network_transmit_packets_total", labels, net.tx_packets))
    by_device = {disk_device_id(name): target for name, target in targets.items()}
    for dev_id, blk in sorted(stats.block.items()):
        drive = by_device.get(dev_id)
        if drive is None:
            continue
        labels = _labels({**b, "drive": drive})
        out.append(("kubevirt_vmi_storage_read_traffic_bytes_total", labels, blk.rd_bytes))
        out.append(("kubevirt_vmi_storage_write_traffic_bytes_total", labels, blk.wr_bytes))
        out.append(("kubevirt_vmi_storage_iops_read_total", labels, blk.rd_operations))
        out.append(("kubevirt_vmi_storage_iops_write_total", labels, blk.wr_operations))
    if stats.balloon_bytes is not None:
        out.append(("kubevirt_vmi_memory_domain_bytes", _labels(b), stats.balloon_bytes))
    return out


def render(all_samples: Iterable[tuple[str, str, float]]) -> str:
    grouped: dict[str, list[tuple[str, float]]] = {}
    for metric, labels, value in all_samples:
        grouped.setdefault(metric, []).append((labels, value))
    lines: list[str] = []
    for metric, (mtype, help_text) in METRICS.items():
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {mtype}")
        for labels, value in grouped.get(metric, []):
            lines.append(f"{metric}{labels} {value:.6g}" if isinstance(value, float) and not value.is_integer()
                         else f"{metric}{labels} {int(value)}")
    return "\n".join(lines) + "\n"


async def collect(runtimes: Iterable[VMIRuntime], node: str, vmis: Mapping[tuple[str, str], dict]) -> str:
    all_samples: list[tuple[str, str, float]] = []
    for rt in runtimes:
        machine = rt.machine
        if machine is None or not machine.state.alive:
            continue
        with contextlib.suppress(HypervisorError):
            stats = await machine.stats()
            vmi = vmis.get(rt.key) or {}
            base = {"name": rt.meta.name, "namespace": rt.meta.namespace, "node": node}
            all_samples += samples(base, stats, disk_targets(vmi))
    return render(all_samples)
