"""Where virtplane puts VMs and its own daemons in the cgroup CPU controller (cgroups.py), on a fake cgroupfs:
plain directories and files laid out as the v1 `cpu` hierarchy or the v2 unified one. (A real QEMU's placement
is checked end to end in tests/e2e/vm/test_lifecycle.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtplane.hypervisor import cgroups


class FakeCgroupFS:
    """Directories that behave like cgroupfs for what cgroups.py does: mkdir creates the control files."""

    def __init__(self, root: Path, version: int) -> None:
        self.root = root
        self.version = version
        root.mkdir(parents=True, exist_ok=True)
        self.populate(root)
        if version == 2:
            (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
            (root / "cgroup.subtree_control").write_text("\n")

    def populate(self, path: Path) -> None:
        for name in ("cpu.shares",) if self.version == 1 else ("cpu.weight", "cgroup.subtree_control"):
            (path / name).write_text("1024\n" if name == "cpu.shares" else "100\n" if name == "cpu.weight" else "")
        (path / "cgroup.procs").write_text("")

    def weight(self, rel: str) -> int:
        return int((self.root / rel / ("cpu.shares" if self.version == 1 else "cpu.weight")).read_text())

    def procs(self, rel: str) -> str:
        return (self.root / rel / "cgroup.procs").read_text()


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def fs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupFS:
    version = request.param
    fake = FakeCgroupFS(tmp_path / ("cpu" if version == 1 else "unified"), version)
    monkeypatch.setattr(cgroups, "V1_CPU", fake.root if version == 1 else tmp_path / "absent")
    monkeypatch.setattr(cgroups, "V2_ROOT", fake.root if version == 2 else tmp_path / "absent")
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        existed = self.exists()
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        if not existed and fake.root in self.parents:
            fake.populate(self)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    return fake


def test_daemons_get_the_system_reserve_beside_the_vms(fs: FakeCgroupFS) -> None:
    group = cgroups.join_system_group(4242)
    assert group == fs.root / "virtplane-system"
    assert fs.procs("virtplane-system") == "4242"
    # 8 x the host's cores (2 here) against the VMs' 2 cores: the control plane wins ~89 % of contended CPU
    assert cgroups.system_shares(2) == 16384
    if fs.version == 1:
        assert fs.weight("virtplane-system") == 16384
    else:
        assert fs.weight("virtplane-system") == cgroups.v2_weight(16384) == 625
        assert "cpu" in (fs.root / "cgroup.subtree_control").read_text()


def test_vms_weigh_their_request_under_the_node_scope(fs: FakeCgroupFS) -> None:
    control = cgroups.CPUControl.detect("virtplane-node-1-abcd")
    assert control is not None and control.version == fs.version
    path = control.place(777, "default_vm1", 0.1)
    assert path == fs.root / "virtplane" / "virtplane-node-1-abcd" / "default_vm1"
    assert fs.procs("virtplane/virtplane-node-1-abcd/default_vm1") == "777"
    expect = (lambda shares: shares) if fs.version == 1 else cgroups.v2_weight
    assert fs.weight("virtplane/virtplane-node-1-abcd/default_vm1") == expect(102)
    assert fs.weight("virtplane/virtplane-node-1-abcd") == expect(2048)
    assert fs.weight("virtplane") == expect(2048)  # the guests' weight against the rest of the host
    # The system group is a sibling of the VMs' top group, never inside it: the guests' share of the host does
    # not grow with the control plane's reserve.
    cgroups.join_system_group(4242)
    assert not (fs.root / "virtplane" / "virtplane-system").exists()
    assert system_ratio(fs) > 0.85


def system_ratio(fs: FakeCgroupFS) -> float:
    """The system group's share of a CPU that it and every VM want."""
    system, vms = fs.weight("virtplane-system"), fs.weight("virtplane")
    return system / (system + vms)


def test_no_cpu_controller_means_no_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "V1_CPU", tmp_path / "none")
    monkeypatch.setattr(cgroups, "V2_ROOT", tmp_path / "none")
    assert cgroups.join_system_group(1) is None
    assert cgroups.CPUControl.detect("node") is None


def test_an_unwritable_controller_is_not_fatal(fs: FakeCgroupFS, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cgroups.join_system_group(1) is None
    assert cgroups.CPUControl.detect("node") is None


class RecordingControl:
    """A CPUControl stand-in that records where the VM was placed and when."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.placed: list[tuple[int, str, float]] = []

    def place(self, pid: int, name: str, cores: float) -> Path:
        self.log.append("place")
        self.placed.append((pid, name, cores))
        return Path("/nonexistent") / name


@pytest.mark.parametrize("paused", [False, True])
async def test_qemu_takes_its_vm_weight_after_start_up_before_the_guest_runs(
        vmi: dict, runtime: object, volumes: dict, nets: dict, monkeypatch: pytest.MonkeyPatch,
        paused: bool) -> None:  # fmt: skip
    """Start-up (exec → monitor handshake) runs with the node agent's weight; the VM's cgroup is entered before
    `cont`, so no guest instruction runs outside it, whatever the startStrategy."""
    import subprocess

    from virtplane.hypervisor import machine as machine_mod

    log: list[str] = []
    control = RecordingControl(log)
    vmi["spec"]["domain"]["resources"]["requests"]["cpu"] = "250m"
    m = machine_mod.Machine.create(vmi, runtime, volumes, nets, "tcg", cpu_control=control)  # type: ignore[arg-type]
    # a live pid for the process watch (no QEMU here); a plain Popen, as Machine reaps through its pidfd
    stand_in = subprocess.Popen(["sleep", "30"])  # noqa: ASYNC220

    def spawn(*_args: object) -> int:
        log.append("spawn")
        return stand_in.pid

    async def attach_monitor(_timeout: float) -> None:
        log.append("monitor")

    async def qmp_exec(command: str, *_args: object) -> dict:
        log.append(command)
        return {}

    monkeypatch.setattr(machine_mod, "spawn", spawn)
    monkeypatch.setattr(m, "_attach_monitor", attach_monitor)
    monkeypatch.setattr(m, "_qmp_exec", qmp_exec)
    try:
        await m.start(paused=paused)
        assert log == ["spawn", "monitor", "place"] + ([] if paused else ["cont"])
        assert control.placed == [(stand_in.pid, runtime.path.name, 0.25)]  # type: ignore[attr-defined]
        assert m.record.cpu_cores == 0.25  # kept in cmdline.json for an agent that adopts this QEMU
    finally:
        stand_in.kill()
        stand_in.wait()
