"""RunState guards and adoption bookkeeping (no QEMU started)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from virtplane.hypervisor.errors import InvalidStateError
from virtplane.hypervisor.machine import ALLOWED, Machine, RunState
from virtplane.hypervisor.process import ExitInfo
from virtplane.hypervisor.qmp import QMPEvent
from virtplane.hypervisor.runtime import RuntimeDir


@pytest.fixture
def machine(vmi, runtime, volumes, nets) -> Machine:
    return Machine.create(vmi, runtime, volumes, nets, "tcg")


async def test_created_machine_allows_only_start(machine: Machine) -> None:
    assert machine.state == RunState.CREATED
    with pytest.raises(InvalidStateError) as err:
        await machine.pause()
    assert "pause" in str(err.value) and "Created" in str(err.value)
    assert err.value.action == "pause" and err.value.state == RunState.CREATED
    for action in (machine.resume, machine.powerdown, machine.reset, machine.reboot, machine.query_status,
                   machine.stats, machine.guest_ping):  # fmt: skip
        with pytest.raises(InvalidStateError):
            await action()
    with pytest.raises(InvalidStateError):
        await machine.kill()
    with pytest.raises(InvalidStateError):
        await machine.unplug_disk("x")
    with pytest.raises(InvalidStateError):
        await machine.wait_exit()


@pytest.mark.parametrize(
    ("state", "action", "allowed"),
    [
        (RunState.PAUSED, "pause", False),
        (RunState.PAUSED, "resume", True),
        (RunState.RUNNING, "resume", False),
        (RunState.RUNNING, "pause", True),
        (RunState.PAUSED, "powerdown", False),
        (RunState.SHUTTING_DOWN, "powerdown", True),
        (RunState.STOPPED, "kill", False),
        (RunState.CRASHED, "start", False),
        (RunState.SHUTTING_DOWN, "hotplug_disk", False),
        (RunState.PAUSED, "guest_agent", False),
        (RunState.RUNNING, "start", False),
    ],
)
def test_guard_table(machine: Machine, state: RunState, action: str, allowed: bool) -> None:
    machine._state = state
    if allowed:
        machine._guard(action)
    else:
        with pytest.raises(InvalidStateError) as err:
            machine._guard(action)
        assert action in str(err.value) and state.value in str(err.value)


def test_terminal_states_stay_terminal(machine: Machine) -> None:
    machine._state = RunState.CRASHED
    machine._set_state(RunState.RUNNING)
    assert machine.state == RunState.CRASHED
    assert not RunState.STOPPED.alive and RunState.PAUSED.alive
    assert ALLOWED["kill"] == frozenset(s for s in RunState if s.alive)


async def test_migration_actions_need_a_live_machine(machine: Machine) -> None:
    # (live migration itself runs end to end in tests/e2e/migration)
    with pytest.raises(InvalidStateError):
        await machine.migrate("tcp:127.0.0.1:4444")
    with pytest.raises(InvalidStateError):
        await machine.listen_incoming("tcp:127.0.0.1:0")
    assert machine.state == RunState.CREATED


async def test_adopt_nothing(tmp_path: Path) -> None:
    assert await Machine.adopt(RuntimeDir(tmp_path / "empty")) is None


def _record(runtime: RuntimeDir, argv: list[str], pid: int) -> None:
    runtime.create()
    runtime.cmdline_file.write_text(json.dumps({"argv": argv, "spec_hash": "abc", "accel": "tcg"}))
    runtime.pid_file.write_text(f"{pid}\n")


def _dead_foreign_pid() -> int:
    # sh reaps its own child: the pid is dead and was never ours.
    out = subprocess.run(["sh", "-c", "true & echo $!; wait"], capture_output=True, text=True, check=True)
    return int(out.stdout)


def _zombie_child(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv)
    # Wait for it to become a zombie without reaping it (WNOWAIT).
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    return proc


async def test_adopt_dead_process_not_our_child(runtime: RuntimeDir) -> None:
    _record(runtime, ["qemu-system-x86_64", "-name", "x"], _dead_foreign_pid())
    m = await Machine.adopt(runtime)
    assert m is not None
    assert m.state == RunState.CRASHED
    assert m.reason == "process gone"
    assert m.spec_hash == "abc"
    assert (await m.wait_exit(0)).exit_code is None
    # remembered for the next adoption
    assert json.loads(runtime.exit_file.read_text())["state"] == "Crashed"


async def test_adopt_recycled_pid(runtime: RuntimeDir) -> None:
    _record(runtime, ["qemu-system-x86_64", "-name", "x"], os.getpid())  # alive, but not that program
    m = await Machine.adopt(runtime)
    assert m is not None and m.state == RunState.CRASHED
    assert "another program" in m.reason


async def test_adopt_zombie_child_reports_exit_status(runtime: RuntimeDir) -> None:
    proc = _zombie_child(["sh", "-c", "exit 3"])
    _record(runtime, ["sh", "-c", "exit 3"], proc.pid)
    m = await Machine.adopt(runtime)
    assert m is not None and m.state == RunState.CRASHED
    assert m.exit_info is not None and m.exit_info.exit_code == 3
    assert m.reason == "exited with code 3"
    proc.returncode = 3  # reaped by adopt(); keep Popen from trying again


async def test_adopt_prefers_recorded_exit(runtime: RuntimeDir) -> None:
    _record(runtime, ["qemu-system-x86_64"], 999_999_999)
    runtime.exit_file.write_text(json.dumps({"exit_code": 0, "signal": None, "reason": "shutdown: guest-shutdown",
                                             "state": "Stopped"}))  # fmt: skip
    m = await Machine.adopt(runtime)
    assert m is not None and m.state == RunState.STOPPED and m.reason == "shutdown: guest-shutdown"


def ev(name: str, **data: object) -> QMPEvent:
    return QMPEvent(name=name, data=dict(data), timestamp=0.0)


async def test_events_move_the_state(machine: Machine) -> None:
    seen: list[tuple[RunState, str]] = []
    machine.add_state_listener(lambda s, r: seen.append((s, r)))
    machine._state = RunState.RUNNING
    await machine._on_event(ev("STOP"))
    assert machine.state == RunState.PAUSED and machine.reason == "stopped"
    await machine._on_event(ev("RESUME"))
    assert machine.state == RunState.RUNNING
    await machine._on_event(ev("RESET", guest=True, reason="guest-reset"))
    assert machine.state == RunState.RUNNING and machine.reason == "reset by guest (guest-reset)"
    await machine._on_event(ev("BLOCK_IO_ERROR", device="", **{"node-name": "d-root"}, operation="write",
                               action="stop", reason="No space left on device"))  # fmt: skip
    assert machine.state == RunState.PAUSED and "d-root" in machine.reason and "No space" in machine.reason
    await machine._on_event(ev("RESUME"))
    await machine._on_event(ev("MIGRATION", status="active"))
    assert machine.state == RunState.MIGRATING
    await machine._on_event(ev("MIGRATION", status="completed"))
    assert machine.state == RunState.PAUSED and machine.reason == "migrated"
    await machine._on_event(ev("RESUME"))
    # the guest powered off: QEMU pauses (-action shutdown=pause), the Machine asks it to quit
    await machine._on_event(ev("SHUTDOWN", guest=True, reason="guest-shutdown"))
    assert machine.state == RunState.SHUTTING_DOWN and machine.reason == "shutdown: guest-shutdown"
    assert machine._quit_requested
    await machine._on_event(ev("SHUTDOWN", guest=False, reason="host-qmp-quit"))  # the echo of our quit
    assert machine.reason == "shutdown: guest-shutdown"
    assert [s for s, _ in seen][:2] == [RunState.PAUSED, RunState.RUNNING]


async def test_exit_after_quit_is_clean_even_without_status(machine: Machine) -> None:
    machine._state = RunState.SHUTTING_DOWN
    machine.reason = "shutdown: guest-shutdown"
    machine._quit_requested = True
    machine._on_exit(ExitInfo(None, None, "process gone"))  # adopted: not our child
    assert machine.state == RunState.STOPPED and machine.reason == "shutdown: guest-shutdown"


async def test_unexpected_exit_is_a_crash(machine: Machine, runtime: RuntimeDir) -> None:
    runtime.create()
    runtime.stderr_log.write_text("qemu-system-x86_64: something broke\n")
    machine._state = RunState.RUNNING
    machine._on_exit(ExitInfo(1, None, "exited with code 1"))
    assert machine.state == RunState.CRASHED
    assert machine.reason == "exited with code 1: qemu-system-x86_64: something broke"
    assert json.loads(runtime.exit_file.read_text())["state"] == "Crashed"


async def test_detached_machine_refuses_actions(machine: Machine) -> None:
    machine._state = RunState.RUNNING
    await machine.detach()
    with pytest.raises(InvalidStateError, match="detached"):
        await machine.pause()


def test_cpu_request_sets_kubernetes_weight() -> None:
    """cpu.shares = request x 1024 per core, as the kubelet sets it, expressed as a niceness."""
    from virtplane.hypervisor.process import nice_for_cpu_request

    assert nice_for_cpu_request(None) == 0 and nice_for_cpu_request(1) == 0 and nice_for_cpu_request(4) == 0
    assert nice_for_cpu_request(0.1) == 10  # 102 shares: weight 110 at nice 10
    assert nice_for_cpu_request(0.5) == 3
    assert nice_for_cpu_request(0.001) == 19  # clamped


def test_cgroup_weights_follow_the_kubelet() -> None:
    from virtplane.hypervisor.cgroups import shares_for, v2_weight

    assert shares_for(0.1) == 102 and shares_for(2) == 2048 and shares_for(0) == 2
    assert v2_weight(102) == 4 and v2_weight(1024) == 39 and v2_weight(2) == 1
