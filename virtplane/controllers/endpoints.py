"""Endpoints and EndpointSlices of Services with a selector (Kubernetes' endpoints and endpointslice
controllers in one).

A Service selects Pods by label: virt-launcher pods carry their VMI's labels (the VM template's), so a
Service over a VM's labels reaches the VM through its launcher pod's IP, as in KubeVirt; plain Pods are
selected the same way. Every Pod with an IP that is not terminating or finished is an endpoint, ready when
the Pod's `Ready` condition is True. Ports: a numeric `targetPort` as is; a named one is looked up in the
Pod's container ports (Pods without it are left out for that port, as Kubernetes does).

Endpoints have the Service's name and are deleted with it; the one EndpointSlice per Service
(`<service>-<hash>`, label `kubernetes.io/service-name`) is owned by the Service, so garbage collection
removes it. Services without a selector are left alone: their Endpoints are the user's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import Any

from virtplane.client import informer, rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]

SERVICES = rest.GVR("", "v1", "services")
PODS = rest.GVR("", "v1", "pods")
ENDPOINTS = rest.GVR("", "v1", "endpoints")
ENDPOINT_SLICES = rest.GVR("discovery.k8s.io", "v1", "endpointslices")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"


def selects(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    """A Service selector is a plain map: every key must be there with that value (empty selects nothing)."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_is_ready(pod: JSON) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _resolve_port(pod: JSON, target: Any) -> int | None:
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for c in ((pod.get("spec") or {}).get("containers") or []):
        for p in c.get("ports") or []:
            if p.get("name") == target and p.get("containerPort"):
                return int(p["containerPort"])
    return None


def slice_name(svc: JSON) -> str:
    digest = hashlib.sha256(svc["metadata"].get("uid", "").encode()).hexdigest()[:5]
    return f"{svc['metadata']['name'][:57]}-{digest}"


