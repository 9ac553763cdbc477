"""CPU weight of VMs and of virtplane's own daemons through the cgroup CPU controller, arranged as the kubelet
arranges pods and system daemons.

The kubelet puts every pod under one `kubepods` cgroup whose cpu.shares equal the node's allocatable CPU,
and gives each pod `request x 1024` shares per core inside it; the node's daemons (the kubelet itself, the
container runtime) sit beside `kubepods` in `system.slice`, so however many pods are busy, the daemons keep
their share. virtplane does the same:

    <cpu controller>/virtplane/<node scope>/<vm>     the VMs (kubepods)
    <cpu controller>/virtplane-system                the API server, controllers, node agents (system-reserved)

`virtplane` and each node scope weigh as many cores as the host has; each VM weighs its CPU request
(process.nice_for_cpu_request explains the numbers). `virtplane-system` weighs SYSTEM_CORES_FACTOR times the
host's cores: when guests and the control plane both want the CPU, the control plane gets ~90 % of it, and
when it is idle (it usually is) the guests get everything. It is a sibling of `virtplane`, not a child, so
the guests' weight against everything else on the host stays what their requests make it. A QEMU starts up
in its node agent's group (the launch is the node's work) and moves to its VM's group, with its vCPUs still
stopped, once its monitor answers (Machine._launch). Without this, 100 booting TCG guests on 2 cores left
the control plane a few percent of the CPU and every VMI waited seconds to be scheduled, started and
reported Running (bench/density.py, docs/performance.md "Density").

cgroup v1 (`cpu.shares`) and v2 (`cpu.weight`, converted as the kubelet converts) are both handled; where
neither is writable, `CPUControl.detect` returns None and VMs run at their niceness only, and
`join_system_group` leaves the daemon where it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
TOP = "virtplane"
SYSTEM = "virtplane-system"
SYSTEM_CORES_FACTOR = 8  # virtplane-system weighs 8x the host's cores: ~89 % of a CPU the guests also want
MIN_SHARES = 2
MAX_SHARES = 262144  # the kernel's ceiling for cpu.shares
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def shares_for(cores: float) -> int:
    """cpu.shares for a CPU request, as the kubelet computes them (MilliCPUToShares)."""
    return max(MIN_SHARES, int(cores * 1024))


def system_shares(cpus: int | None = None) -> int:
    """cpu.shares of `virtplane-system` on a host with `cpus` cores."""
    return min(MAX_SHARES, SYSTEM_CORES_FACTOR * shares_for(cpus or os.cpu_count() or 1))


def v2_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for v1 shares, the kubelet's (and runc's) conversion."""
    return 1 + ((shares - 2) * 9999) // 262142


class CPUControl:
    """One node agent's VM cgroups. Create with `detect`."""

    def __init__(self, scope_dir: Path, version: int) -> None:
        self.scope_dir = scope_dir
        self.version = version

    @classmethod
    def detect(cls, scope: str) -> CPUControl | None:
        """The node's VM cgroup parent, created if needed; None where the CPU controller cannot be used."""
        host_shares = shares_for(os.cpu_count() or 1)
        scope = _SAFE.sub("_", scope)
        try:
            layout = _layout()
            if layout is None:
                return None
            root, version = layout
            top = root / TOP
            top.mkdir(exist_ok=True)
            if version == 2:
                _enable_cpu(top)
            control = cls(top / scope, version)
            control._set_weight(top, host_shares)
            control.scope_dir.mkdir(exist_ok=True)
            control._set_weight(control.scope_dir, host_shares)
            for child in control.scope_dir.iterdir():  # VMs that ended while no agent was running
                if child.is_dir():
                    release(child)
            if control.version == 2:
                _enable_cpu(control.scope_dir)
        except OSError as err:
            log.warning("VM CPU weights by niceness only: the cgroup CPU controller is not usable (%s)", err)
            return None
        return control

    def place(self, pid: int, name: str, cores: float) -> Path | None:
        """Move a freshly started VM process (all its threads) into a cgroup of its own weighing `cores`."""
        path = self.scope_dir / _SAFE.sub("_", name)
        try:
            path.mkdir(exist_ok=True)
            self._set_weight(path, shares_for(cores))
            # v1: cgroup.procs moves the whole thread group; v2 likewise.
            (path / "cgroup.procs").write_text(str(pid))
        except OSError as err:
            log.warning("cannot give pid %s its CPU weight in %s: %s", pid, path, err)
            return None
        return path

    def close(self) -> None:
        """Remove the node scope when nothing runs in it any more (VMs left running keep theirs)."""
        with contextlib.suppress(OSError):
            for child in self.scope_dir.iterdir():
                if child.is_dir():
                    release(child)
        release(self.scope_dir)
        release(self.scope_dir.parent)  # the host-wide `virtplane` group, once no node uses it

    def _set_weight(self, path: Path, shares: int) -> None:
        _write_weight(path, self.version, shares)


def release(path: Path) -> None:
    """rmdir a cgroup once its processes are gone; busy or already gone is not an error."""
    with contextlib.suppress(OSError):
        path.rmdir()


def cgroup_of(pid: int) -> Path | None:
    """The virtplane VM cgroup a process is in (to release it when the process exits), if any."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if not rel.startswith(f"/{TOP}/"):
            continue
        if controllers == "" and (V2_ROOT / "cgroup.controllers").exists():
            return V2_ROOT / rel.lstrip("/")
        if "cpu" in controllers.split(","):
            return V1_CPU / rel.lstrip("/")
    return None


def join_system_group(pid: int = 0) -> Path | None:
    """Move a virtplane daemon (default: this process, every thread) into `virtplane-system`, created with its
    weight if needed; the processes it starts later (node agents, QEMU until it takes its VM's weight, qemu-img)
    start there too. None, with a warning, where the CPU controller cannot be used."""
    pid = pid or os.getpid()
    try:
        layout = _layout()
        if layout is None:
            return None
        root, version = layout
        group = root / SYSTEM
        group.mkdir(exist_ok=True)
        _write_weight(group, version, system_shares())
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as err:
        log.warning("virtplane's daemons keep the host's default CPU weight: the cgroup CPU controller is not "
                    "usable (%s)", err)
        return None
    return group


def _layout() -> tuple[Path, int] | None:
    """(the CPU controller's root, cgroup version), with cpu enabled for the root's children on v2; None where
    there is no usable CPU controller."""
    if (V2_ROOT / "cgroup.controllers").exists():
        if "cpu" not in (V2_ROOT / "cgroup.controllers").read_text().split():
            return None
        _enable_cpu(V2_ROOT)
        return V2_ROOT, 2
    if (V1_CPU / "cpu.shares").exists():
        return V1_CPU, 1
    return None


def _write_weight(path: Path, version: int, shares: int) -> None:
    if version == 1:
        (path / "cpu.shares").write_text(str(shares))
    else:
        (path / "cpu.weight").write_text(str(v2_weight(shares)))


def _enable_cpu(path: Path) -> None:
    control = path / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu")
