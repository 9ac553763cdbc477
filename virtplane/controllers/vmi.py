"""The VMI controller: a VirtualMachineInstance's launcher pod and its life until a node agent takes over.

As docs/vm-runtime.md divides the work: this controller adds the `foregroundDeleteVirtualMachine`
finalizer, creates the virt-launcher pod, and moves the VMI Pending -> Scheduling (pod exists) ->
Scheduled (pod bound: `status.nodeName`, label `kubevirt.io/nodeName`). From Scheduled on the node
agent drives the VMI (Running, Succeeded, Failed, Ready, ...); this controller still fails a VMI whose
launcher pod vanished, mirrors scheduling and image-pull trouble into conditions, and keeps
`LiveMigratable` and `qosClass` current.

Teardown: a VMI that was never handed to a node agent (no `status.nodeName`) is the controller's to
clean up, as KubeVirt's virt-controller does: delete its pods, mark it Failed, drop the finalizer. Once
handed over, the node agent shuts QEMU down and removes the finalizer; the controller steps in only when
that node has no live agent (its Lease in `kube-node-lease` is missing or stale) and the VMI never ran,
so a VMI scheduled onto a node that never came up does not hang in deletion forever.

VMIs have no status subresource (KubeVirt's CRD has none), so status and metadata are written together
with a merge patch that carries the resourceVersion read: a concurrent writer (the node agent) makes it
409 and the key is simply reconciled again from the fresher cache.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import logging
import math
import time
from typing import Any

import virtplane
from virtplane.api import quantity
from virtplane.client import events, informer, rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]

VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
PODS = rest.GVR("", "v1", "pods")
PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
DATAVOLUMES = rest.GVR("cdi.kubevirt.io", "v1beta1", "datavolumes")
LEASES = rest.GVR("coordination.k8s.io", "v1", "leases")

COMPONENT = "virt-controller"
FINALIZER = "foregroundDeleteVirtualMachine"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
APP_LABEL = "kubevirt.io"
CREATED_BY_LABEL = "kubevirt.io/created-by"
VM_NAME_LABEL = "vm.kubevirt.io/name"
DOMAIN_ANNOTATION = "kubevirt.io/domain"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
ALLOW_POD_BRIDGE_MIGRATION = "kubevirt.io/allow-pod-bridge-network-live-migration"
LAUNCHER_IMAGE = f"virtplane/virt-launcher:{virtplane.__version__}"  # what the node agent reports back
NODE_LEASE_NAMESPACE = "kube-node-lease"

# KubeVirt reserves ~240Mi per launcher for libvirt+QEMU(KVM); a bare QEMU under TCG with no libvirt needs
# about 40-60Mi beyond guest RAM, so 64Mi keeps small nodes useful without inviting OOM kills.
MEMORY_OVERHEAD = 64 * 2**20
# KubeVirt's default cpuAllocationRatio (10): a vCPU without an explicit request asks for 100m.
CPU_MILLI_PER_VCPU = 100
# KubeVirt gives the launcher pod the VMI's grace period plus this, so the pod outlives the guest shutdown.
POD_GRACE_EXTRA = 15
# A node whose Lease was not renewed for this long has no live agent (kube-controller-manager's 40s).
AGENT_GRACE = 40.0
# How long a pod we created may be missing from the informer before we believe it is really gone.
EXPECTATION_TIMEOUT = 30.0

FINAL_PHASES = ("Succeeded", "Failed")
UNPROCESSED_PHASES = ("", "Pending")
# Synchronized reasons this controller sets before the hand-over (the node agent owns the condition after it).
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff")
OWNED_SYNC_REASONS = ("FailedPvcNotFound", *IMAGE_PULL_REASONS)
POD_NOT_EXISTS = ("PodNotExists", "virt-launcher pod has not yet been scheduled")
GUEST_NOT_RUNNING = ("GuestNotRunning", "Guest VM is not reported as running")


# --------------------------------------------------------------------------------------------------
# small helpers (shared with the VM controller)


def now_rfc3339() -> str:
    return events.now_rfc3339()


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def get_condition(obj: JSON | None, ctype: str) -> JSON | None:
    if obj is None:
        return None
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


def set_condition(conditions: list[JSON], cond: JSON) -> list[JSON]:
    """Replaces the condition of cond's type; keeps the old timestamps when nothing but time changed, so a
    level-based reconcile does not rewrite the object on every pass."""
    old = next((c for c in conditions if c.get("type") == cond["type"]), None)
    if old is not None and all(old.get(k) == cond.get(k) for k in ("status", "reason", "message")):
        for k in ("lastProbeTime", "lastTransitionTime"):
            if k in old:
                cond = {**cond, k: old[k]}
    return [cond if c.get("type") == cond["type"] else c for c in conditions] if old is not None \
        else [*conditions, cond]


def remove_condition(conditions: list[JSON], ctype: str) -> list[JSON]:
    return [c for c in conditions if c.get("type") != ctype]


def merge_patch_diff(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns `old` into `new` (maps recursed, anything else replaced)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: JSON = {k: None for k in old.keys() - new.keys()}
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = merge_patch_diff(old[k], v)
    return patch


def controller_ref(obj: JSON) -> JSON | None:
    return next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)


def owner_reference(obj: JSON) -> JSON:
    meta = obj["metadata"]
    return {"apiVersion": obj.get("apiVersion", ""), "kind": obj.get("kind", ""), "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _quantity(value: Any) -> decimal.Decimal | None:
    try:
        return quantity.parse_quantity(value) if value is not None else None
    except (ValueError, decimal.InvalidOperation):
        return None


def format_bytes(n: int) -> str:
    for suffix, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n % size == 0 and n >= size:
            return f"{n // size}{suffix}"
    return str(n)


def format_millicpu(m: int) -> str:
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


class WriteTracker:
    """Remembers which resourceVersion each of our writes replaced, so that a reconcile never decides on the
    version it has just overwritten while the informer has not delivered the new one yet (e.g. start a VMI
    again before the startFailure it just recorded is in the cache)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._replaced: dict[tuple[str, str], tuple[str, float]] = {}
        self._timeout = timeout

    def wrote(self, key: tuple[str, str], replaced_rv: str) -> None:
        self._replaced[key] = (replaced_rv, time.monotonic())

    def stale(self, key: tuple[str, str], obj: JSON | None) -> bool:
        entry = self._replaced.get(key)
        if entry is None:
            return False
        rv, when = entry
        if obj is None or obj["metadata"].get("resourceVersion") != rv or time.monotonic() - when > self._timeout:
            self._replaced.pop(key, None)
            return False
        return True


