"""DataVolumes (cdi.kubevirt.io/v1beta1): a PVC plus the data that fills it, with CDI's phases and conditions.

A DataVolume's PVC is filled *before* it is bound, as CDI's volume populators do: the PVC carries
`cdi.kubevirt.io/storage.usePopulator`, this controller prepares the volume on the host, writes the data to a
temporary name, renames it on success, and only then creates the PV (pre-bound to the claim) that the PVC
controller binds. So nobody — a VM, a clone — ever sees a half-written disk: a claim is Bound only when full.

Sources: http (qcow2/raw/vmdk/vdi/vhd/vhdx/iso, gz/xz; certConfigMap, secretRef, extraHeaders,
secretExtraHeaders, checksum), registry (containerDisks via storage.oci), blank, upload (see storage.upload),
pvc (clone: copy-on-write when source and target share a pool and are Filesystem, else host-assisted copy,
with `cdi.kubevirt.io/cloneFallbackReason`), and sourceRef → DataSource.

Phases: Pending, WaitForFirstConsumer (until a consumer has a node, unless
`cdi.kubevirt.io/storage.bind.immediate.requested`), ImportScheduled/ImportInProgress,
CloneScheduled/CloneInProgress, UploadScheduled/UploadReady, Succeeded, Failed. Conditions Bound, Ready,
Running; `status.progress` ("45.00%"); `status.restartCount` counts retries of transient failures, which
back off exponentially. Permanent failures (404, TLS, corrupt or oversized image, checksum) end in Failed with
the reason in the Running condition and a Warning Event.

The work runs as a task in this process, on the host that holds the volume (one machine today; the
host-side steps live in virtplane.storage so a node agent can run them later).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from virtplane.client import events, informer, rest
from virtplane.controllers import pvc as pvcs
from virtplane.controllers.storage_profiles import STORAGE_PROFILES
from virtplane.storage import importer, oci, profiles, provisioner, upload

log = logging.getLogger(__name__)
JSON = dict[str, Any]

DATAVOLUMES = rest.GVR("cdi.kubevirt.io", "v1beta1", "datavolumes")
DATASOURCES = rest.GVR("cdi.kubevirt.io", "v1beta1", "datasources")
SECRETS = rest.GVR("", "v1", "secrets")
CONFIGMAPS = rest.GVR("", "v1", "configmaps")
COMPONENT = "datavolume-controller"

ANN_IMMEDIATE = "cdi.kubevirt.io/storage.bind.immediate.requested"
ANN_CLONE_FALLBACK = "cdi.kubevirt.io/cloneFallbackReason"
ANN_CLONE_TYPE = "cdi.kubevirt.io/cloneType"
# virtplane's: clone the point-in-time copy the source VM's `backup` action left beside the source volume
# (storage.provisioner.backup_path) instead of the volume itself, which its running VM is writing
ANN_SOURCE_BACKUP = "virtplane.io/clone-source-backup"
ANN_CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
ANN_POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
ANN_POD_READY = "cdi.kubevirt.io/storage.pod.ready"
ERR_CLAIM_NOT_VALID = "ErrClaimNotValid"
ERR_RESOURCE_EXISTS = "ErrResourceExists"
MAX_BACKOFF = 300.0


class ClaimNotValid(Exception):
    pass


@dataclasses.dataclass(slots=True)
class Work:
    """One population in progress (or waiting to retry)."""

    uid: str
    kind: str  # import | clone | upload | blank
    phase: str
    task: asyncio.Task[None] | None = None
    progress: float | None = None
    error: importer.TransferError | None = None
    failures: int = 0
    retry_at: float = 0.0
    done: bool = False
    clone_type: str = ""
    fallback: str = ""
    last_push: float = 0.0


def _cond(ctype: str, status: str, reason: str = "", message: str = "", old: list[JSON] | None = None) -> JSON:
    prev = next((c for c in old or [] if c.get("type") == ctype), None)
    now = events.now_rfc3339()
    changed = prev is None or prev.get("status") != status
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),  # type: ignore[union-attr]
            "lastHeartbeatTime": now if changed or (prev or {}).get("message") != message
            else (prev or {}).get("lastHeartbeatTime", now)}


def source_kind(source: JSON) -> str:
    for k in ("http", "registry", "blank", "upload", "pvc", "snapshot", "s3", "gcs", "imageio", "vddk"):
        if isinstance(source.get(k), dict):
            return k
    return ""


class DataVolumeController:
    def __init__(self, client: rest.Client, root: provisioner.StorageRoot | None = None, *,
                 upload_host: str = "127.0.0.1") -> None:
        # Its own connection pool: long-lived watches of every controller would otherwise exhaust the shared
        # client's (aiohttp's limit), and a request waiting for a free connection never returns.
        self.client = rest.Client(client.config, user_agent="virtplane-datavolume-controller")
        self.root = root or provisioner.StorageRoot(provisioner.default_root())
        self.dvs = informer.Informer(self.client, DATAVOLUMES)
        self.pvcs = informer.Informer(self.client, pvcs.PVCS)
        self.pvs = informer.Informer(self.client, pvcs.PVS)
        self.classes = informer.Informer(self.client, pvcs.STORAGE_CLASSES)
        self.profiles = informer.Informer(self.client, STORAGE_PROFILES)
        self.sources = informer.Informer(self.client, DATASOURCES)
        self.configs = informer.Informer(self.client, pvcs.CDI_CONFIGS)
        self.pods = informer.Informer(self.client, pvcs.PODS)
        self.vmis = informer.Informer(self.client, pvcs.VMIS)
        self.nodes = informer.Informer(self.client, pvcs.NODES)
        self._informers = [self.dvs, self.pvcs, self.pvs, self.classes, self.profiles, self.sources, self.configs,
                           self.pods, self.vmis, self.nodes]
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="datavolume")
        self.recorder = events.EventRecorder(self.client, COMPONENT)
        self.work: dict[str, Work] = {}
        self._source_locks: dict[str, asyncio.Lock] = {}
        self.images = oci.ImageCache(self.root.root / ".image-cache")
        self.uploads = upload.UploadServer(self._token_key, host=upload_host)
        self._key: bytes | None = None
        self.dvs.add_handler(lambda k, o, old: self.queue.add(informer.key_of(o)))
        self.pvcs.add_handler(self._on_pvc)
        self.profiles.add_handler(lambda k, o, old: self._requeue_all())
        self.classes.add_handler(lambda k, o, old: self._requeue_all())
        self.sources.add_handler(lambda k, o, old: self._requeue_all())
        self.pods.add_handler(self._on_consumer)
        self.vmis.add_handler(self._on_consumer)

    async def start(self) -> None:
        self.root.root.mkdir(parents=True, exist_ok=True)
        await self.uploads.start()
        for inf in self._informers:
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for w in self.work.values():
            if w.task is not None:
                w.task.cancel()
        await self.uploads.stop()
        for inf in self._informers:
            await inf.stop()
        await self.client.close()

    # ---- events

    def _requeue_all(self) -> None:
        for dv in self.dvs.list():
            if (dv.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self.queue.add(informer.key_of(dv))

    def _on_pvc(self, kind: str, pvc: JSON, old: JSON | None) -> None:
        for ref in pvc["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "DataVolume":
                self.queue.add((pvc["metadata"]["namespace"], ref["name"]))
        # clones wait on their source claim
        for dv in self.dvs.list():
            src = ((dv.get("spec") or {}).get("source") or {}).get("pvc") or {}
            if src.get("name") == pvc["metadata"]["name"]:
                self.queue.add(informer.key_of(dv))

    def _on_consumer(self, kind: str, obj: JSON, old: JSON | None) -> None:
        ns = obj["metadata"].get("namespace") or ""
        for src in (obj, old):
            if src is not None:
                for claim in pvcs.claim_names((src.get("spec") or {}).get("volumes")):
                    self.queue.add((ns, claim))
                    for dv in self.dvs.list(ns):  # a clone source that stops being used
                        if (((dv.get("spec") or {}).get("source") or {}).get("pvc") or {}).get("name") == claim:
                            self.queue.add(informer.key_of(dv))

    async def _token_key(self) -> bytes:
        if self._key is None:
            ns, name = upload.TOKEN_SECRET
            try:
                secret = await self.client.get(SECRETS, name, ns)
            except rest.NotFound:
                import secrets as _secrets

                body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": name, "namespace": ns},
                        "data": {"key": base64.b64encode(_secrets.token_bytes(32)).decode()}}
                try:
                    secret = await self.client.create(SECRETS, body)
                except rest.Conflict:
                    secret = await self.client.get(SECRETS, name, ns)
            self._key = base64.b64decode((secret.get("data") or {})["key"])
        return self._key

    # ---- target resolution

    def _class(self, name: str | None, *, virt: bool) -> JSON | None:
        if name:
            return self.classes.get(None, name)
        classes = self.classes.list()
        if virt:
            found = pvcs.default_class(classes, pvcs.ANN_DEFAULT_VIRT_CLASS)
            if found is not None:
                return found
        return pvcs.default_class(classes)

    def _overhead(self, class_name: str) -> float:
        return pvcs.filesystem_overhead(self.configs.get(None, "config"), class_name)

    def claim_spec(self, dv: JSON, source_size: int | None) -> tuple[JSON, JSON]:
        """The PVC spec CDI would render (and its class), or ClaimNotValid with CDI's message."""
        spec = dv.get("spec") or {}
        if isinstance(spec.get("pvc"), dict):
            claim = {k: v for k, v in spec["pvc"].items() if k not in ("dataSource", "dataSourceRef")}
            sc = self._class(claim.get("storageClassName"), virt=False)
            if sc is None:
                raise ClaimNotValid(f"storage class {claim.get('storageClassName') or '(default)'} not found")
            claim["storageClassName"] = sc["metadata"]["name"]
            claim.setdefault("volumeMode", "Filesystem")
            return claim, sc
        storage = dict(spec.get("storage") or {})
        sc = self._class(storage.get("storageClassName"), virt=True)
        if sc is None:
            raise ClaimNotValid(f"storage class {storage.get('storageClassName') or '(default)'} not found")
        name = sc["metadata"]["name"]
        modes = list(storage.get("accessModes") or [])
        vmode = storage.get("volumeMode")
        if not modes or not vmode:
            profile = self.profiles.get(None, name)
            sets = ((profile or {}).get("status") or {}).get("claimPropertySets") or []
            choice = profiles.first_usable(sets, modes, vmode)
            if choice is None and not modes:
                what = "accessMode and volumeMode" if not vmode else "accessMode"
                raise ClaimNotValid(f"DataVolume.storage spec is missing {what}, cannot get access mode from "
                                    f"StorageProfile {name}; set spec.claimPropertySets (accessModes and "
                                    f"volumeMode) on StorageProfile {name}")
            if choice is not None:
                modes, vmode = choice
            vmode = vmode or "Filesystem"
        requested = pvcs.storage_bytes(((storage.get("resources") or {}).get("requests") or {}).get("storage"))
        if not requested:
            if not source_size:
                raise ClaimNotValid("DataVolume.storage spec is missing resources.requests.storage")
            requested = source_size
        capacity = requested
        if vmode == "Filesystem":
            capacity = provisioner.required_capacity(requested, "Filesystem", self._overhead(name))
        claim = {"accessModes": modes, "volumeMode": vmode, "storageClassName": name,
                 "resources": {"requests": {"storage": pvcs.format_bytes(capacity)}}}
        if storage.get("selector"):
            claim["selector"] = storage["selector"]
        return claim, sc

    def resolve_source(self, dv: JSON) -> JSON:
        spec = dv.get("spec") or {}
        if isinstance(spec.get("source"), dict):
            return spec["source"]
        ref = spec.get("sourceRef") or {}
        ns = ref.get("namespace") or dv["metadata"]["namespace"]
        ds = self.sources.get(ns, ref.get("name", ""))
        if ds is None:
            raise ClaimNotValid(f"DataSource {ns}/{ref.get('name', '')} not found")
        src = ((ds.get("spec") or {}).get("source") or {})
        if isinstance(src.get("pvc"), dict):
            return {"pvc": {"namespace": src["pvc"].get("namespace") or ns, "name": src["pvc"].get("name")}}
        raise ClaimNotValid(f"DataSource {ns}/{ref.get('name', '')} has no pvc source")

    # ---- reconcile

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not all(inf.synced.is_set() for inf in self._informers if inf is not self.vmis):
            return 0.2
        dv = self.dvs.get(*key)
        if dv is None or dv["metadata"].get("deletionTimestamp"):
            live = {d["metadata"]["uid"] for d in self.dvs.list() if not d["metadata"].get("deletionTimestamp")}
            for uid, w in list(self.work.items()):
                if uid not in live:
                    if w.task is not None:
                        w.task.cancel()
                    self.work.pop(uid, None)
            self.uploads.targets.pop(key, None)
            return None
        status = dv.get("status") or {}
        if status.get("phase") == "Failed":
            return None
        uid = dv["metadata"]["uid"]
        ns, name = key
        pvc = self.pvcs.get(ns, name)
        try:
            source = self.resolve_source(dv)
            source_size = self._clone_size(ns, source) if "pvc" in source else None
            claim, sc = self.claim_spec(dv, source_size)
        except ClaimNotValid as err:
            if pvc is None:
                await self._status(dv, "Pending", bound=("False", ERR_CLAIM_NOT_VALID, str(err)))
                await self.recorder.event(dv, "Warning", ERR_CLAIM_NOT_VALID, str(err))
                return None
            claim, sc, source = pvc.get("spec") or {}, self._class(pvc["spec"].get("storageClassName"), virt=False), \
                {}
        if pvc is None:
            await self._create_pvc(dv, claim)
            await self._status(dv, "Pending", bound=("False", "Pending", f"PVC {name} Pending"))
            return None
        if not any(r.get("uid") == uid for r in pvc["metadata"].get("ownerReferences") or []):
            msg = f"Resource {name} already exists and is not managed by DataVolume"
            await self._status(dv, "Pending", bound=("False", ERR_RESOURCE_EXISTS, msg))
            await self.recorder.event(dv, "Warning", ERR_RESOURCE_EXISTS, msg)
            return None
        if (pvc.get("status") or {}).get("phase") == "Bound":
            return await self._succeeded(dv, pvc, source)
        if sc is None:
            return None
        kind = pvcs.pool_kind(sc.get("provisioner", ""))
        if kind is None:
            await self._status(dv, "Pending", bound=("False", "Pending",
                                                     f"storage class {sc['metadata']['name']} is not served by "
                                                     "virtplane's provisioners"))
            return None
        work = self.work.get(uid)
        if work is not None:
            return await self._report(dv, pvc, work)
        node = await self._node(dv, pvc, sc, kind)
        if node == "":
            await self._status(dv, "WaitForFirstConsumer", bound=("False", "Pending", f"PVC {name} Pending"))
            return None
        return await self._begin(dv, pvc, sc, kind, node, source)

    def _clone_size(self, ns: str, source: JSON) -> int | None:
        src = source.get("pvc") or {}
        spvc = self.pvcs.get(src.get("namespace") or ns, src.get("name", ""))
        if spvc is None:
            return None
        cap = pvcs.storage_bytes(((spvc.get("status") or {}).get("capacity") or {}).get("storage"))
        if (spvc.get("spec") or {}).get("volumeMode") != "Block":
            cap = provisioner.usable_size(cap, "Filesystem", self._overhead(spvc["spec"].get("storageClassName", "")))
        return cap or None

    async def _create_pvc(self, dv: JSON, claim: JSON) -> None:
        meta = dv["metadata"]
        anns = {pvcs.ANN_USE_POPULATOR: "true", ANN_CONTENT_TYPE: (dv.get("spec") or {}).get("contentType")
                or "kubevirt"}
        if str((meta.get("annotations") or {}).get(ANN_IMMEDIATE, "")).lower() == "true":
            anns[ANN_IMMEDIATE] = "true"
        body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "labels": {"app": "containerized-data-importer",
                                        "app.kubernetes.io/managed-by": "virtplane"},
                             "annotations": anns,
                             "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                                                  "name": meta["name"], "uid": meta["uid"], "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "spec": claim}
        try:
            await self.client.create(pvcs.PVCS, body)
        except rest.Conflict:
            pass

    async def _node(self, dv: JSON, pvc: JSON, sc: JSON, kind: str) -> str | None:
        anns = pvc["metadata"].get("annotations") or {}
        if anns.get(pvcs.ANN_SELECTED_NODE):
            return str(anns[pvcs.ANN_SELECTED_NODE]) if kind == "local" else None
        wffc = sc.get("volumeBindingMode") == "WaitForFirstConsumer"
        immediate = str(anns.get(ANN_IMMEDIATE, "")).lower() == "true"
        source = self.resolve_source(dv)
        if kind == "local" and "pvc" in source:
            # a copy-on-write clone of a local volume lives where its source does
            src = self._source_pv(dv, source)
            if src is not None:
                node = (src["metadata"].get("annotations") or {}).get(pvcs.ANN_NODE)
                if node:
                    return str(node)
        if wffc and not immediate:
            users = [n for _, n in pvcs.consumers(self.pods.list(), self.vmis.list(), pvc["metadata"]["namespace"],
                                                  pvc["metadata"]["name"]) if n]
            if not users:
                return ""
            with contextlib.suppress(rest.APIError):
                await self.client.patch(pvcs.PVCS, pvc["metadata"]["name"],
                                        {"metadata": {"annotations": {pvcs.ANN_SELECTED_NODE: users[0]}}},
                                        pvc["metadata"]["namespace"])
            return users[0] if kind == "local" else None
        if kind != "local":
            return None
        nodes = sorted(n["metadata"]["name"] for n in self.nodes.list())
        if not nodes:
            return ""
        return nodes[0]

    def _source_pv(self, dv: JSON, source: JSON) -> JSON | None:
        src = source.get("pvc") or {}
        spvc = self.pvcs.get(src.get("namespace") or dv["metadata"]["namespace"], src.get("name", ""))
        if spvc is None or not (spvc.get("spec") or {}).get("volumeName"):
            return None
        return self.pvs.get(None, spvc["spec"]["volumeName"])

    # ---- status

    async def _status(self, dv: JSON, phase: str, *, bound: tuple[str, str, str] | None = None,
                      running: tuple[str, str, str] | None = None, ready: tuple[str, str, str] | None = None,
                      progress: str | None = None, restarts: int | None = None, claim: str | None = None) -> None:
        old = dv.get("status") or {}
        conds = old.get("conditions") or []
        b = bound or ("False", "Pending", "")
        r = running or ("False", "", "")
        rd = ready or ("False", "", "")
        status: JSON = {
            "phase": phase,
            "claimName": claim or dv["metadata"]["name"],
            "conditions": [_cond("Bound", *b, old=conds), _cond("Ready", *rd, old=conds),
                           _cond("Running", *r, old=conds)],
        }
        if progress is not None:
            status["progress"] = progress
        elif old.get("progress"):
            status["progress"] = old["progress"]
        if restarts is not None or old.get("restartCount") is not None:
            status["restartCount"] = restarts if restarts is not None else old.get("restartCount")
        if _same(old, status):
            return
        with contextlib.suppress(rest.NotFound, rest.Conflict):
            await self.client.patch(DATAVOLUMES, dv["metadata"]["name"], {"status": status},
                                    dv["metadata"]["namespace"], subresource="status")

    async def _succeeded(self, dv: JSON, pvc: JSON, source: JSON) -> float | None:
        uid = dv["metadata"]["uid"]
        work = self.work.pop(uid, None)
        name = pvc["metadata"]["name"]
        kind = source_kind(source)
        if (dv.get("status") or {}).get("phase") != "Succeeded":
            reason = {"pvc": "CloneSucceeded", "upload": "UploadSucceeded"}.get(kind, "ImportSucceeded")
            message = {"pvc": f"Successfully cloned into PVC {name}",
                       "upload": f"Upload Successful into PVC {name}"}.get(
                kind, f"Successfully imported into PVC {name}")
            anns: JSON = {}
            if work is not None and work.clone_type:
                anns[ANN_CLONE_TYPE] = work.clone_type
            if work is not None and work.fallback:
                anns[ANN_CLONE_FALLBACK] = work.fallback
            if anns:
                with contextlib.suppress(rest.APIError):
                    await self.client.patch(DATAVOLUMES, dv["metadata"]["name"], {"metadata": {"annotations": anns}},
                                            dv["metadata"]["namespace"])
            await self.recorder.event(dv, "Normal", reason, message)
        await self._status(dv, "Succeeded", bound=("True", "Bound", f"PVC {name} Bound"),
                           running=("False", "Completed", ""), ready=("True", "", ""), progress="100.0%")
        return None

    async def _report(self, dv: JSON, pvc: JSON, work: Work) -> float | None:
        name = pvc["metadata"]["name"]
        bound = ("False", "Pending", f"PVC {name} Pending")
        progress = None if work.progress is None else f"{100 * work.progress:.2f}%"
        if work.error is not None and not work.error.transient:
            await self._status(dv, "Failed", bound=bound, running=("False", work.error.reason, work.error.message),
                               progress=progress)
            return None
        if work.error is not None:
            await self._status(dv, work.phase, bound=bound, running=("False", work.error.reason, work.error.message),
                               progress=progress, restarts=work.failures)
            if work.task is None or work.task.done():
                delay = work.retry_at - time.monotonic()
                if delay > 0:
                    return delay
                self.work.pop(work.uid, None)
                return 0.0  # retry now: a new attempt starts in the next pass
            return None
        running = ("True", "", "") if work.phase.endswith(("InProgress", "UploadReady")) else ("False", "", "")
        await self._status(dv, work.phase, bound=bound, running=running,
                           ready=("False", "TransferRunning", "") if running[0] == "True" else None,
                           progress=progress, restarts=work.failures or None)
        return None

    # ---- population

    async def _begin(self, dv: JSON, pvc: JSON, sc: JSON, kind: str, node: str | None, source: JSON) -> float | None:
        uid = dv["metadata"]["uid"]
        skind = source_kind(source)
        prev_failures = (dv.get("status") or {}).get("restartCount") or 0
        if skind not in ("http", "registry", "blank", "upload", "pvc"):
            err = importer.TransferError("UnsupportedSource", f"source {skind or '(none)'} is not supported yet")
            self.work[uid] = Work(uid, "import", "ImportScheduled", error=err)
            return await self._report(dv, pvc, self.work[uid])
        phase = {"pvc": "CloneScheduled", "upload": "UploadScheduled"}.get(skind, "ImportScheduled")
        work = Work(uid, skind, phase, failures=int(prev_failures))
        self.work[uid] = work
        mode = "Block" if (pvc.get("spec") or {}).get("volumeMode") == "Block" else "Filesystem"
        volume = self.root.volume(kind, node, pvcs.pv_name(pvc), mode)  # type: ignore[arg-type]
        key = informer.key_of(dv)
        if skind == "pvc":
            blocked = self._clone_blocked(dv, source)
            if blocked:
                self.work.pop(uid, None)
                await self._status(dv, "CloneScheduled", bound=("False", "Pending", f"PVC {pvc['metadata']['name']} "
                                                                "Pending"), running=("False", "CloneSourceInUse",
                                                                                     blocked))
                await self.recorder.event(dv, "Normal", "CloneSourceInUse", blocked)
                return 5.0
        await self.recorder.event(dv, "Normal", phase, {
            "ImportScheduled": f"Import into {pvc['metadata']['name']} scheduled",
            "CloneScheduled": f"Cloning from {source.get('pvc', {}).get('name', '')} into "
                              f"{pvc['metadata']['name']} scheduled",
            "UploadScheduled": f"Upload into {pvc['metadata']['name']} scheduled"}[phase])
        work.task = asyncio.create_task(self._populate(dv, pvc, sc, volume, node, source, work, key),
                                        name=f"populate-{key[0]}-{key[1]}")
        return await self._report(dv, pvc, work)

    def _clone_blocked(self, dv: JSON, source: JSON) -> str:
        src = source.get("pvc") or {}
        ns = src.get("namespace") or dv["metadata"]["namespace"]
        spvc = self.pvcs.get(ns, src.get("name", ""))
        if spvc is None:
            return f"source PVC {ns}/{src.get('name')} not found"
        if (spvc.get("status") or {}).get("phase") != "Bound":
            return f"source PVC {ns}/{src.get('name')} is not bound yet"
        users = pvcs.consumers(self.pods.list(ns), self.vmis.list(ns), ns, spvc["metadata"]["name"])
        if users and self._source_backup(dv, source) is None:
            return f"source PVC {ns}/{src.get('name')} is in use by {', '.join(u for u, _ in users)}"
        return ""

    def _source_backup(self, dv: JSON, source: JSON) -> Path | None:
        """The source volume's backup this DataVolume clones (ANN_SOURCE_BACKUP), when it is there."""
        name = (dv["metadata"].get("annotations") or {}).get(ANN_SOURCE_BACKUP)
        pv = self._source_pv(dv, source) if name else None
        volume = pvcs.volume_of(self.root, pv) if pv is not None else None
        if volume is None or not name or not provisioner.BACKUP_NAME_RE.fullmatch(name):
            return None
        path = provisioner.backup_path(volume.directory, name)
        return path if path.exists() else None

    def _progress(self, work: Work, key: informer.Key) -> importer.ProgressFn:
        def report(fraction: float) -> None:
            work.progress = fraction
            now = time.monotonic()
            if now - work.last_push > 1.0:
                work.last_push = now
                self.queue.add(key)
        return report

    async def _populate(self, dv: JSON, pvc: JSON, sc: JSON, volume: provisioner.Volume, node: str | None,
                        source: JSON, work: Work, key: informer.Key) -> None:
        spec = pvc.get("spec") or {}
        capacity = pvcs.storage_bytes(((spec.get("resources") or {}).get("requests") or {}).get("storage"))
        overhead = self._overhead(sc["metadata"]["name"])
        limit = provisioner.usable_size(capacity, volume.mode, overhead)
        preallocate = bool((dv.get("spec") or {}).get("preallocation")) or bool(
            ((self.configs.get(None, "config") or {}).get("spec") or {}).get("preallocation"))
        skind = source_kind(source)
        try:
            await asyncio.to_thread(provisioner.prepare, volume)
            tmp = provisioner.temp_path(volume)
            if skind == "upload":
                await self._await_upload(dv, pvc, sc, volume, node, work, key, tmp, limit, preallocate, capacity)
                return
            work.phase = "CloneInProgress" if skind == "pvc" else "ImportInProgress"
            work.progress = 0.0
            self.queue.add(key)
            progress = self._progress(work, key)
            if skind == "blank":
                await asyncio.to_thread(provisioner.create_sparse, tmp, limit, preallocate=preallocate)
            elif skind == "http":
                opts, checksum = await self._http_options(dv, source["http"])
                await importer.import_http(opts, tmp, volume.directory, limit, checksum=checksum, progress=progress,
                                           preallocate=preallocate)
            elif skind == "registry":
                await self._import_registry(dv, source["registry"], tmp, volume, limit, progress, preallocate)
            elif skind == "pvc":
                if await self._clone(dv, source, volume, tmp, limit, work, progress, preallocate, node):
                    tmp = volume.qcow2_disk  # copy-on-write: already in place
            if tmp != volume.qcow2_disk:
                await asyncio.to_thread(provisioner.commit, volume, tmp)
            await self._publish(pvc, sc, volume, node, capacity)
            work.progress = 1.0
            work.done = True
            self.queue.add(key)
        except asyncio.CancelledError:
            raise
        except (importer.TransferError, provisioner.StorageError, oci.OCIError, OSError) as err:
            await self._failed(dv, work, key, _as_transfer_error(err))
        except Exception as err:
            log.exception("population of %s/%s failed", *key)
            await self._failed(dv, work, key, importer.TransferError(importer.TRANSFER_FAILED, str(err),
                                                                     transient=True))

    async def _failed(self, dv: JSON, work: Work, key: informer.Key, err: importer.TransferError) -> None:
        work.error = err
        if err.transient:
            work.failures += 1
            delay = min(MAX_BACKOFF, 2.0 * 2 ** (work.failures - 1))
            work.retry_at = time.monotonic() + delay
            await self.recorder.event(dv, "Warning", err.reason, f"{err.message} (retrying in {delay:.0f}s)")
        else:
            reason = {"clone": "CloneFailed", "pvc": "CloneFailed", "upload": "UploadFailed"}.get(work.kind,
                                                                                               "ImportFailed")
            await self.recorder.event(dv, "Warning", err.reason, f"{reason}: {err.message}")
        self.queue.add(key)

    async def _publish(self, pvc: JSON, sc: JSON, volume: provisioner.Volume, node: str | None, capacity: int) -> None:
        path = await provisioner.publish(volume)
        pv = pvcs.build_pv(pvc, sc, volume, path, capacity, node)
        try:
            await self.client.create(pvcs.PVS, pv)
        except rest.Conflict:
            pass

    async def _secret_data(self, ns: str, name: str) -> dict[str, str]:
        secret = await self.client.get(SECRETS, name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    async def _http_options(self, dv: JSON, src: JSON) -> tuple[importer.HTTPOptions, str | None]:
        ns = dv["metadata"]["namespace"]
        headers = importer.parse_header_lines(src.get("extraHeaders") or [])
        try:
            for secret_name in src.get("secretExtraHeaders") or []:
                headers.update(importer.parse_header_lines((await self._secret_data(ns, secret_name)).values()))
            opts = importer.HTTPOptions(url=src.get("url", ""), headers=headers,
                                        insecure=bool(src.get("insecureSkipVerify")))
            if src.get("secretRef"):
                data = await self._secret_data(ns, src["secretRef"])
                opts.username, opts.password = data.get("accessKeyId", ""), data.get("secretKey", "")
            if src.get("certConfigMap"):
                cm = await self.client.get(CONFIGMAPS, src["certConfigMap"], ns)
                opts.ca_pem = importer.ca_bundle(cm)
        except rest.NotFound as err:
            raise importer.TransferError(importer.NOT_FOUND,
                                         f"referenced object not found: {err.status.get('message')}",
                                         transient=True) from err
        return opts, src.get("checksum")

    async def _import_registry(self, dv: JSON, src: JSON, tmp: Any, volume: provisioner.Volume, limit: int,
                               progress: importer.ProgressFn, preallocate: bool) -> None:
        url = str(src.get("url") or "")
        image = url.removeprefix("docker://")
        if image == url:
            raise importer.TransferError(importer.INVALID_IMAGE, f"registry URL {url!r} must start with docker://")
        insecure = ((self.configs.get(None, "config") or {}).get("spec") or {}).get("insecureRegistries") or []
        creds = {}
        if src.get("secretRef"):
            data = await self._secret_data(dv["metadata"]["namespace"], src["secretRef"])
            creds[oci.Reference.parse(image).registry] = oci.Credentials(data.get("accessKeyId", ""),
                                                                         data.get("secretKey", ""))
        cache = oci.ImageCache(self.images.root, insecure_registries=insecure, credentials=creds)
        try:
            pulled = await cache.pull(image)
        except oci.NotFoundError as err:
            raise importer.TransferError(importer.NOT_FOUND, str(err)) from err
        except oci.AuthError as err:
            raise importer.TransferError(importer.UNAUTHORIZED, str(err)) from err
        except oci.OCIError as err:
            raise importer.TransferError(importer.CONNECTION_ERROR, str(err), transient=True) from err
        progress(0.5)
        await importer.import_file(pulled.path, tmp, volume.directory, limit, preallocate=preallocate)

    async def _clone(self, dv: JSON, source: JSON, volume: provisioner.Volume, tmp: Any, limit: int, work: Work,
                     progress: importer.ProgressFn, preallocate: bool, node: str | None) -> bool:
        """True for a copy-on-write clone (the data is in place), False after a host-assisted copy into tmp."""
        src_pv = self._source_pv(dv, source)
        if src_pv is None:
            raise importer.TransferError(importer.NOT_FOUND, "the source PVC is not bound to a volume", transient=True)
        src_volume = pvcs.volume_of(self.root, src_pv)
        if src_volume is None:
            raise importer.TransferError(importer.INVALID_IMAGE, f"source volume {src_pv['metadata']['name']} is not "
                                         "provisioned by virtplane; only its own volumes can be cloned")
        backup = self._source_backup(dv, source)
        if (dv["metadata"].get("annotations") or {}).get(ANN_SOURCE_BACKUP) and backup is None:
            raise importer.TransferError(importer.NOT_FOUND, "the source VM's backup for this clone is gone",
                                         transient=True)
        if backup is not None:
            return await self._clone_backup(backup, volume, tmp, limit, work, progress, preallocate)
        # one clone of a source at a time: a copy-on-write clone swaps the source's image file
        lock = self._source_locks.setdefault(str(src_volume.directory), asyncio.Lock())
        async with lock:
            return await self._clone_locked(src_volume, volume, tmp, limit, work, progress, preallocate, src_pv)

    async def _clone_locked(self, src_volume: provisioner.Volume, volume: provisioner.Volume, tmp: Any, limit: int,
                            work: Work, progress: importer.ProgressFn, preallocate: bool, src_pv: JSON) -> bool:
        src_path, src_fmt = src_volume.data_path()
        # our own volume (format known by name, chain written by us): no untrusted-image checks needed
        _, out, _ = await provisioner.run(provisioner.QEMU_IMG, "info", "-U", "--output=json", "-f", src_fmt,
                                          str(src_path))
        virtual = int(json.loads(out)["virtual-size"])
        if virtual > limit:
            raise importer.TransferError(importer.TOO_LARGE, f"the source's virtual size {virtual} is larger than the "
                                         f"target's usable size {limit}; a larger target is required")
        strategy = self._clone_strategy(src_pv)
        reason = ""
        if strategy == "copy":
            reason = "the StorageProfile's cloneStrategy is copy"
        elif src_volume.mode != "Filesystem" or volume.mode != "Filesystem":
            reason = "copy-on-write needs Filesystem volumes on both sides (Block is copied)"
        elif src_volume.directory.parent != volume.directory.parent:
            reason = "source and target are in different storage pools (class or node)"
        if not reason:
            work.clone_type = "csi-clone"
            await provisioner.cow_clone(src_volume, volume, limit)
            return True
        work.clone_type = "copy"
        work.fallback = reason
        await importer.convert(src_path, src_fmt, tmp, progress=progress, preallocate=preallocate)
        await asyncio.to_thread(importer.grow, tmp, limit, False)
        return False

    async def _clone_backup(self, backup: Path, volume: provisioner.Volume, tmp: Any, limit: int, work: Work,
                            progress: importer.ProgressFn, preallocate: bool) -> bool:
        """A running VM's point-in-time copy (raw, made for this clone alone) becomes the target: renamed in
        place when it is on the target's file system (O(1), CDI's "snapshot" clone), else copied. Either
        way the backup is gone afterwards."""
        virtual = os.stat(backup).st_size
        if virtual > limit:
            raise importer.TransferError(importer.TOO_LARGE, f"the source's virtual size {virtual} is larger than the "
                                         f"target's usable size {limit}; a larger target is required")
        if os.stat(backup).st_dev == os.stat(volume.directory).st_dev:
            work.clone_type = "snapshot"
            await asyncio.to_thread(os.replace, backup, tmp)
        else:
            work.clone_type = "copy"
            work.fallback = "the source's backup is on another file system"
            await importer.convert(backup, "raw", tmp, progress=progress, preallocate=preallocate)
            await asyncio.to_thread(backup.unlink, True)
        await asyncio.to_thread(importer.grow, tmp, limit, preallocate)
        return False

    def _clone_strategy(self, src_pv: JSON) -> str:
        class_name = (src_pv.get("spec") or {}).get("storageClassName") or ""
        profile = self.profiles.get(None, class_name) or {}
        return str(((profile.get("status") or {}).get("cloneStrategy")) or "csi-clone")

    async def _await_upload(self, dv: JSON, pvc: JSON, sc: JSON, volume: provisioner.Volume, node: str | None,
                            work: Work, key: informer.Key, tmp: Any, limit: int, preallocate: bool,
                            capacity: int) -> None:
        done = asyncio.Event()
        ns, name = pvc["metadata"]["namespace"], pvc["metadata"]["name"]

        async def on_done(result: importer.ImportResult) -> None:
            await asyncio.to_thread(provisioner.commit, volume, result.path)
            await self._publish(pvc, sc, volume, node, capacity)
            work.progress, work.done, work.error = 1.0, True, None
            done.set()
            self.queue.add(key)

        async def on_error(err: importer.TransferError) -> None:
            # the DataVolume stays UploadReady: the user fixes the image or the network and uploads again
            work.error = importer.TransferError(err.reason, err.message, transient=True)
            work.progress = None
            await self.recorder.event(dv, "Warning", err.reason, f"UploadFailed: {err.message}")
            self.queue.add(key)

        def on_progress(fraction: float) -> None:
            work.error = None
            self._progress(work, key)(fraction)

        await self._token_key()  # the shared key exists before anyone can ask for a token
        self.uploads.targets[(ns, name)] = upload.UploadTarget(ns, name, tmp, volume.directory, limit, preallocate,
                                                               on_progress, on_done, on_error)
        await self.client.patch(pvcs.PVCS, name, {"metadata": {"annotations": {
            upload.ANN_ENDPOINT: self.uploads.endpoint, ANN_POD_PHASE: "Running", ANN_POD_READY: "true"}}}, ns)
        work.phase = "UploadReady"
        self.queue.add(key)
        await self.recorder.event(dv, "Normal", "UploadReady", f"Upload into {name} ready")
        await done.wait()


def _as_transfer_error(err: Exception) -> importer.TransferError:
    if isinstance(err, importer.TransferError):
        return err
    if isinstance(err, provisioner.NoSpace) or (isinstance(err, OSError) and err.errno == 28):
        return importer.TransferError(importer.DISK_FULL, f"no space left on the storage filesystem: {err}",
                                      transient=True)
    if isinstance(err, oci.OCIError):
        return importer.TransferError(importer.CONNECTION_ERROR, str(err), transient=True)
    return importer.TransferError(importer.TRANSFER_FAILED, str(err), transient=True)


def _same(old: JSON, new: JSON) -> bool:
    def strip(s: JSON) -> JSON:
        return {**s, "conditions": [{k: v for k, v in c.items() if k not in ("lastTransitionTime",
                                                                             "lastHeartbeatTime")}
                                    for c in s.get("conditions") or []]}
    return strip({k: old.get(k) for k in new}) == strip(new)
