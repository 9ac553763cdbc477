"""The node agent's VMI reconciler: Scheduled → QEMU → Running, status from QMP events, deletion, adoption.

One key (namespace, name) is reconciled at a time by the WorkQueue, so a VMI whose image is being pulled or
whose guest is shutting down never blocks another. Machine state changes (QMP STOP/RESUME/SHUTDOWN, process
exit) and guest-agent changes only enqueue the key: the reconcile pass reads the machine's state and writes
the status, so there is one writer per VMI.

Writes go through read-modify-write with the object's resourceVersion: the VMI has no status subresource
(KubeVirt's CRD), and the VMI controller writes some of the same list fields (conditions), so merge patches
would clobber its entries. Conflicts re-read and retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import virtplane
from virtplane.client import informer, rest
from virtplane.client.events import EventRecorder
from virtplane.hypervisor import cgroups
from virtplane.hypervisor.accel import AccelProbe
from virtplane.hypervisor.errors import HypervisorError, InvalidSpecError, MissingResourceError, UnsupportedSpecError
from virtplane.hypervisor.machine import Machine, RunState
from virtplane.hypervisor.runtime import RuntimeDir

from . import hotplug, network
from . import status as st
from .migration import NodeMigrations
from .vmiruntime import RuntimeMeta, VMIRuntime, runtime_dir_name
from .volumes import VolumeError, VolumeNotReady, VolumeResolver

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Key = tuple[str, str]

VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
PODS = rest.GVR("", "v1", "pods")
NADS = rest.GVR("k8s.cni.cncf.io", "v1", "network-attachment-definitions")
DEFAULT_GRACE_SECONDS = 30
POWERDOWN_RESEND = 5.0  # a booting guest can miss the ACPI button: press it again (KubeVirt does too)
RESYNC_SECONDS = 30.0
NOT_READY_RETRY = (2.0, 30.0)  # backoff bounds while volumes are not ready


def _grace(vmi: JSON) -> int:
    value = (vmi.get("spec") or {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if value is None else max(0, int(value))


def qos_class(vmi: JSON) -> str:
    """The pod QoS class KubeVirt reports: from the VMI's requests and limits."""
    res = ((vmi.get("spec") or {}).get("domain") or {}).get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    if not req and not lim:
        return "BestEffort"
    if lim and all(str(lim.get(k)) == str(req.get(k, lim.get(k))) for k in ("cpu", "memory")) and \
            all(k in lim for k in ("cpu", "memory")):
        return "Guaranteed"
    return "Burstable"