# --------------------------------------------------------------------------------------------------
# the launcher pod


def vcpus(spec: JSON) -> int:
    cpu = ((spec.get("domain") or {}).get("cpu")) or {}
    n = 1
    for k in ("sockets", "cores", "threads"):
        v = cpu.get(k)
        n *= v if isinstance(v, int) and v > 0 else 1
    return n


def launcher_resources(vmi: JSON) -> JSON:
    """requests: memory = guest memory (or the VMI's memory request) + overhead, cpu = the VMI's request or
    100m per vCPU; limits follow the VMI's limits (plus the same overhead for memory)."""
    spec = vmi.get("spec") or {}
    domain = spec.get("domain") or {}
    res = domain.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    memory = _quantity(requests.get("memory")) or _quantity((domain.get("memory") or {}).get("guest")) \
        or _quantity(limits.get("memory")) or decimal.Decimal(0)
    out_requests: JSON = {"memory": format_bytes(math.ceil(memory) + MEMORY_OVERHEAD)}
    cpu = _quantity(requests.get("cpu"))
    out_requests["cpu"] = format_millicpu(math.ceil(cpu * 1000)) if cpu is not None \
        else format_millicpu(CPU_MILLI_PER_VCPU * vcpus(spec))
    out: JSON = {"requests": out_requests}
    out_limits: JSON = {}
    if _quantity(limits.get("memory")) is not None:
        out_limits["memory"] = format_bytes(math.ceil(_quantity(limits["memory"]) or 0) + MEMORY_OVERHEAD)
    if _quantity(limits.get("cpu")) is not None:
        out_limits["cpu"] = format_millicpu(math.ceil((_quantity(limits["cpu"]) or 0) * 1000))
    if out_limits:
        out["limits"] = out_limits
    return out


