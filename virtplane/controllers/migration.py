"""The migration controller: a VirtualMachineInstanceMigration from Pending to Succeeded or Failed.

Who writes what (the node agents do the QEMU work, docs/vm-runtime.md):
- this controller: the VMIM (finalizer, phases), the target virt-launcher pod (label
  `kubevirt.io/migrationJobUID`, kept off the source node by required node affinity), and on the VMI
  `status.migrationState` {migrationUid, sourceNode, targetNode, targetPod, migrationConfiguration},
  `status.migrationMethod` and the label `kubevirt.io/migrationTargetNodeName` that shows the VMI to the
  target node's agent; `abortRequested` when the VMIM is deleted while the migration runs;
- the target agent: QEMU with `-incoming`, `targetNodeAddress`/`targetDirectMigrationNodePorts`,
  `targetNodeDomainDetected`; once the guest runs there: `nodeName`, `completed`, `endTimestamp`;
- the source agent: QMP `migrate`, `startTimestamp`, `mode`, and `failed`/`failureReason`/`abortStatus`.

Phases follow KubeVirt: Pending → Scheduling (target pod created) → Scheduled (pod bound) → PreparingTarget
(VMI handed to the target) → TargetReady → Running → Succeeded | Failed. They are recomputed from the
objects on every pass, so a restart of this controller loses nothing.
"""

from __future__ import annotations

import base64
import copy
import logging
import secrets
from typing import Any

from virtplane.client import events, informer, rest

from . import vmi as vmi_ctrl

log = logging.getLogger(__name__)
JSON = dict[str, Any]

VMIMS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstancemigrations")
VMIS = vmi_ctrl.VMIS
PODS = vmi_ctrl.PODS
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
KUBEVIRTS = rest.GVR("kubevirt.io", "v1", "kubevirts")
SECRETS = rest.GVR("", "v1", "secrets")
POLICIES = rest.GVR("migrations.kubevirt.io", "v1alpha1", "migrationpolicies", namespaced=False)
NAMESPACES = rest.GVR("", "v1", "namespaces", namespaced=False)
POLICY_FIELDS = ("allowAutoConverge", "allowPostCopy", "bandwidthPerMigration", "completionTimeoutPerGiB",
                 "maxDowntimeMs")

FINALIZER = "kubevirt.io/migrationJobFinalize"
JOB_LABEL = "kubevirt.io/migrationJobUID"
TARGET_NODE_LABEL = "kubevirt.io/migrationTargetNodeName"
HOSTNAME_LABEL = "kubernetes.io/hostname"
FINAL = ("Succeeded", "Failed")
ORDER = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running", "Succeeded", "Failed")

# KubeVirt's defaults (spec.configuration.migrations of the KubeVirt CR)
DEFAULT_CONFIG: JSON = {
    "parallelMigrationsPerCluster": 5,
    "parallelOutboundMigrationsPerNode": 2,
    "bandwidthPerMigration": "0Mi",
    "completionTimeoutPerGiB": 150,
    "progressTimeout": 150,
    "allowAutoConverge": False,
    "allowPostCopy": False,
    "maxDowntimeMs": 900,  # how far the source agent may raise QEMU's downtime limit (it starts at 50 ms)
    "disableTLS": False,
    "unsafeMigrationOverride": False,
}


def migration_state(vmi: JSON | None) -> JSON:
    return dict(((vmi or {}).get("status") or {}).get("migrationState") or {})


