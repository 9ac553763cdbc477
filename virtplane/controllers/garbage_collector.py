"""Garbage collection by ownerReferences: background, foreground and orphan deletion.

Owners and dependents are seen through informers on every listable resource; deletions go
through the API like any client's, so finalizers and admission apply to them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from virtplane.client import discovery, informer, rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]


class GarbageCollector:
    def __init__(self, client: rest.Client, *, rediscover_interval: float = 10.0) -> None:
        self.client = client
        self._informers: dict[rest.GVR, informer.Informer] = {}
        self._by_uid: dict[str, tuple[rest.GVR, JSON]] = {}
        self._dependents: dict[str, set[str]] = defaultdict(set)  # owner uid -> dependent uids
        self._queue = informer.WorkQueue(self._reconcile, workers=4, name="gc")
        self._rediscover_interval = rediscover_interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._sync_informers()
        self._queue.start()
        self._task = asyncio.create_task(self._rediscover_loop(), name="gc-rediscover")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._queue.stop()
        for inf in self._informers.values():
            await inf.stop()

    async def _rediscover_loop(self) -> None:
        while True:
            await asyncio.sleep(self._rediscover_interval)
            with contextlib.suppress(rest.APIError, OSError):
                await self._sync_informers()  # new CRDs bring new kinds that may own or be owned

    async def _sync_informers(self) -> None:
        for r in await discovery.server_resources(self.client):
            if not {"list", "watch", "delete"} <= r.verbs or r.gvr in self._informers:
                continue
            if r.gvr.plural == "events":
                continue
            inf = informer.Informer(self.client, r.gvr)
            inf.add_handler(lambda kind, obj, old, gvr=r.gvr: self._on_event(gvr, kind, obj, old))
            self._informers[r.gvr] = inf
            inf.start()

    def _on_event(self, gvr: rest.GVR, kind: str, obj: JSON, old: JSON | None) -> None:
        meta = obj["metadata"]
        uid = meta.get("uid", "")
        if old is not None:
            for ref in old["metadata"].get("ownerReferences") or []:
                self._dependents[ref["uid"]].discard(old["metadata"].get("uid", ""))
        if kind == "DELETED":
            self._by_uid.pop(uid, None)
            for dep in list(self._dependents.get(uid, ())):
                self._queue.add(("dep", dep))
            return
        self._by_uid[uid] = (gvr, obj)
        refs = meta.get("ownerReferences") or []
        for ref in refs:
            self._dependents[ref["uid"]].add(uid)
        if refs:
            self._queue.add(("dep", uid))
        if meta.get("deletionTimestamp") and {"foregroundDeletion", "orphan"} & set(meta.get("finalizers") or []):
            self._queue.add(("owner", uid))
        for ref in refs:
            # a dependent changing may unblock its owner's foreground deletion
            if ref["uid"] in self._by_uid:
                self._queue.add(("owner", ref["uid"]))

    async def _reconcile(self, key: informer.Key) -> float | None:
        role, uid = key
        entry = self._by_uid.get(uid)
        if entry is None:
            return None
        gvr, obj = entry
        if role == "dep":
            await self._check_dependent(gvr, obj)
        else:
            return await self._process_owner(gvr, obj)
        return None

    def _owner_alive(self, ref: JSON) -> bool:
        return ref["uid"] in self._by_uid

    async def _check_dependent(self, gvr: rest.GVR, obj: JSON) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs or obj["metadata"].get("deletionTimestamp"):
            return
        if not all(inf.synced.is_set() for inf in self._informers.values()):
            raise RuntimeError("caches not synced yet")  # retried with backoff: never delete on a partial view
        alive = [r for r in refs if self._owner_alive(r)]
        if alive:
            return
        meta = obj["metadata"]
        log.info("deleting %s %s/%s: all owners are gone", gvr.plural, meta.get("namespace", ""), meta["name"])
        with contextlib.suppress(rest.NotFound):
            await self.client.delete(gvr, meta["name"], meta.get("namespace"), propagation="Background",
                                     preconditions={"uid": meta["uid"]})

    async def _process_owner(self, gvr: rest.GVR, obj: JSON) -> float | None:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if not meta.get("deletionTimestamp"):
            return None
        uid = meta["uid"]
        deps = [self._by_uid[d] for d in self._dependents.get(uid, ()) if d in self._by_uid]
        if "orphan" in finalizers:
            for dgvr, dep in deps:
                dmeta = dep["metadata"]
                refs = [r for r in dmeta.get("ownerReferences") or [] if r["uid"] != uid]
                with contextlib.suppress(rest.NotFound):
                    await self.client.patch(dgvr, dmeta["name"], {"metadata": {"ownerReferences": refs or None}},
                                            dmeta.get("namespace"))
            await self._remove_finalizer(gvr, obj, "orphan")
            return None
        if "foregroundDeletion" in finalizers:
            blocking = False
            for dgvr, dep in deps:
                dmeta = dep["metadata"]
                ref = next(r for r in dmeta.get("ownerReferences") or [] if r["uid"] == uid)
                if ref.get("blockOwnerDeletion"):
                    blocking = True
                if not dmeta.get("deletionTimestamp"):
                    with contextlib.suppress(rest.NotFound):
                        await self.client.delete(dgvr, dmeta["name"], dmeta.get("namespace"),
                                                 propagation="Foreground")
            if blocking:
                return 0.5  # dependents still going away; look again
            await self._remove_finalizer(gvr, obj, "foregroundDeletion")
        return None

    async def _remove_finalizer(self, gvr: rest.GVR, obj: JSON, name: str) -> None:
        meta = obj["metadata"]
        rest_f = [f for f in meta.get("finalizers") or [] if f != name]
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
            {"op": "replace", "path": "/metadata/finalizers", "value": rest_f},
        ]
        try:
            await self.client.patch(gvr, meta["name"], patch, meta.get("namespace"), patch_type="json")
        except rest.NotFound:
            pass
        except rest.APIError as exc:
            if exc.code in (409, 422):
                # stale view: fetch and retry with the current object
                fresh = await self.client.get(gvr, meta["name"], meta.get("namespace"))
                rest_f = [f for f in fresh["metadata"].get("finalizers") or [] if f != name]
                await self.client.patch(gvr, meta["name"], {"metadata": {"finalizers": rest_f}},
                                        meta.get("namespace"))
            else:
                raise