def pod_hostname(vmi: JSON) -> str:
    """KubeVirt's SanitizeHostname: spec.hostname or the name, no dots, at most 63 characters."""
    name = (vmi.get("spec") or {}).get("hostname") or vmi["metadata"]["name"]
    return name.replace(".", "-")[:63].rstrip("-")


def launcher_pod(vmi: JSON) -> JSON:
    """The virt-launcher pod for a VMI, as docs/vm-runtime.md specifies it (pure)."""
    meta, spec = vmi["metadata"], vmi.get("spec") or {}
    name = meta["name"]
    labels = {**(meta.get("labels") or {}), APP_LABEL: "virt-launcher", CREATED_BY_LABEL: meta["uid"],
              VM_NAME_LABEL: name}
    labels.pop(NODE_NAME_LABEL, None)  # set once the pod is bound, from the pod's own node
    grace = spec.get("terminationGracePeriodSeconds")
    pod_spec: JSON = {
        "hostname": pod_hostname(vmi),
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": (grace if isinstance(grace, int) else 30) + POD_GRACE_EXTRA,
        "containers": [{
            "name": "compute",
            "image": LAUNCHER_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "resources": launcher_resources(vmi),
        }],
        # KubeVirt's launchers only land on nodes whose handler declared them able to run VMs.
        "nodeSelector": {**(spec.get("nodeSelector") or {}), SCHEDULABLE_LABEL: "true"},
        "schedulerName": spec.get("schedulerName") or "default-scheduler",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    for k in ("affinity", "tolerations", "priorityClassName", "subdomain", "dnsPolicy", "dnsConfig"):
        if spec.get(k):
            pod_spec[k] = copy.deepcopy(spec[k])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"virt-launcher-{name}-",
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": {DOMAIN_ANNOTATION: name, "kubectl.kubernetes.io/default-container": "compute"},
            "ownerReferences": [owner_reference({**vmi, "apiVersion": "kubevirt.io/v1",
                                                 "kind": "VirtualMachineInstance"})],
        },
        "spec": pod_spec,
    }


def qos_class(pod_spec: JSON) -> str:
    """Kubernetes' GetPodQOS over cpu and memory."""
    containers = [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]
    zero, guaranteed = True, True
    for c in containers:
        res = c.get("resources") or {}
        req = {k: _quantity(v) for k, v in (res.get("requests") or {}).items() if k in ("cpu", "memory")}
        lim = {k: _quantity(v) for k, v in (res.get("limits") or {}).items() if k in ("cpu", "memory")}
        req = {k: v for k, v in req.items() if v}
        lim = {k: v for k, v in lim.items() if v}
        if req or lim:
            zero = False
        if set(lim) != {"cpu", "memory"} or any(lim.get(k) != v for k, v in req.items()):
            guaranteed = False
    if zero:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


# --------------------------------------------------------------------------------------------------
# what the VMI's volumes and interfaces allow


def claim_name(volume: JSON) -> str | None:
    if isinstance(volume.get("persistentVolumeClaim"), dict):
        return volume["persistentVolumeClaim"].get("claimName")
    if isinstance(volume.get("dataVolume"), dict):
        return volume["dataVolume"].get("name")
    return None


def pvc_access_modes(pvc: JSON) -> list[str]:
    return list((pvc.get("status") or {}).get("accessModes") or (pvc.get("spec") or {}).get("accessModes") or [])


