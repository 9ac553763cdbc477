"""CPU weight of VMs through the cgroup CPU controller, arranged as the kubelet arranges pods.

The kubelet puts every pod under one `kubepods` cgroup whose cpu.shares equal the node's allocatable CPU,
and gives each pod `request x 1024` shares per core inside it. The node's own daemons sit beside `kubepods`,
so however many pods are busy, the daemons keep their share. virtplane does the same for QEMU:

    <cpu controller>/virtplane/<node scope>/<vm>

`virtplane` and each node scope weigh as many cores as the host has; each VM weighs its CPU request
(process.nice_for_cpu_request explains the numbers). Without it, a 2-core host booting 100 TCG guests left
the node agent and the API server 1 % of the CPU: every QEMU is an autogroup weighing as much as the whole
control plane (bench/density.py).

cgroup v1 (`cpu.shares`) and v2 (`cpu.weight`, converted as the kubelet converts) are both handled; where
neither is writable, `CPUControl.detect` returns None and VMs run at their niceness only.
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
MIN_SHARES = 2
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def shares_for(cores: float) -> int:
    """cpu.shares for a CPU request, as the kubelet computes them (MilliCPUToShares)."""
    return max(MIN_SHARES, int(cores * 1024))


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
            if (V2_ROOT / "cgroup.controllers").exists():
                if "cpu" not in (V2_ROOT / "cgroup.controllers").read_text().split():
                    return None
                top = V2_ROOT / TOP
                _enable_cpu(V2_ROOT)
                top.mkdir(exist_ok=True)
                _enable_cpu(top)
                control = cls(top / scope, 2)
            elif (V1_CPU / "cpu.shares").exists():
                top = V1_CPU / TOP
                top.mkdir(exist_ok=True)
                control = cls(top / scope, 1)
            else:
                return None
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
        if self.version == 1:
            (path / "cpu.shares").write_text(str(shares))
        else:
            (path / "cpu.weight").write_text(str(v2_weight(shares)))


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


def _enable_cpu(path: Path) -> None:
    control = path / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu")
