"""The eviction API (`POST pods/{name}/eviction`, policy/v1 Eviction), as `kubectl drain` uses it.

Ordinary pods are deleted. A virt-launcher pod answers for its VMI, as KubeVirt's pod-eviction admission does:
- evictionStrategy LiveMigrate (or LiveMigrateIfPossible when the VMI is live-migratable, or External): the
  VMI is migrated away instead: a VirtualMachineInstanceMigration is created (one at a time) and the eviction
  is answered 429 TooManyRequests while it runs; once the guest runs elsewhere the source pod has completed
  and the next eviction deletes it, so drain's retry loop ends;
- None (the default, or the KubeVirt CR's spec.configuration.evictionStrategy): the pod is deleted, the VMI
  fails (its launcher is gone) and the VM controller restarts it elsewhere per runStrategy (the node is
  cordoned).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from virtplane.apiserver import errors, handlers, objects

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
MIGRATION_PHASES_ACTIVE = ("", "Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
OPTS = objects.WriteOptions(field_manager="virtplane-eviction", privileged=True)


def register(server: APIServer) -> None:
    server.register_subresource("", "pods", "eviction", _evict)


def _lookup(srv: APIServer, group: str, version: str, plural: str) -> Any:
    res = srv.registry.lookup(group, version, plural)
    assert res is not None
    return res


async def _cluster_default(srv: APIServer) -> str:
    page = await srv.objects.list(_lookup(srv, "kubevirt.io", "v1", "kubevirts"), None)
    for st in page.items:
        value = ((st.obj.get("spec") or {}).get("configuration") or {}).get("evictionStrategy")
        if value:
            return str(value)
    return "None"


async def _evict(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "POST":
        raise errors.StatusError(405, "eviction takes POST")
    srv, ns, name = req.server, req.namespace, req.name
    pods = req.resource
    pod = await srv.objects.get(pods, ns, name)
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    done = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    if labels.get("kubevirt.io") == "virt-launcher" and not done and "kubevirt.io/migrationJobUID" not in labels:
        vmi_res = _lookup(srv, "kubevirt.io", "v1", "virtualmachineinstances")
        vmi = await srv.objects.try_get(vmi_res, ns, labels.get("vm.kubevirt.io/name") or "")
        if vmi is not None and vmi["metadata"].get("uid") == labels.get("kubevirt.io/created-by") and \
                (vmi.get("status") or {}).get("nodeName") == (pod.get("spec") or {}).get("nodeName"):
            strategy = (vmi.get("spec") or {}).get("evictionStrategy") or await _cluster_default(srv)
            migratable = any(c.get("type") == "LiveMigratable" and c.get("status") == "True"
                             for c in (vmi.get("status") or {}).get("conditions") or [])
            if strategy in ("LiveMigrate", "External") or (strategy == "LiveMigrateIfPossible" and migratable):
                await _migrate_away(srv, vmi)
                raise errors.StatusError(
                    429, f"Eviction triggered evacuation of VMI \"{ns}/{vmi['metadata']['name']}\"",
                    details={"causes": [{"reason": "DisruptionBudget", "message": "the VMI is being live-migrated "
                                         "to another node; retry once it has moved"}]})  # fmt: skip
    try:
        await srv.objects.delete(pods, ns, name, {}, OPTS)
    except errors.StatusError as exc:
        if exc.code != 404:
            raise
    return handlers.json_response(handlers.success_status(), 201)


async def _migrate_away(srv: APIServer, vmi: JSON) -> None:
    """One evacuation migration per VMI at a time (KubeVirt's evacuation controller)."""
    vmims = _lookup(srv, "kubevirt.io", "v1", "virtualmachineinstancemigrations")
    ns = vmi["metadata"].get("namespace")
    page = await srv.objects.list(vmims, ns)
    for st in page.items:
        m = st.obj
        if (m.get("spec") or {}).get("vmiName") == vmi["metadata"]["name"] and \
                ((m.get("status") or {}).get("phase") or "") in MIGRATION_PHASES_ACTIVE:
            return
    body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"generateName": "kubevirt-evacuation-", "namespace": ns,
                         "labels": {"kubevirt.io/evacuationMigration": "true"}},
            "spec": {"vmiName": vmi["metadata"]["name"]}}  # fmt: skip
    await srv.objects.create(vmims, ns, body, OPTS)
