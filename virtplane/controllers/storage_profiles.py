"""Built-in StorageClasses and one CDI StorageProfile per StorageClass.

On start the controller creates, when missing (never overwriting an administrator's edits):
- `local`: `virtplane.io/local`, WaitForFirstConsumer, the cluster's default class;
- `shared`: `virtplane.io/shared`, Immediate, ReadWriteMany, KubeVirt's default virt class (DataVolumes of
  VMs land on storage that allows live migration unless they name a class);
- the CDIConfig `config` (CDI's defaults: 6 % filesystem overhead), status filled from its spec.

StorageProfiles (cluster-scoped, named after their class) are created for every class and their status is
computed from the capabilities table (`virtplane.storage.profiles`) or the spec's overrides; profiles of
deleted classes are removed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from virtplane.client import informer, rest
from virtplane.controllers import pvc as pvcs
from virtplane.storage import profiles, provisioner

log = logging.getLogger(__name__)
JSON = dict[str, Any]

STORAGE_PROFILES = rest.GVR("cdi.kubevirt.io", "v1beta1", "storageprofiles", namespaced=False)
CDI_CONFIG_NAME = "config"


def builtin_classes() -> list[JSON]:
    common = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "reclaimPolicy": "Delete",
              "allowVolumeExpansion": True}
    return [
        {**common, "metadata": {"name": "local", "annotations": {
            pvcs.ANN_DEFAULT_CLASS: "true",
            "description": "node-local disks (ReadWriteOnce; Filesystem image files or Block loop devices)"}},
         "provisioner": profiles.LOCAL_PROVISIONER, "volumeBindingMode": "WaitForFirstConsumer"},
        {**common, "metadata": {"name": "shared", "annotations": {
            pvcs.ANN_DEFAULT_VIRT_CLASS: "true",
            "description": "disks every node sees (ReadWriteMany: live migration)"}},
         "provisioner": profiles.SHARED_PROVISIONER, "volumeBindingMode": "Immediate"},
    ]


def cdi_config() -> JSON:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig", "metadata": {"name": CDI_CONFIG_NAME},
            "spec": {"featureGates": ["HonorWaitForFirstConsumer"]}}


def cdi_config_status(config: JSON, upload_proxy_url: str = "") -> JSON:
    spec = config.get("spec") or {}
    overhead = spec.get("filesystemOverhead") or {}
    status: JSON = {
        "filesystemOverhead": {"global": str(overhead.get("global") or "0.06"),
                               "storageClass": dict(overhead.get("storageClass") or {})},
        "preallocation": bool(spec.get("preallocation")),
        "scratchSpaceStorageClass": spec.get("scratchSpaceStorageClass") or "",
    }
    if spec.get("uploadProxyURLOverride") or upload_proxy_url:
        status["uploadProxyURL"] = spec.get("uploadProxyURLOverride") or upload_proxy_url
    if not status["filesystemOverhead"]["storageClass"]:
        del status["filesystemOverhead"]["storageClass"]
    return status


class StorageProfileController:
    def __init__(self, client: rest.Client, root: provisioner.StorageRoot | None = None) -> None:
        # Its own connection pool: long-lived watches of every controller would otherwise exhaust the shared
        # client's (aiohttp's limit), and a request waiting for a free connection never returns.
        self.client = rest.Client(client.config, user_agent="virtplane-storageprofile-controller")
        self.classes = informer.Informer(self.client, pvcs.STORAGE_CLASSES)
        self.profiles = informer.Informer(self.client, STORAGE_PROFILES)
        self.pvs = informer.Informer(self.client, pvcs.PVS)
        self.configs = informer.Informer(self.client, pvcs.CDI_CONFIGS)
        self.queue = informer.WorkQueue(self._reconcile, workers=2, name="storageprofile")
        self.classes.add_handler(lambda k, o, old: self.queue.add(("", o["metadata"]["name"])))
        self.profiles.add_handler(lambda k, o, old: self.queue.add(("", o["metadata"]["name"])))
        self.configs.add_handler(lambda k, o, old: self.queue.add(("cdiconfig", o["metadata"]["name"])))
        self._informers = [self.classes, self.profiles, self.pvs, self.configs]

    async def start(self) -> None:
        await self.ensure_defaults()
        for inf in self._informers:
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for inf in self._informers:
            await inf.stop()
        await self.client.close()

    async def ensure_defaults(self) -> None:
        """The built-in classes and the CDIConfig, created when absent (idempotent; edits are kept)."""
        for obj, gvr in [*((sc, pvcs.STORAGE_CLASSES) for sc in builtin_classes()),
                         (cdi_config(), pvcs.CDI_CONFIGS)]:
            try:
                await self.client.create(gvr, obj)
                log.info("created %s %s", obj["kind"], obj["metadata"]["name"])
            except rest.APIError as err:
                if err.code != 409:
                    log.warning("cannot create %s %s: %s", obj["kind"], obj["metadata"]["name"], err)

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not all(inf.synced.is_set() for inf in self._informers):
            return 0.2
        if key[0] == "cdiconfig":
            config = self.configs.get(None, key[1])
            if config is not None:
                status = cdi_config_status(config)
                if config.get("status") != status:
                    with contextlib.suppress(rest.NotFound):
                        await self.client.patch(pvcs.CDI_CONFIGS, key[1], {"status": status})  # no status subresource
            return None
        name = key[1]
        sc = self.classes.get(None, name)
        profile = self.profiles.get(None, name)
        if sc is None:
            if profile is not None:
                with contextlib.suppress(rest.NotFound):
                    await self.client.delete(STORAGE_PROFILES, name)
            return None
        if profile is None:
            body = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                    "metadata": {"name": name, "labels": {"app": "containerized-data-importer"}}, "spec": {}}
            try:
                profile = await self.client.create(STORAGE_PROFILES, body)
            except rest.APIError as err:
                if err.code != 409:
                    raise
                profile = await self.client.get(STORAGE_PROFILES, name)
        status = profiles.profile_status(sc, profile.get("spec"), self.pvs.list())
        if profile.get("status") != status:
            # replace, not merge: a claim property set removed from the spec must go from the status too
            patch = [{"op": "add", "path": "/status", "value": status}]
            await self.client.patch(STORAGE_PROFILES, name, patch, patch_type="json", subresource="status")
        return None