def live_migratable(vmi: JSON, pvcs: dict[str, JSON]) -> JSON:
    """The LiveMigratable condition, by virt-handler's rules (calculateLiveMigrationCondition).

    containerDisks, emptyDisks, cloud-init and other local volumes do not prevent migration (their
    content is copied: a block migration); PVCs must be shared (ReadWriteMany), hostDisks shared, the pod
    network bound with masquerade (or bridge with KubeVirt's opt-in annotation, or a migratable plugin),
    and no host devices.
    """
    spec = vmi.get("spec") or {}
    domain = spec.get("domain") or {}

    def no(reason: str, message: str) -> JSON:
        return {"type": "LiveMigratable", "status": "False", "reason": reason, "message": message,
                "lastProbeTime": None, "lastTransitionTime": None}

    for volume in spec.get("volumes") or []:
        claim = claim_name(volume)
        if claim is not None:
            pvc = pvcs.get(claim)
            if pvc is None:
                return no("DisksNotLiveMigratable", f"cannot migrate VMI: Unable to determine if PVC {claim} is "
                          "shared, live migration requires that all PVCs must be shared (using ReadWriteMany "
                          "access mode)")
            if "ReadWriteMany" not in pvc_access_modes(pvc):
                return no("DisksNotLiveMigratable", f"cannot migrate VMI: PVC {claim} is not shared, live "
                          "migration requires that all PVCs must be shared (using ReadWriteMany access mode)")
        elif isinstance(volume.get("hostDisk"), dict) and not volume["hostDisk"].get("shared"):
            return no("DisksNotLiveMigratable", "cannot migrate VMI with non-shared HostDisk")
    interfaces = (domain.get("devices") or {}).get("interfaces") or []
    if interfaces and not _interfaces_migratable(vmi, interfaces):
        return no("InterfaceNotLiveMigratable", "cannot migrate VMI which does not use masquerade, bridge with "
                  f"{ALLOW_POD_BRIDGE_MIGRATION} VM annotation or a migratable plugin to connect to the pod "
                  "network")
    devices = domain.get("devices") or {}
    if devices.get("hostDevices") or devices.get("gpus"):
        return no("HostDeviceNotLiveMigratable", "VMI uses a PCI host devices")
    if isinstance((domain.get("launchSecurity") or {}).get("sev"), dict):
        return no("SEVNotLiveMigratable", "VMI uses SEV")
    passthrough = ((domain.get("features") or {}).get("hypervPassthrough") or {})
    if passthrough.get("enabled"):
        return no("HypervPassthroughNotLiveMigratable", "VMI uses hyperv passthrough")
    return {"type": "LiveMigratable", "status": "True", "lastProbeTime": None, "lastTransitionTime": None}


def _interfaces_migratable(vmi: JSON, interfaces: list[JSON]) -> bool:
    networks = (vmi.get("spec") or {}).get("networks") or []
    pod_net = next((n for n in networks if isinstance(n.get("pod"), dict)), None)
    if pod_net is None:
        return False
    iface = next((i for i in interfaces if i.get("name") == pod_net.get("name")), None)
    if iface is None:
        return False
    if isinstance(iface.get("masquerade"), dict):
        return True
    if isinstance(iface.get("bridge"), dict):
        return ALLOW_POD_BRIDGE_MIGRATION in (vmi["metadata"].get("annotations") or {})
    if isinstance(iface.get("passtBinding"), dict):
        return True
    binding = iface.get("binding")
    return isinstance(binding, dict) and binding.get("name") == "passt"  # the plugin declares migration support


