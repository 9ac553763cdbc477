"""Discovery documents (/api, /apis, /apis/{g}/{v}) and the subresources.kubevirt.io group."""

from __future__ import annotations

import hashlib
from typing import Any

from virtplane.api import resources
from virtplane.apiserver import registry

JSON = dict[str, Any]

# KubeVirt's aggregated subresource API, as `kubectl api-resources` shows it on a KubeVirt cluster.
KUBEVIRT_SUBRESOURCES_GROUP = "subresources.kubevirt.io"
KUBEVIRT_SUBRESOURCE_VERSIONS = ("v1", "v1alpha3")
VM_SUBRESOURCES = {
    "start": ["update"], "stop": ["update"], "restart": ["update"], "migrate": ["update"],
    "addvolume": ["update"], "removevolume": ["update"], "memorydump": ["update"],
    "removememorydump": ["update"], "expand-spec": ["get"], "portforward": ["get"], "objectgraph": ["get"],
    "evacuate/cancel": ["update"],
}
VMI_SUBRESOURCES = {
    "console": ["get"], "vnc": ["get"], "vnc/screenshot": ["get"], "portforward": ["get"], "pause": ["update"],
    "unpause": ["update"], "freeze": ["update"], "unfreeze": ["update"], "softreboot": ["update"],
    "reset": ["update"], "guestosinfo": ["get"], "userlist": ["get"], "filesystemlist": ["get"],
    "addvolume": ["update"], "removevolume": ["update"], "usbredir": ["get"], "vsock": ["get"],
    "consolelog": ["get"],  # virtplane's: the serial console's log (virtctl console --log)
    "objectgraph": ["get"], "evacuate/cancel": ["update"], "backup": ["update"],
}


def storage_version_hash(res: resources.Resource) -> str:
    digest = hashlib.sha256(f"{res.group}/{res.version}/{res.kind}".encode()).digest()
    import base64

    return base64.b64encode(digest[:8]).decode()


def api_versions(server_address: str) -> JSON:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group_entry(name: str, versions: list[str]) -> JSON:
    vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": vs, "preferredVersion": vs[0]}


def api_group_list(reg: registry.Registry) -> JSON:
    groups = [_group_entry(g, list(vs)) for g, vs in reg.groups().items() if g]
    groups.append(_group_entry(KUBEVIRT_SUBRESOURCES_GROUP, list(KUBEVIRT_SUBRESOURCE_VERSIONS)))
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(reg: registry.Registry, group: str) -> JSON | None:
    if group == KUBEVIRT_SUBRESOURCES_GROUP:
        return {"kind": "APIGroup", "apiVersion": "v1",
                **_group_entry(group, list(KUBEVIRT_SUBRESOURCE_VERSIONS))}
    versions = reg.groups().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_entry(group, list(versions))}


def resource_entries(res: resources.Resource) -> list[JSON]:
    main: JSON = {
        "name": res.plural,
        "singularName": res.singular,
        "namespaced": res.namespaced,
        "kind": res.kind,
        "verbs": list(res.verbs),
        "storageVersionHash": storage_version_hash(res),
    }
    if res.short_names:
        main["shortNames"] = list(res.short_names)
    if res.categories:
        main["categories"] = list(res.categories)
    out = [main]
    if res.status_subresource:
        out.append({"name": f"{res.plural}/status", "singularName": "", "namespaced": res.namespaced,
                    "kind": res.kind, "verbs": ["get", "patch", "update"]})
    if res.scale:
        out.append({"name": f"{res.plural}/scale", "singularName": "", "namespaced": res.namespaced,
                    "group": "autoscaling", "version": "v1", "kind": "Scale",
                    "verbs": ["get", "patch", "update"]})
    if res.group == "" and res.plural == "namespaces":
        out.append({"name": "namespaces/finalize", "singularName": "", "namespaced": False,
                    "kind": "Namespace", "verbs": ["update"]})
    if res.group == "" and res.plural == "pods":
        for sub, verbs in (("log", ["get"]), ("exec", ["create", "get"]), ("portforward", ["create", "get"]),
                           ("eviction", ["create"]), ("attach", ["create", "get"])):
            entry = {"name": f"pods/{sub}", "singularName": "", "namespaced": True,
                     "kind": "Eviction" if sub == "eviction" else "PodExecOptions" if sub == "exec" else "Pod",
                     "verbs": verbs}
            if sub == "eviction":  # kubectl drain uses the eviction API only when it names policy/v1
                entry.update({"group": "policy", "version": "v1"})
            out.append(entry)
    return out


def api_resource_list(reg: registry.Registry, group: str, version: str) -> JSON | None:
    gv = f"{group}/{version}" if group else version
    if group == KUBEVIRT_SUBRESOURCES_GROUP:
        if version not in KUBEVIRT_SUBRESOURCE_VERSIONS:
            return None
        entries = [
            {"name": f"virtualmachines/{s}", "singularName": "", "namespaced": True, "kind": "VirtualMachine",
             "verbs": v} for s, v in VM_SUBRESOURCES.items()
        ] + [
            {"name": f"virtualmachineinstances/{s}", "singularName": "", "namespaced": True,
             "kind": "VirtualMachineInstance", "verbs": v} for s, v in VMI_SUBRESOURCES.items()
        ] + [{"name": "expand-vm-spec", "singularName": "", "namespaced": True, "kind": "VirtualMachine",
              "verbs": ["update"]}]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}
    versions = reg.groups().get(group)
    if not versions or version not in versions:
        return None
    entries = []
    for res in versions[version]:
        entries.extend(resource_entries(res))
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}


def aggregated_discovery(reg: registry.Registry, legacy: bool) -> JSON:
    """apidiscovery.k8s.io/v2 APIGroupDiscoveryList: one request instead of one per group."""
    items = []
    for group, versions in reg.groups().items():
        if (group == "") != legacy:
            continue
        vlist = []
        for version, ress in versions.items():
            rlist = []
            for res in ress:
                entry: JSON = {
                    "resource": res.plural,
                    "responseKind": {"group": res.group, "version": res.version, "kind": res.kind},
                    "scope": "Namespaced" if res.namespaced else "Cluster",
                    "singularResource": res.singular,
                    "verbs": list(res.verbs),
                }
                if res.short_names:
                    entry["shortNames"] = list(res.short_names)
                if res.categories:
                    entry["categories"] = list(res.categories)
                subs = []
                if res.status_subresource:
                    subs.append({"subresource": "status", "verbs": ["get", "patch", "update"],
                                 "responseKind": {"group": res.group, "version": res.version, "kind": res.kind}})
                if res.scale:
                    subs.append({"subresource": "scale", "verbs": ["get", "patch", "update"],
                                 "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"}})
                if subs:
                    entry["subresources"] = subs
                rlist.append(entry)
            vlist.append({"version": version, "resources": rlist, "freshness": "Current"})
        items.append({"metadata": {"name": group}, "versions": vlist})
    if not legacy:
        items.append({
            "metadata": {"name": KUBEVIRT_SUBRESOURCES_GROUP},
            "versions": [{"version": v, "freshness": "Current", "resources": []}
                         for v in KUBEVIRT_SUBRESOURCE_VERSIONS],
        })
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
            "items": items}