def desired(svc: JSON, pods: list[JSON]) -> tuple[JSON, JSON]:
    """(Endpoints, EndpointSlice) for `svc` over the Pods of its namespace (only the selected ones count)."""
    meta = svc["metadata"]
    ns, name = meta["namespace"], meta["name"]
    spec = svc.get("spec") or {}
    svc_ports = [p for p in spec.get("ports") or [] if isinstance(p, dict)]
    selected = sorted(
        (p for p in pods if selects(spec.get("selector"), p["metadata"].get("labels"))
         and (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
         and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")),
        key=lambda p: p["metadata"]["name"])  # fmt: skip
    # Endpoints: subsets grouped by the resolved port list (pods agreeing on named ports share a subset).
    subsets: dict[tuple[tuple[str, int, str], ...], JSON] = {}
    slice_eps: list[JSON] = []
    slice_ports: dict[tuple[str, int, str], JSON] = {}
    for pod in selected:
        st = pod["status"]
        ports = []
        for sp in svc_ports:
            port = _resolve_port(pod, sp.get("targetPort", sp.get("port")))
            if port is not None:
                ports.append((str(sp.get("name") or ""), port, str(sp.get("protocol") or "TCP")))
        if svc_ports and not ports:
            continue
        ports_key = tuple(ports)
        ref = {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"], "uid": pod["metadata"].get("uid")}
        addr: JSON = {"ip": st["podIP"], "targetRef": ref}
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            addr["nodeName"] = node
        ready = pod_is_ready(pod)
        subset = subsets.setdefault(ports_key, {})
        subset.setdefault("addresses" if ready else "notReadyAddresses", []).append(addr)
        ep: JSON = {"addresses": [st["podIP"]], "conditions": {"ready": ready, "serving": ready,
                                                               "terminating": False}, "targetRef": ref}  # fmt: skip
        if node:
            ep["nodeName"] = node
        slice_eps.append(ep)
        for p in ports:
            slice_ports[p] = {**({"name": p[0]} if p[0] else {"name": ""}), "port": p[1], "protocol": p[2]}
    endpoints: JSON = {
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": ns, "labels": dict(meta.get("labels") or {})},
    }  # fmt: skip
    out_subsets = []
    for ports_key, subset in subsets.items():
        subset["ports"] = [{**({"name": n} if n else {}), "port": p, "protocol": proto} for n, p, proto in ports_key]
        out_subsets.append(subset)
    if out_subsets:
        endpoints["subsets"] = out_subsets
    eps: JSON = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(svc), "namespace": ns,
            "labels": {**(meta.get("labels") or {}), SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": meta.get("uid"),
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "addressType": "IPv4",
        "endpoints": slice_eps,
        "ports": sorted(slice_ports.values(), key=lambda p: (p["name"], p["port"])),
    }  # fmt: skip
    return endpoints, eps


def _same(current: JSON, want: JSON, fields: tuple[str, ...]) -> bool:
    cm, wm = current.get("metadata") or {}, want["metadata"]
    if (cm.get("labels") or {}) != wm.get("labels", {}):
        return False
    if "ownerReferences" in wm and cm.get("ownerReferences") != wm["ownerReferences"]:
        return False
    return all(current.get(f) == want.get(f) for f in fields)


class EndpointsController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.services = informer.Informer(client, SERVICES)
        self.pods = informer.Informer(client, PODS)
        self.endpoints = informer.Informer(client, ENDPOINTS)
        self.slices = informer.Informer(client, ENDPOINT_SLICES, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        self.queue = informer.WorkQueue(self._reconcile, workers=2, name="endpoints")
        self.services.add_handler(lambda _k, obj, _old: self.queue.add(informer.key_of(obj)))
        self.pods.add_handler(self._on_pod)
        self.endpoints.add_handler(lambda _k, obj, _old: self.queue.add(informer.key_of(obj)))
        self.slices.add_handler(self._on_slice)

    async def start(self) -> None:
        for inf in (self.services, self.pods, self.endpoints, self.slices):
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for inf in (self.services, self.pods, self.endpoints, self.slices):
            await inf.stop()

    def _on_pod(self, _kind: str, obj: JSON, old: JSON | None) -> None:
        ns = obj["metadata"].get("namespace")
        label_sets = [obj["metadata"].get("labels")] + ([old["metadata"].get("labels")] if old else [])
        for svc in self.services.list(ns):
            sel = (svc.get("spec") or {}).get("selector")
            if any(selects(sel, labels) for labels in label_sets):
                self.queue.add(informer.key_of(svc))

    def _on_slice(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        svc = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc:
            self.queue.add((obj["metadata"].get("namespace") or "", svc))

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not (self.services.synced.is_set() and self.pods.synced.is_set() and self.endpoints.synced.is_set()
                and self.slices.synced.is_set()):  # fmt: skip
            return 0.2  # deciding from a half-filled cache would delete live Endpoints
        ns, name = key
        svc = self.services.get(ns, name)
        if svc is None or svc["metadata"].get("deletionTimestamp"):
            if self.endpoints.get(ns, name) is not None:
                try:
                    await self.client.delete(ENDPOINTS, name, ns)
                except rest.NotFound:
                    pass
            return None
        if not (svc.get("spec") or {}).get("selector") or (svc.get("spec") or {}).get("type") == "ExternalName":
            return None
        want_ep, want_slice = desired(svc, self.pods.list(ns))
        await self._put(ENDPOINTS, self.endpoints.get(ns, name), want_ep, ("subsets",))
        for stale in self.slices.list(ns):
            labels = stale["metadata"].get("labels") or {}
            if labels.get(SERVICE_NAME_LABEL) == name and stale["metadata"]["name"] != want_slice["metadata"]["name"]:
                try:
                    await self.client.delete(ENDPOINT_SLICES, stale["metadata"]["name"], ns)
                except rest.NotFound:
                    pass
        await self._put(ENDPOINT_SLICES, self.slices.get(ns, want_slice["metadata"]["name"]), want_slice,
                        ("addressType", "endpoints", "ports"))  # fmt: skip
        return None

    async def _put(self, gvr: rest.GVR, current: JSON | None, want: JSON, fields: tuple[str, ...]) -> None:
        if current is None:
            try:
                await self.client.create(gvr, want, want["metadata"]["namespace"])
            except rest.Conflict:
                raise RuntimeError(f"{gvr.plural} {want['metadata']['name']} appeared; retrying") from None
            return
        if _same(current, want, fields):
            return
        body = copy.deepcopy(current)
        body["metadata"]["labels"] = want["metadata"]["labels"]
        if "ownerReferences" in want["metadata"]:
            body["metadata"]["ownerReferences"] = want["metadata"]["ownerReferences"]
        for f in fields:
            if f in want:
                body[f] = want[f]
            else:
                body.pop(f, None)
        await self.client.update(gvr, body)  # a Conflict retries through the queue's backoff
