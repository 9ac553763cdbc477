"""PersistentVolumes for PersistentVolumeClaims: the built-in provisioners plus Kubernetes' PV controller.

What it does, as kube-controller-manager's PV controller and a CSI external-provisioner together would:
- dynamic provisioning for classes whose provisioner is `virtplane.io/local` (node-local, per-node pools)
  or `virtplane.io/shared` (one pool every node sees), Filesystem (a sparse raw `disk.img` of the usable size
  in a per-volume directory; the PV's `local.path` / `hostPath.path` is the directory) or Block (a loop
  device over a sparse file; the PV's path is the device);
- Immediate binding, and WaitForFirstConsumer: the claim waits until a consumer has a node — a pod using
  it with `spec.nodeName`, or a VMI using it (directly or through a DataVolume) with `status.nodeName` —
  and records that node in `volume.kubernetes.io/selected-node`, as kube-scheduler does;
- static binding of pre-created PVs (class, access modes, volume mode, smallest that fits);
- claims owned by a population (DataVolumes: `cdi.kubevirt.io/storage.usePopulator`) are not provisioned
  here: the DataVolume controller fills a volume and creates its PV, and this controller binds it;
- `kubernetes.io/pvc-protection` (a claim in use by a pod or VMI is not removed), reclaim policies
  (Delete removes the data and the PV, Retain leaves a Released PV), expansion when the class allows it;
- PVCs without a class use the default class (`storageclass.kubernetes.io/is-default-class`).

Data is only ever deleted after a live GET confirms the claim is gone: the informer's cache may lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path
from typing import Any

from virtplane.api import quantity
from virtplane.client import events, informer, rest
from virtplane.storage import profiles, provisioner

log = logging.getLogger(__name__)
JSON = dict[str, Any]

PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
PVS = rest.GVR("", "v1", "persistentvolumes", namespaced=False)
PODS = rest.GVR("", "v1", "pods")
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
STORAGE_CLASSES = rest.GVR("storage.k8s.io", "v1", "storageclasses", namespaced=False)
VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
CDI_CONFIGS = rest.GVR("cdi.kubevirt.io", "v1beta1", "cdiconfigs", namespaced=False)

COMPONENT = "virtplane-provisioner"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
PV_PROTECTION = "kubernetes.io/pv-protection"
PROVISIONER_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
ANN_BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
ANN_DEFAULT_VIRT_CLASS = "storageclass.kubevirt.io/is-default-virt-class"
ANN_USE_POPULATOR = "cdi.kubevirt.io/storage.usePopulator"
# where the volume's files are (a Block PV's path is its loop device) and on which node
ANN_DIRECTORY = "storage.virtplane.io/directory"
ANN_NODE = "storage.virtplane.io/node"
HOSTNAME_LABEL = "kubernetes.io/hostname"
TERMINAL = ("Succeeded", "Failed")


# --------------------------------------------------------------------------------------------------
# helpers shared with the DataVolume controller


def storage_bytes(value: Any) -> int:
    try:
        return int(quantity.parse_quantity(value)) if value is not None else 0
    except Exception:
        return 0


def format_bytes(n: int) -> str:
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % size == 0 and n >= size:
            return f"{n // size}{unit}"
    return str(n)


def is_default(sc: JSON, annotation: str = ANN_DEFAULT_CLASS) -> bool:
    anns = (sc.get("metadata") or {}).get("annotations") or {}
    return str(anns.get(annotation, "")).lower() == "true" or \
        str(anns.get(annotation.replace("kubernetes.io/", "beta.kubernetes.io/"), "")).lower() == "true"


def default_class(classes: list[JSON], annotation: str = ANN_DEFAULT_CLASS) -> JSON | None:
    """The default class; several: the newest, as Kubernetes' admission picks."""
    found = [sc for sc in classes if is_default(sc, annotation)]
    if not found:
        return None
    return max(found, key=lambda sc: ((sc.get("metadata") or {}).get("creationTimestamp") or "",
                                      sc["metadata"]["name"]))


def pool_kind(provisioner_name: str) -> str | None:
    return {profiles.LOCAL_PROVISIONER: "local", profiles.SHARED_PROVISIONER: "shared",
            profiles.HOSTPATH_PROVISIONER: "hostpath"}.get(provisioner_name)


def pv_name(pvc: JSON) -> str:
    return f"pvc-{pvc['metadata']['uid']}"


