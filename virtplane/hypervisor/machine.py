"""`Machine`: one QEMU process and the closed set of actions the node agent may take on it.

Firecracker-style: every action checks the current `RunState` and raises `InvalidStateError` naming the
action and the state when it is not allowed; QMP events and the process exit move the state, actions
only request. The runtime directory holds everything needed to re-attach after the node agent restarts
(`Machine.adopt`): QEMU outlives its agent by design.

Live migration: `start(incoming=True)` launches the target with `-incoming defer` (then `listen_incoming`),
`migrate(uri, ...)` drives QMP `migrate` on the source; MIGRATION events move the state (`MIGRATING`, then the
source PAUSED "migrated" and the target RUNNING).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from . import cgroups
from . import devices as dev
from .devices.base import short_id
from .errors import (
    HypervisorError,
    InvalidStateError,
    LaunchError,
    QMPCommandError,
    QMPConnectError,
    QMPDisconnectedError,
    QMPTimeoutError,
    UnsupportedSpecError,
)
from .process import (
    ExitInfo,
    ProcessWatch,
    nice_for_cpu_request,
    proc_cmdline,
    proc_state,
    reap_soon,
    set_niceness,
    spawn,
)
from .qmp import QMP, EventStream, GuestAgent, QMPEvent
from .quantity import QuantityError, parse_cpu
from .runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir
from .stats import MachineStats, NetStats, block_stats, cpu_seconds, rss_bytes, tap_stats

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class RunState(enum.StrEnum):
    CREATED = "Created"  # nothing launched yet
    STARTING = "Starting"  # process launched, monitor not yet up / vCPUs not yet started
    RUNNING = "Running"
    PAUSED = "Paused"  # vCPUs stopped (by request, startStrategy Paused, I/O error, ...)
    SHUTTING_DOWN = "ShuttingDown"  # guest asked to power off / powering off
    MIGRATING = "Migrating"
    STOPPED = "Stopped"  # exited cleanly: guest shut down, or killed on request
    CRASHED = "Crashed"  # exited on its own without a clean shutdown, or vanished

    @property
    def alive(self) -> bool:
        return self in _ALIVE


_ALIVE = frozenset({RunState.STARTING, RunState.RUNNING, RunState.PAUSED, RunState.SHUTTING_DOWN,
                    RunState.MIGRATING})  # fmt: skip
_S = RunState

# The closed action set and the states each action is allowed in.
ALLOWED: dict[str, frozenset[RunState]] = {
    "start": frozenset({_S.CREATED}),
    "pause": frozenset({_S.RUNNING}),
    "resume": frozenset({_S.PAUSED}),
    "powerdown": frozenset({_S.RUNNING, _S.SHUTTING_DOWN}),
    "reset": frozenset({_S.RUNNING, _S.PAUSED, _S.SHUTTING_DOWN}),
    "reboot": frozenset({_S.RUNNING}),
    "kill": _ALIVE,
    "hotplug_disk": frozenset({_S.RUNNING, _S.PAUSED}),
    "unplug_disk": frozenset({_S.RUNNING, _S.PAUSED}),
    "hotplug_nic": frozenset({_S.RUNNING, _S.PAUSED}),
    "change_medium": frozenset({_S.RUNNING, _S.PAUSED}),
    "unplug_nic": frozenset({_S.RUNNING, _S.PAUSED}),
    "query_status": _ALIVE,
    "stats": _ALIVE,
    "guest_agent": frozenset({_S.RUNNING}),
    "migrate": frozenset({_S.RUNNING, _S.PAUSED}),
    "migrate_control": _ALIVE,  # cancel, parameters, query-migrate
}

# query-status "status" → our state, for adoption and resynchronisation.
_QEMU_STATUS: dict[str, RunState] = {
    "running": _S.RUNNING,
    "colo": _S.RUNNING,
    "paused": _S.PAUSED,
    "prelaunch": _S.PAUSED,
    "io-error": _S.PAUSED,
    "watchdog": _S.PAUSED,
    "debug": _S.PAUSED,
    "suspended": _S.PAUSED,
    "save-vm": _S.PAUSED,
    "restore-vm": _S.PAUSED,
    "postmigrate": _S.PAUSED,
    "inmigrate": _S.PAUSED,
    "finish-migrate": _S.MIGRATING,
    "shutdown": _S.SHUTTING_DOWN,
    "guest-panicked": _S.CRASHED,
    "internal-error": _S.CRASHED,
}

_STALE_FILES = ("qmp.sock", "serial.sock", "vnc.sock", "qga.sock", "pid", "exit.json")


@dataclasses.dataclass(frozen=True, slots=True)
class HotplugContext:
    """What hotplug needs from the spec, saved in cmdline.json so an adopted Machine can hotplug too."""

    vcpus: int = 1
    transitional: bool = False
    mac_seed: str = ""
    block_multiqueue: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchRecord:
    """cmdline.json: how this QEMU was started."""

    argv: tuple[str, ...]
    spec_hash: str
    accel: str
    hotplug_ports: tuple[str, ...]
    has_scsi_controller: bool
    hotplug: HotplugContext
    taps: dict[str, str]  # interface name → host tap name (for network statistics)
    started_at: float = 0.0
    cpu_cores: float | None = None  # the CPU request its weight stands for (None: recorded before it was kept)

    def to_json(self) -> JSON:
        data = dataclasses.asdict(self)
        data["argv"] = list(self.argv)
        data["hotplug_ports"] = list(self.hotplug_ports)
        return data

    @classmethod
    def from_json(cls, data: JSON) -> LaunchRecord:
        return cls(
            argv=tuple(data["argv"]),
            spec_hash=str(data.get("spec_hash", "")),
            accel=str(data.get("accel", "tcg")),
            hotplug_ports=tuple(data.get("hotplug_ports") or ()),
            has_scsi_controller=bool(data.get("has_scsi_controller")),
            hotplug=HotplugContext(**(data.get("hotplug") or {})),
            taps=dict(data.get("taps") or {}),
            started_at=float(data.get("started_at") or 0.0),
            cpu_cores=None if data.get("cpu_cores") is None else float(data["cpu_cores"]),
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


StateListener = Callable[[RunState, str], None]

# KubeVirt's default cpuAllocationRatio: a VM without a CPU request asks for vCPUs / 10 cores.
CPU_ALLOCATION_RATIO = 10


def _cpu_request_cores(domain: Mapping[str, Any]) -> float:
    """The VM's CPU request in cores, as its virt-launcher pod would carry it."""
    value = ((domain.get("resources") or {}).get("requests") or {}).get("cpu")
    if value is not None:
        try:
            return float(parse_cpu(value))
        except QuantityError:
            pass
    return dev.vcpu_topology(domain)[0] / CPU_ALLOCATION_RATIO


