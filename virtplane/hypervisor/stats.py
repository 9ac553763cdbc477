"""Resource usage of a running VM: host-side process accounting plus QEMU's own block counters."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True, slots=True)
class BlockStats:
    rd_bytes: int
    wr_bytes: int
    rd_operations: int
    wr_operations: int
    flush_operations: int


@dataclasses.dataclass(frozen=True, slots=True)
class NetStats:
    """From the guest's point of view (the tap's rx is the guest's tx)."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclasses.dataclass(frozen=True, slots=True)
class MachineStats:
    cpu_time: float  # seconds of host CPU (user + system) QEMU used: vCPUs, emulation, I/O
    rss_bytes: int
    vcpu_times: dict[int, float]  # vCPU index → seconds of host CPU its thread used
    block: dict[str, BlockStats]  # guest device id (disk-<name>) → counters
    net: dict[str, NetStats]  # interface name → counters (only taps: user networking has none)
    balloon_bytes: int | None  # guest memory as the balloon reports it


def _stat_fields(path: Path) -> list[str] | None:
    try:
        stat = path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after "(comm)"; index 0 is field 3 (state) of proc(5).
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    path = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    fields = _stat_fields(path)
    if fields is None:
        return None
    utime, stime = int(fields[11]), int(fields[12])  # proc(5) fields 14 and 15
    return (utime + stime) / _CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return resident * _PAGE_SIZE


def tap_stats(ifname: str) -> NetStats | None:
    base = Path("/sys/class/net") / ifname / "statistics"

    def read(name: str) -> int:
        return int((base / name).read_text())

    try:
        return NetStats(
            rx_bytes=read("tx_bytes"), tx_bytes=read("rx_bytes"),
            rx_packets=read("tx_packets"), tx_packets=read("rx_packets"),
        )  # fmt: skip
    except (FileNotFoundError, ValueError):
        return None


def block_stats(query_blockstats: list[dict[str, Any]]) -> dict[str, BlockStats]:
    out: dict[str, BlockStats] = {}
    for entry in query_blockstats:
        qdev = entry.get("qdev") or ""
        # qdev is the device id or a QOM path such as /machine/peripheral/<id>/virtio-backend.
        if qdev.startswith("/machine/peripheral/"):
            dev_id = qdev.split("/")[3]
        else:
            dev_id = qdev
        if not dev_id or dev_id.startswith("/"):
            continue
        s = entry.get("stats") or {}
        out[dev_id] = BlockStats(
            rd_bytes=int(s.get("rd_bytes", 0)), wr_bytes=int(s.get("wr_bytes", 0)),
            rd_operations=int(s.get("rd_operations", 0)), wr_operations=int(s.get("wr_operations", 0)),
            flush_operations=int(s.get("flush_operations", 0)),
        )  # fmt: skip
    return out