class MigrationController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.recorder = events.EventRecorder(client, vmi_ctrl.COMPONENT)
        self.vmims = informer.Informer(client, VMIMS)
        self.vmis = informer.Informer(client, VMIS)
        self.pods = informer.Informer(client, PODS, label_selector=JOB_LABEL)
        self.nodes = informer.Informer(client, NODES)
        self.kubevirts = informer.Informer(client, KUBEVIRTS)
        self.policies = informer.Informer(client, POLICIES)
        self.namespaces = informer.Informer(client, NAMESPACES)
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="migrations")
        self.kv_queue = informer.WorkQueue(self._reconcile_kubevirt, workers=1, name="kubevirt-topology")

    async def start(self) -> None:
        self.vmims.add_handler(lambda _k, o, _old: self.queue.add(informer.key_of(o)))
        self.kubevirts.add_handler(lambda _k, o, _old: self.kv_queue.add(informer.key_of(o)))
        self.nodes.add_handler(self._on_node)
        self.vmis.add_handler(self._on_vmi)
        self.pods.add_handler(self._on_pod)
        for inf in (self.vmims, self.vmis, self.pods, self.nodes, self.kubevirts, self.policies,
                    self.namespaces):
            inf.start()
        self.queue.start()
        self.kv_queue.start()

    async def stop(self) -> None:
        await self.kv_queue.stop()
        await self.queue.stop()
        for inf in (self.vmims, self.vmis, self.pods, self.nodes, self.kubevirts, self.policies,
                    self.namespaces):
            await inf.stop()

    def _on_vmi(self, _kind: str, vmi: JSON, _old: JSON | None) -> None:
        ns = vmi["metadata"].get("namespace") or ""
        for m in self.vmims.list(ns):
            if (m.get("spec") or {}).get("vmiName") == vmi["metadata"]["name"]:
                self.queue.add(informer.key_of(m))

    def _on_node(self, _kind: str, _node: JSON, _old: JSON | None) -> None:
        for kv in self.kubevirts.list():  # the topology every KubeVirt CR reports
            self.kv_queue.add(informer.key_of(kv))

    def _on_pod(self, _kind: str, pod: JSON, _old: JSON | None) -> None:
        uid = (pod["metadata"].get("labels") or {}).get(JOB_LABEL)
        for m in self.vmims.list(pod["metadata"].get("namespace")):
            if m["metadata"].get("uid") == uid:
                self.queue.add(informer.key_of(m))

    # -- the KubeVirt CR's status -----------------------------------------------------------------------
    async def _reconcile_kubevirt(self, key: informer.Key) -> float | None:
        """The cluster's topology on every KubeVirt CR, as the seed's single-node rules see it (one node, or
        none: no live migration, no eviction strategy): a condition `SingleNode` (True with reason
        SingleReplica, else False with HighlyAvailable, OpenShift's Infrastructure topology names) beside
        KubeVirt's `Available` and `phase: Deployed`, which install scripts wait for."""
        if not (self.nodes.synced.is_set() and self.kubevirts.synced.is_set()):
            return 0.2
        kv = self.kubevirts.get(*key)
        if kv is None or kv["metadata"].get("deletionTimestamp"):
            return None
        nodes = len(self.nodes.list())
        now = vmi_ctrl.now_rfc3339()
        if nodes <= 1:
            topo = {"type": "SingleNode", "status": "True", "reason": "SingleReplica", "message":
                    f"{nodes} node: no live migration, no eviction strategy (VMs restart after a node failure)"}
        else:
            topo = {"type": "SingleNode", "status": "False", "reason": "HighlyAvailable",
                    "message": f"{nodes} nodes: live migration and eviction strategies available"}
        status = copy.deepcopy(kv.get("status") or {})
        conds = list(status.get("conditions") or [])
        for cond in ({"type": "Available", "status": "True", "reason": "AllComponentsReady",
                      "message": "All components are ready."}, topo):  # fmt: skip
            conds = vmi_ctrl.set_condition(conds, {**cond, "lastProbeTime": now, "lastTransitionTime": now})
        status["conditions"] = conds
        status.setdefault("phase", "Deployed")
        if status == (kv.get("status") or {}):
            return None
        body = copy.deepcopy(kv)
        body["status"] = status
        try:
            await self.client.update_status(KUBEVIRTS, body)
        except rest.Conflict:
            return 0.2
        except rest.NotFound:
            pass
        return None

    # -- configuration ---------------------------------------------------------------------------------
    def config(self, vmi: JSON | None = None) -> JSON:
        """spec.configuration.migrations of the KubeVirt CR over KubeVirt's defaults, then the MigrationPolicy
        that selects the VMI (by its labels and its namespace's): the one matching the most labels wins."""
        cfg = dict(DEFAULT_CONFIG)
        for kv in self.kubevirts.list():
            cfg.update(((kv.get("spec") or {}).get("configuration") or {}).get("migrations") or {})
        if vmi is not None:
            policy = self.policy_for(vmi)
            if policy is not None:
                spec = policy.get("spec") or {}
                cfg.update({k: spec[k] for k in POLICY_FIELDS if k in spec})
        return cfg

    def policy_for(self, vmi: JSON) -> JSON | None:
        vmi_labels = vmi["metadata"].get("labels") or {}
        ns = self.namespaces.get("", vmi["metadata"].get("namespace") or "") or {}
        ns_labels = (ns.get("metadata") or {}).get("labels") or {}
        matches: list[tuple[int, str, JSON]] = []
        for p in self.policies.list():
            sel = (p.get("spec") or {}).get("selectors") or {}
            want_ns = sel.get("namespaceSelector") or {}
            want_vmi = sel.get("virtualMachineInstanceSelector") or {}
            if any(ns_labels.get(k) != v for k, v in want_ns.items()) or \
                    any(vmi_labels.get(k) != v for k, v in want_vmi.items()):
                continue
            matches.append((-(len(want_ns) + len(want_vmi)), p["metadata"]["name"], p))
        return min(matches, key=lambda m: m[:2])[2] if matches else None  # most labels; then by name

    # -- reconcile -------------------------------------------------------------------------------------
    async def _reconcile(self, key: informer.Key) -> float | None:
        if not all(i.synced.is_set() for i in (self.vmims, self.vmis, self.pods, self.nodes)):
            return 0.2
        vmim = self.vmims.get(*key)
        if vmim is None:
            return None
        meta, spec = vmim["metadata"], vmim.get("spec") or {}
        status = dict(vmim.get("status") or {})
        phase = status.get("phase") or ""
        uid = meta["uid"]
        vmi = self.vmis.get(key[0], spec.get("vmiName") or "")
        ms = migration_state(vmi)
        mine = ms.get("migrationUid") == uid

        if meta.get("deletionTimestamp"):
            return await self._deleted(vmim, vmi, ms, mine)
        if phase in FINAL:
            await self._cleanup(vmim, vmi, ms, mine)
            return None
        if FINALIZER not in (meta.get("finalizers") or []):
            body = copy.deepcopy(vmim)
            body["metadata"]["finalizers"] = [*(meta.get("finalizers") or []), FINALIZER]
            await self._update(body)
            return None

        if mine and ms.get("completed"):
            return await self._set_phase(vmim, "Succeeded", ms)
        if mine and ms.get("failed"):
            return await self._set_phase(vmim, "Failed", ms, reason=ms.get("failureReason") or "migration failed")
        if vmi is None:
            return await self._set_phase(vmim, "Failed", reason=f"VMI {spec.get('vmiName')} does not exist")
        if not mine:
            return await self._admit(vmim, vmi, ms)
        # ours and in flight: the phase the VMI's state shows
        if ms.get("startTimestamp"):
            return await self._set_phase(vmim, "Running", ms)
        if ms.get("targetNodeDomainDetected"):
            return await self._set_phase(vmim, "TargetReady", ms)
        return await self._set_phase(vmim, "PreparingTarget", ms)

    async def _admit(self, vmim: JSON, vmi: JSON, ms: JSON) -> float | None:
        """Not yet handed to the VMI: checks, the target pod, then the hand-over."""
        uid = vmim["metadata"]["uid"]
        vstatus = vmi.get("status") or {}
        if len(self.nodes.list()) <= 1:
            return await self._set_phase(vmim, "Failed", reason="live migration is not possible on a single-node "
                                         "cluster: there is no other node to migrate to")  # fmt: skip
        cond = vmi_ctrl.get_condition(vmi, "LiveMigratable")
        if cond is not None and cond.get("status") == "False":
            return await self._set_phase(vmim, "Failed", reason=f"{cond.get('reason')}: {cond.get('message')}")
        if vmi["metadata"].get("deletionTimestamp") or vstatus.get("phase") != "Running":
            return await self._set_phase(vmim, "Failed", reason="the VMI is not running")
        if ms.get("migrationUid") and not (ms.get("completed") or ms.get("failed")):
            await self._set_phase(vmim, "Pending")
            return 2.0  # another migration of this VMI is in flight: wait for it (as KubeVirt queues)
        source = vstatus.get("nodeName") or ""
        schedulable = [n for n in self.nodes.list() if not (n.get("spec") or {}).get("unschedulable")
                       and ((n["metadata"].get("labels") or {}).get(vmi_ctrl.SCHEDULABLE_LABEL) == "true")]
        active = [m for m in self.vmims.list() if (m.get("status") or {}).get("phase") in ORDER[1:6]]
        cfg = self.config(vmi)
        if len(active) >= int(cfg["parallelMigrationsPerCluster"]) or \
                sum(1 for m in active if ((m.get("status") or {}).get("migrationState") or {})
                    .get("sourceNode") == source) >= int(cfg["parallelOutboundMigrationsPerNode"]):
            await self._set_phase(vmim, "Pending")
            return 2.0
        pods = [p for p in self.pods.list(vmim["metadata"].get("namespace"))
                if (p["metadata"].get("labels") or {}).get(JOB_LABEL) == uid]
        if not pods:
            if not [n for n in schedulable if n["metadata"]["name"] != source]:
                await self._set_phase(vmim, "Pending")
                return 5.0
            pod = self.target_pod(vmi, vmim, source)
            created = await self.client.create(PODS, pod, vmim["metadata"].get("namespace"))
            log.info("migration %s: target pod %s", uid, created["metadata"]["name"])
            return await self._set_phase(vmim, "Scheduling")
        pod = pods[0]
        target = (pod.get("spec") or {}).get("nodeName")
        if not target:
            return await self._set_phase(vmim, "Scheduling")
        # Scheduled: hand the VMI to the target node's agent (with the stream's TLS key, unless disabled)
        if not cfg.get("disableTLS"):
            await self._tls_secret(vmim)
        await self._set_phase(vmim, "Scheduled", {"sourceNode": source, "targetNode": target,
                                                  "targetPod": pod["metadata"]["name"]})  # fmt: skip
        state = {"migrationUid": uid, "sourceNode": source, "targetNode": target,
                 "targetPod": pod["metadata"]["name"], "mode": "PreCopy",
                 "migrationConfiguration": {k: v for k, v in cfg.items() if k in (
                     "allowAutoConverge", "allowPostCopy", "bandwidthPerMigration", "completionTimeoutPerGiB",
                     "progressTimeout", "maxDowntimeMs", "disableTLS")}}  # fmt: skip
        policy = self.policy_for(vmi)
        if policy is not None:
            state["migrationPolicyName"] = policy["metadata"]["name"]

        def handover(obj: JSON) -> None:
            obj["metadata"].setdefault("labels", {})[TARGET_NODE_LABEL] = target
            s = obj.setdefault("status", {})
            s["migrationState"] = state
            s["migrationMethod"] = "LiveMigration"

        await self._write_vmi(vmi, handover)
        await self.recorder.event(vmi, "Normal", "PreparingTarget",
                                  f"Migration {vmim['metadata']['name']}: preparing the target on node {target}")
        return None

    async def _tls_secret(self, vmim: JSON) -> str:
        """A random pre-shared key for this migration's TLS stream, in a Secret the VMIM owns (deleted with it)."""
        meta = vmim["metadata"]
        name = f"virtplane-migration-{meta['uid'][:13]}"  # node/migration.py derives it from migrationUid
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": meta.get("namespace"), "ownerReferences": [{
                    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration", "name": meta["name"],
                    "uid": meta["uid"], "controller": True, "blockOwnerDeletion": False}]},
                "data": {"psk": base64.b64encode(secrets.token_hex(32).encode()).decode()}}  # fmt: skip
        try:
            await self.client.create(SECRETS, body, meta.get("namespace"))
        except rest.Conflict:
            pass  # made on an earlier pass
        return name

    def target_pod(self, vmi: JSON, vmim: JSON, source: str) -> JSON:
        pod = vmi_ctrl.launcher_pod(vmi)
        pod["metadata"]["labels"][JOB_LABEL] = vmim["metadata"]["uid"]
        spec = pod["spec"]
        spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **((vmim.get("spec") or {}).get("addedNodeSelector")
                                                                  or {})}  # fmt: skip
        not_source = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": [source]}
        na = spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
        req = na.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": [{}]})
        terms = req.setdefault("nodeSelectorTerms", [{}]) or [{}]
        for t in terms:
            t.setdefault("matchExpressions", []).append(not_source)
        req["nodeSelectorTerms"] = terms
        return pod

    async def _deleted(self, vmim: JSON, vmi: JSON | None, ms: JSON, mine: bool) -> float | None:
        """Deleting a running migration aborts it (virtctl migrate-cancel); the finalizer goes once it ended."""
        in_flight = mine and not (ms.get("completed") or ms.get("failed"))
        if in_flight and vmi is not None:
            if not ms.get("abortRequested"):
                def abort(obj: JSON) -> None:
                    obj.setdefault("status", {}).setdefault("migrationState", {})["abortRequested"] = True

                await self._write_vmi(vmi, abort)
                await self.recorder.event(vmi, "Normal", "MigrationAbortRequested",
                                          f"Migration {vmim['metadata']['name']}: abort requested")
            return 1.0
        await self._cleanup(vmim, vmi, ms, mine)
        fins = vmim["metadata"].get("finalizers") or []
        if FINALIZER in fins:
            body = copy.deepcopy(vmim)
            body["metadata"]["finalizers"] = [f for f in fins if f != FINALIZER]
            await self._update(body)
        return None

    async def _cleanup(self, vmim: JSON, vmi: JSON | None, ms: JSON, mine: bool) -> None:
        """After the end: the target label off the VMI; a failed migration's target pod deleted."""
        uid = vmim["metadata"]["uid"]
        if vmi is not None and (mine or not ms.get("migrationUid")) and \
                TARGET_NODE_LABEL in (vmi["metadata"].get("labels") or {}):
            def unlabel(obj: JSON) -> None:
                (obj["metadata"].get("labels") or {}).pop(TARGET_NODE_LABEL, None)

            await self._write_vmi(vmi, unlabel)
        if (vmim.get("status") or {}).get("phase") != "Succeeded":
            for p in self.pods.list(vmim["metadata"].get("namespace")):
                if (p["metadata"].get("labels") or {}).get(JOB_LABEL) == uid and not p["metadata"].get(
                        "deletionTimestamp"):
                    try:
                        await self.client.delete(PODS, p["metadata"]["name"], p["metadata"].get("namespace"))
                    except rest.NotFound:
                        pass

    # -- writes ----------------------------------------------------------------------------------------
    async def _set_phase(self, vmim: JSON, phase: str, ms: JSON | None = None, *, reason: str = "") -> float | None:
        status = dict(vmim.get("status") or {})
        old = status.get("phase")
        new = copy.deepcopy(status)
        new["phase"] = phase
        if ms:
            merged = {**(new.get("migrationState") or {}), **{k: v for k, v in ms.items()
                                                              if k not in ("migrationConfiguration",)}}
            new["migrationState"] = merged
        stamps = list(new.get("phaseTransitionTimestamps") or [])
        if old != phase:
            stamps.append({"phase": phase, "phaseTransitionTimestamp": vmi_ctrl.now_rfc3339()})
            new["phaseTransitionTimestamps"] = stamps
        if phase == "Failed" and reason:
            new.setdefault("migrationState", {})["failureReason"] = reason
            new["conditions"] = [{"type": "Failed", "status": "True", "reason": "MigrationFailed", "message": reason,
                                  "lastTransitionTime": vmi_ctrl.now_rfc3339()}]  # fmt: skip
        if new == status:
            return None
        body = copy.deepcopy(vmim)
        body["status"] = new
        try:
            await self.client.update_status(VMIMS, body)
        except (rest.Conflict, rest.NotFound):
            return 0.1
        if old != phase and phase in FINAL:
            vmi_name = (vmim.get("spec") or {}).get("vmiName")
            kind = "Normal" if phase == "Succeeded" else "Warning"
            msg = f"Migration {vmim['metadata']['name']} of VMI {vmi_name} {phase.lower()}" + \
                (f": {reason}" if reason else "")
            await self.recorder.event(vmim, kind, f"Migration{phase}", msg)
        return None

    async def _update(self, body: JSON) -> None:
        try:
            await self.client.update(VMIMS, body)
        except (rest.Conflict, rest.NotFound):
            self.queue.add(informer.key_of(body))

    async def _write_vmi(self, vmi: JSON, mutate: Any) -> None:
        current: JSON | None = vmi
        for _ in range(8):
            if current is None:
                return
            new = copy.deepcopy(current)
            mutate(new)
            if new == current:
                return
            try:
                await self.client.update(VMIS, new)
                return
            except rest.NotFound:
                return
            except rest.Conflict:
                current = await self.client.get(VMIS, vmi["metadata"]["name"], vmi["metadata"].get("namespace"))