def claim_names(spec_volumes: Any) -> set[str]:
    out: set[str] = set()
    for v in spec_volumes or []:
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("persistentVolumeClaim"), dict):
            out.add(str(v["persistentVolumeClaim"].get("claimName") or ""))
        elif isinstance(v.get("dataVolume"), dict):
            out.add(str(v["dataVolume"].get("name") or ""))
        elif isinstance(v.get("ephemeral"), dict):
            src = v["ephemeral"].get("persistentVolumeClaim") or {}
            out.add(str(src.get("claimName") or ""))
    out.discard("")
    return out


def build_pv(pvc: JSON, sc: JSON, volume: provisioner.Volume, path: str, capacity: int, node: str | None) -> JSON:
    """The PV for a volume we provisioned, pre-bound to `pvc` by uid."""
    spec = pvc.get("spec") or {}
    meta = pvc["metadata"]
    kind = pool_kind(sc.get("provisioner", ""))
    pv_spec: JSON = {
        "capacity": {"storage": format_bytes(capacity)},
        "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
        "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
        "storageClassName": sc["metadata"]["name"],
        "volumeMode": volume.mode,
        "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": meta["namespace"],
                     "name": meta["name"], "uid": meta["uid"],
                     "resourceVersion": meta.get("resourceVersion", "")},
    }
    if kind == "local":
        pv_spec["local"] = {"path": path}
        pv_spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}}
    else:
        pv_spec["hostPath"] = {"path": path, "type": "BlockDevice" if volume.mode == "Block" else "Directory"}
    anns = {ANN_PROVISIONED_BY: sc.get("provisioner", ""), ANN_DIRECTORY: str(volume.directory)}
    if node:
        anns[ANN_NODE] = node
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name(pvc), "annotations": anns,
                     "finalizers": [PROVISIONER_FINALIZER, PV_PROTECTION]},
        "spec": pv_spec,
    }


def volume_of(root: provisioner.StorageRoot, pv: JSON) -> provisioner.Volume | None:
    """Our volume behind a PV (None for PVs we did not provision)."""
    anns = (pv.get("metadata") or {}).get("annotations") or {}
    directory = anns.get(ANN_DIRECTORY)
    if not directory or pool_kind(anns.get(ANN_PROVISIONED_BY, "")) is None:
        return None
    mode = (pv.get("spec") or {}).get("volumeMode") or "Filesystem"
    try:
        return root.volume_at(Path(directory), "Block" if mode == "Block" else "Filesystem")
    except provisioner.StorageError:
        return None


def filesystem_overhead(cdi_config: JSON | None, class_name: str | None) -> float:
    """CDIConfig's filesystemOverhead (per class, then global); CDI's 6 % otherwise."""
    status = (cdi_config or {}).get("status") or {}
    spec = (cdi_config or {}).get("spec") or {}
    for source in (spec.get("filesystemOverhead") or {}, status.get("filesystemOverhead") or {}):
        per_class = source.get("storageClass") or {}
        value = per_class.get(class_name) if class_name else None
        value = value if value is not None else source.get("global")
        if value is not None:
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if 0 <= v < 1:
                return v
    return provisioner.DEFAULT_FILESYSTEM_OVERHEAD