class VMIController:
    def __init__(
        self,
        *,
        client: rest.Client,
        node_name: str,
        node_ip: str,
        data_dir: Path,
        probe: AccelProbe,
        resolver: VolumeResolver,
        recorder: EventRecorder,
        vmis: informer.Informer,
        pods: informer.Informer,
        targets: informer.Informer | None = None,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.node_ip = node_ip
        self.runtime_root = data_dir / "runtime"
        # The node's VMs weigh their CPU requests under one parent, as kubepods does (cgroups.py); the scope
        # names the data dir too, since several agents (and test clusters) share a host.
        scope = f"{node_name}-{hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]}"
        self.cpu_control = cgroups.CPUControl.detect(scope)
        self.probe = probe
        self.resolver = resolver
        self.recorder = recorder
        self.vmis = vmis
        self.pods = pods
        self.targets = targets  # VMIs migrating to this node (label kubevirt.io/migrationTargetNodeName)
        self.migrations = NodeMigrations(self)
        self.runtimes: dict[Key, VMIRuntime] = {}
        self.queue = informer.WorkQueue(self.reconcile, workers=16, name="node-vmis")
        self._not_ready_attempts: dict[Key, int] = {}

    # -- wiring -------------------------------------------------------------------------------------------
    def enqueue(self, key: Key) -> None:
        self.queue.add(key)

    def on_vmi_event(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        self.queue.add(informer.key_of(obj))

    def on_pod_event(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        # A launcher pod appearing (or being bound) may be what a VMI waited for.
        labels = (obj.get("metadata") or {}).get("labels") or {}
        name = labels.get("vm.kubevirt.io/name")
        if name:
            self.queue.add(((obj.get("metadata") or {}).get("namespace") or "", name))

    def _listener(self, key: Key) -> Callable[[RunState, str], None]:
        def changed(_state: RunState, _reason: str) -> None:
            self.queue.add(key)

        return changed

    def _notify(self, key: Key) -> Callable[[], None]:
        return lambda: self.queue.add(key)

    # -- adoption -----------------------------------------------------------------------------------------
    async def adopt_all(self) -> None:
        """Re-attach to every QEMU a previous agent started (before any reconcile): never stop or restart one."""
        if not self.runtime_root.exists():
            return
        for path in sorted(self.runtime_root.iterdir()):
            rt = VMIRuntime.load(path) if path.is_dir() else None
            if rt is None:
                continue
            try:
                machine = await Machine.adopt(RuntimeDir(path), cpu_control=self.cpu_control)
            except HypervisorError as err:
                log.error("cannot adopt the QEMU in %s: %s", path, err)
                continue
            if machine is None:
                continue  # never launched (a start was interrupted): reconcile starts over
            rt.machine = machine
            rt.dead_at_adoption = not machine.state.alive
            machine.add_state_listener(self._listener(rt.key))
            self.runtimes[rt.key] = rt
            if machine.state.alive:
                rt.start_polling(self._notify(rt.key))
            log.info("adopted QEMU of %s/%s", *rt.key,
                     extra={"pid": machine.pid, "state": machine.state.value, "reason": machine.reason})

    async def shutdown(self) -> None:
        """Agent exit: stop reconciling and let go of every QEMU without touching it."""
        await self.queue.stop()
        for rt in list(self.runtimes.values()):
            with contextlib.suppress(Exception):
                await rt.close()
        if self.cpu_control is not None:
            self.cpu_control.close()  # only what no running VM uses

    # -- reconcile ----------------------------------------------------------------------------------------
    def _cached(self, key: Key) -> JSON | None:
        vmi = self.vmis.get(*key)
        if vmi is None and self.targets is not None:
            vmi = self.targets.get(*key)
        return vmi

    async def reconcile(self, key: Key) -> float | None:
        vmi = self._cached(key)
        rt = self.runtimes.get(key)
        if vmi is None and rt is not None:
            # Not in our (label-selected) cache. Before stopping a VM, ask the API: an object that merely lost
            # its kubevirt.io/nodeName label, or a cache relisting, must never cost a running guest its life.
            try:
                fresh = await self.client.get(VMIS, key[1], key[0])
            except rest.NotFound:
                fresh = None
            if fresh is not None and fresh["metadata"].get("uid") == rt.meta.uid:
                vmi = fresh
        if vmi is None:
            if rt is not None:
                # The object is gone (force-deleted, or our finalizer was removed elsewhere): nothing may run.
                await self._teardown(rt, None)
            return None
        meta = vmi.get("metadata") or {}
        if rt is not None and rt.meta.uid != meta.get("uid"):
            await self._teardown(rt, None)  # a previous VMI of the same name
            rt = None
        status = vmi.get("status") or {}
        if not meta.get("deletionTimestamp"):
            handled, requeue = await self.migrations.reconcile(key, vmi, rt)  # source or target of a migration
            if handled:
                return requeue
        if status.get("nodeName") not in (None, "", self.node_name):
            return None  # moved to another node: not ours any more
        if meta.get("deletionTimestamp"):
            return await self._delete(key, vmi, rt)
        phase = status.get("phase")
        if phase in st.FINAL_PHASES:
            if rt is not None and rt.alive and rt.machine is not None:
                await rt.machine.kill()  # marked final by someone else: it must not keep running
            await self._sync_pod(vmi, phase, rt)
            return None
        if rt is None:
            if phase == st.SCHEDULED:
                return await self._start(key, vmi)
            if phase == st.RUNNING:
                await self._finish(key, vmi, None, st.FAILED,
                                   "the VM's QEMU is not on this node any more (runtime directory missing)")
            return None
        return await self._sync(key, vmi, rt)

    async def _get_nad(self, namespace: str, name: str) -> JSON:
        """A multus network's NetworkAttachmentDefinition, read through the API as Multus does."""
        try:
            return await self.client.get(NADS, name, namespace)
        except rest.NotFound:
            raise network.NetworkSetupError(
                f"NetworkAttachmentDefinition {namespace}/{name} not found") from None

    # -- start --------------------------------------------------------------------------------------------
    async def _start(self, key: Key, vmi: JSON) -> float | None:
        meta = vmi["metadata"]
        path = self.runtime_root / runtime_dir_name(key[0], key[1])
        leftover = VMIRuntime.load(path)
        if leftover is not None or path.exists():
            await asyncio.to_thread(lambda: VMIRuntime(path, RuntimeMeta("", *key)).remove_files())
        rt = VMIRuntime(path, RuntimeMeta(uid=meta["uid"], namespace=key[0], name=key[1]))
        rt.save()
        # pod-network hook (virtplane.network, `virtplane node --pod-network cni`): netns, CNI ADD, masquerade
        # binding before QEMU exists; undone on failure (and on delete, by network.teardown below).
        try:
            await network.prepare(vmi, self._get_nad)
        except network.NetworkSetupError as err:
            await self._finish(key, vmi, rt, st.FAILED, f"cannot run this VMI: {err}", remove=True)
            return None
        try:
            resolved = await self.resolver.resolve(vmi, rt.disks_dir)
            kernel_boot = await self.resolver.resolve_kernel_boot(vmi)
            nets = network.attachments(vmi)
            machine = Machine.create(vmi, rt.runtime, resolved.volumes, nets, self.probe.accel,
                                     kernel_boot=kernel_boot, cpu_control=self.cpu_control)
        except VolumeNotReady as err:
            return await self._not_ready(key, vmi, err.reason, err.message)
        except (VolumeError, network.NetworkSetupError, UnsupportedSpecError, InvalidSpecError,
                MissingResourceError) as err:  # fmt: skip
            await self._finish(key, vmi, rt, st.FAILED, f"cannot run this VMI: {err}", remove=True)
            return None
        except HypervisorError as err:
            # Building disks failed for a host reason (qemu-img, xorriso): retry like KubeVirt's SyncFailed.
            return await self._not_ready(key, vmi, st.REASON_SYNC_FAILED, str(err))
        self._not_ready_attempts.pop(key, None)
        rt.meta.volume_extra = resolved.status_extra
        hotplug.record_boot(rt.meta, vmi)  # hotplug hook: hotpluggable volumes attached at boot
        rt.meta.nics = network.boot_nics(vmi) if network.pod_network() is not None else {}  # NIC hotplug hook
        rt.machine = machine
        machine.add_state_listener(self._listener(key))
        self.runtimes[key] = rt
        await self.recorder.event(vmi, "Normal", "Created", "VirtualMachineInstance defined.")
        paused = (vmi.get("spec") or {}).get("startStrategy") == "Paused"
        try:
            await machine.start(paused=paused)
        except HypervisorError as err:
            network.release(meta["uid"])  # pod-network hook: our copy of the tap fd
            reason = machine.reason or str(err)
            log.warning("QEMU of %s/%s did not start: %s", *key, reason)
            await self._finish(key, vmi, rt, st.FAILED, f"QEMU failed to start: {reason}")
            return None
        network.release(meta["uid"])  # pod-network hook: QEMU holds the tap fd now
        rt.meta.started_at = st.now_rfc3339()
        rt.meta.paused_by_user = paused
        rt.save()
        rt.start_polling(self._notify(key))
        log.info("started QEMU for %s/%s", *key, extra={"pid": machine.pid, "accel": machine.accel})
        return await self._sync(key, vmi, rt)

    async def _not_ready(self, key: Key, vmi: JSON, reason: str, message: str) -> float:
        attempt = self._not_ready_attempts.get(key, 0) + 1
        self._not_ready_attempts[key] = attempt
        log.info("VMI %s/%s not ready to start: %s", *key, message)

        def mutate(obj: JSON) -> None:
            s = obj.setdefault("status", {})
            s["conditions"] = st.set_condition(s.get("conditions"), st.COND_SYNCHRONIZED, "False", reason, message)

        await self._write_vmi(key, mutate)
        if attempt == 1:
            await self.recorder.event(vmi, "Warning", reason, message)
        pod = self._launcher_pod(vmi)
        if pod is not None:
            waiting = "ErrImagePull" if attempt == 1 else "ImagePullBackOff"
            pod_reason = waiting if reason == "ErrImagePull" else "ContainerCreating"
            await self._write_pod(pod, lambda old: st.launcher_pod_status(
                old, phase="Pending", host_ip=self.node_ip, pod_ip=self.node_ip, started_at=None,
                reason=pod_reason, message=message))  # fmt: skip
        lo, hi = NOT_READY_RETRY
        return min(hi, lo * (2 ** min(attempt - 1, 5)))

    # -- steady state -------------------------------------------------------------------------------------
    async def _sync(self, key: Key, vmi: JSON, rt: VMIRuntime) -> float | None:
        machine = rt.machine
        assert machine is not None
        state = machine.state
        if state in (RunState.STOPPED, RunState.CRASHED):
            await rt.stop_polling()
            if state == RunState.STOPPED:
                await self._finish(key, vmi, rt, st.SUCCEEDED, machine.reason or "guest shut down")
            else:
                await self._finish(key, vmi, rt, st.FAILED, self._crash_reason(rt))
            return None
        if state == RunState.CREATED:
            return None
        if not rt.meta.started_at:
            rt.meta.started_at = st.now_rfc3339()
            rt.save()
        if not machine.state.alive:
            return None
        if state == RunState.RUNNING and rt.meta.paused_by_user:
            # Resumed (by our unpause, or from outside: QMP `cont`): the user pause is over.
            rt.meta.paused_by_user = False
            rt.save()
        was_running = (vmi.get("status") or {}).get("phase") == st.RUNNING
        # hotplug hook (virtplane.node.hotplug): QEMU's disks follow the VMI's hotpluggable volumes
        hotplug_retry = await hotplug.reconcile(self.resolver, vmi, rt, self.recorder)
        # NIC hotplug hook (virtplane.node.network): QEMU's multus NICs follow the VMI's interfaces
        nics_before = dict(rt.meta.nics)
        nic_errors = await network.reconcile_nics(vmi, rt.meta.nics, machine, self._get_nad)
        if rt.meta.nics != nics_before:
            rt.save()
        for err in nic_errors:
            await self.recorder.event(vmi, "Warning", "SyncFailed", f"NIC hotplug: {err}")
        if nic_errors:
            hotplug_retry = min(hotplug_retry or RESYNC_SECONDS, 5.0)

        def mutate(obj: JSON) -> None:
            self._running_status(obj, rt)
            hotplug.apply_status(obj, rt)  # hotplug hook: hotplugged volumes' phases

        written = await self._write_vmi(key, mutate)
        if written is not None and not was_running:
            await self.recorder.event(written, "Normal", "Started", "VirtualMachineInstance started.")
        pod = self._launcher_pod(vmi)
        if pod is not None:
            pod_ip = network.pod_ip(rt.meta.uid) or self.node_ip  # pod-network hook
            await self._write_pod(pod, lambda old: st.launcher_pod_status(
                old, phase="Running", host_ip=self.node_ip, pod_ip=pod_ip, started_at=rt.meta.started_at))
        return min(RESYNC_SECONDS, hotplug_retry or RESYNC_SECONDS)

    @staticmethod
    def _crash_reason(rt: VMIRuntime) -> str:
        machine = rt.machine
        assert machine is not None
        reason = machine.reason or "QEMU exited"
        info = machine.exit_info
        if info is not None and info.exit_code is None and info.signal is None:
            # Not our child (adopted after an agent restart): its exit status went to init, not to us.
            when = "while the node agent was down" if rt.dead_at_adoption else "after this node agent adopted it"
            reason = f"QEMU (pid {machine.pid}) exited {when}; exit status unknown ({reason})"
            tail = _log_tail(rt.runtime.stderr_log)
            if tail:
                reason += f"; qemu.log: {tail}"
        return reason

    def _running_status(self, obj: JSON, rt: VMIRuntime) -> None:
        machine = rt.machine
        assert machine is not None
        s = obj.setdefault("status", {})
        now = st.now_rfc3339()
        st.add_phase_transition(s, st.RUNNING, now)
        s["nodeName"] = self.node_name
        conds = s.get("conditions")
        conds = st.remove_condition(conds, st.COND_SYNCHRONIZED)
        if machine.state == RunState.RUNNING:
            conds = st.set_condition(conds, st.COND_READY, "True", now=now)
            conds = st.remove_condition(conds, st.COND_PAUSED)
        else:
            conds = st.set_condition(conds, st.COND_READY, "False", st.REASON_GUEST_NOT_RUNNING,
                                     f"the guest is {machine.state.value.lower()}", now=now)  # fmt: skip
            if machine.state == RunState.PAUSED:
                if machine.reason.startswith("I/O error"):
                    reason, message = st.REASON_PAUSED_IO_ERROR, machine.reason
                else:
                    reason, message = st.REASON_PAUSED_BY_USER, "VMI was paused by user"
                conds = st.set_condition(conds, st.COND_PAUSED, "True", reason, message, now=now)
        if rt.agent.connected:
            conds = st.set_condition(conds, st.COND_AGENT, "True", now=now)
        else:
            conds = st.remove_condition(conds, st.COND_AGENT)
        if machine.accel == "tcg":
            conds = st.set_condition(conds, st.COND_SOFTWARE_EMULATION, "True", st.REASON_SOFTWARE_EMULATION,
                                     self.probe.reason, now=now)  # fmt: skip
        else:
            conds = st.remove_condition(conds, st.COND_SOFTWARE_EMULATION)
        s["conditions"] = conds
        # pod-network hook: as in KubeVirt, a masquerade interface reports the pod IP when there is one
        pod_ip = network.pod_ip(rt.meta.uid)
        s["interfaces"] = st.interfaces_status(obj, rt.agent.interfaces if rt.agent.connected else None,
                                               binding_ips=network.binding_ips(rt.meta.uid, rt.meta.nics),
                                               **({"masquerade_ip": pod_ip} if pod_ip else {}))  # fmt: skip
        osinfo = st.guest_os_info(rt.agent.osinfo) if rt.agent.connected else {}
        if osinfo:
            s["guestOSInfo"] = osinfo
        s["volumeStatus"] = st.volume_status(obj, rt.meta.volume_extra)
        machine_type = ((((obj.get("spec") or {}).get("domain") or {}).get("machine") or {}).get("type")) or "q35"
        s["machine"] = {"type": machine_type}
        s["qosClass"] = s.get("qosClass") or qos_class(obj)
        s["launcherContainerImageVersion"] = f"virtplane/virt-launcher:{virtplane.__version__}"
        if rt.meta.frozen:
            s["fsFreezeStatus"] = "frozen"
        else:
            s.pop("fsFreezeStatus", None)
        if rt.meta.backup:  # the last `backup` (full backups only: no changed block tracking)
            s["changedBlockTracking"] = {"state": "Disabled", "backupStatus": dict(rt.meta.backup)}

    # -- the end ------------------------------------------------------------------------------------------
    async def _finish(self, key: Key, vmi: JSON, rt: VMIRuntime | None, phase: str, reason: str,
                      *, remove: bool = False) -> None:  # fmt: skip
        """Final phase: status, pod, event (once). `remove`: also drop the runtime dir (nothing ever ran)."""
        already = (vmi.get("status") or {}).get("phase") in st.FINAL_PHASES

        def mutate(obj: JSON) -> None:
            s = obj.setdefault("status", {})
            if s.get("phase") in st.FINAL_PHASES:
                return
            st.add_phase_transition(s, phase)
            conds = st.remove_condition(s.get("conditions"), st.COND_PAUSED)
            conds = st.remove_condition(conds, st.COND_AGENT)
            conds = st.set_condition(conds, st.COND_READY, "False", st.REASON_GUEST_NOT_RUNNING, reason)
            s["conditions"] = conds
            if phase == st.FAILED:
                s["reason"] = "Failed"

        written = await self._write_vmi(key, mutate)
        if written is not None and not already and (rt is None or rt.meta.reported_final != phase):
            if phase == st.SUCCEEDED:
                await self.recorder.event(written, "Normal", "Stopped", "The VirtualMachineInstance was shut down.")
            else:
                await self.recorder.event(
                    written, "Warning", "Stopped", f"The VirtualMachineInstance crashed: {reason}")
        if rt is not None:
            rt.meta.reported_final = phase
            if remove:
                self.runtimes.pop(key, None)
                await asyncio.to_thread(rt.remove_files)
            else:
                with contextlib.suppress(OSError):
                    rt.save()
        await self._sync_pod(written or vmi, phase, rt, reason)

    async def _sync_pod(self, vmi: JSON, phase: str, rt: VMIRuntime | None, message: str = "") -> None:
        pod = self._launcher_pod(vmi)
        if pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        pod_phase = "Succeeded" if phase == st.SUCCEEDED else "Failed"
        started = rt.meta.started_at if rt is not None else None
        await self._write_pod(pod, lambda old: st.launcher_pod_status(
            old, phase=pod_phase, host_ip=self.node_ip, pod_ip=self.node_ip, started_at=started,
            exit_code=0 if pod_phase == "Succeeded" else 1, reason="Completed" if pod_phase == "Succeeded" else "Error",
            message=message if pod_phase == "Failed" else ""))  # fmt: skip

    async def _delete(self, key: Key, vmi: JSON, rt: VMIRuntime | None) -> float | None:
        """Graceful shutdown within terminationGracePeriodSeconds, then kill, clean up, drop our finalizer."""
        if rt is not None and rt.alive:
            machine = rt.machine
            assert machine is not None
            loop = asyncio.get_running_loop()
            grace = _grace(vmi)
            if rt.deletion_started is None:
                rt.deletion_started = loop.time()
                if grace > 0:
                    await self.recorder.event(vmi, "Normal", "ShuttingDown", "Signaled Graceful Shutdown")
            while machine.state.alive:
                left = rt.deletion_started + grace - loop.time()
                if left <= 0 or machine.state == RunState.PAUSED:
                    # A paused guest cannot react to the power button: no point in waiting for it.
                    await self.recorder.event(vmi, "Normal", "Deleted", "Signaled Deletion")
                    with contextlib.suppress(HypervisorError, TimeoutError):
                        await machine.kill()
                    break
                # Pressing the button once moves the machine to SHUTTING_DOWN; a guest still booting misses
                # that press, so keep pressing while it runs (KubeVirt re-sends too).
                if (machine.state in (RunState.RUNNING, RunState.SHUTTING_DOWN)
                        and loop.time() - rt.last_powerdown >= POWERDOWN_RESEND):
                    rt.last_powerdown = loop.time()
                    with contextlib.suppress(HypervisorError):
                        await machine.powerdown()
                with contextlib.suppress(TimeoutError, HypervisorError):
                    await machine.wait_exit(timeout=min(left, 1.0))
        if rt is not None:
            await rt.stop_polling()
            failed = rt.machine is not None and rt.machine.state == RunState.CRASHED \
                and rt.deletion_started is None  # fmt: skip
        else:
            failed = (vmi.get("status") or {}).get("phase") == st.FAILED
        phase = st.FAILED if failed else st.SUCCEEDED
        reason = rt.machine.reason if rt is not None and rt.machine is not None else "deleted"
        await self._finish(key, vmi, rt, phase, reason or "deleted")
        # pod-network hook: CNI DEL, netns removed; an IP this node kept for the VMI since it migrated away too
        await network.teardown(vmi["metadata"].get("uid", ""), release_kept=True)
        if rt is not None:
            await rt.close()
            self.runtimes.pop(key, None)
            await asyncio.to_thread(rt.remove_files)
        else:
            path = self.runtime_root / runtime_dir_name(*key)
            loaded = VMIRuntime.load(path)
            if loaded is not None and loaded.meta.uid == vmi["metadata"].get("uid"):
                await asyncio.to_thread(loaded.remove_files)
        await self._remove_finalizer(key)
        self._not_ready_attempts.pop(key, None)
        return None

    async def _teardown(self, rt: VMIRuntime, vmi: JSON | None) -> None:
        """Stop a VM whose object vanished or was replaced: no grace (there is nobody to report to)."""
        if rt.alive and rt.machine is not None:
            with contextlib.suppress(HypervisorError, TimeoutError):
                await rt.machine.kill()
        await network.teardown(rt.meta.uid, release_kept=True)  # pod-network hook
        await rt.close()
        self.runtimes.pop(rt.key, None)
        await asyncio.to_thread(rt.remove_files)

    # -- API writes ---------------------------------------------------------------------------------------
    async def _write_vmi(self, key: Key, mutate: Callable[[JSON], None]) -> JSON | None:
        """Read-modify-write with resourceVersion; returns the written (or unchanged) object, None if gone."""
        current = self._cached(key)
        if current is None:
            with contextlib.suppress(rest.NotFound):
                current = await self.client.get(VMIS, key[1], key[0])
        for _attempt in range(8):
            if current is None:
                return None
            new = copy.deepcopy(current)
            mutate(new)
            if new == current:
                return current
            try:
                return await self.client.update(VMIS, new)
            except rest.Conflict:
                pass
            except rest.NotFound:
                return None
            try:
                current = await self.client.get(VMIS, key[1], key[0])
            except rest.NotFound:
                return None
        raise rest.APIError(409, {"message": f"VMI {key[0]}/{key[1]}: too many write conflicts"})

    async def _remove_finalizer(self, key: Key) -> None:
        def mutate(obj: JSON) -> None:
            fins = obj["metadata"].get("finalizers") or []
            if st.FINALIZER in fins:
                obj["metadata"]["finalizers"] = [f for f in fins if f != st.FINALIZER]

        await self._write_vmi(key, mutate)

    def _launcher_pod(self, vmi: JSON) -> JSON | None:
        uid = (vmi.get("metadata") or {}).get("uid")
        ns = (vmi.get("metadata") or {}).get("namespace")
        candidates = [p for p in self.pods.list(ns)
                      if ((p.get("metadata") or {}).get("labels") or {}).get("kubevirt.io/created-by") == uid]
        if not candidates:
            return None
        # Several (a migration target, a restarted launcher): the one bound to this node.
        for p in candidates:
            if (p.get("spec") or {}).get("nodeName") == self.node_name:
                return p
        return candidates[0]

    async def _write_pod(self, pod: JSON, build: Callable[[JSON | None], JSON]) -> None:
        current: JSON | None = pod
        for _attempt in range(5):
            if current is None:
                return
            new_status = build(current.get("status"))
            if _same_pod_status(current.get("status") or {}, new_status):
                return
            body = copy.deepcopy(current)
            body["status"] = new_status
            try:
                await self.client.update_status(PODS, body)
                return
            except rest.Conflict:
                pass
            except rest.NotFound:
                return
            meta = current["metadata"]
            try:
                current = await self.client.get(PODS, meta["name"], meta.get("namespace"))
            except rest.NotFound:
                return


def _same_pod_status(a: JSON, b: JSON) -> bool:
    """Equal ignoring timestamps that set_condition refreshes."""
    def strip(s: JSON) -> JSON:
        s = copy.deepcopy(s)
        for c in s.get("conditions") or []:
            c.pop("lastTransitionTime", None)
            c.pop("lastProbeTime", None)
        return s

    return strip(a) == strip(b)


def _log_tail(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return " | ".join(f.read().decode(errors="replace").strip().splitlines()[-2:])
    except OSError:
        return ""