def image_pull_error(pod: JSON) -> tuple[str, str] | None:
    """checkForContainerImageError: a container waiting on ErrImagePull/ImagePullBackOff."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
            return waiting["reason"], waiting.get("message") or f"container {cs.get('name')} cannot pull its image"
    return None


def volumes_problem(vmi: JSON, pvcs: dict[str, JSON], dvs: dict[str, JSON]) -> tuple[str, str] | None:
    """What keeps the launcher pod from being created: ("missing", msg) for an absent PVC, ("failed", msg) for
    a failed DataVolume, ("waiting", msg) while a DataVolume populates; None when every volume is there."""
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        if isinstance(volume.get("persistentVolumeClaim"), dict):
            claim = volume["persistentVolumeClaim"].get("claimName", "")
            if claim not in pvcs:
                return "missing", f"failed to render launch manifest: didn't find PVC {claim}"
        elif isinstance(volume.get("dataVolume"), dict):
            name = volume["dataVolume"].get("name", "")
            dv = dvs.get(name)
            if dv is None:
                if name in pvcs:
                    continue
                return "waiting", f"waiting for DataVolume {name} to be created"
            phase = (dv.get("status") or {}).get("phase")
            if phase == "Failed":
                return "failed", f"DataVolume {name} failed"
            if phase not in ("Succeeded", "WaitForFirstConsumer", "PendingPopulation"):
                return "waiting", f"waiting for DataVolume {name} to be populated"
    return None


def lease_alive(lease: JSON | None, now: float) -> bool:
    if lease is None:
        return False
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime"))
    if renewed is None:
        return False
    duration = spec.get("leaseDurationSeconds")
    grace = max(AGENT_GRACE, float(duration) if isinstance(duration, int | float) else 0.0)
    return now - renewed < grace


def ever_running(vmi: JSON) -> bool:
    status = vmi.get("status") or {}
    return status.get("phase") == "Running" or any(
        t.get("phase") == "Running" for t in status.get("phaseTransitionTimestamps") or [])


def set_phase(status: JSON, phase: str) -> None:
    if status.get("phase") == phase:
        return
    status["phase"] = phase
    status["phaseTransitionTimestamps"] = [*(status.get("phaseTransitionTimestamps") or []),
                                           {"phase": phase, "phaseTransitionTimestamp": now_rfc3339()}]


def pod_down(pod: JSON) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp")) or (pod.get("status") or {}).get("phase") in FINAL_PHASES


# --------------------------------------------------------------------------------------------------
# the controller


class VMIController:
    def __init__(self, client: rest.Client) -> None:
        # Our own connection pool: every informer holds a watch connection open, and a pool shared with
        # watch-heavy neighbours (the garbage collector watches every resource) can run dry and stall writes.
        self.client = rest.Client(client.config, user_agent="virt-controller-vmi")
        self.vmis = informer.Informer(self.client, VMIS)
        self.pods = informer.Informer(self.client, PODS, label_selector=f"{APP_LABEL}=virt-launcher")
        self.pvcs = informer.Informer(self.client, PVCS)
        self.dvs = informer.Informer(self.client, DATAVOLUMES)
        self.leases = informer.Informer(self.client, LEASES, namespace=NODE_LEASE_NAMESPACE)
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="vmi")
        self.recorder = events.EventRecorder(self.client, COMPONENT)
        # Pods we created that the informer has not shown yet: (pod, when) by VMI uid (KubeVirt's expectations).
        self._created: dict[str, tuple[JSON, float]] = {}
        self._writes = WriteTracker()
        self.vmis.add_handler(self._on_vmi)
        self.pods.add_handler(self._on_pod)
        self.pvcs.add_handler(self._on_volume)
        self.dvs.add_handler(self._on_volume)
        self.leases.add_handler(self._on_lease)

    async def start(self) -> None:
        for inf in (self.vmis, self.pods, self.pvcs, self.dvs, self.leases):
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for inf in (self.vmis, self.pods, self.pvcs, self.dvs, self.leases):
            await inf.stop()
        await self.client.close()

    # ------------------------------------------------------------- events

    def _on_vmi(self, kind: str, vmi: JSON, old: JSON | None) -> None:
        if kind == "DELETED":
            self._created.pop(vmi["metadata"].get("uid", ""), None)
            return
        self.queue.add(informer.key_of(vmi))

    def _on_pod(self, kind: str, pod: JSON, old: JSON | None) -> None:
        ref = controller_ref(pod)
        if ref is not None and ref.get("kind") == "VirtualMachineInstance":
            self.queue.add((pod["metadata"].get("namespace") or "", ref["name"]))

    def _on_volume(self, kind: str, obj: JSON, old: JSON | None) -> None:
        ns, name = informer.key_of(obj)
        for vmi in self.vmis.list(ns):
            if any(claim_name(v) == name for v in (vmi.get("spec") or {}).get("volumes") or []):
                self.queue.add(informer.key_of(vmi))

    def _on_lease(self, kind: str, lease: JSON, old: JSON | None) -> None:
        # Only VMIs waiting for an agent to tear them down care whether that agent lives.
        node = lease["metadata"]["name"]
        for key, vmi in list(self.vmis.cache.items()):
            if (vmi.get("status") or {}).get("nodeName") == node and vmi["metadata"].get("deletionTimestamp"):
                self.queue.add(key)

    # ------------------------------------------------------------- views

    def _pods_of(self, vmi: JSON) -> list[JSON]:
        uid = vmi["metadata"]["uid"]
        ns = vmi["metadata"].get("namespace")
        pods = [p for p in self.pods.list(ns)
                if (controller_ref(p) or {}).get("uid") == uid or (p["metadata"].get("labels") or {}).get(
                    CREATED_BY_LABEL) == uid]
        created = self._created.get(uid)
        if created is not None:
            pod, when = created
            if any(p["metadata"]["uid"] == pod["metadata"]["uid"] for p in pods) \
                    or time.monotonic() - when > EXPECTATION_TIMEOUT:
                self._created.pop(uid, None)
            else:
                pods.append(pod)
        return pods

    def _agent_alive(self, node: str) -> bool:
        if not self.leases.synced.is_set():
            return True  # unknown: assume the agent is there rather than take over its VMI
        return lease_alive(self.leases.get(NODE_LEASE_NAMESPACE, node), time.time())

    def _claims(self, ns: str) -> dict[str, JSON]:
        return {p["metadata"]["name"]: p for p in self.pvcs.list(ns)}

    # ------------------------------------------------------------- reconcile

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not (self.vmis.synced.is_set() and self.pods.synced.is_set()):
            return 0.2  # never judge a pod missing from a cache that is still filling
        vmi = self.vmis.get(*key)
        if self._writes.stale(key, vmi):
            return 0.05  # our last write is not in the cache yet
        if vmi is None:
            return None  # its pods go with it (ownerReference, garbage collection)
        pods = self._pods_of(vmi)
        live = sorted((p for p in pods if not pod_down(p)), key=lambda p: p["metadata"].get("creationTimestamp") or "")
        pod = live[-1] if live else (pods[-1] if pods else None)
        new = copy.deepcopy(vmi)
        meta, status = new["metadata"], new.setdefault("status", {})
        phase = status.get("phase") or ""
        deleted = bool(meta.get("deletionTimestamp"))
        conditions = list(status.get("conditions") or [])
        requeue: float | None = None

        if not deleted and FINALIZER not in (meta.get("finalizers") or []):
            meta["finalizers"] = [*(meta.get("finalizers") or []), FINALIZER]

        if deleted or phase in FINAL_PHASES:
            requeue = await self._teardown(vmi, new, pods)
            conditions = list(status.get("conditions") or [])  # teardown may have set Ready
        elif phase in UNPROCESSED_PHASES:
            set_phase(status, "Pending")
            if pod is None:
                pod, conditions, requeue = await self._start(vmi, new, conditions)
            if pod is not None:
                set_phase(status, "Scheduling")
                status["qosClass"] = qos_class(pod.get("spec") or {})
        elif phase == "Scheduling":
            conditions = self._scheduling(new, pod, conditions)
        elif phase in ("Scheduled", "Running"):
            if pod is None:
                set_phase(status, "Failed")
                conditions = set_condition(conditions, _ready_false(*POD_NOT_EXISTS))
                await self.recorder.event(vmi, "Warning", "Stopped",
                                          "The virt-launcher pod of the VirtualMachineInstance vanished")

        phase_now = status.get("phase") or ""
        if not deleted and phase_now in ("Pending", "Scheduling"):
            # Until a node agent reports the guest, the VMI is not ready, and says why (KubeVirt's reasons).
            conditions = set_condition(conditions, _ready_false(*(GUEST_NOT_RUNNING if pod else POD_NOT_EXISTS)))
        if not deleted and phase_now not in FINAL_PHASES and self.pvcs.synced.is_set():
            conditions = set_condition(conditions, live_migratable(new, self._claims(meta.get("namespace") or "")))
        if conditions or "conditions" in status:
            status["conditions"] = conditions
        await self._write(vmi, new)
        return requeue

    async def _start(self, vmi: JSON, new: JSON, conditions: list[JSON]) -> tuple[JSON | None, list[JSON],
                                                                                 float | None]:
        """Creates the launcher pod once the volumes are there: (pod or None, conditions, requeue)."""
        status = new["status"]
        ns = vmi["metadata"].get("namespace") or ""
        if not (self.pvcs.synced.is_set() and self.dvs.synced.is_set()):
            return None, conditions, 0.5
        problem = volumes_problem(vmi, self._claims(ns), {d["metadata"]["name"]: d for d in self.dvs.list(ns)})
        had_missing = any(c.get("type") == "Synchronized" and c.get("reason") == "FailedPvcNotFound"
                          for c in conditions)
        conditions = [c for c in conditions if not (c.get("type") == "Synchronized"
                                                    and c.get("reason") in OWNED_SYNC_REASONS)]
        if had_missing:
            conditions = remove_condition(conditions, "PodScheduled")
        if problem is not None:
            kind, message = problem
            if kind == "failed":
                set_phase(status, "Failed")
                await self.recorder.event(vmi, "Warning", "FailedDataVolumeImport", message)
            elif kind == "missing":
                # KubeVirt reports a missing PVC both ways: Synchronized (-> ErrorPvcNotFound) and PodScheduled.
                for ctype, reason in (("Synchronized", "FailedPvcNotFound"), ("PodScheduled", "Unschedulable")):
                    conditions = set_condition(conditions, {
                        "type": ctype, "status": "False", "reason": reason, "message": message,
                        "lastProbeTime": None, "lastTransitionTime": now_rfc3339()})
                if not had_missing:
                    await self.recorder.event(vmi, "Warning", "FailedPvcNotFound", message)
            return None, conditions, None  # PVC and DataVolume events bring the VMI back
        try:
            pod = await self.client.create(PODS, launcher_pod(vmi), ns)
        except rest.APIError as exc:
            await self.recorder.event(vmi, "Warning", "FailedCreate", f"Error creating pod: {exc}")
            raise
        self._created[vmi["metadata"]["uid"]] = (pod, time.monotonic())
        log.info("created launcher pod %s/%s for VMI %s", ns, pod["metadata"]["name"], vmi["metadata"]["name"])
        await self.recorder.event(vmi, "Normal", "SuccessfulCreate",
                                  f"Created virtual machine pod {pod['metadata']['name']}")
        return pod, conditions, None

    def _scheduling(self, new: JSON, pod: JSON | None, conditions: list[JSON]) -> list[JSON]:
        meta, status = new["metadata"], new["status"]
        if pod is None or pod_down(pod):
            # someone other than this controller deleted the pod, or it failed before being scheduled
            set_phase(status, "Failed")
            return set_condition(conditions, _ready_false(*POD_NOT_EXISTS))
        status["qosClass"] = qos_class(pod.get("spec") or {})
        conditions = _sync_image_error(conditions, pod)
        scheduled = get_condition(pod, "PodScheduled")
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            set_phase(status, "Scheduled")
            status["nodeName"] = node
            meta["labels"] = {**(meta.get("labels") or {}), NODE_NAME_LABEL: node}
            return remove_condition(conditions, "PodScheduled")
        if scheduled is not None and scheduled.get("status") == "False":
            # mirrored so the VM controller can say ErrorUnschedulable, with the scheduler's own message
            return set_condition(conditions, {
                "type": "PodScheduled", "status": "False", "reason": scheduled.get("reason", ""),
                "message": scheduled.get("message", ""), "lastProbeTime": scheduled.get("lastProbeTime"),
                "lastTransitionTime": scheduled.get("lastTransitionTime")})
        return remove_condition(conditions, "PodScheduled")

    async def _teardown(self, vmi: JSON, new: JSON, pods: list[JSON]) -> float | None:
        """Cleanup of a deleted or finished VMI when it is the controller's to do (see the module doc)."""
        meta, status = new["metadata"], new["status"]
        deleted = bool(meta.get("deletionTimestamp"))
        node = status.get("nodeName") or ""
        if node and (ever_running(vmi) or self._agent_alive(node)):
            # The node agent shuts QEMU down and removes the finalizer; look again in case its node dies.
            return 15.0 if deleted and FINALIZER in (meta.get("finalizers") or []) else None
        if deleted:
            for pod in pods:
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                try:
                    await self.client.delete(PODS, pod["metadata"]["name"], pod["metadata"].get("namespace"),
                                             preconditions={"uid": pod["metadata"]["uid"]})
                except (rest.NotFound, rest.Conflict):
                    continue
                await self.recorder.event(vmi, "Normal", "SuccessfulDelete",
                                          f"Deleted virtual machine pod {pod['metadata']['name']}")
        if pods:
            # A finished VMI keeps its completed pod until the VMI is deleted, as in KubeVirt; a deleted one
            # waits for its pods' DELETED events (and looks again, should one be missed).
            return 2.0 if deleted else None
        if status.get("phase") not in FINAL_PHASES:
            set_phase(status, "Failed")
            status["conditions"] = set_condition(list(status.get("conditions") or []),
                                                 _ready_false(*POD_NOT_EXISTS))
        meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        return None

    async def _write(self, old: JSON, new: JSON) -> None:
        def view(obj: JSON) -> JSON:
            return {"metadata": {k: obj["metadata"].get(k) for k in ("labels", "finalizers")},
                    "status": obj.get("status") or {}}

        patch = merge_patch_diff(view(old), view(new))
        patch = {k: v for k, v in patch.items() if v}
        if not patch:
            return
        meta = old["metadata"]
        patch.setdefault("metadata", {})["resourceVersion"] = meta["resourceVersion"]
        try:
            await self.client.patch(VMIS, meta["name"], patch, meta.get("namespace"))
        except rest.NotFound:
            return
        except rest.Conflict:
            # someone (the node agent) wrote meanwhile; the watch brings the fresh object, and we look again
            self.queue.add_after(informer.key_of(old), 0.1)
            return
        self._writes.wrote(informer.key_of(old), meta["resourceVersion"])
        before, after = (old.get("status") or {}).get("phase"), (new.get("status") or {}).get("phase")
        if before != after:
            log.info("VMI %s/%s: %s -> %s", meta.get("namespace"), meta["name"], before or "<none>", after)


def _ready_false(reason: str, message: str) -> JSON:
    return {"type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastProbeTime": None, "lastTransitionTime": now_rfc3339()}


def _sync_image_error(conditions: list[JSON], pod: JSON) -> list[JSON]:
    err = image_pull_error(pod)
    current = next((c for c in conditions if c.get("type") == "Synchronized"), None)
    if err is not None:
        return set_condition(conditions, {"type": "Synchronized", "status": "False", "reason": err[0],
                                          "message": err[1], "lastProbeTime": None,
                                          "lastTransitionTime": now_rfc3339()})
    if current is not None and current.get("reason") in IMAGE_PULL_REASONS:
        return remove_condition(conditions, "Synchronized")
    return conditions
