"""The node agent's part of a live migration (KubeVirt's virt-handler migration source and target).

The migration controller hands a VMI over by writing `status.migrationState` (migrationUid, sourceNode,
targetNode) and the label `kubevirt.io/migrationTargetNodeName`, which makes the VMI visible to the target
node's agent. Then:
- target: builds the same machine from the same spec (disks on shared storage or regenerated: containerDisk
  overlays, cloud-init), starts QEMU with `-incoming defer`, listens on its node address and publishes
  `targetNodeAddress` / `targetDirectMigrationNodePorts` / `targetNodeDomainDetected`;
- source: sees the address, starts QMP `migrate` (TLS unless the configuration disables it) with an explicit
  downtime limit, writes `startTimestamp`, and follows the stream by QEMU's MIGRATION / MIGRATION_PASS events
  (escalating a migration that does not converge, see `_escalate`);
- target: QEMU starts the guest by itself the moment the stream completes (`cont` given while incoming sets
  autostart: no round trip inside the downtime); on the MIGRATION completed event the agent takes the VMI over:
  `nodeName`, the `kubevirt.io/nodeName` label, `completed`, `endTimestamp`;
- source: sees the VMI on another node, quits its (paused, migrated) QEMU, completes its launcher pod and
  removes its runtime dir.
A failure (the target QEMU dies, the network is cut, a timeout, an abort) is written by the source as
`failed`/`failureReason`; the source guest just continues and the target tears its QEMU down.

The VMI keeps its IP and MAC: the target is built from the same spec and uid (the MAC seed); the guest's
address is the masquerade one on every node, and on the CNI pod network the pod IP moves along (the target's
launcher netns gets it beside its own link address, it is routed to the target at take-over, the source's
node keeps it reserved while the VMI lives: docs/networking.md "Live migration keeps the pod IP").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtplane.api import quantity
from virtplane.client import rest
from virtplane.hypervisor.errors import HypervisorError, QMPDisconnectedError
from virtplane.hypervisor.machine import Machine, RunState
from virtplane.hypervisor.qmp import EventStream

from . import network
from . import status as st
from .vmiruntime import RuntimeMeta, VMIRuntime, runtime_dir_name

if TYPE_CHECKING:
    from .controller import VMIController

log = logging.getLogger(__name__)
JSON = dict[str, Any]
Key = tuple[str, str]

TARGET_NODE_LABEL = "kubevirt.io/migrationTargetNodeName"
# QEMU's downtime limit (`downtime-limit`: it switches over once the RAM left fits in it at the measured
# bandwidth) starts here, or at maxDowntimeMs when that is lower; escalation doubles it up to maxDowntimeMs
# (the KubeVirt CR's or the MigrationPolicy's; KubeVirt's default 900 ms). QEMU's own default is 300 ms.
START_DOWNTIME_MS = 50
DEFAULT_MAX_DOWNTIME_MS = 900
STALL_PASSES = 3  # this many passes (dirty-bitmap syncs) in a row without 10 % less RAM left: not converging
TICK_SECONDS = 1.0  # between passes, the timeouts are checked this often
DONE = ("completed", "failed", "cancelled")
UNLIMITED_BANDWIDTH = 2**62  # bytes/s: libvirt's "unlimited" is as large
TLS_ID = "migration-tls"
# RFC 7919's ffdhe2048 group (public, fixed), PKCS#3 as `openssl genpkey -genparam -algorithm DH -pkeyopt
# group:ffdhe2048` writes it
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
PSK_USER = "virtplane"


def migration_state(vmi: JSON) -> JSON:
    return dict((vmi.get("status") or {}).get("migrationState") or {})


def in_flight(ms: JSON) -> bool:
    return bool(ms.get("migrationUid")) and not ms.get("completed") and not ms.get("failed")


@dataclasses.dataclass(slots=True)
class Progress:
    """What the source watches to decide that a migration stalls (KubeVirt's progressTimeout) and escalates."""

    started: float
    last_progress: float  # bytes last moved (KubeVirt's progressTimeout: no data transferred for so long)
    uid: str = ""  # the migration's
    transferred: int = 0
    best_remaining: int = -1  # the least RAM left at the start of a pass (after the first, bulk, pass)
    stall_passes: int = 0  # passes since best_remaining last shrank by 10 %
    step: int = 0  # escalation steps taken
    downtime_ms: int = START_DOWNTIME_MS
    abort_sent: bool = False
    postcopy: bool = False
    reported: bool = False
    throttled: bool = False
    max_throttle: int = 0  # QEMU's auto-converge vCPU throttle (query-migrate cpu-throttle-percentage), highest seen
    monitor: asyncio.Task[None] | None = None  # follows QEMU's migration events


class NodeMigrations:
    def __init__(self, ctl: VMIController) -> None:
        self.ctl = ctl
        self.progress: dict[Key, Progress] = {}
        self.prepared: dict[Key, str] = {}  # migrationUid whose source end is set up (_prepare_source)

    @property
    def node(self) -> str:
        return self.ctl.node_name

    async def reconcile(self, key: Key, vmi: JSON, rt: VMIRuntime | None) -> tuple[bool, float | None]:
        """(handled, requeue): handled means the normal reconcile must not run for this pass."""
        ms = migration_state(vmi)
        status = vmi.get("status") or {}
        owner = status.get("nodeName") or ""
        if ms.get("targetNode") == self.node and owner != self.node:
            return True, await self._target(key, vmi, ms, rt)
        if rt is not None and rt.machine is not None and rt.machine.incoming:
            # a target whose migration is over without us taking the guest (failed, aborted, superseded)
            await self._drop_target(rt, "the migration ended without this node")
            return True, None
        if owner == self.node and rt is not None and rt.machine is not None and in_flight(ms) and \
                ms.get("sourceNode") == self.node and rt.machine.state.alive:
            return True, await self._source(key, vmi, ms, rt)
        if owner not in ("", self.node) and rt is not None and rt.machine is not None and \
                rt.machine.reason == "migrated" and rt.meta.uid == vmi["metadata"].get("uid"):
            await self._source_done(key, vmi, rt)
            return True, None
        return False, None

    # -- target --------------------------------------------------------------------------------------------
    async def _target(self, key: Key, vmi: JSON, ms: JSON, rt: VMIRuntime | None) -> float | None:
        if not in_flight(ms) or ms.get("abortRequested"):
            if rt is not None:
                await self._drop_target(rt, "migration failed or aborted")
            return None
        if rt is None:
            return await self._prepare_target(key, vmi, ms)
        machine = rt.machine
        assert machine is not None
        if not machine.state.alive:
            reason = f"target QEMU on {self.node} exited: {machine.reason}"
            await self._write_state(key, {"failed": True, "failureReason": reason, "endTimestamp": st.now_rfc3339()})
            await self._drop_target(rt, reason)
            return None
        if not machine.incoming and machine.state == RunState.RUNNING:
            await self._take_over(key, vmi, rt)
            return 0.05
        return None  # waiting for the stream (the MIGRATION events enqueue us)

    async def _prepare_target(self, key: Key, vmi: JSON, ms: JSON) -> float | None:
        ctl = self.ctl
        meta = vmi["metadata"]
        path = ctl.runtime_root / runtime_dir_name(*key)
        if path.exists():
            await asyncio.to_thread(lambda: VMIRuntime(path, RuntimeMeta("", *key)).remove_files())
        rt = VMIRuntime(path, RuntimeMeta(uid=meta["uid"], namespace=key[0], name=key[1]))
        rt.save()
        t0 = time.monotonic()
        # the VMI keeps its pod IP: the source launcher's (PodNetwork.setup); the target's own chain runs under a
        # container ID of this migration, never the VMI uid the source's IPAM reservation is held under
        keep = self.source_pod_ip(vmi, ms)
        try:
            await network.prepare(vmi, keep_ip=keep, container_id=f"{meta['uid']}-{str(ms.get('migrationUid'))[:8]}")
            resolved = await ctl.resolver.resolve(vmi, rt.disks_dir)
            kernel_boot = await ctl.resolver.resolve_kernel_boot(vmi)
            machine = Machine.create(vmi, rt.runtime, resolved.volumes, network.attachments(vmi), ctl.probe.accel,
                                     kernel_boot=kernel_boot)  # fmt: skip
        except Exception as err:  # any reason the target cannot be built fails the migration, not the VMI
            await self._write_state(key, {"failed": True, "endTimestamp": st.now_rfc3339(),
                                          "failureReason": f"cannot prepare the target on {self.node}: {err}"})
            await asyncio.to_thread(rt.remove_files)
            return None
        rt.meta.volume_extra = resolved.status_extra
        rt.machine = machine
        machine.add_state_listener(ctl._listener(key))
        ctl.runtimes[key] = rt
        t_built = time.monotonic()
        tls = not (ms.get("migrationConfiguration") or {}).get("disableTLS")
        psk = asyncio.create_task(self._psk(vmi)) if tls else None  # the API read overlaps QEMU's start
        try:
            await machine.start(incoming=True)
            t_started = time.monotonic()
            network.release(meta["uid"])
            await machine.set_migration(capabilities(ms, target=True), {})
            if psk is not None:
                await self._tls(machine, await psk, endpoint="server")
                await machine.monitor_command("migrate-set-parameters", {"tls-creds": TLS_ID})
            addrs = await machine.listen_incoming(f"tcp:{ctl.node_ip}:0")
            port = int(addrs[0]["port"])
        except (HypervisorError, KeyError, IndexError, ValueError) as err:
            if psk is not None and not psk.done():
                psk.cancel()
            reason = f"the target QEMU on {self.node} did not start: {err} ({machine.reason})"
            await self._write_state(key, {"failed": True, "failureReason": reason, "endTimestamp": st.now_rfc3339()})
            await self._drop_target(rt, reason)
            return None
        rt.save()
        await self._write_state(key, {"targetNodeAddress": ctl.node_ip,
                                      "targetDirectMigrationNodePorts": {str(port): 0},
                                      "targetNodeDomainDetected": True})  # fmt: skip
        log.info("migration target for %s/%s listening", *key, extra={
            "port": port, "tls": tls, "build_s": round(t_built - t0, 3), "qemu_start_s": round(t_started - t_built, 3),
            "listen_s": round(time.monotonic() - t_started, 3)})
        return None

    async def _take_over(self, key: Key, vmi: JSON, rt: VMIRuntime) -> None:
        now = st.now_rfc3339()

        def mutate(obj: JSON) -> None:
            labels = obj["metadata"].setdefault("labels", {})
            labels[st.NODE_NAME_LABEL] = self.node
            labels.pop(TARGET_NODE_LABEL, None)
            s = obj.setdefault("status", {})
            s["nodeName"] = self.node
            m = s.setdefault("migrationState", {})
            m.update({"completed": True, "endTimestamp": now, "targetNodeDomainReadyTimestamp": now})

        rt.meta.started_at = now
        rt.save()
        try:
            await network.activate(rt.meta.uid)  # the kept pod IP is routed here from now on
        except network.NetworkSetupError as err:
            log.warning("migration of %s/%s: %s", *key, err)
        written = await self.ctl._write_vmi(key, mutate)
        rt.start_polling(self.ctl._notify(key))
        if written is not None:
            await self.ctl.recorder.event(written, "Normal", "Migrated",
                                          f"The VirtualMachineInstance migrated to node {self.node}.")

    async def _drop_target(self, rt: VMIRuntime, why: str) -> None:
        log.info("dropping migration target %s/%s: %s", *rt.key, why)
        if rt.alive and rt.machine is not None:
            with contextlib.suppress(HypervisorError, TimeoutError):
                await rt.machine.kill()
        await network.teardown(rt.meta.uid)
        await rt.close()
        self.ctl.runtimes.pop(rt.key, None)
        await asyncio.to_thread(rt.remove_files)

    # -- source --------------------------------------------------------------------------------------------
    async def _source(self, key: Key, vmi: JSON, ms: JSON, rt: VMIRuntime) -> float | None:
        machine = rt.machine
        assert machine is not None
        prog = self.progress.get(key)
        if prog is not None and prog.uid != ms.get("migrationUid"):
            prog = None  # a previous migration's
        # started by us already, even when the cache does not show our startTimestamp yet
        if not ms.get("startTimestamp") and prog is None:
            if ms.get("abortRequested"):
                await self._write_state(key, {"failed": True, "abortStatus": "Succeeded", "endTimestamp":
                                              st.now_rfc3339(), "failureReason": "migration aborted"})  # fmt: skip
                return None
            ports = list((ms.get("targetDirectMigrationNodePorts") or {}).keys())
            if not ms.get("targetNodeAddress") or not ports:
                # the target is not ready yet: set our end up meanwhile, so that `migrate` is all that is left
                return await self._prepare_source(key, vmi, ms, machine)
            return await self._start_source(key, vmi, ms, machine, f"{ms['targetNodeAddress']}:{ports[0]}")
        if prog is None:
            # an agent restart during a migration: follow it from here
            prog = self.progress[key] = Progress(time.monotonic(), time.monotonic(), str(ms.get("migrationUid")))
            self._follow(key, machine, prog, machine.events({"MIGRATION", "MIGRATION_PASS"}))
        try:
            info = await machine.query_migrate()
        except HypervisorError as err:
            log.warning("query-migrate on %s/%s: %s", *key, err)
            return 1.0
        status = str(info.get("status") or "")
        if status in ("failed", "cancelled") or (status == "none" and machine.state == RunState.RUNNING):
            aborted = prog.abort_sent or ms.get("abortRequested")
            reason = "migration aborted" if aborted else (info.get("error-desc") or f"migration {status}")
            fields: JSON = {"failed": True, "failureReason": reason, "endTimestamp": st.now_rfc3339()}
            if aborted:
                fields["abortStatus"] = "Succeeded"
            await self._write_state(key, fields)
            self.progress.pop(key, None)
            if machine.state == RunState.PAUSED and machine.reason.startswith("migration"):
                with contextlib.suppress(HypervisorError):
                    await machine.resume()
            await self.ctl.recorder.event(vmi, "Warning", "MigrationFailed", f"Migration failed: {reason}")
            return 0.05
        if status == "completed":
            await self._report(vmi, prog, info)
            return None  # the target takes over (its VMI write enqueues us); then _source_done
        if ms.get("abortRequested") and not prog.abort_sent:
            prog.abort_sent = True
            with contextlib.suppress(HypervisorError):
                await machine.migrate_cancel()
            await self._write_state(key, {"abortStatus": "Aborting"})
        return None  # the monitor task follows the stream; MIGRATION events enqueue us

    def _follow(self, key: Key, machine: Machine, prog: Progress, stream: EventStream) -> None:
        prog.monitor = asyncio.create_task(self._monitor(key, machine, prog, stream), name=f"migration-{key[1]}")

    async def _monitor(self, key: Key, machine: Machine, prog: Progress, stream: EventStream) -> None:
        """Follows one outgoing migration by QEMU's events, not by polling: every MIGRATION_PASS (a new pass
        over the dirty RAM) is judged for convergence (`_escalate`); a MIGRATION status that ends it enqueues the
        VMI for the reconcile that writes the outcome. Between events the timeouts are checked every second."""
        try:
            async with stream:
                while True:
                    try:
                        event = await stream.get(timeout=TICK_SECONDS)
                    except TimeoutError:
                        event = None
                    if event is not None and event.name == "MIGRATION":
                        if event.data.get("status") in DONE:
                            return
                        continue
                    info = await machine.query_migrate()
                    if info.get("status") in DONE:
                        return
                    vmi = self.ctl._cached(key)
                    if vmi is None or migration_state(vmi).get("migrationUid") != prog.uid:
                        return
                    await self._escalate(key, vmi, migration_state(vmi), machine, info, prog,
                                         new_pass=event is not None)  # fmt: skip
        except QMPDisconnectedError:
            pass
        except HypervisorError as err:
            log.warning("following the migration of %s/%s: %s", *key, err)
        finally:
            self.ctl.enqueue(key)

    async def _prepare_source(self, key: Key, vmi: JSON, ms: JSON, machine: Machine) -> float | None:
        """Our end of the stream, set up while the target prepares: capabilities, the downtime limit and bandwidth
        (explicit, as libvirt sets them: bandwidthPerMigration 0 is unlimited, not QEMU's 128 MiB/s default), the
        TLS-PSK credentials. Failing here fails the migration; the guest is untouched."""
        uid = str(ms.get("migrationUid"))
        if self.prepared.get(key) == uid:
            return None
        cfg = ms.get("migrationConfiguration") or {}
        params: JSON = {"downtime-limit": min(START_DOWNTIME_MS, max_downtime_ms(cfg)),
                        "max-bandwidth": quantity.quantity_value(str(cfg.get("bandwidthPerMigration") or "0"))
                        or UNLIMITED_BANDWIDTH,
                        "cpu-throttle-initial": 20, "cpu-throttle-increment": 10}  # QEMU's, escalation raises them
        try:
            await machine.set_migration(capabilities(ms, target=False), params)
            if not cfg.get("disableTLS"):
                await self._tls(machine, await self._psk(vmi), endpoint="client")
                await machine.monitor_command("migrate-set-parameters", {"tls-creds": TLS_ID})
        except HypervisorError as err:
            await self._write_state(key, {"failed": True, "failureReason": f"cannot prepare the source: {err}",
                                          "endTimestamp": st.now_rfc3339()})  # fmt: skip
            return None
        self.prepared[key] = uid
        return None

    async def _start_source(self, key: Key, vmi: JSON, ms: JSON, machine: Machine, dest: str) -> float | None:
        cfg = ms.get("migrationConfiguration") or {}
        downtime = min(START_DOWNTIME_MS, max_downtime_ms(cfg))
        tls = not cfg.get("disableTLS")
        await self._prepare_source(key, vmi, ms, machine)
        if self.prepared.pop(key, None) != ms.get("migrationUid"):
            return None  # failed (written)
        try:
            stream = machine.events({"MIGRATION", "MIGRATION_PASS"})  # before `migrate`: no event slips by
            try:
                await machine.migrate(f"tcp:{dest}")
            except HypervisorError:
                stream.close()
                raise
        except HypervisorError as err:
            await self._write_state(key, {"failed": True, "failureReason": f"migrate: {err}",
                                          "endTimestamp": st.now_rfc3339()})  # fmt: skip
            return None
        now = time.monotonic()
        prog = self.progress[key] = Progress(now, now, str(ms.get("migrationUid")), downtime_ms=downtime)
        self._follow(key, machine, prog, stream)
        await self._write_state(key, {"startTimestamp": st.now_rfc3339(), "mode": "PreCopy"})
        await self.ctl.recorder.event(vmi, "Normal", "Migrating",
                                      f"Live migration to {ms.get('targetNode')} ({dest}) started"
                                      f"{' over TLS' if tls else ''}")  # fmt: skip
        log.info("migrating %s/%s", *key, extra={"to": dest, "tls": tls, "downtime_ms": downtime})
        return None

    async def _escalate(self, key: Key, vmi: JSON, ms: JSON, machine: Machine, info: JSON, prog: Progress, *,
                        new_pass: bool) -> None:  # fmt: skip
        """A migration that does not converge (a busy guest dirties RAM as fast as it goes out, KubeVirt #3504)
        is escalated step by step, each step an event: the downtime limit doubles up to maxDowntimeMs; then, with
        allowAutoConverge, the vCPU throttle of auto-converge is raised; then, with allowPostCopy, the migration
        switches to post-copy. Convergence is judged per pass, not per second: a slow stream that keeps sending
        its first (bulk) pass is progressing, however long that takes; STALL_PASSES passes in a row whose start
        finds no 10 % less RAM left than the best pass so far are not. Past progressTimeout without data moving,
        or completionTimeoutPerGiB x guest GiB in all, the migration is aborted."""
        cfg = ms.get("migrationConfiguration") or {}
        ram = info.get("ram") or {}
        prog.max_throttle = max(prog.max_throttle, int(info.get("cpu-throttle-percentage") or 0))
        remaining = int(ram.get("remaining") or 0)
        transferred = int(ram.get("transferred") or 0)
        now = time.monotonic()
        if transferred > prog.transferred:
            prog.transferred = transferred
            prog.last_progress = now
        total = int(ram.get("total") or 0)
        # at least one GiB's worth: a small guest under a loaded TCG host still needs its seconds
        limit = float(cfg.get("completionTimeoutPerGiB") or 150) * max(total / 2**30, 1.0)
        progress_timeout = float(cfg.get("progressTimeout") or 150)
        if not prog.abort_sent and (now - prog.last_progress > progress_timeout or now - prog.started > limit):
            why = "no progress" if now - prog.last_progress > progress_timeout else "completion timeout"
            prog.abort_sent = True
            await self._write_state(key, {"failureReason": f"migration aborted: {why}"})
            with contextlib.suppress(HypervisorError):
                await machine.migrate_cancel()
            await self.ctl.recorder.event(vmi, "Warning", "MigrationTimeout", f"Migration aborted: {why}")
            return
        passes = int(ram.get("dirty-sync-count") or 0)
        if not new_pass or prog.postcopy or prog.abort_sent or passes < 2:
            return
        if prog.best_remaining < 0 or remaining < prog.best_remaining * 0.9:
            prog.best_remaining = remaining
            prog.stall_passes = 0
            return
        prog.stall_passes += 1
        if prog.stall_passes < STALL_PASSES:
            return
        prog.stall_passes = 0
        prog.step += 1
        ceiling = max_downtime_ms(cfg)
        why = f"Migration not converging (pass {passes}, {remaining} bytes dirty again)"
        if prog.downtime_ms < ceiling:
            prog.downtime_ms = min(ceiling, prog.downtime_ms * 2)
            await machine.monitor_command("migrate-set-parameters", {"downtime-limit": prog.downtime_ms})
            await self.ctl.recorder.event(vmi, "Normal", "MigrationDowntimeRaised",
                                          f"{why}: downtime limit raised to {prog.downtime_ms} ms")
        elif cfg.get("allowAutoConverge") and not prog.throttled:
            prog.throttled = True
            await machine.monitor_command("migrate-set-parameters", {"cpu-throttle-initial": 50,
                                                                     "cpu-throttle-increment": 20})
            await self.ctl.recorder.event(vmi, "Normal", "MigrationAutoConverge",
                                          f"{why}: auto-converge throttles the vCPUs harder")
        elif cfg.get("allowPostCopy"):
            prog.postcopy = True
            await machine.migrate_start_postcopy()
            await self._write_state(key, {"mode": "PostCopy"})
            await self.ctl.recorder.event(vmi, "Normal", "MigrationPostCopy", f"{why}: switched to post-copy")

    async def _report(self, vmi: JSON, prog: Progress, info: JSON) -> None:
        """QEMU's own figures, once, in an event (for operators and bench/migration.py)."""
        if prog.reported or info.get("status") != "completed" or not info.get("total-time"):
            return  # QEMU sets "completed" a moment before it fills in its figures
        prog.reported = True
        ram = info.get("ram") or {}
        await self.ctl.recorder.event(vmi, "Normal", "MigrationCompleted", (
            f"QEMU migration completed: total-time {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
            f"setup {info.get('setup-time')} ms, {ram.get('transferred', 0)} bytes transferred in "
            f"{ram.get('dirty-sync-count', 0)} passes"
            + (f", auto-converge throttled the vCPUs up to {prog.max_throttle} %" if prog.max_throttle else "")))

    async def _source_done(self, key: Key, vmi: JSON, rt: VMIRuntime) -> None:
        """The guest runs on the target now: quit our paused copy, complete our launcher pod, clean up."""
        machine = rt.machine
        assert machine is not None
        prog = self.progress.pop(key, None)
        if prog is not None and machine.state.alive:
            with contextlib.suppress(HypervisorError):
                await self._report(vmi, prog, await machine.query_migrate())
        await rt.stop_polling()
        if machine.state.alive:
            with contextlib.suppress(HypervisorError, TimeoutError):
                await machine.kill()
        pod = self.ctl._launcher_pod(vmi)
        if pod is not None and (pod.get("spec") or {}).get("nodeName") == self.node:
            await self.ctl._write_pod(pod, lambda old: st.launcher_pod_status(
                old, phase="Succeeded", host_ip=self.ctl.node_ip, pod_ip=self.ctl.node_ip,
                started_at=rt.meta.started_at, exit_code=0, reason="Completed", message=""))  # fmt: skip
        # the guest took its pod IP along: this node keeps the address reserved while the VMI lives
        await network.teardown(rt.meta.uid, keep_ip=True, owner={"namespace": key[0], "name": key[1]})
        await rt.close()
        self.ctl.runtimes.pop(rt.key, None)
        await asyncio.to_thread(rt.remove_files)
        log.info("migration source of %s/%s cleaned up", *key)

    # -- helpers -------------------------------------------------------------------------------------------
    def source_pod_ip(self, vmi: JSON, ms: JSON) -> str | None:
        """The pod IP of the VMI's launcher on the source node, the address the VMI keeps; None when that pod
        has none of its own (a user-mode network node reports its node address)."""
        uid = vmi["metadata"].get("uid")
        for pod in self.ctl.pods.list(vmi["metadata"].get("namespace")):
            labels = (pod.get("metadata") or {}).get("labels") or {}
            s = pod.get("status") or {}
            if labels.get("kubevirt.io/created-by") == uid and (pod.get("spec") or {}).get("nodeName") == \
                    ms.get("sourceNode") and s.get("podIP") and s.get("podIP") != s.get("hostIP"):
                return str(s["podIP"])
        return None

    async def _psk(self, vmi: JSON) -> str:
        """The migration's TLS-PSK key: random, 256 bits, in a Secret the migration controller made (owned by
        the VMIM): both ends, and only readers of that Secret, can speak on the stream."""
        name = tls_secret_name(str(migration_state(vmi).get("migrationUid") or ""))
        try:
            secret = await self.ctl.client.get(SECRETS, str(name), vmi["metadata"].get("namespace"))
        except rest.APIError as err:
            raise HypervisorError(f"migration TLS secret {name}: {err}") from err
        return base64.b64decode((secret.get("data") or {}).get("psk", "")).decode()

    async def _tls(self, machine: Machine, key_hex: str, *, endpoint: str) -> None:
        """TLS for the migration stream: QEMU's tls-creds-psk (GnuTLS) with the migration's key. The directory
        also holds DH parameters (RFC 7919's ffdhe2048): without them a server QEMU generates its own, which
        costs ~0.2-1 s of the target's preparation under TCG load."""
        psk_dir = Path(machine.runtime.path) / "migration-tls"
        psk_dir.mkdir(mode=0o700, exist_ok=True)
        (psk_dir / "keys.psk").write_text(f"{PSK_USER}:{key_hex}\n")
        (psk_dir / "keys.psk").chmod(0o600)
        (psk_dir / "dh-params.pem").write_text(FFDHE2048)
        if endpoint == "client":  # a source QEMU may hold an earlier migration's credentials
            with contextlib.suppress(HypervisorError):
                await machine.monitor_command("object-del", {"id": TLS_ID})
        obj = {"qom-type": "tls-creds-psk", "id": TLS_ID, "endpoint": endpoint, "dir": str(psk_dir)}
        if endpoint == "client":
            obj["username"] = PSK_USER  # the server looks the key up by the client's name
        await machine.monitor_command("object-add", obj)

    async def _write_state(self, key: Key, fields: JSON) -> None:
        def mutate(obj: JSON) -> None:
            obj.setdefault("status", {}).setdefault("migrationState", {}).update(fields)

        await self.ctl._write_vmi(key, mutate)


def max_downtime_ms(cfg: JSON) -> int:
    return max(1, int(cfg.get("maxDowntimeMs") or DEFAULT_MAX_DOWNTIME_MS))


def capabilities(ms: JSON, *, target: bool) -> dict[str, bool]:
    """Every capability a migration may use, on or off: a QEMU keeps what an earlier migration set."""
    cfg = ms.get("migrationConfiguration") or {}
    caps = {"postcopy-ram": bool(cfg.get("allowPostCopy"))}  # both ends
    if not target:
        caps["auto-converge"] = bool(cfg.get("allowAutoConverge"))
    return caps


SECRETS = rest.GVR("", "v1", "secrets")


def tls_secret_name(migration_uid: str) -> str:
    """The Secret holding a migration's TLS key (the migration controller creates it; same rule there)."""
    return f"virtplane-migration-{migration_uid[:13]}"