async def bind(client: rest.Client, pvc: JSON, pv: JSON) -> None:
    """Completes a binding the PV already records in its claimRef: PVC spec, annotations, statuses."""
    meta = pvc["metadata"]
    ns, name = meta["namespace"], meta["name"]
    pvname = pv["metadata"]["name"]
    if (pv.get("status") or {}).get("phase") != "Bound":
        with contextlib.suppress(rest.NotFound):
            await client.patch(PVS, pvname, {"status": {"phase": "Bound"}}, subresource="status")
    if (pvc.get("spec") or {}).get("volumeName") != pvname or \
            ((meta.get("annotations") or {}).get(ANN_BIND_COMPLETED) != "yes"):
        await client.patch(PVCS, name, {
            "metadata": {"annotations": {ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes"},
                         "resourceVersion": meta.get("resourceVersion")},
            "spec": {"volumeName": pvname}}, ns)
    spec = pv.get("spec") or {}
    status = {"phase": "Bound", "accessModes": spec.get("accessModes") or [],
              "capacity": {"storage": (spec.get("capacity") or {}).get("storage")}}
    current = pvc.get("status") or {}
    if {k: current.get(k) for k in status} != status:
        await client.patch(PVCS, name, {"status": status}, ns, subresource="status")


def consumers(pods: list[JSON], vmis: list[JSON], namespace: str, claim: str) -> list[tuple[str, str | None]]:
    """(kind/name, node) of live pods and VMIs that use `claim` in `namespace`."""
    out: list[tuple[str, str | None]] = []
    for pod in pods:
        if pod["metadata"].get("namespace") != namespace or (pod.get("status") or {}).get("phase") in TERMINAL:
            continue
        if claim in claim_names((pod.get("spec") or {}).get("volumes")):
            out.append((f"pod/{pod['metadata']['name']}", (pod.get("spec") or {}).get("nodeName")))
    for vmi in vmis:
        if vmi["metadata"].get("namespace") != namespace or (vmi.get("status") or {}).get("phase") in TERMINAL:
            continue
        if claim in claim_names((vmi.get("spec") or {}).get("volumes")):
            out.append((f"vmi/{vmi['metadata']['name']}", (vmi.get("status") or {}).get("nodeName")))
    return out


# --------------------------------------------------------------------------------------------------
# the controller


class PVCController:
    def __init__(self, client: rest.Client, root: provisioner.StorageRoot | None = None) -> None:
        # Its own connection pool: long-lived watches of every controller would otherwise exhaust the shared
        # client's (aiohttp's limit), and a request waiting for a free connection never returns.
        self.client = rest.Client(client.config, user_agent="virtplane-provisioner")
        self.root = root or provisioner.StorageRoot(provisioner.default_root())
        self.pvcs = informer.Informer(self.client, PVCS)
        self.pvs = informer.Informer(self.client, PVS)
        self.pods = informer.Informer(self.client, PODS)
        self.vmis = informer.Informer(self.client, VMIS)
        self.nodes = informer.Informer(self.client, NODES)
        self.classes = informer.Informer(self.client, STORAGE_CLASSES)
        self.cdi_configs = informer.Informer(self.client, CDI_CONFIGS)
        self.claim_queue = informer.WorkQueue(self._reconcile_claim, workers=4, name="pvc")
        self.volume_queue = informer.WorkQueue(self._reconcile_volume, workers=2, name="pv")
        self.recorder = events.EventRecorder(self.client, COMPONENT)
        self._informers = [self.pvcs, self.pvs, self.pods, self.vmis, self.nodes, self.classes, self.cdi_configs]
        self.pvcs.add_handler(self._on_claim)
        self.pvs.add_handler(self._on_pv)
        self.pods.add_handler(self._on_consumer)
        self.vmis.add_handler(self._on_consumer)
        self.classes.add_handler(lambda k, o, old: self._requeue_unbound())

    async def start(self) -> None:
        self.root.root.mkdir(parents=True, exist_ok=True)
        for inf in self._informers:
            inf.start()
        self.claim_queue.start()
        self.volume_queue.start()

    async def stop(self) -> None:
        await self.claim_queue.stop()
        await self.volume_queue.stop()
        for inf in self._informers:
            await inf.stop()
        await self.client.close()

    def _synced(self) -> bool:
        return all(inf.synced.is_set() for inf in self._informers if inf is not self.vmis) and \
            (self.vmis.synced.is_set() or not self.vmis.cache)

    # ---- events

    def _on_claim(self, kind: str, pvc: JSON, old: JSON | None) -> None:
        self.claim_queue.add(informer.key_of(pvc))
        volume = (pvc.get("spec") or {}).get("volumeName")
        if volume and (kind == "DELETED" or pvc["metadata"].get("deletionTimestamp")):
            self.volume_queue.add(("", volume))

    def _on_pv(self, kind: str, pv: JSON, old: JSON | None) -> None:
        self.volume_queue.add(("", pv["metadata"]["name"]))
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        if ref.get("name"):
            self.claim_queue.add((ref.get("namespace") or "", ref["name"]))

    def _on_consumer(self, kind: str, obj: JSON, old: JSON | None) -> None:
        ns = obj["metadata"].get("namespace") or ""
        for src in (obj, old):
            if src is not None:
                for claim in claim_names((src.get("spec") or {}).get("volumes")):
                    self.claim_queue.add((ns, claim))

    def _requeue_unbound(self) -> None:
        for pvc in self.pvcs.list():
            if (pvc.get("status") or {}).get("phase") != "Bound":
                self.claim_queue.add(informer.key_of(pvc))

    # ---- claims

    def class_of(self, pvc: JSON) -> JSON | None:
        name = (pvc.get("spec") or {}).get("storageClassName")
        if name is None:
            return default_class(self.classes.list())
        return self.classes.get(None, name) if name else None

    def in_use(self, pvc: JSON) -> list[tuple[str, str | None]]:
        meta = pvc["metadata"]
        return consumers(self.pods.list(meta["namespace"]), self.vmis.list(meta["namespace"]), meta["namespace"],
                         meta["name"])

    async def _reconcile_claim(self, key: informer.Key) -> float | None:
        if not self._synced():
            return 0.2
        pvc = self.pvcs.get(*key)
        if pvc is None:
            return None
        meta = pvc["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if PVC_PROTECTION in finalizers and not self.in_use(pvc):
                await self._set_finalizers(PVCS, pvc, [f for f in finalizers if f != PVC_PROTECTION])
            return None
        if PVC_PROTECTION not in finalizers:
            await self._set_finalizers(PVCS, pvc, [*finalizers, PVC_PROTECTION])
            return None  # the update comes back through the informer
        spec = pvc.get("spec") or {}
        if spec.get("volumeName"):
            return await self._bound_claim(pvc)
        return await self._unbound_claim(pvc)

    async def _set_finalizers(self, gvr: rest.GVR, obj: JSON, finalizers: list[str]) -> None:
        meta = obj["metadata"]
        patch = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
        try:
            await self.client.patch(gvr, meta["name"], patch, meta.get("namespace"))
        except rest.NotFound:
            pass
        except rest.Conflict:
            pass  # a newer version is on its way through the informer

    async def _bound_claim(self, pvc: JSON) -> float | None:
        spec = pvc.get("spec") or {}
        pv = self.pvs.get(None, spec["volumeName"])
        if pv is None:
            with contextlib.suppress(rest.NotFound):
                pv = await self.client.get(PVS, spec["volumeName"])
        if pv is None:
            if (pvc.get("status") or {}).get("phase") == "Bound":
                await self.client.patch(PVCS, pvc["metadata"]["name"], {"status": {"phase": "Lost"}},
                                        pvc["metadata"]["namespace"], subresource="status")
                await self.recorder.event(pvc, "Warning", "ClaimLost",
                                          f"Bound claim has lost its PersistentVolume {spec['volumeName']}")
            return None
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        if ref.get("uid") and ref["uid"] != pvc["metadata"]["uid"]:
            return None  # the PV belongs to another claim of the same name: nothing to do
        await bind(self.client, pvc, pv)
        return await self._maybe_expand(pvc, pv)

    async def _maybe_expand(self, pvc: JSON, pv: JSON) -> float | None:
        want = storage_bytes((((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage"))
        have = storage_bytes(((pv.get("spec") or {}).get("capacity") or {}).get("storage"))
        if want <= have:
            return None
        sc = self.classes.get(None, (pv.get("spec") or {}).get("storageClassName") or "")
        volume = volume_of(self.root, pv)
        if volume is None:
            return None  # not ours
        if not sc or not sc.get("allowVolumeExpansion"):
            await self.recorder.event(pvc, "Warning", "VolumeResizeFailed",
                                      f"storage class {(sc or {}).get('metadata', {}).get('name', '')} does not "
                                      "allow volume expansion")
            return None
        overhead = filesystem_overhead(self.cdi_configs.get(None, "config"), sc["metadata"]["name"])
        try:
            done = await provisioner.expand(volume, want, overhead=overhead, in_use=bool(self.in_use(pvc)))
        except (provisioner.StorageError, OSError) as err:
            await self.recorder.event(pvc, "Warning", "VolumeResizeFailed", f"expanding the volume failed: {err}")
            return 30.0
        if not done:
            await self.recorder.event(pvc, "Normal", "FileSystemResizePending",
                                      "the disk is in use; it grows when its VM stops")
            return 10.0
        size = format_bytes(want)
        await self.client.patch(PVS, pv["metadata"]["name"], {"spec": {"capacity": {"storage": size}}})
        await self.client.patch(PVCS, pvc["metadata"]["name"], {"status": {"capacity": {"storage": size}}},
                                pvc["metadata"]["namespace"], subresource="status")
        await self.recorder.event(pvc, "Normal", "VolumeResizeSuccessful", f"resized the volume to {size}")
        return None

    async def _unbound_claim(self, pvc: JSON) -> float | None:
        meta = pvc["metadata"]
        anns = meta.get("annotations") or {}
        # a PV already pre-bound to this claim (ours after provisioning, a DataVolume's, an admin's)
        for pv in self.pvs.list():
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            if ref.get("namespace") == meta["namespace"] and ref.get("name") == meta["name"] and \
                    ref.get("uid") in (None, "", meta["uid"]) and not pv["metadata"].get("deletionTimestamp"):
                if not ref.get("uid"):
                    await self.client.patch(PVS, pv["metadata"]["name"], {"spec": {"claimRef": {
                        **ref, "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion", "")}}})
                    return None
                await bind(self.client, pvc, pv)
                return None
        sc = self.class_of(pvc)
        class_name = (pvc.get("spec") or {}).get("storageClassName")
        if class_name is None and sc is not None:
            # Kubernetes assigns the default class to class-less claims (retroactively since 1.28).
            with contextlib.suppress(rest.APIError):
                await self.client.patch(PVCS, meta["name"], {"spec": {"storageClassName": sc["metadata"]["name"]}},
                                        meta["namespace"])
        static = self._static_match(pvc, sc)
        if static is not None:
            ref = {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": meta["namespace"],
                   "name": meta["name"], "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion", "")}
            await self.client.patch(PVS, static["metadata"]["name"], {"spec": {"claimRef": ref}})
            return None
        if sc is None:
            if class_name:
                await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                          f'storageclass.storage.k8s.io "{class_name}" not found')
            return None
        kind = pool_kind(sc.get("provisioner", ""))
        if kind is None:
            return None  # someone else's provisioner
        if anns.get(ANN_STORAGE_PROVISIONER) != sc["provisioner"]:
            await self.client.patch(PVCS, meta["name"], {"metadata": {"annotations": {
                ANN_STORAGE_PROVISIONER: sc["provisioner"], ANN_BETA_STORAGE_PROVISIONER: sc["provisioner"]}}},
                meta["namespace"])
            return None
        node = await self.target_node(pvc, sc)
        if node == "":
            return None  # waiting for a consumer
        if str(anns.get(ANN_USE_POPULATOR, "")).lower() == "true":
            return None  # the DataVolume controller fills and publishes this one
        return await self._provision(pvc, sc, kind, node)

    async def target_node(self, pvc: JSON, sc: JSON) -> str | None:
        """The node a local volume goes to: None for shared classes, "" while waiting for a first consumer."""
        kind = pool_kind(sc.get("provisioner", ""))
        meta = pvc["metadata"]
        anns = meta.get("annotations") or {}
        wffc = sc.get("volumeBindingMode") == "WaitForFirstConsumer"
        if anns.get(ANN_SELECTED_NODE):
            return str(anns[ANN_SELECTED_NODE]) if kind == "local" else None
        if wffc and str(anns.get("cdi.kubevirt.io/storage.bind.immediate.requested", "")).lower() != "true":
            users = [(who, node) for who, node in self.in_use(pvc) if node]
            if not users:
                # repeats fold into one Event's count (the recorder aggregates them)
                await self.recorder.event(pvc, "Normal", "WaitForFirstConsumer",
                                          "waiting for first consumer to be created before binding")
                return ""
            node = users[0][1]
            assert node is not None
            await self.client.patch(PVCS, meta["name"], {"metadata": {"annotations": {ANN_SELECTED_NODE: node}}},
                                    meta["namespace"])
            return node if kind == "local" else None
        if kind != "local":
            return None
        ready = sorted(n["metadata"]["name"] for n in self.nodes.list()
                       if any(c.get("type") == "Ready" and c.get("status") == "True"
                              for c in (n.get("status") or {}).get("conditions") or []))
        candidates = ready or sorted(n["metadata"]["name"] for n in self.nodes.list())
        if not candidates:
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed", "no node to place a local volume on")
            return ""
        return random.choice(candidates)

    def _static_match(self, pvc: JSON, sc: JSON | None) -> JSON | None:
        spec = pvc.get("spec") or {}
        class_name = spec.get("storageClassName")
        if class_name is None:
            class_name = (sc or {}).get("metadata", {}).get("name", "")
        want = storage_bytes(((spec.get("resources") or {}).get("requests") or {}).get("storage"))
        modes = set(spec.get("accessModes") or [])
        vmode = spec.get("volumeMode") or "Filesystem"
        best: JSON | None = None
        for pv in self.pvs.list():
            pspec = pv.get("spec") or {}
            if pspec.get("claimRef") or (pv.get("status") or {}).get("phase") not in (None, "Available", "Pending"):
                continue
            if pv["metadata"].get("deletionTimestamp") or (pspec.get("storageClassName") or "") != class_name:
                continue
            if (pspec.get("volumeMode") or "Filesystem") != vmode or not modes <= set(pspec.get("accessModes") or []):
                continue
            cap = storage_bytes((pspec.get("capacity") or {}).get("storage"))
            if cap < want:
                continue
            if best is None or cap < storage_bytes((best["spec"].get("capacity") or {}).get("storage")):
                best = pv
        return best

    async def _provision(self, pvc: JSON, sc: JSON, kind: str, node: str | None) -> float | None:
        spec = pvc.get("spec") or {}
        mode = "Block" if spec.get("volumeMode") == "Block" else "Filesystem"
        capacity = storage_bytes(((spec.get("resources") or {}).get("requests") or {}).get("storage"))
        if capacity <= 0:
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed", "the claim requests no storage")
            return None
        if kind == "local" and "ReadWriteMany" in (spec.get("accessModes") or []):
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                      f"storage class {sc['metadata']['name']} is node-local: ReadWriteMany needs a "
                                      "shared class")
            return None
        name = pv_name(pvc)
        try:
            volume = self.root.volume(kind, node, name, mode)  # type: ignore[arg-type]
            overhead = filesystem_overhead(self.cdi_configs.get(None, "config"), sc["metadata"]["name"])
            await _to_thread(provisioner.create_blank, volume, capacity, overhead=overhead)
            path = await provisioner.publish(volume)
        except (provisioner.StorageError, OSError) as err:
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed", f"provisioning failed: {err}")
            return 10.0
        pv = build_pv(pvc, sc, volume, path, capacity, node)
        try:
            pv = await self.client.create(PVS, pv)
        except rest.APIError as err:
            if err.code != 409:
                raise
            pv = await self.client.get(PVS, name)
        await self.recorder.event(pvc, "Normal", "ProvisioningSucceeded",
                                  f"Successfully provisioned volume {name}")
        await bind(self.client, pvc, pv)
        return None

    # ---- volumes

    async def _reconcile_volume(self, key: informer.Key) -> float | None:
        if not self._synced():
            return 0.2
        pv = self.pvs.get(None, key[1])
        if pv is None:
            return None
        meta = pv["metadata"]
        spec = pv.get("spec") or {}
        ref = spec.get("claimRef") or {}
        claim: JSON | None = None
        if ref.get("name"):
            claim = self.pvcs.get(ref.get("namespace"), ref["name"])
            if claim is None or (ref.get("uid") and claim["metadata"]["uid"] != ref["uid"]):
                try:  # the cache may lag behind a fresh claim: ask the API before acting
                    claim = await self.client.get(PVCS, ref["name"], ref.get("namespace"))
                except rest.NotFound:
                    claim = None
                if claim is not None and ref.get("uid") and claim["metadata"]["uid"] != ref["uid"]:
                    claim = None
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if claim is not None and PV_PROTECTION in finalizers:
                return None  # still bound: pv-protection holds it
            if PROVISIONER_FINALIZER in finalizers and spec.get("persistentVolumeReclaimPolicy") == "Delete":
                await self._delete_data(pv)
            keep = [f for f in finalizers if f not in (PROVISIONER_FINALIZER, PV_PROTECTION)]
            if keep != finalizers:
                await self._set_finalizers(PVS, pv, keep)
            return None
        phase = (pv.get("status") or {}).get("phase")
        if not ref.get("name"):
            if phase != "Available":
                await self.client.patch(PVS, meta["name"], {"status": {"phase": "Available"}}, subresource="status")
            return None
        if claim is not None:
            return None  # binding is the claim's side
        if not ref.get("uid"):
            return None  # pre-bound by name to a claim that does not exist yet
        # the claim is gone: Released, then the reclaim policy
        if phase != "Released":
            await self.client.patch(PVS, meta["name"], {"status": {"phase": "Released"}}, subresource="status")
        if spec.get("persistentVolumeReclaimPolicy") == "Delete" and volume_of(self.root, pv) is not None:
            await self._delete_data(pv)
            await self._set_finalizers(PVS, pv, [f for f in finalizers
                                                 if f not in (PROVISIONER_FINALIZER, PV_PROTECTION)])
            with contextlib.suppress(rest.NotFound):
                await self.client.delete(PVS, meta["name"])
            log.info("deleted volume %s (reclaim policy Delete)", meta["name"])
        return None

    async def _delete_data(self, pv: JSON) -> None:
        volume = volume_of(self.root, pv)
        if volume is None:
            return
        try:
            await provisioner.delete(volume)
        except (provisioner.StorageError, OSError) as err:
            await self.recorder.event(pv, "Warning", "VolumeFailedDelete", f"deleting the volume failed: {err}")
            raise


async def _to_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)
