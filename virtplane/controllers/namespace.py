"""Namespace lifecycle: deleting a namespace deletes everything in it, then the namespace."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from virtplane.client import discovery, informer, rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]
NAMESPACES = rest.GVR("", "v1", "namespaces", namespaced=False)


class NamespaceController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.informer = informer.Informer(client, NAMESPACES)
        self.queue = informer.WorkQueue(self._reconcile, workers=2, name="namespace")
        self.informer.add_handler(self._on_event)

    async def start(self) -> None:
        self.informer.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.informer.stop()

    def _on_event(self, kind: str, obj: JSON, old: JSON | None) -> None:
        if kind != "DELETED" and obj["metadata"].get("deletionTimestamp"):
            self.queue.add(("", obj["metadata"]["name"]))

    async def _reconcile(self, key: informer.Key) -> float | None:
        name = key[1]
        ns = self.informer.get(None, name)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return None
        remaining = 0
        for r in await discovery.server_resources(self.client):
            if not r.gvr.namespaced or not {"list", "delete"} <= r.verbs:
                continue
            items = (await self.client.list(r.gvr, name)).get("items", [])
            for item in items:
                remaining += 1
                if not item["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(rest.NotFound):
                        await self.client.delete(r.gvr, item["metadata"]["name"], name, propagation="Background")
        if remaining:
            return 0.3  # objects with finalizers are still going away
        spec_finalizers = [f for f in (ns.get("spec") or {}).get("finalizers") or [] if f != "kubernetes"]
        body = {**ns, "spec": {**(ns.get("spec") or {}), "finalizers": spec_finalizers}}
        with contextlib.suppress(rest.NotFound):
            await self.client.request("PUT", f"/api/v1/namespaces/{name}/finalize", body=body)
        log.info("namespace %s finalized", name)
        return None