class Machine:
    """One VM's QEMU process. Create with `Machine.create(...)` (then `start()`), or `Machine.adopt(dir)`."""

    # How long a QEMU that is alive may take to answer on its monitor. A dead one is noticed at once (the
    # process watch), so this only bounds a hung start-up; 10 s failed VMIs whose QEMU was merely starved on a
    # loaded host (bench/density.py).
    QMP_CONNECT_TIMEOUT: ClassVar[float] = 60.0

    def __init__(self, runtime: RuntimeDir, record: LaunchRecord, *, pass_fds: Iterable[int] = (),
                 seed_files: Iterable[tuple[str, str]] = (),
                 cpu_control: cgroups.CPUControl | None = None) -> None:  # fmt: skip
        self.runtime = runtime
        self.record = record
        # CPU weight of the VM's CPU request (record.cpu_cores): its own cgroup under the node's (cgroups.py),
        # else a niceness.
        self._cpu_control = cpu_control
        self._cgroup: Path | None = None
        self._pass_fds = tuple(pass_fds)
        self._seed_files = tuple(seed_files)
        self._state = RunState.CREATED
        self.reason = ""
        self.pid: int | None = None
        self.exit_info: ExitInfo | None = None
        self._qmp: QMP | None = None
        self._agent = GuestAgent(runtime.qga_sock)
        self._watch: ProcessWatch | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._state_changed = asyncio.Condition()
        self._listeners: list[StateListener] = []
        self._lock = asyncio.Lock()  # serialises state-changing actions (kill does not take it)
        self._quit_requested = False  # we asked QEMU to exit: a clean exit is Stopped, not Crashed
        self._killed = False
        self._reboot_pending = False  # ACPI reboot: reset + continue when the guest has powered off
        self._rebooting = False  # ... and that is in progress (its STOP/RESUME events are not news)
        # Reason to record for the next STOP / RESUME event when we caused it.
        self._expect: dict[str, str] = {}
        self._last_io_error: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._detached = False
        self.incoming = "-incoming" in record.argv  # a migration target (until its guest runs here)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        vmi: Mapping[str, Any],
        runtime: RuntimeDir,
        volumes: Mapping[str, ResolvedVolume],
        nets: Mapping[str, NetworkAttachment],
        accel: str,
        *,
        kernel_boot: KernelBootFiles | None = None,
        options: dev.BuildOptions | None = None,
        cpu_control: cgroups.CPUControl | None = None,
    ) -> Machine:
        """Build the command line (raises UnsupportedSpecError / InvalidSpecError) without starting."""
        plan = dev.plan_launch(vmi, runtime, volumes, nets, accel, kernel_boot=kernel_boot, options=options)
        domain = (vmi.get("spec") or {}).get("domain") or {}
        devices = domain.get("devices") or {}
        meta = vmi.get("metadata") or {}
        hotplug = HotplugContext(
            vcpus=dev.vcpu_topology(domain)[0],
            transitional=bool(devices.get("useVirtioTransitional")),
            mac_seed=meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}",
            block_multiqueue=bool(devices.get("blockMultiQueue")),
        )
        taps = {name: att.tap_name for name, att in nets.items() if att.tap_name}
        record = LaunchRecord(
            argv=plan.argv, spec_hash=plan.spec_hash, accel=plan.accel, hotplug_ports=plan.hotplug_ports,
            has_scsi_controller=plan.has_scsi_controller, hotplug=hotplug, taps=taps,
            cpu_cores=_cpu_request_cores(domain),
        )  # fmt: skip
        return cls(runtime, record, pass_fds=plan.pass_fds, seed_files=plan.seed_files, cpu_control=cpu_control)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._state

    @property
    def spec_hash(self) -> str:
        return self.record.spec_hash

    @property
    def accel(self) -> str:
        return self.record.accel

    def add_state_listener(self, listener: StateListener) -> None:
        """`listener(state, reason)` is called on every state change (from the event loop)."""
        self._listeners.append(listener)

    def _set_state(self, state: RunState, reason: str = "") -> None:
        if self._state in (RunState.STOPPED, RunState.CRASHED):
            return  # terminal
        if state == self._state and reason == self.reason:
            return
        log.debug("machine %s: %s -> %s (%s)", self.runtime.path, self._state, state, reason)
        self._state = state
        self.reason = reason
        for listener in list(self._listeners):
            try:
                listener(state, reason)
            except Exception:
                log.exception("state listener failed")
        self._spawn(self._notify())

    async def _notify(self) -> None:
        async with self._state_changed:
            self._state_changed.notify_all()

    async def wait_for_state(self, *states: RunState, timeout: float | None = None) -> RunState:  # noqa: ASYNC109
        """Wait until the machine is in one of `states` (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout), self._state_changed:
            await self._state_changed.wait_for(lambda: self._state in states)
            return self._state

    def _guard(self, action: str) -> None:
        if self._detached:
            raise InvalidStateError(action, "detached (adopt the runtime dir to control this VM again)")
        allowed = ALLOWED[action]
        if self._state not in allowed:
            order = list(RunState)
            raise InvalidStateError(action, self._state, tuple(sorted(allowed, key=order.index)))

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(
        self,
        *,
        paused: bool = False,
        incoming: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Launch QEMU and start the guest (`paused=True`: stay paused, KubeVirt's startStrategy: Paused).

        `incoming`: a live migration target (`-incoming defer`): stays paused until `listen_incoming` and the
        source's stream; the guest then continues here on its own (the MIGRATION "completed" event).
        """
        async with self._lock:
            self._guard("start")
            if incoming and "-incoming" not in self.record.argv:
                self.record = dataclasses.replace(self.record, argv=(*self.record.argv, "-incoming", "defer"))
                self.incoming = True
            self._set_state(RunState.STARTING)
            try:
                await self._launch(timeout if timeout is not None else self.QMP_CONNECT_TIMEOUT)
                if incoming:
                    self._set_state(RunState.PAUSED, "waiting for the incoming migration")
                elif not paused:
                    self._expect["RESUME"] = "started"
                    await self._qmp_exec("cont")
                    self._set_state(RunState.RUNNING, "started")
                else:
                    self._set_state(RunState.PAUSED, "started paused")
            except BaseException as err:
                await self._abort_start(err)
                raise

    def _take_cpu_weight(self) -> None:
        """Move QEMU (every thread) from the node agent's CPU weight to its VM's: its own cgroup weighing the
        CPU request under the node's (cgroups.py), else a niceness. Threads QEMU starts later inherit it."""
        assert self.pid is not None
        cores = self.record.cpu_cores or 0.0
        if self._cpu_control is not None:
            self._cgroup = self._cpu_control.place(self.pid, self.runtime.path.name, cores)
        if self._cgroup is None:
            set_niceness(self.pid, nice_for_cpu_request(cores))

    def _prepare_runtime(self) -> None:
        """Fresh sockets and bookkeeping; seed files (OVMF vars) only when missing, so NVRAM persists."""
        rt = self.runtime
        rt.create()
        for name in _STALE_FILES:
            with contextlib.suppress(FileNotFoundError):
                (rt.path / name).unlink()
        for template, dest in self._seed_files:
            if not os.path.exists(dest):
                shutil.copyfile(template, dest)
                os.chmod(dest, 0o600)
        self.record = dataclasses.replace(self.record, started_at=time.time())
        _write_atomic(rt.cmdline_file, json.dumps(self.record.to_json(), indent=1).encode())

    async def _launch(self, timeout: float) -> None:  # noqa: ASYNC109
        rt = self.runtime
        self._prepare_runtime()
        # QEMU starts up (exec, machine construction, the monitor handshake: ~30 ms of CPU under TCG) with the
        # node agent's CPU weight, as launching is the node's work; then, with its vCPUs still stopped, it takes
        # its VM's weight, so no guest instruction runs outside it. Placed at spawn instead, a start-up behind
        # 99 booting guests got 1/100 of its node's VM share and took seconds (docs/vm-runtime.md "CPU weight").
        self.pid = spawn(self.record.argv, rt.stderr_log, self._pass_fds)
        _write_atomic(rt.pid_file, f"{self.pid}\n".encode())
        self._watch = ProcessWatch(self.pid, self._on_exit)
        await self._attach_monitor(timeout)
        self._take_cpu_weight()

    async def _attach_monitor(self, timeout: float) -> None:  # noqa: ASYNC109
        qmp = QMP(self.runtime.qmp_sock, name=f"qmp-{self.pid}")
        watch = self._watch
        try:
            await qmp.connect(timeout, alive=lambda: watch is not None and not watch.done)
        except QMPConnectError as err:
            raise LaunchError(f"QEMU (pid {self.pid}) monitor unavailable", _tail(self.runtime.stderr_log)) from err
        self._qmp = qmp
        # Subscribe before anything can happen (vCPUs are stopped until `cont`, or we are adopting).
        stream = qmp.events()
        self._event_task = asyncio.create_task(self._consume_events(stream), name=f"events-{self.pid}")

    async def _abort_start(self, err: BaseException) -> None:
        if self._watch is not None and not self._watch.done:
            with contextlib.suppress(ProcessLookupError):
                self._watch.send_signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._exited.wait()
        stderr = _tail(self.runtime.stderr_log)
        reason = f"start failed: {err}"
        if stderr and stderr not in reason:
            reason += f" ({stderr})"
        self._set_state(RunState.CRASHED, reason)
        await self._close_monitors()

    def _on_exit(self, info: ExitInfo) -> None:
        """The process is gone (called once, from the event loop)."""
        # Exit status 0, or unknown because we adopted QEMU and are not its parent (then our own intent
        # decides: we only quit QEMU after the guest shut down).
        status_ok = info.exit_code == 0 or (info.exit_code is None and info.signal is None)
        clean = status_ok and (self._quit_requested or self._state == RunState.SHUTTING_DOWN)
        if self._killed:
            state, reason = RunState.STOPPED, f"killed on request ({info.reason})"
        elif clean:
            state, reason = RunState.STOPPED, self.reason or "guest shut down"
        elif self._state == RunState.CREATED:
            state, reason = RunState.CRASHED, info.reason
        else:
            stderr = _tail(self.runtime.stderr_log, 3)
            reason = info.reason + (f": {stderr}" if stderr and info.exit_code not in (None, 0) else "")
            state = RunState.CRASHED
        self.exit_info = dataclasses.replace(info, reason=reason)
        with contextlib.suppress(OSError):
            _write_atomic(
                self.runtime.exit_file,
                json.dumps({**self.exit_info.to_json(), "state": state.value}).encode(),
            )
        self._set_state(state, reason)
        self._exited.set()
        if self._cgroup is not None:
            cgroups.release(self._cgroup)
        self._spawn(self._close_monitors())

    async def _close_monitors(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
        await self._agent.close()
        if self._event_task is not None and self._event_task is not asyncio.current_task():
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._event_task

    async def wait_exit(self, timeout: float | None = None) -> ExitInfo:  # noqa: ASYNC109
        """Wait for QEMU to exit; returns how it ended."""
        if self._state == RunState.CREATED:
            raise InvalidStateError("wait_exit", self._state)
        async with asyncio.timeout(timeout):
            await self._exited.wait()
        assert self.exit_info is not None
        return self.exit_info

    async def detach(self) -> None:
        """Let go of QEMU without touching it (what an exiting node agent does): close the monitor and agent
        connections and stop watching the pid. Another Machine can then `adopt` the runtime dir; this one
        refuses further actions."""
        self._detached = True
        if self._watch is not None:
            self._watch.close()
        await self._close_monitors()

    # -- actions -------------------------------------------------------------------------------------
    async def pause(self) -> None:
        async with self._lock:
            self._guard("pause")
            self._expect["STOP"] = "paused on request"
            await self._qmp_exec("stop")
            self._set_state(RunState.PAUSED, "paused on request")

    async def resume(self) -> None:
        async with self._lock:
            self._guard("resume")
            self._expect["RESUME"] = "resumed on request"
            await self._qmp_exec("cont")
            self._set_state(RunState.RUNNING, "resumed on request")

    async def powerdown(self) -> None:
        """Press the ACPI power button. The guest decides; QEMU exits (Stopped) once it has shut down."""
        async with self._lock:
            self._guard("powerdown")
            self._set_state(RunState.SHUTTING_DOWN, "ACPI power button pressed")
            await self._qmp_exec("system_powerdown")

    async def reset(self) -> None:
        """Hard reset (the reset button): the guest gets no say."""
        async with self._lock:
            self._guard("reset")
            await self._qmp_exec("system_reset")

    async def reboot(self, *, method: str = "auto", agent_timeout: float = 2.0) -> str:
        """A guest-visible (orderly) reboot; returns the method used.

        "agent": qemu-guest-agent's guest-shutdown(reboot). "acpi": the ACPI power button, then, once the guest
        has powered off (QEMU pauses: -action shutdown=pause), a reset and continue — libvirt's "fake reboot",
        for guests without an agent. "auto": the agent when it answers a ping within `agent_timeout`, else ACPI.
        """
        if method not in ("auto", "agent", "acpi"):
            raise ValueError(f"unknown reboot method {method!r}")
        async with self._lock:
            self._guard("reboot")
            if method == "auto":
                try:
                    await self._agent.ping(timeout=agent_timeout)
                    method = "agent"
                except QMPCommandError:
                    method = "acpi"
            if method == "agent":
                await self._agent.shutdown("reboot", timeout=agent_timeout)
            else:
                self._reboot_pending = True
                await self._qmp_exec("system_powerdown")
            return method

    async def set_migration(self, capabilities: Mapping[str, bool], parameters: Mapping[str, Any]) -> None:
        """migrate-set-capabilities / migrate-set-parameters (both ends must agree on some capabilities).
        The `events` capability is always on: MIGRATION events drive RunState."""
        self._guard("migrate_control")
        caps = {"events": True, **capabilities}
        await self._qmp_exec("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": bool(v)} for k, v in caps.items()]})
        if parameters:
            await self._qmp_exec("migrate-set-parameters", dict(parameters))

    async def listen_incoming(self, uri: str) -> list[JSON]:
        """Target: start listening (`migrate-incoming`); returns the bound socket addresses (port 0 picks one)."""
        self._guard("migrate_control")
        if not self.incoming:
            raise InvalidStateError("listen_incoming", "not started as a migration target")
        await self._qmp_exec("migrate-incoming", {"uri": uri})
        info = await self._qmp_exec("query-migrate")
        # `cont` while incoming sets QEMU's autostart: it starts the vCPUs itself the moment the guest is all
        # here (or post-copy begins), with no round trip through us inside the downtime
        self._expect["RESUME"] = "resumed by the incoming migration"
        await self._qmp_exec("cont")
        return list(info.get("socket-address") or [])

    async def migrate(self, uri: str) -> None:
        """Source: stream the guest to a target listening at `uri` (returns once the migration started;
        MIGRATION events and `query_migrate` follow it)."""
        async with self._lock:
            self._guard("migrate")
            await self._qmp_exec("migrate", {"uri": uri})

    async def query_migrate(self) -> JSON:
        self._guard("migrate_control")
        return dict(await self._qmp_exec("query-migrate"))

    async def migrate_cancel(self) -> None:
        self._guard("migrate_control")
        await self._qmp_exec("migrate_cancel")

    async def migrate_start_postcopy(self) -> None:
        self._guard("migrate_control")
        await self._qmp_exec("migrate-start-postcopy")

    async def kill(self, timeout: float = 10.0) -> ExitInfo:  # noqa: ASYNC109
        """SIGKILL QEMU (by pidfd, never by name) and wait for it to be gone."""
        self._guard("kill")
        assert self._watch is not None
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            self._watch.send_signal(signal.SIGKILL)
        return await self.wait_exit(timeout)

    async def monitor_command(self, command: str, args: Mapping[str, Any] | None = None,
                              timeout: float = 30.0) -> Any:  # noqa: ASYNC109  # fmt: skip
        """Any other QMP command over the Machine's monitor connection (QEMU's QMP socket serves one client):
        for the console routes' screendump and user-network port forwards. State-changing commands belong in
        the named actions above, which keep RunState right."""
        self._guard("query_status")
        return await self._qmp_exec(command, args, timeout=timeout)

    async def query_status(self) -> JSON:
        """QEMU's query-status ({status, running, ...})."""
        self._guard("query_status")
        return await self._qmp_exec("query-status")

    # -- backup --------------------------------------------------------------------------------------
    async def disk_files(self, volumes: Iterable[str]) -> dict[str, str]:
        """volume name -> the host file (or device) QEMU has open for that volume's disk, from QEMU itself."""
        nodes = await self._qmp_exec("query-named-block-nodes", {"flat": True})
        files = {n.get("node-name"): str(n.get("file") or "") for n in nodes}
        out = {}
        for volume in volumes:
            name = dev.block_node_names(volume).file
            if files.get(name):
                out[volume] = files[name]
        return out

    async def backup(self, targets: Mapping[str, Path], *, poll: float = 0.2,
                     started: Callable[[], Awaitable[None]] | None = None) -> None:
        """A point-in-time full copy of each volume's disk (volume name -> a new raw file, written sparse):
        one QMP transaction starts a blockdev-backup job per disk, so every copy is of the same instant
        (copy-before-write keeps the guest's later writes out); `started` runs right after it (to thaw a
        frozen guest). Returns when every job has finished; a failed job fails it (and the files are removed)."""
        added: list[str] = []
        jobs: list[str] = []
        try:
            nodes = {n.get("node-name"): n for n in await self._qmp_exec("query-named-block-nodes", {"flat": True})}
            actions = []
            for volume, target in targets.items():
                source = dev.block_node_names(volume).format
                if source not in nodes:
                    raise HypervisorError(f"volume {volume} has no disk in the running VM")
                size = int((nodes[source].get("image") or {}).get("virtual-size") or 0)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
                node = short_id("b-", volume, 31)
                await self._qmp_exec("blockdev-add", {
                    "driver": "raw", "node-name": node, "discard": "unmap", "detect-zeroes": "unmap",
                    "file": {"driver": "file", "filename": str(target), "discard": "unmap"}})
                added.append(node)
                actions.append({"type": "blockdev-backup", "data": {
                    "job-id": node, "device": source, "target": node, "sync": "full", "auto-dismiss": False}})
            await self._qmp_exec("transaction", {"actions": actions})
            jobs = [a["data"]["job-id"] for a in actions]
            if started is not None:
                await started()
            errors = []
            while jobs:
                states = {j.get("id"): j for j in await self._qmp_exec("query-jobs")}
                for job in list(jobs):
                    info = states.get(job)
                    if info is None or info.get("status") == "concluded":
                        if info is not None and info.get("error"):
                            errors.append(f"{job}: {info['error']}")
                        with contextlib.suppress(QMPCommandError):
                            await self._qmp_exec("job-dismiss", {"id": job})
                        jobs.remove(job)
                if jobs:
                    await asyncio.sleep(poll)
            if errors:
                raise HypervisorError(f"backup failed: {'; '.join(errors)}")
        except BaseException:
            await self._cancel_jobs(jobs, poll)
            for target in targets.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            raise
        finally:
            for node in added:
                with contextlib.suppress(QMPCommandError, HypervisorError):
                    await self._qmp_exec("blockdev-del", {"node-name": node})

    async def _cancel_jobs(self, jobs: list[str], poll: float, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Cancels block jobs and dismisses them once concluded (their target nodes can then be deleted)."""
        with contextlib.suppress(QMPCommandError, HypervisorError):
            for job in jobs:
                with contextlib.suppress(QMPCommandError):
                    await self._qmp_exec("job-cancel", {"id": job})
            deadline = time.monotonic() + timeout
            while jobs and time.monotonic() < deadline:
                states = {j.get("id"): j.get("status") for j in await self._qmp_exec("query-jobs")}
                for job in list(jobs):
                    if states.get(job) in (None, "concluded"):
                        with contextlib.suppress(QMPCommandError):
                            await self._qmp_exec("job-dismiss", {"id": job})
                        jobs.remove(job)
                if jobs:
                    await asyncio.sleep(poll)

    # -- hotplug -------------------------------------------------------------------------------------
    async def _free_hotplug_port(self) -> str:
        """An empty spare root port (asks QEMU, so it is right after adoption too)."""
        for port in self.record.hotplug_ports:
            children = await self._qmp_exec("qom-list", {"path": f"/machine/peripheral/{port}/{port}"})
            if not any(str(c.get("name", "")).startswith("child[") for c in children):
                return port
        raise HypervisorError(f"no free hotplug port (the VM has {len(self.record.hotplug_ports)})")

    async def hotplug_disk(self, disk: Mapping[str, Any], volume: ResolvedVolume) -> str:
        """Attach a disk (KubeVirt disk entry + resolved volume) to the running VM; returns its device id.
        virtio disks go to a spare PCIe root port, scsi disks to the virtio-scsi controller."""
        async with self._lock:
            self._guard("hotplug_disk")
            issues = dev.disks.check_disk(dict(disk), "disk")
            if issues:
                raise issues[0].to_error()
            hp = self.record.hotplug
            bus = dev.disks.disk_bus(dict(disk))
            if bus not in ("virtio", "scsi"):
                raise UnsupportedSpecError("disk.disk.bus", f"{bus} disks cannot be hotplugged; use scsi or virtio")
            if bus == "scsi" and not self.record.has_scsi_controller:
                raise UnsupportedSpecError("disk.disk.bus", "this VM has no SCSI controller (disableHotplug)")
            plan = dev.plan_disk(dict(disk), volume, field="disk", vcpus=hp.vcpus, transitional=hp.transitional,
                                 multiqueue=hp.block_multiqueue)  # fmt: skip
            device = dict(plan.device)
            if bus == "virtio":
                device["bus"] = await self._free_hotplug_port()
            else:
                device["bus"] = f"{dev.SCSI_CONTROLLER_ID}.0"  # QEMU picks a free SCSI target
            added: list[str] = []
            try:
                for node in plan.nodes:
                    await self._qmp_exec("blockdev-add", node)
                    added.append(node["node-name"])
                await self._qmp_exec("device_add", device)
            except BaseException:
                for node_name in reversed(added):
                    with contextlib.suppress(QMPCommandError):
                        await self._qmp_exec("blockdev-del", {"node-name": node_name})
                raise
            return plan.device_id

    async def unplug_disk(self, name: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Detach a disk by its KubeVirt name: device_del, wait for the guest to release it (DEVICE_DELETED),
        then remove its block nodes."""
        async with self._lock:
            self._guard("unplug_disk")
            await self._device_del(dev.disk_device_id(name), timeout)
            names = dev.block_node_names(name)
            for node_name in (names.format, names.file):
                try:
                    await self._qmp_exec("blockdev-del", {"node-name": node_name})
                except QMPCommandError as err:
                    # Idempotent: a retried unplug finds the nodes of the first attempt already gone.
                    if "Failed to find node" not in err.message:
                        raise

    async def change_medium(self, disk: Mapping[str, Any], volume: ResolvedVolume | None) -> None:
        """Insert a medium into a CD-ROM drive (KubeVirt's cdrom inject), or eject it (`volume` None).

        The drive stays (the guest keeps its /dev/sr0); only its medium changes: open the tray (forced: a guest
        may have locked it), remove and delete the old medium's block nodes, add and insert the new one, close
        the tray. The guest sees a media change, as with a real drive."""
        async with self._lock:
            self._guard("change_medium")
            name = str(disk["name"])
            device_id = dev.disk_device_id(name)
            names = dev.block_node_names(name)
            await self._qmp_exec("blockdev-open-tray", {"id": device_id, "force": True})
            await self._qmp_exec("blockdev-remove-medium", {"id": device_id})
            for node_name in (names.format, names.file):
                try:
                    await self._qmp_exec("blockdev-del", {"node-name": node_name})
                except QMPCommandError as err:
                    if "Failed to find node" not in err.message:  # an empty drive has none
                        raise
            if volume is not None:
                hp = self.record.hotplug
                plan = dev.plan_disk(dict(disk), volume, field="disk", vcpus=hp.vcpus)
                for node in plan.nodes:
                    await self._qmp_exec("blockdev-add", node)
                await self._qmp_exec("blockdev-insert-medium", {"id": device_id, "node-name": names.format})
            await self._qmp_exec("blockdev-close-tray", {"id": device_id})

    async def hotplug_nic(self, iface: Mapping[str, Any], attachment: NetworkAttachment) -> str:
        """Attach a NIC (KubeVirt interface entry + host side) on a spare root port; returns its device id."""
        async with self._lock:
            self._guard("hotplug_nic")
            issues = dev.interfaces.check_interface(dict(iface), "interface")
            if issues:
                raise issues[0].to_error()
            hp = self.record.hotplug
            fd_name = None
            if attachment.kind == "fd":
                assert attachment.fd is not None
                fd_name = f"fd-{iface['name']}"
                assert self._qmp is not None
                self._qmp.send_fd(attachment.fd)
                await self._qmp_exec("getfd", {"fdname": fd_name})
            plan = dev.plan_nic(dict(iface), attachment, mac_seed=hp.mac_seed, transitional=hp.transitional,
                                fd_name=fd_name)  # fmt: skip
            device = dict(plan.device)
            device["bus"] = await self._free_hotplug_port()
            await self._qmp_exec("netdev_add", plan.netdev)
            try:
                await self._qmp_exec("device_add", device)
            except BaseException:
                with contextlib.suppress(QMPCommandError):
                    await self._qmp_exec("netdev_del", {"id": plan.netdev["id"]})
                raise
            if attachment.tap_name:
                self.record = dataclasses.replace(
                    self.record, taps={**self.record.taps, iface["name"]: attachment.tap_name}
                )
            return plan.device["id"]

    async def unplug_nic(self, name: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        async with self._lock:
            self._guard("unplug_nic")
            await self._device_del(dev.nic_device_id(name), timeout)
            try:
                await self._qmp_exec("netdev_del", {"id": dev.netdev_id(name)})
            except QMPCommandError as err:
                if "not found" not in err.message.lower():  # already removed by an earlier attempt
                    raise

    async def _device_del(self, device_id: str, timeout: float) -> None:  # noqa: ASYNC109
        assert self._qmp is not None
        # Subscribe first: DEVICE_DELETED can arrive before device_del returns (SCSI, unrealized devices).
        async with self._qmp.events({"DEVICE_DELETED"}) as stream:
            try:
                await self._qmp_exec("device_del", {"id": device_id})
            except QMPCommandError as err:
                if err.error_class == "DeviceNotFound":
                    return  # gone already (an earlier unplug that timed out completed meanwhile)
                raise
            try:
                await stream.wait_for(lambda e: e.data.get("device") == device_id, timeout)
            except TimeoutError as err:
                raise QMPTimeoutError("device_del", f"guest did not release {device_id} within {timeout:g}s") from err

    # -- observation ---------------------------------------------------------------------------------
    async def stats(self) -> MachineStats:
        self._guard("stats")
        assert self.pid is not None
        vcpu_times: dict[int, float] = {}
        with contextlib.suppress(QMPCommandError):
            for cpu in await self._qmp_exec("query-cpus-fast"):
                seconds = cpu_seconds(self.pid, int(cpu["thread-id"]))
                if seconds is not None:
                    vcpu_times[int(cpu["cpu-index"])] = seconds
        blocks = block_stats(await self._qmp_exec("query-blockstats"))
        balloon: int | None = None
        with contextlib.suppress(QMPCommandError):
            balloon = int((await self._qmp_exec("query-balloon"))["actual"])
        net: dict[str, NetStats] = {}
        for iface, tap in self.record.taps.items():
            stats = tap_stats(tap)
            if stats is not None:
                net[iface] = stats
        return MachineStats(
            cpu_time=cpu_seconds(self.pid) or 0.0,
            rss_bytes=rss_bytes(self.pid) or 0,
            vcpu_times=vcpu_times,
            block=blocks,
            net=net,
            balloon_bytes=balloon,
        )

    # -- guest agent ---------------------------------------------------------------------------------
    async def guest_ping(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        self._guard("guest_agent")
        await self._agent.ping(timeout=timeout)

    async def guest_info(self, timeout: float = 5.0) -> JSON:  # noqa: ASYNC109
        self._guard("guest_agent")
        return await self._agent.info(timeout=timeout)

    async def guest_osinfo(self, timeout: float = 5.0) -> JSON:  # noqa: ASYNC109
        self._guard("guest_agent")
        return await self._agent.osinfo(timeout=timeout)

    async def guest_network_interfaces(self, timeout: float = 5.0) -> list[JSON]:  # noqa: ASYNC109
        self._guard("guest_agent")
        return await self._agent.network_interfaces(timeout=timeout)

    async def guest_command(self, command: str, args: Mapping[str, Any] | None = None,
                            timeout: float = 5.0) -> Any:  # noqa: ASYNC109  # fmt: skip
        """Any other qemu-guest-agent command (guest-get-users, guest-get-fsinfo, guest-fsfreeze-*, ...), over
        the Machine's own agent connection: the qga chardev serves one client at a time."""
        self._guard("guest_agent")
        return await self._agent.execute(command, args, timeout=timeout)

    # -- events --------------------------------------------------------------------------------------
    def events(self, names: Iterable[str] | None = None) -> EventStream:
        """Raw QMP events of this VM (for the node agent's own bookkeeping)."""
        if self._qmp is None:
            raise InvalidStateError("events", self._state)
        return self._qmp.events(names)

    async def _qmp_exec(self, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0) -> Any:  # noqa: ASYNC109
        if self._qmp is None:
            raise QMPDisconnectedError(cmd, "no monitor connection")
        return await self._qmp.execute(cmd, args, timeout=timeout)

    async def _consume_events(self, stream: EventStream) -> None:
        async for event in stream:
            try:
                await self._on_event(event)
            except QMPCommandError as err:
                log.warning("machine %s: handling %s failed: %s", self.runtime.path, event.name, err)
            except Exception:
                # Never let one odd event stop the state tracking for the rest of the VM's life.
                log.exception("machine %s: handling %s failed", self.runtime.path, event.name)

    async def _on_event(self, event: QMPEvent) -> None:
        name, data = event.name, event.data
        if name == "SHUTDOWN":
            reason = str(data.get("reason") or "shutdown")
            if self._reboot_pending and data.get("guest"):
                # Second half of an ACPI reboot: the guest is off (QEMU paused by -action shutdown=pause).
                self._reboot_pending = False
                self._rebooting = True
                self._expect["RESUME"] = "rebooted"
                await self._qmp_exec("system_reset")
                await self._qmp_exec("cont")
                return
            if reason == "host-qmp-quit" and self._quit_requested:
                return  # the echo of our own `quit`: keep the reason that made us quit
            self._set_state(RunState.SHUTTING_DOWN, f"shutdown: {reason}")
            if not self._quit_requested and reason != "host-qmp-quit":
                await self._quit()
        elif name == "STOP":
            reason = self._expect.pop("STOP", "stopped")
            if self._state in (RunState.RUNNING, RunState.STARTING) and not self._rebooting:
                self._set_state(RunState.PAUSED, reason)
        elif name == "RESUME":
            reason = self._expect.pop("RESUME", "resumed")
            if self._rebooting:
                self._rebooting = False
                self._set_state(RunState.RUNNING, reason)
            elif self._state in (RunState.PAUSED, RunState.STARTING, RunState.MIGRATING):
                self._set_state(RunState.RUNNING, reason)
        elif name == "BLOCK_IO_ERROR":
            self._last_io_error = f"I/O error on {data.get('device') or data.get('node-name')}: {data.get('reason')}"
            if data.get("action") == "stop":
                self._set_state(RunState.PAUSED, self._last_io_error)
        elif name == "MIGRATION":
            status = str(data.get("status"))
            if status in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
                self._set_state(RunState.MIGRATING, f"migration {status}")
            elif status == "completed" and self.incoming:
                # the target: the guest is all here now and QEMU started it (autostart, see listen_incoming);
                # a target adopted from an earlier agent may not have had that `cont`
                self.incoming = False
                if not (await self._qmp_exec("query-status")).get("running"):
                    self._expect["RESUME"] = "migrated in"
                    await self._qmp_exec("cont")
                self._set_state(RunState.RUNNING, "migrated in")
            elif status == "completed":
                self._set_state(RunState.PAUSED, "migrated")
            elif status in ("failed", "cancelled"):
                status_now = await self._qmp_exec("query-status")
                self._set_state(_QEMU_STATUS.get(status_now["status"], RunState.PAUSED), f"migration {status}")
        elif name == "RESET":
            # The vCPUs keep running through a reset; record it so the agent can tell the guest rebooted.
            if self._state in (RunState.RUNNING, RunState.PAUSED) and not self._rebooting:
                who = "guest" if data.get("guest") else "host"
                self._set_state(self._state, f"reset by {who} ({data.get('reason', 'unknown')})")
        elif name == "GUEST_PANICKED":
            self._set_state(RunState.CRASHED, "guest panicked")
        # DEVICE_DELETED completes an unplug; `_device_del` waits for it on its own subscription.

    async def _quit(self) -> None:
        self._quit_requested = True
        with contextlib.suppress(QMPDisconnectedError):
            await self._qmp_exec("quit")

    # -- adoption ------------------------------------------------------------------------------------
    @classmethod
    async def adopt(cls, runtime: RuntimeDir, *, timeout: float = 10.0,  # noqa: ASYNC109
                    cpu_control: cgroups.CPUControl | None = None) -> Machine | None:  # fmt: skip
        """Re-attach to the QEMU started in `runtime` (after a node agent restart).

        None when nothing was ever launched there. Otherwise a Machine whose state comes from QEMU itself
        (query-status), or Stopped/Crashed with the reason when the process is gone: the exit status when a
        Machine of this agent reaped it, else "process gone". A QEMU whose agent died before it took its VM's
        CPU weight (between spawn and the monitor handshake) takes it now.
        """
        try:
            record = LaunchRecord.from_json(json.loads(runtime.cmdline_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise HypervisorError(f"{runtime.cmdline_file} is unreadable: {err}") from err
        machine = cls(runtime, record, cpu_control=cpu_control)
        try:
            machine.pid = int(runtime.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            machine._finish_dead(ExitInfo(None, None, "never started (no pid file)"))
            return machine

        pid = machine.pid
        state = proc_state(pid)
        if state in ("Z", "X"):
            info = await reap_soon(pid)  # we are its parent (same process, new Machine): collect the status
            machine._finish_dead(info or ExitInfo(None, None, "process gone"))
            return machine
        cmdline = proc_cmdline(pid) if state is not None else None
        if state is not None and not cmdline:
            # Exiting (killed just now): its memory, and with it its cmdline, goes before it turns zombie.
            # If it is our child, wait for that and collect how it ended rather than call it someone else's.
            info = await reap_soon(pid, timeout=2.0)
            if info is not None:
                machine._finish_dead(info)
                return machine
            state = proc_state(pid)
            cmdline = proc_cmdline(pid) if state is not None else None
        if state is None or cmdline != list(record.argv):
            machine._finish_dead(ExitInfo(None, None, "process gone" if state is None else
                                          "process gone (pid now belongs to another program)"))  # fmt: skip
            return machine

        machine._set_state(RunState.STARTING, "adopting")
        machine._cgroup = cgroups.cgroup_of(pid)  # to remove it when this QEMU exits
        machine._watch = ProcessWatch(pid, machine._on_exit)
        try:
            await machine._attach_monitor(timeout)
            status = await machine._qmp_exec("query-status")
        except (LaunchError, QMPCommandError) as err:
            # QEMU may be dying right now (killed while we connected): then report how it ended instead.
            try:
                async with asyncio.timeout(2):
                    await machine._exited.wait()
                return machine
            except TimeoutError:
                pass
            await machine.detach()
            raise HypervisorError(f"cannot adopt QEMU pid {pid}: {err}") from err
        if machine._cgroup is None and record.cpu_cores is not None:
            machine._take_cpu_weight()
        qemu_status = str(status.get("status"))
        machine._set_state(_QEMU_STATUS.get(qemu_status, RunState.PAUSED), f"adopted ({qemu_status})")
        if qemu_status == "shutdown":
            await machine._quit()  # the guest powered off while nobody was watching: finish the job
        return machine

    def _finish_dead(self, info: ExitInfo) -> None:
        """Terminal state for a process found dead at adoption; prefers what the reaping Machine recorded."""
        saved: JSON | None = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved = json.loads(self.runtime.exit_file.read_text())
        if saved is not None:
            self.exit_info = ExitInfo.from_json(saved)
            state = RunState(saved.get("state", RunState.CRASHED.value))
        else:
            clean = info.exit_code == 0
            self.exit_info = info
            state = RunState.STOPPED if clean else RunState.CRASHED
            with contextlib.suppress(OSError):
                _write_atomic(self.runtime.exit_file, json.dumps({**info.to_json(), "state": state.value}).encode())
        self._state = state
        self.reason = self.exit_info.reason
        self._exited.set()
